"""The vLLM client's weight path against vLLM 0.33.0's own code.

vLLM's HTTP routers and worker are read from the pinned wheel's sources (``scripts/setup.sh``
extracts them to ``.cache/vllm-0.33.0``): a fake server built from *their* route table (paths,
HTTP methods, query and body parameters, the ``PauseMode`` values) answers our client, and
refuses anything vLLM's routers do not declare. The RPC method and its keyword arguments are
checked against ``Worker.reload_weights`` → ``GPUModelRunner.reload_weights``. The order of the
calls — pause, reload, prefix-cache reset, resume — is what makes a reload safe; the former
client sent only the reload.
"""
from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple
from urllib.parse import parse_qsl

import httpx
import pytest

from megatron_trapo.rollout.types import RolloutError
from megatron_trapo.rollout.vllm_engine import TESTED_VLLM, VLLMEngine

ROOT = Path(__file__).resolve().parents[3] / ".cache" / f"vllm-{TESTED_VLLM}"
DEV_ONLY = ("vllm/entrypoints/serve/dev/", "vllm/entrypoints/rl/")  # VLLM_SERVER_DEV_MODE=1


@dataclass
class Route:
    method: str
    path: str
    source: str
    query: Set[str] = field(default_factory=set)
    body: Set[str] = field(default_factory=set)  # embedded Body() fields or keys read by hand
    literals: Dict[str, List[str]] = field(default_factory=dict)  # query param -> allowed values


def _sources() -> Path:
    assert (ROOT / "EXTRACTED_FROM").is_file(), (
        f"vLLM {TESTED_VLLM}'s sources are needed in {ROOT} (scripts/setup.sh extracts them)")
    return ROOT


def _pause_modes() -> List[str]:
    tree = ast.parse((_sources() / "vllm/v1/engine/__init__.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "PauseMode":
            return [e.value for e in node.value.slice.elts]
    raise AssertionError("PauseMode not found in vllm/v1/engine/__init__.py")


def _param_kind(arg: ast.arg, default: Optional[ast.expr]) -> Optional[str]:
    """'query' / 'body' for FastAPI Query()/Body(embed=True) parameters, else None."""
    def call_name(node):
        return node.func.id if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
            else None

    markers = []
    ann = arg.annotation
    if isinstance(ann, ast.Subscript) and getattr(ann.value, "id", "") == "Annotated":
        markers += [e for e in ann.slice.elts[1:]]
    if default is not None:
        markers.append(default)
    for m in markers:
        if call_name(m) == "Query":
            return "query"
        if call_name(m) == "Body":
            return "body"
    if ann is not None and getattr(ann, "id", "") in ("bool", "str", "int", "float"):
        return "query"  # FastAPI reads a plain scalar parameter from the query string
    return None


def vllm_routes() -> Dict[Tuple[str, str], Route]:
    routes = {}
    modes = _pause_modes()
    for f in sorted((_sources() / "vllm/entrypoints").rglob("*.py")):
        rel = f.relative_to(_sources()).as_posix()
        for fn in ast.walk(ast.parse(f.read_text())):
            if not isinstance(fn, ast.AsyncFunctionDef):
                continue
            for dec in fn.decorator_list:
                if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)
                        and getattr(dec.func.value, "id", "") in ("router", "app")
                        and dec.func.attr in ("get", "post") and dec.args
                        and isinstance(dec.args[0], ast.Constant)):
                    continue
                route = Route(dec.func.attr.upper(), dec.args[0].value, rel)
                args = fn.args.args
                defaults = [None] * (len(args) - len(fn.args.defaults)) + list(fn.args.defaults)
                for arg, default in zip(args, defaults):
                    kind = _param_kind(arg, default)
                    if kind == "query":
                        route.query.add(arg.arg)
                        if "PauseMode" in ast.unparse(arg.annotation):
                            route.literals[arg.arg] = modes
                    elif kind == "body":
                        route.body.add(arg.arg)
                for node in ast.walk(fn):  # keys of a JSON body read by hand: body.get("k")
                    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                            and node.func.attr == "get" and getattr(node.func.value, "id", "")
                            == "body" and node.args and isinstance(node.args[0], ast.Constant)):
                        route.body.add(node.args[0].value)
                routes[(route.method, route.path)] = route
    return routes


def reload_weights_params() -> Tuple[bool, Set[str]]:
    """(Worker forwards reload_weights' kwargs, GPUModelRunner.reload_weights' parameters)."""
    def method(path, cls, name):
        tree = ast.parse((_sources() / path).read_text())
        for c in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls):
            for fn in c.body:
                if isinstance(fn, ast.FunctionDef) and fn.name == name:
                    return fn
        raise AssertionError(f"{cls}.{name} not in {path}")

    worker = method("vllm/v1/worker/gpu_worker.py", "Worker", "reload_weights")
    runner = method("vllm/v1/worker/gpu_model_runner.py", "GPUModelRunner", "reload_weights")
    forwards = worker.args.kwarg is not None and "model_runner.reload_weights" in ast.unparse(worker)
    return forwards, {a.arg for a in runner.args.args[1:] + runner.args.kwonlyargs}


class FakeVLLM:
    """Answers as a vLLM 0.33.0 server would, from vLLM's route table; records every call."""

    def __init__(self, dev_mode=True, version=TESTED_VLLM, reset_failures=0, model="m"):
        self.routes = {k: r for k, r in vllm_routes().items()
                       if dev_mode or not r.source.startswith(DEV_ONLY)}
        self.version, self.reset_failures, self.model = version, reset_failures, model
        self.calls: List[Tuple[str, str, dict, dict]] = []
        self.paused = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        route = self.routes.get((request.method, path))
        if route is None:
            return httpx.Response(404, json={"detail": "Not Found"})
        query = dict(parse_qsl(request.url.query.decode()))
        body = json.loads(request.content) if request.content else {}
        unknown_q = set(query) - route.query
        unknown_b = set(body) - route.body
        if unknown_q or unknown_b:  # FastAPI ignores unknown keys: a silent no-op, so fail here
            raise AssertionError(f"{path}: vLLM ({route.source}) declares no "
                                 f"{sorted(unknown_q | unknown_b)}")
        for name, allowed in route.literals.items():
            if name in query and query[name] not in allowed:
                return httpx.Response(422, json={"detail": f"{name} not in {allowed}"})
        self.calls.append((request.method, path, query, body))
        if path == "/version":
            return httpx.Response(200, json={"version": self.version})
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": self.model}]})
        if path == "/is_paused":
            return httpx.Response(200, json={"is_paused": self.paused})
        if path in ("/pause", "/resume"):
            self.paused = path == "/pause"
            return httpx.Response(200, json={"status": path[1:] + "d"})
        if path == "/reset_prefix_cache":
            self.reset_failures -= 1
            return httpx.Response(200, json={"success": self.reset_failures < 0})
        if path == "/collective_rpc":
            return httpx.Response(200, json={"results": [None]})
        return httpx.Response(200, json={"success": True})


def engine_on(fake: FakeVLLM, **kw) -> VLLMEngine:
    return VLLMEngine(["http://vllm-a:8000"], model="m", transport=httpx.MockTransport(fake), **kw)


def test_route_table_read_from_vllm_sources():
    routes = vllm_routes()
    # the reader finds what the weight path needs, with the parameters vLLM declares
    assert routes[("POST", "/pause")].query == {"mode", "clear_cache"}
    assert routes[("POST", "/pause")].literals["mode"] == ["abort", "wait", "keep"]
    assert routes[("POST", "/update_weight_version")].body == {"new_version"}
    assert {"method", "args", "kwargs", "timeout"} <= routes[("POST", "/collective_rpc")].body
    assert routes[("POST", "/reset_prefix_cache")].query == {"reset_running_requests",
                                                             "reset_external"}
    forwards, params = reload_weights_params()
    assert forwards and {"weights_path", "is_checkpoint_format"} <= params


def test_weight_update_calls_match_vllm_and_run_in_a_safe_order():
    fake = FakeVLLM()
    engine = engine_on(fake, weight_updates=True)
    fake.calls.clear()
    engine.pause()  # WeightSync.sync: pause, write + reload, resume
    engine.update_weights_from_disk("/shared/weights/v7", "7")
    engine.resume()
    assert [c[1] for c in fake.calls] == ["/pause", "/collective_rpc", "/reset_prefix_cache",
                                          "/update_weight_version", "/resume"]
    _, _, query, _ = fake.calls[0]
    assert query["mode"] == "wait"  # in-flight requests finish; new ones wait
    rpc = fake.calls[1][3]
    forwards, params = reload_weights_params()
    assert rpc["method"] == "reload_weights" and forwards
    assert set(rpc["kwargs"]) <= params and rpc["kwargs"]["weights_path"] == "/shared/weights/v7"
    assert fake.calls[3][3] == {"new_version": "7"} and engine.weight_version == "7"


def test_prefix_cache_reset_is_retried_then_refused():
    fake = FakeVLLM(reset_failures=2)
    engine = engine_on(fake, reset_cache_attempts=5)
    engine.update_weights_from_disk("/w/v1", "1")
    assert [c[1] for c in fake.calls].count("/reset_prefix_cache") == 3
    stuck = FakeVLLM(reset_failures=99)
    with pytest.raises(RolloutError, match="reset_prefix_cache kept answering success=false"):
        engine_on(stuck, reset_cache_attempts=2).update_weights_from_disk("/w/v2", "2")


def test_server_without_dev_mode_is_refused_when_training_starts():
    fake = FakeVLLM(dev_mode=False)
    engine_on(fake)  # evaluation needs only /v1/completions: fine
    with pytest.raises(RolloutError, match="VLLM_SERVER_DEV_MODE=1"):
        engine_on(fake, weight_updates=True)


def test_old_vllm_is_refused_when_training_starts():
    with pytest.raises(RolloutError, match=r"runs vLLM 0\.10\.2; weight sync needs vLLM >= 0\.32"):
        engine_on(FakeVLLM(version="0.10.2"), weight_updates=True)
