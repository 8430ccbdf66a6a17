"""Optuna search over policy parameters and cache formats against the speedup-quality frontier."""
from cqpolicy.search.space import SearchSpace, SpaceError, load_space, parse_space, suggest

__all__ = ["SearchSpace", "SpaceError", "load_space", "parse_space", "suggest"]
