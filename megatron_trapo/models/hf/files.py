"""Reading and writing HF checkpoints: safetensors (single file or sharded with an index),
``config.json`` and the tokenizer files that travel with a model.

Tensors are read lazily, one at a time, from memory-mapped safetensors files, so a converter's
peak memory is what it keeps, not the checkpoint's size.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Iterable, List

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_trapo.config import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


def load_hf_config(hf_dir: str | Path) -> Dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"--hf-dir {hf_dir}: no config.json")
    return json.loads(path.read_text())


class HFCheckpointReader:
    """Tensor names and lazy tensor reads of an HF model folder (safetensors)."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            weight_map = None
        else:
            found = sorted(p.name for p in self.dir.iterdir())
            raise ConfigError(f"--hf-dir {hf_dir}: no model.safetensors or "
                              f"model.safetensors.index.json (found {found[:10]}); convert "
                              "PyTorch .bin weights with transformers' save_pretrained first")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self._handles = {f: safe_open(str(self.dir / f), framework="pt") for f in files}
        if weight_map is None:
            weight_map = {k: "model.safetensors" for k in self._handles["model.safetensors"].keys()}
        self._where = weight_map

    def names(self) -> List[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"tensor {name!r} not in the HF checkpoint at {self.dir}")
        return self._handles[self._where[name]].get_tensor(name)


class HFCheckpointWriter:
    """Writes tensors into ``model-0000i-of-0000n.safetensors`` shards of at most
    ``max_shard_bytes`` plus ``model.safetensors.index.json``, as ``save_pretrained`` does."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 5 * 1024**3):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_shard_bytes
        self._buffer: Dict[str, torch.Tensor] = {}
        self._bytes = 0
        self._shards: List[List[str]] = []
        self._total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._bytes + size > self.max_bytes:
            self._flush()
        self._buffer[name] = tensor.detach().contiguous().cpu()
        self._bytes += size
        self._total += size

    def _flush(self) -> None:
        idx = len(self._shards)
        save_file(self._buffer, str(self.dir / f".shard-{idx}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer, self._bytes = {}, 0

    def close(self) -> List[str]:
        """Name the shards, write the index; returns the shard file names."""
        if self._buffer or not self._shards:
            self._flush()
        n = len(self._shards)
        names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for i, (name, keys) in enumerate(zip(names, self._shards)):
            os.replace(self.dir / f".shard-{i}.tmp", self.dir / name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self._total}, "weight_map": weight_map}
        (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names


def copy_tokenizer_files(src: str | Path, dst: str | Path,
                         extra: Iterable[str] = ()) -> List[str]:
    """Copy the tokenizer/generation files present in ``src``; returns their names."""
    copied = []
    Path(dst).mkdir(parents=True, exist_ok=True)
    for name in (*TOKENIZER_FILES, *extra):
        path = Path(src) / name
        if path.is_file():
            shutil.copy2(path, Path(dst) / name)
            copied.append(name)
    return copied
