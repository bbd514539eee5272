"""``--help`` of every ``imgclf`` command, and the progress bars of tree transfers.

Every command's help must describe it and end with examples; each example is parsed by the
real parser (a renamed or removed flag fails here), its ``--set`` keys are built into the
step's config section and its ``--param`` names checked against the compiled pipeline.
The transfer bars must stay off when stderr is not a terminal and draw when it is.
"""

from __future__ import annotations

import argparse
import io
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imgclf import config
from imgclf.cli import build_parser, main
from imgclf.cli.helptext import EXAMPLES_HEADING, PROMPT
from imgclf.errors import ConfigError
from imgclf.kfp.package import DEFAULT_PACKAGE, load_package
from imgclf.kfp.params import parse_params
from imgclf.registry import ModelRegistry
from imgclf.storage import LocalStore, progress

REPO = Path(__file__).resolve().parents[2]

# the params section each command's --set overrides (imgclf.cli.steps, imgclf.cli.serve)
SECTIONS: dict[str, tuple[type, str]] = {
    "ingest": (config.IngestConfig, "ingest"),
    "validate": (config.ValidateConfig, "validate"),
    "train": (config.TrainConfig, "train"),
    "lr-find": (config.TrainConfig, "train"),
    "evaluate": (config.EvaluateConfig, "evaluate"),
    "deploy": (config.DeployConfig, "deploy"),
    "serve": (config.ServeConfig, "serve"),
}


def _commands(
    parser: argparse.ArgumentParser,
    path: tuple[str, ...] = (),
    dests: tuple[tuple[str, str], ...] = (),
    summary: str | None = None,
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, tuple[tuple[str, str], ...], Any]]:
    """(command words, parser, (subparsers dest, word) pairs, summary) of every command."""
    yield path, parser, dests, summary
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            summaries = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                yield from _commands(
                    child, (*path, name), (*dests, (action.dest, name)), summaries.get(name)
                )


COMMANDS = list(_commands(build_parser()))
IDS = [" ".join(path) or "imgclf" for path, *_ in COMMANDS]


def _squeezed(text: str) -> str:
    """``text`` without whitespace: argparse wraps at spaces and after hyphens."""
    return "".join(text.split())


@pytest.fixture(autouse=True)
def _terminal_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 100-column terminal: the help column of a command list has 76 characters."""
    monkeypatch.setenv("COLUMNS", "100")


def _help(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _examples(text: str) -> list[str]:
    """The commands of the ``Examples:`` block that ends ``text``."""
    assert EXAMPLES_HEADING in text, "no examples block"
    block = text.rsplit(EXAMPLES_HEADING, 1)[1].strip().splitlines()
    return [line.strip()[len(PROMPT) :] for line in block if line.strip().startswith(PROMPT)]


def test_every_command_is_walked() -> None:
    names = {" ".join(path) for path, *_ in COMMANDS}
    assert {"", "train", "data ensure", "registry promote", "pipeline schedule list"} <= names


@pytest.mark.parametrize(("path", "parser", "dests", "summary"), COMMANDS, ids=IDS)
def test_help_describes_and_teaches(
    path: tuple[str, ...],
    parser: argparse.ArgumentParser,
    dests: tuple[tuple[str, str], ...],
    summary: str | None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = _help(path, capsys)
    assert parser.description, "no description"
    assert _squeezed(parser.description) in _squeezed(text)
    if path:  # the one line the parent's command list shows
        assert summary and len(summary) <= 72, summary
        listing = _help(path[:-1], capsys).splitlines()
        assert any(line.split(None, 1)[1:] == [summary] for line in listing), summary
    examples = _examples(text)
    assert 1 <= len(examples) <= 2, examples
    for example in examples:
        _check_example(example, dests)


def _check_example(example: str, dests: tuple[tuple[str, str], ...]) -> None:
    """``example`` parses as the command ``dests`` names, with ``--set`` keys of its params
    section (valid values too) and ``--param`` names of the compiled pipeline."""
    words = shlex.split(example)
    assert words[0] == "imgclf", example
    try:
        args = build_parser().parse_args(words[1:])
    except SystemExit:
        pytest.fail(f"`{example}` does not parse")
    for dest, word in dests:
        assert getattr(args, dest) == word, f"`{example}` is not an example of {word}"
    overrides = dict(config.parse_override(o) for o in getattr(args, "overrides", []))
    if overrides:
        cls, section = SECTIONS[args.command]
        config.section_of({}, cls, section, example, overrides)
    if getattr(args, "param_pairs", None):
        parse_params(args.param_pairs, load_package(REPO / DEFAULT_PACKAGE))


@pytest.mark.parametrize(
    ("example", "error"),
    [
        ("imgclf train --epochs 2", pytest.fail.Exception),  # not a flag of train
        ("imgclf train --set epoch=2", ConfigError),  # not a key of the train section
        ("imgclf deploy --set canary_percent=ten", ConfigError),  # not an int
        ("imgclf pipeline run --local --param epoch=2", ConfigError),  # not a pipeline input
        ("imgclf registry list", AssertionError),  # not an example of `registry show`
    ],
)
def test_the_example_check_catches(example: str, error: type[BaseException]) -> None:
    dests = (("command", "registry"), ("registry_command", "show")) if "registry" in example else ()
    with pytest.raises(error):
        _check_example(example, dests)


# -- progress bars of tree transfers ----------------------------------------------------


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, as tqdm's ``disable=None`` asks."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(b"a" * 2048)
    (root / "b.bin").write_bytes(b"b" * 1024)
    (root / "sub" / "c.bin").write_bytes(b"c" * 1024)
    return root


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> list[progress.TransferProgress]:
    """Every transfer bar made in the test, each drawn from its first file on."""
    made: list[progress.TransferProgress] = []

    class Recorded(progress.TransferProgress):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(progress, "DELAY_S", 0)
    monkeypatch.setattr(progress, "TransferProgress", Recorded)
    return made


def _on_terminal(monkeypatch: pytest.MonkeyPatch) -> _Terminal:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    return terminal


def test_no_bar_when_stderr_is_not_a_terminal(
    bars: list[progress.TransferProgress],
    tree: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = LocalStore(tmp_path / "store")
    store.upload_tree(tree, "run")
    store.download_tree("run", tmp_path / "back")
    assert capsys.readouterr().err == ""
    assert [bar.shown for bar in bars] == [False, False]
    assert (tmp_path / "back" / "sub" / "c.bin").read_bytes() == b"c" * 1024


def test_local_tree_copies_draw_files_and_bytes_on_a_terminal(
    bars: list[progress.TransferProgress],
    tree: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = LocalStore(tmp_path / "store")
    terminal = _on_terminal(monkeypatch)
    assert store.upload_tree(tree, "run") == ["run/a.bin", "run/b.bin", "run/sub/c.bin"]
    store.download_tree("run", tmp_path / "back")
    drawn = terminal.getvalue()
    assert f"copy to {store.uri}/run:" in drawn and f"copy from {store.uri}/run:" in drawn
    assert "0/3 [" in drawn
    assert [(bar.shown, bar.files, bar.bytes) for bar in bars] == [(True, 3, 4096)] * 2


def test_registry_download_draws_a_bar(
    bars: list[progress.TransferProgress],
    tree: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = ModelRegistry.open(tmp_path / "registry")
    version = registry.publish("digits", tree, {"accuracy": 0.9}, {})
    bars.clear()
    terminal = _on_terminal(monkeypatch)
    registry.download("digits", version, tmp_path / "model")
    assert f"models/digits/{version}/model:" in terminal.getvalue()
    assert [(bar.shown, bar.files, bar.bytes) for bar in bars] == [(True, 3, 4096)]


@pytest.mark.s3
def test_s3_parallel_transfers_count_every_file(
    bars: list[progress.TransferProgress],
    s3_store: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    files = tmp_path / "many"
    files.mkdir()
    for i in range(40):
        (files / f"{i:02d}.bin").write_bytes(bytes([i]) * 100)
    assert s3_store.settings.workers > 1
    terminal = _on_terminal(monkeypatch)
    s3_store.upload_tree(files, "many")
    s3_store.download_tree("many", tmp_path / "back")
    drawn = terminal.getvalue()
    assert f"upload {s3_store.uri}/many:" in drawn and f"download {s3_store.uri}/many:" in drawn
    assert [(bar.shown, bar.files, bar.bytes) for bar in bars] == [(True, 40, 4000)] * 2
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == sorted(
        p.name for p in files.iterdir()
    )
