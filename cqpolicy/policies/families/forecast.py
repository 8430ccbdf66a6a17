"""``forecast``: a static schedule whose reused cells are *forecast* by a fitted linear predictor (L2P-style).

An artifact of kind ``forecast`` (``cqpolicy train forecast --schedule SPEC``) holds the schedule it was
fitted to (a step x block x unit compute table, recorded from ``SPEC``) and, for every (step, block, unit) the
schedule reuses, weights over that unit's last ``K`` computed outputs, newest first:

    f(s) ~ w_0 f(c_0) + w_1 f(c_1) + ... + w_{K-1} f(c_{K-1})

fitted in closed form (ridge towards plain reuse, ``w = [1, 0, ...]``) on the outputs of uncached runs over
calibration seeds. Plain reuse (``w = [1, 0, ...]``) and TaylorSeer's order-1 forecast
(``[1 + d, -d]`` with ``d = (s - c_0) / (c_0 - c_1)``) are points of this family; the fit picks the weights
per cell from data. ``f(c_0)`` is the runtime's cached tensor (so the cache format's loss is what the model
sees); older outputs are a history the policy holds (``state_nbytes``) in any cache format: float32 by default,
``history=fp16`` for half the memory, ``history=int8-token`` for a quarter (bounded: the cache's own codec).

With ``per_channel`` every channel of a reused cell has its own weights and a bias (``order=1``: a per-channel
scale and shift of the cached output, the form of CacheQuant's DEC), stored per (block, unit) as
``channel.<block>.<unit>``.

With ``verify=tau`` the schedule adapts per sample (verify, then forecast; SpeCa's idea): where the schedule reuses
the first block, that block computes anyway and each row's relative forecast error there, ``|y - f| / |y|`` (the
largest over the block's units; ``check=attn1``: that unit alone, a cheaper check), is checked; rows above ``tau``
compute every unit the schedule reuses at that step, the others take the forecast. A row that computed off the
schedule reuses that fresher output (plain reuse) until the schedule next computes the unit, since the weights were
fitted to the schedule's history. The check and the extra rows are counted in the MACs; a verifying run reads the
newest output from its own history (the runtime's cache also takes the off-schedule rows), so the cache format does
not touch it.

The table is indexed by step: the artifact deploys only at the step count and scheduler it was fitted for.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from cqpolicy.models.adapters import parse_units
from cqpolicy.policies.base import Policy, UnitQuery
from cqpolicy.policies.registry import register
from cqpolicy.runtime.cache_store import CacheFormat, quantize


@dataclass(frozen=True)
class ForecastConfig:
    path: str = ""  # forecast artifact folder (policy.json + weights.safetensors)
    history: str = "fp32"  # the format older computed outputs are held in: any cache format (fp16, int8-token, ...)
    verify: float = 0.0  # > 0: the first block checks the forecast per row; rows whose error exceeds it compute
    check: str = ""  # '+'-joined units of the first block that check ('': all of them); the rest follow the check

    def __post_init__(self):
        if not self.verify >= 0:
            raise ValueError(f"policy 'forecast': verify must be a non-negative relative error, got {self.verify}")
        parse_units(self.check, "forecast", "check")
        try:
            CacheFormat.parse(self.history)
        except ValueError:
            raise ValueError(f"policy 'forecast': history must be a cache format (fp32, fp16, bf16, int8, int4, "
                             f"optionally -token or -channel), got {self.history!r}") from None


@register("forecast", ForecastConfig)
class ForecastPolicy(Policy):
    def __init__(self, config: ForecastConfig = ForecastConfig()):
        from cqpolicy.policies.artifact import ArtifactError, load_artifact

        if not config.path:
            raise ValueError("policy 'forecast' needs path=ARTIFACT_DIR")
        self.config = config
        self.meta, tensors = load_artifact(config.path)
        if self.meta["kind"] != "forecast":
            raise ArtifactError(f"policy 'forecast': {config.path} is a {self.meta['kind']} artifact, not a forecast "
                                f"(deploy it with learned:path=...)")
        self.units = tuple(self.meta["model"]["units"])
        self.calibration_images = fit_images(self.meta)
        self.table = tensors["table"].bool()  # [steps, blocks, units]
        self.weights = tensors["weights"].float()  # [steps, blocks, units, K]
        self.order = self.weights.shape[-1]
        # the same as Python lists and a unit index: a decision and a forecast then cost no tensor indexing
        self._compute, self._w = self.table.tolist(), self.weights.tolist()
        self._unit = {u: i for i, u in enumerate(self.units)}
        self.history_format = CacheFormat.parse(config.history)
        self.check_units = parse_units(config.check, "forecast", "check") or self.units
        if config.verify and not set(self.check_units) <= set(self.units):
            raise ValueError(f"policy 'forecast': check {config.check!r} names units the artifact does not forecast "
                             f"({'+'.join(self.units)})")
        # per-channel fits (DEC): (block, unit) -> [steps, C, order + 1], the bias last; absent cells reuse plainly
        self.channel_dim = self.meta.get("channel_dim")
        self.by_channel = {(int(key.split(".")[1]), key.split(".")[2]): w.float()
                           for key, w in tensors.items() if key.startswith("channel.")}
        self.check_log: list[torch.Tensor] = []  # verify: per checked step, the rows that failed
        self.reset(None, 0)

    @property
    def family(self) -> str:  # a verifying forecast is a frontier of its own: does adaptivity beat the static one?
        return "learned-forecast-verified" if self.config.verify else "learned-forecast"

    def attach(self, model) -> None:
        from cqpolicy.policies.artifact import check_denoiser

        check_denoiser(self.meta, model, self.config.path)

    def prepare(self, model, settings) -> None:
        from cqpolicy.models.adapters import cache_blocks
        from cqpolicy.models.fingerprint import model_fingerprints
        from cqpolicy.policies.artifact import check_fits

        check_fits(self.meta, type(model.transformer).__name__, len(cache_blocks(model.transformer)),
                   settings.steps, settings.scheduler, source=self.config.path,
                   model_hashes=model_fingerprints(model))

    def reset(self, num_steps, num_blocks) -> None:
        steps = self.meta["model"]["steps"]
        if num_steps is not None and num_steps != steps:
            from cqpolicy.runtime import StepMismatchError

            raise StepMismatchError(f"forecast artifact {self.config.path} was fitted to a {steps}-step schedule, "
                                    f"the run has {num_steps} steps")
        self._history: dict[tuple[int, str], deque] = {}
        # verify: (block, unit) -> (rows that computed off the schedule, their outputs); the rows failing this step
        self._fresh: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._failed: tuple[int, torch.Tensor] | None = None

    @property
    def verified_share(self) -> float | None:
        """The share of checked (step, row) pairs whose forecast held, since the policy was made."""
        checked = sum(len(f) for f in self.check_log)
        return None if not checked else 1 - sum(int(f.sum()) for f in self.check_log) / checked

    def _scheduled(self, query: UnitQuery) -> bool:
        return self._compute[query.step][query.block][self._unit[query.unit]]

    def decide(self, query: UnitQuery):
        scheduled = self._scheduled(query)
        if scheduled or not self.config.verify:
            return scheduled
        if query.block == 0 and query.unit in self.check_units:
            return True  # the check
        if self._failed is not None and self._failed[0] == query.step:
            return self._failed[1]
        return False

    def observe(self, query: UnitQuery, output: torch.Tensor) -> None:
        key = (query.block, query.unit)
        if self.config.verify and not self._scheduled(query):
            self._observe_off_schedule(query, output)
            return
        self._fresh.pop(key, None)
        history = self._history.setdefault(key, deque(maxlen=self.order))
        # the newest output is the runtime's cache, but a verifying run's cache also takes off-schedule rows
        if self.order > 1 or self.config.verify:
            history.append(quantize(output.detach(), self.history_format))
        else:
            history.append(None)

    def _observe_off_schedule(self, query: UnitQuery, output: torch.Tensor) -> None:
        key = (query.block, query.unit)
        if query.block == 0 and query.unit in self.check_units:  # every row computed: does the forecast hold?
            predicted = self._forecast(query, _read(self._history[key][-1])).float().reshape(len(output), -1)
            y = output.detach().float().reshape(len(output), -1)
            self.executed_macs += 2 * y.numel()
            failed = (y - predicted).norm(dim=1) > self.config.verify * y.norm(dim=1)
            if self._failed is not None and self._failed[0] == query.step:  # another unit of the block: either fails
                self.check_log[-1] |= failed
            else:
                self.check_log.append(failed)
            self._failed = (query.step, self.check_log[-1])
            return
        rows = self._failed[1].to(output.device).reshape(-1, *[1] * (output.ndim - 1))
        old = self._fresh.get(key)
        if old is None:
            self._fresh[key] = (rows, output.detach().clone())
        else:
            self._fresh[key] = (rows | old[0], torch.where(rows, output.detach(), old[1]))

    def reuse(self, query: UnitQuery, cached: torch.Tensor) -> torch.Tensor:
        history = self._history.get((query.block, query.unit))
        if not history:
            return cached
        if not self.config.verify:
            return self._forecast(query, cached, in_place=True)  # the runtime's ``cached`` is a fresh tensor
        out = self._forecast(query, _read(history[-1]).to(cached.dtype))
        fresh = self._fresh.get((query.block, query.unit))
        if fresh is not None:  # rows that computed off the schedule reuse that newer output
            out = torch.where(fresh[0], fresh[1].to(out.dtype), out)
        return out

    def _forecast(self, query: UnitQuery, cached: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        """The fitted forecast for ``query``'s cell; ``cached`` is the newest computed output (``in_place``: a
        float32 tensor no one else holds, so the weighted sum accumulates into it rather than a new tensor)."""
        history = self._history[(query.block, query.unit)]
        inputs = [cached.float(), *(_read(history[-1 - j]).float()
                                    for j in range(1, min(self.order, len(history))))]
        if self.channel_dim is not None:
            by_channel = self.by_channel.get((query.block, query.unit))
            if by_channel is None:
                return cached
            self.executed_macs += (min(self.order, len(inputs)) + 1) * cached.numel()  # weights and the bias
            return forecast_by_channel(by_channel[query.step], inputs, self.channel_dim, self.order).to(cached.dtype)
        w = self._w[query.step][query.block][self._unit[query.unit]]
        self.executed_macs += len(inputs) * cached.numel()
        out = inputs[0].mul_(w[0]) if in_place and cached.dtype == torch.float32 else inputs[0] * w[0]
        for j in range(1, len(inputs)):
            out.add_(inputs[j], alpha=w[j])
        return out.to(cached.dtype)

    @property
    def state_nbytes(self) -> int:
        held = sum(v.nbytes for h in self._history.values() for v in h if v is not None)
        return held + sum(v.numel() * v.element_size() for _, v in self._fresh.values())


def _read(stored):
    """A held output as a tensor; float formats without a copy (the forecast only reads it)."""
    return stored.payload.view(stored.shape) if stored.format.is_float else stored.dequantize()


def fit_images(meta: dict) -> int:
    """Images the fit sampled uncached (teacher-forced fit and validation, each on-policy round): its calibration
    cost. Artifacts that predate ``sampled_images`` give it from their seed ranges, by the same count."""
    training = meta.get("training") or {}
    if "sampled_images" in training:
        return int(training["sampled_images"])
    fit, val = (int((training.get(key) or [0, 0])[1]) for key in ("calibration_seeds", "val_seeds"))
    return (2 + int(training.get("on_policy_rounds", 0))) * fit + 2 * val


def forecast_by_channel(w: torch.Tensor, history: list, dim: int, order: int) -> torch.Tensor:
    """``sum_j w[c, j] h_j + w[c, order]`` along channel axis ``dim``; ``w`` is [C, order + 1], history newest
    first."""
    shape = [1] * history[0].dim()
    shape[dim] = -1
    out = w[:, -1].reshape(shape).to(history[0].dtype)
    for j, h in enumerate(history[:order]):
        out = out + w[:, j].reshape(shape).to(h.dtype) * h
    return out
