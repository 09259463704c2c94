"""The registry: a preset names its implementation, a module in this package.

Adding a backbone means adding one module here that defines `BACKBONE` (a subclass of
`fusefeat.backbones.base.Backbone` with `build` and `table` class methods), plus its preset in
configs/. `hf:ID_OR_PATH` maps to the generic Hugging Face encoder.
"""

from __future__ import annotations

import importlib

from fusefeat.config import Preset, builtin_names, load_preset
from fusefeat.errors import UsageError


def backbone_class(preset: Preset):
    try:
        module = importlib.import_module(f"fusefeat.backbones.{preset.backbone}")
    except ModuleNotFoundError as exc:
        if exc.name == f"fusefeat.backbones.{preset.backbone}":
            raise UsageError(f"preset {preset.source} names backbone {preset.backbone!r}, "
                             "which fusefeat does not implement",
                             hint="backbones: " + ", ".join(builtin_names()) + ", hf") from None
        raise
    return module.BACKBONE


def create(model: str | None = None, weights: str | None = None, device="cpu",
           config_file: str | None = None, random_init: bool = False):
    """Build a ready backbone: `create("cnn14", weights="Cnn14_16k_mAP=0.438.pth")`."""
    preset = load_preset(model, config_file)
    backbone = backbone_class(preset).build(preset, weights=weights, random_init=random_init)
    return backbone.to(device)

