"""Peer tools run side by side on the same model, as policies of their own hooks.

Where each runs through our sampler (on FLUX, inside an unmodified FluxPipeline too):

* ``diffusers-fbc``: diffusers' First Block Cache hooks (``apply_first_block_cache``): DiT, PixArt, FLUX. Not SD3:
  its tail hook subtracts a text stream that SD3's last (``context_pre_only``) block does not return.
* ``diffusers-taylorseer``: diffusers' TaylorSeer hooks (``apply_taylorseer_cache``) on diffusers' own default
  modules (every attention of the blocks: FLUX, SD3), or our adapter's default units where those match nothing
  (DiT's ``attn1`` and ``ff``; PixArt's ``attn1``, ``attn2`` and ``ff``).
* ``diffusers-magcache``: diffusers' MagCache hooks (``apply_mag_cache``) with magnitude ratios calibrated per model
  and setting in ``prepare``, by diffusers' own calibration mode on an uncached run of calibration seeds: DiT,
  PixArt, SD3, FLUX.
* ``diffusers-pab``: diffusers' Pyramid Attention Broadcast hooks (``apply_pyramid_attention_broadcast``) on every
  self-attention (and, with ``cross_interval``, PixArt's cross-attention): DiT, PixArt, SD3, FLUX.
* ``diffusers-fastercache``: diffusers' FasterCache hooks (``apply_faster_cache``), attention approximation only, as
  diffusers runs it on a guidance-distilled model: FLUX (no CFG batch). Not on the CFG-guided DiT, PixArt, SD3: its
  CFG-Cache takes the second half of the batch for the conditional rows, our sampler puts them first.
* ``smoothcache-wheel``: the ``dit-smoothcache`` wheel's ``DiffuserCacheHelper`` running a published schedule
  (optional extra: ``pip install --no-deps dit-smoothcache``): DiT.
* ``cache-dit``: cache-dit's DBCache (``enable_cache`` with a ``DBCacheConfig``) through cache-dit's own block
  adapter of the model class, on the transformer alone, a fresh cache context per sampling call: DiT, PixArt, SD3,
  FLUX (optional extra: ``pip install --no-deps cache-dit==1.5.3``).

DiT is no ``CacheMixin``, and our sampler calls no pipeline, so nothing sets diffusers' cache context: these
adapters set it at every step from our runtime's step context, and reset the peers' state at every sampling call.
Their hooks are not ours, so reuse ratio and cache bytes are not reported for them (``reports_reuse = False``).
"""
from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from cqpolicy import seeds as seed_roles
from cqpolicy.policies.base import Policy
from cqpolicy.policies.registry import register

CONTEXT = "cfg_batch"  # one diffusers cache context per step: cond and uncond rows travel in one batched call


class _DiffusersHookPeer(Policy):
    units = ()
    reports_reuse = False
    hook_names: tuple[str, ...] = ()
    timestep = float("nan")  # the current step's scheduler timestep (PAB and FasterCache ask for it by callback)

    @property
    def caches(self) -> bool:
        return False  # the peer keeps its own state: the runtime need not store unit outputs nobody reads

    def _apply(self, model):
        raise NotImplementedError

    def attach(self, model):
        self._model = model
        try:
            self._apply(model)
        except BaseException:  # diffusers may refuse a block after hooking others: leave the model as it was
            self.detach(model)
            raise

    def detach(self, model):
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.hooks import _set_cache_context

        _set_cache_context(model, None)
        registry = HookRegistry.check_if_exists_or_initialize(model)
        for name in self.hook_names:
            registry.remove_hook(name, recurse=True)
        registry.invalidate_child_registries_cache()

    def reset(self, num_steps, num_blocks):
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(self._model).reset_stateful_hooks()

    def begin_step(self, step, num_steps, timestep):
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        self.timestep = float(timestep)
        _set_cache_context(self._model, CacheContext(CONTEXT, step_index=step, num_inference_steps=num_steps,
                                                     timestep=timestep))

    def decide(self, query):
        return True


@dataclass(frozen=True)
class FbcConfig:
    threshold: float = 0.05  # relative change of the first block's residual below which later blocks are skipped

    def __post_init__(self):
        if self.threshold < 0:
            raise ValueError(f"policy 'diffusers-fbc': threshold must be non-negative, got {self.threshold}")


@register("diffusers-fbc", FbcConfig)
class DiffusersFirstBlockCache(_DiffusersHookPeer):
    hook_names = ("fbc_leader_block_hook", "fbc_block_hook")

    def __init__(self, config: FbcConfig = FbcConfig()):
        self.config = config

    def _apply(self, model):
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        if type(model).__name__ == "SD3Transformer2DModel":  # it would fail at the first step, not here
            raise ValueError("policy 'diffusers-fbc': diffusers' First Block Cache cannot run SD3Transformer2DModel: "
                             "its tail hook subtracts a text stream that SD3's last block does not return")
        apply_first_block_cache(model, FirstBlockCacheConfig(threshold=self.config.threshold))


@dataclass(frozen=True)
class TaylorSeerPeerConfig:
    interval: int = 5  # diffusers' cache_interval
    warmup: int = 3  # disable_cache_before_step
    order: int = 1  # max_order

    def __post_init__(self):
        if self.interval < 1 or self.warmup < 0 or self.order < 0:
            raise ValueError("policy 'diffusers-taylorseer': interval >= 1, warmup >= 0 and order >= 0 required")


@register("diffusers-taylorseer", TaylorSeerPeerConfig)
class DiffusersTaylorSeer(_DiffusersHookPeer):
    hook_names = ("taylorseer_cache",)

    def __init__(self, config: TaylorSeerPeerConfig = TaylorSeerPeerConfig()):
        self.config = config

    def _apply(self, model):
        from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

        apply_taylorseer_cache(model, TaylorSeerCacheConfig(
            cache_interval=self.config.interval, disable_cache_before_step=self.config.warmup,
            max_order=self.config.order, taylor_factors_dtype=torch.float32,
            cache_identifiers=_taylorseer_identifiers(model)))


def _taylorseer_identifiers(model) -> list[str] | None:
    """None (diffusers' own default patterns: every attention of ``transformer_blocks`` and
    ``single_transformer_blocks``, what diffusers ships for FLUX) where those hook some module; else our adapter's
    default units. The defaults full-match ``.*attn``, so they miss DiT's and PixArt's ``attn1``."""
    from diffusers.hooks.taylorseer_cache import _TRANSFORMER_BLOCK_IDENTIFIERS

    from cqpolicy.models.adapters import adapter_for

    names = [name for name, _ in model.named_modules()]
    if any(re.fullmatch(pattern, name) for pattern in _TRANSFORMER_BLOCK_IDENTIFIERS for name in names):
        return None
    adapter = adapter_for(model)
    return adapter.unit_patterns(adapter.default_units)


@dataclass(frozen=True)
class MagCachePeerConfig:
    threshold: float = 0.06  # accumulated error of the magnitude ratios up to which the blocks are skipped
    max_skip: int = 3  # max_skip_steps: consecutive skipped steps at most
    retention: float = 0.2  # retention_ratio: the first share of the steps never skips
    calibration_samples: int = 4  # samples of the uncached run that measures the model's magnitude ratios

    def __post_init__(self):
        if self.threshold < 0 or self.max_skip < 0 or not 0 <= self.retention <= 1 or self.calibration_samples < 1:
            raise ValueError("policy 'diffusers-magcache': threshold >= 0, max_skip >= 0, 0 <= retention <= 1 and "
                             "calibration_samples >= 1 required")


MAG_CACHE_HOOKS = ("mag_cache_leader_block_hook", "mag_cache_block_hook")


class _MagCacheCalibration(_DiffusersHookPeer):
    """diffusers' MagCache in calibration mode: it skips nothing and records, per step, the mean ratio of the norms of
    the blocks' residual (last block's output - first block's input) to the previous step's."""

    name = "magcache-calibration"
    hook_names = MAG_CACHE_HOOKS

    def __init__(self, steps: int):
        self.steps = steps
        self.state = None

    def _apply(self, model):
        from diffusers.hooks import HookRegistry, MagCacheConfig, apply_mag_cache

        # one step more than the run: the hook never reaches its end of run, which prints the ratios and drops them
        apply_mag_cache(model, MagCacheConfig(calibrate=True, num_inference_steps=self.steps + 1))
        self.state = HookRegistry.check_if_exists_or_initialize(_mag_cache_head(model)).get_hook(
            MAG_CACHE_HOOKS[0]).state_manager

    @property
    def ratios(self) -> list[float]:
        return list(self.state.get_state().calibration_ratios)


def _mag_cache_head(model) -> torch.nn.Module:
    from diffusers.hooks import HookRegistry

    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if isinstance(registry, HookRegistry) and registry.get_hook(MAG_CACHE_HOOKS[0]) is not None:
            return module
    raise ValueError(f"policy 'diffusers-magcache': diffusers' MagCache found no transformer blocks in "
                     f"{type(model).__name__}")


@torch.no_grad()
def magnitude_ratios(model, settings, num_samples: int) -> list[float]:
    """The magnitude ratio of every step of an uncached run of ``num_samples`` calibration seeds (one batch), by
    diffusers' own calibration mode: MagCache's ratios are the model's and the schedule's, never the test noise's."""
    from cqpolicy.runtime import enable
    from cqpolicy.sampling import sample

    probe = _MagCacheCalibration(int(settings.steps))
    labels = torch.arange(num_samples) % model.num_classes
    start = seed_roles.start("calibration")
    with enable(model.transformer, probe):
        sample(model, labels, [start + i for i in range(num_samples)], replace(settings, batch_size=num_samples),
               progress=False)
        ratios = probe.ratios
    if len(ratios) != settings.steps:
        raise RuntimeError(f"policy 'diffusers-magcache': calibration recorded {len(ratios)} ratios in "
                           f"{settings.steps} steps")
    return ratios


@register("diffusers-magcache", MagCachePeerConfig)
class DiffusersMagCache(_DiffusersHookPeer):
    """MagCache: after the retained first steps, the product of the calibrated magnitude ratios since the last
    computed step is accumulated; while its error stays under ``threshold`` (and at most ``max_skip`` steps), all
    blocks are skipped for the last computed residual. The ratios need an uncached run, which ``prepare`` makes."""

    hook_names = MAG_CACHE_HOOKS

    def __init__(self, config: MagCachePeerConfig = MagCachePeerConfig()):
        self.config = config
        self.ratios: list[float] | None = None
        self.steps: int | None = None
        self._calibrated: dict[tuple, list[float]] = {}

    def prepare(self, model, settings):
        key = (model.name, int(settings.steps), settings.scheduler, float(settings.guidance_scale))
        if key not in self._calibrated:  # calibrate once per setting; prepare is cheap afterwards
            self._calibrated[key] = magnitude_ratios(model, settings, self.config.calibration_samples)
            self.calibration_images = self.config.calibration_samples
        self.ratios, self.steps = self._calibrated[key], int(settings.steps)

    def _apply(self, model):
        from diffusers.hooks import MagCacheConfig, apply_mag_cache

        if self.ratios is None:
            raise RuntimeError("policy 'diffusers-magcache': not calibrated yet; call policy.prepare(model, settings) "
                               "before sampling (evaluate does this)")
        c = self.config
        apply_mag_cache(model, MagCacheConfig(threshold=c.threshold, max_skip_steps=c.max_skip,
                                              retention_ratio=c.retention, num_inference_steps=self.steps,
                                              mag_ratios=torch.tensor(self.ratios)))
        _mag_cache_head(model)  # a model without blocks diffusers knows gets no hooks, only a warning: refuse it

    def reset(self, num_steps, num_blocks):
        # the ratios are per step of the calibrated schedule, and the hooks end their run after its step count
        if num_steps is not None and num_steps != self.steps:
            raise ValueError(f"policy 'diffusers-magcache': calibrated for {self.steps} steps, run with {num_steps}")
        super().reset(num_steps, num_blocks)


@dataclass(frozen=True)
class PabConfig:
    interval: int = 2  # spatial_attention_block_skip_range: self-attention computed every interval-th step
    cross_interval: int = 0  # cross_attention_block_skip_range (PixArt's attn2); 0: always computed
    low: float = 100  # attention may be reused only at scheduler timesteps strictly between low and high
    high: float = 800

    def __post_init__(self):
        if self.interval < 1 or self.cross_interval < 0 or self.low >= self.high:
            raise ValueError("policy 'diffusers-pab': interval >= 1, cross_interval >= 0 and low < high required")


@register("diffusers-pab", PabConfig)
class DiffusersPab(_DiffusersHookPeer):
    """Pyramid Attention Broadcast: inside the timestep range, each attention module recomputes every
    ``interval``-th call and returns its last output in between (no forecast)."""

    hook_names = ("pyramid_attention_broadcast",)

    def __init__(self, config: PabConfig = PabConfig()):
        self.config = config

    def _apply(self, model):
        from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

        c, window = self.config, (self.config.low, self.config.high)
        apply_pyramid_attention_broadcast(model, PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=c.interval, spatial_attention_timestep_skip_range=window,
            cross_attention_block_skip_range=c.cross_interval or None, cross_attention_timestep_skip_range=window,
            current_timestep_callback=lambda: self.timestep))


@dataclass(frozen=True)
class FasterCachePeerConfig:
    interval: int = 2  # spatial_attention_block_skip_range: attention computed every interval-th step
    high: float = 681  # attention is approximated only below this scheduler timestep (diffusers' default)
    weight: float = 0.5  # attention_weight_callback: approximation = last + weight * (last - the one before)

    def __post_init__(self):
        if self.interval < 1 or self.weight < 0:
            raise ValueError("policy 'diffusers-fastercache': interval >= 1 and weight >= 0 required")


@register("diffusers-fastercache", FasterCachePeerConfig)
class DiffusersFasterCache(_DiffusersHookPeer):
    """FasterCache's attention half: inside the timestep range, each attention module computes every
    ``interval``-th call and extrapolates its last two outputs in between. Its CFG-Cache half (the unconditional
    rows approximated from the conditional ones) is off, as diffusers runs it on a guidance-distilled model: it
    takes the second half of a CFG batch for the conditional rows, and our sampler puts them first."""

    hook_names = ("faster_cache_denoiser", "faster_cache_block")

    def __init__(self, config: FasterCachePeerConfig = FasterCachePeerConfig()):
        self.config = config

    def _apply(self, model):
        from diffusers.hooks import FasterCacheConfig, apply_faster_cache

        from cqpolicy.models.adapters import adapter_for

        if adapter_for(model).guidance(model) == "cfg":
            raise ValueError(f"policy 'diffusers-fastercache' runs on models without a CFG batch (FLUX): its CFG-Cache "
                             f"takes the second half of the batch for the conditional rows, our sampler puts them "
                             f"first ({type(model).__name__})")
        c = self.config
        with _quiet_diffusers():
            apply_faster_cache(model, FasterCacheConfig(
                spatial_attention_block_skip_range=c.interval, spatial_attention_timestep_skip_range=(-1, c.high),
                attention_weight_callback=lambda module: c.weight, is_guidance_distilled=True,
                tensor_format="BCHW", current_timestep_callback=lambda: self.timestep))


@contextmanager
def _quiet_diffusers():
    """``apply_faster_cache`` warns at every enable that FasterCache is experimental."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


@dataclass(frozen=True)
class WheelConfig:
    path: str = ""  # SmoothCache JSON schedule, keys as the wheel reads them (attn1, attn1-5)


@register("smoothcache-wheel", WheelConfig)
class SmoothCacheWheel(Policy):
    """The ``dit-smoothcache`` wheel's own ``DiffuserCacheHelper`` (it wraps ``attn1`` only)."""

    units = ()
    reports_reuse = False

    def __init__(self, config: WheelConfig = WheelConfig()):
        if not config.path:
            raise ValueError("policy 'smoothcache-wheel' needs path=SCHEDULE.json")
        try:
            with open(config.path) as f:
                self.schedule = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"policy 'smoothcache-wheel': cannot read {config.path}: {exc}") from None
        self.config = config
        self.helper = None
        self.length = {len(v) for v in self.schedule.values()}.pop() if self.schedule else 0

    def prepare(self, model, settings):
        # The wheel silently runs uncached past its schedule's end: make a mismatch an error instead.
        if settings.steps != self.length:
            raise ValueError(f"policy 'smoothcache-wheel': {self.config.path} has {self.length} steps, "
                             f"the run has {settings.steps}")

    def attach(self, model):
        try:
            import SmoothCache.smooth_cache_helper as wheel
            from SmoothCache import DiffuserCacheHelper
        except ImportError:
            raise ValueError("policy 'smoothcache-wheel' needs the optional peer: "
                             "pip install --no-deps dit-smoothcache") from None
        wheel.print = lambda *args, **kwargs: None  # the wheel prints on every module call
        self.helper = DiffuserCacheHelper(model, schedule=self.schedule)

    def reset(self, num_steps, num_blocks):
        if num_steps is not None and num_steps != self.length:
            raise ValueError(f"policy 'smoothcache-wheel': schedule of {self.length} steps run with {num_steps}")
        # The wheel counts steps per module from enable(): re-enable it for every sampling call.
        self.helper.disable()
        self.helper.enable()

    def detach(self, model):
        if self.helper is not None:
            self.helper.disable()

    def decide(self, query):
        return True

    @property
    def caches(self) -> bool:
        return False  # the wheel keeps its own state: the runtime need not store unit outputs nobody reads


@dataclass(frozen=True)
class CacheDitConfig:
    # defaults are cache-dit's own DBCacheConfig defaults
    threshold: float = 0.08  # residual_diff_threshold: relative L1 change of the Fn residual below which Mn is reused
    fn: int = 8  # Fn_compute_blocks: first blocks, always computed; their residual is what is compared
    bn: int = 0  # Bn_compute_blocks: last blocks, always computed, on top of the reused middle residual
    warmup: int = 8  # max_warmup_steps: steps that never reuse
    max_cached: int = -1  # max_cached_steps per sampling call; -1: no limit

    def __post_init__(self):
        if self.threshold < 0 or self.fn < 1 or self.bn < 0 or self.warmup < 0 or self.max_cached < -1:
            raise ValueError("policy 'cache-dit': threshold >= 0, fn >= 1, bn >= 0, warmup >= 0 and max_cached >= -1 "
                             "required")


@contextmanager
def _quiet_cache_dit():
    """cache-dit logs every enable and disable to stdout, where our CLI prints its results."""
    names = [name for name in logging.root.manager.loggerDict if name.startswith("cache_dit")]
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextmanager
def _beneath_step_hook(model):
    """cache-dit replaces ``model.forward``: lift the runtime's step hook off while it does, then put it back on
    top, so the hook still sees every call (inside an unmodified pipeline it starts our sampling calls)."""
    from diffusers.hooks import HookRegistry

    from cqpolicy.runtime.runtime import STEP_HOOK

    registry = HookRegistry.check_if_exists_or_initialize(model)
    hook = registry.get_hook(STEP_HOOK)
    if hook is not None:
        registry.remove_hook(STEP_HOOK, recurse=False)
    try:
        yield
    finally:
        if hook is not None:
            registry.register_hook(hook, STEP_HOOK)


def _decide_per_rank() -> None:
    """cache-dit averages its residual change over every rank of a process group, which serves context parallelism
    (one sample split over the ranks). Under torchrun our ranks sample different batches, so each decides on its
    own batch as one process would, and a rank that samples alone (wall timing) waits for no other: only a
    transformer cache-dit itself parallelised averages."""
    from cache_dit.caching.cache_blocks.pattern_base import CachedBlocks_Pattern_Base

    CachedBlocks_Pattern_Base._is_parallelized = lambda blocks: bool(
        getattr(blocks.transformer, "_is_parallelized", False))


# cache-dit's block adapters, registered under pipeline-class prefixes; it matches a transformer alone by its own
# class name, which SD3's (SD3Transformer2DModel) does not start with: each class is looked up by its prefix here
CACHE_DIT_ADAPTERS = {"DiTTransformer2DModel": "DiT", "PixArtTransformer2DModel": "PixArt",
                      "SD3Transformer2DModel": "StableDiffusion3", "FluxTransformer2DModel": "Flux"}


@register("cache-dit", CacheDitConfig)
class CacheDit(Policy):
    """cache-dit's DBCache, through cache-dit's own block adapter of the model class on the transformer alone (DiT:
    ``ForwardPattern.Pattern_3`` with ``DiTPatchFunctor``; PixArt: ``Pattern_3``; SD3: ``Pattern_1``; FLUX:
    ``Pattern_1`` over its dual- then single-stream blocks as one list, with ``FluxPatchFunctor``). Each step the
    first ``fn`` blocks run; when their residual changed by less than ``threshold`` since the last computed step,
    the middle blocks are skipped for their cached residual and only the last ``bn`` blocks run. cache-dit compares
    the whole batch: the CFG rows decide together."""

    units = ()
    reports_reuse = False

    def __init__(self, config: CacheDitConfig = CacheDitConfig()):
        self.config = config
        self.adapter = None
        self.model = None
        self.module_order: list[str] = []
        self.attributes: dict = {}

    def bind(self, adapter):
        # Our runtime's unit hooks only count here. cache-dit calls the blocks positionally, and a whole-block unit
        # of a two-stream model (FLUX's single, any block) reads its streams by keyword: hook the units inside
        # the blocks, which the blocks call themselves (DiT's attn1 and ff as before).
        self.units = tuple(u for u in adapter.default_units if u not in (*adapter.block_units, "single"))

    def attach(self, model):
        try:
            import cache_dit
            from cache_dit.caching.block_adapters import BlockAdapterRegister, FakeDiffusionPipeline
        except ImportError:
            raise ValueError("policy 'cache-dit' needs the optional peer: pip install --no-deps cache-dit==1.5.3") \
                from None
        _decide_per_rank()
        from cqpolicy.models.adapters import adapter_for

        prefix = CACHE_DIT_ADAPTERS.get(type(model).__name__)
        if prefix is None:
            raise ValueError(f"policy 'cache-dit' runs cache-dit's adapters of {', '.join(CACHE_DIT_ADAPTERS)}, not "
                             f"{type(model).__name__}")
        c, num_blocks = self.config, len(adapter_for(model).blocks(model))
        # cache-dit only checks fn and bn against the block count apart; overlapping, they would run blocks twice
        if c.fn + c.bn >= num_blocks:
            raise ValueError(f"policy 'cache-dit': fn={c.fn} + bn={c.bn} must leave some of the model's {num_blocks} "
                             f"blocks in the middle to cache")
        self.model = model
        self.module_order = list(model._modules)
        with _quiet_cache_dit(), _beneath_step_hook(model):
            self.attributes = dict(vars(model))  # beneath the step hook: the model's own forward
            # the transformer alone on cache-dit's FakeDiffusionPipeline (as cache_dit.get_adapter makes it), whose
            # cache context persists across calls: reset() renews it per sampling call
            self.adapter = BlockAdapterRegister._adapters[prefix](FakeDiffusionPipeline(model))
            cache_dit.enable_cache(self.adapter, cache_config=cache_dit.DBCacheConfig(
                Fn_compute_blocks=c.fn, Bn_compute_blocks=c.bn, residual_diff_threshold=c.threshold,
                max_warmup_steps=c.warmup, max_cached_steps=c.max_cached,
                enable_separate_cfg=False))  # our sampler (as DiTPipeline) runs the CFG rows in one call

    def _contexts(self):
        return [self.model._context_manager.get_context(name) for name in self.model._context_names]

    def reset(self, num_steps, num_blocks):
        import cache_dit

        # a fresh context (empty buffers, no steps) per sampling call, as cache-dit makes per DiTPipeline call
        cache_dit.refresh_context(self.model)

    def begin_step(self, step, num_steps, timestep):
        # cache-dit counts the transformer calls itself (one per step here): pin its count to our step, so warmup
        # and max_cached count sampling steps even if the model is called in between
        for context in self._contexts():
            context.executed_steps = context.transformer_executed_steps = step

    def detach(self, model):
        if self.adapter is None:
            return
        import cache_dit

        with _quiet_cache_dit(), _beneath_step_hook(model):
            cache_dit.disable_cache(self.adapter)
            # disable_cache keeps what the patch functors did (their forward; DiT's _norm1_emb; _is_patched), and
            # cache-dit's mock.patch of the blocks re-registers them last at every call: undo both
            for name in (set(vars(model)) - set(self.attributes)) | (set(model._modules) - set(self.module_order)):
                delattr(model, name)
            if "forward" in self.attributes:
                model.forward = self.attributes["forward"]
            for name in self.module_order:
                model._modules[name] = model._modules.pop(name)
        self.adapter = self.model = None

    def decide(self, query):
        return True

    @property
    def caches(self) -> bool:
        return False  # cache-dit keeps its own buffers: the runtime need not store unit outputs nobody reads
