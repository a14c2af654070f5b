"""A server that speaks SGLang's HTTP protocol on top of the embedded engine.

    python -m megatron_trapo.rollout.serve --model-path DIR --port 30000

It lets the SGLang client, the real sglang-router, server launch, health checks, failover and
weight updates (from disk, and by broadcast over a gloo/NCCL group) run for real on a CPU
machine, and gives laptop users the server workflow of a cluster. Concurrent /generate calls
are gathered for a few milliseconds and run as one batch. It also answers vLLM's
``/v1/completions`` (token-id prompts) and vLLM's dev/RL weight endpoints (``/pause``,
``/collective_rpc reload_weights``, ``/reset_prefix_cache``, ``/resume``), so the vLLM client and
its weight path are tested against it too.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import queue
import threading
import time
import uuid
from typing import Any, Dict, List, Optional

import torch
from fastapi import FastAPI, HTTPException, Request  # module level: FastAPI resolves annotations
from fastapi.responses import JSONResponse

from megatron_trapo.rollout import protocol
from megatron_trapo.rollout.hf_engine import HFEngine
from megatron_trapo.rollout.process_group import (destroy_weight_update_group,
                                                  init_weight_update_group)
from megatron_trapo.rollout.types import RolloutError, RolloutRequest, SamplingParams
from megatron_trapo.rollout.vllm_engine import TESTED_VLLM

logger = logging.getLogger("megatron_trapo.serve")

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class Batcher:
    """Collects concurrent generate calls and runs them through the engine as one batch."""

    def __init__(self, engine: HFEngine, window_s: float = 0.005):
        self.engine, self.window = engine, window_s
        self.queue: "queue.Queue" = queue.Queue()
        self.resume = threading.Event()
        self.resume.set()
        threading.Thread(target=self._loop, daemon=True, name="batcher").start()

    def submit(self, reqs: List[RolloutRequest]) -> "asyncio.Future":
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.queue.put((reqs, fut, loop))
        return fut

    def _loop(self) -> None:
        while True:
            items = [self.queue.get()]
            deadline = time.time() + self.window
            while time.time() < deadline:
                try:
                    items.append(self.queue.get(timeout=max(deadline - time.time(), 0)))
                except queue.Empty:
                    break
            self.resume.wait()  # paused for a weight update
            flat = [r for reqs, _, _ in items for r in reqs]
            try:
                results = self.engine.generate(flat)
                error = None
            except Exception as exc:  # reported to every caller of this batch
                results, error = None, exc
            offset = 0
            for reqs, fut, loop in items:
                value = error if error else results[offset:offset + len(reqs)]
                offset += len(reqs)
                setter = fut.set_exception if error else fut.set_result
                loop.call_soon_threadsafe(lambda f=fut, s=setter, v=value: f.done() or s(v))


def _stand_in_rank(conn, address: str, port: int, rank: int, world: int, name: str,
                   backend: str) -> None:
    """A TP worker's part of the weight group: join, then receive every broadcast it is told
    about (and drop it: the server's rank 0 loads the weights into the one model)."""
    import os

    parent = os.getppid()

    def exit_with_parent():  # a server killed by SIGKILL must not leave its ranks behind
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    group = init_weight_update_group(address, port, rank, world, name, backend)
    conn.send("joined")
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the server went away
            return
        if msg[0] == "close":
            destroy_weight_update_group(group)
            return
        for _, dtype, shape in msg[1]:
            t = torch.empty(shape, dtype=_DTYPES[dtype])
            torch.distributed.broadcast(t, src=0, group=group)
        conn.send("received")


class TPRankStandIn:
    """One stand-in TP rank (its own process, like an SGLang TP worker)."""

    def __init__(self, address: str, port: int, rank: int, world: int, name: str, backend: str):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_stand_in_rank, daemon=True,
                                args=(child, address, port, rank, world, name, backend))
        self.proc.start()

    def _expect(self, what: str, timeout_s: float = 600) -> None:
        if not self.conn.poll(timeout_s) or self.conn.recv() != what:
            raise RolloutError(f"stand-in TP rank did not report {what!r}")

    def joined(self) -> None:
        self._expect("joined")

    def send(self, msg) -> None:
        self.conn.send(msg)

    def done(self) -> None:
        self._expect("received")

    def close(self) -> None:
        self.conn.send(("close",))
        self.proc.join(timeout=30)


def build_app(engine: HFEngine, tokenizer_path: Optional[str] = None, batch_window_ms: float = 5,
              tp_size: int = 1):
    """``tp_size`` > 1: the server reports that TP size and joins weight-update groups with
    that many ranks (stand-in processes for ranks 1.., see :class:`TPRankStandIn`)."""
    app = FastAPI(title="megatron_trapo protocol server")
    batcher = Batcher(engine, batch_window_ms / 1000)
    state: Dict[str, Any] = {"groups": {}}
    tokenizer = None
    if tokenizer_path:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)

    def decode(ids: List[int]) -> str:
        return tokenizer.decode(ids) if tokenizer is not None else ""

    async def body_of(request: Request) -> Dict[str, Any]:
        ctype = request.headers.get("content-type", "")
        if "application/json" not in ctype:
            raise HTTPException(415, "Content-Type must be application/json")
        return await request.json()

    @app.post("/generate")
    async def generate(request: Request):
        body = await body_of(request)
        try:
            reqs = protocol.requests_from_sglang(body)
        except (ValueError, RolloutError) as exc:
            return JSONResponse({"error": {"message": str(exc)}}, status_code=400)
        try:
            results = await batcher.submit(reqs)
        except RolloutError as exc:
            return JSONResponse({"error": {"message": str(exc)}}, status_code=400)
        rid = body.get("rid") or uuid.uuid4().hex
        items = [protocol.sglang_item(s, f"{rid}-{i}-{j}", len(r.prompt_ids), decode(s.token_ids))
                 for i, (r, samples) in enumerate(zip(reqs, results))
                 for j, s in enumerate(samples)]
        single = not isinstance(body["input_ids"][0], list) and reqs[0].sampling.n == 1
        return items[0] if single else items

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/health_generate")
    async def health_generate():
        await batcher.submit([RolloutRequest([0], SamplingParams(temperature=0, max_new_tokens=1))])
        return {"status": "ok"}

    @app.get("/get_model_info")
    async def model_info():
        return {"model_path": engine.model_path, "tokenizer_path": tokenizer_path or engine.model_path,
                "is_generation": True, "weight_version": engine.weight_version}

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info():
        return {"model_path": engine.model_path, "weight_version": engine.weight_version,
                "engine": "megatron_trapo.hf", "max_context": engine.max_context,
                "tp_size": tp_size, "pp_size": 1, "dp_size": 1,
                "enable_deterministic_inference": True}  # sampling seeds are honoured

    @app.get("/v1/models")
    async def models():  # vLLM's list of served models (the id is what /v1/completions wants)
        return {"object": "list", "data": [{"id": engine.model_path, "object": "model",
                                            "owned_by": "megatron_trapo"}]}

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        return {"success": True}  # no prefix cache to flush

    @app.post("/pause_generation")
    async def pause():
        batcher.resume.clear()
        return {"success": True}

    @app.post("/continue_generation")
    async def resume():
        batcher.resume.set()
        return {"success": True}

    @app.post("/update_weight_version")
    async def update_version(request: Request):
        body = await body_of(request)
        engine._version = str(body["new_version"])
        return {"success": True}

    @app.post("/update_weights_from_disk")
    async def update_from_disk(request: Request):
        body = await body_of(request)
        version = str(body.get("weight_version") or engine.weight_version)
        try:
            await asyncio.to_thread(engine.update_weights_from_disk, body["model_path"], version)
        except Exception as exc:  # a bad path or mismatched tensors: reported, server keeps serving
            return {"success": False, "message": str(exc), "num_paused_requests": 0}
        return {"success": True, "message": "ok", "num_paused_requests": 0}

    @app.post("/init_weights_update_group")
    async def init_group(request: Request):
        body = await body_of(request)
        name = body.get("group_name", "weight_update_group")
        args = (body["master_address"], int(body["master_port"]), int(body["world_size"]), name,
                body.get("backend", "gloo"))
        offset = int(body["rank_offset"])
        try:
            # TP ranks 1.. are stand-in processes (as SGLang's TP workers are processes)
            members = [TPRankStandIn(*args[:2], offset + r, *args[2:]) for r in range(1, tp_size)]
            group = await asyncio.to_thread(init_weight_update_group, args[0], args[1], offset,
                                            args[2], name, args[4])
            for m in members:
                m.joined()
        except Exception as exc:  # reported like SGLang does: success false, message
            return {"success": False, "message": f"{type(exc).__name__}: {exc}"}
        state["groups"][name] = (group, members)
        return {"success": True, "message": "ok"}

    @app.post("/update_weights_from_distributed")
    async def update_distributed(request: Request):
        body = await body_of(request)
        entry = state["groups"].get(body.get("group_name", "weight_update_group"))
        if entry is None:
            return {"success": False, "message": "no weight update group; call "
                                                 "/init_weights_update_group first"}
        group, members = entry
        specs = list(zip(body["names"], body["dtypes"], body["shapes"]))

        def receive():
            for m in members:
                m.send(("receive", specs))
            tensors = {}
            for name, dtype, shape in specs:
                t = torch.empty(shape, dtype=_DTYPES[dtype])
                torch.distributed.broadcast(t, src=0, group=group)
                tensors[name] = t
            for m in members:
                m.done()
            engine.update_weights_from_tensors(
                tensors, str(body.get("weight_version") or engine.weight_version))

        try:
            await asyncio.to_thread(receive)
        except Exception as exc:
            return {"success": False, "message": str(exc)}
        return {"success": True, "message": "ok"}

    @app.post("/destroy_weights_update_group")
    async def destroy_group(request: Request):
        body = await body_of(request)
        entry = state["groups"].pop(body.get("group_name", "weight_update_group"), None)
        if entry is None:
            return {"success": False, "message": "The group to be destroyed does not exist."}
        group, members = entry
        for m in members:
            m.close()
        destroy_weight_update_group(group)
        return {"success": True, "message": "ok"}

    # vLLM's dev/RL endpoints (a server started with VLLM_SERVER_DEV_MODE=1), so that the vLLM
    # client's weight path runs against this server too; their shapes follow vLLM 0.33.0.
    @app.get("/version")
    async def vllm_version():
        return {"version": TESTED_VLLM}

    @app.get("/is_paused")
    async def is_paused():
        return {"is_paused": not batcher.resume.is_set()}

    @app.post("/pause")
    async def vllm_pause(mode: str = "abort"):
        if mode not in ("abort", "wait", "keep"):
            return JSONResponse({"error": f"mode must be abort, wait or keep, got {mode!r}"},
                                status_code=400)
        batcher.resume.clear()  # queued and new requests wait; the running batch finishes
        return {"status": "paused"}

    @app.post("/resume")
    async def vllm_resume():
        batcher.resume.set()
        return {"status": "resumed"}

    @app.post("/collective_rpc")
    async def collective_rpc(request: Request):
        body = await body_of(request)
        kwargs = body.get("kwargs") or {}
        if body.get("method") != "reload_weights" or set(kwargs) - {"weights_path"}:
            return JSONResponse({"error": "this server runs only reload_weights(weights_path=…)"},
                                status_code=400)
        try:
            await asyncio.to_thread(engine.update_weights_from_disk, kwargs["weights_path"],
                                    engine.weight_version)
        except Exception as exc:  # vLLM answers a failed RPC with HTTP 500
            return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=500)
        return {"results": [None] * tp_size}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        return {"success": True}  # no prefix cache here

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request)
        prompts = body["prompt"] if body["prompt"] and isinstance(body["prompt"][0], list) \
            else [body["prompt"]]
        n = int(body.get("n", 1))
        sp = SamplingParams(n=n, temperature=float(body.get("temperature", 1.0)),
                            top_p=float(body.get("top_p", 1.0)), top_k=int(body.get("top_k", -1)),
                            max_new_tokens=int(body.get("max_tokens", 16)),
                            stop_token_ids=list(body.get("stop_token_ids") or []),
                            seed=body.get("seed"))
        try:
            results = await batcher.submit([RolloutRequest(list(p), sp) for p in prompts])
        except RolloutError as exc:
            return JSONResponse({"error": {"message": str(exc)}}, status_code=400)
        choices = []
        for p, samples in enumerate(results):
            for j, s in enumerate(samples):
                choices.append({"index": p * n + j, "text": decode(s.token_ids),
                                "token_ids": s.token_ids, "prompt_token_ids": prompts[p],
                                "logprobs": {"token_logprobs": s.logprobs,
                                             "tokens": [f"token_id:{t}" for t in s.token_ids]},
                                "finish_reason": s.finish_reason})
        return {"id": uuid.uuid4().hex, "object": "text_completion", "model": body.get("model"),
                "choices": choices}

    return app


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="SGLang-protocol server over the embedded engine")
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--tokenizer-path", default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--batch-window-ms", type=float, default=5.0)
    ap.add_argument("--weight-version", default="0")
    ap.add_argument("--tp-size", type=int, default=1,
                    help="ranks this server takes in weight-update groups, as an SGLang server "
                         "of that TP size does (the extra ranks receive and check the tensors)")
    args = ap.parse_args(argv)
    import uvicorn

    torch.set_num_threads(max(1, torch.get_num_threads()))
    engine = HFEngine(args.model_path, device=args.device, dtype=args.dtype,
                      max_batch_size=args.max_batch_size, tokenizer_path=args.tokenizer_path,
                      weight_version=args.weight_version)
    app = build_app(engine, args.tokenizer_path, args.batch_window_ms, args.tp_size)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
