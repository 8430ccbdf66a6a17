"""A quantized model on disk: a diffusers pipeline folder whose denoiser holds packed weights.

::

    DIR/scheduler/scheduler_config.json      the source model's scheduler
    DIR/<transformer|unet>/config.json        the denoiser's diffusers config (built with ``from_config``)
    DIR/<transformer|unet>/quantized.safetensors
        <layer>.weight.q / .scales            uniform: int8, packed int4 or bit-packed codes; float16 scales
        <layer>.weight.stream / .lengths / .centres   acqe: Huffman stream, code lengths, float16 levels
        every other state-dict tensor          float16 (float tensors) or as is
    DIR/<transformer|unet>/quantization.json  method, per-layer codec / bits / shape, sha256 of the safetensors,
                                              the source model's name and weight fingerprint
    DIR/report.json                           sizes (every stored byte), compression, per-layer bits and errors,
                                              the source model's name and weight fingerprint

``cqpolicy.models.load_model(DIR)`` finds ``quantization.json`` and calls ``load_quantized``: tensors are read
with safetensors (never pickle), and anything missing, altered or inconsistent is a one-line ``ModelLoadError``.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from cqpolicy.outputs import OutputDir
from cqpolicy.quantization.codecs import KINDS, LayerCode, check_bits
from cqpolicy.quantization.weights import DEFAULT_GROUP_SIZE, QuantResult, attach, quantizable_layers

QUANTIZED_FILE = "quantized.safetensors"
META_FILE = "quantization.json"
FORMAT = "cqpolicy-quantized-weights/1"


def save_quantized(model, result: QuantResult, out_dir, overwrite: bool = False) -> dict:
    """Write ``model`` (quantized by ``quantize_model`` into ``result``) as a loadable folder; returns the report.

    Files are staged beside ``out_dir`` and moved in at the end: on any error ``out_dir`` is left as it was.
    """
    from safetensors.torch import save_file

    with OutputDir(out_dir, overwrite) as out:
        staging = out.staging
        name = "unet" if type(model.transformer).__name__.startswith("UNet") else "transformer"
        folder = staging / name
        model.transformer.save_config(folder)
        save_file(result.stored_tensors(), str(folder / QUANTIZED_FILE))
        meta = {"format": FORMAT, "method": result.method, "group_size": result.group_size,
                "budget_bits": result.budget_bits, "calibration_policy": result.calibration.get("policy", "none"),
                "source_model": result.source.get("model"), "source_fingerprint": result.source.get("fingerprint"),
                "sha256": _sha256(folder / QUANTIZED_FILE),
                "layers": {n: {"kind": c.kind, "bits": c.bits, "shape": list(c.shape), "group_size": c.group_size}
                           for n, c in result.layers.items()},
                "unquantized": sorted(result.unquantized)}
        (folder / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        (staging / "scheduler").mkdir()
        (staging / "scheduler" / "scheduler_config.json").write_text(json.dumps(model.scheduler_config, indent=2))
        if model.vae is not None:
            model.vae.save_pretrained(staging / "vae")
        report = {"model": model.name, "denoiser_folder": name, **result.report()}
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        if out.path.is_dir():  # only reached when empty or with overwrite: no file of an older folder stays
            for item in out.path.iterdir():
                shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
        out.commit()
    return report


def weights_label(meta: dict) -> str:
    """A short name for a folder's weights that tells different settings apart (a leaderboard row groups by it):
    the method, the bit budget (mixed / acqe), a non-default group size, the calibration policy when there was
    one, e.g. ``int8``, ``mixed4``, ``acqe3.5``, ``int4-g0``, ``mixed4@fora:interval=3``."""
    label = meta["method"] + (f"{meta['budget_bits']:g}" if meta.get("budget_bits") is not None else "")
    if meta.get("group_size") != DEFAULT_GROUP_SIZE.get(meta["method"]):
        label += f"-g{meta['group_size']}"
    policy = meta.get("calibration_policy") or "none"
    # no commas: the leaderboard lists families (which carry this label) comma-separated
    return label if policy == "none" else f"{label}@{policy.replace(',', ';')}"


def weights_info(folder, fingerprint: str | None = None) -> dict:
    """What a bench row records of a ``cqpolicy quantize`` folder: ``weights`` (``weights_label``), ``model_bytes``
    (every stored byte), ``compression_ratio`` (vs fp32), ``source_model``, ``source_fingerprint``. With
    ``fingerprint`` (``model_fingerprint`` of a bench's model) the folder must have been quantized from that model.
    Anything else is a one-line ``ModelLoadError``."""
    from cqpolicy.models.loading import ModelLoadError
    from cqpolicy.outputs import read_json

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"quantized model folder {folder} does not exist (cqpolicy quantize --out writes it)")
    report = read_json(folder / "report.json", ModelLoadError, f"{folder} holds no report.json: not a cqpolicy "
                                                               f"quantize folder")
    denoiser = report.get("denoiser_folder") if isinstance(report, dict) else None
    meta = read_json(folder / str(denoiser) / META_FILE, ModelLoadError, f"{folder} holds no {denoiser}/{META_FILE}")
    try:
        info = {"weights": weights_label(meta), "model_bytes": int(report["size_bytes"]),
                "compression_ratio": float(report["compression_ratio"]), "source_model": meta.get("source_model"),
                "source_fingerprint": meta.get("source_fingerprint")}
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{folder}: report.json or {META_FILE} lacks {exc}") from None
    if not info["source_fingerprint"]:
        raise ModelLoadError(f"{folder} records no source model fingerprint (quantized before provenance was "
                             f"recorded): quantize it again")
    if fingerprint is not None and info["source_fingerprint"] != fingerprint:
        raise ModelLoadError(f"{folder} was quantized from {info['source_model']} (weights "
                             f"{info['source_fingerprint']}), not from this model (weights {fingerprint})")
    return info


def fp_weights_info(model) -> dict:
    """``weights_info``'s fields for an unquantized ``LoadedModel``: ``fp``, its denoiser's tensors' bytes in their
    dtype as loaded (what its safetensors hold for a float32 checkpoint), compression vs fp32 (1.0 for float32)."""
    tensors = model.transformer.state_dict().values()
    size = sum(t.numel() * t.element_size() for t in tensors)
    return {"weights": "fp", "model_bytes": size, "compression_ratio": 4 * sum(t.numel() for t in tensors) / size}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_quantized(folder, model_class, dtype=torch.float32) -> torch.nn.Module:
    """The ``model_class`` denoiser of a quantized ``folder`` with dequantising parametrizations attached."""
    from cqpolicy.models.loading import ModelLoadError
    from cqpolicy.outputs import read_json

    folder = Path(folder)
    meta = read_json(folder / META_FILE, ModelLoadError, f"{folder} holds no {META_FILE}")
    tensor_file = folder / QUANTIZED_FILE
    if not tensor_file.is_file():
        raise ModelLoadError(f"{folder}: quantized model is missing {QUANTIZED_FILE}")
    try:
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{META_FILE} is not a {FORMAT} description")
        if _sha256(tensor_file) != meta["sha256"]:
            raise ValueError(f"{QUANTIZED_FILE} does not match the sha256 in {META_FILE} (truncated or altered)")
        from safetensors.torch import load_file

        tensors = load_file(str(tensor_file))
        model = model_class.from_config(model_class.load_config(folder))
        if dtype != torch.float32:  # from_config builds float32; diffusers warns on a needless cast
            model = model.to(dtype)
        layers = quantizable_layers(model)
        codes = {name: _layer_code(name, info, tensors, layers) for name, info in meta["layers"].items()}
        missing, unexpected = model.load_state_dict({k: tensors[k] for k in meta["unquantized"]}, strict=False)
        if sorted(missing) != sorted(f"{name}.weight" for name in codes) or unexpected:
            raise ValueError(f"tensors do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        attach(model, codes)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors, json schema, shape and decode errors alike
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{folder}: corrupted quantized model: {message}") from None
    return model


def _layer_code(name: str, info: dict, tensors: dict, layers: dict) -> LayerCode:
    """The stored code of layer ``name``, checked against the model's layer (acqe streams decode at attach)."""
    if name not in layers:
        raise ValueError(f"{name} is not a Linear / Conv2d layer of this model")
    shape = tuple(int(d) for d in info["shape"])
    if shape != tuple(layers[name].weight.shape):
        raise ValueError(f"{name}: stored shape {list(shape)} != model shape {list(layers[name].weight.shape)}")
    if info["kind"] not in KINDS:
        raise ValueError(f"{name}: unknown codec {info['kind']!r}")
    bits, parts = check_bits(info["bits"]), ("q", "scales") if info["kind"] == "uniform" else \
        ("stream", "lengths", "centres")
    code = LayerCode(info["kind"], bits, shape, {p: tensors[f"{name}.weight.{p}"] for p in parts},
                     info.get("group_size"))
    if code.kind == "uniform":
        out, group = shape[0], int(code.group_size)
        row = code.numel // out
        expected_q = {8: (out * row, torch.int8), 4: ((code.numel + 1) // 2, torch.uint8)}.get(
            bits, (-(-code.numel * bits // 8), torch.uint8))
        q, scales = code.tensors["q"], code.tensors["scales"]
        if group < 1 or row % group or tuple(scales.shape) != (out, row // group) or scales.dtype != torch.float16 \
                or (q.numel(), q.dtype) != expected_q:
            raise ValueError(f"{name}: stored codes or scales have the wrong size or type")
    return code
