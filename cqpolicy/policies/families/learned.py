"""``learned``: deploy a policy artifact trained by ``cqpolicy train`` into the runtime.

* ``kind: mlp`` — the MLP predicts the harm of reusing each unit (log of the relative output error, weighted
  per step by how much of it reaches the final sample when the traces held downstream probes) from the
  runtime features of ``cqpolicy.policies.features`` (computed exactly as the trace recorder computed
  them); the unit reuses where the predicted harm is below ``threshold`` (default: the artifact's).
  ``per_sample=true`` decides per CFG row (the unit then runs only for the rows that need it);
  otherwise one decision per batch: reuse only if every row is predicted safe. ``max_reuse=k`` makes a
  unit compute after k consecutive reuses (as TeaCache's cap does), whatever the MLP predicts.
* ``kind: scheduler`` — a learned static step x block x unit table (an L2C-style router); ``max_reuse``
  caps its runs of consecutive reuses the same way.

The artifact must fit the model: its class, block count, step count and scheduler are checked in
``prepare``; a tampered weights file is refused when loaded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cqpolicy.policies.base import Policy, UnitQuery
from cqpolicy.policies.features import InputTracker, computed_rows, context_features
from cqpolicy.policies.registry import register


@dataclass(frozen=True)
class LearnedConfig:
    path: str = ""  # policy artifact folder (policy.json + weights.safetensors)
    threshold: float = -1.0  # reuse where predicted impact < threshold; -1 = the artifact's default
    per_sample: bool = False  # decide per CFG row instead of per batch
    max_reuse: int = -1  # compute after this many consecutive reuses of a unit (-1: no cap)

    def __post_init__(self):
        if self.max_reuse < -1:
            raise ValueError(f"policy 'learned': max_reuse must be -1 (no cap) or >= 0, got {self.max_reuse}")
        if self.threshold != -1.0 and not (self.threshold > 0 and math.isfinite(self.threshold)):
            raise ValueError(f"policy 'learned': threshold must be a positive number, got {self.threshold}")


@register("learned", LearnedConfig)
class LearnedPolicy(Policy):
    def __init__(self, config: LearnedConfig = LearnedConfig()):
        from cqpolicy.training.artifact import load_artifact

        if not config.path:
            raise ValueError("policy 'learned' needs path=ARTIFACT_DIR")
        self.config = config
        self.meta, tensors = load_artifact(config.path)
        self.kind = self.meta["kind"]
        self.units = tuple(self.meta["model"]["units"])
        if self.kind == "mlp":
            from cqpolicy.training.modules import ReuseMLP

            self.features = list(self.meta["features"])
            self.mlp = ReuseMLP(len(self.features), int(self.meta["hidden"]))
            self.mlp.load_state_dict({k.removeprefix("mlp."): v for k, v in tensors.items()})
            self.mlp.eval().requires_grad_(False)
            self.mean = torch.tensor(self.meta["normalization"]["mean"], dtype=torch.float32)
            self.std = torch.tensor(self.meta["normalization"]["std"], dtype=torch.float32)
            threshold = self.meta["default_threshold"] if config.threshold == -1.0 else config.threshold
            self.log_threshold = math.log(threshold + 1e-6)  # the MLP predicts log(impact + 1e-6)
        elif self.kind == "scheduler":
            self.table = tensors["table"].bool()
        else:
            raise ValueError(f"policy 'learned': unknown artifact kind {self.kind!r}")
        self.tracker = InputTracker()
        self._run_length: dict = {}

    def prepare(self, model, settings) -> None:
        from cqpolicy.models.adapters import transformer_blocks
        from cqpolicy.training.artifact import check_fits

        check_fits(self.meta, type(model.transformer).__name__, len(transformer_blocks(model.transformer)),
                   settings.steps, settings.scheduler)

    def reset(self, num_steps, num_blocks) -> None:
        model = self.meta["model"]
        if num_steps is not None and num_steps != model["steps"]:
            from cqpolicy.runtime import StepMismatchError

            raise StepMismatchError(f"policy artifact {self.config.path} was trained for {model['steps']} steps, "
                                    f"the run has {num_steps}")
        self.tracker.reset()
        self._run_length: dict = {}  # scheduler: consecutive reuses per unit

    @torch.no_grad()
    def predict(self, query: UnitQuery) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted log impact per row and the rows' consecutive reuses so far (the tracker then holds the
        pending state for ``after``)."""
        rows = query.inputs.shape[0]
        values = {**context_features(query, rows, query.cfg_branch),
                  **{k: v.cpu() for k, v in self.tracker.before((query.block, query.unit), query.inputs).items()}}
        x = torch.stack([values[name] for name in self.features], dim=1)
        return self.mlp((x - self.mean) / self.std).squeeze(1), values["steps_since_compute"]

    def decide(self, query: UnitQuery):
        if self.kind == "scheduler":
            key = (query.block, query.unit)
            compute = bool(self.table[query.step, query.block, self.units.index(query.unit)])
            if self.config.max_reuse >= 0 and self._run_length.get(key, 0) >= self.config.max_reuse:
                compute = True
            self._run_length[key] = 0 if compute or not query.has_cache else self._run_length.get(key, 0) + 1
            return compute
        harm, since = self.predict(query)
        safe = harm < self.log_threshold
        if self.config.max_reuse >= 0:  # bound staleness: the labels measure reuses of a recent output
            safe &= since < self.config.max_reuse
        decision = ~safe if self.config.per_sample else bool(not safe.all())
        self.tracker.after(computed_rows(decision, query.has_cache, len(safe)))
        return decision
