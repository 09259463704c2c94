"""fusefeat: general-purpose audio embeddings by fusing a middle and a late layer of a
pre-trained model (Niizumi et al., "Composing General Audio Representation by Fusing Multilayer
Features of a Pre-trained Model", EUSIPCO 2022).

    import fusefeat
    summary = fusefeat.extract(["./wavs"], model="cnn14", out="feats")
    feats = fusefeat.load("feats")          # .paths, .embeddings, .meta

Heavy modules (torch, h5py) load on first use so that `fusefeat --help` starts fast.
"""

__version__ = "0.1.0"

_LAZY = {
    "extract": ("fusefeat.pipeline", "extract"),
    "ExtractOptions": ("fusefeat.pipeline", "ExtractOptions"),
    "load": ("fusefeat.store.reader", "load"),
    "merge": ("fusefeat.store.merge", "merge"),
    "backbones": ("fusefeat.backbones", None),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'fusefeat' has no attribute {name!r}")
    import importlib

    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attr is None else getattr(module, attr)


__all__ = ["__version__", *_LAZY]
