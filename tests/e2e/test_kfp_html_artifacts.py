"""The pages the KFP UI shows for a run, opened in a real headless Chromium.

``imgclf pipeline run --local`` runs in a fresh checkout with tiny training settings; the
train task's ``training_curves`` and the evaluate task's ``misclassified`` HTML artifacts
it prints are then loaded by Debian's ``chromium`` (``apt-get install chromium``; ``.ci/run``
installs it). No Selenium or DevTools client: ``--dump-dom`` of a copy of each page with a
probe script appended reports every image's decoded and laid-out size, and
``--screenshot`` renders the page itself, as it is, for a look (kept under pytest's
``tmp_path``). The KFP UI shows these pages in a sandboxed iframe, which is why they must
render from the one file with no script and no network.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from _repo_copy import clone_repo, sh

pytestmark = pytest.mark.slow

CHROMIUM = next(
    (found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))), None
)
BROWSER_TIMEOUT_S = 120
WINDOW = (1280, 1600)
PAGES = {"training_curves": "curves html:", "misclassified": "misclassified:"}
# Appended to a copy of the page: once everything has loaded, write what the browser made of
# each <img> into the DOM, where --dump-dom shows it.
PROBE = """<script>
window.addEventListener("load", () => {
  const sizes = Array.from(document.images, (img) => {
    const box = img.getBoundingClientRect();
    return {complete: img.complete, naturalWidth: img.naturalWidth,
            naturalHeight: img.naturalHeight, width: box.width, height: box.height};
  });
  const out = document.createElement("pre");
  out.id = "imgclf-probe";
  out.textContent = JSON.stringify(sizes);
  document.body.appendChild(out);
});
</script>"""
PROBE_OUTPUT = re.compile(r'<pre id="imgclf-probe">(.*?)</pre>', re.S)


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The two HTML artifacts of one local run, by output name, as the CLI lists them."""
    repo = clone_repo(tmp_path_factory.mktemp("kfp-html"), min_accuracy=0.0)
    result = sh(repo, "imgclf", "pipeline", "run", "--local", timeout=1200)
    found = {}
    for name, label in PAGES.items():
        lines = [line for line in result.stdout.splitlines() if line.strip().startswith(label)]
        assert lines, f"no {label!r} line in the run summary:\n{result.stdout}"
        found[name] = Path(lines[0].strip().removeprefix(label).strip())
    return found


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=BROWSER_TIMEOUT_S,
        check=True,
    )


def image_sizes(page: Path, work: Path) -> list[dict[str, float]]:
    """What Chromium made of each ``<img>`` of ``page``: decoded and laid-out size."""
    text = page.read_text(encoding="utf-8")
    probe = work / f"{page.name}.probe.html"
    probe.write_text(text.replace("</body>", PROBE + "</body>", 1), encoding="utf-8")
    dom = _chromium(
        "--virtual-time-budget=10000", "--dump-dom", probe.as_uri(), profile=work / "profile"
    ).stdout
    match = PROBE_OUTPUT.search(dom)
    assert match, f"the probe did not run; DOM:\n{dom[:2000]}"
    return json.loads(html.unescape(match.group(1)))


def screenshot(page: Path, out: Path, work: Path) -> Image.Image:
    """A PNG of ``page`` as Chromium renders it, unchanged, saved at ``out``.

    A KFP artifact file has no extension, so a ``file://`` URL would show it as text; the
    page is rendered from a copy named ``.html`` (the KFP UI renders it as HTML by type).
    """
    copy = work / f"{page.name}.html"
    shutil.copyfile(page, copy)
    _chromium(f"--screenshot={out}", copy.as_uri(), profile=work / "profile")
    with Image.open(out) as shot:
        shot.load()
        return shot.copy()


def test_local_run_lists_both_pages(pages: dict[str, Path]) -> None:
    assert set(pages) == set(PAGES)
    for name, page in pages.items():
        assert page.is_file() and page.name == name
        assert page.parent.name == ("train" if name == "training_curves" else "evaluate")
        text = page.read_text(encoding="utf-8")
        assert text.startswith("<!DOCTYPE html>") and "data:image/png;base64," in text


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)",
)
@pytest.mark.parametrize("name", list(PAGES))
def test_page_images_render_in_chromium(pages: dict[str, Path], name: str, tmp_path: Path) -> None:
    page = pages[name]
    sizes = image_sizes(page, tmp_path)
    expected = page.read_text(encoding="utf-8").count('<img src="data:image/png;base64,')
    assert len(sizes) == expected >= 1
    for size in sizes:
        assert size["complete"] and size["naturalWidth"] > 0 and size["naturalHeight"] > 0, size
        assert size["width"] > 0 and size["height"] > 0, size

    shot = screenshot(page, tmp_path / f"{name}.png", tmp_path)
    assert shot.size == WINDOW
    extrema = ImageStat.Stat(shot.convert("L")).extrema[0]
    assert extrema[1] - extrema[0] > 100, "the screenshot is blank"
    # Rendered, not shown as source text: the curves and the true/predicted labels are in
    # colour, the source view is black on white.
    assert ImageStat.Stat(shot.convert("HSV")).extrema[1][1] > 100, "no colour: not rendered"
