"""The generator registry: a backend name (or a dotted path to a factory) -> a ``Generator``.

A factory is called as ``factory(model, tokenizer, pad_id=..., seed=..., max_batch_size=..., model_dir=...,
**backend_kwargs)``; it may ignore what it does not need.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from alignkit import distributed
from alignkit.rollout.base import Generator
from alignkit.rollout.hf import HFGenerator

__all__ = ["GENERATOR_BACKENDS", "make_generator"]


# Every factory takes the same keywords and ignores the ones its backend has no use for.
Unused = Any


def _hf(model: torch.nn.Module, tokenizer: Any, *, pad_id: int, max_batch_size: int | None = None,
        seed: Unused = None, model_dir: Unused = None, **kw: Any) -> Generator:  # fmt: skip
    return HFGenerator(model, pad_id, max_batch_size=max_batch_size, **kw)


def _vllm_colocate(model: torch.nn.Module, tokenizer: Any, *, seed: int = 0, pad_id: Unused = None,
                   max_batch_size: Unused = None, model_dir: Unused = None, **kw: Any) -> Generator:  # fmt: skip
    from alignkit.rollout.vllm_colocate import VLLMColocateGenerator

    return VLLMColocateGenerator(model, seed=seed, **kw)


def _vllm_server(model: torch.nn.Module, tokenizer: Any, *, model_dir: str | None = None, pad_id: Unused = None,
                 max_batch_size: Unused = None, seed: Unused = None, **kw: Any) -> Generator:  # fmt: skip
    from alignkit.rollout.vllm_server import VLLMServerGenerator

    if not distributed.is_main():  # one server for all ranks: rank 0's, which alone pushes weights
        url = distributed.broadcast_object(None)
        rest = {k: v for k, v in kw.items() if k not in ("base_url", "launch", "server_args", "env")}
        return VLLMServerGenerator(base_url=url, model_dir=model_dir, pushes_weights=False, **rest)
    if "base_url" not in kw:  # no running server named: launch one on loopback serving the model's folder
        kw.setdefault("model_dir", model_dir)
        kw["launch"] = True
    gen = VLLMServerGenerator(**kw)
    if distributed.world_size() > 1:
        distributed.broadcast_object(gen.base_url)
    return gen


#: backend name -> factory ``(model, tokenizer, *, pad_id, seed, max_batch_size, model_dir, **kw) -> Generator``.
GENERATOR_BACKENDS: dict[str, Callable[..., Generator]] = {
    "hf": _hf,
    "vllm_colocate": _vllm_colocate,
    "vllm_server": _vllm_server,
}


def make_generator(
    backend: str,
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    pad_id: int,
    seed: int = 0,
    max_batch_size: int | None = None,
    model_dir: str | None = None,
    backend_kwargs: dict[str, Any] | None = None,
) -> Generator:
    """A registered backend by name, or a dotted path ``pkg.module.factory`` to a factory of the same form."""
    factory = GENERATOR_BACKENDS.get(backend)
    if factory is None:
        module, _, name = backend.rpartition(".")
        if not module:
            raise ValueError(f"unknown backend {backend!r}: use {sorted(GENERATOR_BACKENDS)} or a dotted path")
        factory = getattr(importlib.import_module(module), name)
    kw = {"pad_id": pad_id, "seed": seed, "max_batch_size": max_batch_size, "model_dir": model_dir}
    return factory(model, tokenizer, **{**kw, **(backend_kwargs or {})})  # backend_kwargs win
