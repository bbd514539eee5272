"""The check_retrain component (see component.py)."""

from components.check_retrain.component import check_retrain

__all__ = ["check_retrain"]
