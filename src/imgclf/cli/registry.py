"""``imgclf registry list|show|promote|rollback|verify|gc``: inspect and look after versions.

The deploy step promotes automatically; these commands are for people: see what is in the
registry, promote a version the gate rejected on purpose, roll production back after a bad
release, check that stored files still match what was published, and remove what killed
publishes left behind. The registry location defaults to ``registry.uri`` in params.yaml.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Any

from imgclf import config
from imgclf.cli import add_params_flag
from imgclf.cli.helptext import add_command
from imgclf.cli.output import format_table
from imgclf.errors import RegistryError
from imgclf.registry import (
    DEFAULT_GC_GRACE,
    ModelRegistry,
    VersionInfo,
    VersionIntegrityError,
)


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
    """Print one version; its files are checked against READY too, so a damaged version
    is not shown as healthy (exit 1 after the listing, naming the file)."""
    _, reg = _open(args)
    info = reg.get(args.name, args.version)
    problems = reg.verify(args.name, args.version)
    if args.json:
        _print_json({**info.to_dict(), "problems": [p.to_dict() for p in problems]})
    else:
        _print_info(info, "ok: every file matches READY" if not problems else "DAMAGED")
    if problems:
        raise VersionIntegrityError.of(
            problems, f"`imgclf registry verify {args.name}` checks every version"
        )
    return 0


def _print_info(info: VersionInfo, integrity: str) -> None:
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
        ("integrity", integrity),
    ]
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        print(f"{key.ljust(width)}  {value}")


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


def _verify(args: argparse.Namespace) -> int:
    """One line per damaged file, then a summary; exit 1 if anything is damaged."""
    _, reg = _open(args)
    problems = reg.verify(args.name, args.version)
    names = [args.name] if args.name else reg.models()
    checked = 1 if args.version is not None else sum(len(reg.ready_versions(n)) for n in names)
    if args.json:
        _print_json({"checked_versions": checked, "problems": [p.to_dict() for p in problems]})
    else:
        for problem in problems:
            print(problem)
    if problems:
        damaged = len({(p.name, p.version) for p in problems})
        raise RegistryError(
            f"{len(problems)} damaged file(s) in {damaged} of {checked} complete version(s) "
            f"in registry {reg.uri}"
        )
    if not args.json:
        print(f"{checked} complete version(s) in registry {reg.uri}: every file matches READY")
    return 0


def _gc(args: argparse.Namespace) -> int:
    """Remove (or list, with --dry-run) incomplete versions older than --older-than."""
    _, reg = _open(args)
    if args.older_than < 0:
        raise config.ConfigError(f"--older-than {args.older_than:g}: expected hours >= 0")
    entries = reg.gc(
        args.name, older_than=dt.timedelta(hours=args.older_than), dry_run=args.dry_run
    )
    if args.json:
        _print_json([entry.to_dict() for entry in entries])
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for entry in entries:
        print(
            f"{verb} {reg.uri.rstrip('/')}/{entry.prefix}: incomplete, {entry.objects} "
            f"object(s), newest {entry.newest.isoformat(timespec='seconds')}"
        )
    print(
        f"{verb} {len(entries)} incomplete version(s) older than {args.older_than:g} h "
        f"from registry {reg.uri}"
    )
    return 0


def _add_serving(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kubeconfig", metavar="FILE", help="kubeconfig of the cluster to apply to "
        "(default: in-cluster account, $KUBECONFIG, ~/.kube/config; see deploy.apply)",
    )  # fmt: skip
    p.add_argument("--manifest", metavar="FILE", help="also write the InferenceService YAML here")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``imgclf registry <list|show|promote|rollback|verify|gc>``."""
    parser = add_command(
        subparsers,
        "registry",
        "List, show, promote, roll back, verify and clean up model versions.",
        [
            ("versions, accuracy and aliases of every model", "imgclf registry list"),
            ("production back to its previous version", "imgclf registry rollback digits"),
        ],
        description=(
            "Inspect model versions and move aliases by hand: promote a version on purpose, "
            "or roll an alias back after a bad release; check stored files against what was "
            "published; remove what failed publishes left. The registry defaults to "
            "registry.uri in params.yaml."
        ),
    )
    sub = parser.add_subparsers(dest="registry_command", metavar="<action>", required=True)

    p = add_command(
        sub,
        "list",
        "List complete versions with accuracy and aliases.",
        [
            ("every version in the registry of params.yaml", "imgclf registry list"),
            (
                "one model in an S3 registry, as JSON (bucket is a placeholder)",
                "imgclf registry list --model digits --registry s3://bucket/registry --json",
            ),
        ],
    )
    p.add_argument("--model", metavar="NAME", help="only this model (default: every model)")
    _add_common(p)
    p.set_defaults(func=_list)

    p = add_command(
        sub,
        "show",
        "Show metrics, lineage and files of one version.",
        [("version 3 of digits, its files checked too", "imgclf registry show digits 3")],
    )
    p.add_argument("name", help="model name")
    p.add_argument("version", type=int, help="version number")
    _add_common(p)
    p.set_defaults(func=_show)

    p = add_command(
        sub,
        "promote",
        "Point an alias at a version, or start or finish a canary.",
        [
            ("version 3 takes 10% of the traffic", "imgclf registry promote digits 3 --canary 10"),
            ("then production -> 3, all traffic", "imgclf registry promote digits --finish"),
        ],
        description=(
            "Point an alias (default: registry.alias) at a version and, in a cluster, apply "
            "its InferenceService. --canary 10 sends 10% of the traffic to the version while "
            "the alias keeps the current one; --finish moves the alias (and all traffic) to "
            "the canary."
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

    p = add_command(
        sub,
        "rollback",
        "Move an alias back to its previous version, or drop its canary.",
        [
            ("production back to the version before", "imgclf registry rollback digits"),
            (
                "also write the InferenceService it applies",
                "imgclf registry rollback digits --manifest out/deploy/inferenceservice.yaml",
            ),
        ],
        description="Move an alias back to its previous version (or drop its canary), and in "
        "a cluster re-apply that version's InferenceService.",
    )
    p.add_argument("name", help="model name")
    p.add_argument("--alias", help="alias to move (default: registry.alias, e.g. production)")
    _add_serving(p)
    _add_common(p)
    p.set_defaults(func=_rollback)

    p = add_command(
        sub,
        "verify",
        "Check the stored files of complete versions against READY.",
        [
            ("every version of every model", "imgclf registry verify"),
            (
                "one version in an S3 registry (bucket is a placeholder)",
                "imgclf registry verify digits 3 --registry s3://bucket/registry",
            ),
        ],
        description=(
            "Hash every file of every complete version (of NAME; only VERSION when given) "
            "as it streams from the store and compare it with the sha256 recorded in READY "
            "at publish time. Prints one line per missing, altered or unlisted file and "
            "exits non-zero if there is any."
        ),
    )
    p.add_argument("name", nargs="?", help="model name (default: every model)")
    p.add_argument("version", type=int, nargs="?", help="version number (default: all)")
    _add_common(p)
    p.set_defaults(func=_verify)

    default_hours = DEFAULT_GC_GRACE.total_seconds() / 3600
    p = add_command(
        sub,
        "gc",
        "Remove incomplete versions (no READY) left by failed publishes.",
        [
            ("list what would be removed", "imgclf registry gc --dry-run"),
            (
                "remove those of digits older than two days",
                "imgclf registry gc digits --older-than 48",
            ),
        ],
        description=(
            "Remove the versions without READY (publishes that died) whose newest object is "
            "older than --older-than hours. Complete versions and versions an alias names "
            "are never touched. The grace period must exceed the longest publish, or a "
            "publish still uploading loses its files."
        ),
    )
    p.add_argument("name", nargs="?", help="model name (default: every model)")
    p.add_argument(
        "--older-than",
        type=float,
        default=default_hours,
        metavar="HOURS",
        help="only versions whose newest object is at least this old (default: %(default)g)",
    )
    p.add_argument("--dry-run", action="store_true", help="print what would go; remove nothing")
    _add_common(p)
    p.set_defaults(func=_gc)
