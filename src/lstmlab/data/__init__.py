"""The data layer: MNIST-format datasets (``registry``: which ones, their files and checksums), IDX files read and
checked (``idx``), found, downloaded and loaded as tensors (``sources``), and the sequence views an LSTM reads
them as (``views``: rows, pixels, permuted pixels). Only torch and the standard library: no torchvision.

The names below are imported on first use (PEP 562), so that the torch-free registry can be read on its own.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "DATASETS": "registry", "FILE_NAMES": "registry", "KNOWN_SIZES": "registry", "SPLITS": "registry",
    "VIEWS": "registry", "DatasetInfo": "registry", "dataset_info": "registry",
    "IDX_IMAGES_MAGIC": "idx", "IDX_LABELS_MAGIC": "idx", "MAX_IDX_BYTES": "idx", "read_idx": "idx",
    "_read_bytes": "idx",
    "DOWNLOAD_TIMEOUT_S": "sources", "cache_dir": "sources", "load_dataset": "sources",
    "resolve_data_dir": "sources", "_find_file": "sources",
    "batch_indices": "views", "make_permutation": "views", "pixel_stats": "views", "to_sequence": "views",
    "train_val_split": "views",
}

__all__ = sorted(name for name in _WHERE if not name.startswith("_"))


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"lstmlab.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'lstmlab.data' has no attribute {name!r}")
