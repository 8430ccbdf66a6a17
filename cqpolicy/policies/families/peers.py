"""Peer tools run side by side on the same model, as policies of their own hooks.

* ``diffusers-fbc``: diffusers' First Block Cache hooks (``apply_first_block_cache``).
* ``diffusers-taylorseer``: diffusers' TaylorSeer hooks (``apply_taylorseer_cache``).
* ``smoothcache-wheel``: the ``dit-smoothcache`` wheel's ``DiffuserCacheHelper`` running a published schedule
  (optional extra: ``pip install --no-deps dit-smoothcache``).
* ``cache-dit``: cache-dit's DBCache (``enable_cache`` with a ``DBCacheConfig``) through its own DiT adapter, on
  the transformer alone, a fresh cache context per sampling call (optional extra:
  ``pip install --no-deps cache-dit==1.5.3``).

DiT is no ``CacheMixin``, so nothing sets diffusers' cache context: these adapters set it at every step from
our runtime's step context, and reset the peers' state at every sampling call. Their hooks are not ours,
so reuse ratio and cache bytes are not reported for them (``reports_reuse = False``).
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from cqpolicy.policies.base import Policy
from cqpolicy.policies.registry import register


class _DiffusersHookPeer(Policy):
    units = ()
    reports_reuse = False
    hook_names: tuple[str, ...] = ()

    @property
    def caches(self) -> bool:
        return False  # the peer keeps its own state: the runtime need not store unit outputs nobody reads

    def _apply(self, model):
        raise NotImplementedError

    def attach(self, model):
        self._model = model
        self._apply(model)

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

        # One context for the whole batched CFG call: cond and uncond rows travel together.
        _set_cache_context(self._model, CacheContext("cfg_batch", step_index=step, num_inference_steps=num_steps,
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

        from cqpolicy.models.adapters import adapter_for

        # Its default patterns ("^transformer_blocks.*attn", full match) miss DiT's attn1: name our units.
        apply_taylorseer_cache(model, TaylorSeerCacheConfig(
            cache_interval=self.config.interval, disable_cache_before_step=self.config.warmup,
            max_order=self.config.order, taylor_factors_dtype=torch.float32,
            cache_identifiers=adapter_for(model).unit_patterns(("attn1", "ff"))))


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


@register("cache-dit", CacheDitConfig)
class CacheDit(Policy):
    """cache-dit's DBCache, through cache-dit's own DiT adapter (``ForwardPattern.Pattern_3``, ``DiTPatchFunctor``)
    on the transformer alone. Each step the first ``fn`` blocks run; when their residual changed by less than
    ``threshold`` since the last computed step, the middle blocks are skipped for their cached residual and only
    the last ``bn`` blocks run. cache-dit compares the whole batch: the CFG rows decide together."""

    units = ()
    reports_reuse = False

    def __init__(self, config: CacheDitConfig = CacheDitConfig()):
        self.config = config
        self.adapter = None
        self.model = None
        self.module_order: list[str] = []

    def attach(self, model):
        try:
            import cache_dit
        except ImportError:
            raise ValueError("policy 'cache-dit' needs the optional peer: pip install --no-deps cache-dit==1.5.3") \
                from None
        from diffusers import DiTTransformer2DModel

        if not isinstance(model, DiTTransformer2DModel):
            raise ValueError(f"policy 'cache-dit' runs cache-dit's DiT adapter: it needs a DiTTransformer2DModel, "
                             f"not {type(model).__name__}")
        c, num_blocks = self.config, len(model.transformer_blocks)
        # cache-dit only checks fn and bn against the block count apart; overlapping, they would run blocks twice
        if c.fn + c.bn >= num_blocks:
            raise ValueError(f"policy 'cache-dit': fn={c.fn} + bn={c.bn} must leave some of the model's {num_blocks} "
                             f"blocks in the middle to cache")
        self.model = model
        self.module_order = list(model._modules)
        with _quiet_cache_dit(), _beneath_step_hook(model):
            # a transformer alone gets cache-dit's registered DiT adapter on its FakeDiffusionPipeline, whose cache
            # context persists across calls: reset() renews it per sampling call
            self.adapter = cache_dit.get_adapter(model)
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
            # disable_cache keeps what DiTPatchFunctor added (its forward, _norm1_emb, _is_patched), and cache-dit's
            # mock.patch of transformer_blocks re-registers the blocks last at every call: undo both
            del model.forward, model._norm1_emb, model._is_patched
            for name in self.module_order:
                model._modules[name] = model._modules.pop(name)
        self.adapter = self.model = None

    def decide(self, query):
        return True

    @property
    def caches(self) -> bool:
        return False  # cache-dit keeps its own buffers: the runtime need not store unit outputs nobody reads
