"""Exact MACs of every run: per-unit row counts x per-row MACs equal the FLOP counter on the same run."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from cqpolicy.evaluation.cost import PeakMemory, count_macs, measured_sample, model_costs
from cqpolicy.models import fmnist_dit
from cqpolicy.models.loading import LoadedModel
from cqpolicy.policies import make_policy
from cqpolicy.policies.base import Policy
from cqpolicy.runtime import enable
from cqpolicy.sampling import SampleSettings, sample

from conftest import tiny_fmnist_dit


def test_linear_macs_are_exact():
    layer = torch.nn.Linear(16, 8, bias=False)
    macs, _ = count_macs(lambda: layer(torch.randn(4, 16)))
    assert macs == 4 * 16 * 8


def test_attention_is_counted_under_the_math_backend():
    q = k = v = torch.randn(2, 3, 10, 8)  # batch, heads, tokens, head dim
    macs, _ = count_macs(lambda: F.scaled_dot_product_attention(q, k, v))
    assert macs >= 2 * (2 * 3 * 10 * 10 * 8)  # QK^T and AV


def test_dit_macs_scale_with_steps(tiny_dit_dir):
    from cqpolicy.models import load_model
    from cqpolicy.sampling import SampleSettings, sample

    model = load_model(str(tiny_dit_dir))
    macs = [count_macs(lambda s=s: sample(model, [0, 1], [0, 1], SampleSettings(steps=s), progress=False))[0]
            for s in (2, 4)]
    assert macs[0] > 0 and macs[1] == 2 * macs[0]


def test_peak_memory_sees_a_large_allocation():
    import mmap
    import time

    size = 64 * 1024 * 1024
    with PeakMemory() as mem:
        # fresh anonymous pages: a malloc'd block may reuse memory an earlier test freed, which is resident already
        block = mmap.mmap(-1, size)
        block.write(b"\1" * size)
        time.sleep(0.2)  # several polls, also on a loaded machine
        block.close()
    assert mem.peak_bytes > 32 * 1024 * 1024


class SomeRows(Policy):
    """Computes only the rows whose index has the step's parity: per-sample partial computes at every step."""

    name = "some-rows"

    def decide(self, query):
        rows = torch.arange(query.inputs.shape[0])
        return (rows + query.step + query.block) % 3 != 0


@pytest.fixture(scope="module")
def tiny():
    return LoadedModel("tiny", tiny_fmnist_dit(num_layers=3), dict(fmnist_dit.SCHEDULER_CONFIG))


def flop_counted(model, policy, labels, seeds, settings):
    with enable(model.transformer, policy, "fp16"):
        return count_macs(lambda: sample(model, labels, seeds, settings, progress=False))[0]


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("spec", ["none", "fora:interval=3", "fora:attn1_interval=4,ff_interval=2",
                                  "teacache:threshold=0.2", "fora:interval=2,unit=block", "some-rows"])
def test_runtime_counts_give_the_flop_counters_macs(tiny, spec, guidance):
    settings = SampleSettings(steps=7, guidance_scale=guidance, batch_size=3)  # 5 samples: batches of 3 and 2
    labels, seeds = [0, 1, 2, 3, 4], [11, 12, 13, 14, 15]
    make = (lambda: SomeRows()) if spec == "some-rows" else (lambda: make_policy(spec))
    run = measured_sample(tiny, make(), "fp16", labels, seeds, settings)
    assert run.macs_source == "runtime counts"
    assert run.macs == flop_counted(tiny, make(), labels, seeds, settings)
    plain = measured_sample(tiny, None, "fp16", labels, seeds, settings)
    assert plain.macs == count_macs(lambda: sample(tiny, labels, seeds, settings, progress=False))[0]
    if spec != "none":
        assert run.macs < plain.macs
    else:
        assert run.macs == plain.macs and torch.equal(run.images, plain.images)


def test_batch_dependent_decisions_are_counted_on_the_scored_batch(tiny):
    """TeaCache decides per batch: the same samples in other batches cost other MACs, each counted exactly."""
    labels, seeds = list(range(6)), list(range(100, 106))
    macs = {}
    for batch in (1, 6):
        settings = SampleSettings(steps=10, guidance_scale=3.0, batch_size=batch)
        macs[batch] = measured_sample(tiny, make_policy("teacache:threshold=0.3"), "fp16", labels, seeds,
                                      settings).macs
        assert macs[batch] == flop_counted(tiny, make_policy("teacache:threshold=0.3"), labels, seeds, settings)


def test_unit_costs_add_up(tiny):
    costs = model_costs(tiny, SampleSettings(steps=1, guidance_scale=3.0))
    for block in range(3):
        assert costs.unit_macs[block, "attn1"] + costs.unit_macs[block, "ff"] < costs.unit_macs[block, "block"]
    assert sum(costs.unit_macs[b, "block"] for b in range(3)) < costs.row_macs


def test_leaf_counts_of_a_plain_run_give_the_flop_counters_macs(tiny):
    """Block 0's timestep embedding also runs from outside block 0: rows are counted per call, not per block."""
    settings = SampleSettings(steps=3, guidance_scale=3.0, batch_size=2)
    labels, seeds = [0, 1, 2], [5, 6, 7]
    costs = model_costs(tiny, settings)
    assert costs.leaf_macs and all(v > 0 for v in costs.leaf_macs.values())
    with costs.leaf_counter(tiny.transformer, len(seeds)) as leaves:
        sample(tiny, labels, seeds, settings, progress=False)
    assert leaves["macs"] == count_macs(lambda: sample(tiny, labels, seeds, settings, progress=False))[0]


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("spec", [
    "diffusers-fbc:threshold=0.2", "diffusers-taylorseer:interval=3,warmup=1",
    pytest.param("cache-dit:threshold=0.9,fn=1,warmup=1",
                 marks=pytest.mark.skipif(importlib.util.find_spec("cache_dit") is None, reason="needs cache-dit")),
])
def test_peer_runs_are_counted_exactly_by_their_leaves(tiny, spec, guidance):
    """Peer hooks skip blocks and attention modules we do not hook: the leaf row counts see what really ran."""
    settings = SampleSettings(steps=7, guidance_scale=guidance, batch_size=3)
    labels, seeds = [0, 1, 2, 3, 4], [11, 12, 13, 14, 15]
    run = measured_sample(tiny, make_policy(spec), "fp16", labels, seeds, settings)
    assert run.macs_source == "leaf-module row counts"
    assert run.macs == flop_counted(tiny, make_policy(spec), labels, seeds, settings)
    assert run.macs < measured_sample(tiny, None, "fp16", labels, seeds, settings).macs


@pytest.mark.parametrize("order, per_element", [(1, 2 + 2 + 2 + 2), (2, 2 + 2 + 5 + 5)])
def test_a_policys_own_arithmetic_is_in_the_macs(tiny, order, per_element):
    """TaylorSeer's extrapolation is counted on top of what the model ran: against the same decisions with plain
    reuse, the difference is its multiply-adds per reused element (differences, then the series). Interval 3 with
    warmup 1 over 7 steps reuses at steps 2, 3 (two points known: first order) and 5, 6 (three: order 2 possible)."""
    from cqpolicy.policies.families.taylorseer import TaylorSeerPolicy

    class PlainReuse(TaylorSeerPolicy):
        def reuse(self, query, cached):
            return cached

    settings = SampleSettings(steps=7, guidance_scale=3.0, batch_size=3)
    labels, seeds = [0, 1, 2, 3, 4], [11, 12, 13, 14, 15]
    spec = f"taylorseer:interval=3,order={order}"
    seer = measured_sample(tiny, make_policy(spec), "fp16", labels, seeds, settings)
    plain = measured_sample(tiny, PlainReuse(make_policy(spec).config), "fp16", labels, seeds, settings)
    rows, tokens, width, cells = 2 * 5, 49, 16, 3 * 2  # CFG rows of 5 samples; 3 blocks x (attn1, ff)
    assert seer.macs - plain.macs == per_element * cells * rows * tokens * width
