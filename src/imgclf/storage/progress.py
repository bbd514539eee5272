"""A progress bar for one tree transfer: files done and bytes done, on stderr.

Only drawn when stderr is a terminal (tqdm's ``disable=None``), so DVC logs, KFP pod logs
and captured test output stay free of carriage returns; transfers shorter than
:data:`DELAY_S` never draw one. The bar is advanced from the transfer's worker threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tqdm import tqdm

DELAY_S = 0.5  # a transfer that ends sooner shows nothing


class TransferProgress:
    """Files (the counter) and bytes (the postfix) of one transfer."""

    def __init__(self, bar: tqdm, total_bytes: int) -> None:
        self._bar = bar
        self._total = bar.format_sizeof(total_bytes, "B", 1024)
        self.shown = not bar.disable  # drawn: stderr is a terminal (tqdm disables on close)
        self.files = 0
        self.bytes = 0
        # tqdm locks its drawing, not its counter (``self.n += n``): workers take turns here
        self._lock = threading.Lock()

    def file_done(self, nbytes: int) -> None:
        """Count one finished file of ``nbytes`` bytes."""
        with self._lock:
            self.files += 1
            self.bytes += nbytes
            if self.shown:
                done = self._bar.format_sizeof(self.bytes, "B", 1024)
                self._bar.set_postfix_str(f"{done}/{self._total}", refresh=False)
                self._bar.update(1)

    def counting(self, task: Callable[[], None], nbytes: int) -> Callable[[], None]:
        """``task`` (one file's transfer), then :meth:`file_done` once it has succeeded."""

        def run() -> None:
            task()
            self.file_done(nbytes)

        return run


@contextmanager
def transfer_progress(what: str, files: int, total_bytes: int) -> Iterator[TransferProgress]:
    """A bar titled ``what`` for ``files`` files of ``total_bytes`` bytes, removed at the end
    whether the transfer succeeded or not (its error is the line that matters then)."""
    from tqdm import tqdm  # the CLI starts without it (STYLE rule 10)

    with tqdm(
        total=files,
        desc=what,
        unit="file",
        disable=None,
        leave=False,
        delay=DELAY_S,
        dynamic_ncols=True,
    ) as bar:
        yield TransferProgress(bar, total_bytes)


def file_size(path: Path) -> int:
    """Size of a local file for the bar; 0 when it cannot be read (the transfer says why)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0
