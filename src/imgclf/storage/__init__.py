"""Artifact stores: one interface over the local filesystem and S3 (MinIO).

Steps, the registry and ingest speak to a :class:`Store`; ``open_store(uri)`` picks the
backend from the URI, so pointing a location at ``s3://bucket/prefix`` is a configuration
change, not a code change. The backends import :mod:`imgclf.storage.base`, never each other,
and only this package module knows them all.
"""

from pathlib import Path

from imgclf.storage.base import Store, is_published, is_remote, publish_tree, split_uri
from imgclf.storage.local import LocalStore


def open_store(uri: str | Path) -> Store:
    """A store rooted at ``uri``: a local path, or ``s3://bucket/prefix`` (the S3 settings
    the edge chose, see :func:`imgclf.storage.s3config.resolve_s3_settings`)."""
    text = str(uri)
    if is_remote(text):
        from imgclf.storage.s3 import S3Store  # minio is imported only when S3 is used

        return S3Store.from_uri(text)
    return LocalStore(Path(text))


__all__ = [
    "LocalStore",
    "Store",
    "is_published",
    "is_remote",
    "open_store",
    "publish_tree",
    "split_uri",
]
