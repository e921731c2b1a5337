"""Training layer: models (``mlaas.train.models``) and evaluation plots (``mlaas.train.plots``).

``plots`` needs matplotlib and mplhep and is imported on use, not here.
"""

from __future__ import annotations

from mlaas.train.models import (
    BUILTIN_MODELS,
    MLP,
    CollectionSlots,
    DeepSets,
    InputLayout,
    UserModel,
    build_builtin,
    load_user_model,
    select_device,
)

__all__ = [
    "BUILTIN_MODELS",
    "MLP",
    "CollectionSlots",
    "DeepSets",
    "InputLayout",
    "UserModel",
    "build_builtin",
    "load_user_model",
    "select_device",
]
