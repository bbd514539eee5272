"""The deploy component (see component.py)."""

from components.deploy.component import deploy

__all__ = ["deploy"]
