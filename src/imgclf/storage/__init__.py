"""Artifact stores: one interface over the local filesystem and S3 (MinIO).

Steps, the registry and ingest speak to a :class:`Store`; ``open_store(uri)`` picks the
backend from the URI, so pointing a location at ``s3://bucket/prefix`` is a configuration
change, not a code change.
"""

from imgclf.storage.base import (
    Store,
    is_published,
    is_remote,
    open_store,
    publish_tree,
    split_uri,
)
from imgclf.storage.local import LocalStore

__all__ = [
    "LocalStore",
    "Store",
    "is_published",
    "is_remote",
    "open_store",
    "publish_tree",
    "split_uri",
]
