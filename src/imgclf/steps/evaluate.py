"""EVALUATE step: score a trained model on the test split and decide whether it may ship.

The gate has three parts: a test split that can judge the model at all (at least two classes,
and every class of the model in it, since a one-class dataset scores 1.0 with any model), an
absolute floor (``evaluate.min_accuracy``) and a comparison with the production champion of
the registry. The champion is re-evaluated on the *current* test
split whenever its classes match, because accuracies measured on different test sets are not
comparable (a harder new test split would otherwise block every challenger, an easier one
would wave a regression through). Only when that is impossible (other classes, missing
model) is the champion's recorded accuracy used. Every decision is explained in ``reasons``.

The evaluation dir keeps ``metrics.json`` to flat scalars (what ``dvc metrics show`` and
``dvc exp show`` list); the per-class scores, the confusion matrix, the reasons and the
champion go to ``report.json`` beside it, and ``per_class.csv`` is the per-class bar chart
of ``dvc plots`` (see :mod:`imgclf.contracts`).
"""

from __future__ import annotations

import csv
import io
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from imgclf import config as config_mod
from imgclf.config import EvaluateConfig, RegistryConfig
from imgclf.contracts import (
    DATASET_FILE,
    EVAL_REPORT_FILE,
    HISTORY_FILE,
    METRICS_FILE,
    MODEL_FILE,
    PER_CLASS_COLUMNS,
    PER_CLASS_FILE,
    PREDICTIONS_COLUMNS,
    PREDICTIONS_FILE,
    read_dataset_info,
)
from imgclf.data.loader import ManifestDataset, make_loader
from imgclf.data.shard_reader import ShardDataset
from imgclf.data.shard_source import use_shards
from imgclf.errors import DataError, ImgclfError, RegistryError, StorageError
from imgclf.fsutil import atomic_dir, write_json, write_text
from imgclf.registry import Champion, ModelRegistry

log = logging.getLogger(__name__)

# Accuracies are fractions of whole images; this only absorbs float rounding in the subtraction.
_EPS = 1e-9


def _score(
    model_dir: Path, dataset_dir: Path, cfg: EvaluateConfig, device: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluate a model dir on the test split: (engine metrics with outputs, model.json)."""
    from imgclf.training import engine
    from imgclf.training.models import load_model_dir
    from imgclf.training.presets import ClassificationPresetEval

    model, meta = load_model_dir(model_dir)
    transform = ClassificationPresetEval(
        size=tuple(meta["input_size"][1:]), mean=meta["mean"], std=meta["std"]
    )
    dataset: ManifestDataset | ShardDataset
    if use_shards(dataset_dir):  # no images/ tree: the test shards, in the same order
        dataset = ShardDataset(dataset_dir, "test", transform)
        paths = dataset.paths
    else:
        dataset = ManifestDataset(dataset_dir, "test", transform)
        paths = [path.relative_to(dataset_dir).as_posix() for path, _ in dataset.samples]
    if len(dataset) == 0:
        raise DataError(f"{dataset_dir}/manifest.csv: no usable images in split 'test'")
    loader = make_loader(dataset, batch_size=cfg.batch_size, shuffle=False)
    amp_dtype, _ = engine.amp_settings(device)
    model = engine.prepare_model(model, device)
    result = engine.evaluate(
        model, loader, device, top_k=cfg.top_k, amp_dtype=amp_dtype, keep_outputs=True
    )
    result["paths"] = paths
    return result, meta


def _per_class(classes: list[str], targets: list[int], predictions: list[int]) -> dict[str, Any]:
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, predictions, labels=labels, zero_division=0
    )
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(classes)
    }
    return {
        "per_class": per_class,
        "macro_f1": float(
            f1_score(targets, predictions, labels=labels, average="macro", zero_division=0)
        ),
        "matrix": confusion_matrix(targets, predictions, labels=labels).tolist(),
    }


def _champion_accuracy(
    reg: ModelRegistry,
    registry: RegistryConfig,
    champion: Champion,
    classes: list[str],
    dataset_dir: Path,
    cfg: EvaluateConfig,
    device: Any,
) -> tuple[float | None, str]:
    """(accuracy, how it was obtained) for the champion; accuracy None when unknown.

    Its model is downloaded (checked against the registry's sha256s) only when its classes
    match, since only then can it be scored on this test split. A store that fails
    (StorageError), and a champion whose stored files no longer match its READY record
    (VersionIntegrityError, also a StorageError), fail the lookup: the gate must not score
    or trust a tampered model. A champion that cannot be scored for another reason falls
    back to its recorded accuracy, with the reason.
    """
    why_not = "its model is missing from the registry"
    if champion.model_json is not None:
        if champion.model_json.get("classes") != classes:
            why_not = "its classes differ from the current dataset's"
        else:
            try:
                with tempfile.TemporaryDirectory(prefix="imgclf-champion-") as tmp:
                    model_dir = reg.download(
                        registry.model_name, champion.version, Path(tmp) / "model"
                    )
                    result, _ = _score(model_dir, dataset_dir, cfg, device)
                return float(result["accuracy"]), "re-evaluated on the current test split"
            except StorageError:
                raise
            except (ImgclfError, OSError, ValueError, KeyError) as exc:
                why_not = f"it could not be re-evaluated ({exc})"
    recorded = champion.metrics.get("accuracy")
    if isinstance(recorded, int | float):
        return float(recorded), f"recorded {METRICS_FILE} accuracy ({why_not})"
    return None, f"no recorded accuracy either ({why_not})"


def _compare_with_champion(
    registry: RegistryConfig,
    classes: list[str],
    dataset_dir: Path,
    cfg: EvaluateConfig,
    device: Any,
) -> dict[str, Any] | None:
    """``{version, accuracy, source}`` of the champion behind ``registry.alias``; None when
    there is none yet (first deployment)."""
    try:
        reg = ModelRegistry.open(registry.uri)
        champion = reg.champion(registry.model_name, registry.alias)
        if champion is None:
            return None
        accuracy, source = _champion_accuracy(
            reg, registry, champion, classes, dataset_dir, cfg, device
        )
    except StorageError as exc:
        raise RegistryError(
            f"registry {registry.uri}: cannot look up the champion: {exc}"
        ) from None
    return {"version": champion.version, "accuracy": accuracy, "source": source}


def _test_split_problem(classes: list[str], targets: list[int]) -> str | None:
    """Why the test split cannot judge this model, or None when it can.

    On a test split of one class, accuracy cannot tell a classifier from a constant that
    always answers that class (a one-class dataset scores 1.0); a class of the model with no
    test images has errors nobody measured. Either way the number the gate compares is not
    evidence that the model works.
    """
    present = sorted({classes[t] for t in targets})
    if len(present) < 2:
        return (
            f"the test split holds {len(present)} class(es) ({', '.join(present)}): accuracy "
            "on it cannot tell a classifier from a constant answer"
        )
    missing = [c for c in classes if c not in present]
    if missing:
        return f"class(es) {', '.join(missing)} of the model have no images in the test split"
    return None


def _gate(
    accuracy: float,
    cfg: EvaluateConfig,
    champion: dict[str, Any] | None,
    test_problem: str | None = None,
) -> tuple[bool, list[str]]:
    reasons = []
    passed = accuracy + _EPS >= cfg.min_accuracy
    relation = ">=" if passed else "<"
    reasons.append(f"accuracy {accuracy:.4f} {relation} min_accuracy {cfg.min_accuracy:.4f}")
    if test_problem is not None:
        reasons.append(f"{test_problem}; not a meaningful test, failing closed")
        passed = False
    if champion is None:
        reasons.append("no production champion in the registry: nothing to compare against")
        return passed, reasons
    version, champ_acc, source = champion["version"], champion["accuracy"], champion["source"]
    if champ_acc is None:
        reasons.append(f"champion v{version} cannot be compared: {source}; failing closed")
        return False, reasons
    floor = champ_acc - cfg.max_regression
    ok = accuracy + _EPS >= floor
    reasons.append(
        f"accuracy {accuracy:.4f} {'>=' if ok else '<'} champion v{version} {champ_acc:.4f} "
        f"- max_regression {cfg.max_regression:.4f} = {floor:.4f} (champion {source})"
    )
    return passed and ok, reasons


def run(
    cfg: EvaluateConfig,
    registry: RegistryConfig,
    *,
    dataset_dir: Path,
    model_dir: Path,
    out_dir: Path,
) -> dict[str, Any]:
    """Evaluate ``model_dir`` on the test split of ``dataset_dir``; write the evaluation dir.

    Returns the ``metrics.json`` scalars together with the ``report.json`` content (their
    keys do not overlap); ``passed`` is the gate decision. A failed gate is a result, not an
    error: deploy reads ``passed`` and refuses to promote.
    """
    from imgclf.training import engine

    dataset_dir, model_dir = Path(dataset_dir), Path(model_dir)
    device = engine.select_device("auto")
    info = read_dataset_info(dataset_dir)
    result, meta = _score(model_dir, dataset_dir, cfg, device)
    classes = list(meta["classes"])
    if classes != list(info["classes"]):
        raise DataError(
            f"{model_dir / MODEL_FILE} classes {classes} differ from "
            f"{dataset_dir / DATASET_FILE} classes {info['classes']}: evaluate on the dataset "
            "the model was trained for"
        )
    breakdown = _per_class(classes, result["targets"], result["predictions"])
    champion = _compare_with_champion(registry, classes, dataset_dir, cfg, device)
    test_problem = _test_split_problem(classes, result["targets"])
    passed, reasons = _gate(result["accuracy"], cfg, champion, test_problem)
    metrics = {
        "accuracy": result["accuracy"],
        "loss": result["loss"],
        "macro_f1": breakdown["macro_f1"],
        "top_k_accuracy": result["top_k_accuracy"],
        "passed": passed,
        "champion_accuracy": champion["accuracy"] if champion else None,
    }
    report = {
        "top_k": result["top_k"],
        "num_images": result["images"],
        "classes": classes,
        "per_class": breakdown["per_class"],
        "confusion_matrix": breakdown["matrix"],
        "reasons": reasons,
        "champion": champion,
        "model": {
            "architecture": meta["architecture"],
            "dataset_hash": meta.get("dataset_hash", ""),
            "git_commit": meta.get("git_commit", "unknown"),
        },
        "dataset_hash": info.get("hash", ""),
    }
    for reason in reasons:
        log.info("gate: %s", reason)
    _write_eval_dir(Path(out_dir), metrics, report, result, meta, model_dir, cfg, registry)
    return {**metrics, **report}


def _per_class_csv(report: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PER_CLASS_COLUMNS)
    writer.writerows(
        (name, f"{m['precision']:.6f}", f"{m['recall']:.6f}", f"{m['f1']:.6f}", m["support"])
        for name, m in report["per_class"].items()
    )
    return buf.getvalue()


def _write_eval_dir(
    out_dir: Path,
    metrics: dict[str, Any],
    report: dict[str, Any],
    result: dict[str, Any],
    meta: dict[str, Any],
    model_dir: Path,
    cfg: EvaluateConfig,
    registry: RegistryConfig,
) -> None:
    classes = report["classes"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    writer.writerows(
        (classes[t], classes[p])
        for t, p in zip(result["targets"], result["predictions"], strict=True)
    )
    per_file = io.StringIO()
    writer = csv.writer(per_file, lineterminator="\n")
    writer.writerow(PREDICTIONS_COLUMNS)
    writer.writerows(
        (path, classes[t], classes[p], f"{probs[p]:.6f}")
        for path, t, p, probs in zip(
            result["paths"],
            result["targets"],
            result["predictions"],
            result["probabilities"],
            strict=True,
        )
    )
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / METRICS_FILE, metrics)
        write_json(tmp / EVAL_REPORT_FILE, report)
        write_text(tmp / PER_CLASS_FILE, _per_class_csv(report))
        write_text(tmp / "confusion.csv", buf.getvalue())
        write_text(tmp / PREDICTIONS_FILE, per_file.getvalue())
        write_json(
            tmp / "confusion_matrix.json",
            {"classes": classes, "matrix": report["confusion_matrix"]},
        )
        write_text(tmp / "model_card.md", model_card(metrics, report, meta))
        if (model_dir / HISTORY_FILE).is_file():
            shutil.copyfile(model_dir / HISTORY_FILE, tmp / HISTORY_FILE)
        write_json(
            tmp / "config.json",
            {"evaluate": config_mod.to_dict(cfg), "registry": config_mod.to_dict(registry)},
        )


def model_card(metrics: dict[str, Any], report: dict[str, Any], meta: dict[str, Any]) -> str:
    """A short markdown model card: what the model is, what it was tested on, the gate."""
    pretrained = meta.get("params", {}).get("pretrained", "none")
    classes = ", ".join(f"`{c}`" for c in meta["classes"])
    size = "x".join(str(d) for d in meta["input_size"])
    lines = [
        f"# Model card: {meta['architecture']}",
        "",
        "## Model",
        "",
        f"- architecture: `{meta['architecture']}`, pretrained `{pretrained}`",
        f"- classes ({meta['num_classes']}): {classes}",
        f"- input: {size}, mean {meta['mean']}, std {meta['std']}",
        f"- trained on dataset `{meta.get('dataset_hash', '')}`",
        f"- code commit `{meta.get('git_commit', 'unknown')}`",
        f"- created {meta.get('created_at', '')} with torch {meta.get('torch_version', '')}",
        "",
        f"## Test metrics (dataset `{report['dataset_hash']}`, {report['num_images']} images)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| accuracy | {metrics['accuracy']:.4f} |",
        f"| top-{report['top_k']} accuracy | {metrics['top_k_accuracy']:.4f} |",
        f"| loss | {metrics['loss']:.4f} |",
        f"| macro F1 | {metrics['macro_f1']:.4f} |",
        "",
        "## Per class",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |"
        for name, m in report["per_class"].items()
    ]
    lines += ["", f"## Gate: {'PASSED' if metrics['passed'] else 'FAILED'}", ""]
    lines += [f"- {reason}" for reason in report["reasons"]]
    return "\n".join(lines) + "\n"
