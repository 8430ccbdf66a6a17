"""dps and recat: the exact partition DP, the feature similarities, and the calibrated policies on a tiny DiT."""
import itertools

import pytest
import torch

import cqpolicy
import cqpolicy.policies.families.dps  # noqa: F401  (registers "dps")
import cqpolicy.policies.families.partition as partition
import cqpolicy.policies.families.recat  # noqa: F401  (registers "recat")
from cqpolicy.models import load_model
from cqpolicy.policies import make_policy
from cqpolicy.policies.families.dps import rel_l1_distances
from cqpolicy.policies.families.partition import linear_cka, optimal_partition, partition_cost, rel_l1
from cqpolicy.policies.families.recat import cka_matrix, cka_samples
from cqpolicy.runtime import StepMismatchError
from cqpolicy.sampling import SampleSettings, sample

FAMILIES = ("dps", "recat")
LABELS, SEEDS = [1, 2, 3], [0, 1, 2]


def settings(steps=8, guidance_scale=2.0):
    return SampleSettings(steps=steps, guidance_scale=guidance_scale)


def prepared(model, spec, steps=8, **kw):
    policy = make_policy(spec)
    policy.prepare(model, settings(steps, **kw))
    return policy


def run(model, policy, steps=8, labels=LABELS, seeds=SEEDS):
    """Images and the runtime handle of one sampling call under ``policy`` (already prepared)."""
    with cqpolicy.enable(model.transformer, policy) as handle:
        images = sample(model, labels, seeds, settings(steps), progress=False)
    return images, handle


def lengths(starts, steps):
    return [e - s for s, e in zip(starts, list(starts[1:]) + [steps])]


# -- the dynamic programme ---------------------------------------------------------------------------------
def brute_force(distance, k, min_len=1, max_len=None):
    S = distance.shape[0]
    best = None
    for cut in itertools.combinations(range(1, S), k - 1):
        starts = [0, *cut]
        ls = lengths(starts, S)
        if min(ls) < min_len or (max_len is not None and max(ls) > max_len):
            continue
        cost = partition_cost(distance, starts)
        best = cost if best is None else min(best, cost)
    return best


def test_dp_equals_brute_force_on_random_matrices():
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for trial in range(60):
        S = int(torch.randint(1, 9, (1,), generator=gen))
        distance = torch.rand(S, S, generator=gen) * (1 + trial % 3)  # asymmetric on purpose
        for k in range(1, S + 1):
            for min_len, max_len in ((1, None), (2, None), (1, 2), (2, 3), (1, 3)):
                expected = brute_force(distance, k, min_len, max_len)
                if expected is None:
                    with pytest.raises(ValueError, match="no partition"):
                        optimal_partition(distance, k, min_len, max_len)
                    continue
                starts = optimal_partition(distance, k, min_len, max_len)
                ls = lengths(starts, S)
                assert starts[0] == 0 and len(starts) == k and starts == sorted(set(starts))
                assert min(ls) >= min_len and (max_len is None or max(ls) <= max_len)
                assert partition_cost(distance, starts) == pytest.approx(expected, rel=1e-9, abs=1e-12)
                checked += 1
    assert checked > 300


def test_dp_groups_follow_the_distances():
    # steps 0-2 alike, 3-5 alike, far apart: two groups split exactly there
    d = torch.ones(6, 6)
    d[:3, :3] = 0.01
    d[3:, 3:] = 0.01
    assert optimal_partition(d, 2) == [0, 3]
    assert optimal_partition(d, 6) == list(range(6))  # one group per step: nothing reused
    assert optimal_partition(d, 1) == [0]


def test_infeasible_bounds_and_bad_inputs_raise():
    d = torch.rand(10, 10)
    with pytest.raises(ValueError, match="no partition of 10 steps into 4 groups"):
        optimal_partition(d, 4, min_len=3)  # 4 x 3 > 10
    with pytest.raises(ValueError, match="no partition of 10 steps into 3 groups"):
        optimal_partition(d, 3, max_len=3)  # 3 x 3 < 10
    with pytest.raises(ValueError, match="no partition"):
        optimal_partition(d, 11)
    with pytest.raises(ValueError, match="max_len"):
        optimal_partition(d, 2, min_len=4, max_len=3)
    with pytest.raises(ValueError, match="square"):
        optimal_partition(torch.rand(4, 5), 2)
    with pytest.raises(ValueError, match="NaN"):
        optimal_partition(torch.full((3, 3), float("nan")), 2)


# -- similarities ------------------------------------------------------------------------------------------
def test_linear_cka_properties():
    gen = torch.Generator().manual_seed(1)
    for n, d in ((2000, 12), (20, 64)):  # feature-space and sample-space code paths
        x = torch.randn(n, d, generator=gen)
        y = torch.randn(n, d, generator=gen)
        assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-9)
        assert linear_cka(x, 3.7 * y) == pytest.approx(linear_cka(x, y), rel=1e-9)  # isotropic scaling
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
        assert linear_cka(x, x @ q + 5.0) == pytest.approx(1.0, abs=1e-9)  # rotation and shift
        # the definition: HSIC of centred linear kernels, normalised
        xc, yc = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
        kx, ky = xc @ xc.T, yc @ yc.T
        assert linear_cka(x, y) == pytest.approx(float((kx * ky).sum() / (kx.norm() * ky.norm())), rel=1e-9)
    x, y = torch.randn(2000, 12, generator=gen), torch.randn(2000, 12, generator=gen)
    assert linear_cka(x, y) < 0.05  # independent random features: nearly unrelated
    assert linear_cka(torch.ones(5, 3), x[:5]) == 0.0  # no variance: defined as 0
    with pytest.raises(ValueError, match="same n"):
        linear_cka(torch.randn(4, 2), torch.randn(5, 2))


def test_batched_distances_match_the_pairwise_definitions():
    gen = torch.Generator().manual_seed(2)
    feats = torch.randn(5, 3, 7, 6, generator=gen).cumsum(0)  # [steps, rows, tokens, width], drifting
    samples = cka_samples(feats)
    assert samples.shape == (5, 21, 6)
    cka = cka_matrix(samples)
    l1 = rel_l1_distances(feats)
    for i, j in itertools.product(range(5), repeat=2):
        assert float(cka[i, j]) == pytest.approx(linear_cka(samples[i], samples[j]), abs=1e-9)
        assert float(l1[i, j]) == pytest.approx(rel_l1(feats[i], feats[j]), rel=1e-9)
    assert rel_l1(torch.ones(4), torch.full((4,), 3.0)) == pytest.approx(2.0)
    # many samples: tokens are thinned to evenly spaced ones, the same at every step
    big = torch.randn(2, 4, 1000, 3, generator=gen)
    thinned = cka_samples(big, max_samples=400)
    assert thinned.shape == (2, 400, 3)
    assert torch.equal(thinned[0, :100], big[0, 0, torch.linspace(0, 999, 100).round().long()])


# -- the policies ------------------------------------------------------------------------------------------
@pytest.fixture
def model(tiny_dit_dir):
    return load_model(str(tiny_dit_dir))


@pytest.mark.parametrize("family", FAMILIES)
def test_config_validation(family):
    for bad, msg in (("groups=0", "groups"), ("min_len=0", "min_len"), ("max_len=-1", "max_len"),
                     ("min_len=3,max_len=2", "max_len"), ("units=attn3", "units"), ("units=ff+ff", "units"),
                     ("calibration_samples=0", "calibration_samples"), ("groups=x", "groups")):
        with pytest.raises(ValueError, match=f"^policy '{family}': .*{msg}"):
            make_policy(f"{family}:{bad}")
    assert make_policy(family).config.groups == 10


@pytest.mark.parametrize("family", FAMILIES)
def test_schedule_and_counts(model, family):
    policy = prepared(model, f"{family}:groups=3,calibration_samples=2")
    assert len(policy.starts) == 3 and policy.starts[0] == 0 and policy.distance.shape == (8, 8)
    assert policy.starts == optimal_partition(policy.distance, 3)
    _, handle = run(model, policy)
    rows = 2 * len(SEEDS) * 2  # CFG rows x blocks
    assert handle.counts["attn1", "computed"] == 3 * rows and handle.counts["ff", "reused"] == 5 * rows
    assert handle.reuse_ratio == pytest.approx(5 / 8)
    with pytest.raises(ValueError, match=f"^policy '{family}' at 6 steps: no partition"):
        prepared(model, f"{family}:groups=7", steps=6)


@pytest.mark.parametrize("family", FAMILIES)
def test_groups_equal_to_steps_is_exactly_none(model, family):
    policy = prepared(model, f"{family}:groups=6,calibration_samples=2", steps=6)
    images, handle = run(model, policy, steps=6)
    assert handle.reuse_ratio == 0.0
    reference, _ = run(model, make_policy("none"), steps=6)
    assert torch.equal(images, reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_field_groups(model, family):
    a, ha = run(model, prepared(model, f"{family}:groups=2,calibration_samples=2"))
    b, hb = run(model, prepared(model, f"{family}:groups=3,calibration_samples=2"))
    assert ha.reuse_ratio == pytest.approx(6 / 8) and hb.reuse_ratio == pytest.approx(5 / 8)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("field", ("min_len", "max_len"))
def test_length_bounds(model, family, field):
    free = prepared(model, f"{family}:groups=3,calibration_samples=2")
    ls = lengths(free.starts, 8)
    # a bound the unconstrained optimum violates (and 3 groups of 8 steps can meet)
    bound = min(ls) + 1 if field == "min_len" else max(ls) - 1
    assert 3 * bound <= 8 if field == "min_len" else 3 * bound >= 8
    bounded = prepared(model, f"{family}:groups=3,calibration_samples=2,{field}={bound}")
    new = lengths(bounded.starts, 8)
    assert bounded.starts != free.starts
    assert (min(new) >= bound) if field == "min_len" else (max(new) <= bound)
    # the bound costs distance: the free optimum is never worse
    assert partition_cost(free.distance, free.starts) <= partition_cost(free.distance, bounded.starts)
    assert not torch.equal(run(model, free)[0], run(model, bounded)[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_field_units(model, family):
    both, hb = run(model, prepared(model, f"{family}:groups=3,calibration_samples=2"))
    ff, hf = run(model, prepared(model, f"{family}:groups=3,calibration_samples=2,units=ff"))
    assert hb.counts["attn1", "reused"] > 0 and ("attn1", "reused") not in hf.counts
    assert hf.counts["ff", "reused"] > 0
    assert not torch.equal(both, ff)


@pytest.mark.parametrize("family,base,steps", (("dps", "groups=2", 6), ("recat", "groups=4,units=attn1", 8)))
def test_field_calibration_samples(model, family, base, steps):
    one = prepared(model, f"{family}:{base},calibration_samples=1", steps=steps)
    two = prepared(model, f"{family}:{base},calibration_samples=2", steps=steps)
    assert one.starts != two.starts
    assert not torch.equal(run(model, one, steps)[0], run(model, two, steps)[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_decide_before_prepare_errors(model, family):
    with pytest.raises(RuntimeError, match="prepare"):
        run(model, make_policy(f"{family}:groups=3"))


@pytest.mark.parametrize("family", FAMILIES)
def test_step_count_mismatch_and_recalibration(model, family, monkeypatch):
    calls = []
    original = partition.record_unit_outputs
    monkeypatch.setattr(partition, "record_unit_outputs", lambda *a, **k: calls.append(a[1]) or original(*a, **k))
    policy = prepared(model, f"{family}:groups=3,calibration_samples=2", steps=6)
    with pytest.raises(StepMismatchError, match="calibrated for 6 steps"):
        run(model, policy, steps=8)
    policy.prepare(model, settings(8))  # a new step count in prepare just recalibrates
    assert policy.calibrated_steps == 8 and policy.distance.shape == (8, 8)
    _, handle = run(model, policy, steps=8)
    assert handle.reuse_ratio == pytest.approx(5 / 8)
    policy.prepare(model, settings(6))  # cached per (steps, scheduler, guidance_scale): no new run
    policy.prepare(model, settings(6, guidance_scale=3.0))  # a new guidance scale: a new run
    assert [s.steps for s in calls] == [6, 8, 6] and calls[-1].guidance_scale == 3.0


@pytest.mark.parametrize("family", FAMILIES)
def test_two_calls_in_a_row_equal_two_fresh_runtimes(model, family):
    spec = f"{family}:groups=3,calibration_samples=2"
    calls = ((LABELS, SEEDS), ([7, 8], [10, 11]))
    fresh = [run(model, prepared(model, spec), labels=l, seeds=s)[0] for l, s in calls]
    policy = prepared(model, spec)
    with cqpolicy.enable(model.transformer, policy):
        again = [sample(model, l, s, settings(), progress=False) for l, s in calls]
    assert all(torch.equal(a, b) for a, b in zip(fresh, again))
