"""The networks a learned policy deploys (plain ``torch.nn``: deploying never imports Lightning or the trainer)."""
from __future__ import annotations

import math

import torch
from torch import nn


class ReuseMLP(nn.Module):
    """``in_features -> hidden -> hidden -> 1`` with SiLU; returns ``[rows, 1]`` predicted log impact.

    Normalised inputs are first clamped to the range the training split spanned (buffers ``low`` / ``high``,
    saved with the weights): the MLP never extrapolates, and a feature that was constant in training (e.g.
    ``steps_since_compute`` in traces that never reused) is held at its training value instead of reaching
    the net as a huge normalised number when it varies at run time.
    """

    def __init__(self, in_features: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 1))
        self.register_buffer("low", torch.full((in_features,), -math.inf))
        self.register_buffer("high", torch.full((in_features,), math.inf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.clamp(x, self.low, self.high))
