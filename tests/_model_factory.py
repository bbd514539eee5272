"""Write model and evaluation dirs in the CONTRACTS.md layout without training anything.

Registry and deploy tests need real artifacts (a safetensors state dict, ``model.json``,
``history.csv``, optionally a ``torch.export`` program) whose weights differ on demand, but
must not depend on the train and evaluate steps. ``seed`` picks the weights, so two calls
with the same seed give byte-identical ``model.safetensors`` (the registry's identity of a
model) and different seeds give different ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imgclf.contracts import EVAL_REPORT_FILE, METRICS_FILE, MODEL_FILE, WEIGHTS_FILE
from imgclf.fsutil import write_json, write_text

INPUT_SIZE = (3, 8, 8)


def _tiny_net(num_classes: int, seed: int) -> Any:
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(INPUT_SIZE[0] * INPUT_SIZE[1] * INPUT_SIZE[2], num_classes),
    ).eval()


def build_model_dir(
    root: Path,
    *,
    seed: int = 0,
    classes: Sequence[str] = ("cat", "fish"),
    dataset_hash: str = "d" * 64,
    val_accuracy: float = 0.9,
    export: bool = False,
) -> Path:
    """A model dir at ``root``: weights, ``model.json``, ``history.csv`` (and ``model.pt2``).

    ``export`` runs ``torch.export`` (about a second), so only tests that care about the
    serving export ask for it.
    """
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    net = _tiny_net(len(classes), seed)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, root / WEIGHTS_FILE)
    if export:
        program = torch.export.export(net, (torch.zeros(1, *INPUT_SIZE),))
        torch.export.save(program, root / "model.pt2")
    write_json(
        root / MODEL_FILE,
        {
            "architecture": "tiny-linear",
            "classes": list(classes),
            "num_classes": len(classes),
            "input_size": list(INPUT_SIZE),
            "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25],
            "dataset_hash": dataset_hash,
            "params": {"model": "tiny-linear", "epochs": 1, "seed": seed},
            "git_commit": "0123456789abcdef0123456789abcdef01234567",
            "metrics": {"best_val_accuracy": val_accuracy, "best_val_loss": 0.3, "epochs": 1},
            "created_at": "2026-01-01T00:00:00+00:00",
            "torch_version": torch.__version__,
        },
    )
    write_text(
        root / "history.csv",
        "epoch,train_loss,train_acc,val_loss,val_acc,lr,seconds\n"
        f"1,0.5,0.8,0.3,{val_accuracy},0.001,0.1\n",
    )
    return root


def build_eval_dir(
    root: Path,
    *,
    passed: bool,
    accuracy: float = 0.97,
    reasons: Sequence[str] = (),
    classes: Sequence[str] = ("cat", "fish"),
) -> Path:
    """An evaluation dir at ``root``: a flat ``metrics.json`` carrying the ``passed`` flag and
    a ``report.json`` with the per-class scores and the gate's ``reasons``."""
    per_class = {
        c: {"precision": accuracy, "recall": accuracy, "f1": accuracy, "support": 10}
        for c in classes
    }
    write_json(
        root / METRICS_FILE,
        {
            "accuracy": accuracy,
            "loss": 0.2,
            "macro_f1": accuracy,
            "top_k_accuracy": 1.0,
            "passed": passed,
            "champion_accuracy": None,
        },
    )
    write_json(
        root / EVAL_REPORT_FILE,
        {
            "top_k": 2,
            "num_images": 10 * len(classes),
            "classes": list(classes),
            "per_class": per_class,
            "reasons": list(reasons),
            "champion": None,
        },
    )
    return root
