"""The ingest component (see component.py)."""

from components.ingest.component import ingest

__all__ = ["ingest"]
