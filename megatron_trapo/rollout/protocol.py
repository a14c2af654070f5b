"""SGLang's native /generate protocol (and vLLM's /v1/completions subset), both directions:
building requests for a server and turning a server's answer into :class:`Sample` s — and the
reverse, used by our protocol server. Kept in one place so client and server cannot drift."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from megatron_trapo.rollout.types import RolloutError, RolloutRequest, Sample, SamplingParams

# SGLang 0.5.23 rejects unknown fields with 400; so does our server. Fields sglang-router adds
# (or SGLang features we do not implement) are accepted only with neutral values.
GENERATE_FIELDS = {"input_ids", "text", "sampling_params", "return_logprob", "logprob_start_len",
                   "top_logprobs_num", "stream", "rid", "model", "background", "log_metrics",
                   "no_logs", "return_bytes", "return_text_in_logprobs", "return_entropy",
                   "return_hidden_states"}
_NEUTRAL_GENERATE = {"return_entropy": False, "return_hidden_states": False}
SAMPLING_FIELDS = {"max_new_tokens", "temperature", "top_p", "top_k", "min_p", "min_new_tokens",
                   "n", "stop", "stop_token_ids", "ignore_eos", "skip_special_tokens",
                   "no_stop_trim", "sampling_seed", "spaces_between_special_tokens",
                   "frequency_penalty", "presence_penalty", "repetition_penalty", "regex",
                   "json_schema", "ebnf", "logit_bias", "custom_params"}
_NEUTRAL_SAMPLING = {"min_p": 0.0, "min_new_tokens": 0, "ignore_eos": False,
                     "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
                     "regex": None, "json_schema": None, "ebnf": None, "logit_bias": None,
                     "custom_params": None}


def sglang_payload(input_ids: List[int], sp: SamplingParams, seed: Optional[int],
                   rid: Optional[str] = None) -> Dict[str, Any]:
    """One-sample /generate request (slime's style: one HTTP request per sample)."""
    params: Dict[str, Any] = {"max_new_tokens": sp.max_new_tokens, "temperature": sp.temperature,
                              "top_p": sp.top_p, "top_k": sp.top_k, "n": 1,
                              "stop_token_ids": list(sp.stop_token_ids), "no_stop_trim": True,
                              "skip_special_tokens": False,
                              "spaces_between_special_tokens": False}
    if seed is not None:
        params["sampling_seed"] = int(seed)
    body: Dict[str, Any] = {"input_ids": list(input_ids), "sampling_params": params,
                            "return_logprob": True, "logprob_start_len": -1, "stream": False}
    if rid is not None:
        body["rid"] = rid
    return body


def sample_from_sglang(item: Dict[str, Any], prefix_len: int) -> Sample:
    meta = item.get("meta_info") or {}
    pairs = meta.get("output_token_logprobs")
    if pairs is None:
        raise RolloutError("server response has no meta_info.output_token_logprobs "
                           "(was return_logprob honoured?)")
    ids = [int(p[1]) for p in pairs]
    out_ids = item.get("output_ids")
    if out_ids is not None and list(out_ids) != ids:
        raise RolloutError("output_ids and output_token_logprobs disagree in the server response")
    finish = meta.get("finish_reason") or {}
    reason = finish.get("type", "length") if isinstance(finish, dict) else str(finish)
    if reason not in ("stop", "length"):
        raise RolloutError(f"generation finished with {finish!r}")
    return Sample(ids, [float(p[0]) for p in pairs], reason, str(meta.get("weight_version", "")),
                  prefix_len)


def sglang_item(sample: Sample, rid: str, prompt_tokens: int, text: str = "") -> Dict[str, Any]:
    """Our server's answer for one sample, in SGLang's format."""
    if sample.finish_reason == "stop":
        finish = {"type": "stop", "matched": sample.token_ids[-1]}
    else:
        finish = {"type": "length", "length": len(sample.token_ids)}
    return {"text": text, "output_ids": sample.token_ids,
            "meta_info": {"id": rid, "finish_reason": finish, "prompt_tokens": prompt_tokens,
                          "completion_tokens": len(sample.token_ids), "cached_tokens": 0,
                          "weight_version": sample.weight_version,
                          "output_token_logprobs": [[lp, t, None] for lp, t in
                                                    zip(sample.logprobs, sample.token_ids)]}}


def requests_from_sglang(body: Dict[str, Any]) -> List[RolloutRequest]:
    """Parse a /generate body into requests; raises ValueError (→ HTTP 400) on what we refuse."""
    unknown = set(body) - GENERATE_FIELDS
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    for key, neutral in _NEUTRAL_GENERATE.items():
        if body.get(key, neutral) not in (neutral, None):
            raise ValueError(f"{key}={body[key]!r} is not supported by this server")
    if body.get("stream"):
        raise ValueError("stream=true is not supported by this server")
    if "input_ids" not in body:
        raise ValueError("input_ids is required (this server does not tokenize text)")
    sp_in = dict(body.get("sampling_params") or {})
    unknown = set(sp_in) - SAMPLING_FIELDS
    if unknown:
        raise ValueError(f"unknown sampling_params {sorted(unknown)}")
    for key, neutral in _NEUTRAL_SAMPLING.items():
        if sp_in.get(key, neutral) not in (neutral, None):
            raise ValueError(f"sampling_params.{key}={sp_in[key]!r} is not supported by this "
                             "server")
    if sp_in.get("stop"):
        raise ValueError("string stop sequences are not supported; use stop_token_ids")
    ids = body["input_ids"]
    batch = ids if ids and isinstance(ids[0], list) else [ids]
    sp = SamplingParams(n=int(sp_in.get("n", 1)), temperature=float(sp_in.get("temperature", 1.0)),
                        top_p=float(sp_in.get("top_p", 1.0)), top_k=int(sp_in.get("top_k", -1)),
                        max_new_tokens=int(sp_in.get("max_new_tokens", 128)),
                        stop_token_ids=[int(t) for t in sp_in.get("stop_token_ids") or []],
                        seed=sp_in.get("sampling_seed"))
    return [RolloutRequest([int(t) for t in p], sp) for p in batch]


def vllm_payload(prompts: List[List[int]], sp: SamplingParams, model: str) -> Dict[str, Any]:
    body = {"model": model, "prompt": prompts, "n": sp.n, "max_tokens": sp.max_new_tokens,
            "temperature": sp.temperature, "top_p": sp.top_p, "logprobs": 0,
            "return_token_ids": True, "return_tokens_as_token_ids": True,
            "skip_special_tokens": False, "stop_token_ids": list(sp.stop_token_ids)}
    if sp.top_k and sp.top_k > 0:
        body["top_k"] = sp.top_k
    if sp.seed is not None:
        body["seed"] = int(sp.seed)
    return body


def samples_from_vllm(resp: Dict[str, Any], num_prompts: int, n: int, prefix_lens: List[int],
                      weight_version: str) -> List[List[Sample]]:
    """Choices come grouped per prompt: index = prompt·n + j."""
    out: List[List[Optional[Sample]]] = [[None] * n for _ in range(num_prompts)]
    for choice in resp.get("choices", []):
        idx = int(choice["index"])
        p, j = divmod(idx, n)
        ids = choice.get("token_ids")
        if ids is None:
            raise RolloutError("vLLM response has no token_ids (return_token_ids unsupported?)")
        lps = (choice.get("logprobs") or {}).get("token_logprobs")
        if lps is None or len(lps) != len(ids):
            raise RolloutError("vLLM response has no per-token logprobs for every token")
        reason = choice.get("finish_reason") or "length"
        out[p][j] = Sample([int(t) for t in ids], [float(x) for x in lps],
                           "stop" if reason == "stop" else "length", weight_version,
                           prefix_lens[p])
    missing = [(p, j) for p in range(num_prompts) for j in range(n) if out[p][j] is None]
    if missing:
        raise RolloutError(f"vLLM response lacks choices for {missing[:5]}")
    return out  # type: ignore[return-value]
