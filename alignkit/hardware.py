"""Where and in what precision a loop computes: device choice, mixed precision, activation checkpointing,
``torch.compile`` of the decoder layers, moving batches, and the speed / memory numbers of a step.

Loops call these in one visible place after loading the model (``loops.common.load_policy``); the library's
functions follow their inputs' device. Precision (``precision=``):

* ``fp32``: fp32 weights, optimizer state and math.
* ``bf16-mixed``: fp32 master weights and optimizer state; the backbone runs under ``torch.autocast(bf16)``; the
  LM-head log-prob kernel and every loss stay fp32 (docs/LOSSES.md: log-prob and loss math in fp32).
* ``bf16``: bf16 weights; the optimizer keeps fp32 master copies and moments (:class:`MasterWeights`), so small
  updates are not lost to bf16 rounding; log-prob and loss math stay fp32.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = [
    "PRECISIONS",
    "resolve_device",
    "to_device",
    "autocast",
    "apply_activation_checkpointing",
    "compile_layers",
    "MasterWeights",
    "StepTimer",
    "peak_flops",
    "flops_per_token",
]

PRECISIONS = ("fp32", "bf16-mixed", "bf16")


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto``: this process's GPU (``cuda:$LOCAL_RANK``) when CUDA is available, else the CPU; ``cpu`` and
    ``cuda:N`` as given; ``cuda`` is ``cuda:$LOCAL_RANK`` under torchrun (a CUDA device without CUDA is an error
    naming the key)."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # under torchrun: this rank's GPU
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={spec!r}, but CUDA is not available on this machine (use device=cpu or auto)")
    return device


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of a collated batch on ``device`` (pinned and copied without blocking to a GPU); other values as
    they are (a nested dict, e.g. a vision-language batch's ``vision_inputs``, moved likewise). Ids and labels
    stay integer tensors."""
    out: dict[str, Any] = {}
    gpu = device.type == "cuda"
    for k, v in batch.items():
        if isinstance(v, Mapping):
            v = to_device(v, device)
        elif isinstance(v, torch.Tensor) and v.device != device:
            v = v.pin_memory().to(device, non_blocking=True) if gpu and v.device.type == "cpu" else v.to(device)
        out[k] = v
    return out


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward context of ``precision``: bf16 autocast for ``bf16-mixed``, nothing otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; expected one of {list(PRECISIONS)}")
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (Hugging Face models; non-reentrant)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(inner, "gradient_checkpointing_enable"):
        raise ValueError(f"{type(inner).__name__} does not support gradient checkpointing")
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(inner, "enable_input_require_grads"):  # LoRA: frozen embeddings must still pass gradients on
        inner.enable_input_require_grads()


def compile_layers(model: torch.nn.Module) -> int:
    """``torch.compile`` each decoder layer in place (the layers repeat, so one graph serves them all); returns
    how many were compiled."""
    from alignkit.models import decoder_layers

    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)


class MasterWeights:
    """fp32 master copies of a low-precision model's trainable parameters, for the optimizer.

    ``params`` are the fp32 tensors the optimizer steps; before a step :meth:`grads_to_master` copies the model's
    gradients onto them in fp32, after it :meth:`master_to_model` writes the updated values back (rounded to the
    model's dtype). Optimizer moments are then fp32 too, since they follow the master parameters' dtype.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.pairs = [
            (p, p.detach().float().clone().requires_grad_(True)) for p in model.parameters() if p.requires_grad
        ]
        self.params = [m for _, m in self.pairs]
        self.by_model = {id(p): m for p, m in self.pairs}

    def grads_to_master(self) -> None:
        for p, m in self.pairs:
            m.grad = None if p.grad is None else p.grad.float()

    @torch.no_grad()
    def master_to_model(self) -> None:
        for p, m in self.pairs:
            p.copy_(m)
            p.grad = None

    def state_dict(self) -> dict[str, Any]:
        return {"master": [m.detach().clone() for m in self.params]}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for m, saved in zip(self.params, state["master"]):
            m.copy_(saved)


# ---------------------------------------------------------------------------------------------------------------
# speed and memory
# ---------------------------------------------------------------------------------------------------------------

# dense bf16 peak TFLOP/s of common accelerators (tensor cores, no sparsity), for the MFU estimate
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak FLOP/s when known (``ALIGNKIT_PEAK_TFLOPS`` overrides), else None."""
    if os.environ.get("ALIGNKIT_PEAK_TFLOPS"):
        return float(os.environ["ALIGNKIT_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in _PEAK_TFLOPS.items() if key in name), None)


def flops_per_token(model: torch.nn.Module, seq_len: int = 0) -> float:
    """Training FLOPs per token: ``6·N`` for the ``N`` non-embedding parameters (forward + backward), plus the
    attention scores ``12·layers·hidden·seq_len`` (PaLM's appendix B estimate)."""
    n = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name)
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    layers, hidden = getattr(text, "num_hidden_layers", 0), getattr(text, "hidden_size", 0)
    return 6.0 * n + 12.0 * layers * hidden * seq_len


class StepTimer:
    """Speed and memory of one optimizer step: tokens/s, an MFU estimate, and (CUDA) peak allocated / reserved
    memory since the step began. :meth:`start` before the step, :meth:`stats` after it."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device
        self.peak = peak_flops(device)
        self.t0 = time.perf_counter()

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t0 = time.perf_counter()

    def stats(self, tokens: int, seq_len: int = 0, devices: int = 1) -> dict[str, float]:
        """``tokens_per_s`` of the step (``tokens``: all ranks'), ``mfu`` per device (``devices`` of this
        device's peak), peak CUDA memory of this device."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # once per step: the time must include the queued kernels
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = {"tokens_per_s": tokens / dt}
        if self.peak:
            out["mfu"] = tokens * flops_per_token(self.model, seq_len) / dt / (self.peak * devices)
        if self.device.type == "cuda":
            out["mem_peak_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            out["mem_peak_reserved_gb"] = torch.cuda.max_memory_reserved(self.device) / 2**30
        return out


@contextlib.contextmanager
def no_autocast(device_type: str) -> Iterator[None]:
    """Turn autocast off for a block (the fp32 log-prob kernel inside a bf16-mixed forward)."""
    with torch.autocast(device_type=device_type, enabled=False):
        yield
