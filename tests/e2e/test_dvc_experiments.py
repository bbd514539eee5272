"""DVC experiments as users read them: a running `dvc exp run` in `dvc exp show`, then
`dvc metrics diff` and a `dvc metrics show` that fits a terminal.

A fresh checkout (see ``_repo_copy``) runs the demo pipeline once with tiny training settings,
then starts `dvc exp run -S train.epochs=3` in the background and polls `dvc exp show` until
the running experiment lists a per-epoch metric from DVCLive. Timing is never asserted: the
polling only has a generous hang guard.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from _repo_copy import clone_repo, repo_env, sh

pytestmark = pytest.mark.slow

HANG_GUARD_S = 900
TERMINAL_WIDTH = 120
# DVCLive's summary (out/train/metrics.json): the latest epoch's scores, as `dvc exp show`
# lists them while the experiment runs.
LIVE_METRICS = "out/train/metrics.json"


def _live_metrics(rev: dict[str, Any]) -> dict[str, Any]:
    data = rev.get("data") or {}
    return ((data.get("metrics") or {}).get(LIVE_METRICS) or {}).get("data") or {}


def _running_epochs(shown: list[dict[str, Any]]) -> list[int]:
    """The epochs `dvc exp show --json` reports for running experiments, once their DVCLive
    summary is their own (before the train stage starts, it is still the baseline's)."""
    found = []
    for baseline in shown:
        for group in baseline.get("experiments") or []:
            if (group.get("executor") or {}).get("state") != "running":
                continue
            live = _live_metrics(group["revs"][0])
            if isinstance(live.get("step"), int) and live != _live_metrics(baseline):
                found.append(live["step"])
    return found


def test_running_experiment_shows_epochs_and_metrics_fit_a_terminal(tmp_path: Path) -> None:
    repo = clone_repo(tmp_path, min_accuracy=0.0)
    sh(repo, "imgclf", "data", "ensure")
    sh(repo, "dvc", "repro")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "demo")

    log = tmp_path / "exp-run.log"
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(
            ["dvc", "exp", "run", "-S", "train.epochs=3"],
            cwd=repo,
            env=repo_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + HANG_GUARD_S
            epochs: list[int] = []
            while not epochs:
                assert proc.poll() is None, "exp run ended before `dvc exp show` saw it running"
                assert time.monotonic() < deadline, "no running experiment appeared"
                shown = sh(repo, "dvc", "exp", "show", "--json", check=False)
                if shown.returncode == 0:
                    epochs = _running_epochs(json.loads(shown.stdout))
                time.sleep(0.2)
            assert proc.wait(timeout=HANG_GUARD_S) == 0, log.read_text(encoding="utf-8")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert all(1 <= epoch <= 3 for epoch in epochs), epochs

    live = json.loads((repo / LIVE_METRICS).read_text(encoding="utf-8"))
    assert live["step"] == 3
    diff = sh(repo, "dvc", "metrics", "diff", "--json")
    assert "out/eval/metrics.json" in diff.stdout or diff.stdout.strip() in ("", "{}")
    shown = sh(repo, "dvc", "metrics", "show").stdout
    lines = shown.splitlines()
    assert any(line.startswith("out/eval/metrics.json") for line in lines), shown
    assert any(line.startswith(LIVE_METRICS) for line in lines), shown
    widest = max(len(line) for line in lines)
    print(f"dvc metrics show: {widest} characters wide\n{shown}")
    assert widest <= TERMINAL_WIDTH, shown
