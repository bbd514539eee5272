"""Run parameters typed by the pipeline's own spec, and the times a schedule takes.

A value given on the command line is a string; KFP wants the type the pipeline declares
(``epochs=2`` an integer, ``source=2024`` a string), and the server reports a wrong one only
after the run was created. Typing here turns it into a one-line error naming the input.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from imgclf.errors import ConfigError


def pipeline_parameters(spec: Mapping[str, Any]) -> dict[str, str]:
    """``{name: parameterType}`` of a pipeline's inputs (a spec, or KFP's spec+platform wrap)."""
    if "root" not in spec and isinstance(spec.get("pipeline_spec"), Mapping):
        spec = spec["pipeline_spec"]
    params = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    return {name: str(d.get("parameterType", "")) for name, d in params.items()}


def _coerce_param(name: str, raw: str, kind: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"--param {name}={raw}: {name} is {kind}, expected {expected}")

    if kind == "STRING":
        return raw
    if kind == "NUMBER_INTEGER":
        try:
            return int(raw)
        except ValueError:
            raise bad("an integer") from None
    if kind == "NUMBER_DOUBLE":
        try:
            return float(raw)
        except ValueError:
            raise bad("a number") from None
    if kind == "BOOLEAN":
        lowered = raw.strip().lower()
        if lowered in ("true", "yes", "1"):
            return True
        if lowered in ("false", "no", "0"):
            return False
        raise bad("true or false")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise bad("YAML/JSON") from None
    if kind == "LIST" and not isinstance(value, list):
        raise bad("a list such as [a, b]")
    if kind == "STRUCT" and not isinstance(value, dict):
        raise bad("a mapping such as {a: 1}")
    return value


def parse_params(pairs: Sequence[str], spec: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Turn ``--param key=value`` flags into the run's parameter dict.

    With the pipeline's spec each value is converted to the declared input type (so
    ``epochs=2`` arrives as an integer and ``source=2024`` stays a string) and unknown names
    are refused, listing the pipeline's inputs. Without a spec values are read as YAML.
    """
    declared = pipeline_parameters(spec) if spec is not None else None
    params: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"--param {pair!r}: expected key=value")
        if declared is None:
            params[name] = yaml.safe_load(raw)
            continue
        if name not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise ConfigError(f"--param {name}: the pipeline has no such input (inputs: {known})")
        params[name] = _coerce_param(name, raw, declared[name])
    return params


def parse_timestamp(text: str, flag: str) -> str:
    """An ISO 8601 date/time as the RFC 3339 UTC string the API wants (naive means UTC)."""
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"{flag} {text!r}: expected an ISO 8601 time such as 2025-01-31T02:00:00Z"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
