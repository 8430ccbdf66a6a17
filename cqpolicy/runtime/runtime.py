"""The wrapper runtime: diffusers ``ModelHook``s on a model's cache units, driven by one policy.

Tracing, benchmarking and deployment all run the model through this one runtime.

* **Step context.** Our sampler announces each call and step (``begin_call`` / ``set_step``). Inside a user's
  own pipeline the runtime follows the pipeline's scheduler (``cqpolicy.runtime.context``): its timesteps give
  each model call's step, the step count and the log-SNR, as the sampler would. With neither (a bare denoiser
  called by hand) a hook on the top-level model infers the step from the ``timestep`` argument: a timestep that
  does not decrease starts a new call at step 0, and step count and log-SNR stay unknown.
* **State** (cache store, policy state, counters) belongs to one sampling call and is reset at every
  call. With batched classifier-free guidance the conditional and unconditional halves are separate
  rows of every cached tensor, so no branch ever reads the other's cache.
* **Decisions** per (step, block, unit), optionally per sample: a bool mask makes only the marked rows
  execute; the other rows take the cached output.
* **torch.compile** (``compile=True``): each unit's computation is compiled on its own (regional compilation:
  units of one kind share one compiled graph), while decisions, cache reads and writes stay in Python
  between them, so a policy never turns into guards or recompiles of a whole-model graph.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
from diffusers.hooks import HookRegistry, ModelHook

from cqpolicy.models.adapters import CacheUnit, adapter_for, cache_blocks, find_cache_units
from cqpolicy.policies.base import Policy, UnitQuery
from cqpolicy.runtime.cache_store import CacheFormat, CacheStore

STEP_HOOK = "cqpolicy_step"
UNIT_HOOK = "cqpolicy_unit"


class StepMismatchError(RuntimeError):
    """A policy made for one number of steps was run with another."""


class _StepHook(ModelHook):
    """On the top-level model: infers the step from the timestep when the sampler did not set it."""

    def __init__(self, runtime: "CacheRuntime"):
        super().__init__()
        self.runtime = runtime

    def pre_forward(self, module, *args, **kwargs):
        if self.runtime._overrides is not None:  # probe passes are not part of the sampling run
            return args, kwargs
        self.runtime._on_model_call(self.runtime.adapter.call_timestep(args, kwargs))
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        self.runtime.model_rows += int(x.shape[0])
        self.runtime.cfg_branch = self.runtime.adapter.unconditional_rows(module, args, kwargs)
        return args, kwargs


def _take_rows(value, mask: torch.Tensor, batch: int):
    return value[mask] if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch else value


class _UnitHook(ModelHook):
    """On one cache unit: compute, reuse, or compute only some rows, as the policy says."""

    def __init__(self, runtime: "CacheRuntime", unit: CacheUnit):
        super().__init__()
        self.runtime = runtime
        self.unit = unit
        self.key = (unit.block, unit.name)
        self._compiled = None

    def new_forward(self, module, *args, **kwargs):
        rt, unit = self.runtime, self.unit
        original = self.fn_ref.original_forward
        if rt.compile:
            if self._compiled is None:
                self._compiled = torch.compile(original)
            original = self._compiled
        forward = original if unit.flatten is None else lambda *a, **k: unit.flatten(original(*a, **k))
        x = unit.input_of(args, kwargs)
        batch = x.shape[0]
        if rt._overrides is not None:  # a probe pass: no policy, no cache writes, no counts
            out = self._probe_forward(forward, x, batch, args, kwargs)
            return out if unit.pack is None else unit.pack(out, args, kwargs)
        has_cache = self.key in rt.store
        query = UnitQuery(step=rt.step, num_steps=rt.num_steps, timestep=rt.timestep, block=unit.block,
                          unit=unit.name, num_blocks=rt.num_blocks, inputs=x, has_cache=has_cache,
                          module=module, log_snr=rt.log_snr, cfg_branch=rt.cfg_branch)
        decision = rt.policy.decide(query)
        if torch.is_tensor(decision) and decision.is_floating_point():
            return self._record(query, x, self._blend(query, forward, decision, x, args, kwargs), batch, args,
                                kwargs)
        if torch.is_tensor(decision):
            mask = decision.to(device=x.device, dtype=torch.bool).reshape(-1)
            if mask.numel() != batch:
                raise ValueError(f"policy {rt.policy.name!r} returned a mask of {mask.numel()} rows for a batch "
                                 f"of {batch}")
            compute_rows = int(mask.sum())
        else:
            mask = None
            compute_rows = batch if decision else 0
        if not has_cache:
            mask, compute_rows = None, batch  # nothing to reuse yet: compute
        if compute_rows == batch:
            out = forward(*args, **kwargs)
        else:
            cached = rt.store.get(self.key)
            if cached.shape[0] != batch:
                raise RuntimeError(f"cached {unit.name} of block {unit.block} holds {cached.shape[0]} rows but the "
                                   f"batch has {batch}: state leaked across calls")
            value = rt.policy.reuse(query, cached)  # the output (or residual) used for reused rows
            out = x + value if unit.residual else value
            if compute_rows:
                sub = forward(*(_take_rows(a, mask, batch) for a in args),
                              **{k: _take_rows(v, mask, batch) for k, v in kwargs.items()})
                out = out.clone()
                out[mask] = sub
        return self._record(query, x, out, compute_rows, args, kwargs)

    def _blend(self, query, forward, gate, x, args, kwargs):
        """A soft decision ``gate`` in [0, 1] (0-d or one per row): every row computes, and the unit's output is
        ``gate * computed + (1 - gate) * cached``; that blend is also what the cache keeps, so a run of gates of
        0 and 1 is exactly the hard schedule, and gradients reach every gate (learning through the sampler)."""
        out = forward(*args, **kwargs)
        if not query.has_cache:
            return out
        value = out - x if self.unit.residual else out
        gate = gate.to(device=value.device, dtype=value.dtype)
        if gate.ndim:
            gate = gate.reshape(-1, *([1] * (value.ndim - 1)))
        cached = self.runtime.policy.reuse(query, self.runtime.store.get(self.key))
        self.runtime.policy.observe_soft(query, value, cached)
        value = gate * value + (1 - gate) * cached
        return x + value if self.unit.residual else value

    def _record(self, query, x, out, compute_rows, args, kwargs):
        rt, unit = self.runtime, self.unit
        batch = x.shape[0]
        rt.counts[unit.name, "computed"] += compute_rows
        rt.counts[unit.name, "reused"] += batch - compute_rows
        rt.unit_rows[self.key] += compute_rows
        if compute_rows:
            stored = out - x if unit.residual else out
            rt.policy.observe(query, stored)
            if rt.policy.caches:
                rt.store.put(self.key, stored)
            rt.held_peak = max(rt.held_peak, rt.store.nbytes + rt.policy.state_nbytes)
        return out if unit.pack is None else unit.pack(out, args, kwargs)

    def _probe_forward(self, forward, x, batch, args, kwargs):
        override = self.runtime._overrides.get(self.key)
        if override is None:
            return forward(*args, **kwargs)
        value, rows = override  # rows marked True take `value` (the unit's cached output or residual)
        rows = rows.to(x.device)
        out = x + value if self.unit.residual else value.clone()
        keep = ~rows
        if bool(keep.any()):
            out[keep] = forward(*(_take_rows(a, keep, batch) for a in args),
                                **{k: _take_rows(v, keep, batch) for k, v in kwargs.items()})
        return out


class CacheRuntime:
    """Hooks ``policy`` into ``model``'s cache units. Use ``enable`` to build one."""

    def __init__(self, model: torch.nn.Module, policy: Policy, cache_format: CacheFormat | str = "fp16",
                 compile: bool = False):
        if getattr(model, "_cqpolicy_runtime", None) is not None:
            raise RuntimeError("a cqpolicy runtime is already enabled on this model; disable it first")
        self.adapter = adapter_for(model)
        self.num_blocks = len(cache_blocks(model))
        if isinstance(cache_format, str):
            cache_format = CacheFormat.parse(cache_format, num_heads=self.adapter.num_heads(model))
        self.model = model
        self.policy = policy
        self.compile = compile
        policy.bind(self.adapter)
        self.units = find_cache_units(model, policy.units or self.adapter.default_units)
        self.store = CacheStore(cache_format)
        self.counts: Counter = Counter()
        # rows each (block, unit) computed and rows the model was called on, over every call: with the per-row
        # MACs of each unit (evaluation.cost.ModelCosts) they give the exact MACs of what ran
        self.unit_rows: Counter = Counter()
        self.model_rows = 0
        self.held_peak = 0  # peak of cache store + policy-held tensors, over all calls
        self._policy_macs_start = policy.executed_macs
        self.calls = 0
        self._explicit = False
        self._plan = None  # the current pipeline call's StepPlan, when following a scheduler
        self._unfollow = None
        self._steps_seen = 0
        self._last_t: float | None = None
        self.step, self.num_steps, self.timestep = -1, None, float("nan")
        self.log_snr: float | None = None
        self._overrides: dict | None = None
        self.cfg_branch: torch.Tensor | None = None  # per row of the current model call: 1 = unconditional
        self._registries = []
        registry = HookRegistry.check_if_exists_or_initialize(model)
        registry.register_hook(_StepHook(self), STEP_HOOK)
        self._registries.append(registry)
        for unit in self.units:
            registry = HookRegistry.check_if_exists_or_initialize(unit.module)
            registry.register_hook(_UnitHook(self, unit), UNIT_HOOK)
            self._registries.append(registry)
        model._cqpolicy_runtime = self
        try:
            policy.attach(model)
        except BaseException:  # a policy that refuses this model leaves it as it was
            self._remove_hooks()
            raise

    # -- call and step context ------------------------------------------------------------------------
    def begin_call(self, num_steps: int | None) -> None:
        """A sampling call (one batch of samples) starts: fresh cache and policy state."""
        self._finish_call()
        self.store.clear()
        self.policy.reset(num_steps, self.num_blocks)
        self.step, self.num_steps, self.timestep = -1, num_steps, float("nan")
        self.log_snr = None
        self._last_t = None
        self.calls += 1

    def set_step(self, step: int, timestep, log_snr: float | None = None) -> None:
        """Called by our sampler before each model call."""
        self._explicit = True
        if self.num_steps is not None and step >= self.num_steps:
            raise StepMismatchError(f"step {step} in a call announced with {self.num_steps} steps")
        self._enter_step(step, float(timestep), log_snr)

    def _enter_step(self, step: int, timestep: float, log_snr: float | None) -> None:
        self.step = step
        self.timestep = timestep
        self.log_snr = log_snr
        self._steps_seen = step + 1
        self.policy.begin_step(step, self.num_steps, timestep)

    def follow_scheduler(self, scheduler) -> None:
        """Read every later call's steps, step count and log-SNR from ``scheduler`` (a user's pipeline drives
        the model); undone by ``disable``."""
        from cqpolicy.runtime.context import follow_scheduler

        if self._unfollow is not None:
            self._unfollow()
        self._unfollow = follow_scheduler(self, scheduler)

    def expect_call(self, plan) -> None:
        """The followed scheduler set its timesteps: the next model call starts a call of ``plan``'s steps (a
        call the pipeline left before its last step, e.g. interrupted by a callback, ends here)."""
        self._plan = plan
        self._steps_seen = 0

    def end_call(self) -> None:
        self._finish_call()
        self._explicit = False

    def _finish_call(self):
        seen = self._steps_seen
        if self.num_steps is not None and 0 < seen < self.num_steps:
            raise StepMismatchError(f"the call ended after {seen} of its {self.num_steps} steps")
        self._steps_seen = 0

    def _on_model_call(self, t: float) -> None:
        if self._explicit:
            return
        plan = self._plan
        if plan is not None:  # following the pipeline's scheduler
            if plan.position < 0:
                self.begin_call(plan.num_steps)
            step = plan.locate(t)
            self._enter_step(step, t, plan.log_snrs[step])
            return
        # Inferred context (a bare denoiser called by hand): a non-decreasing timestep starts a new call.
        if self._last_t is None or t >= self._last_t:
            self.begin_call(None)
            self.step = 0
        else:
            self.step += 1
        self._last_t = t
        self.timestep = t
        self.policy.begin_step(self.step, None, t)

    @contextmanager
    def probing(self, overrides: dict):
        """Inside: units listed in ``overrides`` ({(block, unit): (value, row_mask)}) return ``value`` for the
        marked rows (forced reuse) and compute the others; every other unit computes. The policy, the cache
        store and the counters are not touched, so probes leave the sampling run exactly as it was."""
        previous, self._overrides = self._overrides, overrides
        try:
            yield
        finally:
            self._overrides = previous

    # -- results --------------------------------------------------------------------------------------
    @property
    def reuse_ratio(self) -> float | None:
        """Share of unit executions (rows) served from the cache; None when the policy's hooks are not ours."""
        if not self.policy.reports_reuse:
            return None
        computed = sum(v for (_, kind), v in self.counts.items() if kind == "computed")
        reused = sum(v for (_, kind), v in self.counts.items() if kind == "reused")
        return reused / max(1, computed + reused)

    @property
    def policy_macs(self) -> int:
        """Multiply-adds the policy executed itself since the runtime was enabled (forecasts, decision nets)."""
        return self.policy.executed_macs - self._policy_macs_start

    @property
    def cache_bytes(self) -> int | None:
        """Peak bytes held in any call so far (cache store plus tensors the policy keeps, such as a forecast
        history); None when the policy's caches are not ours."""
        if not self.policy.reports_reuse:
            return None
        return self.held_peak

    # -- lifecycle ------------------------------------------------------------------------------------
    def disable(self) -> None:
        if self._registries:
            self.policy.detach(self.model)
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        if self._unfollow is not None:
            self._unfollow()
            self._unfollow = None
        for registry in self._registries:
            name = STEP_HOOK if registry._module_ref is self.model else UNIT_HOOK
            registry.remove_hook(name, recurse=False)
        self._registries.clear()
        self.store.clear()
        if getattr(self.model, "_cqpolicy_runtime", None) is self:
            del self.model._cqpolicy_runtime

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.disable()
        return False


def enable(model: torch.nn.Module, policy: Policy, cache_format: CacheFormat | str = "fp16",
           compile: bool = False) -> CacheRuntime:
    """Hook ``policy`` into ``model`` (a diffusers model some adapter claims); returns the handle.

    ``handle.disable()`` removes every hook; ``with enable(...)`` does the same on exit. ``compile``: run each
    unit's computation through ``torch.compile`` (see the module doc).
    """
    return CacheRuntime(model, policy, cache_format, compile)


def active_runtime(model: torch.nn.Module) -> CacheRuntime | None:
    return getattr(model, "_cqpolicy_runtime", None)
