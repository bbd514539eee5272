"""Bad settings end the step commands with one line naming the setting, before any work.

Each case here used to cost a traceback or a silent fallback: ``train.image_size: 100000``
died of a bare MemoryError after a long wait, ``lr: .nan`` or a negative ``num_workers``
failed deep inside torch, ``--params missing.yaml`` trained with every default, and a params
file without the step's section did the same. The dataset paths given to the commands do not
exist, so reaching any work would be a DataError, not the ConfigError (exit 2) asserted.

The last test kills the process that started ``imgclf train`` (as SIGKILL to ``dvc repro``
would) and checks that training ends instead of running on as an orphan.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from _dataset_factory import build_tiny_dataset
from _repo_copy import TINY_TRAIN
from imgclf.cli import main
from imgclf.errors import ConfigError, DataError

# Every step command, with the section it loads and the paths it needs (none of them exists).
STEP_ARGS = {
    "ingest": ("ingest", ["--source", "nowhere"]),
    "validate": ("validate", ["--dataset", "nowhere"]),
    "train": ("train", ["--dataset", "nowhere"]),
    "lr-find": ("train", ["--dataset", "nowhere"]),
    "evaluate": ("evaluate", ["--dataset", "nowhere", "--model", "nowhere"]),
    "deploy": ("deploy", ["--dataset", "nowhere", "--model", "nowhere", "--eval", "nowhere"]),
}
# Generous bounds for a machine under load; no test asserts how fast anything is.
START_GUARD_S = 180.0
EXIT_GUARD_S = 60.0


def run_step(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str, *extra: str
) -> tuple[int, str]:
    """``imgclf <command>`` on missing inputs, output under ``tmp_path``: (exit code, stderr).

    Asserts the one-line contract and that no output (or temp output) was created.
    """
    out = tmp_path / "out"
    code = main([command, *STEP_ARGS[command][1], "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if not line.startswith(("INFO ", "WARNING "))]
    assert len(lines) == 1, err
    assert not out.exists() and list(tmp_path.glob(".out.*")) == []
    return code, lines[0]


def params_file(tmp_path: Path, values: dict[str, Any] | str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(values if isinstance(values, str) else yaml.safe_dump(values))
    return path


def test_a_huge_train_image_size_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = params_file(tmp_path, {"train": {"image_size": 100000}})
    code, line = run_step(capsys, tmp_path, "train", "--params", str(params))
    assert code == ConfigError.exit_code
    assert line == (
        "imgclf train: error: params.yaml:train.image_size=100000: must be between 8 and 4096"
    )


@pytest.mark.parametrize("action", ["sample", "ensure"])
def test_the_data_commands_bound_the_image_size_too(
    action: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["data", action, "--image-size", "100000"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --image-size: 100000: must be between 8 and 4096" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("command", "text", "named"),
    [
        ("train", "train:\n  lr: .nan\n", "params.yaml:train.lr=nan"),
        ("train", "train:\n  weight_decay: .inf\n", "params.yaml:train.weight_decay=inf"),
        ("lr-find", "train:\n  backbone_lr: -.inf\n", "params.yaml:train.backbone_lr=-inf"),
        ("evaluate", "evaluate:\n  min_accuracy: .nan\n", "params.yaml:evaluate.min_accuracy"),
        ("validate", "validate:\n  max_imbalance_ratio: .inf\n", "validate.max_imbalance_ratio"),
        ("ingest", "ingest:\n  split: {train: .nan}\n", "params.yaml:ingest.split.train=nan"),
        ("deploy", "deploy:\n  smoke_p95_ms: .nan\n", "params.yaml:deploy.smoke_p95_ms=nan"),
        (
            "deploy",
            "deploy: {}\nserve:\n  max_batch_wait_ms: .inf\n",
            "params.yaml:serve.max_batch_wait_ms=inf",
        ),
    ],
)
def test_non_finite_numbers_are_refused_in_every_section(
    command: str, text: str, named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = params_file(tmp_path, text)
    code, line = run_step(capsys, tmp_path, command, "--params", str(params))
    assert code == ConfigError.exit_code
    assert named in line and "finite" in line


def test_a_non_finite_override_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = params_file(tmp_path, {"train": {}})
    code, line = run_step(capsys, tmp_path, "train", "--params", str(params), "--set", "lr=.nan")
    assert code == ConfigError.exit_code
    assert "params.yaml:train.lr=nan: must be a finite number" in line


@pytest.mark.parametrize(
    ("command", "section", "values", "message"),
    [
        ("train", "train", {"num_workers": -1}, "train.num_workers=-1: must be >= 0"),
        ("train", "train", {"weight_decay": -1}, "train.weight_decay=-1.0: must be >= 0"),
        ("train", "train", {"batch_size": 0}, "train.batch_size=0: must be >= 1"),
        ("train", "train", {"epochs": 0}, "train.epochs=0: must be >= 1"),
        ("train", "train", {"patience": -1}, "train.patience=-1: must be >= 0"),
        ("train", "train", {"threads": -2}, "train.threads=-2: must be >= 0"),
        ("train", "train", {"image_size": 4}, "train.image_size=4: must be between 8 and 4096"),
        ("train", "train", {"lr": 0}, "train.lr=0: must be > 0 or 'auto'"),
        ("lr-find", "train", {"max_steps_per_epoch": -1}, "train.max_steps_per_epoch=-1"),
        ("evaluate", "evaluate", {"batch_size": 0}, "evaluate.batch_size=0: must be >= 1"),
        ("evaluate", "evaluate", {"top_k": 0}, "evaluate.top_k=0: must be >= 1"),
        ("evaluate", "evaluate", {"min_accuracy": 1.5}, "evaluate.min_accuracy=1.5: must be"),
        ("evaluate", "evaluate", {"min_accuracy": -0.1}, "between 0 and 1"),
        ("evaluate", "evaluate", {"max_regression": -0.01}, "evaluate.max_regression=-0.01"),
        ("validate", "validate", {"min_width": 0}, "validate.min_width=0: must be >= 1"),
        ("validate", "validate", {"max_height": 4}, "validate.min_height=8 exceeds"),
        ("validate", "validate", {"max_duplicate_fraction": 2}, "max_duplicate_fraction=2.0"),
        ("validate", "validate", {"min_images_per_split": -1}, "min_images_per_split=-1"),
        (
            "ingest",
            "ingest",
            {"split": {"train": 0.5, "val": 0.5, "test": 0.5}},
            "ingest.split: ratios must be >= 0 and sum to 1",
        ),
        ("deploy", "deploy", {"canary_percent": 150}, "deploy.canary_percent=150: must be"),
    ],
)
def test_out_of_range_settings_name_the_setting_and_the_range(
    command: str,
    section: str,
    values: dict[str, Any],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    params = params_file(tmp_path, {section: values})
    code, line = run_step(capsys, tmp_path, command, "--params", str(params))
    assert code == ConfigError.exit_code
    assert line.startswith(f"imgclf {command}: error: params.yaml:{section}")
    assert message in line


@pytest.mark.parametrize("command", list(STEP_ARGS))
def test_a_named_params_file_that_does_not_exist_is_refused(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.yaml"
    code, line = run_step(capsys, tmp_path, command, "--params", str(missing))
    assert code == ConfigError.exit_code
    assert line == f"imgclf {command}: error: params file {missing} does not exist"


def test_a_missing_params_file_is_refused_before_the_subcommand_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.yaml"
    code = main(["--params", str(missing), "registry", "list", "--registry", str(tmp_path)])
    assert code == ConfigError.exit_code
    assert f"params file {missing} does not exist" in capsys.readouterr().err


def test_without_params_yaml_in_the_working_directory_every_default_applies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, line = run_step(capsys, tmp_path, "validate")
    assert code == DataError.exit_code, "the settings were accepted: it went on to the data"
    assert "manifest.csv" in line


@pytest.mark.parametrize(("command", "section"), [(c, s) for c, (s, _) in STEP_ARGS.items()])
def test_a_params_file_without_the_step_section_is_refused(
    command: str, section: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = "registry" if section != "registry" else "train"
    params = params_file(tmp_path, {other: {}})
    code, line = run_step(capsys, tmp_path, command, "--params", str(params))
    assert code == ConfigError.exit_code
    assert f"{params} has no `{section}:` section" in line


def test_an_empty_section_means_every_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = params_file(tmp_path, "train: {}\n")
    code, line = run_step(capsys, tmp_path, "train", "--params", str(params))
    assert code == DataError.exit_code, line


# -- the process that started a step is killed -----------------------------------------------


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie no init has reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _read_lines(stream: Any, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux only")
def test_train_ends_when_the_process_that_started_it_is_killed(tmp_path: Path) -> None:
    dataset = build_tiny_dataset(tmp_path / "dataset")
    # Far more epochs than the test waits for: only the parent's death can end this run.
    train = {
        **TINY_TRAIN,
        "epochs": 1_000_000,
        "lr": 0.01,
        "checkpoint_dir": str(tmp_path / "checkpoints"),
    }
    params = params_file(tmp_path, {"train": train})
    out = tmp_path / "model"
    train_cmd = [sys.executable, "-m", "imgclf", "train", "--params", str(params)]
    train_cmd += ["--dataset", str(dataset), "--out", str(out)]
    launcher = (
        "import subprocess, sys; child = subprocess.Popen(sys.argv[1:]); "
        "print(child.pid, flush=True); child.wait()"
    )
    starter = subprocess.Popen(
        [sys.executable, "-c", launcher, *train_cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,  # the train process inherits it: its log reaches us
        text=True,
    )
    assert starter.stdout is not None and starter.stderr is not None
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(starter.stderr, lines), daemon=True)
    reader.start()
    child = int(starter.stdout.readline())
    seen: list[str] = []
    try:
        deadline = time.monotonic() + START_GUARD_S
        while not any(line.startswith("INFO imgclf.steps.train: training") for line in seen):
            assert time.monotonic() < deadline, f"train never started:\n{chr(10).join(seen)}"
            try:
                seen.append(lines.get(timeout=1.0))
            except queue.Empty:
                assert _alive(child), f"train exited early:\n{chr(10).join(seen)}"

        starter.send_signal(signal.SIGKILL)
        starter.wait(timeout=EXIT_GUARD_S)
        deadline = time.monotonic() + EXIT_GUARD_S
        while _alive(child):
            assert time.monotonic() < deadline, "train outlived the process that started it"
            time.sleep(0.1)
        reader.join(timeout=EXIT_GUARD_S)
        while not lines.empty():
            seen.append(lines.get())
        # before the training loop: terminated; inside it: a checkpoint, then preempted
        assert any("(SIGTERM)" in line for line in seen), seen
        assert not out.exists() and list(tmp_path.glob(".model.*")) == []
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
        if starter.poll() is None:
            starter.kill()
            starter.wait()
