"""``learned``: deploy a policy artifact trained by ``cqpolicy train`` into the runtime.

* ``kind: mlp`` — the MLP predicts the harm of reusing each unit (log of the relative output error, weighted
  per step by how much of it reaches the final sample when the traces held downstream probes) from the
  runtime features of ``cqpolicy.policies.features`` (computed exactly as the trace recorder computed
  them); the unit reuses where the predicted harm is below ``threshold`` (default: the artifact's).
  With step-level features (the default of ``cqpolicy train``) one MLP call at the step's first unit
  decides every unit of the step, and each unit call only looks its decision up; with per-unit features
  every unit call computes its input features and runs the MLP.
  ``per_sample=true`` decides per CFG row (the unit then runs only for the rows that need it);
  otherwise one decision per batch: reuse only if every row is predicted safe. ``max_reuse=k`` makes a
  unit compute after k consecutive reuses (as TeaCache's cap does), whatever the MLP predicts.
  ``cumulative=true`` (step-level MLPs, meant for chain-label artifacts, ``train --chain``): a unit reuses while
  the predicted impacts of its current chain of reuses, this step's included, sum to less than ``threshold``, so
  a chain is priced as a whole rather than one stale step at a time (TeaCache's accumulated-distance rule, with
  the MLP's predictions in place of the input distance).
* ``kind: scheduler`` — a learned static step x block x unit table (an L2C-style router); ``max_reuse``
  caps its runs of consecutive reuses the same way.
* ``kind: gates`` — a budget-conditioned gate net trained through the sampler (``cqpolicy.training.rollout``):
  ``budget=b`` (the run's MACs as a fraction of the plain model's, inside the trained range) turns its scores
  for this run's steps into a static schedule in ``prepare`` (``cqpolicy.policies.gates.plan``). Keyed on
  log-SNR and progress, it deploys at any step count and scheduler.

The artifact must fit the model: its class, block count and weight hash (``cqpolicy.models.fingerprint``)
are checked in ``prepare``, and so are its step count and scheduler unless it is keyed on progress (an MLP
whose features are all runtime features: progress, log-SNR, staleness, inputs; see
``cqpolicy.policies.artifact.transfers_across_steps``); a scheduler table, indexed by step, never transfers.
A tampered weights file or a malformed ``policy.json`` is refused when loaded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cqpolicy.policies.base import Policy, UnitQuery
from cqpolicy.policies.features import (UNIT_KINDS, InputTracker, _token_subsample, computed_rows, context_features,
                                       cos_rows, flat_rows, is_step_level, position_features, rel_l1_rows)
from cqpolicy.policies.registry import register


@dataclass(frozen=True)
class LearnedConfig:
    path: str = ""  # policy artifact folder (policy.json + weights.safetensors)
    threshold: float = -1.0  # reuse where predicted impact < threshold; -1 = the artifact's default
    per_sample: bool = False  # decide per CFG row instead of per batch
    max_reuse: int = -1  # compute after this many consecutive reuses of a unit (-1: no cap)
    budget: float = -1.0  # gates: the run's MACs as a fraction of the plain model's (within the trained range)
    cumulative: bool = False  # mlp: reuse while the chain's summed predicted impact stays under the threshold

    def __post_init__(self):
        if self.max_reuse < -1:
            raise ValueError(f"policy 'learned': max_reuse must be -1 (no cap) or >= 0, got {self.max_reuse}")
        if self.threshold != -1.0 and not (self.threshold > 0 and math.isfinite(self.threshold)):
            raise ValueError(f"policy 'learned': threshold must be a positive number, got {self.threshold}")


ARTIFACT_KINDS: dict[str, type] = {}  # artifact kind -> the policy class that deploys it


def deploys(kind: str):
    """Class decorator: the ``LearnedPolicy`` subclass that deploys artifacts of ``kind``."""

    def wrap(cls):
        cls.kind = kind
        ARTIFACT_KINDS[kind] = cls
        return cls

    return wrap


@register("learned", LearnedConfig)
class LearnedPolicy(Policy):
    """``LearnedPolicy(config)`` loads the artifact and gives an instance of the class registered for its kind
    (``deploys``); what every kind shares (loading, the model and step checks, the family) lives here."""

    kind = ""

    def __new__(cls, config: LearnedConfig = LearnedConfig()):
        from cqpolicy.policies.artifact import load_artifact

        if not config.path:
            raise ValueError("policy 'learned' needs path=ARTIFACT_DIR")
        meta, tensors = load_artifact(config.path)
        kind_cls = ARTIFACT_KINDS.get(meta["kind"])
        if kind_cls is None:
            raise ValueError(f"policy 'learned': {config.path} is a {meta['kind']!r} artifact; `learned` deploys "
                             f"{', '.join(sorted(ARTIFACT_KINDS))} (forecasts: forecast:path=...)")
        if cls is not LearnedPolicy and not issubclass(kind_cls, cls):
            raise ValueError(f"policy artifact {config.path} is a {meta['kind']!r} artifact, not {cls.kind!r}")
        policy = super().__new__(kind_cls)
        policy._artifact = meta, tensors
        return policy

    def __init__(self, config: LearnedConfig = LearnedConfig()):
        from cqpolicy.policies.artifact import transfers_across_steps

        self.config = config
        self.meta, tensors = self._artifact
        del self._artifact
        self.units = tuple(self.meta["model"]["units"])
        if config.budget != -1.0 and self.kind != "gates":
            raise ValueError(f"policy 'learned': budget= applies to gates artifacts; {config.path} is a {self.kind}")
        if config.cumulative and self.kind != "mlp":
            raise ValueError(f"policy 'learned': cumulative=true applies to mlp artifacts; {config.path} is a "
                             f"{self.kind}")
        self.load(tensors)
        self.transfers = transfers_across_steps(self.meta)  # keyed on progress: fits other step counts
        self.reset(None, 0)

    def load(self, tensors: dict) -> None:
        """Build the deployed network or table from the artifact's tensors."""
        raise NotImplementedError

    @property
    def family(self) -> str:
        return "learned-intervals" if self.meta.get("fit") == "intervals" else f"learned-{self.kind}"

    def attach(self, model) -> None:
        from cqpolicy.policies.artifact import check_denoiser

        check_denoiser(self.meta, model, self.config.path)

    def prepare(self, model, settings) -> None:
        from cqpolicy.models.adapters import cache_blocks
        from cqpolicy.models.fingerprint import model_fingerprints
        from cqpolicy.policies.artifact import check_fits

        check_fits(self.meta, type(model.transformer).__name__, len(cache_blocks(model.transformer)),
                   settings.steps, settings.scheduler, source=self.config.path,
                   model_hashes=model_fingerprints(model), steps_transfer=self.transfers)

    def reset(self, num_steps, num_blocks) -> None:
        model = self.meta["model"]
        if num_steps is not None and num_steps != model["steps"] and not self.transfers:
            from cqpolicy.runtime import StepMismatchError

            raise StepMismatchError(f"policy artifact {self.config.path} was trained for {model['steps']} steps, "
                                    f"the run has {num_steps}")


@deploys("mlp")
class MLPPolicy(LearnedPolicy):
    """Reuse where the MLP's predicted harm is below the threshold (see the module doc)."""

    def load(self, tensors: dict) -> None:
        from cqpolicy.policies.networks import ReuseMLP

        config = self.config
        self.features = list(self.meta["features"])
        self.mlp = ReuseMLP(len(self.features), int(self.meta["hidden"]))
        try:
            self.mlp.load_state_dict({k.removeprefix("mlp."): v for k, v in tensors.items()})
        except RuntimeError:  # names or shapes that do not fit policy.json's features and hidden
            from cqpolicy.policies.artifact import ArtifactError

            raise ArtifactError(f"policy artifact {config.path}: its weights do not fit an MLP of "
                                f"{len(self.features)} features and {self.meta['hidden']} hidden units "
                                f"(a damaged or hand-edited policy.json)") from None
        self.mlp.eval().requires_grad_(False)
        self.mlp_macs = sum(m.in_features * m.out_features for m in self.mlp.modules()
                            if isinstance(m, torch.nn.Linear))  # per feature row
        self.mean = torch.tensor(self.meta["normalization"]["mean"], dtype=torch.float32)
        self.std = torch.tensor(self.meta["normalization"]["std"], dtype=torch.float32)
        threshold = self.meta["default_threshold"] if config.threshold == -1.0 else config.threshold
        self.threshold = threshold
        self.log_threshold = math.log(threshold + 1e-6)  # the MLP predicts log(impact + 1e-6)
        self.step_level = is_step_level(self.features)
        if config.cumulative and not self.step_level:
            raise ValueError(f"policy 'learned': cumulative=true needs an MLP on step-level features; "
                             f"{config.path} uses per-unit features")
        self.tracker = InputTracker()

    def reset(self, num_steps, num_blocks) -> None:
        super().reset(num_steps, num_blocks)
        self.tracker.reset()
        self._step = None  # step-level: the step decided, its decisions, what each unit computed
        self._decisions: list = []
        self._computed: dict[int, torch.Tensor | bool] = {}

    def _need_schedule(self, query: UnitQuery) -> None:
        """A one-line error where the features would be NaN: outside our sampler and a followed pipeline the step
        count and the noise schedule are unknown."""
        if ("progress" in self.features and not query.num_steps) or ("log_snr" in self.features
                                                                     and query.log_snr is None):
            raise ValueError(f"policy artifact {self.config.path} reads the step count and the noise schedule, which "
                             f"a bare denoiser does not give: enable it on the pipeline (cqpolicy.enable(pipe, ...)) "
                             f"or pass scheduler=")

    @torch.no_grad()
    def predict(self, query: UnitQuery) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted log impact per row and the rows' consecutive reuses so far (the tracker then holds the
        pending state for ``after``)."""
        self._need_schedule(query)
        rows = query.inputs.shape[0]
        values = {**context_features(query, rows, query.cfg_branch),
                  **{k: v.cpu() for k, v in self.tracker.before((query.block, query.unit), query.inputs).items()}}
        x = torch.stack([values[name] for name in self.features], dim=1)
        self.executed_macs += x.shape[0] * self.mlp_macs
        return self.mlp((x - self.mean) / self.std).squeeze(1), values["steps_since_compute"]

    # -- step-level MLP: one call per step -----------------------------------------------------------------
    @torch.no_grad()
    def _begin_step(self, query: UnitQuery) -> None:
        """At a step's first unit: fold in what each unit computed last step, read the model input, and run
        the MLP once for every (block, unit) x row."""
        if query.block != 0:  # its first unit's input is the step's model input (joint blocks: both streams)
            raise RuntimeError(f"policy 'learned': a step-level policy must see block 0 first in a step, got block "
                               f"{query.block}'s {query.unit}")
        self._need_schedule(query)
        units, blocks = len(self.units), query.num_blocks
        x = flat_rows(_token_subsample(query.inputs)).cpu()
        rows = x.shape[0]
        if self._step is None:  # the call's first step: nothing computed yet, no previous input
            self._since = torch.zeros(blocks * units, rows)
            self._cum = torch.zeros(rows)  # sum of the model input's relative changes up to this step
            self._cum_last = torch.zeros(blocks * units, rows)  # that sum when each unit last computed
            self._prev = x
            self._chain = torch.zeros(blocks * units, rows)  # cumulative: predicted impact of each current chain
            self._pending = self._chain
            self._cells = torch.arange(blocks).repeat_interleave(units).float()  # block of each (block, unit) cell
            self._kind_is = {k: torch.tensor([float(n == k) for n in self.units * blocks]) for k in UNIT_KINDS}
        else:
            done = [self._computed.get(k, False) for k in range(blocks * units)]
            if all(isinstance(d, bool) for d in done):  # per-batch decisions: one flag per unit, rows broadcast
                computed = torch.tensor(done)[:, None]
            else:
                computed = torch.stack([torch.as_tensor(d).expand(rows) for d in done])
            self._since = torch.where(computed, 0.0, self._since + 1)
            self._chain = torch.where(computed, 0.0, self._pending)
            self._cum_last = torch.where(computed, self._cum, self._cum_last)
        rel = rel_l1_rows(x, self._prev)
        self._cum = self._cum + rel
        branch = query.cfg_branch.float().cpu() if query.cfg_branch is not None else torch.zeros(rows)
        where = position_features(query.step, query.num_steps, self._cells, blocks, self._kind_is.__getitem__)
        values = {"log_snr": math.nan if query.log_snr is None else query.log_snr,
                  **{name: v[:, None] if torch.is_tensor(v) else v for name, v in where.items()},
                  "cfg_branch": branch, "model_in_l1": x.abs().mean(1), "model_in_l2": x.pow(2).mean(1).sqrt(),
                  "model_in_rel_l1_prev": rel, "model_in_cos_prev": cos_rows(x, self._prev),
                  "model_in_rel_l1_acc": self._cum - self._cum_last, "steps_since_compute": self._since}
        shape = (blocks * units, rows)
        features = torch.stack([torch.as_tensor(values[n], dtype=torch.float32).expand(shape) for n in self.features],
                               dim=2)
        harm = self.mlp((features - self.mean) / self.std).squeeze(2)
        self.executed_macs += features.shape[0] * features.shape[1] * self.mlp_macs
        if self.config.cumulative:
            self._pending = self._chain + (harm.exp() - 1e-6).clamp_min(0)  # the chain's cost if it reuses now
            safe = self._pending < self.threshold
        else:
            safe = harm < self.log_threshold
        if self.config.max_reuse >= 0:
            safe &= self._since < self.config.max_reuse
        self._decisions = list(~safe) if self.config.per_sample else (~safe.all(1)).tolist()
        self._prev, self._step, self._computed = x, query.step, {}

    def _decide_step_level(self, query: UnitQuery):  # a lookup: no no_grad context per unit call (it costs ~10 us)
        if query.step != self._step:
            self._begin_step(query)
        k = query.block * len(self.units) + self.units.index(query.unit)
        decision = self._decisions[k]
        self._computed[k] = decision if query.has_cache else True
        return decision

    def decide(self, query: UnitQuery):
        if self.step_level:
            return self._decide_step_level(query)
        harm, since = self.predict(query)
        safe = harm < self.log_threshold
        if self.config.max_reuse >= 0:  # bound staleness: the labels measure reuses of a recent output
            safe &= since < self.config.max_reuse
        decision = ~safe if self.config.per_sample else bool(not safe.all())
        self.tracker.after(computed_rows(decision, query.has_cache, len(safe)))
        return decision


@deploys("scheduler")
class SchedulerPolicy(LearnedPolicy):
    """A learned static step x block x unit table (an L2C-style router, or a fitted interval schedule)."""

    def load(self, tensors: dict) -> None:
        self.table = tensors["table"].bool()

    def reset(self, num_steps, num_blocks) -> None:
        super().reset(num_steps, num_blocks)
        self._run_length: dict = {}  # consecutive reuses per unit (the max_reuse cap)

    def decide(self, query: UnitQuery):
        key = (query.block, query.unit)
        compute = bool(self.table[query.step, query.block, self.units.index(query.unit)])
        if self.config.max_reuse >= 0 and self._run_length.get(key, 0) >= self.config.max_reuse:
            compute = True
        self._run_length[key] = 0 if compute or not query.has_cache else self._run_length.get(key, 0) + 1
        return compute


@deploys("gates")
class GatesPolicy(LearnedPolicy):
    """A budget-conditioned gate net; ``prepare`` turns it into this run's static schedule."""

    def load(self, tensors: dict) -> None:
        from cqpolicy.policies.gates import GateNet

        low, high = self.meta["budget_range"]
        if not low <= self.config.budget <= high:
            from cqpolicy.policies.artifact import ArtifactError

            given = "none given" if self.config.budget == -1.0 else f"got {self.config.budget:g}"
            raise ArtifactError(f"policy artifact {self.config.path}: gates need budget=B within the trained range "
                                f"[{low:g}, {high:g}] ({given})")
        self.gate_net = GateNet(int(self.meta["model"]["num_blocks"]) * len(self.units), int(self.meta["hidden"]))
        self.gate_net.load_state_dict({k.removeprefix("net."): v for k, v in tensors.items() if k.startswith("net.")})
        self.gate_net.eval().requires_grad_(False)
        self.unit_macs = tensors["unit_macs"].double()
        self.table = None  # the schedule at this budget, made in prepare for the run's steps and scheduler

    def _gate_table(self, model, settings) -> torch.Tensor:
        """The gates' hard schedule [steps, blocks, units] for this run's steps, scheduler and budget."""
        from cqpolicy.policies.gates import gate_inputs, plan
        from cqpolicy.sampling.sampler import step_log_snrs

        norm = self.meta["normalization"]
        with torch.no_grad():
            a, b = self.gate_net(gate_inputs(step_log_snrs(model, settings), self.config.budget, norm["mean"],
                                             norm["std"]))
            table, _, _ = plan(a, b, self.config.budget, float(self.meta["row_macs"]), self.unit_macs)
        return table.reshape(len(table), *self.unit_macs.shape)

    def prepare(self, model, settings) -> None:
        from cqpolicy.policies.gates import min_budget

        super().prepare(model, settings)
        floor = min_budget(int(settings.steps), float(self.meta["row_macs"]), self.unit_macs)
        if self.config.budget < floor:
            from cqpolicy.policies.artifact import ArtifactError

            raise ArtifactError(f"budget {self.config.budget:g} is below the least this model reaches at "
                                f"{settings.steps} steps ({floor:.3f})")
        self.table = self._gate_table(model, settings)

    def decide(self, query: UnitQuery):
        if self.table is None or (query.num_steps is not None and query.num_steps != len(self.table)):
            from cqpolicy.runtime import StepMismatchError

            raise StepMismatchError(f"policy artifact {self.config.path}: the gates' schedule was made for "
                                    f"{None if self.table is None else len(self.table)} steps (in prepare), the "
                                    f"run has {query.num_steps}")
        return bool(self.table[query.step, query.block, self.units.index(query.unit)])
