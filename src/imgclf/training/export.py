"""The serving artifact: the trained model as a ``torch.export`` program.

A program, not a pickle: the server loads it without unpickling anything, and it needs no
Python class of ours to run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Largest batch the exported program accepts; export needs a finite bound to reason about.
MAX_EXPORT_BATCH = 4096


def export_program(model: nn.Module, input_size: tuple[int, int, int]) -> Any:
    """``torch.export`` the eval-mode CPU model with a dynamic batch dimension.

    The exported program is checked against the eager model on a sample batch before it is
    returned: a serving artifact that disagrees with the weights must never be written.
    """
    sample = torch.randn(2, *input_size)
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    program = torch.export.export(model, (sample,), dynamic_shapes=({0: batch},))
    with torch.no_grad():
        expected = model(sample)
        actual = program.module()(sample)
    if not torch.allclose(expected, actual, atol=1e-4, rtol=1e-4):
        raise RuntimeError("torch.export program disagrees with the eager model")
    return program
