"""A fresh checkout of this repository in a temp dir, and commands run in it like a user would.

End-to-end tests (``test_e2e_dvc.py``, ``test_s3_pipeline.py``) run the README's steps with the
real ``dvc`` and ``imgclf`` executables of this venv in a copy of the working tree, committed
in a new git repo, with tiny training settings so a whole pipeline fits in CI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# What a fresh checkout does not have, by folder: root-level only, since packages such as
# src/imgclf/data and src/imgclf/registry share names with the root's outputs.
NOT_CHECKED_OUT = {
    REPO: frozenset(
        {".git", ".venv", "out", "registry", "data", "dvc_plots", "dvc.lock", ".s3data"}
    ),
    REPO / ".dvc": frozenset({"cache", "tmp", "config.local"}),
}
CACHES = shutil.ignore_patterns("__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info")


def not_checked_out(directory: str, names: list[str]) -> set[str]:
    """``copytree``'s ignore: local state and outputs, and caches anywhere."""
    local = NOT_CHECKED_OUT.get(Path(directory).resolve(), frozenset())
    return set(CACHES(directory, names)) | local.intersection(names)


TINY_TRAIN = {
    "model": "simple_cnn",
    "epochs": 2,
    "min_steps": 0,
    "max_steps_per_epoch": 4,
    "image_size": 16,
}


def repo_env(extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """The environment of a user's shell: venv on PATH, no S3 settings unless ``extra`` has them.

    S3 and MinIO variables of the test process are dropped so that only what a test passes
    in ``extra`` reaches the commands; an ``extra`` value of None removes that variable.
    """
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env["IMGCLF_SKIP_DVC_PULL"] = "1"
    for key in [k for k in env if k.startswith(("AWS_", "MINIO_", "IMGCLF_S3_"))]:
        del env[key]
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def sh(
    cwd: Path,
    *cmd: str,
    check: bool = True,
    env: Mapping[str, str | None] | None = None,
    timeout: float | None = 600,
) -> subprocess.CompletedProcess[str]:
    """Run a command like a user would (see :func:`repo_env` for ``env``); output captured."""
    res = subprocess.run(
        cmd,
        cwd=cwd,
        env=repo_env(env),
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def clone_repo(
    tmp_path: Path,
    *,
    min_accuracy: float,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    name: str = "repo",
) -> Path:
    """A fresh checkout of the working tree with tiny training params, committed in git.

    ``params`` updates params.yaml section by section (``{"registry": {"uri": ...}}``)
    before the commit, so the change is part of the checkout, not a local edit.
    """
    repo = tmp_path / name
    shutil.copytree(REPO, repo, ignore=not_checked_out)
    params_file = repo / "params.yaml"
    values = yaml.safe_load(params_file.read_text())
    values["train"].update(TINY_TRAIN)
    values["evaluate"]["min_accuracy"] = min_accuracy
    for section, updates in (params or {}).items():
        values.setdefault(section, {}).update(updates)
    params_file.write_text(yaml.safe_dump(values, sort_keys=False))
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone")
    return repo
