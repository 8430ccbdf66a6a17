#!/usr/bin/env python
"""GPU wall clock of cqpolicy's runtime on a random DiT-XL/2-256: plain model vs hooks vs cache reuse.

    .venv/bin/python scripts/bench_gpu.py --out docs/results/gpu

Builds a randomly initialised ``DiTTransformer2DModel`` in the DiT-XL-2-256 layout (28 blocks, 16 heads x 72,
4 -> 8 channels with learned sigma, 32x32 latents, patch 2 = 256 tokens, 1000 classes; bf16 on CUDA; no download:
weights do not change the cost) and times full ``cqpolicy.sampling.sample`` calls (DDIM, classifier-free
guidance, so the model batch is twice the sample batch) for: the plain model (no hooks), ``none`` (hooks that
never reuse: the runtime's own overhead), ``fora:interval=2``, ``fora:interval=3`` and the per-unit-type
hand schedule ``fora:attn1_interval=8,ff_interval=4`` (attn1 computed every 8 steps, ff every 4, in phase).
Per batch size, every repeat runs each method once, in turn (one warm-up round first); the time of a call is
measured with CUDA events (``time.perf_counter`` on CPU), the table gives the median and the speedup against the
plain model of the same run, and peak memory above the weights (``cqpolicy.evaluation.cost.PeakMemory``).
Writes ``bench_gpu.md`` and ``bench_gpu.json`` (raw times) to ``--out``.

Expected run time on one H200 with the defaults: 5 methods x 2 batch sizes x (1 warm-up + 3 repeats) = 40
sampling calls of 50 steps (2,000 model calls). At batch 64 (128 rows, ~15 TFLOP per plain step) a plain call
takes about 2 s, at batch 8 about 0.5 s (launch-bound), and the caching methods are faster: about 1 minute of
sampling plus ~30 s of start-up, under 2 minutes in all. ``--tiny --device cpu`` is the smoke test (seconds).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cqpolicy.evaluation.cost import PeakMemory
from cqpolicy.models import LoadedModel
from cqpolicy.models.fmnist_dit import SCHEDULER_CONFIG  # DiT's DDIM schedule: 1000 steps, linear 1e-4..0.02
from cqpolicy.policies import make_policy
from cqpolicy.runtime import enable
from cqpolicy.sampling import SampleSettings, sample

DIT_XL_2_256 = dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                    sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
TINY = dict(DIT_XL_2_256, num_layers=2, num_attention_heads=2, attention_head_dim=16, sample_size=8)  # 16 tokens
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PLAIN = "plain model"


def build_model(tiny: bool, dtype: torch.dtype, device: str) -> LoadedModel:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: 750 M parameters are slow to fill on the CPU
        transformer = DiTTransformer2DModel(**(TINY if tiny else DIT_XL_2_256))
    transformer.to(device=device, dtype=dtype).eval().requires_grad_(False)  # buffers built from numpy too
    name = "random DiT (tiny)" if tiny else "random DiT-XL/2-256"
    return LoadedModel(name, transformer, dict(SCHEDULER_CONFIG))  # no VAE: decode is the identity


# method name -> policy spec (None: the plain model, no hooks)
METHODS = {PLAIN: None, "none": "none", "fora:interval=2": "fora:interval=2", "fora:interval=3": "fora:interval=3",
           "attn1/8 ff/4": "fora:attn1_interval=8,ff_interval=4"}


def timed_call(model: LoadedModel, policy, cache_format: str, batch: int, settings: SampleSettings):
    """One sampling call of ``batch`` samples; returns (seconds, peak bytes above the start, reuse ratio)."""
    labels, seeds = [i % model.num_classes for i in range(batch)], list(range(batch))
    handle = enable(model.transformer, policy, cache_format) if policy is not None else None
    try:
        with PeakMemory(model.device) as memory:
            if model.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                sample(model, labels, seeds, settings, progress=False)
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1000
            else:
                begin = time.perf_counter()
                sample(model, labels, seeds, settings, progress=False)
                seconds = time.perf_counter() - begin
        return seconds, memory.peak_bytes, (handle.reuse_ratio if handle is not None else 0.0)
    finally:
        if handle is not None:
            handle.disable()


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| batch | method | median s / call | wall speedup | peak MiB above weights | reuse |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch_size']} | `{r['method']}` | {r['median_s']:.3f} | {r['speedup']:.2f}× | "
                     f"{r['peak_bytes'] / 2**20:.0f} | {r['reuse_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per method and batch size (after 1 warm-up)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 64])
    p.add_argument("--tiny", action="store_true", help="a 2-block width-32 model with 16 tokens (smoke test)")
    p.add_argument("--out", default="docs/results/gpu")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"bench_gpu: --device {args.device} was requested but CUDA is not available; use --device cpu",
              file=sys.stderr)
        raise SystemExit(2)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model = build_model(args.tiny, DTYPES[dtype_name], str(device))
    weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    specs = METHODS
    rows, total = [], len(args.batch_sizes) * (1 + args.repeats) * len(specs)
    with tqdm(total=total, desc="bench_gpu", unit="call", dynamic_ncols=True) as bar:
        for batch in args.batch_sizes:
            settings = SampleSettings(steps=args.steps, guidance_scale=model.default_guidance_scale,
                                      scheduler="ddim", batch_size=batch)
            policies = {name: None if spec is None else make_policy(spec) for name, spec in specs.items()}
            for policy in policies.values():
                if policy is not None:
                    policy.prepare(model, settings)
            times = {name: [] for name in specs}
            peaks = {name: 0 for name in specs}
            reuse = {name: 0.0 for name in specs}
            for r in range(1 + args.repeats):  # round 0 warms up; methods interleaved in every round
                for name, policy in policies.items():
                    bar.set_postfix_str(f"batch {batch}, {name}")
                    seconds, peak, reuse[name] = timed_call(model, policy, dtype_name, batch, settings)
                    peaks[name] = max(peaks[name], peak)
                    if r > 0:
                        times[name].append(seconds)
                    bar.update(1)
            base = statistics.median(times[PLAIN])
            for name, spec in specs.items():
                median = statistics.median(times[name])
                rows.append({"batch_size": batch, "method": name, "spec": spec, "median_s": median,
                             "speedup": base / median, "peak_bytes": peaks[name], "reuse_ratio": reuse[name],
                             "times_s": times[name]})

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = (f"{model.name}, {dtype_name} on {where}, {args.steps} DDIM steps, CFG (model batch = 2 x batch), "
              f"median of {args.repeats} interleaved calls after 1 warm-up; weights {weights / 2**20:.0f} MiB")
    table = markdown(rows, header)
    print(table)
    (out / "bench_gpu.md").write_text(table)
    meta = {"model": model.name, "config": dict(model.config), "dtype": dtype_name, "device": where,
            "steps": args.steps, "repeats": args.repeats, "warmup": 1, "guidance_scale": model.default_guidance_scale,
            "weights_bytes": weights, "torch": torch.__version__, "timer": "cuda events" if device.type == "cuda"
            else "time.perf_counter"}
    (out / "bench_gpu.json").write_text(json.dumps({**meta, "rows": rows}, indent=2, default=str))
    return rows


if __name__ == "__main__":
    main()
