"""The validate component (see component.py)."""

from components.validate.component import validate

__all__ = ["validate"]
