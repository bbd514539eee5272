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
    previous, canary = doc.get("previous"), doc.get("canary")
    print(
        f"{name}: alias {alias!r} -> version {doc['version']}"
        + (f" (previous: {previous})" if previous is not None else "")
        + (f", canary: version {canary['version']} at {canary['percent']}%" if canary else "")
    )


def _serve_change(
    args: argparse.Namespace,
    settings: config.RegistryConfig,
    reg: ModelRegistry,
    alias: str,
    before: dict[str, Any] | None,
    doc: dict[str, Any],
) -> None:
    """Render the InferenceService the alias record now asks for, write it (``--manifest``)
    and, in a cluster, apply it; if it never becomes Ready, put the alias record back."""
    from imgclf.errors import DeployError
    from imgclf.steps import deploy

    cfg = config.section_of(
        args.params_values, config.DeployConfig, "deploy", Path(args.params).name
    )
    registry = config.RegistryConfig(uri=settings.uri, model_name=args.name, alias=alias)
    canary = doc.get("canary") or {}
    version = int(canary.get("version") or doc["version"])
    manifest, _, _ = deploy.manifest_for(cfg, registry, reg, version, canary.get("percent"))
    if args.manifest:
        from imgclf.fsutil import write_text

        write_text(args.manifest, deploy.manifest_yaml(manifest))
        print(f"wrote {args.manifest}")
    if not deploy.should_apply(cfg, args.kubeconfig):
        print("no Kubernetes cluster configured (deploy.apply, kubeconfig): nothing applied")
        return
    try:
        applied = deploy.apply_manifest(cfg, manifest, args.kubeconfig)
    except DeployError:
        reg.restore_alias(args.name, alias, before)
        print(f"{args.name}: alias {alias!r} restored to version {(before or {}).get('version')}")
        raise
    print(f"InferenceService {cfg.namespace}/{args.name}: {applied['action']}, Ready")


def _promote(args: argparse.Namespace) -> int:
    settings, reg = _open(args)
    alias = args.alias or settings.alias
    before = reg.alias_doc(args.name, alias)
    if args.finish:
        if args.version is not None or args.canary is not None:
            raise config.ConfigError("promote --finish takes no version and no --canary")
        doc = reg.finish_canary(args.name, alias)
    elif args.version is None:
        raise config.ConfigError("promote: give the version to promote (or --finish)")
    elif args.canary is not None:
        if not 0 < args.canary < 100:
            raise config.ConfigError(f"--canary {args.canary}: expected a percentage 1..99")
        doc = reg.start_canary(args.name, args.version, args.canary, alias)
    else:
        doc = reg.promote(args.name, args.version, alias)
    _report_alias(args, args.name, alias, doc)
    _serve_change(args, settings, reg, alias, before, doc)
    return 0


def _rollback(args: argparse.Namespace) -> int:
    settings, reg = _open(args)
    alias = args.alias or settings.alias
    before = reg.alias_doc(args.name, alias)
    doc = reg.rollback(args.name, alias)
    _report_alias(args, args.name, alias, doc)
    _serve_change(args, settings, reg, alias, before, doc)
    return 0


def _add_serving(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kubeconfig", metavar="FILE", help="kubeconfig of the cluster to apply to "
        "(default: in-cluster account, $KUBECONFIG, ~/.kube/config; see deploy.apply)",
    )  # fmt: skip
    p.add_argument("--manifest", metavar="FILE", help="also write the InferenceService YAML here")


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

    p = sub.add_parser(
        "promote",
        help="point an alias (default: registry.alias) at a version, or start/finish a canary",
        description=(
            "Point an alias at a version and, in a cluster, apply its InferenceService. "
            "--canary 10 sends 10%% of the traffic to the version while the alias keeps the "
            "current one; --finish moves the alias (and all traffic) to the canary."
        ),
    )
    p.add_argument("name", help="model name")
    p.add_argument("version", type=int, nargs="?", help="version number (must be complete)")
    p.add_argument("--alias", help="alias to move (default: registry.alias, e.g. production)")
    p.add_argument("--canary", type=int, metavar="PERCENT", help="start a canary of VERSION")
    p.add_argument("--finish", action="store_true", help="move all traffic to the canary")
    _add_serving(p)
    _add_common(p)
    p.set_defaults(func=_promote)

    p = sub.add_parser(
        "rollback",
        help="move an alias back to its previous version (or drop its canary), and in a "
        "cluster re-apply that version's InferenceService",
    )
    p.add_argument("name", help="model name")
    p.add_argument("--alias", help="alias to move (default: registry.alias, e.g. production)")
    _add_serving(p)
    _add_common(p)
    p.set_defaults(func=_rollback)
