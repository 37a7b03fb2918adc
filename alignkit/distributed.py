"""Several processes: torchrun's environment, data-parallel wrapping (DDP or FSDP2), the step's shard and the
global reductions every loop needs. The engine is ``torch.distributed``; nothing here manages processes.

A loop under ``torchrun --nproc_per_node N -m alignkit <loop> ...`` (or ``alignkit <loop> nproc=N``) runs the
same code on every rank:

* :func:`init` joins the process group torchrun describes (gloo on CPU, NCCL on GPU, ``dist_timeout_s`` on
  every collective) and quiets stdout and progress bars on ranks other than 0;
* :func:`parallelize` applies ``cfg.parallel`` to the model in one visible place: ``ddp`` or ``fsdp2``
  (``fully_shard`` per decoder layer, then the root, which keeps tied embedding and head in one group);
* each rank runs :func:`shard` of the step's micro-batches inside :func:`grad_sync` (gradients reduced on the
  last one only) and back-propagates ``loss * grad_scale()``: losses are divided by the GLOBAL normaliser, so
  the ranks' gradients must be summed, while DDP and FSDP2 average them;
* :class:`alignkit.metrics.StepMetrics` all-reduces a step's sums and counts once per step.

Exactness (docs/LOSSES.md): with the normaliser counted over the whole step, N ranks give the single-process
gradients up to floating-point summation order.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import sys
import types
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from alignkit.errors import AlignkitError
from alignkit.models import decoder_layers, decoder_of

__all__ = [
    "RankLostError",
    "env_world_size",
    "init",
    "is_initialized",
    "rank",
    "world_size",
    "is_main",
    "barrier",
    "shard",
    "all_reduce_sum",
    "broadcast_object",
    "all_gather_objects",
    "mean_over_ranks",
    "parallelize",
    "parallel_kind",
    "is_fsdp",
    "backbone_route",
    "grad_sync",
    "my_micro_batches",
    "backward",
    "grad_scale",
    "data_parallel_grad_norm",
    "describe",
    "lost_ranks",
    "explain_failure",
    "shutdown",
]

T = TypeVar("T")


class RankLostError(AlignkitError):
    """Another rank of the run exited or stopped answering; raised on the survivors."""


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


# (hostname, pid) of every rank, gathered once at init: names the rank that is gone when a collective fails
_PEERS: list[tuple[str, int]] = []


def parallel_kind(cfg: Any) -> str:
    """``cfg.parallel`` resolved: ``auto`` is ``ddp`` under several processes, ``none`` in one."""
    kind = getattr(cfg, "parallel", "auto")
    if kind in ("auto", "ddp"):  # DDP over one process would only add a wrapper
        return "ddp" if env_world_size() > 1 else "none"
    return kind


def init(cfg: Any, device: torch.device) -> None:
    """Join the process group of torchrun's environment once (a no-op in one plain process, unless
    ``cfg.parallel=fsdp2``, which needs a group even of one). gloo on CPU, NCCL on CUDA; every collective
    waits at most ``cfg.dist_timeout_s`` seconds. Ranks other than 0 print nothing to stdout and show no
    progress bar (stderr stays, so their errors are seen)."""
    if is_initialized() or (env_world_size() == 1 and parallel_kind(cfg) != "fsdp2"):
        return
    if env_world_size() == 1:  # FSDP2 in one process: a group of one (torchrun is not needed)
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    # on GPUs, NCCL for CUDA tensors and gloo for the few CPU ones (counts, tables, gathered objects)
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=float(getattr(cfg, "dist_timeout_s", 600)))
    dist.init_process_group(backend, timeout=timeout)
    _PEERS[:] = all_gather_objects((socket.gethostname(), os.getpid()))
    if not is_main() and os.environ.get("ALIGNKIT_PRINT_ALL_RANKS") != "1":
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the process's lifetime)
    with contextlib.suppress(ValueError):  # only the main thread may set a handler
        signal.signal(signal.SIGTERM, _on_sigterm)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _on_sigterm(signum: int, frame: Any) -> None:  # noqa: ANN401
    # torchrun stops the other workers when one fails: say why before exiting
    lost = lost_ranks()
    why = f"{describe(lost)} exited" if lost else "torchrun stopped this worker (another rank failed)"
    print(f"[alignkit rank {rank()}] SIGTERM: {why}; exiting", file=sys.stderr, flush=True)
    raise SystemExit(143)


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def shutdown(ok: bool = True) -> None:
    """Leave the process group: after a barrier when the run ended well (no rank tears down a collective
    another is still in), at once after an error (the others are in another collective: waiting for them
    would hang until the timeout; they fail when this process is gone)."""
    if is_initialized():
        if ok:
            with contextlib.suppress(Exception):
                dist.barrier()
        dist.destroy_process_group()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: every ``world_size()``-th one from ``rank()``."""
    return list(items[rank() :: world_size()])


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (``t`` itself in one process); ``t`` is not modified."""
    if not is_initialized() or world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj: T) -> list[T]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not is_initialized() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(metrics: dict[str, Any]) -> dict[str, Any]:
    """Each numeric value of ``metrics`` over ranks: ``*_max`` / ``*_min`` their max / min, others averaged
    (per-rank means over shares of equal size; a std becomes the mean of the ranks' stds); non-numbers:
    rank 0's."""
    if world_size() == 1:
        return metrics
    every = all_gather_objects(metrics)
    out = dict(every[0])
    for k, v in out.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            vals = [m.get(k) for m in every]
            if all(isinstance(x, (int, float)) for x in vals):
                pick = max if k.endswith("_max") else min if k.endswith("_min") else None
                out[k] = pick(vals) if pick else sum(vals) / len(vals)
    return out


# ---------------------------------------------------------------------------------------------------------------
# data-parallel wrapping
# ---------------------------------------------------------------------------------------------------------------


class _BackboneForward(torch.nn.Module):
    """The decoder stack of ``lm`` as a module's forward, so DDP sees the forward our scoring runs (the LM head
    is applied by the chunked log-prob kernel after it; its gradient is reduced like any other)."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, **kwargs: Any) -> Any:  # noqa: ANN401
        return _decoder_forward(self.lm, **kwargs)


def is_fsdp(model: torch.nn.Module) -> bool:
    if not dist.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def parallelize(model: torch.nn.Module, cfg: Any) -> torch.nn.Module:
    """Apply ``cfg.parallel`` to ``model`` in place and return it (the same object: checkpoints, references and
    generation keep using it). A frozen model (an explicit reference) is sharded under FSDP2 and left alone
    under DDP.

    * ``ddp``: a ``DistributedDataParallel`` over the model's decoder forward (:func:`backbone_route` routes
      scoring through it); buffers are not broadcast (a decoder's are constants).
    * ``fsdp2``: ``fully_shard`` on each decoder layer, then on the root, whose group holds the embeddings, the
      final norm and the head (tied or not). ``precision=bf16-mixed`` becomes FSDP2's mixed precision (bf16
      parameters in compute, fp32 gradient reduction) in place of autocast. The decoder forward is registered as
      an FSDP forward method, so scoring gathers the root's parameters like the model's own forward would.
    """
    kind = parallel_kind(cfg)
    if kind == "none" or (kind == "ddp" and not any(p.requires_grad for p in model.parameters())):
        return model  # a frozen model (a reference) needs no gradient reduction: each rank keeps its copy
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        wrapper = _BackboneForward(model)
        import inspect

        # a decoder's buffers (rotary tables) are constants: no broadcast before every forward
        sync = (
            "forward_sync_buffers"
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers"
        )
        ddp = DistributedDataParallel(wrapper, device_ids=[device] if device.type == "cuda" else None, **{sync: False})
        object.__setattr__(model, "_alignkit_ddp", ddp)  # not a submodule: state_dict / parameters unchanged
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy()
    if cfg.precision == "bf16-mixed":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    _same_weights_everywhere(model)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    object.__setattr__(model, "alignkit_decoder_forward", types.MethodType(_decoder_forward, model))
    register_fsdp_forward_method(model, "alignkit_decoder_forward")
    return model


def _decoder_forward(self: torch.nn.Module, **kwargs: Any) -> Any:  # noqa: ANN401
    return decoder_of(self)(**kwargs)


@torch.no_grad()
def _same_weights_everywhere(model: torch.nn.Module) -> None:
    # FSDP2 shards each rank's own copy: they must be equal (DDP broadcasts rank 0's itself)
    if world_size() > 1:
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)


def backbone_route(model: torch.nn.Module) -> Any:  # noqa: ANN401
    """The callable scoring runs the decoder through on a parallelized model (DDP's or FSDP2's forward), else
    None (call the decoder module itself)."""
    ddp = model.__dict__.get("_alignkit_ddp")
    if ddp is not None:
        return ddp
    return model.__dict__.get("alignkit_decoder_forward")


@contextlib.contextmanager
def grad_sync(model: torch.nn.Module, last: bool) -> Iterator[None]:
    """Around a micro-batch's forward AND backward: gradients are reduced across ranks only when ``last``
    (DDP ``no_sync`` otherwise; FSDP2 ``set_requires_gradient_sync``). A no-op in one plain process."""
    ddp = model.__dict__.get("_alignkit_ddp")
    if ddp is not None and not last:
        with ddp.no_sync():
            yield
        return
    if is_fsdp(model):
        model.set_requires_gradient_sync(last)
    yield


def my_micro_batches(model: torch.nn.Module, micro: Sequence[T]) -> Iterator[tuple[T, Any]]:
    """This rank's share of a step's micro-batches (:func:`shard`), each with the :func:`grad_sync` context its
    forward and backward run in (gradients reduced on the last one)."""
    mine = shard(micro)
    for i, mb in enumerate(mine):
        yield mb, grad_sync(model, last=i == len(mine) - 1)


def backward(loss: torch.Tensor) -> None:
    """``(loss * grad_scale()).backward()``: a micro-batch loss divided by the step's GLOBAL normaliser."""
    (loss * grad_scale()).backward() if world_size() > 1 else loss.backward()


def grad_scale() -> float:
    """The factor a micro-batch loss is multiplied by before ``backward``: DDP and FSDP2 average gradients over
    ranks, while losses divided by the global normaliser need their sum."""
    return float(world_size())


def data_parallel_grad_norm(norm: torch.Tensor) -> float:
    """A gradient norm as a float (an FSDP2 norm is a DTensor over the shards: its full value)."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if callable(full) else norm)


# ---------------------------------------------------------------------------------------------------------------
# failures
# ---------------------------------------------------------------------------------------------------------------


def lost_ranks() -> list[int]:
    """Ranks on this host whose process is gone (ranks on other hosts cannot be checked from here)."""
    here = socket.gethostname()
    lost = []
    for r, (host, pid) in enumerate(_PEERS):
        if host != here or pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:  # a killed child not yet reaped is a zombie: gone too
                if f.read().split(")")[-1].split()[0] == "Z":
                    lost.append(r)
        except (ProcessLookupError, FileNotFoundError):
            lost.append(r)
        except (PermissionError, OSError, IndexError):
            pass
    return lost


def describe(ranks: Sequence[int]) -> str:
    return ", ".join(f"rank {r} (pid {_PEERS[r][1]} on {_PEERS[r][0]})" for r in ranks)


def explain_failure(error: BaseException) -> RankLostError | None:
    """A :class:`RankLostError` naming the ranks that are gone, when ``error`` came from a collective of a
    distributed run; None otherwise."""
    if not is_initialized() or world_size() == 1:
        return None
    text = f"{type(error).__name__}: {error}"
    collective = isinstance(error, dist.DistError) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "/gloo/", "NCCL error")
    )
    if not collective:
        return None
    lost = lost_ranks()
    who = f"{describe(lost)} exited" if lost else "another rank stopped answering (on another host, or hung)"
    first = text.splitlines()[0][:300]
    return RankLostError(f"rank {rank()} of {world_size()}: {who}; the collective failed with {first}")
