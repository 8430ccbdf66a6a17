"""The trace recorder: the cache runtime with a recording policy attached, not a second sampler loop.

``TraceRecorder`` wraps the policy being traced (``none`` by default): it passes every decision through
unchanged, so the cache state is exactly what that deployed policy sees, and records per (row, step, block,
unit) signals around each unit. With local probes on, after every model call it re-runs the model **from
each block onward** with one unit forced to reuse its last computed output (the units of a block are stacked
in one batch), and labels the row with the relative error of the model output that reuse causes. Families
with no single block input to restart from (UNets) rerun the whole call instead, the units before the
probed one returning their outputs of the call: the same label, at the cost of the earlier non-unit layers.

Signals (one row per CFG row x step x block x unit; ``*_prev`` compare with the previous step, ``*_last``
with the unit's last computed step; at step 0 there is no previous value: changes are 0, cosines 1):

* available before the unit runs: ``timestep``, ``log_snr`` (noise schedule), ``in_l1``, ``in_l2``,
  ``in_rel_l1_prev``, ``in_cos_prev``, ``in_rel_l1_last``, ``entropy`` (entropy over ``log N`` of the block's
  self-attention, measured on this step's input where a recorded unit is one (a DiT's ``attn1``, a UNet's
  attention layers; NaN in blocks without); exact up to 64 tokens, else averaged over 64 evenly spaced query
  rows: see ``tests/test_recorder.py`` for its error on a 256-token model), ``steps_since_compute``;
* known after it: ``computed`` (under the traced policy), ``out_l1``, ``out_l2``, ``out_rel_l1_prev``,
  ``out_cos_prev``, ``out_rel_l1_last``, ``out_cos_last``, ``cka_prev`` (linear CKA with the previous
  step's output over the batch), ``log_snr_x0`` (from the step's predicted x0 and noise);
* label: ``impact_local`` (NaN where not probed: step 0, or probes off);
* chain labels (``chain`` > 1): ``impact_stale_s`` for s = 2 .. ``MAX_CHAIN``, the same relative error when the
  unit instead returns its output of step ``step - s``: what the last of s consecutive reuses of a cache filled
  at ``step - s`` costs at this step, so a trace-trained policy can price chains of reuses (NaN where the run
  has no step ``step - s``, or chain probes are off). Each staleness is one more probe batch per block.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from diffusers.hooks import HookRegistry, ModelHook

from cqpolicy.models.adapters import adapter_for, cache_blocks
from cqpolicy.policies.families.partition import linear_cka
from cqpolicy.policies.base import DelegatingPolicy, Policy, UnitQuery
from cqpolicy.policies.features import InputTracker, computed_rows, cos_rows, flat_rows, rel_l1_rows
from cqpolicy.policies.signals import self_attention_entropy

CAPTURE_HOOK = "cqpolicy_capture"
PRE_COLUMNS = ("timestep", "log_snr", "in_l1", "in_l2", "in_rel_l1_prev", "in_cos_prev", "in_rel_l1_last",
               "entropy", "steps_since_compute")
POST_COLUMNS = ("computed", "out_l1", "out_l2", "out_rel_l1_prev", "out_cos_prev", "out_rel_l1_last",
                "out_cos_last", "cka_prev", "log_snr_x0")
MAX_CHAIN = 8
CHAIN_COLUMNS = tuple(f"impact_stale_{s}" for s in range(2, MAX_CHAIN + 1))
LABEL_COLUMNS = ("impact_local",) + CHAIN_COLUMNS
CKA_MAX_SAMPLES = 1024




def _batch_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between two [rows, tokens, width] outputs, tokens x rows as samples (subsampled)."""
    a, b = x.float().reshape(-1, x.shape[-1]), y.float().reshape(-1, y.shape[-1])
    if a.shape[0] > CKA_MAX_SAMPLES:
        idx = torch.linspace(0, a.shape[0] - 1, CKA_MAX_SAMPLES, device=a.device).round().long()
        a, b = a[idx], b[idx]
    return linear_cka(a, b)


class _CaptureHook(ModelHook):
    """Keeps each block's input (``block`` = its index), or the model call's (``block`` = None), of the
    current call: probes restart from there."""

    def __init__(self, recorder: "TraceRecorder", block: int | None):
        super().__init__()
        self.recorder, self.block = recorder, block

    def pre_forward(self, module, *args, **kwargs):
        if not self.recorder._probing:
            adapter = self.recorder.adapter
            if self.block is None:
                self.recorder._call_inputs = adapter.call_inputs(args, kwargs)
            else:
                self.recorder._block_inputs[self.block] = adapter.block_input(args, kwargs)
        return args, kwargs


def _repeat(value, k: int):
    """``value`` stacked ``k`` times along the batch (scalars, 0-d tensors and None unchanged)."""
    if not torch.is_tensor(value) or value.ndim == 0:
        return value
    return value.repeat(k, *([1] * (value.ndim - 1)))


class TraceRecorder(DelegatingPolicy):
    """Records signals (and local impact labels) around ``record_units`` while ``inner`` decides."""

    name = "recorder"

    def __init__(self, inner: Policy, record_units: tuple[str, ...], local_probes: bool = True,
                 entropy_queries: int | None = 64, chain: int = 1):
        if not record_units:
            raise ValueError("the trace recorder needs units to record (the model adapter's default_units)")
        if not 1 <= chain <= MAX_CHAIN:
            raise ValueError(f"chain must lie in 1..{MAX_CHAIN} (the stalest cache probed), got {chain}")
        if chain > 1 and not local_probes:
            raise ValueError("chain labels are local probes: turn local probes on")
        self.chain = chain
        super().__init__(inner)
        self.record_units = tuple(record_units)
        self.units = tuple(dict.fromkeys((*record_units, *inner.units)))
        self.local_probes = local_probes
        self.entropy_queries = entropy_queries  # exact up to 64 tokens (fmnist-dit: 49); subsampled beyond
        self.records: list[dict[str, torch.Tensor | int | str]] = []
        self._probing = False
        self._block_inputs: dict[int, tuple] = {}
        self._call_inputs: tuple | None = None
        self._registries: list = []
        self.model = None
        self._clear()

    # -- hooks of our own, state per call -------------------------------------------------------------
    def attach(self, model):
        self.model, self.adapter = model, adapter_for(model)
        targets = enumerate(cache_blocks(model)) if self.adapter.restarts_at_blocks else [(None, model)]
        for i, module in targets:
            registry = HookRegistry.check_if_exists_or_initialize(module)
            registry.register_hook(_CaptureHook(self, i), CAPTURE_HOOK)
            self._registries.append(registry)
        super().attach(model)

    def detach(self, model):
        super().detach(model)
        for registry in self._registries:
            registry.remove_hook(CAPTURE_HOOK, recurse=False)
        self._registries.clear()

    def reset(self, num_steps, num_blocks):
        super().reset(num_steps, num_blocks)
        self._clear()

    def _clear(self):
        self._inputs = InputTracker()
        self._prev_out: dict = {}
        self._last_out: dict = {}  # last computed output per key, row by row: what a reuse would return
        self._history: dict = {}  # per key, its outputs of the last MAX_CHAIN steps, oldest first (chain probes)
        self._entropy: dict[int, torch.Tensor] = {}
        self._pending: dict = {}
        self._block_inputs = {}

    # -- the runtime's calls ---------------------------------------------------------------------------
    def decide(self, query: UnitQuery):
        decision = super().decide(query)
        if query.unit not in self.record_units:
            return decision
        key = (query.block, query.unit)
        rows = query.inputs.shape[0]
        computed = computed_rows(decision, query.has_cache, rows)
        if self.adapter.is_attention(query.module):  # the other units of the block take its entropy
            self._entropy[query.block] = self_attention_entropy(
                query.module, query.inputs, max_queries=self.entropy_queries).float().cpu()
        self._pending[key] = {
            **{k: v.cpu() for k, v in self._inputs.before(key, query.inputs).items()},
            "timestep": query.timestep, "log_snr": math.nan if query.log_snr is None else query.log_snr,
            "entropy": self._entropy.get(query.block, torch.full((rows,), math.nan)),
            "computed": computed, "candidate": self._last_out.get(key),  # the reuse a probe forces here
        }
        self._inputs.after(computed)
        return decision

    def observe(self, query: UnitQuery, output: torch.Tensor) -> None:
        super().observe(query, output)
        if query.unit in self.record_units:
            self._pending[query.block, query.unit]["out"] = output.detach()

    def reuse(self, query: UnitQuery, cached: torch.Tensor) -> torch.Tensor:
        value = super().reuse(query, cached)
        if query.unit in self.record_units:
            self._pending[query.block, query.unit].setdefault("out", value.detach())
        return value

    # -- after each model call -------------------------------------------------------------------------
    @torch.no_grad()
    def after_step(self, step: int, x_t: torch.Tensor, raw_output: torch.Tensor, channels: int) -> None:
        """Finish this step's records: output signals, x0 SNR, local probes."""
        eps = raw_output[:, :channels].float()
        log_snr_x0 = self._log_snr_x0(x_t.float(), eps)
        impacts = self._probe(step, raw_output[:, :channels].float(), channels) if self.local_probes else {}
        for key, rec in self._pending.items():
            out = rec.pop("out")
            candidate = rec.pop("candidate")
            flat = flat_rows(out)
            prev = flat_rows(self._prev_out.get(key, out))
            last = flat_rows(candidate) if candidate is not None else flat
            cka = _batch_cka(out, self._prev_out[key]) if key in self._prev_out else 1.0
            rows = flat.shape[0]
            rec.update({
                "out_l1": flat.abs().mean(1), "out_l2": flat.pow(2).mean(1).sqrt(),
                "out_rel_l1_prev": rel_l1_rows(flat, prev), "out_cos_prev": cos_rows(flat, prev),
                "out_rel_l1_last": rel_l1_rows(flat, last), "out_cos_last": cos_rows(flat, last),
                "cka_prev": torch.full((rows,), cka), "log_snr_x0": log_snr_x0,
                "impact_local": impacts.get(key, torch.full((rows,), math.nan)),
                "step": step, "block": key[0], "unit": key[1],
            })
            for s in range(2, MAX_CHAIN + 1):
                rec[f"impact_stale_{s}"] = impacts.get((*key, s), torch.full((rows,), math.nan))
            self.records.append(rec)
            self._prev_out[key] = out
            if self.chain > 1:
                self._history[key] = (self._history.get(key, []) + [out])[-MAX_CHAIN:]
            computed = rec["computed"].to(out.device)
            if key in self._last_out:
                view = (-1,) + (1,) * (out.ndim - 1)
                self._last_out[key] = torch.where(computed.view(view), out, self._last_out[key])
            else:
                self._last_out[key] = out
        self._pending = {}

    def _log_snr_x0(self, x_t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """log(alpha_bar |x0_hat|^2 / ((1 - alpha_bar) |eps_hat|^2)) per row, from this step's prediction."""
        from cqpolicy.runtime import active_runtime

        log_snr = active_runtime(self.model).log_snr
        if log_snr is None:
            return torch.full((x_t.shape[0],), math.nan)
        alpha_bar = 1.0 / (1.0 + math.exp(-log_snr))
        x_t = x_t[:, :eps.shape[1]]
        x0 = (x_t - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)
        signal = alpha_bar * flat_rows(x0).pow(2).sum(1)
        noise = (1 - alpha_bar) * flat_rows(eps).pow(2).sum(1)
        return (signal.clamp_min(1e-20) / noise.clamp_min(1e-20)).log().cpu()

    def _candidates(self, key) -> list[tuple[tuple, torch.Tensor]]:
        """What a probe of ``key`` forces: its last computed output (label key ``key``), and with chain probes
        its output of ``s`` steps ago (label key ``(*key, s)``) where the run has one."""
        found = []
        if self._pending[key]["candidate"] is not None:
            found.append((key, self._pending[key]["candidate"]))
        history = self._history.get(key, [])
        for s in range(2, min(self.chain, len(history)) + 1):
            found.append(((*key, s), history[-s]))
        return found

    def _probe(self, step: int, reference: torch.Tensor, channels: int) -> dict:
        """Per key: relative error of the model output when only that unit reuses (all rows at once); with chain
        probes also per (key, staleness)."""
        from cqpolicy.runtime import active_runtime

        runtime = active_runtime(self.model)
        impacts = {}
        ref = flat_rows(reference)
        restart = self.adapter.restarts_at_blocks
        for block in sorted({b for b, _ in self._pending}):
            probes = [(key, label, value) for key in ((block, u) for u in self.record_units
                                                      if (block, u) in self._pending)
                      for label, value in self._candidates(key)]
            if not probes:
                continue
            inputs = self._block_inputs[block] if restart else self._call_inputs
            k, rows = len(probes), inputs[0].shape[0]
            overrides = {}
            for i, (key, _, value) in enumerate(probes):  # one slice of the batch per probe
                mask = torch.zeros(k * rows, dtype=torch.bool)
                mask[i * rows:(i + 1) * rows] = True
                if key not in overrides:
                    overrides[key] = (_repeat(value, k), mask)
                else:  # the same unit at another staleness: its own slice of the forced values
                    held, held_mask = overrides[key]
                    held[i * rows:(i + 1) * rows] = value
                    overrides[key] = (held, held_mask | mask)
            if not restart:  # the units before this block return what they returned in the call
                every = torch.ones(k * rows, dtype=torch.bool)
                overrides.update({key: (_repeat(rec["out"], k), every) for key, rec in self._pending.items()
                                  if key[0] < block})
            repeated = tuple(_repeat(t, k) for t in inputs)
            self._probing = True
            try:
                with runtime.probing(overrides):
                    if restart:
                        out = self.adapter.forward_from_block(self.model, block, repeated)[:, :channels]
                    else:
                        out = self.adapter.forward_call(self.model, repeated)[:, :channels]
            finally:
                self._probing = False
            errors = (flat_rows(out).view(k, rows, -1) - ref).norm(dim=2) / ref.norm(dim=1).clamp_min(1e-12)
            for i, (_, label, _) in enumerate(probes):
                impacts[label] = errors[i].cpu()
        self._block_inputs, self._call_inputs = {}, None
        return impacts

    # -- results ---------------------------------------------------------------------------------------
    def take_records(self) -> list[dict]:
        records, self.records = self.records, []
        return records


def records_to_columns(records: list[dict], seeds: list[int], labels: list[int], cfg: bool) -> dict:
    """Flatten recorder records (per step x block x unit, one tensor entry per CFG row) into columns."""
    import numpy as np

    batch = len(seeds)
    branch_of = np.repeat([0, 1], batch) if cfg else np.zeros(batch, dtype=np.int64)
    sample_of = np.tile(np.arange(batch), 2 if cfg else 1)
    columns = defaultdict(list)
    for rec in records:
        rows = rec["in_l1"].shape[0]
        if rows != len(sample_of):
            raise ValueError(f"recorded {rows} rows for a batch of {batch} samples (cfg={cfg})")
        columns["seed"].append(np.asarray(seeds, dtype=np.int64)[sample_of])
        columns["cfg_branch"].append(branch_of.astype(np.int8))
        columns["class_label"].append(np.asarray(labels, dtype=np.int16)[sample_of])
        columns["step"].append(np.full(rows, rec["step"], dtype=np.int16))
        columns["block"].append(np.full(rows, rec["block"], dtype=np.int16))
        columns["unit"].append(np.full(rows, rec["unit"], dtype=object))
        for name in PRE_COLUMNS + POST_COLUMNS + LABEL_COLUMNS:
            value = rec[name]
            if torch.is_tensor(value):
                value = value.detach().float().cpu().numpy()
            columns[name].append(np.broadcast_to(np.asarray(value, dtype=np.float32), (rows,)))
    return {name: np.concatenate(parts) for name, parts in columns.items()}
