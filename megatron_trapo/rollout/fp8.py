"""FP8 weights for the rollout engines: the trainer's HF-named tensors quantized into the
checkpoint format SGLang's and vLLM's ``Fp8Config`` load (``quant_method: "fp8"``, the format
of DeepSeek-V3 / Qwen3-FP8 checkpoints), and back (``rollout.quantization=fp8``: every weight
sync mode uses it; the HF engine and the protocol server dequantize to compute).

- Each linear's weight of a decoder layer (q, k, v, o, gate, up, down; each its own scales,
  as the engines fuse q/k/v and gate/up with per-shard scales) becomes ``X.weight`` in
  float8_e4m3fn and, block-wise, ``X.weight_scale_inv`` — fp32 [ceil(N/bn), ceil(K/bk)], the
  multiplier (amax/448) despite its name — or, per tensor, ``X.weight_scale`` [1]. Embeddings,
  the output layer, norms and biases stay as they are.
- The quantization itself is nvidia-modelopt's ``FP8QTensor.quantize`` (imported on first
  use: 14 s). Its checkpoint *export* does not serve here: it needs a whole quantized
  HF model where the sync streams tensors, and its block-wise format (``fp8_pb_wo``, 4-D
  scales) is refused by SGLang's ``ModelOptFp8Config`` and not read by transformers, so the
  native format is written instead (docs/notes/fp8_research.md).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from megatron_trapo.models.hf.files import HFCheckpointReader, HFCheckpointWriter
from megatron_trapo.rollout.types import RolloutError

FP8 = torch.float8_e4m3fn
_LINEAR = re.compile(r"\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
                     r"\.weight$")
IGNORED = ["model.embed_tokens", "lm_head"]  # never quantized (nor norms, biases)


def is_quantized(name: str) -> bool:
    """A decoder layer's linear weight (HF name), which FP8 serving quantizes."""
    return _LINEAR.search(name) is not None


def _modelopt_fp8():
    try:
        # lazy: a 14 s import, for FP8 weights only
        from modelopt.torch.quantization.qtensor import FP8QTensor
    except ImportError as exc:
        raise ImportError("FP8 weights are quantized with nvidia-modelopt: pip install "
                          f"nvidia-modelopt (scripts/setup.sh does); {exc}") from None
    return FP8QTensor


def quantize(weight: torch.Tensor, block: Optional[Sequence[int]]) -> Tuple[torch.Tensor,
                                                                            torch.Tensor]:
    """``(fp8 weight, fp32 scale)`` of one [N, K] weight, with ``weight ≈ fp8 · scale``
    (per block of ``block = (bn, bk)``, or per tensor with ``block=None``)."""
    fp8 = _modelopt_fp8()
    x = weight.detach().float()  # modelopt returns the scale in the input's dtype
    if block is None:
        q, scale = fp8.quantize(x)
        return q._quantized_data, scale.reshape(1).float()
    bn, bk = block
    q, scale = fp8.quantize(x, block_sizes={-2: bn, -1: bk})  # partial edge blocks included
    return q._quantized_data, scale.float().reshape(-(-x.shape[0] // bn), -(-x.shape[1] // bk))


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: Optional[Sequence[int]],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight back from its fp8 values and scale, as an engine that computes in
    ``dtype`` holds it."""
    return (q.float() * _per_element(scale, q.shape, block)).to(dtype)


def _per_element(scale: torch.Tensor, shape: Sequence[int],
                 block: Optional[Sequence[int]]) -> torch.Tensor:
    """A block-wise [ceil(N/bn), ceil(K/bk)] or per-tensor [1] scale, element by element
    (the block size cannot be read off the scale's shape when N or K is not a multiple)."""
    if block is None:
        return scale.float().reshape(()).expand(*shape)
    (n, k), (bn, bk) = shape, block
    return scale.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]


def error_bound(weight: torch.Tensor, scale: torch.Tensor,
                block: Optional[Sequence[int]]) -> torch.Tensor:
    """Per element, the most FP8 rounding may move it: half a unit in the last place of
    e4m3 (3 mantissa bits: 2⁻⁴ of the value) for normal numbers, half the smallest
    subnormal step (2⁻¹⁰) times the scale below."""
    return weight.abs().float() * 2.0 ** -4 + _per_element(scale, weight.shape, block) * 2.0 ** -10


def scale_name(name: str, block: Optional[Sequence[int]]) -> str:
    return name + ("_scale_inv" if block is not None else "_scale")


def quantize_named(named: Iterator[Tuple[str, torch.Tensor]], block: Optional[Sequence[int]]
                   ) -> Iterator[Tuple[str, torch.Tensor]]:
    """The sync's HF tensors with every decoder linear as its fp8 weight followed by its
    scale (the engines' parameter names); everything else unchanged."""
    for name, t in named:
        if is_quantized(name):
            q, scale = quantize(t, block)
            yield name, q.to(t.device)
            yield scale_name(name, block), scale.to(t.device)
        else:
            yield name, t


def fake_quantized(named: Iterator[Tuple[str, torch.Tensor]], block: Optional[Sequence[int]]
                   ) -> Iterator[Tuple[str, torch.Tensor]]:
    """The sync's HF tensors as an engine holds FP8 weights it computes with in a wider
    dtype: each decoder linear quantized and dequantized back to its own dtype (what loading
    the FP8 checkpoint into such an engine gives)."""
    for name, t in named:
        if is_quantized(name):
            q, scale = quantize(t, block)
            yield name, dequantize(q, scale, block, t.dtype).to(t.device)
        else:
            yield name, t


def dequantize_named(tensors: Dict[str, torch.Tensor], block: Optional[Sequence[int]],
                     dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """An engine that computes in ``dtype`` from FP8 tensors: each fp8 weight with its scale
    (``_scale_inv`` block-wise, ``_scale`` per tensor) becomes the dequantized weight; the
    scales are consumed."""
    out = {}
    for name, t in tensors.items():
        if is_scale(name) and name.rsplit("_scale", 1)[0] in tensors:
            continue
        if t.dtype == FP8:
            scale = tensors.get(scale_name(name, block))
            if scale is None:
                raise ValueError(f"{name}: an fp8 tensor without its {scale_name(name, block)}")
            out[name] = dequantize(t, scale, block, dtype)
        else:
            out[name] = t
    return out


def quantization_config(block: Optional[Sequence[int]]) -> dict:
    """``config.json``'s ``quantization_config`` of the exported weights, as vLLM's and
    SGLang's ``Fp8Config.from_config`` read it (dynamic activation scales: W8A8 with per-token
    1×128 groups on the engines that have the kernels)."""
    cfg = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
           "ignored_layers": list(IGNORED), "modules_to_not_convert": list(IGNORED)}
    if block is not None:
        cfg["weight_block_size"] = [int(b) for b in block]
    return cfg




def is_scale(name: str) -> bool:
    """A scale tensor of an FP8 weight (``X.weight_scale_inv`` / ``X.weight_scale``)."""
    return name.endswith((".weight_scale_inv", ".weight_scale"))


def folder_block(path: str) -> Tuple[bool, Optional[List[int]]]:
    """``(is FP8, block size)`` of the HF folder ``path`` from its config.json (block None:
    per tensor, or not FP8)."""
    config = json.loads((Path(path) / "config.json").read_text())
    q = config.get("quantization_config") or {}
    if q.get("quant_method") != "fp8":
        return False, None
    block = q.get("weight_block_size")
    return True, [int(b) for b in block] if block else None


def with_quantization_config(config: dict, block: Optional[Sequence[int]]) -> dict:
    """``config`` (a config.json dict) with the FP8 export's ``quantization_config``."""
    return {**config, "quantization_config": quantization_config(block)}


def check_serving_folder(path: str, block: Optional[Sequence[int]]) -> None:
    """Servers launched from ``path`` (rollout.model_path) must start as an FP8 export with
    the sync's block size: SGLang and vLLM build their FP8 layers (and scale shapes) from the
    checkpoint's quantization_config, and a later update cannot change that layout."""
    try:
        quantized, have = folder_block(path)
    except (OSError, ValueError) as exc:
        raise RolloutError(f"rollout.quantization=fp8: cannot read {path}/config.json ({exc})"
                           ) from None
    want = [int(b) for b in block] if block is not None else None
    if not quantized or have != want:
        shown = "per tensor" if want is None else f"{want[0]} {want[1]}"
        raise RolloutError(
            f"rollout.quantization=fp8: rollout.model_path {path} is "
            + (f"an FP8 export with block {have}" if quantized else "not an FP8 export")
            + f", but rollout.fp8_block_size is {want}; the servers take their FP8 layout "
            f"from the checkpoint they start from. Make one: python tools/quantize_fp8.py "
            f"{path} {path}-fp8 --block-size {shown if want else 'none'}")


def export_folder(src: str, dst: str, block: Optional[Sequence[int]],
                  max_shard_bytes: int = 5 * 1024**3) -> Dict[str, int]:
    """Write the HF folder ``src`` as an FP8 export into ``dst`` (safetensors with fp8
    weights and scales, config.json with quantization_config, the tokenizer files copied);
    returns how many tensors were quantized and kept."""
    src_p, dst_p = Path(src), Path(dst)
    if src_p.resolve() == dst_p.resolve():
        raise ValueError(f"export_folder: the output {dst} is the input folder")
    config = json.loads((src_p / "config.json").read_text())
    if (config.get("quantization_config") or {}).get("quant_method"):
        raise ValueError(f"{src}: already quantized ({config['quantization_config']})")
    reader = HFCheckpointReader(src)
    writer = HFCheckpointWriter(dst_p, max_shard_bytes)
    counts = {"quantized": 0, "kept": 0}
    for name, t in quantize_named(((n, reader.get(n)) for n in reader.names()), block):
        if not is_scale(name):
            counts["quantized" if t.dtype == FP8 else "kept"] += 1
        writer.add(name, t)
    writer.close()
    (dst_p / "config.json").write_text(json.dumps(with_quantization_config(config, block),
                                                  indent=2))
    for f in src_p.iterdir():  # tokenizer and generation config, as the servers read them
        if f.is_file() and f.suffix in (".json", ".txt", ".model", ".jinja") and \
                f.name not in ("config.json",) and not f.name.endswith(".index.json"):
            shutil.copy2(f, dst_p / f.name)
    return counts
