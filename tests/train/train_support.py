"""Shared by the train tests: user model files (their source text)."""

from __future__ import annotations

__all__ = ["EXPORT_ONLY_FAILURE"]

#: Trains like any model; fails only inside torch.onnx.export (line 12 raises).
EXPORT_ONLY_FAILURE = '''
import torch


class OnlyInTorch(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.lin = torch.nn.Linear(n, 1)

    def forward(self, x):
        if torch.onnx.is_in_onnx_export():
            raise NotImplementedError("no ONNX for this layer\\nsecond line of detail")
        return self.lin(x)


def build(n_features, spec):
    return OnlyInTorch(n_features)
'''
