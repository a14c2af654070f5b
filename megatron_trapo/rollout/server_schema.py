"""The protocol server's request bodies as pydantic models, and the limits it enforces.

Every body is parsed here before anything runs, so that a client mistake gets a 4xx whose message
names the field (``sampling_params.n: at most 256 (the server's --max-n)``), never a bare 500
from deep inside: malformed JSON → 400; a value of the wrong type, NaN/inf, a missing field, a
negative or over-limit number → 422, as FastAPI answers its own validation errors. Token lists
are checked by hand (pydantic's union errors for "a list of ints or a list of lists" name
internal type tags, not the position the client has to fix).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)

_DTYPES = ("bfloat16", "float32", "float16", "float8_e4m3fn")  # SGLang: getattr(torch, name)


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of the server (command-line flags of ``serve``)."""

    max_n: int = 256  # samples per prompt
    max_new_tokens: int = 1 << 30  # the model's context is the real bound; set by the server
    max_queued_samples: int = 4096  # prompts × n waiting or running; more → 503
    max_body_bytes: int = 64 << 20


class BadRequest(ValueError):
    """A client error: ``status`` 400 (unreadable body), 413 (too large) or 422 (a field)."""

    def __init__(self, message: str, status: int = 422, fields: Optional[List[str]] = None):
        super().__init__(message)
        self.status, self.fields = status, fields or []


def parse_json(raw: bytes, limits: ServerLimits) -> Any:
    if len(raw) > limits.max_body_bytes:
        raise BadRequest(f"request body of {len(raw)} bytes exceeds the server's limit of "
                         f"{limits.max_body_bytes} (--max-body-mb)", 413)
    if not raw.strip():
        raise BadRequest("empty request body (a JSON object is expected)", 400)

    def no_constants(name: str):  # Python's json reads NaN/Infinity; JSON has no such values
        raise ValueError(f"{name} is not valid JSON (use a number)")

    try:
        return json.loads(raw, parse_constant=no_constants)
    except UnicodeDecodeError as exc:
        raise BadRequest(f"request body is not UTF-8 ({exc.reason} at byte {exc.start})", 400)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
                         400)
    except ValueError as exc:
        raise BadRequest(f"malformed JSON: {exc}", 400)


def validate(model: type, obj: Any, limits: ServerLimits) -> BaseModel:
    """``model.model_validate`` with the errors turned into one message naming each field."""
    if not isinstance(obj, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(obj).__name__}")
    try:
        return model.model_validate(obj, context={"limits": limits})
    except ValidationError as exc:
        raise BadRequest(describe(exc), 422, fields=[_loc(e["loc"]) for e in exc.errors()])


def describe(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        where = _loc(e["loc"]) or "body"
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def _loc(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _limits(info: ValidationInfo) -> ServerLimits:
    return (info.context or {}).get("limits", ServerLimits())


def token_ids(value: Any, field: str) -> List[int]:
    """A list of token ids: ints only (5.7 is not silently truncated to 5, True is not 1)."""
    if not isinstance(value, list):
        raise ValueError(f"{field} must be a list of token ids, got {type(value).__name__}")
    for i, t in enumerate(value):
        if type(t) is not int:
            raise ValueError(f"{field}[{i}] must be an integer token id, got {t!r}")
    return value


def prompts(value: Any, field: str) -> List[List[int]]:
    """One prompt (a list of ids) or a batch (a list of lists): always returned as a batch."""
    if isinstance(value, list) and value and isinstance(value[0], list):
        return [token_ids(p, f"{field}[{k}]") for k, p in enumerate(value)]
    return [token_ids(value, field)]


class _Strict(BaseModel):
    # strict: "5" is not 5 and 1.0 is not an int; NaN and inf are refused for every float
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _Lenient(_Strict):
    # weight-control bodies: SGLang's own request types carry many optional fields that clients
    # (slime, our engine, sglang-router) may send; the ones we do not use are ignored
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


def _check_n(v: int, info: ValidationInfo) -> int:
    cap = _limits(info).max_n
    if v > cap:
        raise ValueError(f"at most {cap} (the server's --max-n)")
    return v


def _check_max_new(v: int, info: ValidationInfo) -> int:
    cap = _limits(info).max_new_tokens
    if v > cap:
        raise ValueError(f"at most {cap} (the server's --max-new-tokens)")
    return v


class SGLangSampling(_Strict):
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1)
    n: int = Field(1, ge=1)
    stop_token_ids: Optional[List[int]] = None
    sampling_seed: Optional[int] = None
    stop: Optional[Union[str, List[str]]] = None
    skip_special_tokens: Optional[bool] = None
    no_stop_trim: Optional[bool] = None
    spaces_between_special_tokens: Optional[bool] = None
    # accepted only with their neutral values (sglang-router and clients send some of them)
    min_p: Optional[float] = None
    min_new_tokens: Optional[int] = None
    ignore_eos: Optional[bool] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    regex: Optional[str] = None
    json_schema: Optional[str] = None
    ebnf: Optional[str] = None
    logit_bias: Optional[Dict[str, float]] = None
    custom_params: Optional[Dict[str, Any]] = None

    _n = field_validator("n")(_check_n)
    _max_new = field_validator("max_new_tokens")(_check_max_new)

    @model_validator(mode="after")
    def _neutral(self):
        neutral = {"min_p": 0.0, "min_new_tokens": 0, "ignore_eos": False,
                   "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0}
        for key, value in neutral.items():
            got = getattr(self, key)
            if got is not None and got != value:
                raise ValueError(f"sampling_params.{key}={got!r} is not supported by this server")
        for key in ("regex", "json_schema", "ebnf", "logit_bias", "custom_params"):
            if getattr(self, key):
                raise ValueError(f"sampling_params.{key} is not supported by this server")
        if self.stop:
            raise ValueError("string stop sequences are not supported; use stop_token_ids")
        return self


class GenerateBody(_Strict):
    """SGLang's native ``/generate`` (0.5.x), the subset this server implements."""

    input_ids: Any = None
    text: Optional[Union[str, List[str]]] = None
    sampling_params: SGLangSampling = Field(default_factory=SGLangSampling)
    return_logprob: Optional[bool] = None
    logprob_start_len: Optional[int] = None
    top_logprobs_num: Optional[int] = None
    stream: Optional[bool] = None
    rid: Optional[Union[str, List[str]]] = None
    model: Optional[str] = None
    background: Optional[bool] = None
    log_metrics: Optional[bool] = None
    no_logs: Optional[bool] = None
    return_bytes: Optional[bool] = None
    return_text_in_logprobs: Optional[bool] = None
    return_entropy: Optional[bool] = None
    return_hidden_states: Optional[bool] = None

    @model_validator(mode="after")
    def _check(self):
        if self.input_ids is None:
            raise ValueError("input_ids is required (this server does not tokenize text)")
        self.input_ids = prompts(self.input_ids, "input_ids")
        for key in ("return_entropy", "return_hidden_states", "stream"):
            if getattr(self, key):
                raise ValueError(f"{key}=true is not supported by this server")
        return self

    @property
    def batched(self) -> bool:
        return len(self.input_ids) > 1 or self.sampling_params.n > 1


class CompletionsBody(_Strict):
    """vLLM's ``/v1/completions`` with token-id prompts (what our vLLM client sends)."""

    prompt: Any = None
    model: Optional[str] = None
    n: int = Field(1, ge=1)
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1)
    logprobs: Optional[int] = Field(None, ge=0)
    return_token_ids: Optional[bool] = None
    return_tokens_as_token_ids: Optional[bool] = None
    skip_special_tokens: Optional[bool] = None
    stop_token_ids: Optional[List[int]] = None
    seed: Optional[int] = None

    _n = field_validator("n")(_check_n)
    _max_new = field_validator("max_tokens")(_check_max_new)

    @model_validator(mode="after")
    def _check(self):
        if self.prompt is None:
            raise ValueError("prompt is required (token ids; this server does not tokenize)")
        self.prompt = prompts(self.prompt, "prompt")
        return self


class WeightVersionBody(_Lenient):
    new_version: Union[str, int]


class DiskUpdateBody(_Lenient):
    model_path: str = Field(min_length=1)
    weight_version: Optional[Union[str, int]] = None


class InitGroupBody(_Lenient):
    master_address: str = Field(min_length=1)
    master_port: int = Field(ge=1, le=65535)
    rank_offset: int = Field(ge=1)  # rank 0 is the trainer
    world_size: int = Field(ge=2)
    group_name: str = "weight_update_group"
    backend: str = "gloo"

    @model_validator(mode="after")
    def _fits(self):
        if self.rank_offset >= self.world_size:
            raise ValueError(f"rank_offset {self.rank_offset} must be below world_size "
                             f"{self.world_size}")
        return self


class DistributedUpdateBody(_Lenient):
    names: List[str]
    dtypes: List[str]
    shapes: List[List[int]]
    group_name: str = "weight_update_group"
    weight_version: Optional[Union[str, int]] = None

    @model_validator(mode="after")
    def _consistent(self):
        if not len(self.names) == len(self.dtypes) == len(self.shapes):
            raise ValueError(f"names, dtypes and shapes differ in length ({len(self.names)}, "
                             f"{len(self.dtypes)}, {len(self.shapes)})")
        for i, d in enumerate(self.dtypes):
            if d not in _DTYPES:
                raise ValueError(f"dtypes[{i}]={d!r} is not one of {list(_DTYPES)}")
        for i, s in enumerate(self.shapes):
            if any(x < 0 for x in s):
                raise ValueError(f"shapes[{i}]={s} has a negative size")
        return self


class GroupNameBody(_Lenient):
    group_name: str = "weight_update_group"


class CollectiveRpcBody(_Lenient):
    method: str
    kwargs: Dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _reload_only(self):
        if self.method != "reload_weights" or set(self.kwargs) - {"weights_path"}:
            raise ValueError("this server runs only reload_weights(weights_path=…)")
        path = self.kwargs.get("weights_path")
        if path is not None and not isinstance(path, str):
            raise ValueError("kwargs.weights_path must be a string")
        return self
