"""Reuse policies behind one interface (``base.Policy``), named by spec strings ``NAME[:key=value,...]``."""
from cqpolicy.policies.base import Policy, UnitQuery
from cqpolicy.policies.registry import family_names, make_config, make_policy, parse_spec, spec_string

__all__ = ["Policy", "UnitQuery", "family_names", "make_config", "make_policy", "parse_spec", "spec_string"]
