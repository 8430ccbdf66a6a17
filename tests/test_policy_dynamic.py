"""Dynamic policy families (dqar, teacache, taylorseer) and the shared signal math they use."""
import math
from collections import Counter

import pytest
import torch

import cqpolicy
import cqpolicy.policies.families.dqar  # noqa: F401  (registers the families)
import cqpolicy.policies.families.fora  # noqa: F401
import cqpolicy.policies.families.none  # noqa: F401
import cqpolicy.policies.families.taylorseer  # noqa: F401
import cqpolicy.policies.families.teacache  # noqa: F401
from cqpolicy.models import load_model
from cqpolicy.policies import UnitQuery, make_policy
from cqpolicy.policies.families.dqar import SCHEDULES, layer_factor
from cqpolicy.policies.families.taylorseer import taylor_forecast
from cqpolicy.policies.signals import attention_entropy, relative_l1, self_attention_entropy
from cqpolicy.sampling import SampleSettings, sample

SETTINGS = SampleSettings(steps=6, guidance_scale=2.0)  # log-SNR per step: -6.99 -4.47 -2.45 -0.75 1.08 9.21
ROWS = 6  # 3 samples x 2 classifier-free-guidance halves
OPEN = "snr_low=-100,snr_high=100"  # a log-SNR window that allows every step


@pytest.fixture
def model(tiny_dit_dir):
    return load_model(str(tiny_dit_dir))


def run(model, labels=(1, 2, 3), seeds=(0, 1, 2)):
    return sample(model, list(labels), list(seeds), SETTINGS, progress=False)


def run_spec(model, spec):
    """Images, runtime counts and per-block reused rows (spied on the deciding unit) of one run."""
    policy = make_policy(spec)
    decide, per_block, decisions = policy.decide, Counter(), []

    def spy(query):
        decision = decide(query)
        decisions.append((query.step, query.block, query.unit, decision))
        if query.unit in ("attn1", "block") and query.has_cache:
            reused = int((~decision).sum()) if torch.is_tensor(decision) else (0 if decision else ROWS)
            per_block[query.block] += reused
        return decision

    policy.decide = spy
    with cqpolicy.enable(model.transformer, policy) as handle:
        images = run(model)
        counts = dict(handle.counts)
    return images, counts, per_block, decisions


def reused(counts, unit="attn1"):
    return counts.get((unit, "reused"), 0)


# ---------------------------------------------------------------------------------------------- signals
def test_entropy_of_uniform_attention_is_log_n_and_of_one_hot_is_zero():
    b, h, n, d = 2, 3, 10, 16
    q = torch.zeros(b, h, n, d)
    k = torch.randn(b, h, n, d)
    torch.testing.assert_close(attention_entropy(q, k), torch.full((b, h), math.log(n)))
    eye = torch.eye(n, d).expand(b, h, n, d)  # orthonormal keys; each query points hard at one key
    one_hot = attention_entropy(eye * 200.0, eye)
    assert one_hot.shape == (b, h) and float(one_hot.max()) < 1e-6
    # chunking (here one (batch, head) pair at a time) changes nothing
    q, k = torch.randn(b, h, n, d), torch.randn(b, h, 7, d)
    torch.testing.assert_close(attention_entropy(q, k, score_budget=1), attention_entropy(q, k))


def test_self_attention_entropy_matches_a_direct_softmax(model):
    attn = model.transformer.transformer_blocks[0].attn1
    x = torch.randn(3, 49, attn.to_q.in_features)
    q = attn.to_q(x).view(3, 49, attn.heads, -1).transpose(1, 2)
    k = attn.to_k(x).view(3, 49, attn.heads, -1).transpose(1, 2)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    expected = -(p * p.log()).sum(-1).mean(dim=(1, 2)) / math.log(49)
    got = self_attention_entropy(attn, x)
    torch.testing.assert_close(got, expected.detach())
    assert got.shape == (3,) and bool(((got > 0) & (got <= 1)).all())


def test_relative_l1():
    ref = torch.tensor([[1.0, -1.0], [2.0, 2.0]])
    cur = ref + torch.tensor([[0.5, 0.5], [0.0, 0.0]])
    assert float(relative_l1(cur, ref)) == pytest.approx(1.0 / 6.0)
    torch.testing.assert_close(relative_l1(cur, ref, dim=1), torch.tensor([0.5, 0.0]))
    assert float(relative_l1(ref, ref)) == 0.0


# ---------------------------------------------------------------------------------------------- shared
@pytest.mark.parametrize("spec", [f"dqar:entropy_threshold=2,warmup=1,{OPEN}",
                                  f"dqar:entropy_threshold=2,warmup=1,per_sample=true,{OPEN}",
                                  "teacache:threshold=1000", "taylorseer:order=2"])
def test_two_calls_in_a_row_equal_two_fresh_runtimes(model, spec):
    fresh = []
    for labels, seeds in (((1, 2, 3), (0, 1, 2)), ((7, 8), (10, 11))):
        with cqpolicy.enable(model.transformer, spec):
            fresh.append(run(model, labels, seeds))
    with cqpolicy.enable(model.transformer, spec) as handle:
        a = run(model, (1, 2, 3), (0, 1, 2))
        b = run(model, (7, 8), (10, 11))
        assert handle.reuse_ratio > 0
    assert torch.equal(a, fresh[0]) and torch.equal(b, fresh[1])


@pytest.mark.parametrize("spec, message", [
    ("dqar:entropy_threshold=-1", "entropy_threshold"), ("dqar:snr_low=3,snr_high=2", "snr_low <= snr_high"),
    ("dqar:warmup=-1", "warmup"), ("dqar:schedule=cosine", "unknown schedule"), ("dqar:max_reuse=-1", "max_reuse"),
    ("dqar:units=ff", "units must be one of"), ("dqar:per_sample=maybe", "not a valid bool"),
    ("teacache:threshold=-0.1", "threshold"), ("teacache:threshold=nan", "threshold"),
    ("teacache:max_reuse=-1", "max_reuse"), ("teacache:warmup=-2", "warmup"), ("teacache:unit=attn3", "unit must"),
    ("taylorseer:interval=0", "interval"), ("taylorseer:order=3", "order must be 1 or 2"),
    ("taylorseer:warmup=-1", "warmup"), ("taylorseer:units=attn1+attn1", "units must"),
])
def test_bad_configs_are_one_line_value_errors(spec, message):
    family = spec.partition(":")[0]
    with pytest.raises(ValueError, match=message) as info:
        make_policy(spec)
    assert "\n" not in str(info.value)
    if "not a valid" not in message:
        assert str(info.value).startswith(f"policy '{family}': ")


# ---------------------------------------------------------------------------------------------- dqar
def test_dqar_entropy_threshold(model):
    # the tiny random model's attention is near uniform (normalised entropy ~0.95-0.99)
    _, never, _, _ = run_spec(model, f"dqar:entropy_threshold=0,warmup=1,{OPEN}")
    _, often, _, _ = run_spec(model, f"dqar:entropy_threshold=2,warmup=1,{OPEN}")
    assert reused(never) == 0 and reused(often) > 0
    images, _, _, _ = run_spec(model, "dqar")  # defaults: 0.5 is far below these entropies: exact
    assert torch.equal(images, run(model))


def test_dqar_entropy_costs_macs_only_where_it_can_matter(model):
    from cqpolicy.evaluation.cost import count_macs

    macs = {}
    for spec in ("none", "dqar:entropy_threshold=0", "dqar:max_reuse=0", "dqar:warmup=6", "dqar:warmup=5", "dqar"):
        with cqpolicy.enable(model.transformer, spec) as handle:
            macs[spec], _ = count_macs(lambda: run(model))
            assert handle.reuse_ratio == 0.0
    # a gate that can never reuse measures nothing; otherwise each measurement costs q/k projections + q k^T
    assert macs["none"] == macs["dqar:entropy_threshold=0"] == macs["dqar:max_reuse=0"] == macs["dqar:warmup=6"]
    assert macs["none"] < macs["dqar:warmup=5"] < macs["dqar"]  # measured at step 4 only / at steps 1-4


def test_dqar_snr_window(model):
    base = "dqar:entropy_threshold=2,warmup=1,schedule=constant,max_reuse=10"
    _, default, _, _ = run_spec(model, base)  # [-5, 5]: steps 1-4 may reuse, step 5 (9.21) may not
    _, low, _, _ = run_spec(model, base + ",snr_low=-3")  # also excludes step 1 (-4.47)
    _, high, _, _ = run_spec(model, base + ",snr_high=100")  # also allows step 5
    assert (reused(low), reused(default), reused(high)) == (3 * 2 * ROWS, 4 * 2 * ROWS, 5 * 2 * ROWS)


def test_dqar_warmup(model):
    base = f"dqar:entropy_threshold=2,schedule=constant,max_reuse=10,{OPEN}"
    counts = [reused(run_spec(model, f"{base},warmup={w}")[1]) for w in (1, 3)]
    assert counts == [5 * 2 * ROWS, 3 * 2 * ROWS]


def test_dqar_schedule(model):
    assert [layer_factor(s, b, 3) for s in SCHEDULES for b in range(3)] == pytest.approx(
        [1, 1, 1, 0.5, 0.75, 1, 1, 0.75, 0.5, 0.25, 0.5, 1, 0, 1, 1])
    per_block = {}
    for threshold, schedule in ((0.99, "constant"), (0.99, "linear"), (0.99, "linear_reverse"),
                                (2.5, "linear"), (2.5, "exponential"), (4.5, "exponential"), (4.5, "step")):
        spec = f"dqar:entropy_threshold={threshold},schedule={schedule},warmup=1,max_reuse=10,{OPEN}"
        per_block[threshold, schedule] = run_spec(model, spec)[2]
        assert sum(per_block[threshold, schedule].values()) > 0
    # normalised entropies here are ~0.95-0.99, so 0.99 x 0.5 (or 2.5 x 0.25, or 0) blocks reuse
    assert per_block[0.99, "constant"][0] > 0 and per_block[0.99, "constant"][1] > 0
    assert per_block[0.99, "linear"][0] == 0 and per_block[0.99, "linear_reverse"][1] == 0
    assert per_block[2.5, "linear"][0] > 0 and per_block[2.5, "exponential"][0] == 0
    assert per_block[4.5, "exponential"][0] > 0 and per_block[4.5, "step"][0] == 0


def test_dqar_max_reuse(model):
    base = f"dqar:entropy_threshold=2,warmup=1,schedule=constant,{OPEN}"
    # steps 1-5 may reuse: a streak limit of 1 alternates reuse/compute, 3 computes once (at step 4)
    counts = [reused(run_spec(model, f"{base},max_reuse={m}")[1]) for m in (0, 1, 3, 10)]
    assert counts == [0, 3 * 2 * ROWS, 4 * 2 * ROWS, 5 * 2 * ROWS]


def test_dqar_units_ff_follows_attention(model):
    base = f"dqar:entropy_threshold=0.99,warmup=1,schedule=linear,{OPEN}"
    images_both, both, _, decisions = run_spec(model, base)
    images_attn, attn_only, _, _ = run_spec(model, base + ",units=attn1")
    assert reused(both, "ff") == reused(both) > 0
    attn = {(s, b): d for s, b, u, d in decisions if u == "attn1"}
    assert all(d == attn[s, b] for s, b, u, d in decisions if u == "ff")
    assert reused(attn_only) == reused(both) and ("ff", "reused") not in attn_only
    assert not torch.equal(images_both, images_attn)


def test_dqar_per_sample_returns_row_masks(model):
    # a threshold between the rows' entropies at block 0, step 0 splits the batch
    attn = model.transformer.transformer_blocks[0].attn1
    inputs = []
    hook = attn.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    run(model)
    hook.remove()
    rows = self_attention_entropy(attn, inputs[0]).sort().values
    threshold = float(rows[2] + rows[3]) / 2
    base = f"dqar:entropy_threshold={threshold},warmup=1,schedule=constant,max_reuse=1,{OPEN}"
    images_rows, per_row, _, decisions = run_spec(model, base + ",per_sample=true")
    images_batch, per_batch, _, batch_decisions = run_spec(model, base)
    masks = [d for s, b, u, d in decisions if torch.is_tensor(d)]
    assert masks and all(m.shape == (ROWS,) and m.dtype == torch.bool for m in masks)
    step1 = next(d for s, b, u, d in decisions if (s, b, u) == (1, 0, "attn1"))
    assert int(step1.sum()) == 3  # the three higher-entropy rows compute, the others reuse
    assert not any(torch.is_tensor(d) for *_, d in batch_decisions)
    assert per_row != per_batch and not torch.equal(images_rows, images_batch)


# ---------------------------------------------------------------------------------------------- teacache
def test_teacache_threshold(model):
    images, zero, per_block, _ = run_spec(model, "teacache:threshold=0")
    assert reused(zero, "block") == 0
    assert torch.equal(images, run_spec(model, "none")[0])  # bit-identical to `none`
    _, huge, per_block, _ = run_spec(model, "teacache:threshold=1000")  # steps 1-4 reuse, then max_reuse hits
    assert reused(huge, "block") == 4 * ROWS and per_block[0] == 0 and per_block[1] == 4 * ROWS
    _, mid, _, _ = run_spec(model, "teacache:threshold=1")  # block-0 input changes ~0.2-2 per step here
    assert 0 < reused(mid, "block") < 4 * ROWS


def test_teacache_max_reuse(model):
    counts = [reused(run_spec(model, f"teacache:threshold=1000,max_reuse={m}")[1], "block") for m in (0, 1, 4)]
    assert counts == [0, 3 * ROWS, 4 * ROWS]


def test_teacache_warmup(model):
    counts = [reused(run_spec(model, f"teacache:threshold=1000,warmup={w}")[1], "block") for w in (1, 3)]
    assert counts == [4 * ROWS, 3 * ROWS]


def test_teacache_unit_and_one_decision_per_step(model):
    images_block, block, _, _ = run_spec(model, "teacache:threshold=1000")
    images_units, units, _, decisions = run_spec(model, "teacache:threshold=1000,unit=attn1+ff")
    assert reused(units) == reused(units, "ff") == 4 * ROWS and ("block", "reused") not in units
    assert not torch.equal(images_block, images_units)
    for step in range(SETTINGS.steps):
        later = {d for s, b, u, d in decisions if s == step and b > 0}
        assert len(later) == 1  # every later block follows the step's decision
        assert all(d for s, b, u, d in decisions if s == step and b == 0)  # block 0 always computes


# ---------------------------------------------------------------------------------------------- taylorseer
def _query(step, block=0, unit="attn1", x=None):
    x = torch.zeros(2, 3, 4) if x is None else x
    return UnitQuery(step=step, num_steps=10, timestep=0.0, block=block, unit=unit, num_blocks=1, inputs=x,
                     has_cache=True)


def test_taylorseer_forecasts_linear_history_exactly():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    policy = make_policy("taylorseer:order=1")
    policy.reset(10, 1)
    for s in (0, 1, 4):  # unequal spacing, as warmup=1 + interval=3 leaves it
        policy.observe(_query(s), a + b * s)
    for s in (5, 6):
        torch.testing.assert_close(policy.reuse(_query(s), a + b * 4), a + b * s)
    # order 2 on an evenly spaced history: the paper's F + dF k / N + d2F k^2 / (2 N^2)
    f = {s: torch.randn(2, 3, 4) for s in (0, 3, 6)}
    policy = make_policy("taylorseer:order=2")
    for s in (0, 3, 6):
        policy.observe(_query(s), f[s])
    n, k = 3, 2
    expected = f[6] + (f[6] - f[3]) / n * k + (f[6] - 2 * f[3] + f[0]) / (2 * n * n) * k * k
    torch.testing.assert_close(policy.reuse(_query(8), f[6]), expected)
    # one stored output: plain reuse of the cached tensor
    assert torch.equal(taylor_forecast([(2, f[0])], 5, order=2, base=f[3]), f[3])
    policy.reset(10, 1)
    assert torch.equal(policy.reuse(_query(5), f[3]), f[3]) and policy.history_nbytes == 0


def test_taylorseer_interval(model):
    counts = [run_spec(model, f"taylorseer:interval={i}")[1] for i in (1, 2, 3)]
    assert [reused(c) for c in counts] == [0, 2 * 2 * ROWS, 3 * 2 * ROWS]  # warmup=1: steps 0,1 always compute


def test_taylorseer_order(model):
    one, counts_one, _, _ = run_spec(model, "taylorseer:order=1")
    two, counts_two, _, _ = run_spec(model, "taylorseer:order=2")  # step 5 has 3 points (0, 1, 4): quadratic
    assert counts_one == counts_two and not torch.equal(one, two)
    fora, counts_fora, _, _ = run_spec(model, "fora:interval=3,warmup=1")  # the same schedule, plain reuse
    assert counts_fora == counts_one and not torch.equal(one, fora)
    # with a single computed step there is nothing to extrapolate: exactly plain reuse
    assert torch.equal(run_spec(model, "taylorseer:interval=6,warmup=0")[0], run_spec(model, "fora:interval=6")[0])


def test_taylorseer_warmup(model):
    counts = [reused(run_spec(model, f"taylorseer:warmup={w}")[1]) for w in (0, 1, 3)]
    assert counts == [4 * 2 * ROWS, 3 * 2 * ROWS, 2 * 2 * ROWS]  # computed: 0,3 / 0,1,4 / 0,1,2,3


def test_taylorseer_units(model):
    images_default, default, _, _ = run_spec(model, "taylorseer")
    images_block, block, _, _ = run_spec(model, "taylorseer:units=block")
    assert reused(default) == reused(default, "ff") > 0 and ("block", "reused") not in default
    assert reused(block, "block") == 3 * 2 * ROWS and ("attn1", "reused") not in block
    assert not torch.equal(images_default, images_block)
