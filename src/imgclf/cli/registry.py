"""``imgclf registry list|show|promote|rollback``: inspect versions and move aliases by hand.

The deploy step promotes automatically; these commands are for people: see what is in the
registry, promote a version the gate rejected on purpose, or roll production back after a
bad release. The registry location defaults to ``registry.uri`` in params.yaml.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from imgclf import config
from imgclf.cli import add_params_flag
from imgclf.cli.output import format_table
from imgclf.registry import ModelRegistry, VersionInfo


def _add_common(p: argparse.ArgumentParser) -> None:
    add_params_flag(p, "registry section gives the defaults")
    p.add_argument(
        "--registry",
        metavar="URI",
        help="registry location (a directory or s3://bucket/prefix); default: registry.uri",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def registry_settings(args: argparse.Namespace) -> config.RegistryConfig:
    """The ``registry`` section of ``--params``, with ``--registry`` overriding its uri."""
    overrides = {"uri": args.registry} if getattr(args, "registry", None) else {}
    label = Path(args.params).name
    return config.section_of(
        args.params_values, config.RegistryConfig, "registry", label, overrides
    )


def _open(args: argparse.Namespace) -> tuple[config.RegistryConfig, ModelRegistry]:
    settings = registry_settings(args)
    return settings, ModelRegistry.open(settings.uri)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def _row(info: VersionInfo) -> list[str]:
    accuracy = "-" if info.accuracy is None else f"{info.accuracy:.4f}"
    dataset = (info.dataset_hash or "-")[:12]
    return [
        info.name,
        str(info.version),
        info.created_at,
        accuracy,
        dataset,
        ",".join(info.aliases) or "-",
    ]


def _list(args: argparse.Namespace) -> int:
    _, reg = _open(args)
    names = [args.model] if args.model else reg.models()
    versions = [info for name in names for info in reg.list_versions(name)]
    if args.json:
        _print_json([info.to_dict() for info in versions])
        return 0
    if not versions:
        what = f"model {args.model!r}" if args.model else "any model"
        print(f"no versions of {what} in registry {reg.uri}")
        return 0
    header = ["MODEL", "VERSION", "CREATED", "ACCURACY", "DATASET", "ALIASES"]
    print(format_table(header, [_row(info) for info in versions]))
    return 0


def _show(args: argparse.Namespace) -> int:
    _, reg = _open(args)
    info = reg.get(args.name, args.version)
    if args.json:
        _print_json(info.to_dict())
        return 0
    lineage = info.lineage
    fields = [
        ("model", info.name),
        ("version", str(info.version)),
        ("aliases", ", ".join(info.aliases) or "-"),
        ("created_at", info.created_at),
        ("registered_by", str(lineage.get("registered_by", "-"))),
        ("uri", info.uri),
        ("accuracy", "-" if info.accuracy is None else f"{info.accuracy:.4f}"),
        ("macro_f1", str(info.metrics.get("macro_f1", "-"))),
        ("architecture", str(lineage.get("architecture", "-"))),
        ("dataset_hash", str(info.dataset_hash or "-")),
        ("git_commit", str(lineage.get("git_commit") or "-")),
        ("model_sha256", str(info.model_sha256 or "-")),
        ("files", ", ".join(sorted(info.files))),
    ]
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        print(f"{key.ljust(width)}  {value}")
    return 0


def _report_alias(args: argparse.Namespace, name: str, alias: str, doc: dict[str, Any]) -> None:
    if args.json:
        _print_json({"model": name, "alias": alias, **doc})
        return
    previous = doc.get("previous")
    print(
        f"{name}: alias {alias!r} -> version {doc['version']}"
        + (f" (previous: {previous})" if previous is not None else "")
    )


def _promote(args: argparse.Namespace) -> int:
    settings, reg = _open(args)
    alias = args.alias or settings.alias
    doc = reg.promote(args.name, args.version, alias)
    _report_alias(args, args.name, alias, doc)
    return 0


def _rollback(args: argparse.Namespace) -> int:
    settings, reg = _open(args)
    alias = args.alias or settings.alias
    doc = reg.rollback(args.name, alias)
    _report_alias(args, args.name, alias, doc)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``imgclf registry <list|show|promote|rollback>``."""
    parser = subparsers.add_parser(
        "registry",
        help="list model versions, show one, promote or roll back an alias",
        description=(
            "Inspect model versions and move aliases by hand: promote a version on purpose, "
            "or roll an alias back after a bad release. The registry defaults to "
            "registry.uri in params.yaml."
        ),
    )
    sub = parser.add_subparsers(dest="registry_command", metavar="<action>", required=True)

    p = sub.add_parser("list", help="list complete versions with accuracy and aliases")
    p.add_argument("--model", metavar="NAME", help="only this model (default: every model)")
    _add_common(p)
    p.set_defaults(func=_list)

    p = sub.add_parser("show", help="metrics, lineage and files of one version")
    p.add_argument("name", help="model name")
    p.add_argument("version", type=int, help="version number")
    _add_common(p)
    p.set_defaults(func=_show)

    p = sub.add_parser("promote", help="point an alias (default: registry.alias) at a version")
    p.add_argument("name", help="model name")
    p.add_argument("version", type=int, help="version number (must be complete)")
    p.add_argument("--alias", help="alias to move (default: registry.alias, e.g. production)")
    _add_common(p)
    p.set_defaults(func=_promote)

    p = sub.add_parser(
        "rollback", help="move an alias back to its previous version (or the next older one)"
    )
    p.add_argument("name", help="model name")
    p.add_argument("--alias", help="alias to move (default: registry.alias, e.g. production)")
    _add_common(p)
    p.set_defaults(func=_rollback)
