"""``imgclf serve``: run the model server on a model dir or a registry version.

The flags KServe's manifest renders (``--model_name``, ``--model_dir``, ``--http_port``) are
accepted as they are, and with dashes for people. The server listens on all interfaces
(as a container must); its settings come from the ``serve`` section of params.yaml.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from imgclf import config
from imgclf.cli import add_params_flag
from imgclf.cli.helptext import add_command


def _serve(args: argparse.Namespace) -> int:
    from imgclf.serving import source as sources
    from imgclf.serving.server import serve

    label = Path(args.params).name
    overrides = dict(config.parse_override(o) for o in args.overrides)
    cfg = config.section_of(args.params_values, config.ServeConfig, "serve", label, overrides)
    registry = config.section_of(args.params_values, config.RegistryConfig, "registry", label)
    name = args.model_name or registry.model_name
    if args.model_dir:
        if args.version is not None or args.alias:
            raise config.ConfigError(
                "serve: --version/--alias select a registry version; drop them with --model-dir"
            )
        source = sources.from_model_dir(args.model_dir)
    else:
        source = sources.from_registry(
            args.registry or registry.uri, name, version=args.version, alias=args.alias
        )
    try:
        serve(source, name, cfg, http_port=args.http_port)
    finally:
        source.close()
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``imgclf serve``."""
    p = add_command(
        sub,
        "serve",
        "Serve a model over HTTP (KServe v1 and v2 protocols).",
        [
            ("the production version of registry.uri on port 8080", "imgclf serve"),
            ("a model dir on any free port", "imgclf serve --model-dir out/model --http-port 0"),
        ],
        description=(
            "Serve a model dir (--model-dir) or a registry version (default: the version "
            "the production alias points to) with the KServe model server: "
            "POST /v1/models/NAME:predict, POST /v2/models/NAME/infer, GET /v2/health/ready, "
            "GET /metrics. Every file's sha256 is checked before the model loads."
        ),
    )
    p.add_argument(
        "--model-dir",
        "--model_dir",
        dest="model_dir",
        metavar="DIR",
        help="model dir written by train (checked against its checksums.json)",
    )
    p.add_argument(
        "--model",
        "--model-name",
        "--model_name",
        dest="model_name",
        metavar="NAME",
        help="registry model name, also the name in the URL (default: registry.model_name)",
    )
    p.add_argument("--registry", metavar="URI", help="registry (default: registry.uri)")
    p.add_argument("--version", type=int, help="registry version to serve")
    p.add_argument("--alias", help="serve the version this alias points to (default: production)")
    p.add_argument(
        "--http-port",
        "--http_port",
        dest="http_port",
        type=int,
        default=8080,
        help="port (0: any free port, printed when listening) (default: %(default)s)",
    )
    add_params_flag(p, "serve and registry sections are used")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the serve section, e.g. --set max_batch_size=16",
    )
    p.set_defaults(func=_serve)
