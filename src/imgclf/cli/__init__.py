"""``imgclf`` command line: one subcommand per step plus registry, pipeline and dev tools.

Each ``imgclf.cli.<area>`` module exposes ``register(subparsers)``, adding its parsers with
``set_defaults(func=handler)``; a handler takes the parsed namespace and returns an exit
code. Handlers only parse and do I/O, then call library functions (STYLE rule 1).
User errors (:class:`~imgclf.errors.ImgclfError`) print one line and exit non-zero.

``--params`` (before or after the subcommand) names the one params file of the run: each
handler loads its section from it, and ``main`` hands its ``s3:`` section to every S3
connection the command opens, so no module below the CLI reads a params file.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from imgclf import __version__
from imgclf.config import DEFAULT_PARAMS, read_params
from imgclf.errors import ImgclfError
from imgclf.storage.s3config import params_section, s3_params

_AREAS = ("steps", "registry", "serve", "pipeline", "dev")


def add_params_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """``--params`` after a subcommand; left unset it keeps the value given before it."""
    parser.add_argument(
        "--params",
        default=argparse.SUPPRESS,
        help=f"params file whose {what} (default: the global --params, params.yaml)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (areas are imported lazily only for their parsers)."""
    parser = argparse.ArgumentParser(
        prog="imgclf",
        description=(
            "Train PyTorch image classifiers the same way every time: "
            "ingest -> validate -> train -> evaluate -> deploy, run by DVC locally or "
            "Kubeflow Pipelines on Kubernetes."
        ),
    )
    parser.add_argument("--version", action="version", version=f"imgclf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--params",
        default=str(DEFAULT_PARAMS),
        help="params file: each step's section and the s3 section (default: %(default)s); "
        "may also follow the subcommand",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for area in _AREAS:
        try:
            module = importlib.import_module(f"imgclf.cli.{area}")
        except ModuleNotFoundError as exc:
            if exc.name == f"imgclf.cli.{area}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``imgclf`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        # the one read of the params file; handlers take their sections from params_values
        args.params_values = read_params(args.params)
        label = Path(args.params).name
        with s3_params(params_section(args.params_values, label), label):
            return int(args.func(args) or 0)
    except ImgclfError as exc:
        print(f"imgclf {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"imgclf {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
