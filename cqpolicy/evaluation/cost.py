"""Cost metrics: MACs actually executed, wall time, peak memory.

MACs are FLOPs / 2 from ``torch.utils.flop_counter.FlopCounterMode``, counted inside
``sdpa_kernel(SDPBackend.MATH)`` because the counter misses the fused CPU attention kernel.

The MACs of a run are exact for the very batches that are scored, without running them under the (slow)
counter: ``model_costs`` counts once per model what one row of one model call costs, in total and in every
cache unit, and the runtime counts how many rows each unit and the model computed (``CacheRuntime.unit_rows``,
``model_rows``). A unit's MACs scale with its rows (every op of a DiT block acts per sample), so

    MACs = model_rows x row_macs - sum over hooked units of (model_rows - unit_rows) x unit_macs
           + images x decode_macs.

Work a policy does to decide (an MLP, an entropy) is not in it: it is in the wall time. Peer engines whose
hooks are not ours (``reports_reuse = False``) skip work inside modules we do not hook, so their runs are
counted one level down: ``model_costs`` also gives every leaf module its MACs per row (a module's own work
outside its children, such as the attention product, goes to its first leaf), and forward hooks on the
leaves count the rows that really ran. The FLOP counter stays the reference the tests check both against.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable

import torch


def count_macs(fn: Callable[[], object]) -> tuple[int, object]:
    """Run ``fn`` once under the FLOP counter; returns (MACs executed, fn's result)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        result = fn()
    return counter.get_total_flops() // 2, result


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096  # resident pages


class PeakMemory:
    """Peak memory above the starting level while the block runs.

    On CUDA: ``torch.cuda.max_memory_allocated``. On CPU: the process's resident set, polled every 5 ms
    by a thread (torch's CPU allocator has no peak counter); a short spike between polls can be missed, and so can
    memory the allocator reuses from earlier frees without growing the resident set.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = _rss_bytes()
        self._peak = self._start
        self._stop = threading.Event()

        def poll():
            while not self._stop.wait(0.005):
                self._peak = max(self._peak, _rss_bytes())

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._peak, _rss_bytes()) - self._start
        return False


@contextmanager
def wall_timer(device: torch.device | str = "cpu"):
    """Yields a dict whose ``seconds`` is filled in when the block ends."""
    device = torch.device(device)
    box = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    yield box
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    box["seconds"] = time.perf_counter() - start


@dataclass(frozen=True)
class ModelCosts:
    """Per-row MACs of one model call (all of it, and each cache unit), and of decoding one image."""

    row_macs: int
    unit_macs: dict = field(default_factory=dict)  # {(block, unit): MACs per row per call}
    decode_macs: int = 0
    leaf_macs: dict = field(default_factory=dict)  # {leaf module name in the transformer: MACs per row per call}

    rows_per_image: int = 1  # model rows per image and step (2 with a batched CFG branch)

    def plain(self, num_images: int, settings) -> int:
        """MACs of the uncached model sampling ``num_images`` images."""
        rows = num_images * int(settings.steps) * self.rows_per_image
        return rows * self.row_macs + num_images * self.decode_macs

    def of_run(self, runtime, num_images: int) -> int:
        """MACs of what ran under ``runtime`` (a ``CacheRuntime``) since it was enabled, the policy's own
        arithmetic included (forecasts, decision networks, DQAR's attention entropy)."""
        skipped = sum((runtime.model_rows - runtime.unit_rows[u.block, u.name]) * self.unit_macs[u.block, u.name]
                      for u in runtime.units)
        return runtime.model_rows * self.row_macs - skipped + num_images * self.decode_macs + runtime.policy_macs

    @contextmanager
    def leaf_counter(self, transformer, num_images: int):
        """Yields a dict whose ``macs`` is, when the block ends, the MACs of the leaves that ran in it."""
        box, handles, rows = {}, [], [0]
        modules = dict(transformer.named_modules())

        def counting(macs):
            return lambda module, args: rows.__setitem__(0, rows[0] + macs * _rows_of(args))

        try:
            handles = [modules[name].register_forward_pre_hook(counting(macs))
                       for name, macs in self.leaf_macs.items()]
            yield box
        finally:
            for handle in handles:
                handle.remove()
        box["macs"] = rows[0] + num_images * self.decode_macs


def _rows_of(args) -> int:
    """Rows of a module call: the leading size of its first tensor argument (every op of a block is per sample)."""
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    return 1 if first is None or first.ndim == 0 else int(first.shape[0])


_COSTS: dict = {}


def model_costs(model, settings) -> ModelCosts:
    """Count (once per model and guidance setting) one 1-step sampling call of one image under the FLOP
    counter, with a forward hook on every cache unit reading the counter before and after it."""
    from cqpolicy.models.adapters import find_cache_units
    from cqpolicy.sampling import sample
    from cqpolicy.sampling.sampler import uses_cfg

    key = (id(model.transformer), uses_cfg(settings.guidance_scale, model), str(model.dtype))
    if key in _COSTS and _COSTS[key][0]() is model.transformer:
        return _COSTS[key][1]
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    import weakref

    units = find_cache_units(model.transformer, model.adapter.unit_names)
    unit_flops, model_flops, handles = {}, [0], []
    leaves = _LeafTally(model.transformer, counter_total=lambda: counter.get_total_flops())
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        def around(key):
            def pre(module, args):
                unit_flops[key] = unit_flops.get(key, 0) - counter.get_total_flops()

            def post(module, args, output):
                unit_flops[key] += counter.get_total_flops()
            return pre, post

        for unit in units:
            pre, post = around((unit.block, unit.name))
            handles += [unit.module.register_forward_pre_hook(pre), unit.module.register_forward_hook(post)]
        handles += leaves.hooks()
        handles += [model.transformer.register_forward_pre_hook(lambda m, a: model_flops.__setitem__(
                        0, model_flops[0] - counter.get_total_flops())),
                    model.transformer.register_forward_hook(lambda m, a, o: model_flops.__setitem__(
                        0, model_flops[0] + counter.get_total_flops()))]
        try:
            sample(model, [0], [0], replace(settings, steps=1, batch_size=1), progress=False)
        finally:
            for handle in handles:
                handle.remove()
        total = counter.get_total_flops()
    rows = 2 if uses_cfg(settings.guidance_scale, model) else 1
    costs = ModelCosts(row_macs=model_flops[0] // 2 // rows,
                       unit_macs={k: v // 2 // rows for k, v in unit_flops.items()},
                       decode_macs=(total - model_flops[0]) // 2,
                       leaf_macs=leaves.per_row(), rows_per_image=rows)
    _COSTS[key] = (weakref.ref(model.transformer), costs)
    return costs


class _LeafTally:
    """During a FLOP-counted call: every leaf module's FLOPs and rows, plus the FLOPs each module spends outside
    the modules it calls (the attention product of an ``Attention``), charged to the first leaf that ran in
    that call. Callers are tracked on a stack: DiT calls block 0's embedding from outside block 0 too."""

    def __init__(self, transformer, counter_total):
        self.transformer, self.total = transformer, counter_total
        self.flops, self.rows, self.stack = {}, {}, []  # stack: [name, start FLOPs, in children, first leaf]

    def hooks(self) -> list:
        handles = []
        for name, module in self.transformer.named_modules():
            if "parametrizations" in name.split("."):  # a weight's dequantising parametrization: its layer's work
                continue
            leaf = next((c for n, c in module.named_children() if n != "parametrizations"), None) is None
            handles += [module.register_forward_pre_hook(lambda m, args, n=name, leaf=leaf: self._enter(n, leaf, args)),
                        module.register_forward_hook(lambda m, args, out: self._leave())]
        return handles

    def _enter(self, name, leaf, args):
        if leaf:
            self.rows[name] = self.rows.get(name, 0) + _rows_of(args)
            for frame in self.stack:
                frame[3] = frame[3] or name
        self.stack.append([name, self.total(), 0, name if leaf else None])

    def _leave(self):
        name, start, inner, first = self.stack.pop()
        spent = self.total() - start
        if self.stack:
            self.stack[-1][2] += spent
        if first is not None:  # own work outside the modules called; a leaf's is all of it
            self.flops[first] = self.flops.get(first, 0) + spent - inner

    def per_row(self) -> dict:
        return {name: value // 2 // self.rows[name] for name, value in self.flops.items() if value}


@dataclass
class MeasuredRun:
    images: torch.Tensor  # float [-1, 1], as ``sample`` returns them
    macs: int  # MACs of exactly this run
    wall_s: float
    reuse_ratio: float | None = None
    cache_bytes: int | None = None
    macs_source: str = "runtime counts"
    policy_macs: int = 0  # of ``macs``: what the policy's own arithmetic executed (forecasts, decision nets)


def measured_sample(model, policy, cache_format, labels, seeds, settings, progress: bool = False) -> MeasuredRun:
    """Sample under ``policy`` (None: the plain model, no hooks) and return the images with the exact MACs and
    the wall time of this very run. ``policy`` must already be prepared. Under ``torchrun`` each rank samples its
    share of the batches and every rank returns the whole run (``cqpolicy.distributed``): the same images and MACs,
    the slowest rank's wall time."""
    from cqpolicy.distributed import all_max, all_sum, gather_rows, world

    w = world()
    if w.size == 1:
        return _measured_sample(model, policy, cache_format, labels, seeds, settings, progress)
    labels = torch.as_tensor(labels, dtype=torch.long)
    index = [i for start, end in w.batches(len(seeds), settings.batch_size) for i in range(start, end)]
    if index:
        run = _measured_sample(model, policy, cache_format, labels[index], [seeds[i] for i in index], settings,
                               progress and w.main)
    else:  # more ranks than batches: this one only joins the gathering
        run = MeasuredRun(torch.empty((0, *model.image_shape)), 0, 0.0, None, None,
                          "plain model" if policy is None else "runtime counts")
    images = gather_rows(run.images.float(), index, len(seeds))
    macs, policy_macs = all_sum([run.macs, run.policy_macs], exact=True)
    reused = all_sum([(run.reuse_ratio or 0.0) * len(index), float(run.reuse_ratio is not None) * len(index)])
    wall_s, cache_bytes, held = all_max([run.wall_s, float(run.cache_bytes or 0), float(run.cache_bytes is not None)])
    return MeasuredRun(images, int(macs), wall_s, reused[0] / reused[1] if reused[1] else None,
                       int(cache_bytes) if held else None, run.macs_source, int(policy_macs))


def _measured_sample(model, policy, cache_format, labels, seeds, settings, progress: bool = False) -> MeasuredRun:
    from cqpolicy.runtime import enable
    from cqpolicy.sampling import sample

    costs = model_costs(model, settings)
    run = lambda: sample(model, labels, seeds, settings, progress=progress)  # noqa: E731
    if policy is None:
        with wall_timer(model.device) as wall:
            images = run()
        return MeasuredRun(images, costs.plain(len(seeds), settings), wall["seconds"], macs_source="plain model")
    if policy.reports_reuse:
        with enable(model.transformer, policy, cache_format) as handle:
            with wall_timer(model.device) as wall:
                images = run()
        return MeasuredRun(images, costs.of_run(handle, len(seeds)), wall["seconds"], handle.reuse_ratio,
                           handle.cache_bytes, policy_macs=handle.policy_macs)
    with costs.leaf_counter(model.transformer, len(seeds)) as leaves:  # the peer's hooks skip work inside
        with enable(model.transformer, policy, cache_format):
            with wall_timer(model.device) as wall:
                images = run()
    return MeasuredRun(images, leaves["macs"], wall["seconds"], None, None, "leaf-module row counts")
