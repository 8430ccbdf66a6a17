"""``dqar``: reuse a block's attention (and its MLP) while that attention was confident (low entropy).

DQAR-style entropy gate: attention whose rows are peaked (low softmax entropy) changes little between
neighbouring steps, so its cached output is reused; diffuse attention is recomputed.

How a decision is made for block ``b`` at step ``s`` (unit ``attn1``):

* **When the entropy is measured.** Measuring needs the module's ``q`` and ``k`` (``to_q``/``to_k``
  projections plus ``q k^T``), which would defeat a skip if done at the step being skipped. So the entropy
  is measured in ``observe`` at the steps where ``attn1`` computes, from the very input it ran on, and the
  decision at the next steps uses the entropy of the *last computed* step. (This overhead is real and shows
  up in counted MACs; it is skipped where the value could never be consulted: before the last warmup
  step, at the last step, and in blocks that never reuse.) While a block reuses, its entropy is not
  re-measured, so ``max_reuse`` also bounds how stale the deciding entropy can get.
* **Normalised entropy** ``e``: mean over heads and query rows of ``-sum p log p`` of
  ``softmax(q k^T / sqrt(d))``, divided by ``log(N)`` for ``N`` tokens, so ``e`` is in ``[0, 1]``.
* **Threshold** ``entropy_threshold * w(b)`` with the layer schedule ``w`` (``d = b / (L - 1)`` for ``L``
  blocks, ``d = 1`` when ``L = 1``):

  - ``constant``: ``w = 1``;
  - ``linear``: ``w = 0.5 + 0.5 d`` (0.5x at block 0 up to 1x at the last block: deep blocks reuse more);
  - ``linear_reverse``: ``w = 1 - 0.5 d`` (1x at block 0 down to 0.5x at the last block);
  - ``exponential``: ``w = 0.25 ** (1 - d)`` (0.25x at block 0, rising geometrically to 1x at the last
    block: the shallow blocks stay strict longer than with ``linear``);
  - ``step``: ``w = 0`` for blocks ``b < L // 2`` (they never reuse), ``1`` for the deeper half.
* **Reuse** iff ``s >= warmup``, ``snr_low <= log_snr <= snr_high`` (an unknown log-SNR allows it),
  ``e < threshold`` and fewer than ``max_reuse`` consecutive reuses so far. Per batch, ``e`` is the mean
  over all rows (both classifier-free-guidance halves); with ``per_sample`` every row decides on its own
  entropy and streak, and the policy returns a row mask.
* **MLP follows attention.** With ``units=attn1+ff`` the ``ff`` of a block takes exactly the decision (bool
  or mask) its ``attn1`` took at the same step: a confident, reused attention output leaves the MLP input
  nearly unchanged too. With ``units=attn1`` the MLP always computes.

Reference: the DQAR attention-reuse gate as specified for this project (entropy-confidence gating of
attention reuse); no external reference implementation is reproduced line by line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cqpolicy.policies.base import Policy, UnitQuery
from cqpolicy.policies.registry import register
from cqpolicy.policies.signals import self_attention_entropy

SCHEDULES = ("constant", "linear", "linear_reverse", "exponential", "step")
UNIT_CHOICES = ("attn1", "attn1+ff")


def layer_factor(schedule: str, block: int, num_blocks: int) -> float:
    """The multiplier ``w(block)`` of the entropy threshold (see the module docstring)."""
    d = block / (num_blocks - 1) if num_blocks > 1 else 1.0
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 0.5 + 0.5 * d
    if schedule == "linear_reverse":
        return 1.0 - 0.5 * d
    if schedule == "exponential":
        return 0.25 ** (1.0 - d)
    if schedule == "step":
        return 1.0 if block >= num_blocks // 2 else 0.0
    raise ValueError(f"policy 'dqar': unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")


@dataclass(frozen=True)
class DqarConfig:
    entropy_threshold: float = 0.5  # reuse when normalised entropy (fraction of log N) < this x layer factor
    snr_low: float = -5.0  # reuse only at steps with log-SNR >= snr_low
    snr_high: float = 5.0  # ... and log-SNR <= snr_high
    warmup: int = 2  # the first `warmup` steps always compute
    schedule: str = "linear"  # layer schedule of the threshold: constant, linear, linear_reverse, exponential, step
    max_reuse: int = 3  # at most this many consecutive reuses per block (0: never reuse)
    units: str = "attn1+ff"  # attn1 (MLP always computes) or attn1+ff (MLP follows the attention decision)
    per_sample: bool = False  # decide per batch row (row mask) instead of once for the whole batch

    def __post_init__(self):
        if not math.isfinite(self.entropy_threshold) or self.entropy_threshold < 0:
            raise ValueError(f"policy 'dqar': entropy_threshold must be a finite non-negative number, "
                             f"got {self.entropy_threshold}")
        if math.isnan(self.snr_low) or math.isnan(self.snr_high) or self.snr_low > self.snr_high:
            raise ValueError(f"policy 'dqar': need snr_low <= snr_high, got snr_low={self.snr_low}, "
                             f"snr_high={self.snr_high}")
        if self.warmup < 0:
            raise ValueError(f"policy 'dqar': warmup must be non-negative, got {self.warmup}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"policy 'dqar': unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if self.max_reuse < 0:
            raise ValueError(f"policy 'dqar': max_reuse must be non-negative, got {self.max_reuse}")
        if self.units not in UNIT_CHOICES:
            raise ValueError(f"policy 'dqar': units must be one of {', '.join(UNIT_CHOICES)}, got {self.units!r}")


@register("dqar", DqarConfig)
class DqarPolicy(Policy):
    def __init__(self, config: DqarConfig = DqarConfig()):
        self.config = config
        self.units = tuple(config.units.split("+"))
        self.reset(None, 0)

    def reset(self, num_steps: int | None, num_blocks: int) -> None:
        self._entropy: dict[int, torch.Tensor] = {}  # block -> [rows] normalised entropy at its last compute
        self._streak: dict[int, torch.Tensor] = {}  # block -> [rows] consecutive reuses so far
        self._decision: dict[int, tuple[int, bool | torch.Tensor]] = {}  # block -> (step, attn1 decision)

    def decide(self, query: UnitQuery) -> bool | torch.Tensor:
        if query.unit == "ff":
            step, decision = self._decision.get(query.block, (None, True))
            return decision if step == query.step else True
        decision = self._decide_attention(query)
        self._decision[query.block] = (query.step, decision)
        rows = query.inputs.shape[0]
        streak = self._streak.get(query.block)
        if streak is None or streak.shape[0] != rows:
            streak = torch.zeros(rows, dtype=torch.long)
        computed = decision.cpu() if torch.is_tensor(decision) else torch.full((rows,), bool(decision))
        self._streak[query.block] = torch.where(computed, torch.zeros_like(streak), streak + 1)
        return decision

    def _decide_attention(self, query: UnitQuery) -> bool | torch.Tensor:
        cfg = self.config
        rows = query.inputs.shape[0]
        entropy = self._entropy.get(query.block)
        if query.step < cfg.warmup or not query.has_cache or entropy is None or entropy.shape[0] != rows:
            return True
        if query.log_snr is not None and not cfg.snr_low <= query.log_snr <= cfg.snr_high:
            return True
        threshold = cfg.entropy_threshold * layer_factor(cfg.schedule, query.block, query.num_blocks)
        streak = self._streak.get(query.block, torch.zeros(rows, dtype=torch.long))
        if cfg.per_sample:
            reuse = (entropy < threshold) & (streak < cfg.max_reuse)
            return ~reuse
        reuse = bool(entropy.mean() < threshold) and int(streak.max()) < cfg.max_reuse
        return not reuse

    def _entropy_can_matter(self, query: UnitQuery) -> bool:
        """Whether an entropy measured now could ever be consulted (else skip its q/k cost)."""
        cfg = self.config
        if cfg.max_reuse == 0 or cfg.entropy_threshold * layer_factor(cfg.schedule, query.block,
                                                                      query.num_blocks) <= 0:
            return False  # this block never reuses
        if query.step + 1 < cfg.warmup:
            return False  # the next step is warmup: it computes and measures again
        return query.num_steps is None or query.step + 1 < query.num_steps  # the last step has no successor

    def observe(self, query: UnitQuery, output: torch.Tensor) -> None:
        if query.unit != "attn1" or not self._entropy_can_matter(query):
            return
        x = query.inputs
        per_row = 2 * x.shape[-2] * x.shape[-1] ** 2 + x.shape[-2] ** 2 * x.shape[-1]  # q, k and q k^T
        _, decision = self._decision.get(query.block, (None, True))
        previous = self._entropy.get(query.block)
        if torch.is_tensor(decision) and previous is not None and previous.shape[0] == x.shape[0]:
            # per-sample partial compute: measure only the rows that ran (the others keep their last value)
            mask = decision.to(device=x.device, dtype=torch.bool)
            updated = previous.clone()
            updated[mask.cpu()] = self_attention_entropy(query.module, x[mask]).cpu()
            self._entropy[query.block] = updated
            self.executed_macs += int(mask.sum()) * per_row
        else:
            self._entropy[query.block] = self_attention_entropy(query.module, x).cpu()
            self.executed_macs += x.shape[0] * per_row
