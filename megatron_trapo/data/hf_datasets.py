"""Rows from a Hugging Face dataset — a folder written by ``save_to_disk``, a local folder of
data files or a dataset repository clone, or a hub name — through the ``datasets`` library
(``tools/prepare_data.py --input``). Offline use needs the first two, or a hub dataset already
in the ``datasets`` cache (``HF_DATASETS_OFFLINE=1``)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import datasets

from megatron_trapo.config import ConfigError


def _saved_with_save_to_disk(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def load_hf_rows(source: str, split: Optional[str] = None,
                 name: Optional[str] = None) -> List[dict]:
    """The rows of one split of ``source``; a dataset with several splits needs ``split``."""
    folder = Path(source)
    try:
        if folder.is_dir() and _saved_with_save_to_disk(folder):
            ds = datasets.load_from_disk(str(folder))
        else:
            ds = datasets.load_dataset(source, name) if split is None else \
                datasets.load_dataset(source, name, split=split)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as exc:
        where = "folder" if folder.is_dir() else "dataset (not a local folder; from the hub)"
        raise ConfigError(f"--input {source}: the {where} could not be loaded by datasets: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    if isinstance(ds, datasets.DatasetDict):
        if split is None and len(ds) == 1:
            ds = next(iter(ds.values()))
        elif split is None:
            raise ConfigError(f"--input {source} has the splits {', '.join(ds)}: pass --split")
        elif split not in ds:
            raise ConfigError(f"--split {split}: {source} has the splits {', '.join(ds)}")
        else:
            ds = ds[split]
    return [dict(row) for row in ds]
