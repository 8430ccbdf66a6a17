"""``smoothcache``: calibration on the tiny model, the greedy schedule, export to the published format."""
import math

import pytest
import torch

import cqpolicy
import cqpolicy.policies.families.schedule  # noqa: F401  (registers the families)
import cqpolicy.policies.families.smoothcache  # noqa: F401
from cqpolicy.models import load_model
from cqpolicy.policies import UnitQuery, make_policy
from cqpolicy.policies import calibration
from cqpolicy.policies.families.schedule import load_schedule
from cqpolicy.policies.families.smoothcache import greedy_schedule, relative_errors
from cqpolicy.runtime import StepMismatchError
from cqpolicy.sampling import SampleSettings, sample

SETTINGS = SampleSettings(steps=8, guidance_scale=2.0)


def run(model, settings=SETTINGS, labels=(1, 2), seeds=(0, 1)):
    return sample(model, list(labels), list(seeds), settings, progress=False)


def calibrated(model, spec, settings=SETTINGS):
    policy = make_policy(spec)
    policy.prepare(model, settings)
    return policy


def reused_steps(policy):
    return sum(v.count(0) for v in policy.schedule.values())


def test_relative_error_and_greedy_schedule_by_hand():
    steps = torch.arange(1.0, 7.0)  # output at step s is (s + 1) everywhere: err(i, i + d) = d / (i + 1)
    out = steps[:, None, None, None].expand(6, 2, 3, 4).clone()
    err = relative_errors({(0, "ff"): out, (1, "ff"): out}, ("ff",), lookahead=2)["ff"]
    assert err[0].tolist() == [1.0, 2.0] and err[3].tolist() == pytest.approx([1 / 4, 2 / 4])
    assert err[4, 0] == pytest.approx(1 / 5) and math.isinf(err[4, 1]) and math.isinf(err[5, 0])
    # compute 0; err(0,1)=1 > 0.3 -> compute 1; err(1,2)=0.5 -> compute 2; err(2,3)=1/3 -> compute 3;
    # err(3,4)=0.25, err(3,5)=0.5 -> reuse 4, compute 5 (also the last step)
    assert greedy_schedule(err, threshold=0.3, lookahead=2) == (1, 1, 1, 1, 0, 1)
    assert greedy_schedule(err, threshold=10, lookahead=2) == (1, 0, 0, 1, 0, 1)


def test_decide_before_prepare_is_a_clear_error(tiny_dit_dir):
    policy = make_policy("smoothcache")
    query = UnitQuery(step=0, num_steps=8, timestep=0.0, block=0, unit="ff", num_blocks=2,
                      inputs=torch.zeros(1), has_cache=False)
    with pytest.raises(RuntimeError, match="call policy.prepare\\(model, settings\\) before sampling"):
        policy.decide(query)
    model = load_model(str(tiny_dit_dir))
    with cqpolicy.enable(model.transformer, policy), pytest.raises(RuntimeError, match="not calibrated"):
        run(model)
    with pytest.raises(RuntimeError, match="not calibrated"):
        policy.export_schedule("x.json")


def test_threshold_is_monotone_and_changes_what_runs(tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    thresholds = (0.0, 0.05, 0.08, 0.1, 0.12, 0.15, 0.2, 0.3, 0.5, 1.0, 100.0)
    policies = [calibrated(model, f"smoothcache:threshold={t},calibration_samples=2") for t in thresholds]
    reused = [reused_steps(p) for p in policies]
    assert reused == sorted(reused) and reused[0] == 0 and reused[-1] > reused[3] > 0, reused
    for policy in policies:
        for entries in policy.schedule.values():
            assert entries[0] == 1 and entries[-1] == 1
    ratios, images = [], []
    for policy in (policies[0], policies[3]):
        with cqpolicy.enable(model.transformer, policy) as handle:
            images.append(run(model))
            ratios.append(handle.reuse_ratio)
    assert ratios[0] == 0.0 < ratios[1] and not torch.equal(images[0], images[1])


def test_lookahead_caps_consecutive_reuses(tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    expected = {1: (1, 0, 1, 0, 1, 0, 1, 1), 2: (1, 0, 0, 1, 0, 0, 1, 1), 3: (1, 0, 0, 0, 1, 0, 0, 1)}
    ratios = {}
    for lookahead, schedule in expected.items():
        # a threshold nothing exceeds: only the lookahead limits reuse
        policy = calibrated(model, f"smoothcache:threshold=1000,lookahead={lookahead},calibration_samples=1")
        assert set(policy.schedule.values()) == {schedule}
        with cqpolicy.enable(model.transformer, policy) as handle:
            run(model)
            ratios[lookahead] = handle.reuse_ratio
    assert ratios == {1: 3 / 8, 2: 4 / 8, 3: 5 / 8}
    # with a real threshold, no run of reuses is ever longer than the lookahead
    policy = calibrated(model, "smoothcache:threshold=0.2,lookahead=1,calibration_samples=2")
    for entries in policy.schedule.values():
        assert "00" not in "".join(map(str, entries))


def test_calibration_samples_change_the_schedule(tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    few, many = (calibrated(model, f"smoothcache:calibration_samples={n}") for n in (1, 6))
    assert not torch.equal(few.errors["ff"], many.errors["ff"])  # different calibration data
    # a threshold between the two calibrations' errors: the schedules differ
    cuts = sorted({float(v) for p in (few, many) for e in p.errors.values() for v in e.flatten() if v < 1e9})
    threshold = next(t for t in ((a + b) / 2 for a, b in zip(cuts, cuts[1:]))
                     if any(greedy_schedule(few.errors[u], t, 3) != greedy_schedule(many.errors[u], t, 3)
                            for u in ("attn1", "ff")))
    results = []
    for n in (1, 6):
        policy = calibrated(model, f"smoothcache:threshold={threshold!r},calibration_samples={n}")
        with cqpolicy.enable(model.transformer, policy) as handle:
            results.append((policy.schedule, dict(handle.counts), run(model)))
    assert results[0][0] != results[1][0] and not torch.equal(results[0][2], results[1][2])


def test_units_choose_what_is_cached(tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    counts = {}
    for units in ("attn1", "attn1+ff", "block"):
        policy = calibrated(model, f"smoothcache:threshold=1000,units={units},calibration_samples=1")
        assert policy.units == tuple(units.split("+")) and set(u for u, _ in policy.schedule) == set(policy.units)
        with cqpolicy.enable(model.transformer, policy) as handle:
            run(model)
            counts[units] = {u for u, _ in handle.counts}
    assert counts == {"attn1": {"attn1"}, "attn1+ff": {"attn1", "ff"}, "block": {"block"}}


def test_exported_schedule_gives_identical_images(tiny_dit_dir, tmp_path):
    model = load_model(str(tiny_dit_dir))
    policy = calibrated(model, "smoothcache:threshold=0.15,calibration_samples=2")
    assert reused_steps(policy) > 0
    path = policy.export_schedule(tmp_path / "calibrated.json")
    assert load_schedule(path) == policy.schedule
    with cqpolicy.enable(model.transformer, policy) as handle:
        ours, counts = run(model), dict(handle.counts)
    loaded = make_policy(f"schedule:path={path}")
    loaded.prepare(model, SETTINGS)
    with cqpolicy.enable(model.transformer, loaded) as handle:
        assert torch.equal(run(model), ours) and dict(handle.counts) == counts


def test_calibration_is_cached_per_setting(tiny_dit_dir, monkeypatch):
    model = load_model(str(tiny_dit_dir))
    calls = []
    record = calibration.record_unit_outputs

    def counting(model, settings, *args, **kwargs):
        calls.append((settings.steps, settings.scheduler, settings.guidance_scale))
        return record(model, settings, *args, **kwargs)

    monkeypatch.setattr(calibration, "record_unit_outputs", counting)
    policy = make_policy("smoothcache:calibration_samples=1")
    policy.prepare(model, SETTINGS)
    first = policy.schedule
    policy.prepare(model, SETTINGS)
    assert len(calls) == 1 and policy.schedule == first
    policy.prepare(model, SampleSettings(steps=6, guidance_scale=2.0))
    policy.prepare(model, SampleSettings(steps=8, guidance_scale=2.0, scheduler="dpm"))
    policy.prepare(model, SampleSettings(steps=8, guidance_scale=3.0))
    assert len(calls) == 4 and {len(v) for v in policy.schedule.values()} == {8}
    policy.prepare(model, SETTINGS)
    assert len(calls) == 4 and policy.schedule == first


def test_step_mismatch_after_calibration(tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    policy = calibrated(model, "smoothcache:calibration_samples=1")
    with cqpolicy.enable(model.transformer, policy), pytest.raises(StepMismatchError, match="8 steps"):
        run(model, SampleSettings(steps=6, guidance_scale=2.0))


def test_two_calls_in_a_row_equal_fresh_runtimes(tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    policy = calibrated(model, "smoothcache:threshold=0.15,calibration_samples=2")
    with cqpolicy.enable(model.transformer, policy):
        a, b = run(model), run(model, labels=(7,), seeds=(9,))
    fresh = []
    for labels, seeds in (((1, 2), (0, 1)), ((7,), (9,))):
        with cqpolicy.enable(model.transformer, calibrated(model, "smoothcache:threshold=0.15,calibration_samples=2")):
            fresh.append(run(model, labels=labels, seeds=seeds))
    assert torch.equal(a, fresh[0]) and torch.equal(b, fresh[1])


@pytest.mark.parametrize("spec, message", [
    ("smoothcache:threshold=-0.1", "threshold must be a non-negative number"),
    ("smoothcache:threshold=nan", "threshold must be a non-negative number"),
    ("smoothcache:threshold=abc", "not a valid float"),
    ("smoothcache:lookahead=0", "lookahead must be at least 1"),
    ("smoothcache:calibration_samples=0", "calibration_samples must be at least 1"),
    ("smoothcache:units=attn3", "units must be distinct .* got 'attn3'"),
    ("smoothcache:units=ff+ff", "must be distinct"),
])
def test_bad_config_values(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        make_policy(spec)
    assert str(info.value).startswith("policy 'smoothcache': ") and "\n" not in str(info.value)
