"""Features of a cache unit that exist *before* it executes: what a deployed policy can decide from.

The trace recorder and the learned policy both compute them with ``InputTracker``, so a policy is trained
on exactly the numbers it will see at run time. Per row (CFG rows separately):

``log_snr`` (noise schedule at this step), ``progress`` (step / (steps - 1)), ``depth`` (block /
(blocks - 1)), ``is_attn1`` / ``is_ff`` / ``is_block``, ``cfg_branch`` (1 for null-class rows),
``in_l1`` / ``in_l2`` (mean |x|, RMS of the unit's input), ``in_rel_l1_prev`` / ``in_cos_prev`` (input
against the previous step's), ``in_rel_l1_last`` (input against the input at the unit's last compute),
``steps_since_compute``. The input features are element-wise passes over 16 evenly spaced tokens of the
input (all tokens on shorter sequences), so deciding stays cheap next to the unit itself.
At step 0 there is no previous input: changes are 0 and cosines 1.

``STEP_FEATURES`` (the default since policies decide once per step) replace the per-unit input features
by features of the **model input** of the step, the input of the first unit of block 0 (a modulated,
normalised copy of the latent, as TeaCache reads): ``model_in_l1``, ``model_in_l2``,
``model_in_rel_l1_prev``, ``model_in_cos_prev``, and ``model_in_rel_l1_acc``, the sum of
``model_in_rel_l1_prev`` over the steps since the unit last computed (TeaCache's accumulated indicator,
per unit). They are all known when the step starts, so one MLP call decides every unit of the step:
the per-unit feature passes cost about 11% of sampling time, the step-level ones well under 1%.
"""
from __future__ import annotations

import functools
import math

import torch

RUNTIME_FEATURES = ("log_snr", "progress", "depth", "is_attn1", "is_ff", "is_block", "cfg_branch", "in_l1",
                    "in_l2", "in_rel_l1_prev", "in_cos_prev", "in_rel_l1_last", "steps_since_compute")
TRACKED = ("in_l1", "in_l2", "in_rel_l1_prev", "in_cos_prev", "in_rel_l1_last", "steps_since_compute")
CONTEXT_FEATURES = ("log_snr", "progress", "depth", "is_attn1", "is_ff", "is_block", "cfg_branch")
MODEL_INPUT = ("in_l1", "in_l2", "in_rel_l1_prev", "in_cos_prev")  # read on block 0's first unit, once a step
STEP_FEATURES = CONTEXT_FEATURES + tuple(f"model_{name}" for name in MODEL_INPUT) + (
    "model_in_rel_l1_acc", "steps_since_compute")
FEATURE_SETS = {"step": STEP_FEATURES, "unit": RUNTIME_FEATURES}


def is_step_level(features) -> bool:
    """True when every feature is known at the start of a step (the policy then decides once per step)."""
    return not set(features) & set(TRACKED[:-1])


def flat_rows(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().reshape(x.shape[0], -1)


def rel_l1_rows(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-row relative L1 change of flattened rows (TeaCache's indicator, one value per row)."""
    from cqpolicy.policies.signals import relative_l1

    return relative_l1(x, ref, dim=1)


def cos_rows(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(x, ref, dim=1, eps=1e-12)


FEATURE_TOKENS = 16  # input features are read from this many evenly spaced tokens: deciding must stay cheap


def _token_subsample(inputs: torch.Tensor) -> torch.Tensor:
    """``[rows, tokens, width]`` inputs reduced to ``FEATURE_TOKENS`` evenly spaced tokens (others unchanged)."""
    if inputs.ndim != 3 or inputs.shape[1] <= FEATURE_TOKENS:
        return inputs
    return inputs[:, _token_index(inputs.shape[1], inputs.device)]


@functools.lru_cache(maxsize=16)
def _token_index(tokens: int, device: torch.device) -> torch.Tensor:
    return torch.linspace(0, tokens - 1, FEATURE_TOKENS, device=device).round().long()


class InputTracker:
    """Per (block, unit): the previous input, the input at the last compute, steps since that compute."""

    def __init__(self):
        self.reset()

    def reset(self):
        self._prev: dict = {}
        self._last: dict = {}
        self._since: dict = {}

    def before(self, key, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """The ``TRACKED`` features of this input (per row); call ``after`` once the decision is known."""
        x = flat_rows(_token_subsample(inputs))
        prev, last = self._prev.get(key, x), self._last.get(key, x)
        since = self._since.get(key, torch.zeros(x.shape[0], device=x.device))
        self._pending = (key, x, last, since)
        return {"in_l1": x.abs().mean(1), "in_l2": x.pow(2).mean(1).sqrt(), "in_rel_l1_prev": rel_l1_rows(x, prev),
                "in_cos_prev": cos_rows(x, prev), "in_rel_l1_last": rel_l1_rows(x, last),
                "steps_since_compute": since.clone()}

    def after(self, computed: torch.Tensor) -> None:
        key, x, last, since = self._pending
        computed = computed.to(x.device)
        self._prev[key] = x
        self._last[key] = torch.where(computed[:, None], x, last)
        self._since[key] = torch.where(computed, torch.zeros_like(since), since + 1)


def computed_rows(decision, has_cache: bool, rows: int) -> torch.Tensor:
    """The rows a unit actually computes, given a policy decision (the runtime computes all without cache)."""
    if not has_cache:
        return torch.ones(rows, dtype=torch.bool)
    if torch.is_tensor(decision):
        return decision.detach().to("cpu", torch.bool).reshape(-1)
    return torch.full((rows,), bool(decision))


UNIT_KINDS = ("attn1", "ff", "block")  # the one-hot unit-type features (is_attn1, is_ff, is_block)


def position_features(step, num_steps: int | None, block, num_blocks: int, is_unit) -> dict:
    """``progress``, ``depth`` and the unit-type one-hots: where a cell is in the run. The one place they are computed,
    for a unit query (scalars), a step's cells at once (tensors) and trace columns (arrays) alike; ``is_unit(kind)``
    says, in the same container, whether each cell is a unit of that kind. ``progress`` is NaN when the step count
    is unknown (a bare denoiser called by hand)."""
    return {"progress": step / max(1, num_steps - 1) if num_steps else math.nan,
            "depth": block / max(1, num_blocks - 1), **{f"is_{kind}": is_unit(kind) for kind in UNIT_KINDS}}


def context_features(query, rows: int, cfg_branch: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The features given by where the unit is (step, block, unit type, branch) rather than by its input."""
    full = lambda v: torch.full((rows,), float(v))  # noqa: E731
    where = position_features(query.step, query.num_steps, query.block, query.num_blocks, lambda k: query.unit == k)
    return {"log_snr": full(math.nan if query.log_snr is None else query.log_snr),
            **{name: full(value) for name, value in where.items()},
            "cfg_branch": cfg_branch.float().cpu() if cfg_branch is not None else torch.zeros(rows)}
