"""A store that fails the way a killed deploy does, for registry tests."""

from __future__ import annotations

from typing import Any

from imgclf.storage import Store


class CrashOnReady:
    """A real store that dies when asked to write a ``READY`` marker, like a pod killed
    mid-publish: everything else of the version lands."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.uri = inner.uri

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)

    def write_bytes(self, key: str, data: bytes) -> None:
        if key.endswith("/READY"):
            raise OSError("simulated crash before READY")
        self.inner.write_bytes(key, data)
