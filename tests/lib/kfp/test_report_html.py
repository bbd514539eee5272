"""The HTML pages the train and evaluate components publish for the KFP UI, on tiny files."""

from __future__ import annotations

import base64
import csv
import io
import re
from pathlib import Path

import pytest
from PIL import Image

from imgclf.contracts import PREDICTIONS_COLUMNS, PREDICTIONS_FILE
from imgclf.kfp.report_html import (
    HISTORY_FILE,
    curves_html,
    misclassified_html,
    write_curves_page,
    write_misclassified_page,
)

HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")
DATA_URI = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
EVIL = "<script>alert(1)</script>"


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[tuple[object, ...]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def _images(page: str) -> list[Image.Image]:
    """Every inline image of ``page``, decoded: each must be a PNG of non-zero size."""
    images = []
    for encoded in DATA_URI.findall(page):
        img = Image.open(io.BytesIO(base64.b64decode(encoded, validate=True)))
        assert img.format == "PNG"
        img.load()
        assert img.width > 0 and img.height > 0
        images.append(img)
    return images


def _self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page  # nothing for the UI's sandboxed iframe to refuse
    assert not re.search(r"(src|href)=\"(?!data:)", page)  # no external resource


def _eval_dir(tmp_path: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    eval_dir = tmp_path / "eval"
    _write_csv(eval_dir / PREDICTIONS_FILE, PREDICTIONS_COLUMNS, rows)
    return eval_dir


def _dataset(tmp_path: Path, names: dict[str, tuple[int, int]]) -> Path:
    root = tmp_path / "dataset"
    for rel, size in names.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", size, color=200).save(root / rel)
    return root


def test_curves_page_embeds_the_plot_and_tabulates_every_epoch(tmp_path: Path) -> None:
    history = _write_csv(
        tmp_path / HISTORY_FILE,
        HISTORY_COLUMNS,
        [
            (1, 1.2, 0.4, 1.1, 0.5, 0.01, 0.5),
            (2, 0.8, 0.7, 0.7, 0.75, 0.005, 0.5),
            (3, 0.5, 0.85, 0.9, 0.7, 0.001, 0.5),
        ],
    )
    page = curves_html(history)
    _self_contained(page)
    (plot,) = _images(page)
    assert plot.width > 400 and plot.height > 200
    assert page.count("<tr>") == 1 + 3  # header and one row per epoch
    assert "lowest validation loss 0.7 at epoch 2" in page

    write_curves_page(tmp_path, tmp_path / "page.html")
    assert (tmp_path / "page.html").read_text(encoding="utf-8") == page


def test_curves_page_without_epochs_says_so(tmp_path: Path) -> None:
    page = curves_html(_write_csv(tmp_path / HISTORY_FILE, HISTORY_COLUMNS, []))
    _self_contained(page)
    assert "No epoch was recorded" in page and _images(page) == []


def test_worst_misclassified_first_with_true_and_predicted_labels(tmp_path: Path) -> None:
    dataset = _dataset(
        tmp_path,
        {
            "images/test/cat/a.png": (8, 8),  # upscaled to the thumbnail
            "images/test/cat/b.png": (300, 150),  # shrunk, aspect kept
            "images/test/dog/c.png": (20, 20),
            "images/test/dog/d.png": (20, 20),
        },
    )
    eval_dir = _eval_dir(
        tmp_path,
        [
            ("images/test/cat/a.png", "cat", "dog", "0.610000"),
            ("images/test/cat/b.png", "cat", "dog", "0.990000"),
            ("images/test/dog/c.png", "dog", "dog", "0.999000"),  # right: not shown
            ("images/test/dog/d.png", "dog", "cat", "0.700000"),
        ],
    )
    page = misclassified_html(eval_dir, dataset, limit=2, size=96)
    _self_contained(page)
    assert "3 of 4 test images misclassified. Shown: the 2 worst," in page
    images = _images(page)
    assert [img.size for img in images] == [(96, 48), (96, 96)]
    assert page.index("b.png") < page.index("d.png")  # most confident first
    assert "a.png" not in page and "c.png" not in page  # beyond the limit; right
    assert "(99.0%)" in page and "(70.0%)" in page

    write_misclassified_page(eval_dir, dataset, tmp_path / "page.html")
    assert (tmp_path / "page.html").read_text(encoding="utf-8").count("<figure>") == 3


def test_labels_and_paths_are_escaped(tmp_path: Path) -> None:
    rel = f"images/test/{EVIL}/x.png"
    dataset = _dataset(tmp_path, {rel: (10, 10)})
    eval_dir = _eval_dir(tmp_path, [(rel, EVIL, f'"><img src=x onerror=alert(1)>{EVIL}', "0.9")])
    page = misclassified_html(eval_dir, dataset)
    _self_contained(page)
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img src=x" not in page and "&quot;&gt;&lt;img src=x onerror" in page
    assert len(_images(page)) == 1


def test_history_values_are_escaped(tmp_path: Path) -> None:
    history = _write_csv(
        tmp_path / HISTORY_FILE, HISTORY_COLUMNS, [(EVIL, 1.0, 0.5, 1.0, 0.5, 0.1, 1.0)]
    )
    page = curves_html(history)
    assert EVIL not in page and "&lt;script&gt;" in page


def test_no_misclassified_images_gives_a_clear_message(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path, {"images/test/cat/a.png": (8, 8)})
    eval_dir = _eval_dir(tmp_path, [("images/test/cat/a.png", "cat", "cat", "0.9")])
    page = misclassified_html(eval_dir, dataset)
    _self_contained(page)
    assert "No misclassified images: all 1 test images were right." in page
    assert _images(page) == []


@pytest.mark.parametrize("rel", ["images/test/cat/gone.png", "../outside.png"])
def test_unreadable_or_outside_image_keeps_its_caption(tmp_path: Path, rel: str) -> None:
    (tmp_path / "outside.png").parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (4, 4)).save(tmp_path / "outside.png")
    dataset = _dataset(tmp_path, {"images/test/cat/a.png": (8, 8)})
    eval_dir = _eval_dir(tmp_path, [(rel, "cat", "dog", "0.8")])
    page = misclassified_html(eval_dir, dataset)
    assert "image not readable" in page and 'predicted <b class="pred">dog</b>' in page
    assert _images(page) == []
