"""The one policy interface the runtime asks, per (step, block, unit), whether to compute or reuse.

A policy sees a ``UnitQuery`` before the unit runs and answers ``True`` (compute), ``False`` (reuse the
cache) or a bool tensor over the batch (compute only the rows marked True: per-sample decisions).
After a unit computes, the runtime calls ``observe``; when it reuses, it calls ``reuse`` to get the
tensor (plain cache read by default; forecasting policies such as TaylorSeer override it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class UnitQuery:
    step: int  # 0-based step index within this sampling call
    num_steps: int | None  # None when unknown (inferred steps inside an unmodified DiTPipeline call)
    timestep: float
    block: int
    unit: str  # "attn1", "ff" or "block"
    num_blocks: int
    inputs: torch.Tensor  # the unit's (batched) input, before it executes
    has_cache: bool  # whether a cached output exists for this unit in this call
    module: torch.nn.Module | None = None  # the unit's module (e.g. to read attention weights)
    log_snr: float | None = None  # log(alpha_bar / (1 - alpha_bar)) at this step; None if unknown
    cfg_branch: torch.Tensor | None = None  # per row: 1 = unconditional (null-class) CFG row, 0 = conditional


class Policy:
    """Base class: compute everything. Subclasses set ``units`` and override ``decide``."""

    name = "base"
    units: tuple[str, ...] = ()  # the cache units it decides for; () = the model family's default units
    # the adapter attribute a spec's empty unit option resolves to (TeaCache skips whole blocks: block_units)
    units_from = "default_units"

    def prepare(self, model, settings) -> None:
        """Called once before sampling with the LoadedModel and SampleSettings: calibrating policies
        (SmoothCache, DPS, ReCaT) run their calibration here; a step-count mismatch raises here."""

    def bind(self, adapter) -> None:
        """Before the runtime hooks anything: resolve what the spec left to the model family (``adapter``, a
        ``ModelAdapter``). A policy naming no units gets the adapter's ``default_units`` from the runtime."""

    def attach(self, model: torch.nn.Module) -> None:
        """The runtime was enabled on ``model`` (peer adapters install their own hooks here)."""

    def detach(self, model: torch.nn.Module) -> None:
        """The runtime is being disabled: undo ``attach``."""

    def begin_step(self, step: int, num_steps: int | None, timestep: float) -> None:
        """A denoising step starts (before the model call)."""

    def reset(self, num_steps: int | None, num_blocks: int) -> None:
        """A new sampling call (or batch) starts: drop all per-call state."""

    def decide(self, query: UnitQuery) -> bool | torch.Tensor:
        return True

    def observe(self, query: UnitQuery, output: torch.Tensor) -> None:
        """The unit computed ``output`` (full batch, after any partial compute was merged)."""

    def reuse(self, query: UnitQuery, cached: torch.Tensor) -> torch.Tensor:
        """The tensor used instead of computing; ``cached`` is the last stored output."""
        return cached

    def observe_soft(self, query: UnitQuery, computed: torch.Tensor, reused: torch.Tensor) -> None:
        """A soft decision ran: the unit computed ``computed`` and ``reuse`` gave ``reused`` (both before the
        blend, as residuals for residual units). On-policy fits take their labels here: with a gate of 0 the run
        follows the reused value while the computed one is the label at exactly that state."""

    @property
    def state_nbytes(self) -> int:
        """Bytes of tensors the policy holds itself beyond the runtime's cache (e.g. forecast history)."""
        return 0

    # False for peer adapters whose hooks are not ours: the runtime cannot count their reuses.
    reports_reuse = True
    # True where every sample and batch of a run gets the same decisions (a schedule a forecast can be fitted to)
    static = False
    # images the last ``prepare`` sampled uncached to calibrate (SmoothCache, DPS, ReCaT): a cost of its own
    calibration_images = 0
    # multiply-adds the policy itself executed since it was made (forecast arithmetic, decision networks,
    # indicators that need extra matmuls); the runtime adds them to the run's MACs
    executed_macs = 0

    @property
    def family(self) -> str:
        """The family this policy's frontier belongs to in the leaderboard (learned policies: ``learned-*``)."""
        return self.name

    @property
    def caches(self) -> bool:
        """Whether outputs must be stored at all (``none`` never reuses, so it stores nothing)."""
        return True


class DelegatingPolicy(Policy):
    """A policy wrapping another (``inner``): every call passes through unless a subclass adds to it.

    The trace recorder and the downstream probe are such wrappers, so traces are recorded under exactly
    the decisions, cache state and forecasts of the policy being traced.
    """

    def __init__(self, inner: Policy):
        self.inner = inner
        self.units = inner.units
        self.default_units: tuple[str, ...] = ()

    def prepare(self, model, settings) -> None:
        self.inner.prepare(model, settings)

    def bind(self, adapter) -> None:
        self.inner.bind(adapter)
        self.units = self.units or self.inner.units

    def attach(self, model) -> None:
        from cqpolicy.models.adapters import adapter_for

        self.default_units = adapter_for(model).default_units
        self.inner.attach(model)

    def detach(self, model) -> None:
        self.inner.detach(model)

    def begin_step(self, step, num_steps, timestep) -> None:
        self.inner.begin_step(step, num_steps, timestep)

    def reset(self, num_steps, num_blocks) -> None:
        self.inner.reset(num_steps, num_blocks)

    def _inner_decides(self, unit: str) -> bool:
        # the runtime hooks the family's default units for a policy naming none, and this wrapper may add more
        return unit in self.inner.units if self.inner.units else unit in self.default_units

    def decide(self, query: UnitQuery):
        return self.inner.decide(query) if self._inner_decides(query.unit) else True

    def observe(self, query: UnitQuery, output: torch.Tensor) -> None:
        if self._inner_decides(query.unit):
            self.inner.observe(query, output)

    def reuse(self, query: UnitQuery, cached: torch.Tensor) -> torch.Tensor:
        return self.inner.reuse(query, cached) if self._inner_decides(query.unit) else cached

    def observe_soft(self, query: UnitQuery, computed: torch.Tensor, reused: torch.Tensor) -> None:
        if self._inner_decides(query.unit):
            self.inner.observe_soft(query, computed, reused)

    @property
    def caches(self) -> bool:
        return self.inner.caches

    @property
    def reports_reuse(self) -> bool:
        return self.inner.reports_reuse

    @property
    def family(self) -> str:
        return self.inner.family

    @property
    def calibration_images(self) -> int:
        return self.inner.calibration_images

    @property
    def executed_macs(self) -> int:
        return self.inner.executed_macs

    @property
    def state_nbytes(self) -> int:
        return self.inner.state_nbytes
