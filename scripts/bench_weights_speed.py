#!/usr/bin/env python
"""Denoiser forward time of quantized weights: our dequantise-on-the-fly codecs against fp32 and library kernels.

    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/peerlibs .venv/bin/python scripts/bench_weights_speed.py \\
        --model fmnist-dit --batch-size 16 --out docs/results/weights-speed-dit

(``PYTHONPATH`` only where torchao / optimum-quanto are installed outside the venv, e.g. with
``pip install --no-deps --target /tmp/peerlibs torchao optimum-quanto``.)

Variants, each on its own freshly loaded copy of ``--model``:

* ``fp32``: the model as loaded;
* ``int8``, ``int4``, ``mixed`` (``--budget-bits``, calibrated on ``--calib-samples`` x ``--calib-steps``),
  ``acqe``: ``cqpolicy.quantization.quantize_model`` (every Linear / Conv2d weight rebuilt from its codes by a
  parametrization at every forward, other tensors rounded to float16 values);
* ``torchao-int8wo``: ``torchao.quantization.quantize_(module, Int8WeightOnlyConfig())`` (Linear layers only);
* ``quanto-qint8``, ``quanto-qint4``: ``optimum.quanto.quantize(module, weights=...)`` + ``freeze``
  (Linear and Conv2d; qint4 needs quanto's C++ extension, compiled on first use).

A library that does not import is a row saying "not installed" (or why its import failed); one that imports but
fails to quantize or run is a row with the one-line reason. Timing: one model call (``model.adapter.denoise``,
no grad) on one fixed batch of ``--batch-size`` rows laid out as the sampler's classifier-free-guidance batch
(x_t ~ N(0, 1) of the model's latent shape, one random training timestep per row, class labels in the first
half, the null class in the second). After one untimed warm-up round, ``--rounds`` rounds run every variant in
turn (round-robin, the starting variant rotating), each timing the mean of ``--calls`` calls; the table gives the
median per variant and the median over rounds of its time / fp32's time in the same round, so drift in the
machine's load hits all variants alike. Also per variant: resident bytes of the denoiser (parameters + buffers,
tensor subclasses counted by their inner tensors), how many of its Linear / Conv2d weights are quantized, and the
relative L2 error of its output against fp32's on the same batch. Writes ``<out>.md`` and ``<out>.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

VARIANTS = ("fp32", "int8", "int4", "mixed", "acqe", "torchao-int8wo", "quanto-qint8", "quanto-qint4")
OURS = ("int8", "int4", "mixed", "acqe")
DEFAULT_OUT = "docs/results/weights-speed"
NOTES = {
    "fp32": "as loaded",
    "int8": "ours: int8 per channel, dequantised every forward",
    "int4": "ours: int4 group 64, dequantised every forward",
    "mixed": "ours: mixed 2-8 bits, group 64, dequantised every forward",
    "acqe": "ours: ACQ-E levels, dequantised every forward",
    "torchao-int8wo": "torchao Int8WeightOnlyConfig (Linear only)",
    "quanto-qint8": "optimum-quanto qint8 weights, frozen",
    "quanto-qint4": "optimum-quanto qint4 weights (group 128), frozen",
}


class Unavailable(Exception):
    """A peer variant that cannot be measured here; the message is the table's one-line reason."""


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:160]


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao, quanto) by its inner tensors."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names if getattr(t, n) is not None)
    return t.numel() * t.element_size()


def resident_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


def quantized_layers(module: torch.nn.Module) -> tuple[int, int]:
    """(Linear / Conv2d layers whose weight is stored quantized, all Linear / Conv2d layers)."""
    from torch.nn.utils import parametrize

    layers = [m for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    done = sum(1 for m in layers if parametrize.is_parametrized(m, "weight")
               or type(m.weight) not in (torch.Tensor, torch.nn.Parameter) or not m.weight.is_floating_point())
    return done, len(layers)


def build(variant: str, spec: str, args):
    """(the LoadedModel of ``variant``, seconds to quantize); raises Unavailable for a peer that cannot run."""
    from cqpolicy.models import load_model

    model = load_model(spec)
    started = time.perf_counter()
    if variant in OURS:
        from cqpolicy.quantization import quantize_model

        extra = {}
        if variant in ("mixed", "acqe"):
            extra = dict(budget_bits=args.budget_bits, calib_samples=args.calib_samples, calib_steps=args.calib_steps)
        quantize_model(model, variant, **extra)
    elif variant == "torchao-int8wo":
        try:
            from torchao.quantization import quantize_
        except ModuleNotFoundError as exc:
            raise Unavailable("not installed" if exc.name and exc.name.startswith("torchao") else one_line(exc))
        except Exception as exc:  # noqa: BLE001 - a broken install fails in many ways
            raise Unavailable(f"import failed: {one_line(exc)}")
        try:
            from torchao.quantization import Int8WeightOnlyConfig
            config = Int8WeightOnlyConfig()
        except ImportError:  # older torchao: the function-style API
            from torchao.quantization import int8_weight_only
            config = int8_weight_only()
        try:
            quantize_(model.transformer, config)
        except Exception as exc:  # noqa: BLE001
            raise Unavailable(f"quantize_ failed: {one_line(exc)}")
    elif variant.startswith("quanto-"):
        try:
            import optimum.quanto as quanto
        except ModuleNotFoundError as exc:
            raise Unavailable("not installed" if exc.name and exc.name.startswith("optimum") else one_line(exc))
        except Exception as exc:  # noqa: BLE001
            raise Unavailable(f"import failed: {one_line(exc)}")
        try:
            quanto.quantize(model.transformer, weights=getattr(quanto, variant.split("-", 1)[1]))
            quanto.freeze(model.transformer)
        except Exception as exc:  # noqa: BLE001
            raise Unavailable(f"quantize/freeze failed: {one_line(exc)}")
    return model, time.perf_counter() - started


def make_batch(model, batch_size: int, seed: int = 0):
    """x_t, per-row timesteps and labels laid out as the sampler's CFG batch (conditional rows, then null)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *model.latent_shape, generator=g)
    steps = int(model.scheduler_config.get("num_train_timesteps", 1000))
    t = torch.randint(0, steps, (batch_size,), generator=g)
    half = (batch_size + 1) // 2
    labels = torch.arange(batch_size) % model.num_classes
    if model.adapter.conditional(model.transformer) and batch_size > 1:
        labels[half:] = model.null_class
    return x, t, labels


def call(model, batch) -> torch.Tensor:
    x, t, labels = batch
    with torch.no_grad():
        return model.adapter.denoise(model.transformer, x, t, labels)


def timed(model, batch, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        call(model, batch)
    return (time.perf_counter() - started) / calls


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("torch", "diffusers", "torchao", "optimum-quanto"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def markdown(report: dict) -> str:
    c = report["config"]
    lines = [f"Denoiser forward time, `{c['model']}`, one call on a batch of {c['batch_size']} rows, "
             f"median of {c['rounds']} interleaved rounds x {c['calls']} calls, {c['threads']} thread(s), "
             f"{c['machine']}; torch {c['versions']['torch']}, torchao {c['versions']['torchao'] or '-'}, "
             f"optimum-quanto {c['versions']['optimum-quanto'] or '-'}.",
             "",
             "| variant | ms / call | vs fp32 | resident weight MB | quantized layers | rel. L2 error vs fp32 "
             "| quantize s | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"| `{r['variant']}` | - | - | - | - | - | - | {r['status']} |")
            continue
        lines.append(f"| `{r['variant']}` | {1e3 * r['median_s']:.2f} | {r['ratio_to_fp32']:.2f}x "
                     f"| {r['resident_bytes'] / 1e6:.2f} | {r['quantized_layers']}/{r['linear_conv_layers']} "
                     f"| {r['rel_l2_error']:.2e} | {r['quantize_s']:.1f} | {r['note']} |")
    lines += ["", "vs fp32: median over rounds of (variant time / fp32 time in the same round); above 1 is slower."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fmnist-dit", help="fmnist-dit, fmnist-unet or a diffusers folder")
    p.add_argument("--batch-size", type=int, default=16, help="rows of one model call")
    p.add_argument("--rounds", type=int, default=7, help="timed round-robin rounds (after one warm-up round)")
    p.add_argument("--calls", type=int, default=3, help="model calls per variant per round (their mean is timed)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"subset of {' '.join(VARIANTS)}")
    p.add_argument("--budget-bits", type=float, default=4.0, help="mixed / acqe bit budget")
    p.add_argument("--calib-samples", type=int, default=2)
    p.add_argument("--calib-steps", type=int, default=4)
    p.add_argument("--out", default=DEFAULT_OUT, help="writes <out>.md and <out>.json")
    args = p.parse_args(argv)
    for name in ("batch_size", "rounds", "calls", "calib_samples", "calib_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    if "fp32" not in args.variants:
        args.variants = ["fp32", *args.variants]  # the reference of every ratio and error
    args.variants = list(dict.fromkeys(args.variants))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from cqpolicy.models import load_model

    reference = load_model(args.model)  # a bad --model fails here, before anything is quantized
    batch = make_batch(reference, args.batch_size)
    del reference
    models, rows = {}, {}
    for variant in args.variants:
        row = {"variant": variant, "note": NOTES[variant]}
        try:
            model, seconds = build(variant, args.model, args)
            call(model, batch)  # a kernel that fails at run time fails here
        except Unavailable as exc:
            row["status"] = str(exc)
        except Exception as exc:  # noqa: BLE001 - a peer's kernel failing on this torch is a result
            if variant in OURS or variant == "fp32":
                raise
            row["status"] = f"forward failed: {one_line(exc)}"
        else:
            row.update(status="ok", quantize_s=seconds, resident_bytes=resident_bytes(model.transformer))
            row["quantized_layers"], row["linear_conv_layers"] = quantized_layers(model.transformer)
            models[variant] = model
        rows[variant] = row
        print(f"built {variant}: {row['status']}", file=sys.stderr, flush=True)

    measured = list(models)
    times = {v: [] for v in measured}
    for v in measured:  # warm-up round, untimed
        timed(models[v], batch, 1)
    for r in range(args.rounds):
        order = measured[r % len(measured):] + measured[:r % len(measured)]
        for v in order:
            times[v].append(timed(models[v], batch, args.calls))
    reference_out = call(models["fp32"], batch).float()
    for v in measured:
        out = call(models[v], batch).float()
        rows[v].update(times_s=times[v], median_s=statistics.median(times[v]),
                       ratio_to_fp32=statistics.median(a / b for a, b in zip(times[v], times["fp32"])),
                       rel_l2_error=float((out - reference_out).norm() / reference_out.norm().clamp_min(1e-30)))
    report = {"config": {"model": args.model, "batch_size": args.batch_size, "rounds": args.rounds,
                         "calls": args.calls, "budget_bits": args.budget_bits, "calib_samples": args.calib_samples,
                         "calib_steps": args.calib_steps, "threads": torch.get_num_threads(),
                         "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                         "versions": library_versions()},
              "rows": [rows[v] for v in args.variants]}
    table = markdown(report)
    print(table)
    out = Path(args.out)
    if out.suffix in (".md", ".json"):
        out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as exc:
        print(f"bench_weights_speed: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
