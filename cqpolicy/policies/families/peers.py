"""Peer tools run side by side on the same model, as policies of their own hooks.

* ``diffusers-fbc``: diffusers' First Block Cache hooks (``apply_first_block_cache``).
* ``diffusers-taylorseer``: diffusers' TaylorSeer hooks (``apply_taylorseer_cache``).
* ``smoothcache-wheel``: the ``dit-smoothcache`` wheel's ``DiffuserCacheHelper`` running a published schedule
  (optional extra: ``pip install --no-deps dit-smoothcache``).

DiT is no ``CacheMixin``, so nothing sets diffusers' cache context: these adapters set it at every step from
our runtime's step context, and reset the peers' state at every sampling call. Their hooks are not ours,
so reuse ratio and cache bytes are not reported for them (``reports_reuse = False``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from cqpolicy.policies.base import Policy
from cqpolicy.policies.registry import register


class _DiffusersHookPeer(Policy):
    units = ()
    reports_reuse = False
    hook_names: tuple[str, ...] = ()

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
