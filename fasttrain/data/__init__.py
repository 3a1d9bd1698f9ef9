"""Data: data sets on disk (datasets.py, cifar.py, read through the data index, index.py, and the one
decode policy, decode.py), and loaders that share one contract (loaders.py).

Names are imported on first use, so that `fasttrain.data.index` (which the data index's worker
processes import) and the command line's help load neither torch nor DALI.
"""

from __future__ import annotations

import importlib

_WHERE = {"DataSet": "splits", "FileSplit": "splits", "ArraySplit": "splits", "cap": "datasets",
          "open_dataset": "datasets", "synthetic_dataset": "synthetic", "Loaders": "loaders",
          "build_loaders": "loaders", "build_eval_loader": "loaders", "backend_names": "loaders",
          "default_backend": "loaders", "BACKENDS": "loaders"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
