"""KFP component: ingest a source of labelled images into a split, hashed dataset artifact."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ingest(
    dataset: Output[Dataset],
    source: str,
    image_size: int,
    split_train: float,
    split_val: float,
    split_test: float,
    split_seed: int,
    image_format: str,
):
    """Run ``imgclf.steps.ingest`` and publish its dataset dir as a Dataset artifact.

    Args:
        dataset: Output dataset dir: ``images/<split>/<class>/``, ``manifest.csv`` and
            ``dataset.json``; its metadata carries the content hash, classes and counts.
        source: Where the images come from: ``sample:digits``, ``s3://bucket/prefix``, an
            http(s) archive URL, or a path inside the image.
        image_size: Side in pixels of images rendered by ``sample:`` sources.
        split_train: Fraction of each class that goes to the train split.
        split_val: Fraction of each class that goes to the validation split.
        split_test: Fraction of each class that goes to the test split.
        split_seed: Seed of the split shuffle, so a rerun assigns every image the same split.
        image_format: ``keep`` (good files byte for byte, others converted) or ``png``.
    """
    from pathlib import Path

    from imgclf import config
    from imgclf.steps import ingest as step

    cfg = config.build(
        config.IngestConfig,
        {
            "source": source,
            "image_size": image_size,
            "split": {"train": split_train, "val": split_val, "test": split_test},
            "seed": split_seed,
            "image_format": image_format,
        },
        "component:ingest",
    )
    summary = step.run(cfg, out_dir=Path(dataset.path))
    dataset.metadata.update(
        {
            "hash": summary["hash"],
            "classes": summary["classes"],
            "num_images": summary["num_images"],
            "num_errors": summary["num_errors"],
            "counts": summary["counts"],
        }
    )
