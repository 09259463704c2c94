"""The --layers grammar, shared by every backbone.

Layers are numbered as in the paper, from 1 (VGGish: positions in `features`, then the FC layers
of `embeddings`; CNN14: conv blocks; AST and Hugging Face encoders: transformer blocks, with 0
meaning the embedding output where a backbone offers it). Accepted forms, combinable with commas:

    6,12      explicit numbers          -1       counted from the end (-1 is the last layer)
    3..6      an inclusive range        all      every layer
"""

from __future__ import annotations

from typing import Iterable, Sequence

from fusefeat.errors import UsageError


def parse_layers(
    spec: str | Sequence[int] | None,
    available: Sequence[int],
    default: Sequence[int],
    model: str = "this model",
) -> tuple[int, ...]:
    """Resolve a layer spec to sorted, unique, validated layer numbers."""
    if spec is None or (isinstance(spec, str) and spec.strip() == ""):
        return tuple(sorted(set(default)))
    available = list(available)
    counted = [n for n in available if n > 0]  # negative indices count blocks, never layer 0
    tokens: Iterable = spec.split(",") if isinstance(spec, str) else spec
    chosen: set[int] = set()
    for raw in tokens:
        token = str(raw).strip()
        if token.lower() == "all":
            chosen.update(available)
            continue
        if ".." in token:
            lo_text, hi_text = token.split("..", 1)
            lo, hi = (_resolve(_to_int(t, token, available, model), counted, available, model)
                      for t in (lo_text, hi_text))
            if lo > hi:
                raise UsageError(f"--layers range {token!r} is empty (start after end)",
                                 hint=_valid_text(available, model))
            chosen.update(n for n in available if lo <= n <= hi)
            continue
        chosen.add(_resolve(_to_int(token, token, available, model), counted, available, model))
    if not chosen:
        raise UsageError("--layers selects no layer", hint=_valid_text(available, model))
    return tuple(sorted(chosen))


def _to_int(text: str, token: str, available: Sequence[int], model: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise UsageError(f"--layers: {token!r} is not a layer number, a range A..B, or 'all'",
                         hint=_valid_text(available, model)) from None


def _resolve(number: int, counted: list[int], available: Sequence[int], model: str) -> int:
    if number < 0:
        if -number > len(counted):
            raise UsageError(f"--layers: {number} counts back past the first layer of {model}",
                             hint=_valid_text(available, model))
        return counted[number]
    if number not in available:
        raise UsageError(f"--layers: {model} has no layer {number}",
                         hint=_valid_text(available, model))
    return number


def _valid_text(available: Sequence[int], model: str) -> str:
    return (f"{model} has layers {min(available)}..{max(available)}; "
            f"see `fusefeat layers --model {model}`")
