"""SGLang's native /generate protocol (and vLLM's /v1/completions subset), both directions:
building requests for a server and turning a server's answer into :class:`Sample` s — and the
reverse, used by our protocol server. Kept in one place so client and server cannot drift."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from megatron_trapo.rollout.server_schema import GenerateBody, ServerLimits, validate
from megatron_trapo.rollout.types import RolloutError, RolloutRequest, Sample, SamplingParams


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


def requests_from_sglang(body: Any, limits: Optional[ServerLimits] = None
                         ) -> List[RolloutRequest]:
    """Parse a /generate body into requests. SGLang 0.5.23 rejects unknown fields; so does our
    server, and fields sglang-router adds (or SGLang features we do not implement) are accepted
    only with neutral values (see :mod:`server_schema`). Raises ``BadRequest`` (a ValueError
    naming the field) on what it refuses."""
    parsed = validate(GenerateBody, body, limits or ServerLimits())
    return requests_from_parsed(parsed)


def requests_from_parsed(body: GenerateBody) -> List[RolloutRequest]:
    s = body.sampling_params
    sp = SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                        max_new_tokens=s.max_new_tokens, stop_token_ids=list(s.stop_token_ids or []),
                        seed=s.sampling_seed)
    return [RolloutRequest(list(p), sp) for p in body.input_ids]

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
