"""A user model file for mlaas: a small residual MLP.

mlaas imports this file (``model.file: model.py`` in the spec, relative to the
spec's directory) and calls ``build(n_features, spec)``:

* ``n_features``: the width of the flat input vector ``x``; jagged collections
  are already padded (empty slots hold their ``pad`` value) and every column is
  normalised;
* ``spec``: the whole pipeline spec as a plain dict, plus ``spec["n_outputs"]``
  (1 for binary and regression, K for multiclass).

``forward(x)`` returns raw outputs ``[B, n_outputs]`` (logits: mlaas applies
the loss, and the sigmoid or softmax at evaluation and export). Define
``forward(self, x, mask)`` instead to receive the padding mask too. Only use
operations ``torch.onnx.export`` supports, so the model can be bundled.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """x + f(x): two linear layers with a normalisation and a non-linearity."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(width, width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class ResidualMLP(nn.Module):
    def __init__(self, n_features: int, n_outputs: int, width: int = 64, blocks: int = 2,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.inp = nn.Linear(n_features, width)
        self.blocks = nn.Sequential(*(ResidualBlock(width, dropout) for _ in range(blocks)))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, n_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.inp(x)))


def build(n_features: int, spec: dict[str, Any]) -> nn.Module:
    """Called by mlaas; ``spec["model"]["dropout"]`` is reused as the blocks' dropout."""
    n_outputs = int(spec.get("n_outputs", 1))
    dropout = float(spec.get("model", {}).get("dropout", 0.0))
    return ResidualMLP(n_features, n_outputs, width=64, blocks=2, dropout=dropout)
