"""The loader's ``auto`` settings follow the machine; explicit ones are kept; bad ones refused.

Core counts and CUDA are monkeypatched, so the rule is checked for machines this one is not
(one core, 16 cores, a GPU). The CLI cases run ``imgclf train`` on a dataset path that does
not exist: a setting refused before any work ends with one line and exit code 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from _dataset_factory import build_tiny_dataset
from imgclf.cli import main
from imgclf.config import TrainConfig
from imgclf.data import loader
from imgclf.data.loader import LoaderSettings, ManifestDataset, make_loader, resolve_loader_settings
from imgclf.errors import ConfigError, DataError


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch):
    """Set the core count and CUDA availability the loader sees."""

    def set_machine(cores: int, cuda: bool = False) -> None:
        monkeypatch.setattr(loader.os, "sched_getaffinity", lambda _pid: set(range(cores)))
        monkeypatch.setattr(loader, "_cuda_available", lambda: cuda)

    return set_machine


@pytest.mark.parametrize(("cores", "workers"), [(1, 0), (2, 1), (4, 3), (9, 8), (16, 8), (128, 8)])
def test_auto_workers_on_cuda_leave_one_core_to_training_and_stop_at_eight(
    machine, cores: int, workers: int
) -> None:
    machine(cores, cuda=True)
    assert resolve_loader_settings().num_workers == workers


@pytest.mark.parametrize(("cores", "workers"), [(1, 0), (2, 0), (3, 0), (4, 1), (16, 4), (64, 8)])
def test_auto_workers_on_cpu_take_a_quarter_of_the_cores(machine, cores: int, workers: int) -> None:
    machine(cores)
    assert resolve_loader_settings().num_workers == workers


def test_the_training_device_decides_over_cuda_being_present(machine) -> None:
    machine(16, cuda=True)
    assert resolve_loader_settings(device_type="cpu") == LoaderSettings(4, 2, True, False)
    assert resolve_loader_settings(device_type="cuda") == LoaderSettings(8, 2, True, True)


def test_auto_without_workers_loads_in_process(machine) -> None:
    machine(2)
    assert resolve_loader_settings() == LoaderSettings(0, None, False, False)


def test_auto_with_workers_prefetches_and_keeps_them(machine) -> None:
    machine(4, cuda=True)
    assert resolve_loader_settings() == LoaderSettings(3, 2, True, True)


@pytest.mark.parametrize(
    ("cuda", "device_type", "pinned"),
    [(False, None, False), (True, None, True), (True, "cuda", True), (True, "cpu", False)],
)
def test_auto_pins_memory_only_for_cuda_training(
    machine, cuda: bool, device_type: str | None, pinned: bool
) -> None:
    machine(2, cuda=cuda)
    assert resolve_loader_settings(device_type=device_type).pin_memory is pinned


def test_explicit_settings_are_honoured(machine) -> None:
    machine(16, cuda=True)
    settings = resolve_loader_settings(
        num_workers=3, prefetch_factor=5, persistent_workers=False, pin_memory=False
    )
    assert settings == LoaderSettings(3, 5, False, False)


def test_explicit_zero_workers_drops_the_worker_only_settings(machine) -> None:
    machine(16)
    settings = resolve_loader_settings(num_workers=0, prefetch_factor=4, persistent_workers=True)
    assert settings == LoaderSettings(0, None, False, False)


def test_numeric_strings_count_as_numbers(machine) -> None:
    machine(16)  # KFP passes the run parameter as a string
    assert resolve_loader_settings(num_workers="2", prefetch_factor="AUTO").num_workers == 2


def test_the_config_default_is_auto() -> None:
    cfg = TrainConfig()
    assert (cfg.num_workers, cfg.prefetch_factor) == ("auto", "auto")
    assert (cfg.persistent_workers, cfg.pin_memory) == ("auto", "auto")


def test_make_loader_builds_the_resolved_dataloader(tmp_path: Path, machine) -> None:
    machine(4)
    dataset = ManifestDataset(
        build_tiny_dataset(tmp_path / "ds", per_split={"train": 2, "val": 1, "test": 1}),
        "train",
        lambda image: torch.zeros(1),
    )
    auto = make_loader(dataset, batch_size=2, shuffle=False, num_workers="auto")
    assert (auto.num_workers, auto.prefetch_factor, auto.persistent_workers) == (1, 2, True)
    assert auto.pin_memory is False
    assert sum(len(targets) for _, targets in auto) == len(dataset)
    plain = make_loader(dataset, batch_size=2, shuffle=False)
    assert (plain.num_workers, plain.prefetch_factor, plain.persistent_workers) == (0, None, False)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"num_workers": -1}, "params.yaml:train.num_workers=-1: must be >= 0 or 'auto'"),
        ({"num_workers": "many"}, "params.yaml:train.num_workers='many': must be >= 0 or 'auto'"),
        ({"prefetch_factor": 0}, "params.yaml:train.prefetch_factor=0: must be >= 1 or 'auto'"),
        (
            {"persistent_workers": "yes"},
            "params.yaml:train.persistent_workers='yes': must be true or false or 'auto'",
        ),
        # the type check comes first: neither a bool nor a string
        ({"pin_memory": 1}, "params.yaml:train.pin_memory: expected a string, got 1"),
    ],
)
def test_bad_loader_settings_are_refused_with_one_line(
    values: dict[str, object], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": values}))
    code = main(
        [
            "train",
            "--dataset",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "out"),
            "--params",
            str(params),
        ]
    )
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith(("INFO ", "WARNING "))]
    assert code == ConfigError.exit_code
    assert lines == [f"imgclf train: error: {message}"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("values", [{"num_workers": 0}, {"num_workers": "3"}, {"pin_memory": True}])
def test_explicit_values_pass_the_config(values: dict[str, object]) -> None:
    TrainConfig(**values)  # type: ignore[arg-type]


def test_an_unreadable_image_in_a_worker_is_one_line(tmp_path: Path, machine) -> None:
    machine(4)
    dataset_dir = build_tiny_dataset(tmp_path / "ds", per_split={"train": 2, "val": 1, "test": 1})
    dataset = ManifestDataset(dataset_dir, "train", lambda image: torch.zeros(1))
    dataset.samples[0][0].write_bytes(b"not an image")
    loader = make_loader(dataset, batch_size=2, shuffle=False, num_workers="auto")
    assert loader.num_workers == 1
    with pytest.raises(DataError) as raised:
        list(loader)
    assert "\n" not in str(raised.value)
    assert str(raised.value).startswith(f"{dataset.samples[0][0]}: cannot read image listed in")
