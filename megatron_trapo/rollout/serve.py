"""A server that speaks SGLang's HTTP protocol on top of the HF engine.

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
import multiprocessing as mp
import os
import queue
import threading
import time
import uuid
from typing import Any, Dict, List, Optional

import torch
import uvicorn
from fastapi import FastAPI, Request  # module level: FastAPI resolves annotations
from fastapi.responses import JSONResponse
from transformers import AutoTokenizer

from megatron_trapo.rollout import protocol
from megatron_trapo.rollout.hf_engine import HFEngine
from megatron_trapo.rollout.process_group import (destroy_weight_update_group,
                                                  init_weight_update_group)
from megatron_trapo.rollout.server_schema import (BadRequest, CollectiveRpcBody, CompletionsBody,
                                                  DiskUpdateBody, DistributedUpdateBody,
                                                  GenerateBody, GroupNameBody, InitGroupBody,
                                                  ServerLimits, WeightVersionBody, parse_json,
                                                  validate)
from megatron_trapo.rollout.types import RolloutError, RolloutRequest, SamplingParams
from megatron_trapo.rollout.vllm_engine import TESTED_VLLM

logger = logging.getLogger("megatron_trapo.serve")

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16,
           "float8_e4m3fn": torch.float8_e4m3fn}


def _receive(shape, dtype: str, group) -> torch.Tensor:
    """One broadcast tensor; an fp8 one arrives as its bytes (gloo has no float8; the sender
    sends ``view(uint8)``, as NCCL carries float8 anyway)."""
    t = torch.empty(shape, dtype=_DTYPES[dtype])
    torch.distributed.broadcast(t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t,
                                src=0, group=group)
    return t


class QueueFull(Exception):
    """More samples queued than ``--max-queued-samples``: answered with 503 and Retry-After."""


class Job:
    """One HTTP request's prompts, waiting in or running through the batcher."""

    def __init__(self, reqs: List[RolloutRequest], loop: asyncio.AbstractEventLoop):
        self.reqs, self.loop = reqs, loop
        self.fut: "asyncio.Future" = loop.create_future()
        self.samples = sum(r.sampling.n for r in reqs)
        self.cancelled = False  # the client went away: its rows leave the batch

    def finish(self, value, error: bool) -> None:
        def settle():
            if not self.fut.done():
                (self.fut.set_exception if error else self.fut.set_result)(value)
        self.loop.call_soon_threadsafe(settle)


class Batcher:
    """Collects concurrent generate calls and runs them through the engine as one batch.

    The queue is bounded in samples (prompts × n, waiting or running): a request that would
    overflow it is refused with 503 at once instead of making every client wait; a job whose
    client disconnected is skipped, or leaves a running batch at its next token."""

    def __init__(self, engine: HFEngine, window_s: float = 0.005,
                 max_queued_samples: int = 4096):
        self.engine, self.window, self.capacity = engine, window_s, max_queued_samples
        self.queue: "queue.Queue[Job]" = queue.Queue()
        self.resume = threading.Event()
        self.resume.set()
        self._lock = threading.Lock()
        self.pending = 0  # samples queued or running
        self.batch_started: Optional[float] = None  # when the running batch began
        threading.Thread(target=self._loop, daemon=True, name="batcher").start()

    def submit(self, reqs: List[RolloutRequest], bypass_limit: bool = False) -> Job:
        job = Job(reqs, asyncio.get_running_loop())
        with self._lock:
            if not bypass_limit and self.pending + job.samples > self.capacity:
                raise QueueFull(f"the server's queue holds {self.pending} samples; this request "
                                f"adds {job.samples} and the limit is {self.capacity} "
                                "(--max-queued-samples): retry later")
            self.pending += job.samples
        self.queue.put(job)
        return job

    def _loop(self) -> None:
        while True:
            jobs = [self.queue.get()]
            deadline = time.time() + self.window
            while time.time() < deadline:
                try:
                    jobs.append(self.queue.get(timeout=max(deadline - time.time(), 0)))
                except queue.Empty:
                    break
            self.resume.wait()  # paused for a weight update
            live = [j for j in jobs if not j.cancelled]
            owner = [j for j in live for _ in j.reqs]  # request index → its job
            self.batch_started = time.time()
            try:
                if live:
                    results = self.engine.generate([r for j in live for r in j.reqs],
                                                   cancelled=lambda i: owner[i].cancelled)
                error = None
            except Exception as exc:  # reported to every caller of this batch
                results, error = None, exc
            finally:
                self.batch_started = None
                with self._lock:
                    self.pending -= sum(j.samples for j in jobs)
            offset = 0
            for job in live:
                job.finish(error or results[offset:offset + len(job.reqs)], error is not None)
                offset += len(job.reqs)


class ClientGone(Exception):
    pass


async def wait_for_job(job: Job, request: Optional[Request], timeout_s: Optional[float] = None):
    """The job's result; cancels it when the client disconnects (``ClientGone``) or after
    ``timeout_s`` (``asyncio.TimeoutError``), so abandoned work does not block other clients."""
    start = time.time()
    try:
        while True:
            done, _ = await asyncio.wait({job.fut}, timeout=0.1)
            if done:
                return job.fut.result()
            if request is not None and await request.is_disconnected():
                raise ClientGone()
            if timeout_s is not None and time.time() - start > timeout_s:
                raise asyncio.TimeoutError()
    except BaseException:
        job.cancelled = True
        raise


def _stand_in_rank(conn, address: str, port: int, rank: int, world: int, name: str,
                   backend: str) -> None:
    """A TP worker's part of the weight group: join, then receive every broadcast it is told
    about (and drop it: the server's rank 0 loads the weights into the one model)."""
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
            _receive(shape, dtype, group)
        conn.send("received")


class TPRankStandIn:
    """One stand-in TP rank (its own process, like an SGLang TP worker)."""

    def __init__(self, address: str, port: int, rank: int, world: int, name: str, backend: str):
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


class ServerContext:
    """What every route of the protocol server shares: the engine, its batcher, the limits,
    the weight-update groups, and the helpers that turn bodies and errors into HTTP."""

    def __init__(self, engine: HFEngine, tokenizer_path: Optional[str], batch_window_ms: float,
                 tp_size: int, limits: ServerLimits, health_timeout_s: float):
        self.engine, self.tokenizer_path, self.tp_size = engine, tokenizer_path, tp_size
        self.limits, self.health_timeout_s = limits, health_timeout_s
        self.batcher = Batcher(engine, batch_window_ms / 1000, limits.max_queued_samples)
        self.groups: Dict[str, Any] = {}  # weight-update group name → (group, stand-in ranks)
        self.tokenizer = None
        if tokenizer_path:
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)

    def decode(self, ids: List[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    @staticmethod
    def error(status: int, message: str, fields: Optional[List[str]] = None, **headers):
        body: Dict[str, Any] = {"error": {"message": message, "code": status}}
        if fields:
            body["error"]["fields"] = fields
        return JSONResponse(body, status_code=status, headers=headers or None)

    async def body_of(self, request: Request, model: type):
        """The body parsed and validated: 415 / 413 / 400 / 422 naming the problem."""
        ctype = request.headers.get("content-type", "")
        if "application/json" not in ctype:
            raise BadRequest("Content-Type must be application/json", 415)
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > self.limits.max_body_bytes:
            raise BadRequest(f"request body of {size} bytes exceeds the server's limit of "
                             f"{self.limits.max_body_bytes} (--max-body-mb)", 413)
        raw = parse_json(await request.body(), self.limits)
        return raw, validate(model, raw, self.limits)

    async def run(self, reqs: List[RolloutRequest], request: Request):
        """The requests' samples, or the JSON error response (queue full, client gone, a
        request the engine refuses)."""
        try:
            job = self.batcher.submit(reqs)
        except QueueFull as exc:
            return self.error(503, str(exc), **{"Retry-After": "1"})
        try:
            return await wait_for_job(job, request)
        except ClientGone:
            return self.error(499, "client closed the request")
        except RolloutError as exc:
            return self.error(400, str(exc))


def build_app(engine: HFEngine, tokenizer_path: Optional[str] = None, batch_window_ms: float = 5,
              tp_size: int = 1, limits: Optional[ServerLimits] = None,
              health_timeout_s: float = 5.0):
    """``tp_size`` > 1: the server reports that TP size and joins weight-update groups with
    that many ranks (stand-in processes for ranks 1.., see :class:`TPRankStandIn`).
    ``limits``: what one request may ask (n, max_new_tokens, queued samples, body size);
    A larger max_new_tokens than the context leaves is clamped to it, as the engine does."""
    ctx = ServerContext(engine, tokenizer_path, batch_window_ms, tp_size,
                        limits or ServerLimits(), health_timeout_s)
    app = FastAPI(title="megatron_trapo protocol server")

    @app.exception_handler(BadRequest)
    async def bad_request(_request: Request, exc: BadRequest):
        return ctx.error(exc.status, str(exc), exc.fields)

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception):  # a bug here, still answered in JSON
        logger.exception("internal error")
        return ctx.error(500, f"internal server error: {type(exc).__name__}: {exc}")

    _sglang_routes(app, ctx)
    _weight_routes(app, ctx)
    _vllm_routes(app, ctx)
    return app


def _sglang_routes(app: FastAPI, ctx: ServerContext) -> None:
    """SGLang's generation, health and info endpoints."""
    engine, batcher, limits, tp_size = ctx.engine, ctx.batcher, ctx.limits, ctx.tp_size
    error, body_of, run, decode = ctx.error, ctx.body_of, ctx.run, ctx.decode
    tokenizer_path, health_timeout_s = ctx.tokenizer_path, ctx.health_timeout_s

    @app.post("/generate")
    async def generate(request: Request):
        raw, body = await body_of(request, GenerateBody)
        reqs = protocol.requests_from_parsed(body)
        results = await run(reqs, request)
        if isinstance(results, JSONResponse):
            return results
        rid = body.rid if isinstance(body.rid, str) else uuid.uuid4().hex
        items = [protocol.sglang_item(s, f"{rid}-{i}-{j}", len(r.prompt_ids), decode(s.token_ids))
                 for i, (r, samples) in enumerate(zip(reqs, results))
                 for j, s in enumerate(samples)]
        single = not isinstance(raw["input_ids"][0], list) and reqs[0].sampling.n == 1
        return items[0] if single else items

    @app.get("/health")
    async def health():  # liveness: the process answers (the router and failover ask this)
        return {"status": "ok"}

    @app.get("/health_generate")
    async def health_generate():
        """Readiness: one greedy token is generated within ``health_timeout_s`` — 503 when the
        engine is busy with a backlog, stuck, or the queue is full."""
        probe = [RolloutRequest([0], SamplingParams(temperature=0, max_new_tokens=1))]
        job = batcher.submit(probe, bypass_limit=True)
        try:
            await wait_for_job(job, None, health_timeout_s)
        except asyncio.TimeoutError:
            running = batcher.batch_started
            return JSONResponse(
                {"status": "busy", "queued_samples": batcher.pending,
                 "batch_running_s": round(time.time() - running, 1) if running else None,
                 "message": f"no token generated within {health_timeout_s:.0f} s"},
                status_code=503)
        except Exception as exc:
            return error(503, f"the engine failed to generate: {type(exc).__name__}: {exc}")
        return {"status": "ok", "queued_samples": batcher.pending - 1}

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
                "enable_deterministic_inference": True,  # sampling seeds are honoured
                "limits": {"max_n": limits.max_n, "max_new_tokens": limits.max_new_tokens,
                           "max_queued_samples": limits.max_queued_samples},
                "queued_samples": batcher.pending}

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


def _weight_routes(app: FastAPI, ctx: ServerContext) -> None:
    """SGLang's weight endpoints: from disk, and by broadcast over a weight-update group."""
    engine, body_of, tp_size, groups = ctx.engine, ctx.body_of, ctx.tp_size, ctx.groups

    @app.post("/update_weight_version")
    async def update_version(request: Request):
        _, body = await body_of(request, WeightVersionBody)
        engine.set_weight_version(str(body.new_version))
        return {"success": True}

    @app.post("/update_weights_from_disk")
    async def update_from_disk(request: Request):
        _, body = await body_of(request, DiskUpdateBody)
        version = str(body.weight_version or engine.weight_version)
        try:
            await asyncio.to_thread(engine.update_weights_from_disk, body.model_path, version)
        except Exception as exc:  # a bad path or mismatched tensors: reported, server keeps serving
            return {"success": False, "message": str(exc), "num_paused_requests": 0}
        return {"success": True, "message": "ok", "num_paused_requests": 0}

    @app.post("/init_weights_update_group")
    async def init_group(request: Request):
        _, b = await body_of(request, InitGroupBody)
        try:
            # TP ranks 1.. are stand-in processes (as SGLang's TP workers are processes)
            members = [TPRankStandIn(b.master_address, b.master_port, b.rank_offset + r,
                                     b.world_size, b.group_name, b.backend)
                       for r in range(1, tp_size)]
            group = await asyncio.to_thread(init_weight_update_group, b.master_address,
                                            b.master_port, b.rank_offset, b.world_size,
                                            b.group_name, b.backend)
            for m in members:
                m.joined()
        except Exception as exc:  # reported like SGLang does: success false, message
            return {"success": False, "message": f"{type(exc).__name__}: {exc}"}
        groups[b.group_name] = (group, members)
        return {"success": True, "message": "ok"}

    @app.post("/update_weights_from_distributed")
    async def update_distributed(request: Request):
        _, body = await body_of(request, DistributedUpdateBody)
        entry = groups.get(body.group_name)
        if entry is None:
            return {"success": False, "message": "no weight update group; call "
                                                 "/init_weights_update_group first"}
        group, members = entry
        specs = list(zip(body.names, body.dtypes, body.shapes))

        def receive():
            for m in members:
                m.send(("receive", specs))
            tensors = {}
            for name, dtype, shape in specs:
                tensors[name] = _receive(shape, dtype, group)
            for m in members:
                m.done()
            engine.update_weights_from_tensors(
                tensors, str(body.weight_version or engine.weight_version))

        try:
            await asyncio.to_thread(receive)
        except Exception as exc:
            return {"success": False, "message": str(exc)}
        return {"success": True, "message": "ok"}

    @app.post("/destroy_weights_update_group")
    async def destroy_group(request: Request):
        _, body = await body_of(request, GroupNameBody)
        entry = groups.pop(body.group_name, None)
        if entry is None:
            return {"success": False, "message": "The group to be destroyed does not exist."}
        group, members = entry
        for m in members:
            m.close()
        destroy_weight_update_group(group)
        return {"success": True, "message": "ok"}


def _vllm_routes(app: FastAPI, ctx: ServerContext) -> None:
    """vLLM's completions and dev/RL weight endpoints."""
    engine, batcher, tp_size = ctx.engine, ctx.batcher, ctx.tp_size
    error, body_of, run, decode = ctx.error, ctx.body_of, ctx.run, ctx.decode

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
            return error(400, f"mode must be abort, wait or keep, got {mode!r}", ["mode"])
        batcher.resume.clear()  # queued and new requests wait; the running batch finishes
        return {"status": "paused"}

    @app.post("/resume")
    async def vllm_resume():
        batcher.resume.set()
        return {"status": "resumed"}

    @app.post("/collective_rpc")
    async def collective_rpc(request: Request):
        _, body = await body_of(request, CollectiveRpcBody)
        try:
            await asyncio.to_thread(engine.update_weights_from_disk, body.kwargs["weights_path"],
                                    engine.weight_version)
        except Exception as exc:  # vLLM answers a failed RPC with HTTP 500
            return error(500, f"{type(exc).__name__}: {exc}")
        return {"results": [None] * tp_size}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        return {"success": True}  # no prefix cache here

    @app.post("/v1/completions")
    async def completions(request: Request):
        _, body = await body_of(request, CompletionsBody)
        n = body.n
        sp = SamplingParams(n=n, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                            max_new_tokens=body.max_tokens,
                            stop_token_ids=list(body.stop_token_ids or []), seed=body.seed)
        results = await run([RolloutRequest(list(p), sp) for p in body.prompt], request)
        if isinstance(results, JSONResponse):
            return results
        choices = []
        for p, samples in enumerate(results):
            for j, s in enumerate(samples):
                choices.append({"index": p * n + j, "text": decode(s.token_ids),
                                "token_ids": s.token_ids, "prompt_token_ids": body.prompt[p],
                                "logprobs": {"token_logprobs": s.logprobs,
                                             "tokens": [f"token_id:{t}" for t in s.token_ids]},
                                "finish_reason": s.finish_reason})
        return {"id": uuid.uuid4().hex, "object": "text_completion", "model": body.model,
                "choices": choices}


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="SGLang-protocol server over the HF engine")
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--tokenizer-path", default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--batch-window-ms", type=float, default=5.0)
    ap.add_argument("--weight-version", default="0")
    ap.add_argument("--max-n", type=int, default=ServerLimits.max_n,
                    help="most samples per prompt one request may ask for")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="most new tokens one request may ask for (default: no limit beyond "
                         "the model's context, which bounds every generation anyway)")
    ap.add_argument("--max-queued-samples", type=int, default=ServerLimits.max_queued_samples,
                    help="samples (prompts x n) queued or running; more are refused with 503")
    ap.add_argument("--max-body-mb", type=float, default=ServerLimits.max_body_bytes / 2**20)
    ap.add_argument("--health-timeout-s", type=float, default=5.0,
                    help="/health_generate answers 503 when no token comes within this time")
    ap.add_argument("--tp-size", type=int, default=1,
                    help="ranks this server takes in weight-update groups, as an SGLang server "
                         "of that TP size does (the extra ranks receive and check the tensors)")
    args = ap.parse_args(argv)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    engine = HFEngine(args.model_path, device=args.device, dtype=args.dtype,
                      max_batch_size=args.max_batch_size, tokenizer_path=args.tokenizer_path,
                      weight_version=args.weight_version)
    limits = ServerLimits(max_n=args.max_n,
                          max_new_tokens=args.max_new_tokens or ServerLimits.max_new_tokens,
                          max_queued_samples=args.max_queued_samples,
                          max_body_bytes=int(args.max_body_mb * 2**20))
    app = build_app(engine, args.tokenizer_path, args.batch_window_ms, args.tp_size, limits,
                    args.health_timeout_s)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
