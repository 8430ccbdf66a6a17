"""Policy specs ``NAME[:key=value,...]`` -> policy objects, through each family's config dataclass."""
from __future__ import annotations

import dataclasses
import typing

from cqpolicy.policies.base import Policy

_FAMILIES: dict[str, tuple[type, type]] = {}


def register(name: str, config_cls: type):
    """Class decorator: ``@register("fora", ForaConfig)`` on a Policy subclass taking ``config``."""

    def wrap(policy_cls):
        policy_cls.name = name
        _FAMILIES[name] = (config_cls, policy_cls)
        return policy_cls

    return wrap


def policy_class(name: str) -> type:
    """The Policy subclass registered as ``name`` (ValueError when none is)."""
    _load_families()
    if name not in _FAMILIES:
        raise ValueError(f"unknown policy {name!r}")
    return _FAMILIES[name][1]


def family_names() -> tuple[str, ...]:
    _load_families()
    return tuple(sorted(_FAMILIES))


def _convert(text: str, annotation, key: str, family: str):
    target = typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Union else annotation
    target = {"int": int, "float": float, "bool": bool, "str": str}.get(target, target) \
        if isinstance(target, str) else target
    try:
        if target is bool:
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return text.lower() in ("1", "true", "yes")
        return target(text)
    except (TypeError, ValueError):
        name = getattr(target, "__name__", str(target))
        raise ValueError(f"policy {family!r}: {key}={text!r} is not a valid {name}") from None


def parse_spec(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.strip().partition(":")
    params = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"malformed policy option {item!r} in {text!r}; expected key=value")
        params[key.strip()] = value.strip()
    return name.strip(), params


def make_config(name: str, params: dict):
    _load_families()
    if name not in _FAMILIES:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(sorted(_FAMILIES))}")
    config_cls, _ = _FAMILIES[name]
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ValueError(f"policy {name!r} has no option {unknown[0]!r}; options: "
                         f"{', '.join(fields) or '(none)'}")
    hints = typing.get_type_hints(config_cls)
    kwargs = {k: v if not isinstance(v, str) else _convert(v, hints[k], k, name) for k, v in params.items()}
    return config_cls(**kwargs)


def make_policy(spec: str | Policy) -> Policy:
    """Build a policy from a spec string such as ``fora:interval=3``."""
    if isinstance(spec, Policy):
        return spec
    name, params = parse_spec(spec)
    config = make_config(name, params)
    return _FAMILIES[name][1](config)


def spec_string(policy: Policy) -> str:
    """The full spec of ``policy``, every config field spelled out (what actually ran)."""
    config = getattr(policy, "config", None)
    if config is None or not dataclasses.fields(config):
        return policy.name
    return policy.name + ":" + ",".join(f"{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config))


def _load_families():
    # importing the family modules registers them
    import cqpolicy.policies.families  # noqa: F401
