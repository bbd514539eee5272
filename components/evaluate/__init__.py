"""The evaluate component (see component.py)."""

from components.evaluate.component import evaluate

__all__ = ["evaluate"]
