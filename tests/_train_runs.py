"""Running ``imgclf train`` as a subprocess, the way a KFP task or a DVC stage runs it.

The checkpoint and distributed-training tests start the command, stop it with a signal
once enough checkpoints exist, start it again, and compare the model dirs. Timing is never
asserted: they wait for checkpoint files to appear, with a generous hang guard.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from imgclf.training import checkpoint

HANG_GUARD_S = 300
# Long enough (40 epochs of 6 steps) that the run is still training when a test stops it
# after its first checkpoints; small enough to take seconds on a CPU.
SETTINGS: dict[str, Any] = {
    "model": "simple_cnn",
    "image_size": 12,
    "epochs": 40,
    "min_steps": 0,
    "batch_size": 8,
    "lr": 0.01,
    "backbone_lr": 0.01,
    "patience": 0,
    "augment": "light",
    "device": "cpu",
    "num_workers": 0,
    "threads": 1,
    "checkpoint_every_steps": 2,
    "checkpoint_min_interval_s": 0,
    "keep_checkpoints": 2,
}


def params_file(root: Path, **overrides: Any) -> Path:
    """A params.yaml with SETTINGS and ``overrides`` as its train section."""
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {**SETTINGS, **overrides}}), encoding="utf-8")
    return path


def command(
    params: Path, dataset: Path, out: Path | str, checkpoints: Path | str, extra: Sequence[str] = ()
) -> list[str]:
    """The train command line, with ``extra`` arguments (``--nproc 2``) at the end."""
    return [
        sys.executable,
        "-m",
        "imgclf",
        "train",
        "--params",
        str(params),
        "--dataset",
        str(dataset),
        "--out",
        str(out),
        "--checkpoint-dir",
        str(checkpoints),
        *extra,
    ]


def train(
    root: Path,
    dataset: Path,
    checkpoints: Path | str,
    extra: Sequence[str] = (),
    **overrides: Any,
) -> tuple[int, str]:
    """Run the train command to its end; (exit code, stderr)."""
    params = params_file(root, **overrides)
    done = subprocess.run(
        command(params, dataset, root / "model", checkpoints, extra),
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        check=False,
    )
    return done.returncode, done.stderr


def sidecars(directory: Path) -> list[dict[str, Any]]:
    """The checkpoint sidecars in ``directory``, oldest first (none half-written)."""
    found = []
    for path in directory.glob(f"*{checkpoint.SIDECAR_SUFFIX}"):
        try:
            found.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue  # being replaced right now
    return sorted(found, key=lambda m: (m["global_step"], m["epoch_end"]))


def start_and_stop(
    root: Path,
    dataset: Path,
    checkpoints: Path | str,
    *,
    after: int,
    signum: int,
    count: Callable[[], int] | None = None,
    extra: Sequence[str] = (),
) -> tuple[int, str]:
    """Start training, send ``signum`` once ``after`` checkpoints exist; (exit code, stderr).

    ``count`` says how many exist (default: the sidecars in the local dir ``checkpoints``).
    """
    count = count or (lambda: len(sidecars(Path(checkpoints))))
    params = params_file(root)
    log = root / "stderr.txt"
    with open(log, "w", encoding="utf-8") as err:
        proc = subprocess.Popen(
            command(params, dataset, root / "model", checkpoints, extra),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            deadline = time.monotonic() + HANG_GUARD_S
            while count() < after:
                assert proc.poll() is None, log.read_text(encoding="utf-8")
                assert time.monotonic() < deadline, "no checkpoint appeared"
                time.sleep(0.005)
            proc.send_signal(signum)
            code = proc.wait(timeout=HANG_GUARD_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return code, log.read_text(encoding="utf-8")


def result(model_dir: Path) -> tuple[bytes, dict[str, Any]]:
    """(weights bytes, metrics): what two runs that should be the same must share."""
    meta = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
    return (model_dir / "model.safetensors").read_bytes(), meta["metrics"]
