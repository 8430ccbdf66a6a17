"""Short method names for tables, plots and grid titles: a policy spec without the options at their default.

``short_name("fora:interval=2,warmup=0,unit=attn1+ff")`` is ``fora:interval=2``: an option at its default is
dropped, and so is a unit option naming the units its family takes by default on some model family (``attn1+ff``
on a DiT, ``layer`` on a UNet: a unit list is valid on one model family only, so this is never ambiguous). An
artifact ``path`` is shortened to its folder name and long floats to 3 significant digits. Full specs stay in the
CSVs (column ``method``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from cqpolicy.policies.registry import make_config, parse_spec, policy_class

BASELINE = "baseline"


def short_name(spec: str) -> str:
    """``spec`` without the options at their default (the family's first option stays when nothing else does), a
    ``path`` shortened to its last folder and long floats to 3 significant digits; ``baseline`` reads
    ``plain model``. A spec no registered family parses is returned as it is."""
    if spec == BASELINE:
        return "plain model"
    try:
        name, params = parse_spec(spec)
        fields = dataclasses.fields(type(make_config(name, params)))
    except (ValueError, TypeError):
        return spec
    defaults = {f.name: f.default for f in fields}
    implied = _implied_units(name)
    kept = {k: v for k, v in params.items() if (defaults.get(k, dataclasses.MISSING) is dataclasses.MISSING
                                                or not _same(v, defaults[k]))
            and not (k in ("unit", "units") and defaults.get(k) == "" and v in implied)}
    if not kept and fields and fields[0].name in params:
        kept = {fields[0].name: params[fields[0].name]}
    return name + (":" + ",".join(f"{k}={_short_value(k, v)}" for k, v in kept.items()) if kept else "")


def _implied_units(family: str) -> set[str]:
    """The unit lists an empty unit option of ``family`` stands for, one per model family."""
    from cqpolicy.models.adapters import _ADAPTERS

    attribute = getattr(policy_class(family), "units_from", "default_units")
    return {"+".join(getattr(adapter, attribute)) for adapter in _ADAPTERS.values() if getattr(adapter, attribute)}


def _short_value(key: str, value: str) -> str:
    if key == "path":
        return Path(value).name
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.3g}" if "." in value and len(value) > 6 else value


def _same(text: str, default) -> bool:
    try:
        return type(default)(text) == default if not isinstance(default, bool) else text == str(default)
    except (TypeError, ValueError):
        return False
