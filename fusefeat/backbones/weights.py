"""Where weights come from: a local path (`--weights`), or the official source through the
standard caches (TORCH_HOME for checkpoint URLs, HF_HOME for the Hugging Face hub).

Nothing here touches the network at import time. Offline with nothing cached, loaders fail
within seconds with a message naming the URL and `--weights`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import sys
import tempfile
import types
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from fusefeat.errors import WeightsError

CONNECT_TIMEOUT_S = 10.0


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            block = handle.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def torch_cache_dir() -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def checkpoint_path(weights: str | None, url: str | None, filename: str | None,
                    model: str) -> Path:
    """A local checkpoint file: the user's `--weights`, else the cached or downloaded URL."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights file not found: {path}",
                               hint=f"--weights takes the {model} checkpoint file in its official format")
        return path
    if not url:
        raise WeightsError(f"the {model} preset names no weights URL", hint="pass --weights PATH")
    cached = torch_cache_dir() / (filename or url.rsplit("/", 1)[-1])
    if cached.is_file():
        return cached
    _download(url, cached, model)
    return cached


def _download(url: str, target: Path, model: str) -> None:
    hint = (f"download it yourself from {url} and pass --weights PATH, or put it at {target} "
            f"(TORCH_HOME sets the cache)")
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"fusefeat: downloading {model} weights from {url} to {target}", file=sys.stderr)
    try:
        response = urllib.request.urlopen(url, timeout=CONNECT_TIMEOUT_S)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise WeightsError(f"cannot download the {model} weights from {url}: {reason}",
                           hint=hint) from None
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".download-", suffix=".part")
    try:
        total = int(response.headers.get("Content-Length") or 0) or None
        from tqdm import tqdm

        with os.fdopen(fd, "wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                              disable=not sys.stderr.isatty(),
                                              desc=target.name) as bar:
            while True:
                block = response.read(1 << 20)
                if not block:
                    break
                out.write(block)
                bar.update(len(block))
        os.replace(tmp, target)
    except (OSError, urllib.error.URLError) as exc:
        raise WeightsError(f"download of the {model} weights from {url} failed: {exc}",
                           hint=hint) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_torch_checkpoint(path: Path, model: str) -> Any:
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"cannot read {path} as a {model} checkpoint: {first}",
                           hint="the file is corrupt or not a PyTorch checkpoint; "
                                "download it again or check --weights") from None


def load_state_dict_strictly(module, state_dict: dict, path: Path, model: str) -> None:
    """Load weights, turning a mismatch into a message that names the model and the file."""
    if not isinstance(state_dict, dict):
        raise WeightsError(f"{path} does not hold a {model} state_dict (found {type(state_dict).__name__})")
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [k for k in own if k in state_dict
                   and tuple(getattr(state_dict[k], "shape", ())) != tuple(own[k].shape)]
    if missing or unexpected or wrong_shape:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong_shape:
            k = wrong_shape[0]
            detail.append(f"{len(wrong_shape)} of another shape (e.g. {k}: "
                          f"{tuple(state_dict[k].shape)} vs {tuple(own[k].shape)})")
        raise WeightsError(f"{path} is not a {model} checkpoint: " + "; ".join(detail),
                           hint=f"pass the {model} weights in the official format, or pick the "
                                f"model that matches this file")
    module.load_state_dict(state_dict, strict=True)


def import_module_skipping_package_init(package: str, submodule: str):
    """Import `package.submodule` without executing `package/__init__.py`.

    panns_inference's __init__ runs wget at import time (and leaves an empty label CSV behind
    offline); torchvggish's imports resampy. We only need their model definitions.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"the Python package {package!r} is not installed",
                           hint=f"pip install {package.replace('_', '-')}")
    alias = f"_fusefeat_shadow_{package}"
    if alias not in sys.modules:
        shadow = types.ModuleType(alias)
        shadow.__path__ = list(spec.submodule_search_locations)
        shadow.__package__ = alias
        sys.modules[alias] = shadow
    return importlib.import_module(f"{alias}.{submodule}")


# ---- Hugging Face ------------------------------------------------------------------------------

def hf_model_dir(repo_or_path: str, revision: str | None, weights: str | None,
                 model: str, identify: bool = True) -> tuple[Path, str]:
    """A local directory for a Hugging Face model and its identity (repo@commit or sha256).

    `identify=False` skips hashing a local directory's weights (identity ""): enough to read
    its configuration."""
    local = Path(weights or repo_or_path).expanduser()
    if weights is not None or local.is_dir():
        if not (local / "config.json").is_file():
            raise WeightsError(f"{local} is not a Hugging Face model directory (no config.json)",
                               hint=f"pass the directory that save_pretrained() wrote for {model}")
        return local, ("sha256:" + _dir_weights_digest(local)) if identify else ""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
    try:  # the cache first: no network at all when the model is there
        path = Path(snapshot_download(repo_or_path, revision=revision, local_files_only=True,
                                      allow_patterns=patterns))
    except Exception:  # noqa: BLE001 - any miss means "not cached"
        path = None
    if path is None:
        url = f"https://huggingface.co/{repo_or_path}"
        hint = (f"download it where you have internet (huggingface-cli download {repo_or_path}) "
                f"and pass --weights DIR, or fill the cache (HF_HOME)")
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise WeightsError(f"{repo_or_path} is not in the Hugging Face cache and HF_HUB_OFFLINE is set",
                               hint=hint)
        _check_reachable(url, model, hint)
        try:
            path = Path(snapshot_download(repo_or_path, revision=revision, allow_patterns=patterns))
        except Exception as exc:  # noqa: BLE001 - hub errors come in many types
            raise WeightsError(f"cannot download {repo_or_path} from the Hugging Face hub: {exc}",
                               hint=hint) from None
    return path, f"hf:{repo_or_path}@{path.name}"


def _check_reachable(url: str, model: str, hint: str) -> None:
    """Fail in seconds offline (the hub client otherwise retries for ~45 s)."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                               timeout=CONNECT_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # the server answered: let the hub client report what it means
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise WeightsError(f"cannot reach {url} to download the {model} weights: "
                           f"{getattr(exc, 'reason', exc)}", hint=hint) from None


def _dir_weights_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in directory.iterdir()
                   if p.suffix in (".safetensors", ".bin", ".json") and p.is_file())
    for p in files:
        digest.update(p.name.encode())
        digest.update(sha256_file(p).encode())
    return digest.hexdigest()


@contextlib.contextmanager
def skip_random_init():
    """Build a network without drawing random weights (a second or more for CNN14): every
    weight is overwritten by a strict checkpoint load right after."""
    import torch

    names = ("uniform_", "normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
             "xavier_normal_", "trunc_normal_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    try:
        for name in names:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)
