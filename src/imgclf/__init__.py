"""imgclf: one library for the ingest -> validate -> train -> evaluate -> deploy pipeline.

DVC stages (``dvc.yaml``) and Kubeflow components (``components/``) are thin adapters over
``imgclf.steps.<step>.run``. Importing this package has no side effects and imports no heavy
dependency (torch, great_expectations): each step imports what it needs.
"""

__version__ = "0.1.0"
