"""Post-training weight quantization of a denoiser (uniform int8 / int4, mixed precision, ACQ-E), run by
dequantising on the fly, saved as a pipeline folder that ``cqpolicy.models.load_model`` reads back.

``codecs``: how one weight is stored; ``weights``: quantizing a model (calibration, bit allocation);
``storage``: the folder format.
"""
from cqpolicy.quantization.codecs import LayerCode, encode, huffman_decode, huffman_encode, huffman_lengths
from cqpolicy.quantization.storage import (fp_weights_info, load_quantized, save_quantized,
                                          weights_info, weights_label)
from cqpolicy.quantization.weights import (CANDIDATE_BITS, METHODS, QuantResult, allocate_bits, calibration_inputs,
                                           check_arguments, layer_sensitivity, quantize_model)

__all__ = ["CANDIDATE_BITS", "METHODS", "LayerCode", "QuantResult", "allocate_bits", "calibration_inputs",
           "check_arguments", "encode", "fp_weights_info", "huffman_decode", "huffman_encode",
           "huffman_lengths", "layer_sensitivity", "load_quantized", "quantize_model", "save_quantized", "weights_info",
           "weights_label"]
