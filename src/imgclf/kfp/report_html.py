"""Self-contained HTML pages for the KFP UI: training curves and the worst misclassified images.

The KFP UI shows an ``HTML`` artifact in a sandboxed iframe without its neighbours and
without network access to anything else, so every page here is one file: inline CSS, images
as base64 PNG data URIs, no scripts. Labels and paths come from the user's folder names and
are escaped wherever they appear.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from imgclf.contracts import HISTORY_FILE, read_eval_predictions

"""The per-epoch record train writes into the model dir (``imgclf.steps.train``)."""
THUMBNAIL_PX = 96
MISCLASSIFIED_LIMIT = 24
_CURVES = (("loss", "train_loss", "val_loss"), ("accuracy", "train_acc", "val_acc"))
_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:16px;color:#222}"
    "table{border-collapse:collapse;font-size:13px}"
    "th,td{border:1px solid #ccc;padding:2px 8px;text-align:right}"
    ".grid{display:flex;flex-wrap:wrap;gap:12px}"
    "figure{margin:0;width:140px;text-align:center;font-size:12px}"
    "figure img{image-rendering:pixelated;border:1px solid #999}"
    "figcaption small{overflow-wrap:anywhere;color:#666}"
    "img.plot{max-width:100%;height:auto}"
    ".true{color:#1a7f37}.pred{color:#cf222e}"
)


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )


def _png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _number(text: str | None, missing: float = math.nan) -> float:
    """``text`` as a float; ``missing`` when empty, unparsable or NaN (sorting needs order)."""
    try:
        value = float(text) if text not in (None, "") else math.nan
    except ValueError:
        value = math.nan
    return missing if math.isnan(value) else value


def _curves_png(rows: Sequence[Mapping[str, str]]) -> bytes:
    # The object API with an explicit Agg canvas (as in training.lr_finder): headless, and no
    # global pyplot state or backend change for the rest of the process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [_number(r.get("epoch")) for r in rows]
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    for ax, (name, train_key, val_key) in zip(fig.subplots(1, 2), _CURVES, strict=True):
        ax.plot(epochs, [_number(r.get(train_key)) for r in rows], marker="o", label="train")
        ax.plot(epochs, [_number(r.get(val_key)) for r in rows], marker="o", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _cell(row: Mapping[str, Any], column: str) -> str:
    """A CSV value for the page, escaped; empty when the row lacks it."""
    value = row.get(column)
    return html.escape("" if value is None else str(value))


def _table(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(r, c)}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def curves_html(history_csv: str | Path) -> str:
    """A page with the per-epoch train/validation loss and accuracy, plotted and tabulated.

    ``history_csv`` is the model dir's ``history.csv`` (one row per epoch: ``epoch``,
    ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``, ``lr``, ``seconds``).
    """
    with Path(history_csv).open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    title = "Training curves"
    if not rows:
        return _page(title, "<p>No epoch was recorded in history.csv.</p>")
    best = min(rows, key=lambda r: _number(r.get("val_loss"), math.inf))
    summary = (
        f"<p>{len(rows)} epoch(s); lowest validation loss "
        f"{_cell(best, 'val_loss')} at epoch {_cell(best, 'epoch')} "
        f"(validation accuracy {_cell(best, 'val_acc')}).</p>"
    )
    image = (
        f'<img src="{_png_data_uri(_curves_png(rows))}" class="plot" width="1000" height="400" '
        'alt="train and validation loss and accuracy per epoch">'
    )
    return _page(title, summary + image + "<h2>Per epoch</h2>" + _table(columns, rows))


def _thumbnail_png(path: Path, size: int) -> bytes:
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img.load()
        if img.mode not in ("L", "RGB", "RGBA"):
            img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
        # Tiny inputs (8x8 digits) are blown up with hard edges, large ones smoothed down.
        upscale = max(img.size) < size
        method = Image.Resampling.NEAREST if upscale else Image.Resampling.LANCZOS
        thumb = ImageOps.contain(img, (size, size), method=method)
    buf = io.BytesIO()
    thumb.save(buf, format="PNG")
    return buf.getvalue()


def _inside(root: Path, relative: str) -> Path | None:
    """``root/relative`` if it stays inside ``root`` (the CSV is data, not a path to trust)."""
    base = root.resolve()
    path = (base / relative).resolve()
    return path if path.is_relative_to(base) else None


def _figure(row: Mapping[str, str], dataset_dir: Path, size: int) -> str:
    actual, predicted = html.escape(row["actual"]), html.escape(row["predicted"])
    probability = _number(row.get("probability"))
    path = _inside(dataset_dir, row["path"])
    try:
        if path is None:
            raise OSError("outside the dataset dir")
        image = f'<img src="{_png_data_uri(_thumbnail_png(path, size))}" alt="{actual}">'
    except OSError as exc:  # a missing or undecodable file still gets its caption
        image = f"<p>image not readable: {html.escape(str(exc))}</p>"
    return (
        f"<figure>{image}<figcaption>"
        f'true <b class="true">{actual}</b><br>'
        f'predicted <b class="pred">{predicted}</b> ({probability:.1%})<br>'
        f"<small>{html.escape(row['path'])}</small></figcaption></figure>"
    )


def misclassified_html(
    eval_dir: str | Path,
    dataset_dir: str | Path,
    *,
    limit: int = MISCLASSIFIED_LIMIT,
    size: int = THUMBNAIL_PX,
) -> str:
    """A grid of the ``limit`` worst misclassified test images, captioned true/predicted.

    The worst are the wrong predictions the model was most sure of (highest predicted
    probability), read from the evaluation's ``predictions.csv`` in ``eval_dir``; each image
    is read from ``dataset_dir`` (the paths are relative to it) and shown at most ``size``
    pixels on a side.
    """
    rows = read_eval_predictions(eval_dir)
    wrong = [r for r in rows if r["actual"] != r["predicted"]]
    wrong.sort(key=lambda r: (-_number(r.get("probability"), -math.inf), r["path"]))
    title = "Worst misclassified test images"
    if not wrong:
        return _page(
            title, f"<p>No misclassified images: all {len(rows)} test images were right.</p>"
        )
    shown = wrong[: max(limit, 0)]
    summary = (
        f"<p>{len(wrong)} of {len(rows)} test images misclassified. Shown: "
        f"{'all of them' if len(shown) == len(wrong) else f'the {len(shown)} worst'}, "
        "ordered by the probability the model gave its wrong answer, highest first.</p>"
    )
    grid = "".join(_figure(r, Path(dataset_dir), size) for r in shown)
    return _page(title, f'{summary}<div class="grid">{grid}</div>')


def write_curves_page(model_dir: Path, page: Path) -> None:
    """Write :func:`curves_html` of the model dir's ``history.csv`` to ``page``."""
    page.write_text(curves_html(model_dir / HISTORY_FILE), encoding="utf-8")


def write_misclassified_page(eval_dir: Path, dataset_dir: Path, page: Path) -> None:
    """Write :func:`misclassified_html` of an evaluation of ``dataset_dir`` to ``page``."""
    page.write_text(misclassified_html(eval_dir, dataset_dir), encoding="utf-8")
