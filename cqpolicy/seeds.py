"""Sample-seed roles: which noise each stage may see, defined once.

Sample ``i`` of a role draws its initial noise from seed ``start + i`` (``cqpolicy.sampling.initial_noise``),
so two stages see the same sample exactly when their seed ranges meet. Every role owns a disjoint range:

==============  ===========================  ==================================================================
role            seeds                        used by
==============  ===========================  ==================================================================
``test``        ``k * 1_000_000 + i``, k<10  bench / paper table replicate ``k`` (``--seed k * 1_000_000``)
``calibration`` ``10_000_000 + i``           SmoothCache / DPS / ReCaT calibration runs
``trace``       ``20_000_000 + i``           trace collection (the first traces of ``cqpolicy run``)
``retrain``     ``21_000_000 + i``           traces recorded under a learned policy, for retraining
``rollout``     ``22_000_000 + i``           gates trained through the sampler (train and validation rollouts)
``search``      ``30_000_000 + i``           Optuna trials
``selection``   ``40_000_000 + i``           model selection: guidance scale, training checkpoints
``display``     ``50_000_000 + i``           report pictures (sample grids, decision heatmaps); never scored
``validation``  ``60_000_000 + k * 100_000   bench validation replicate ``k``: variants and settings are chosen
                + i``, k<10                  on these, test replicates score only what was chosen
==============  ===========================  ==================================================================

Nothing learned, calibrated or searched ever sees a test seed: ``cqpolicy train`` refuses traces of test
seeds, ``cqpolicy search`` a space on test seeds, ``cqpolicy run`` a config whose ranges meet, and
``cqpolicy bench`` an artifact that records test seeds. A bench scores the replicates of one role (``test`` or
``validation``: ``replicate_start``), never both in one table.
"""
from __future__ import annotations

SPAN = 1_000_000  # seeds per role (and per test replicate)
TEST_REPLICATES = 10
STARTS = {"test": 0, "calibration": 10_000_000, "trace": 20_000_000, "retrain": 21_000_000,
          "rollout": 22_000_000, "search": 30_000_000, "selection": 40_000_000, "display": 50_000_000,
          "validation": 60_000_000}
ROLES = tuple(STARTS)
# the roles a bench scores, replicate k of each: samples start + k * span + i (span: samples per replicate)
REPLICATE_SPANS = {"test": SPAN, "validation": 100_000}


class SeedOverlapError(ValueError):
    """Two roles would see the same samples (one line)."""


def start(role: str) -> int:
    """The first sample seed of ``role``."""
    if role not in STARTS:
        raise ValueError(f"unknown seed role {role!r}; roles: {', '.join(ROLES)}")
    return STARTS[role]


def test_start(replicate: int) -> int:
    """The first sample seed of test replicate ``replicate`` (bench seed ``k`` means samples ``k * SPAN + i``)."""
    if not 0 <= int(replicate) < TEST_REPLICATES:
        raise ValueError(f"test replicate must lie in [0, {TEST_REPLICATES}), got {replicate}")
    return int(replicate) * SPAN


def replicate_start(role: str, replicate: int) -> int:
    """The first sample seed of bench replicate ``replicate`` of ``role`` (``test`` or ``validation``)."""
    if role not in REPLICATE_SPANS:
        raise ValueError(f"a bench scores replicates of {' or '.join(REPLICATE_SPANS)}, not {role!r}")
    if not 0 <= int(replicate) < TEST_REPLICATES:
        raise ValueError(f"{role} replicate must lie in [0, {TEST_REPLICATES}), got {replicate}")
    return STARTS[role] + int(replicate) * REPLICATE_SPANS[role]


def replicate_of(seed: int) -> tuple[str, int] | None:
    """``(role, k)`` when ``seed`` is the first seed of a bench replicate, else None."""
    for role, span in REPLICATE_SPANS.items():
        k, rest = divmod(int(seed) - STARTS[role], span)
        if rest == 0 and 0 <= k < TEST_REPLICATES:
            return role, k
    return None


def is_test_seed(seed: int) -> bool:
    return 0 <= int(seed) < TEST_REPLICATES * SPAN


def role_of(seed: int) -> str | None:
    """The role whose range holds ``seed`` (None outside every range)."""
    if is_test_seed(seed):
        return "test"
    for role, first in STARTS.items():
        if role != "test" and first <= int(seed) < first + SPAN:
            return role
    return None


def refuse_test_seeds(seeds, what: str) -> None:
    """One-line error when any of ``seeds`` is a test seed: ``what`` (traces, a search space) must not see them."""
    bad = sorted(int(s) for s in seeds if is_test_seed(int(s)))
    if bad:
        raise SeedOverlapError(f"{what} use test seeds ({bad[0]}{' ...' if len(bad) > 1 else ''}; test seeds are "
                               f"0 .. {TEST_REPLICATES * SPAN - 1}): learned, calibrated and searched settings must "
                               f"never see the bench's samples; use seeds from {start('trace')} (trace), "
                               f"{start('search')} (search), see cqpolicy/seeds.py")


def check_disjoint(uses: dict[str, list[tuple[int, int]]]) -> None:
    """``{role: [(first seed, count), ...]}``: refuse (one line) when ranges of two different roles meet, or a
    non-test role reaches into the test seeds."""
    spans = [(role, int(first), int(first) + int(count)) for role, ranges in uses.items()
             for first, count in ranges if int(count) > 0]
    for role, lo, hi in spans:
        if role != "test" and lo < TEST_REPLICATES * SPAN and hi > 0:
            raise SeedOverlapError(f"the {role} seeds {lo} .. {hi - 1} reach into the test seeds "
                                   f"(0 .. {TEST_REPLICATES * SPAN - 1})")
    for i, (role_a, lo_a, hi_a) in enumerate(spans):
        for role_b, lo_b, hi_b in spans[i + 1:]:
            if role_a != role_b and lo_a < hi_b and lo_b < hi_a:
                raise SeedOverlapError(f"the {role_a} seeds {lo_a} .. {hi_a - 1} meet the {role_b} seeds "
                                       f"{lo_b} .. {hi_b - 1}: roles must see disjoint samples")
