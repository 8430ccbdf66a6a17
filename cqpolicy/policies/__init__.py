"""Reuse policies behind one interface, named by a spec string ``NAME[:key=value,...]``.

Only ``none`` (always compute) exists so far; the runtime issue adds the cache families.
"""
from __future__ import annotations

from dataclasses import dataclass, field

FAMILIES = ("none",)


@dataclass(frozen=True)
class PolicySpec:
    name: str
    params: dict = field(default_factory=dict)

    def __str__(self):
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.params.items())


def parse_policy_spec(text: str) -> PolicySpec:
    """Parse ``NAME[:key=value,...]``; unknown names or keys are a ``ValueError``."""
    name, _, rest = text.strip().partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"malformed policy option {item!r} in {text!r}; expected key=value")
        params[key.strip()] = value.strip()
    if name not in FAMILIES:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(FAMILIES)}")
    if name == "none" and params:
        raise ValueError(f"policy 'none' takes no options, got {', '.join(params)}")
    return PolicySpec(name, params)
