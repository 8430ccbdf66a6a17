"""``phased``: the non-uniform static schedule (phases, depth band, unit offsets, warm-up and tail)."""
import pytest

from cqpolicy.policies import make_policy
from cqpolicy.policies.base import UnitQuery


def decisions(spec, steps=20, blocks=4, units=("attn1", "ff")):
    policy = make_policy(spec)
    policy.reset(steps, blocks)
    return {(s, b, u): policy.decide(UnitQuery(s, steps, 0.0, b, u, blocks, None, True))
            for s in range(steps) for b in range(blocks) for u in units}


def computed_steps(table, block=0, unit="attn1"):
    return [s for (s, b, u), c in sorted(table.items()) if b == block and u == unit and c]


def test_equal_intervals_and_nothing_else_is_fora():
    for k in (2, 3, 5):
        fora = decisions(f"fora:interval={k}")
        assert decisions(f"phased:early={k}") == fora
        assert decisions(f"phased:early={k},late={k},split=0.0") == fora


def test_phases_warmup_tail_depth_and_offsets():
    table = decisions("phased:early=2,late=5,split=0.5,warmup=2,tail=3,unit=attn1+ff,offsets=0/1")
    # warm-up 0-1 computes, the early phase (from step 2) every 2 steps, the late phase refreshes at step 10
    # and then every 5, the last three steps compute
    assert computed_steps(table) == [0, 1, 2, 4, 6, 8, 10, 15, 17, 18, 19]
    assert computed_steps(table, unit="ff") == [0, 1, 2, 5, 8, 10, 16, 17, 18, 19]  # intervals 3 and 6
    deep = decisions("phased:early=2,late=2,depth=0.5,deep=2")
    assert computed_steps(deep, block=1) == list(range(0, 20, 2))
    assert computed_steps(deep, block=2) == list(range(0, 20, 4))  # blocks 2-3 are the deep band


def test_a_phased_schedule_is_static_and_carries_a_fitted_forecast(tiny_dit_dir, tmp_path):
    from cqpolicy.training.forecast import fit_forecast

    meta = fit_forecast(str(tiny_dit_dir), "phased:early=2,late=3,split=0.4,warmup=1", tmp_path / "f", steps=8,
                        samples=2, val_samples=1, order=2, batch_size=2, progress=False, track=False)
    assert make_policy("phased:early=1,late=1").static and meta["metrics"]["reused_cells"] > 0


@pytest.mark.parametrize("spec, message", [
    ("phased:early=0", "early must be at least 1"),
    ("phased:split=1.5", r"split must be in \[0, 1\]"),
    ("phased:tail=-1", "tail must be non-negative"),
    ("phased:unit=attn1+ff,offsets=1", "one entry per unit"),
    ("phased:unit=attn1,offsets=x", "non-negative ints"),
])
def test_bad_phased_specs_are_one_line_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        make_policy(spec)


def test_an_unknown_step_count_is_refused_where_the_phases_need_it():
    policy = make_policy("phased:early=2,late=4,split=0.5")
    policy.reset(None, 2)
    with pytest.raises(ValueError, match="step count is unknown"):
        policy.decide(UnitQuery(0, None, 0.0, 0, "attn1", 2, None, True))
