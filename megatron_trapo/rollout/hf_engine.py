"""The HF engine: HF transformers in-process, batched, with a KV cache.

Why a sampling loop of our own rather than ``model.generate``: the logprobs must be the raw
``log_softmax`` of the logits the token was sampled from (``generate``'s ``output_scores``
include the logits processors), each sample needs its own seeded generator (distinct,
reproducible samples), and finished rows are dropped from the batch and its cache as they end.
Sampling is vectorised over the batch (Gumbel-max with per-row noise).
Prompts of different lengths are left-padded; position ids skip the padding, so every row
computes exactly what it would alone.
"""
from __future__ import annotations

import functools
import inspect
import json
import random
import tempfile
import threading
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Cache
from transformers.cache_utils import DynamicLayer

from megatron_trapo.models.hf.files import HFCheckpointReader
from megatron_trapo.platform import cpu_compat
from megatron_trapo.rollout import fp8
from megatron_trapo.rollout.types import (RolloutEngine, RolloutError, RolloutRequest, Sample,
                                          SamplingParams, empty_sample)


def _eos_ids(model) -> List[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    if ids is None:
        ids = getattr(model.config, "eos_token_id", None)
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)


def _sample_rows(logits: torch.Tensor, params: List[SamplingParams],
                 gens: List[torch.Generator]) -> torch.Tensor:
    """One token per row: argmax for greedy rows, else temperature / top-k / top-p sampling by
    inverting each row's CDF at one uniform draw from the row's own generator (exact sampling,
    vectorised over the batch, reproducible per sample). One draw per row, where the Gumbel-max
    trick drew one per vocabulary entry: for SmolLM2's 49k vocab that noise was ~10% of a decode
    step. The probabilities are the fp32 softmax the reported logprobs come from; only the
    running sum is float64 (a 49k-long fp32 sum loses its tail), and the work a rare case needs
    (greedy rows, top-k/p, a draw that rounds to the total) is done only when it occurs: at 22
    rows of SmolLM2 that bookkeeping over the vocabulary was ~10% of a decode step."""
    rows, vocab = logits.shape
    logits = logits.float()
    temps = [p.temperature for p in params]
    greedy = torch.tensor([t == 0 for t in temps])
    if bool(greedy.all()):
        return torch.argmax(logits, dim=-1)
    scaled = logits
    if any(t not in (0, 1) for t in temps):
        scaled = logits / torch.tensor([t if t else 1.0 for t in temps]).unsqueeze(-1)
    ks = [p.top_k if p.top_k and 0 < p.top_k < vocab else 0 for p in params]
    tops = torch.tensor([p.top_p for p in params], dtype=torch.float64)
    if any(ks) or bool((tops < 1).any()):
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
        for r, k in enumerate(ks):
            if k:
                drop[r, k:] = True
        probs = torch.softmax(sorted_logits.double(), -1)
        drop |= (probs.cumsum(-1) - probs) >= tops.unsqueeze(-1)  # keep the token crossing p
        scaled = scaled.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    cdf = torch.softmax(scaled, dim=-1).double().cumsum_(-1)
    draws = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in gens])
    # the first token whose cumulative mass exceeds u·total: token t with probability p_t (it
    # has mass, as cdf[t] > cdf[t - 1])
    sampled = torch.searchsorted(cdf, (draws * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    over = sampled >= vocab
    if bool(over.any()):  # u·total rounded up to the total: the last token that has mass
        positive = torch.diff(cdf[over], dim=-1, prepend=torch.zeros_like(cdf[over][:, :1])) > 0
        sampled[over] = vocab - 1 - torch.argmax(positive.flip(-1).to(torch.uint8), dim=-1)
    if bool(greedy.any()):
        sampled = torch.where(greedy, torch.argmax(logits, dim=-1), sampled)
    return sampled


class _GrowingLayer(DynamicLayer):
    """transformers' dynamic KV-cache layer with room to grow: keys and values live in a buffer
    with spare positions and each token is written in place, where ``DynamicLayer`` copies the
    whole cache with ``torch.cat`` at every token (about 15% of a decode step for a small
    model). ``room``: the positions a batch can reach (prompt + budget), allocated at the
    prefill, so the cache never holds more than the batch needs; past it the buffer grows by
    half. ``keys``/``values`` are views of its filled part."""

    def __init__(self, room: int = 0, **kwargs):
        super().__init__(**kwargs)
        self._room = room
        self.peak_bytes = 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._k = self._v = None
            self._len = 0
        new = key_states.shape[-2]
        if self._k is None or self._len + new > self._k.shape[-2]:
            room = max(self._room, (self._len + new) * 3 // 2)
            k = key_states.new_empty(*key_states.shape[:-2], room, key_states.shape[-1])
            v = value_states.new_empty(*value_states.shape[:-2], room, value_states.shape[-1])
            if self._len:
                k[..., :self._len, :] = self.keys
                v[..., :self._len, :] = self.values
            self._k, self._v = k, v
            self._note_size()
        self._k[..., self._len:self._len + new, :] = key_states
        self._v[..., self._len:self._len + new, :] = value_states
        self._len += new
        self.keys, self.values = self._k[..., :self._len, :], self._v[..., :self._len, :]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._len if self.is_initialized else 0

    def _note_size(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self._k.nbytes + self._v.nbytes)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self._k, self._v = self._k[indices], self._v[indices]
            self._note_size()
            self.keys, self.values = self._k[..., :self._len, :], self._v[..., :self._len, :]


class HFEngine(RolloutEngine):
    """``engine: hf`` — transformers on CPU (or one GPU) in this process."""

    name = "hf"

    def __init__(self, model_path: str, device: str = "cpu", dtype: str = "fp32",
                 max_batch_size: int = 64, tokenizer_path: Optional[str] = None,
                 weight_version: str = "0", model=None, share_weights: bool = False):
        """``model``: an already built transformers model to serve (``model_path`` then only
        needs its config.json). ``share_weights``: a weight update may hand over its tensors
        instead of copying them (see :meth:`update_weights_from_tensors`)."""
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        if not (Path(model_path) / "config.json").is_file():
            raise RolloutError(f"model_path {model_path}: no config.json (an HF model folder "
                               "is needed; convert Megatron checkpoints with "
                               "tools/convert_mcore_to_hf.py)")
        self.model_path = str(model_path)
        # an FP8 export (rollout.quantization=fp8): its weights dequantized to compute, and the
        # later updates' fp8 tensors + scales with them (the block size the servers have too)
        quantized, self.fp8_block = fp8.folder_block(model_path)
        if model is None and quantized:
            model = _dequantized_model(model_path, self.fp8_block, torch_dtype)
        self.fp8 = quantized
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype,
                                                         attn_implementation="sdpa")
        self.model = model.to(device=device, dtype=torch_dtype).eval()
        self.device = device
        self.max_batch_size = max_batch_size
        self.eos_ids = _eos_ids(self.model)
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 1 << 30))
        self.vocab_size = int(self.model.config.vocab_size)
        self._version = str(weight_version)
        self._kv_peak_bytes = 0  # the largest KV cache a batch has held (memory/ metrics)
        self.share_weights = share_weights
        self._lock = threading.Lock()
        self._rng = random.Random(0)
        # transformers >= 5.2x names the KV-cache argument `cache`; older ones `past_key_values`.
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # the prefill needs the last position's logits only: [inputs, 1, vocab], not
        # [inputs, prompt length, vocab] (SmolLM2: 49k × 400 positions × 4 B = 79 MB per input)
        self._last_logits = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        if tokenizer_path is not None:
            check_tokenizer(tokenizer_path, self.vocab_size)

    @classmethod
    def from_hf_config(cls, hf_config: Dict, **kwargs) -> "HFEngine":
        """An engine with this architecture and uninitialised weights, to be filled by an
        in-process weight sync (no checkpoint on disk: the folder holds the config only). Not
        through save_pretrained + from_pretrained: transformers writes weights on
        torch.distributed rank 0 only, so the engines of data-parallel rollouts on other
        ranks would find none."""
        folder = Path(tempfile.mkdtemp(prefix="trapo_hf_engine_"))
        (folder / "config.json").write_text(json.dumps(hf_config))
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder),
                                                 dtype=torch.float32, attn_implementation="sdpa")
        return cls(str(folder), model=model, **kwargs)

    def memory_bytes(self, others: Sequence[torch.Tensor] = ()) -> tuple:
        """(weights, the largest KV cache a batch has held so far), in bytes; weights whose
        storage is one of ``others``' (the trainer's, when shared) are not the engine's."""
        theirs = {t.untyped_storage().data_ptr() for t in others}
        storages = {}
        for p in self.model.parameters():
            storage = p.untyped_storage()
            if storage.data_ptr() not in theirs:
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values()), self._kv_peak_bytes

    @property
    def weight_version(self) -> str:
        return self._version

    def set_weight_version(self, version: str) -> None:
        """Name the weights now loaded (SGLang's /update_weight_version)."""
        self._version = str(version)

    # --- generation ------------------------------------------------------------------------

    def generate(self, requests: Sequence[RolloutRequest],
                 cancelled: Optional[Callable[[int], bool]] = None) -> List[List[Sample]]:
        """``cancelled(i)`` true: request ``i`` was abandoned by its client (the protocol
        server); its rows leave the batch at the next token and it gets empty samples."""
        rows = []  # (request index, sample index, input ids, budget, sampling, seed)
        for i, req in enumerate(requests):
            ids = req.input_ids()
            if not ids:
                raise RolloutError(f"request {i}: empty prompt")
            if len(ids) >= self.max_context:
                raise RolloutError(f"request {i}: prompt + prefix of {len(ids)} tokens does not "
                                   f"fit the model's context of {self.max_context}")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise RolloutError(f"request {i}: token ids {bad[:5]} outside the model's vocab "
                                   f"of {self.vocab_size} (tokenizer/model mismatch?)")
            budget = min(req.generation_budget(), self.max_context - len(ids))
            for j in range(req.sampling.n):
                if budget == 0:  # the prefix used the whole budget (a pure expert sample)
                    continue
                seed = (req.sampling.seed + j if req.sampling.seed is not None
                        else self._rng.randrange(2**62))
                rows.append((i, j, ids, budget, req.sampling, seed))
        out: List[List[Optional[Sample]]] = [[None] * r.sampling.n for r in requests]
        for i, req in enumerate(requests):
            for j in range(req.sampling.n):
                out[i][j] = empty_sample(req, self._version)
        with self._lock, cpu_compat.bypassed():  # the decode loop asks for no CUDA device
            for start in range(0, len(rows), self.max_batch_size):
                batch = [r for r in rows[start:start + self.max_batch_size]
                         if cancelled is None or not cancelled(r[0])]
                if not batch:
                    continue
                for (i, j, *_), sample in zip(batch, self._generate_batch(batch, cancelled)):
                    sample.prefix_len = len(requests[i].prefix_ids)
                    out[i][j] = sample
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def _generate_batch(self, rows, cancelled=None) -> List[Sample]:
        n = len(rows)
        # Each distinct input (a prompt, or prompt + expert prefix) is prefilled once and its
        # KV cache copied to the rows that share it — a group's G samples share their prompt,
        # so the prefill costs 1/G of one per row (what SGLang's radix cache does for them).
        distinct: Dict[tuple, int] = {}
        owner = [distinct.setdefault(tuple(r[2]), len(distinct)) for r in rows]
        inputs = list(distinct)
        length = max(len(t) for t in inputs)
        ids = torch.zeros(len(inputs), length, dtype=torch.long)
        attn = torch.zeros(len(inputs), length, dtype=torch.long)
        for k, toks in enumerate(inputs):
            ids[k, length - len(toks):] = torch.tensor(toks)
            attn[k, length - len(toks):] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        room = length + max(r[3] for r in rows)  # the longest row's prompt + budget
        cache = Cache(layer_class_to_replicate=functools.partial(_GrowingLayer, room=room))
        logits = self.model(input_ids=ids, attention_mask=attn, position_ids=pos,
                            use_cache=True, **self._last_logits,
                            **{self._cache_kw: cache}).logits[:, -1, :].float()
        if len(inputs) < n:  # one row per sample again
            index = torch.tensor(owner, device=self.device)
            cache.batch_select_indices(index)
            logits, attn, pos = logits[index], attn[index], pos[index]
        gens = [torch.Generator().manual_seed(r[5]) for r in rows]
        tokens: List[List[int]] = [[] for _ in rows]
        logps: List[List[float]] = [[] for _ in rows]
        finish = ["length"] * n
        stops = [set(self.eos_ids) | set(r[4].stop_token_ids) for r in rows]
        active = list(range(n))  # rows (of `rows`) still in the batch, in batch order
        next_pos = pos[:, -1] + 1
        while active:
            logits = logits.cpu()
            picked = _sample_rows(logits, [rows[k][4] for k in active], [gens[k] for k in active])
            picked_lp = torch.log_softmax(logits, dim=-1).gather(1, picked[:, None]).squeeze(1)
            chosen, chosen_lp = picked.tolist(), picked_lp.tolist()
            keep = []
            for b, k in enumerate(active):
                tokens[k].append(chosen[b])
                logps[k].append(chosen_lp[b])
                if chosen[b] in stops[k]:
                    finish[k] = "stop"
                elif len(tokens[k]) < rows[k][3] and not (cancelled and cancelled(rows[k][0])):
                    keep.append(b)
            if not keep:
                break
            index = torch.tensor(keep, device=self.device)
            if len(keep) < len(active):
                cache.batch_select_indices(index)
                attn, next_pos = attn[index], next_pos[index]
            active = [active[b] for b in keep]
            step_ids = torch.tensor([[chosen[b]] for b in keep], device=self.device)
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            logits = self.model(input_ids=step_ids, attention_mask=attn,
                                position_ids=next_pos.unsqueeze(1), use_cache=True,
                                **{self._cache_kw: cache}).logits[:, -1, :].float()
            next_pos = next_pos + 1
        self._kv_peak_bytes = max(self._kv_peak_bytes,
                                  sum(layer.peak_bytes for layer in cache.layers))
        return [Sample(tokens[k], logps[k], finish[k], self._version) for k in range(n)]

    @torch.no_grad()
    def teacher_forced_logprobs(self, input_ids: List[int], completion: List[int]) -> List[float]:
        """Raw log p of ``completion`` after ``input_ids`` by one full forward (for checks)."""
        seq = torch.tensor([input_ids + completion], device=self.device)
        logits = self.model(input_ids=seq).logits[0].float()
        lsm = torch.log_softmax(logits[len(input_ids) - 1:-1], -1)
        return lsm.gather(-1, torch.tensor(completion, device=self.device)[:, None]).squeeze(-1).tolist()

    # --- weights ---------------------------------------------------------------------------

    @torch.no_grad()
    def update_weights_from_tensors(self, named_tensors: Dict[str, torch.Tensor],
                                    weight_version: str, share: bool = False) -> None:
        """Load HF-named tensors. With ``share`` (the caller's tensors are the trainer's own:
        the in-process sync at TP = PP = 1) and the engine's ``share_weights``, a contiguous
        tensor of the engine's dtype is taken over, not copied: the
        trainer's fp32 weights (views of them: every HF tensor but q/k/v, cut out of the fused
        QKV) then serve generation directly (SmolLM2-135M: the engine's own weights 0.50 →
        0.06 GB). Sound because the trainer
        changes its weights only in the optimizer step, which is followed by this sync before
        anything is generated again; a tensor whose storage changed is taken over again."""
        if any(t.dtype == fp8.FP8 or fp8.is_scale(n) for n, t in named_tensors.items()):
            if not self.fp8:
                raise RolloutError("a weight update with fp8 tensors, but this engine was not "
                                   "started from an FP8 export (tools/quantize_fp8.py)")
            named_tensors = fp8.dequantize_named(named_tensors, self.fp8_block,
                                                 next(self.model.parameters()).dtype)
        with self._lock:
            state = self.model.state_dict()
            params = dict(self.model.named_parameters(remove_duplicate=False))
            unknown = [k for k in named_tensors if k not in state]
            if unknown:
                raise RolloutError(f"weight update names unknown to the model: {unknown[:5]}")
            for name, tensor in named_tensors.items():
                target = state[name]
                if tuple(tensor.shape) != tuple(target.shape):
                    raise RolloutError(f"weight update {name}: shape {tuple(tensor.shape)} != "
                                       f"model's {tuple(target.shape)}")
                if share and self.share_weights and name in params and tensor.is_contiguous() \
                        and tensor.dtype == target.dtype and tensor.device == target.device:
                    # the trainer's own tensor (or a view of it) becomes the engine's: its copy
                    # is freed, and later updates that hand over the same storage cost nothing
                    if params[name].data_ptr() != tensor.data_ptr():
                        params[name].data = tensor.detach()
                else:
                    target.copy_(tensor)
            self._version = str(weight_version)

    def update_weights_from_disk(self, path: str, weight_version: str) -> None:
        quantized, block = fp8.folder_block(path)
        if (quantized, block) != (self.fp8, self.fp8_block):
            raise RolloutError(f"{path}: FP8 {quantized} with block {block}, but this engine "
                               f"serves FP8 {self.fp8} with block {self.fp8_block} (as an SGLang "
                               "server, it keeps the layout it started with)")
        reader = HFCheckpointReader(path)
        self.update_weights_from_tensors({n: reader.get(n) for n in reader.names()}, weight_version)
        self.model_path = str(path)


def _dequantized_model(path: str, block, dtype: torch.dtype):
    """An FP8 export as a model computing in ``dtype``: built from its config without the
    quantization, its fp8 weights dequantized (not transformers' own FP8 loader: it has no
    per-tensor format and would leave FP8 layers a weight update could not fill by name)."""
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    reader = HFCheckpointReader(path)
    state = fp8.dequantize_named({n: reader.get(n) for n in reader.names()}, block, dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise RolloutError(f"{path}: FP8 export does not match its config (missing "
                           f"{sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]})")
    if missing:
        model.tie_weights()
    return model


def check_tokenizer(tokenizer_path: str, model_vocab: int) -> None:
    """Refuse a tokenizer whose ids do not fit the model's vocabulary."""
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    if len(tok) > model_vocab:
        raise RolloutError(f"tokenizer at {tokenizer_path} has {len(tok)} tokens but the model's "
                           f"vocab is {model_vocab}: tokenizer/model mismatch")
