"""The train component (see component.py)."""

from components.train.component import train

__all__ = ["train"]
