"""benchmarks/research/forecast_schedules.py: the selection rules' frontier margin."""
import math

import pandas as pd
import pytest
from conftest import load_script


def test_the_margin_is_the_distance_to_the_interpolated_frontier_of_the_static_rows():
    script = load_script("forecast_schedules", "benchmarks/research")
    board = pd.DataFrame({"method": ["s2", "s4", "worse", "a", "fast"],
                          "macs_speedup": [2.0, 4.0, 3.0, 3.0, 5.0], "delta_fid": [0.2, 1.0, 2.0, 0.4, 0.1]})
    # the frontier: the plain model (1x, 0), s2 (2x, 0.2), s4 (4x, 1.0); "worse" is dominated and left out
    assert script.margin_to(board, "a", ["s2", "s4", "worse"]) == pytest.approx(0.4 - 0.6)
    assert script.margin_to(board, "s2", ["s2", "s4"]) == pytest.approx(0.0)
    assert math.isnan(script.margin_to(board, "fast", ["s2", "s4"]))  # beyond the frontier: unopposed
