"""FP8 weights for the rollout engines: the trainer's HF-named tensors quantized into the
checkpoint format SGLang's and vLLM's ``Fp8Config`` load (``quant_method: "fp8"``, the format
of DeepSeek-V3 / Qwen3-FP8 checkpoints), and back. The building block of FP8 rollouts (issue
19); so far the in-process engine's weight sync uses it (``rollout.quantization=fp8``).

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

import re
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch

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
        if name.endswith(("_scale_inv", "_scale")) and name.rsplit("_scale", 1)[0] in tensors:
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


