"""Launching and supervising inference servers and the sglang-router, as subprocesses.

A server is either real SGLang (``python -m sglang.launch_server``, GPU clusters) or our
protocol server over the HF engine (``python -m megatron_trapo.rollout.serve``, any
machine). Readiness is ``GET /health_generate`` answering 200; a server that exits or never
gets there fails with its last log lines, not a hang.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import httpx

from megatron_trapo.platform.distributed import free_port  # noqa: F401 (re-exported)
from megatron_trapo.rollout.types import RolloutError


@dataclass
class ManagedProcess:
    name: str
    proc: subprocess.Popen
    log_path: Path
    url: str

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def server_command(impl: str, model_path: str, port: int, host: str = "127.0.0.1",
                   tokenizer_path: Optional[str] = None, extra: Optional[List[str]] = None
                   ) -> List[str]:
    if impl == "hf":
        cmd = [sys.executable, "-m", "megatron_trapo.rollout.serve", "--model-path", model_path,
               "--host", host, "--port", str(port)]
        if tokenizer_path:
            cmd += ["--tokenizer-path", tokenizer_path]
    elif impl == "sglang":
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path,
               "--host", host, "--port", str(port), "--skip-server-warmup"]
        if tokenizer_path:
            cmd += ["--tokenizer-path", tokenizer_path]
    else:
        raise RolloutError(f"server_impl must be 'hf' or 'sglang', got {impl!r}")
    return cmd + list(extra or [])


def launch(name: str, cmd: List[str], url: str, log_dir: Path,
           env: Optional[Dict[str, str]] = None) -> ManagedProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log = open(log_path, "w")
    # raw logprobs (before temperature) from SGLang: see rollout/types.py
    full_env = dict(os.environ, SGLANG_RETURN_ORIGINAL_LOGPROB="1", **(env or {}))
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                            start_new_session=True)
    return ManagedProcess(name, proc, log_path, url)


def wait_healthy(url: str, timeout_s: float, process: Optional[ManagedProcess] = None,
                 path: str = "/health_generate") -> None:
    deadline = time.time() + timeout_s
    last = "no answer"
    while time.time() < deadline:
        if process is not None and not process.alive():
            raise RolloutError(f"server {url} exited with code {process.proc.returncode} before "
                               f"becoming healthy; last log lines:\n{process.tail()}")
        try:
            r = httpx.get(url + path, timeout=10)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.5)
    tail = f"; last log lines:\n{process.tail()}" if process is not None else ""
    raise RolloutError(f"server {url} did not become healthy within {timeout_s:.0f} s "
                       f"(last: {last}){tail}")


def launch_router(worker_urls: List[str], port: int, log_dir: Path,
                  policy: str = "round_robin") -> ManagedProcess:
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
           "--port", str(port), "--policy", policy, "--worker-urls", *worker_urls,
           "--log-level", "warn", "--health-check-interval-secs", "1",
           "--health-failure-threshold", "1",
           # its metrics exporter binds a fixed port by default: two routers would collide
           "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
    return launch("router", cmd, f"http://127.0.0.1:{port}", log_dir)


@dataclass
class ServerPool:
    """N servers (launched or attached) and, optionally, a router in front of them."""

    urls: List[str]
    processes: List[ManagedProcess] = field(default_factory=list)
    router: Optional[ManagedProcess] = None
    dead: List[str] = field(default_factory=list)

    @classmethod
    def launch(cls, impl: str, model_path: str, num_servers: int, use_router: bool = True,
               tokenizer_path: Optional[str] = None, startup_timeout_s: float = 600,
               log_dir: Optional[str] = None, extra_args: Optional[List[str]] = None) -> "ServerPool":
        logs = Path(log_dir or tempfile.mkdtemp(prefix="trapo_servers_"))
        procs = []
        try:
            for i in range(num_servers):
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                procs.append(launch(f"server{i}", server_command(impl, model_path, port,
                                                                 tokenizer_path=tokenizer_path,
                                                                 extra=extra_args), url, logs))
            for p in procs:
                wait_healthy(p.url, startup_timeout_s, p)
            pool = cls([p.url for p in procs], procs)
            if use_router:
                pool.start_router(logs)
            return pool
        except BaseException:
            for p in procs:
                p.kill()
            raise

    @classmethod
    def attach(cls, urls: List[str], use_router: bool = True, startup_timeout_s: float = 60,
               log_dir: Optional[str] = None) -> "ServerPool":
        for url in urls:
            wait_healthy(url, startup_timeout_s)
        pool = cls(list(urls))
        if use_router:
            pool.start_router(Path(log_dir or tempfile.mkdtemp(prefix="trapo_router_")))
        return pool

    def start_router(self, log_dir: Path) -> None:
        port = free_port()
        self.router = launch_router(self.urls, port, log_dir)
        wait_healthy(self.router.url, 60, self.router, path="/health")
        deadline = time.time() + 60
        while time.time() < deadline:  # workers are added asynchronously
            try:
                if len(self.router_workers()) >= len(self.urls):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RolloutError(f"router did not register the workers {self.urls}; last log "
                           f"lines:\n{self.router.tail()}")

    def router_workers(self) -> List[dict]:
        r = httpx.get(self.router.url + "/workers", timeout=10)
        r.raise_for_status()
        data = r.json()
        return data.get("workers", data) if isinstance(data, dict) else data

    def check(self) -> List[str]:
        """Health-check every live server; drop (and return) the ones that stopped answering."""
        newly_dead = []
        for url in list(self.urls):
            try:
                ok = httpx.get(url + "/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                ok = False
            if not ok:
                newly_dead.append(url)
                self.urls.remove(url)
                self.dead.append(url)
                self._remove_from_router(url)
        return newly_dead

    def _remove_from_router(self, url: str) -> None:
        if self.router is None:
            return
        try:
            for worker in self.router_workers():
                if worker.get("url") == url and worker.get("id"):
                    httpx.delete(f"{self.router.url}/workers/{worker['id']}", timeout=10)
        except httpx.HTTPError:
            pass  # the router's own health checks will drop it too

    @property
    def generate_url(self) -> str:
        return self.router.url if self.router is not None else self.urls[0]

    def close(self) -> None:
        if self.router is not None:
            self.router.kill()
        for p in self.processes:
            p.kill()
