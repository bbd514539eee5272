"""``imgclf`` command line: one subcommand per step plus registry, pipeline and dev tools.

Each ``imgclf.cli.<area>`` module exposes ``register(subparsers)``, adding its parsers with
``set_defaults(func=handler)``; a handler takes the parsed namespace and returns an exit
code. Handlers only parse and do I/O, then call library functions (STYLE rule 1).
User errors (:class:`~imgclf.errors.ImgclfError`) print one line and exit non-zero.

``--params`` (before or after the subcommand) names the one params file of the run: each
handler loads its section from it, and ``main`` hands its ``s3:`` section to every S3
connection the command opens, so no module below the CLI reads a params file. A file named
with ``--params`` must exist; only the implicit ``./params.yaml`` may be absent (all defaults).

The step commands are what DVC and KFP run as child processes; they end (SIGTERM) when the
process that started them dies, instead of training on as orphans that keep writing outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from imgclf import __version__, proc
from imgclf.cli.helptext import HelpFormatter, examples_epilog
from imgclf.config import DEFAULT_PARAMS, read_params
from imgclf.errors import ImgclfError
from imgclf.storage.s3config import params_section, s3_params

_AREAS = ("steps", "registry", "serve", "pipeline", "dev")


class _Terminated(BaseException):
    """SIGTERM as an exception: context managers (atomic output dirs, the smoke-test server)
    clean up on the way out instead of the process vanishing halfway through a write."""


def _terminated_handler(owner: int) -> Callable[[int, object], None]:
    """A SIGTERM handler raising :class:`_Terminated` in process ``owner`` only.

    Processes forked while it is installed (DataLoader workers) inherit it; there SIGTERM
    keeps its default meaning, so a worker told to stop by torch just stops.
    """

    def handle(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise _Terminated(signum)

    return handle


@contextlib.contextmanager
def _exit_with_parent(parent: int) -> Iterator[None]:
    """While the block runs, end (SIGTERM, raised as :class:`_Terminated`) when our parent dies.

    Killing ``dvc repro`` or a KFP launcher with SIGKILL gives them no chance to stop their
    child; without this, ``imgclf train`` trained on as an orphan and kept writing outputs.
    ``PR_SET_PDEATHSIG`` makes the kernel send the signal; a parent that died before the
    call never triggers it, so ``parent`` (``getppid()`` taken as early as ``main`` could)
    is compared afterwards. A parent of pid 1 alone proves nothing: in a container the
    launcher that starts us legitimately is pid 1. Linux only; skipped silently elsewhere
    and off the main thread (signal handlers live there). The previous handler and death
    signal are restored, so calling ``main`` in-process (tests) leaves the caller as it was.
    """
    if proc.libc() is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    before = proc.parent_death_signal()
    handler = signal.signal(signal.SIGTERM, _terminated_handler(os.getpid()))
    try:
        proc.set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != parent:
            raise _Terminated(signal.SIGTERM)
        yield
    finally:
        proc.set_parent_death_signal(before)
        # None: a handler not installed from Python, which Python cannot put back
        signal.signal(signal.SIGTERM, signal.SIG_DFL if handler is None else handler)


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
        epilog=examples_epilog(
            [
                (
                    "the whole DAG on this machine, each task a local process",
                    "imgclf pipeline run --local",
                ),
                (
                    "one step, two epochs instead of params.yaml's train.epochs",
                    "imgclf --params params.yaml train --set epochs=2",
                ),
            ]
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"imgclf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--params",
        default=None,
        help=f"params file: each step's section and the s3 section (default: {DEFAULT_PARAMS}, "
        "all defaults when absent); may also follow the subcommand",
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
    parent = os.getppid()  # before the slow part (parsers), see _exit_with_parent
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    named = args.params is not None
    if not named:
        args.params = str(DEFAULT_PARAMS)
    try:
        with contextlib.ExitStack() as stack:
            if getattr(args, "exit_with_parent", False):
                stack.enter_context(_exit_with_parent(parent))
            # the one read of the params file; handlers take their sections from params_values
            args.params_values = read_params(args.params, missing_ok=not named)
            label = Path(args.params).name
            with s3_params(params_section(args.params_values, label), label):
                return int(args.func(args) or 0)
    except ImgclfError as exc:
        print(f"imgclf {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"imgclf {args.command}: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"imgclf {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 128 + int(signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
