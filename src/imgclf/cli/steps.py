"""``imgclf ingest|validate|train|lr-find|evaluate|deploy|data``: the steps as commands.

DVC stages call these. Each handler loads its params.yaml section, applies ``--set``
overrides, maps ``s3://`` locations to local temp dirs, and calls the step function. A params
file without the step's section is refused (``train: {}`` keeps every default): a wrong file
would otherwise run the step with defaults and nobody would notice. The step commands end
with the process that started them (``exit_with_parent``, see :mod:`imgclf.cli`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from imgclf import config
from imgclf.cli import add_params_flag
from imgclf.cli.helptext import add_command
from imgclf.cli.registry import registry_settings
from imgclf.data.shard_source import dataset_input
from imgclf.errors import ConfigError
from imgclf.storage.staging import local_input, local_output

log = logging.getLogger(__name__)


def _common(p: argparse.ArgumentParser) -> None:
    add_params_flag(p, "section of this step and s3 section are used")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of this step's section, e.g. --set epochs=2 (repeatable)",
    )


def _require_section(args: argparse.Namespace, section: str) -> None:
    """Refuse an existing params file that lacks ``section`` (only an absent default
    ``params.yaml`` means all defaults)."""
    if section not in args.params_values and Path(args.params).is_file():
        raise ConfigError(
            f"{args.params} has no `{section}:` section (add `{section}: {{}}` to run "
            "with every default)"
        )


def _load(cls: type, section: str, args: argparse.Namespace, **extra: Any) -> Any:
    _require_section(args, section)
    overrides = dict(config.parse_override(o) for o in args.overrides)
    overrides.update({k: v for k, v in extra.items() if v is not None})
    label = Path(args.params).name
    return config.section_of(args.params_values, cls, section, label, overrides)


def _image_size(text: str) -> int:
    """``--image-size`` of the ``data`` commands, within the bounds ``ingest.image_size`` has
    (a huge size used to end in a MemoryError after minutes of upscaling)."""
    low, high = config.IMAGE_SIZE_RANGE
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{value}: must be between {low} and {high}")
    return value


def _print_summary(summary: dict[str, Any], keys: tuple[str, ...]) -> None:
    shown = {k: summary[k] for k in keys if k in summary}
    print(json.dumps(shown, indent=2, sort_keys=True, default=str))


def _ingest(args: argparse.Namespace) -> int:
    from imgclf.steps import ingest

    cfg = _load(config.IngestConfig, "ingest", args, source=args.source)
    with local_output(args.out) as out:
        summary = ingest.run(cfg, out_dir=out)
    _print_summary(summary, ("source", "num_images", "num_errors", "counts", "hash"))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from imgclf.steps import validate

    cfg = _load(config.ValidateConfig, "validate", args)
    with local_input(args.dataset) as ds, local_output(args.out) as out:
        report = validate.run(cfg, dataset_dir=ds, out_dir=out)
    warnings = [e["name"] for e in report["expectations"] if not e["success"]]
    print(f"validation passed ({len(report['expectations'])} expectations)")
    if warnings:
        print(f"warnings (non-blocking): {', '.join(warnings)}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from imgclf.steps import train, train_launch

    train_launch.check_nproc(args.nproc)
    cfg = _load(config.TrainConfig, "train", args, checkpoint_dir=args.checkpoint_dir)
    live = Path(args.live) if args.live else None
    if args.nproc > 1:
        with dataset_input(args.dataset, cfg.data) as ds, local_output(args.out) as out:
            meta = train_launch.launch(
                cfg, dataset_dir=ds, out_dir=out, nproc=args.nproc, live_dir=live
            )
    else:
        with dataset_input(args.dataset, cfg.data) as ds, _rank_output(args.out) as out:
            meta = train.run(cfg, dataset_dir=ds, out_dir=out, live_dir=live)
    _print_summary(meta, ("architecture", "metrics"))
    return 0


@contextlib.contextmanager
def _rank_output(uri: str) -> Iterator[Path]:
    """``--out`` for this process: the real one on rank 0 (or without torchrun), a scratch
    dir on the other ranks of a distributed job (one per node under a TrainJob or
    PyTorchJob), which write nothing and must not publish an empty model over rank 0's."""
    from imgclf.training import distributed

    if distributed.from_env().is_main:
        with local_output(uri) as out:
            yield out
        return
    with tempfile.TemporaryDirectory(prefix="imgclf-rank-out-") as scratch:
        yield Path(scratch) / "model"


def _lr_find(args: argparse.Namespace) -> int:
    from imgclf.steps import train

    cfg = _load(config.TrainConfig, "train", args)
    with dataset_input(args.dataset, cfg.data) as ds, local_output(args.out) as out:
        result = train.lr_find(cfg, dataset_dir=ds, out_dir=out)
    _print_summary(result, ("suggested_lr", "plot", "curve"))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from imgclf.steps import evaluate

    cfg = _load(config.EvaluateConfig, "evaluate", args)
    with (
        dataset_input(args.dataset) as ds,
        local_input(args.model) as model,
        local_output(args.out) as out,
    ):
        metrics = evaluate.run(
            cfg, registry_settings(args), dataset_dir=ds, model_dir=model, out_dir=out
        )
    _print_summary(
        metrics,
        ("accuracy", "loss", "macro_f1", "top_k_accuracy", "passed", "reasons", "champion"),
    )
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from imgclf.steps import deploy

    cfg = _load(config.DeployConfig, "deploy", args)
    serve = config.section_of(
        args.params_values, config.ServeConfig, "serve", Path(args.params).name
    )
    with (
        local_input(args.model) as model,
        local_input(args.eval) as ev,
        dataset_input(args.dataset) as ds,
        local_output(args.out) as out,
    ):
        result = deploy.run(
            cfg,
            registry_settings(args),
            model_dir=model,
            eval_dir=ev,
            out_dir=out,
            dataset_dir=ds,
            serve=serve,
        )
    _print_summary(result, ("promoted", "model_name", "version", "alias", "canary", "reasons"))
    return 0


def _data_sample(args: argparse.Namespace) -> int:
    from imgclf.data.sources import materialize_source

    materialize_source(args.source, Path(args.out), image_size=args.image_size)
    print(f"wrote {args.source} to {args.out}")
    return 0


def _data_ensure(args: argparse.Namespace) -> int:
    from imgclf.data.versioned import ensure_data

    print(ensure_data(Path(args.dvc_file), sample=args.sample, image_size=args.image_size))
    return 0


def _add(
    sub: argparse._SubParsersAction,
    name: str,
    func: Callable[[argparse.Namespace], int],
    summary: str,
    *paths: tuple[str, str, str | None],
    examples: Sequence[tuple[str, str]],
    description: str | None = None,
    registry: bool = False,
) -> argparse.ArgumentParser:
    p = add_command(sub, name, summary, examples, description=description)
    for flag, helptext, default in paths:
        p.add_argument(
            flag,
            default=default,
            required=default is None,
            help=f"{helptext} (local path or s3://bucket/prefix)"
            + (" (default: %(default)s)" if default else ""),
        )
    if registry:
        p.add_argument("--registry", help="registry URI (default: params.yaml registry.uri)")
    _common(p)
    p.set_defaults(func=func, exit_with_parent=True)
    return p


def register(sub: argparse._SubParsersAction) -> None:
    """Add the step commands and ``data`` to the ``imgclf`` parser."""
    ds = ("--dataset", "dataset dir written by ingest", "out/dataset")
    model = ("--model", "model dir written by train", "out/model")
    p = _add(
        sub,
        "ingest",
        _ingest,
        "Copy, normalise and split raw images into a dataset dir.",
        ("--out", "dataset dir to write", "out/dataset"),
        description="Copy, normalise and split the raw images of ingest.source into a dataset "
        "dir: train/, val/ and test/ ImageFolder trees and a manifest.csv with every image's "
        "split, label and sha256.",
        examples=[
            ("the DVC stage: data/ (ingest.source) into out/dataset", "imgclf ingest"),
            (
                "from S3 to S3 (bucket is a placeholder for yours)",
                "imgclf ingest --source s3://bucket/raw/digits --out s3://bucket/runs/r1/dataset",
            ),
        ],
    )
    p.add_argument("--source", help="override ingest.source (sample:digits, dir, archive, s3://)")
    _add(
        sub,
        "validate",
        _validate,
        "Check the dataset with Great Expectations; fail on a blocking problem.",
        ds,
        ("--out", "validation dir (report.json, data_docs/)", "out/validation"),
        description="Run the Great Expectations suite (image sizes and modes, images per class "
        "and split, duplicates, class balance) on the dataset; fail on a blocking expectation.",
        examples=[
            (
                "the DVC stage",
                "imgclf validate --dataset out/dataset --out out/validation",
            ),
            (
                "allow more class imbalance this once",
                "imgclf validate --set max_imbalance_ratio=20",
            ),
        ],
    )
    p = _add(
        sub,
        "train",
        _train,
        "Train or fine-tune a classifier into a model dir.",
        ds,
        ("--out", "model dir to write", "out/model"),
        description="Train (or fine-tune) a classifier; writes weights, a serving export and "
        "model.json. Resumes from the newest checkpoint of the same run; on SIGTERM it "
        "checkpoints after the current batch and exits with code 75 (run it again to resume).",
        examples=[
            (
                "a quick run: two epochs of the small CNN, out/dataset into out/model",
                "imgclf train --set epochs=2 --set model=simple_cnn",
            ),
            (
                "dataset and model on S3 (bucket is a placeholder for yours)",
                "imgclf train --dataset s3://bucket/runs/r1/dataset --out s3://bucket/runs/r1/model",
            ),
        ],
    )
    p.add_argument(
        "--checkpoint-dir",
        help="override train.checkpoint_dir: a local dir that outlives a retry ('' disables)",
    )
    p.add_argument(
        "--live",
        metavar="DIR",
        help="also log every epoch with DVCLive into the local dir DIR, for dvc exp show and "
        "dvc plots (the DVC stage uses out/train; default: off)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train with N DistributedDataParallel processes on this machine (torchrun's "
        "launcher; one per GPU, or gloo on CPU); train.batch_size is per process (default: 1)",
    )
    _add(
        sub,
        "lr-find",
        _lr_find,
        "Plot loss against learning rate and suggest one.",
        ds,
        ("--out", "dir for lr_find.png and lr_find.csv", "out/lr_find"),
        description="Learning-rate range test on the training split: plots loss against LR "
        "and suggests a learning rate (what train.lr: auto does on its own).",
        examples=[
            (
                "writes out/lr_find/lr_find.png",
                "imgclf lr-find --dataset out/dataset --out out/lr_find",
            ),
            ("the same for the small CNN", "imgclf lr-find --set model=simple_cnn"),
        ],
    )
    _add(
        sub,
        "evaluate",
        _evaluate,
        "Score the model on the test split; decide if it may replace production.",
        ds,
        model,
        ("--out", "evaluation dir (metrics.json, confusion.csv, model card)", "out/eval"),
        description="Score the model on the test split and decide if it may replace "
        "production: its accuracy must reach evaluate.min_accuracy and lose at most "
        "evaluate.max_regression against the version the registry alias points to.",
        examples=[
            (
                "the DVC stage",
                "imgclf evaluate --dataset out/dataset --model out/model --out out/eval",
            ),
            (
                "compare with production in an S3 registry (bucket is a placeholder)",
                "imgclf evaluate --registry s3://bucket/registry",
            ),
        ],
        registry=True,
    )
    _add(
        sub,
        "deploy",
        _deploy,
        "Smoke-test, publish and promote a model that passed evaluation.",
        model,
        ("--dataset", "dataset dir whose test images the smoke test sends", "out/dataset"),
        ("--eval", "evaluation dir written by evaluate", "out/eval"),
        ("--out", "deploy dir (deploy.json, inferenceservice.yaml)", "out/deploy"),
        description="Smoke-test a model that passed evaluation on the real server, publish it "
        "to the registry, move the production alias (or start a canary), render its KServe "
        "InferenceService and, in a cluster, apply it and wait for Ready.",
        examples=[
            (
                "the DVC stage",
                "imgclf deploy --model out/model --eval out/eval --out out/deploy",
            ),
            ("start a 10% canary instead of promoting", "imgclf deploy --set canary_percent=10"),
        ],
        registry=True,
    )

    data = add_command(
        sub,
        "data",
        "Create or restore the DVC-versioned raw data/ folder.",
        [("what `make demo` runs first", "imgclf data ensure")],
    )
    dsub = data.add_subparsers(dest="data_command", metavar="<data command>", required=True)
    sample = add_command(
        dsub,
        "sample",
        "Write a source (default sample:digits) as raw ImageFolder images.",
        [
            (
                "the digits sample at 64 px into data/",
                "imgclf data sample --source sample:digits --out data --image-size 64",
            )
        ],
    )
    sample.add_argument("--source", default="sample:digits", help="default: %(default)s")
    sample.add_argument("--out", default="data", help="default: %(default)s")
    sample.add_argument("--image-size", type=_image_size, default=32, help="default: %(default)s")
    sample.set_defaults(func=_data_sample)
    ensure = add_command(
        dsub,
        "ensure",
        "Make data/ match data.dvc: keep, restore, pull or rebuild it.",
        [("data/ as data.dvc pins it", "imgclf data ensure --dvc-file data.dvc")],
        description="Make data/ match data.dvc: keep it if present (a changed one is reported, "
        "never overwritten), else restore it from the DVC cache, else `dvc pull` (when the "
        "remote has credentials and answers), else rebuild the embedded sample and prove it "
        "matches data.dvc.",
    )
    ensure.add_argument("--dvc-file", default="data.dvc", help="default: %(default)s")
    ensure.add_argument("--sample", default="sample:digits", help="default: %(default)s")
    ensure.add_argument("--image-size", type=_image_size, default=32, help="default: %(default)s")
    ensure.set_defaults(func=_data_ensure)
