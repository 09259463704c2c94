"""Model presets: one TOML file per backbone in configs/ (shipped as fusefeat.configs).

A preset names the implementation (`backbone`, a module in fusefeat/backbones/), its weights
source, sample rate, front-end parameters and default layers. `--config FILE` loads a user's own
preset with the same keys; `--model hf:ID_OR_PATH` builds one for a Hugging Face encoder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fusefeat.errors import UsageError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

HF_PREFIX = "hf:"


@dataclass(frozen=True)
class Preset:
    name: str
    backbone: str
    sample_rate: int
    default_layers: tuple[int, ...]
    window_seconds: float
    weights: dict[str, Any] = field(default_factory=dict)
    frontend: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    source: str = ""  # where the preset came from (file path or "builtin:<name>")

    def numbers_that_matter(self) -> dict[str, Any]:
        """Everything in the preset that changes the numbers (for the run fingerprint)."""
        return {
            "backbone": self.backbone,
            "sample_rate": self.sample_rate,
            "frontend": self.frontend,
            "window_seconds": self.window_seconds,
        }

    def to_json(self) -> str:
        return json.dumps({
            "name": self.name, "backbone": self.backbone, "description": self.description,
            "sample_rate": self.sample_rate, "default_layers": list(self.default_layers),
            "window_seconds": self.window_seconds, "weights": self.weights,
            "frontend": self.frontend, "source": self.source,
        }, sort_keys=True)


def builtin_names() -> list[str]:
    files = resources.files("fusefeat.configs")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".toml"))


def load_preset(model: str | None = None, config_file: str | Path | None = None) -> Preset:
    """The preset for `--model NAME`, `--model hf:ID`, or `--config FILE`."""
    if config_file is not None:
        path = Path(config_file)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot read --config {path}: {exc.strerror or exc}") from None
        return _from_toml(text, source=str(path), override_name=None)
    if model is None:
        raise UsageError("no model given", hint="pass --model NAME (" + ", ".join(builtin_names())
                         + ", or hf:ID) or --config FILE")
    if model.startswith(HF_PREFIX):
        return hf_preset(model[len(HF_PREFIX):])
    names = builtin_names()
    if model not in names:
        raise UsageError(f"unknown model {model!r}",
                         hint="choose one of " + ", ".join(names)
                         + ", hf:ID_OR_PATH for a Hugging Face encoder, or --config FILE")
    text = resources.files("fusefeat.configs").joinpath(model + ".toml").read_text("utf-8")
    return _from_toml(text, source=f"builtin:{model}", override_name=None)


def hf_preset(repo_or_path: str) -> Preset:
    """A preset for any Hugging Face audio encoder; details come from its own config."""
    if not repo_or_path:
        raise UsageError("--model hf: needs a hub id or a local directory, e.g. hf:openai/whisper-base")
    return Preset(
        name=HF_PREFIX + repo_or_path, backbone="hf", sample_rate=16000, default_layers=(),
        window_seconds=30.0, weights={"hf_repo": repo_or_path, "revision": "main",
                                      "format": "huggingface"},
        # The model's own feature extractor is the front end; layer strides are in samples.
        frontend={"hop_samples": 1}, description=f"Hugging Face encoder {repo_or_path}",
        source="builtin:hf",
    )


def _from_toml(text: str, source: str, override_name: str | None) -> Preset:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"preset {source} is not valid TOML: {exc}") from None
    missing = [k for k in ("name", "backbone", "sample_rate", "default_layers") if k not in data]
    if missing:
        raise UsageError(f"preset {source} lacks {', '.join(missing)}",
                         hint="start from one of the files in configs/ (fusefeat/configs)")
    return Preset(
        name=override_name or str(data["name"]),
        backbone=str(data["backbone"]),
        sample_rate=int(data["sample_rate"]),
        default_layers=tuple(int(n) for n in data["default_layers"]),
        window_seconds=float(data.get("window_seconds", 60.0)),
        weights=dict(data.get("weights", {})),
        frontend=dict(data.get("frontend", {})),
        description=str(data.get("description", "")),
        source=source,
    )
