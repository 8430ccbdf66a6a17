#!/usr/bin/env python
"""GPU wall clock of cqpolicy's runtime on random published denoisers: plain model vs hooks vs cache reuse.

    .venv/bin/python scripts/bench_gpu.py --out docs/results/gpu                  # dit-xl-2-256
    .venv/bin/python scripts/bench_gpu.py --layout pixart-xl-2-512 --out docs/results/gpu
    .venv/bin/python scripts/bench_gpu.py --layout sd3.5-medium --out docs/results/gpu
    .venv/bin/python scripts/bench_gpu.py --layout flux.1-dev --out docs/results/gpu
    .venv/bin/python scripts/bench_gpu.py --layout sd-1.5 --out docs/results/gpu
    .venv/bin/python scripts/bench_gpu.py --layout sd-1.5 --tiny --device cpu --out /tmp/gpu  # smoke test (seconds)

Each layout builds its denoiser from the published config (the numbers are in ``LAYOUTS``), randomly initialised in
bf16 on CUDA (no download: weights do not change the cost), gives a text-conditioned one random prompt embeddings
of the shapes its pipeline's text encoders produce, and times full ``cqpolicy.sampling.sample`` calls with its
pipeline's scheduler, steps and guidance, on latents (no VAE: decoding is not what the runtime changes):

* ``dit-xl-2-256`` (default): DiT-XL-2-256, 28 blocks, 16 heads x 72, 32x32 latents = 256 tokens, 1000 classes;
  50 DDIM steps, CFG 4 (the model batch is twice the sample batch).
* ``pixart-xl-2-512``: PixArt-XL-2-512x512, the DiT blocks plus cross-attention to 120 T5 tokens (4096-d), 64x64
  latents = 1024 tokens; 20 DPM-Solver++ steps (DiT's linear betas), CFG 4.5.
* ``sd3.5-medium``: SD 3.5 medium, 24 MMDiT blocks (the first 13 with a second image attention), 24 heads x 64,
  1024 px = 4096 image tokens joint with 333 prompt tokens (77 CLIP + 256 T5, the pipeline's default
  ``max_sequence_length``) and a 2048-d pooled embedding; 40 flow-matching Euler steps, shift 3, CFG 4.5.
* ``flux.1-dev``: FLUX.1-dev, 19 dual- then 38 single-stream blocks, 24 heads x 128, 1024 px = 4096 packed tokens
  joint with 512 T5 tokens, a 768-d pooled embedding; 28 flow-matching Euler steps with dynamic shifting, guidance
  3.5 as a model input (no CFG batch). Dev, not schnell: 28 steps give step caching something to reuse (schnell's
  4 leave FORA one or two steps), and dev is what caching papers report; a schnell step costs the same.
* ``sd-1.5``: SD 1.5's UNet (320-640-1280-1280 channels, cross-attention to 77 CLIP tokens, 768-d), 64x64 latents;
  50 DDIM steps (scaled-linear betas), CFG 7.5.

Methods: the plain model (no hooks), ``none`` (hooks that never reuse: the runtime's own overhead),
``fora:interval=2`` and ``fora:interval=3`` on every layout; on DiT also the per-unit-type hand schedule
``fora:attn1_interval=8,ff_interval=4`` (attn1 computed every 8 steps, ff every 4, in phase); ``tgate:gate=0.4``
where there is cross-attention (PixArt, SD 1.5); ``deepcache:interval=3`` on the UNet (SD 1.5).
Per batch size, every repeat runs each method once, in turn (one warm-up round first); the time of a call is
measured with CUDA events (``time.perf_counter`` on CPU), the table gives the median and the speedup against the
plain model of the same run, and peak memory above the weights (``cqpolicy.evaluation.cost.PeakMemory``).
Writes ``bench_gpu.md`` and ``bench_gpu.json`` (raw times) to ``--out``; a layout other than the default writes
``bench_gpu_<layout>.md`` / ``.json``.

Expected run time on one H200 with the defaults: an estimate, not a measurement, from the FLOPs of one image in one
model call (FlopCounterMode on the meta device) at an assumed 400 TFLOP/s sustained in bf16 (40% of the dense
peak; the UNet's convolutions may run below it), the caching methods costing their computed fraction of the steps,
and 1 warm-up + 3 repeats of every method at every batch size:

    layout            TFLOP/image/call  methods x batch sizes x steps   sampling   with start-up
    dit-xl-2-256            0.24           5 x (8, 64) x 50             ~1 min     under 2 min
    pixart-xl-2-512         1.24           5 x (8, 32) x 20             ~1.3 min   ~2 min
    sd3.5-medium           11.3            4 x (1, 4) x 40              ~2.2 min   ~3 min
    flux.1-dev             74.4            4 x (1,) x 28                ~1 min     ~2 min (12 B parameters to fill)
    sd-1.5                  0.80           6 x (8, 32) x 50             ~2.3 min   ~3 min

About 12 minutes for all five; ``--repeats 1`` halves the sampling. ``--tiny --device cpu --layout X`` shrinks
layout X to its blocks 2 deep (2 + 2 for FLUX, one layer per UNet level) and 32 wide on 8x8 latents: the smoke
test of each layout (tests/test_bench_gpu.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from cqpolicy.evaluation.cost import PeakMemory
from cqpolicy.models import LoadedModel
from cqpolicy.models.fmnist_dit import SCHEDULER_CONFIG  # DiT's DDIM schedule: 1000 steps, linear 1e-4..0.02
from cqpolicy.models.prompts import Prompts
from cqpolicy.policies import make_policy
from cqpolicy.runtime import enable
from cqpolicy.sampling import SampleSettings, sample
from cqpolicy.sampling.sampler import uses_cfg

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PLAIN = "plain model"
TINY_LATENT = 8  # every --tiny layout samples 8x8 latents
PROMPTS = 8  # random prompts per text-conditioned layout; sample i takes prompt i % 8 (the text does not change cost)


class Layout(NamedTuple):
    """A published model: its denoiser config, how its pipeline samples it, and the methods timed on it. (Not a
    dataclass: those need their module in ``sys.modules``, and the tests load this script without it.)"""

    title: str
    model_class: str  # the diffusers class
    config: dict  # the published denoiser config
    tiny: dict  # --tiny overrides: the same blocks, CPU-sized
    scheduler: str  # the sampler's family: ddim, dpm or flow
    scheduler_config: dict
    steps: int
    guidance_scale: float
    batch_sizes: tuple[int, ...]  # sized for 1 to 2.5 minutes of sampling per layout on one H200
    methods: dict  # method name -> policy spec (None: the plain model, no hooks)
    tokens: int = 0  # prompt tokens of a text-conditioned layout, as its pipeline pads them


def methods(*extra: str) -> dict:
    """The methods every layout times, then the layout's own ``extra`` specs."""
    return {PLAIN: None, "none": "none", "fora:interval=2": "fora:interval=2", "fora:interval=3": "fora:interval=3",
            **{spec: spec for spec in extra}}


TINY_DIT = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, sample_size=TINY_LATENT)  # width 32
LAYOUTS = {
    "dit-xl-2-256": Layout(
        "DiT-XL/2-256", "DiTTransformer2DModel",
        dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
             sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero"),
        TINY_DIT, "ddim", SCHEDULER_CONFIG, steps=50, guidance_scale=4.0, batch_sizes=(8, 64),
        methods=methods() | {"attn1/8 ff/4": "fora:attn1_interval=8,ff_interval=4"}),
    "pixart-xl-2-512": Layout(
        "PixArt-XL-2-512x512", "PixArtTransformer2DModel",
        dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
             sample_size=64, patch_size=2, caption_channels=4096, cross_attention_dim=1152, attention_bias=True,
             activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
             norm_elementwise_affine=False, norm_eps=1e-6),
        TINY_DIT | dict(caption_channels=32, cross_attention_dim=32),
        "dpm", dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                    prediction_type="epsilon"),
        steps=20, guidance_scale=4.5, batch_sizes=(8, 32), methods=methods("tgate:gate=0.4"), tokens=120),
    "sd3.5-medium": Layout(
        "SD 3.5 medium", "SD3Transformer2DModel",
        dict(num_layers=24, num_attention_heads=24, attention_head_dim=64, in_channels=16, out_channels=16,
             sample_size=128, patch_size=2, joint_attention_dim=4096, caption_projection_dim=1536,
             pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
             qk_norm="rms_norm"),
        TINY_DIT | dict(caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=16,
                        pos_embed_max_size=TINY_LATENT, dual_attention_layers=(0,)),
        "flow", dict(num_train_timesteps=1000, shift=3.0),
        steps=40, guidance_scale=4.5, batch_sizes=(1, 4), methods=methods(), tokens=77 + 256),
    "flux.1-dev": Layout(
        "FLUX.1-dev", "FluxTransformer2DModel",
        dict(num_layers=19, num_single_layers=38, num_attention_heads=24, attention_head_dim=128, in_channels=64,
             patch_size=1, joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56),
             guidance_embeds=True),
        dict(num_layers=2, num_single_layers=2, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=32,
             pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)),
        "flow", dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096),
        steps=28, guidance_scale=3.5, batch_sizes=(1,), methods=methods(), tokens=512),
    "sd-1.5": Layout(
        "SD 1.5", "UNet2DConditionModel",
        dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
             block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
             down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
             up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
             attention_head_dim=8, norm_num_groups=32),  # diffusers' attention_head_dim is SD's 8 heads
        dict(sample_size=TINY_LATENT, layers_per_block=1, block_out_channels=(16, 32, 32, 32), cross_attention_dim=32,
             attention_head_dim=2, norm_num_groups=8),
        "ddim", dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                     prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        steps=50, guidance_scale=7.5, batch_sizes=(8, 32), methods=methods("tgate:gate=0.4", "deepcache:interval=3"),
        tokens=77),
}
DEFAULT_LAYOUT = "dit-xl-2-256"
SCHEDULER_NAMES = {"ddim": "DDIM", "dpm": "DPM-Solver++", "flow": "flow-matching Euler"}


def random_prompts(model: LoadedModel, tokens: int) -> Prompts:
    """``PROMPTS`` random prompt embeddings (and a negative one where the model batches CFG) in the shapes its
    pipeline's text encoders give: T5 / CLIP tokens, PixArt's attention mask (no padding), the pooled embedding."""
    c, adapter = model.config, model.adapter
    width = c.get("caption_channels") or c.get("joint_attention_dim") or c.cross_attention_dim
    g = torch.Generator().manual_seed(0)

    def rows(n):
        out = {"encoder_hidden_states": torch.randn(n, tokens, width, generator=g)}
        if "encoder_attention_mask" in adapter.cond_keys:
            out["encoder_attention_mask"] = torch.ones(n, tokens, dtype=torch.long)
        if "pooled_projections" in adapter.cond_keys:
            out["pooled_projections"] = torch.randn(n, c.pooled_projection_dim, generator=g)
        return out

    null = rows(1) if adapter.guidance(model.transformer) == "cfg" else None
    return Prompts([f"<random prompt {i}>" for i in range(PROMPTS)], rows(PROMPTS), null).to(model.device, model.dtype)


def build_model(layout: Layout, tiny: bool, dtype: torch.dtype, device: str) -> LoadedModel:
    import diffusers

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: billions of parameters are slow to fill on the CPU
        denoiser = getattr(diffusers, layout.model_class)(**((layout.config | layout.tiny) if tiny else layout.config))
    denoiser.to(device=device, dtype=dtype).eval().requires_grad_(False)  # buffers built from numpy too
    name = f"random {layout.title}" + (" (tiny)" if tiny else "")
    model = LoadedModel(name, denoiser, dict(layout.scheduler_config), default_guidance_scale=layout.guidance_scale,
                        latent_size=(TINY_LATENT, TINY_LATENT) if tiny else None)  # no VAE: decode is the identity
    if model.adapter.text_conditioned:
        model.prompts = random_prompts(model, layout.tokens)
    return model


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
    p.add_argument("--layout", choices=LAYOUTS, default=DEFAULT_LAYOUT)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--steps", type=int, default=None, help="default: the layout's pipeline default")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per method and batch size (after 1 warm-up)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: the layout's")
    p.add_argument("--tiny", action="store_true",
                   help="the layout's blocks, 2 deep (2 + 2 for FLUX) and 32 wide, on 8x8 latents (smoke test)")
    p.add_argument("--out", default="docs/results/gpu")
    args = p.parse_args(argv)
    layout = LAYOUTS[args.layout]
    steps = layout.steps if args.steps is None else args.steps
    batch_sizes = list(layout.batch_sizes) if args.batch_sizes is None else args.batch_sizes
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

    model = build_model(layout, args.tiny, DTYPES[dtype_name], str(device))
    weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0  # with the prompt table (<= 32 MiB)
    specs = layout.methods
    rows, total = [], len(batch_sizes) * (1 + args.repeats) * len(specs)
    with tqdm(total=total, desc="bench_gpu", unit="call", dynamic_ncols=True) as bar:
        for batch in batch_sizes:
            settings = SampleSettings(steps=steps, guidance_scale=layout.guidance_scale, scheduler=layout.scheduler,
                                      batch_size=batch)
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
    if uses_cfg(layout.guidance_scale, model):
        guidance = f"CFG {layout.guidance_scale:g} (model batch = 2 x batch)"
    else:
        guidance = f"guidance {layout.guidance_scale:g} as a model input (model batch = batch)"
    prompts = f", {layout.tokens} prompt tokens" if model.prompts is not None else ""
    header = (f"{model.name}, {dtype_name} on {where}, {steps} {SCHEDULER_NAMES[layout.scheduler]} steps, "
              f"{guidance}{prompts}, median of {args.repeats} interleaved calls after 1 warm-up; "
              f"weights {weights / 2**20:.0f} MiB")
    table = markdown(rows, header)
    print(table)
    stem = "bench_gpu" if args.layout == DEFAULT_LAYOUT else f"bench_gpu_{args.layout}"  # DiT keeps its file names
    (out / f"{stem}.md").write_text(table)
    meta = {"layout": args.layout, "model": model.name, "config": dict(model.config), "dtype": dtype_name,
            "device": where, "scheduler": layout.scheduler, "scheduler_config": layout.scheduler_config,
            "steps": steps, "repeats": args.repeats, "warmup": 1, "guidance_scale": layout.guidance_scale,
            "prompt_tokens": layout.tokens if model.prompts is not None else None, "weights_bytes": weights,
            "torch": torch.__version__, "timer": "cuda events" if device.type == "cuda" else "time.perf_counter"}
    (out / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=2, default=str))
    return rows


if __name__ == "__main__":
    main()
