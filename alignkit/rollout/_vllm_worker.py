"""vLLM worker extension: load trainer weights into the running engine, in place.

vLLM mixes this class into its worker class when the engine is built with
``worker_extension_cls="alignkit.rollout._vllm_worker.WeightSyncExtension"``; its methods are then callable on
every worker through ``LLM.collective_rpc`` (colocate) or the dev-mode ``POST /collective_rpc`` route of
``vllm serve`` (server). ``self`` is the vLLM worker (``self.model_runner``, ``self.rank``, ``self.device``).

Two ways in:

* colocate: the trainer hands ``(name, tensor)`` pairs straight to :meth:`alignkit_load_weights` (same process,
  no copy until vLLM's own loader copies into its parameters);
* server: :meth:`alignkit_init_sync` joins a two-party process group with the trainer (gloo on CPU, NCCL on
  GPU) and :meth:`alignkit_receive_weights` receives flat per-dtype buckets broadcast from the trainer.

Weights go through ``model_runner.reload_weights(..., is_checkpoint_format=True)``: vLLM's layerwise reload
takes Hugging Face names (it fuses q/k/v and gate/up itself) and re-runs each layer's post-load processing.
That matters on CPU, where linear layers keep a *pre-packed* copy of the weight for oneDNN and replace the
parameter by an empty placeholder: a bare ``model.load_weights`` fails there ("no attribute weight_loader")
and a ``param.copy_`` would change nothing the kernels read.

Only strings cross the HTTP route (vLLM's rule for ``/collective_rpc``), so server-side arguments are JSON.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import torch

# dtype names on the wire (str(torch.float32) == "torch.float32")
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64)}


# listening sockets of the stores this process serves (the store only borrows the file descriptor)
_LISTENERS: dict[int, socket.socket] = {}


def make_store(host: str, port: int, rank: int, world_size: int, timeout_s: float) -> Any:
    """The rendezvous store: rank 0 (the trainer) serves it (``port=0`` picks a free port: ``store.port``).

    The server listens on ``host`` only (loopback unless a host is configured): TCPStore's own server would
    listen on every interface, so rank 0 binds the socket itself and hands the store its file descriptor."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    if rank != 0:
        return dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout, wait_for_workers=False)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(max(world_size, 1) * 2)
    bound_port = listener.getsockname()[1]
    store = dist.TCPStore(
        host, bound_port, world_size, is_master=True, timeout=timeout, wait_for_workers=False,
        master_listen_fd=listener.fileno(),
    )  # fmt: skip
    _LISTENERS[bound_port] = listener
    return store


def make_group(backend: str, store: Any, host: str, rank: int, world_size: int, timeout_s: float) -> Any:
    """A standalone process group over ``store`` that never touches ``torch.distributed``'s default group, so
    it coexists with vLLM's own group in the worker and with the trainer's. Blocks until every rank joined."""
    import torch.distributed as dist

    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timedelta(seconds=timeout_s)
        # bind to the address we rendezvous on: the default device resolves the hostname, which may not route
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        return dist.ProcessGroupGloo(store, rank, world_size, opts)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, world_size)
    raise ValueError(f"weight-sync backend {backend!r}; expected 'gloo' or 'nccl'")


def bucket_layout(meta: list[tuple[str, str, list[int]]], bucket_bytes: int) -> list[list[int]]:
    """Split tensors (name, dtype, shape) into buckets of one dtype and at most ``bucket_bytes`` each.

    Both sides compute the layout from the same metadata, so only the metadata crosses HTTP. A tensor larger
    than ``bucket_bytes`` gets a bucket to itself. Returns lists of indices into ``meta``.
    """
    buckets: list[list[int]] = []
    open_by_dtype: dict[str, tuple[int, int]] = {}  # dtype -> (bucket index, bytes so far)
    for i, (_, dtype, shape) in enumerate(meta):
        nbytes = _numel(shape) * _DTYPES[dtype].itemsize
        slot = open_by_dtype.get(dtype)
        if slot is None or slot[1] + nbytes > bucket_bytes:
            buckets.append([i])
            open_by_dtype[dtype] = (len(buckets) - 1, nbytes)
        else:
            buckets[slot[0]].append(i)
            open_by_dtype[dtype] = (slot[0], slot[1] + nbytes)
    return buckets


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def reload_into(model_runner: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load checkpoint-format ``(name, tensor)`` pairs into a vLLM model runner in place."""
    if not hasattr(model_runner, "reload_weights"):
        raise RuntimeError("this vLLM has no model_runner.reload_weights (in-place layerwise reload); need >= 0.32")
    model_runner.reload_weights(weights_iterator=weights, is_checkpoint_format=True)


class WeightSyncExtension:
    """Methods added to vLLM's worker. Names carry an ``alignkit_`` prefix so they cannot clash with vLLM's."""

    # ---- colocate ------------------------------------------------------------------------------------------

    def alignkit_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        """Load ``(hf_name, tensor)`` pairs (same process: the tensors are the trainer's own, not copies)."""
        with torch.no_grad():
            reload_into(self.model_runner, weights)  # type: ignore[attr-defined]
        return len(weights)

    # ---- server --------------------------------------------------------------------------------------------

    def alignkit_init_sync(self, spec_json: str) -> int:
        """Join the trainer's weight-sync group. ``spec``: backend, host, port, world_size, timeout_s.

        This worker's rank is ``1 + self.rank`` (the trainer is rank 0). Blocks until every member joined.
        """
        spec = json.loads(spec_json)
        self.alignkit_close_sync()
        rank = 1 + int(getattr(self, "rank", 0))
        world, timeout = int(spec["world_size"]), float(spec["timeout_s"])
        store = make_store(spec["host"], int(spec["port"]), rank, world, timeout)
        group = make_group(spec["backend"], store, spec["host"], rank, world, timeout)
        self._alignkit_sync = (store, group)  # the store must outlive the group
        self._alignkit_backend = spec["backend"]
        return rank

    def alignkit_receive_weights(self, meta_json: str) -> int:
        """Receive the buckets described by ``meta`` from rank 0 and load them. Returns tensors loaded.

        ``meta``: {"tensors": [[name, dtype, shape], ...], "bucket_bytes": int}.
        """
        sync = getattr(self, "_alignkit_sync", None)
        if sync is None:
            raise RuntimeError("alignkit_receive_weights before alignkit_init_sync")
        group = sync[1]
        meta = json.loads(meta_json)
        tensors = [(str(n), str(d), [int(s) for s in shape]) for n, d, shape in meta["tensors"]]
        device = torch.device("cuda", torch.cuda.current_device()) if self._alignkit_backend == "nccl" else "cpu"
        count = [0]

        def stream():  # receive bucket k only when the loader asks for its first tensor
            for idx in bucket_layout(tensors, int(meta["bucket_bytes"])):
                dtype = _DTYPES[tensors[idx[0]][1]]
                flat = torch.empty(sum(_numel(tensors[i][2]) for i in idx), dtype=dtype, device=device)
                group.broadcast(flat, 0).wait()
                offset = 0
                for i in idx:
                    name, _, shape = tensors[i]
                    numel = _numel(shape)
                    yield name, flat[offset : offset + numel].view(shape)
                    offset += numel
                    count[0] += 1

        # One reload over the whole stream: vLLM's layerwise reload finalises at the end of the call, so a layer
        # whose parts (q/k/v, gate/up) were split over two calls would be processed half-loaded.
        received = stream()
        with torch.no_grad():
            reload_into(self.model_runner, received)  # type: ignore[attr-defined]
        for _ in received:  # a loader that stopped early must not leave the trainer blocked in a broadcast
            pass
        return count[0]

    def alignkit_close_sync(self) -> None:
        """Drop the weight-sync group (idempotent)."""
        self._alignkit_sync = None

    def alignkit_ping(self) -> int:
        """This worker's rank in the weight-sync group (1 + vLLM rank); the count of replies = worker count."""
        return 1 + int(getattr(self, "rank", 0))
