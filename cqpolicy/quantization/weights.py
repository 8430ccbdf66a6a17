"""Post-training weight quantization of a denoiser: uniform int8 / int4, mixed precision, ACQ-E.

``quantize_model`` encodes every nn.Linear / nn.Conv2d weight of ``model.transformer`` (``codecs``), attaches
parametrizations that dequantise on the fly, and rounds every other float tensor to float16 (as stored), so the
model in memory computes exactly what a reload of ``save_quantized``'s folder computes.

Mixed precision (``mixed``; ``acqe`` always) is chosen from a calibration run: real (x_t, t, condition) inputs of
a few steps of calibration-seed samples (optionally sampled with a cache policy deployed, CacheQuant-style, so the
weights are calibrated on the inputs they meet under that schedule); each layer alone is quantized at each
candidate width and the relative L2 change of the model output measured; a greedy allocation then lowers the
layer with the least squared-error increase per saved stored bit until the stored bits per weight (scales, code
tables and padding included) meet the budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn.utils import parametrize

from cqpolicy.quantization.codecs import LayerCode, encode

METHODS = ("int8", "int4", "mixed", "acqe")
CANDIDATE_BITS = (2, 3, 4, 6, 8)
DEFAULT_GROUP_SIZE = {"int8": None, "int4": 64, "mixed": 64}  # None: per output channel
DEFAULT_BUDGET_BITS = 4.0
CALIBRATION_STEPS = 4  # denoising steps (spread over the run) whose inputs are kept for calibration


@dataclass
class QuantResult:
    """What ``quantize_model`` did: the stored code of every quantized layer and the other tensors as stored."""

    method: str
    group_size: int | None
    budget_bits: float | None
    layers: dict[str, LayerCode]
    unquantized: dict[str, torch.Tensor]  # state-dict key -> tensor as stored (float16 for float tensors)
    rel_errors: dict[str, float]  # relative L2 error of each quantized weight
    output_errors: dict[str, float] = field(default_factory=dict)  # calibration: output change at its chosen bits
    calibration: dict = field(default_factory=dict)
    # the unquantized model's name and weight fingerprint: a bench checks a folder was made from its model
    source: dict = field(default_factory=dict)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor written to ``quantized.safetensors``: ``<layer>.weight.<part>`` and the unquantized ones."""
        out = {f"{name}.weight.{part}": t for name, code in self.layers.items() for part, t in code.tensors.items()}
        out.update(self.unquantized)
        return out

    def report(self) -> dict:
        stored = self.stored_tensors()
        size = sum(_nbytes(t) for t in stored.values())
        params = sum(c.numel for c in self.layers.values()) + sum(t.numel() for t in self.unquantized.values())
        weight_bytes = sum(c.nbytes for c in self.layers.values())
        weight_params = sum(c.numel for c in self.layers.values())
        return {
            "method": self.method, "group_size": self.group_size, "budget_bits": self.budget_bits,
            "size_bytes": size, "fp32_bytes": 4 * params, "fp16_bytes": 2 * params,
            "compression_ratio": 4 * params / size, "compression_ratio_vs_fp16": 2 * params / size,
            # stored bits of the quantized weights (scales, tables, levels, padding) per weight
            "bits_per_weight": 8 * weight_bytes / weight_params,
            "quantized_params": weight_params, "unquantized_bytes": size - weight_bytes,
            "calibration": self.calibration, "source_model": self.source.get("model"),
            "source_fingerprint": self.source.get("fingerprint"),
            "layers": {name: {"bits": c.bits, "bytes": c.nbytes, "params": c.numel,
                              "rel_error": self.rel_errors[name], "output_rel_error": self.output_errors.get(name)}
                       for name, c in self.layers.items()},
        }


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def quantizable_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def check_arguments(method: str, group_size: int | None = None, budget_bits: float | None = None,
                    candidate_bits=CANDIDATE_BITS) -> None:
    """Bad arguments raise ValueError (one line) before anything runs."""
    if method not in METHODS:
        raise ValueError(f"unsupported weight quantization {method!r}; choose from {', '.join(METHODS)}")
    if group_size is not None and (isinstance(group_size, bool) or int(group_size) != group_size or group_size < 0):
        raise ValueError(f"--group-size must be a non-negative integer (0: per output channel), got {group_size}")
    if group_size and method == "acqe":
        raise ValueError("--group-size applies to int8, int4 and mixed (acqe levels are per layer)")
    if budget_bits is not None:
        if method in ("int8", "int4"):
            raise ValueError(f"--budget-bits applies to mixed and acqe, not {method}")
        if not math.isfinite(budget_bits) or budget_bits < min(candidate_bits):
            raise ValueError(f"--budget-bits {budget_bits} is below the smallest bit width {min(candidate_bits)}")


def quantize_model(model, method: str, group_size: int | None = None, budget_bits: float | None = None,
                   calib_samples: int = 8, calib_steps: int = 25, calib_policy: str | None = None,
                   candidate_bits=CANDIDATE_BITS) -> QuantResult:
    """Quantize ``model.transformer`` (a LoadedModel's) in place; returns what is stored.

    ``group_size``: None = the method's default (int4 / mixed: 64 where it divides a layer's flattened input
    dim, else per channel; int8: per channel), 0 = per output channel. ``budget_bits`` (mixed, acqe; default 4):
    stored bits per quantized weight. ``calib_policy``: a cache policy spec to deploy while calibrating.
    """
    from cqpolicy.models.fingerprint import model_fingerprint

    check_arguments(method, group_size, budget_bits, candidate_bits)
    source = {"model": model.name, "fingerprint": model_fingerprint(model)}  # before any weight changes
    if group_size is None:
        group_size = DEFAULT_GROUP_SIZE.get(method)
    transformer = model.transformer
    layers = quantizable_layers(transformer)
    calibration, output_errors = {}, {}
    if method in ("int8", "int4"):
        codes = {name: encode(m.weight, "uniform", int(method[3:]), group_size) for name, m in layers.items()}
    else:
        budget_bits = DEFAULT_BUDGET_BITS if budget_bits is None else float(budget_bits)
        kind = "acqe" if method == "acqe" else "uniform"
        options = {name: {b: encode(m.weight, kind, b, group_size) for b in candidate_bits}
                   for name, m in layers.items()}
        bits_of = {name: {b: 8 * c.nbytes for b, c in opts.items()} for name, opts in options.items()}
        params = {name: layers[name].weight.numel() for name in layers}
        check_budget(bits_of, params, budget_bits)  # before the calibration run
        inputs = calibration_inputs(model, calib_samples, calib_steps, calib_policy)
        errors = layer_sensitivity(model, inputs, options)
        allocation = allocate_bits(bits_of, errors, params, budget_bits)
        codes = {name: options[name][b] for name, b in allocation.items()}
        output_errors = {name: errors[name][b] for name, b in allocation.items()}
        calibration = {"samples": calib_samples, "steps": calib_steps, "policy": calib_policy or "none",
                       "candidate_bits": list(candidate_bits), "inputs": sum(len(x) for x, _, _ in inputs),
                       "sensitivity": {name: {str(b): e for b, e in errs.items()} for name, errs in errors.items()}}
    rel_errors = {name: float((codes[name].dequantize() - m.weight.float()).norm() / m.weight.float().norm()
                              .clamp_min(1e-30)) for name, m in layers.items()}
    unquantized = round_unquantized(transformer, set(layers))
    attach(transformer, codes)
    return QuantResult(method, group_size, budget_bits, codes, unquantized, rel_errors, output_errors, calibration,
                       source)


def round_unquantized(transformer: torch.nn.Module, quantized: set[str]) -> dict[str, torch.Tensor]:
    """Every state-dict tensor but the quantized weights, float ones rounded to float16 in place (as stored)."""
    out = {}
    with torch.no_grad():
        for key, t in transformer.state_dict(keep_vars=True).items():
            if key.endswith(".weight") and key[:-len(".weight")] in quantized:
                continue
            if t.is_floating_point():
                t.copy_(t.half())  # the model in memory computes with what a reload will read
                out[key] = t.detach().half().cpu().contiguous()
            else:
                out[key] = t.detach().cpu().contiguous()
    return out


def attach(transformer: torch.nn.Module, codes: dict[str, LayerCode]) -> None:
    """Replace each coded layer's weight by a parametrization that dequantises it at every forward."""
    for name, code in codes.items():
        module = transformer.get_submodule(name)
        device = module.weight.device
        parametrize.register_parametrization(module, "weight", code.runtime().to(device), unsafe=True)


def check_budget(bits_of: dict[str, dict[int, int]], params: dict[str, int], budget_bits: float) -> None:
    floor = sum(min(b.values()) for b in bits_of.values()) / sum(params.values())
    if floor > budget_bits:
        raise ValueError(f"--budget-bits {budget_bits:g} is below what any allocation can meet: the smallest "
                         f"width stores {floor:.3f} bits per weight (scales, tables and padding included)")


def allocate_bits(bits_of: dict[str, dict[int, int]], errors: dict[str, dict[int, float]], params: dict[str, int],
                  budget_bits: float) -> dict[str, int]:
    """Greedy: from the widest width everywhere, repeatedly take the step down (layer, to any narrower width)
    with the least squared-output-error increase per stored bit saved, until the stored bits per weight
    (``bits_of[layer][width]`` summed over layers / weights) are within ``budget_bits``."""
    check_budget(bits_of, params, budget_bits)
    chosen = {name: max(widths) for name, widths in bits_of.items()}
    limit = budget_bits * sum(params.values())
    total = sum(bits_of[n][b] for n, b in chosen.items())
    while total > limit:
        best = None
        for name, b in chosen.items():
            for lower in (w for w in bits_of[name] if w < b):
                saved = bits_of[name][b] - bits_of[name][lower]
                if saved > 0:  # squared errors: independent layer errors add up roughly in energy
                    cost = (errors[name][lower] ** 2 - errors[name][b] ** 2) / saved
                    if best is None or cost < best[0]:
                        best = (cost, name, lower)
        _, name, lower = best  # check_budget guarantees a step exists while over the limit
        total -= bits_of[name][chosen[name]] - bits_of[name][lower]
        chosen[name] = lower
    return chosen


def calibration_inputs(model, num_samples: int, steps: int, policy: str | None = None) -> list[tuple]:
    """(x_t, timesteps, condition) of ``CALIBRATION_STEPS`` steps spread over a ``steps``-step run of
    ``num_samples`` calibration-seed samples, CFG rows included; sampled with cache policy ``policy`` deployed
    when given (the inputs the quantized model meets under that schedule)."""
    from cqpolicy import seeds
    from cqpolicy.policies import make_policy
    from cqpolicy.runtime import enable
    from cqpolicy.sampling.sampler import cat_conditions, denoise_batch, initial_noise, settings_for, uses_cfg

    if num_samples < 1:
        raise ValueError(f"--calib-samples must be at least 1, got {num_samples}")
    settings = settings_for(model, steps=steps, batch_size=num_samples)
    labels = torch.arange(num_samples) % model.num_classes
    cond = model.condition(labels.to(model.device))
    if uses_cfg(settings.guidance_scale, model):  # as the sampler: conditional rows first, null rows second
        cond = cat_conditions(cond, model.null_condition(cond, num_samples))
    keep = set(np.linspace(0, steps - 1, min(CALIBRATION_STEPS, steps)).round().astype(int).tolist())
    captured = []

    def capture(step, t, x_in, out):
        if step in keep:
            captured.append((x_in.detach().clone(), t.reshape(1).to(x_in.device).expand(len(x_in)), cond))

    start = seeds.start("calibration")  # never test seeds
    noise = initial_noise(list(range(start, start + num_samples)), model.latent_shape, model.dtype, model.device)
    if policy and policy != "none":
        policy_obj = make_policy(policy)
        policy_obj.prepare(model, settings)
        with enable(model.transformer, policy_obj):
            denoise_batch(model, labels, noise, settings, output_callback=capture)
    else:
        denoise_batch(model, labels, noise, settings, output_callback=capture)
    return captured


@torch.no_grad()
def layer_sensitivity(model, inputs: list[tuple], options: dict[str, dict[int, LayerCode]]) -> dict:
    """errors[layer][bits]: relative L2 change of the model output over ``inputs`` when only that layer is
    quantized at that width (the rest of the model in full precision)."""
    transformer = model.transformer

    def outputs():
        return torch.cat([model.adapter.denoise(transformer, x, t, c).float().flatten() for x, t, c in inputs])

    reference = outputs()
    norm = reference.norm().clamp_min(1e-30)
    errors = {}
    for name, widths in options.items():
        weight = transformer.get_submodule(name).weight
        original = weight.detach().clone()
        errors[name] = {}
        for bits, code in widths.items():
            weight.copy_(code.dequantize().to(weight))
            errors[name][bits] = float((outputs() - reference).norm() / norm)
        weight.copy_(original)
    return errors
