"""Write requirements/<target>.lock.txt, the exact packages each Docker image target installs.

Run it as ``make lock`` after changing a dependency in pyproject.toml; ``--check`` only says
whether the locks are stale (it needs the package index, so CI's offline check is
tests/e2e/test_image_build.py). It drives ``uv pip compile`` (the dev extra installs uv)
because uv resolves for the image's platform, CPython 3.11 on Linux x86_64, whatever machine
runs it, and records every file's sha256 so ``pip install --require-hashes`` refuses anything
else. uv keeps the versions already in a lock unless a specifier forces a change, so a rerun
only moves what pyproject.toml asked to move; ``--upgrade`` takes the newest of everything.

The torch stack (torch, torchvision and the CUDA runtime wheels torch pins exactly) is left
out: the Dockerfile installs it from a CUDA index of its own (TORCH_INDEX_URL), whose wheels
are not PyPI's, while the versions of torch and torchvision are pinned in pyproject.toml.
"""

from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
LOCK_DIR = REPO / "requirements"
# Image target -> the extras of imgclf it installs on top of the core dependencies. The
# pipeline image is the serving image plus the pipeline lock, so the serving lock is resolved
# second, within the pipeline's pins: the two agree on every package they share.
TARGETS: dict[str, tuple[str, ...]] = {"pipeline": ("pipeline",), "serving": ()}
CONSTRAINED_BY = {"serving": "pipeline"}
PYTHON_VERSION = "3.11"
PLATFORM = "x86_64-manylinux_2_28"  # the base image is Debian bookworm (glibc 2.36) on amd64
# nvidia-ml-py (NVML bindings, a dvclive dependency) is a plain PyPI package, not the stack's.
TORCH_STACK = re.compile(r"^(torch|torchvision|triton|nvidia-(?!ml-py$).+|cuda-.+)$")
COMPILE_COMMAND = "make lock"
# A requirement line of the lock: `name==version`, maybe followed by ` \` and hash lines.
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def lock_path(target: str) -> Path:
    """Where the lock of an image target lives (the Dockerfile copies it by this name)."""
    return LOCK_DIR / f"{target}.lock.txt"


def build_requirements() -> list[str]:
    """pyproject's build-system requirements: the image builds imgclf without build
    isolation, so setuptools and wheel come from the lock instead of an unpinned download."""
    pyproject = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    return list(pyproject["build-system"]["requires"])


def drop_torch_stack(text: str) -> str:
    """The uv output without the entries (pin, hashes, annotations) of the torch stack."""
    kept: list[str] = []
    skipping = False
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            match = PIN.match(line)
            skipping = bool(match and TORCH_STACK.match(match.group(1).lower()))
        elif not line:
            skipping = False
        if not skipping:
            kept.append(line)
    return "\n".join(kept) + "\n"


def compile_lock(target: str, out: Path, upgrade: bool, within: Path | None) -> None:
    """Resolve one target into ``out``, within the pins of the lock ``within`` if given; an
    existing ``out`` supplies the preferred versions."""
    from uv import find_uv_bin

    extras = [arg for extra in TARGETS[target] for arg in ("--extra", extra)]
    if within is not None:
        extras += ["--constraint", str(within)]
    with tempfile.TemporaryDirectory() as tmp:
        build_in = Path(tmp) / "build-system.in"
        build_in.write_text("\n".join(build_requirements()) + "\n", encoding="utf-8")
        command = [
            find_uv_bin(), "pip", "compile", "--quiet", str(PYPROJECT), str(build_in), *extras,
            "--python-version", PYTHON_VERSION, "--python-platform", PLATFORM,
            "--generate-hashes",
            "--custom-compile-command", COMPILE_COMMAND, "--output-file", str(out),
            *(["--upgrade"] if upgrade else []),
        ]  # fmt: skip
        subprocess.run(command, check=True, cwd=REPO)
    text = out.read_text(encoding="utf-8").replace(str(build_in), "build-system.requires")
    if within is not None:  # --check resolves within a temporary copy: name the real file
        text = text.replace(str(within), str(lock_path(CONSTRAINED_BY[target]).relative_to(REPO)))
    header = (
        f"# The `{target}` target of the Dockerfile installs exactly these (`pip install "
        "--no-deps --require-hashes`).\n"
        "# Not here: torch, torchvision and their CUDA wheels, installed from TORCH_INDEX_URL.\n"
    )
    out.write_text(header + drop_torch_stack(text), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a lock is stale")
    parser.add_argument("--upgrade", action="store_true", help="move every pin to the newest")
    args = parser.parse_args(argv)
    stale = []
    with tempfile.TemporaryDirectory() as tmp:
        written: dict[str, Path] = {}
        for target in TARGETS:
            path = lock_path(target)
            out = Path(tmp) / path.name if args.check else path
            if args.check and path.exists():
                out.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
            within = written.get(CONSTRAINED_BY.get(target, ""))
            compile_lock(target, out, args.upgrade and not args.check, within)
            written[target] = out
            if not args.check:
                print(f"wrote {path.relative_to(REPO)}")
                continue
            old = path.read_text(encoding="utf-8") if path.exists() else ""
            diff = list(
                difflib.unified_diff(
                    old.splitlines(), out.read_text(encoding="utf-8").splitlines(),
                    str(path.relative_to(REPO)), "regenerated", lineterm="",
                )
            )  # fmt: skip
            if diff:
                stale.append(path)
                print("\n".join(diff[:60]))
    if stale:
        print(f"stale: {', '.join(str(p.relative_to(REPO)) for p in stale)}; run `make lock`")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
