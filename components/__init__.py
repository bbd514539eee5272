"""Kubeflow Pipelines components: one thin ``@dsl.component`` adapter per step.

Each ``components/<step>/component.py`` only turns KFP artifacts and parameters into a call
of ``imgclf.steps.<step>.run`` (or another library function) and copies the result back into
typed KFP outputs. Every component runs in the one image built from the repository's
``Dockerfile`` (:data:`components._image.IMAGE`); the library is imported inside the
function body, so compiling a pipeline needs only ``kfp``.
"""
