"""Reference log-probs for DPO/KTO-style losses, four ways, chosen by the loop config `reference=`:

* ``"precomputed"`` — one no-grad pass of the *initial* policy over the tokenized data before training; the
  per-sequence values are cached on disk under a key hashing the model weights (streamed, tensor by tensor), the
  model config, the tokenized data and every setting that changes log-probs. A later run on the same model and
  data loads the file and runs no reference forward at all. The policy itself does the pass, so no reference
  model is ever built.
* ``"lora"`` — the policy is a peft LoRA model; the reference is the same module with its adapter switched off
  (``with model.disable_adapter():``), so the frozen base weights serve as the reference: no second model.
* ``"model"`` — an explicit frozen reference model (a second copy in memory).
* ``"tr_dpo"`` — TR-DPO: an explicit reference model softly synchronised every k steps,
  ``ref ← α·policy + (1−α)·ref``; its weights travel in checkpoints for exact resume.
* ``"none"`` — reference-free losses (SimPO, CPO, ORPO).

Every reference answers ``logps(model, batch) -> [n]``: the reduced completion log-prob of each sequence of a
batch from `alignkit.data.preference.collate_*` (the sum, or the LD-DPO weighted sum when ``ld_alpha`` is set).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from alignkit.logprobs import DEFAULT_TOKEN_CHUNK, model_token_logps, segment_sum

__all__ = [
    "REFERENCE_KINDS",
    "batch_sequence_logps",
    "Scorer",
    "hash_state_dict",
    "hash_sequences",
    "reference_cache_key",
    "default_cache_dir",
    "compute_reference_table",
    "PrecomputedReference",
    "LoraReference",
    "ModelReference",
    "SyncedReference",
    "NoReference",
    "soft_update",
]

REFERENCE_KINDS = ("precomputed", "lora", "model", "tr_dpo", "none")
CACHE_VERSION = "alignkit-reference-v1"


# ----------------------------------------------------------------------------------------------------------
# Per-sequence log-probs of a collated batch
# ----------------------------------------------------------------------------------------------------------


def batch_sequence_logps(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    *,
    temperature: float = 1.0,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    ld_alpha: float | None = None,
    wpo: bool = False,
) -> dict[str, Tensor]:
    """One forward over a `collate_*` batch, reduced per sequence (padded or packed alike).

    Returns `[n]` fp32 tensors (n = `batch["n_sequences"]`):
        `sum`: Σ_t m·ℓ_t over the completion; `n_tokens`: completion tokens;
        `ld_sum` (if `ld_alpha`): LD-DPO `Σ_{k_t≤ℓ_s} ℓ_t + α·Σ_{k_t>ℓ_s} ℓ_t`, ℓ_s = `batch["pair_min_lengths"]`;
        `wpo` (if `wpo`): no-grad WPO weight `exp(mean_t (ℓ_t − log Σ_v p_v²))`.
    Gradients flow through `sum` and `ld_sum` when the caller has grad enabled.
    """
    out = model_token_logps(
        model,
        batch["input_ids"],
        batch["labels"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        temperature=temperature,
        token_chunk=token_chunk,
        extras=("log_sum_sq_probs",) if wpo else (),
    )
    n = int(batch["n_sequences"])
    dev = out["logps"].device
    m = out["mask"]
    seq = torch.where(m, batch["sequence_ids"].to(dev), -1)
    res = {"sum": segment_sum(out["logps"], seq, n), "n_tokens": segment_sum(m.float(), seq, n)}
    if ld_alpha is not None:
        if not 0.0 <= ld_alpha <= 1.0:
            raise ValueError(f"ld_alpha must lie in [0, 1], got {ld_alpha}")
        shared = batch["pair_min_lengths"].to(dev)[seq.clamp_min(0)]
        w = torch.where(batch["token_rank"].to(dev) <= shared, 1.0, ld_alpha)
        res["ld_sum"] = segment_sum(out["logps"] * w, seq, n)
    if wpo:
        with torch.no_grad():
            lsq = segment_sum(out["logps"].detach() - out["log_sum_sq_probs"].detach(), seq, n)
            res["wpo"] = torch.exp(lsq / res["n_tokens"].clamp_min(1.0))
    return res


@dataclass(frozen=True)
class Scorer:
    """The settings that turn a batch into reference values; part of the cache key."""

    temperature: float = 1.0
    token_chunk: int = DEFAULT_TOKEN_CHUNK
    ld_alpha: float | None = None

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> Tensor:
        r = batch_sequence_logps(
            model, batch, temperature=self.temperature, token_chunk=self.token_chunk, ld_alpha=self.ld_alpha
        )
        return r["ld_sum"] if self.ld_alpha is not None else r["sum"]

    def key_settings(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "ld_alpha": self.ld_alpha}


# ----------------------------------------------------------------------------------------------------------
# Cache keys
# ----------------------------------------------------------------------------------------------------------


def hash_state_dict(model: torch.nn.Module) -> str:
    """Hex digest of every tensor of `model.state_dict()` (name, dtype, shape and raw bytes), streamed one tensor
    at a time so that at most one tensor is copied to host memory at once."""
    h = hashlib.blake2b(digest_size=20)
    for name, t in sorted(model.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        flat = t.reshape(-1).contiguous().cpu()
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()


# Config fields that never change log-probs; saving a model fills some of them in (e.g. `architectures`).
_CONFIG_NOISE = frozenset(
    {
        "transformers_version",
        "architectures",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "id2label",
        "label2id",
        "problem_type",
        "dtype",  # the weight hash covers dtypes
        "torch_dtype",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
    }
)


def _config_fingerprint(model: torch.nn.Module) -> str:
    """The model class and the config fields that shape the computation."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return type(model).__name__
    d = {k: v for k, v in cfg.to_dict().items() if k not in _CONFIG_NOISE and not k.startswith("_")}
    return type(model).__name__ + json.dumps(d, sort_keys=True, default=str)


def hash_sequences(sequences: Iterable[tuple[Sequence[int], Sequence[int]]]) -> str:
    """Hex digest of an ordered list of (input_ids, labels) sequences."""
    h = hashlib.blake2b(digest_size=20)
    for ids, labels in sequences:
        a = np.asarray(ids, dtype=np.int64)
        b = np.asarray(labels, dtype=np.int64)
        h.update(np.int64(a.size).tobytes())
        h.update(a.tobytes())
        h.update(b.tobytes())
    return h.hexdigest()


def reference_cache_key(model: torch.nn.Module, data_hash: str, settings: Mapping[str, Any]) -> str:
    """Key of a reference table: model weights + config, tokenized data, log-prob settings."""
    h = hashlib.blake2b(digest_size=20)
    for part in (CACHE_VERSION, hash_state_dict(model), _config_fingerprint(model), data_hash):
        h.update(part.encode() + b"\n")
    h.update(json.dumps(dict(settings), sort_keys=True, default=str).encode())
    return h.hexdigest()


def default_cache_dir() -> Path:
    """`$ALIGNKIT_CACHE/reference` if set, else `~/.cache/alignkit/reference` (independent of the run dir, so
    different runs on the same model and data share it)."""
    root = os.environ.get("ALIGNKIT_CACHE")
    return Path(root).expanduser() / "reference" if root else Path("~/.cache/alignkit/reference").expanduser()


# ----------------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------------


class NoReference:
    """Reference-free losses: asking for reference values is an error."""

    kind = "none"

    def __init__(self) -> None:
        self.info: dict[str, Any] = {"kind": "none"}

    def logps(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> Tensor:
        raise RuntimeError("this loss is reference-free; no reference log-probs exist")

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


@torch.no_grad()
def compute_reference_table(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    n_total: int,
    scorer: Scorer,
    *,
    progress: bool = False,
) -> tuple[Tensor, int]:
    """Run `scorer` over `batches` (each with `global_ids`), filling a `[n_total]` fp32 table (NaN = never seen).
    Returns (table, number of forward passes). The model is put in eval mode for the pass and restored after."""
    was_training = model.training
    model.eval()
    table = torch.full((n_total,), float("nan"))
    passes = 0
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="reference", unit="batch")
    for b in it:
        table[b["global_ids"]] = scorer(model, b).float().cpu()
        passes += 1
    model.train(was_training)
    return table, passes


@dataclass
class PrecomputedReference:
    """Reference values looked up by sequence id in a table computed once (and cached on disk)."""

    table: Tensor
    info: dict[str, Any] = field(default_factory=dict)
    kind: str = "precomputed"

    @classmethod
    def build(
        cls,
        model: torch.nn.Module,
        sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
        make_batches: Callable[[], Iterable[Mapping[str, Any]]],
        scorer: Scorer,
        *,
        cache_dir: str | Path | None = None,
        settings: Mapping[str, Any] | None = None,
        progress: bool = False,
    ) -> PrecomputedReference:
        """Load the table for (model, data, settings) from `cache_dir`, or compute it and save it there.

        Args:
            model: the *initial* policy (before any update, before a resume loads trained weights).
            sequences: every sequence, in table-id order (id k = `sequences[k]`); hashed for the key.
            make_batches: returns the batches that cover all ids (built only on a cache miss).
            scorer: temperature / LD-DPO settings (in the key).
            cache_dir: None = `default_cache_dir()`.
            settings: any further settings that shape the data or log-probs (chat format, max_length, ...).
        """
        cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        key = reference_cache_key(model, hash_sequences(sequences), {**scorer.key_settings(), **(settings or {})})
        path = cache / f"{key}.pt"
        info: dict[str, Any] = {"kind": "precomputed", "key": key, "path": str(path), "forward_passes": 0}
        if path.is_file():
            table = torch.load(path, map_location="cpu", weights_only=True)["logps"]
            if table.shape == (len(sequences),) and not torch.isnan(table).any():
                return cls(table, {**info, "cache_hit": True})
        table, passes = compute_reference_table(model, make_batches(), len(sequences), scorer, progress=progress)
        if torch.isnan(table).any():
            raise RuntimeError(f"reference pass left {int(torch.isnan(table).sum())} sequences without a value")
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"logps": table, "settings": {**scorer.key_settings(), **(settings or {})}}, tmp)
        os.replace(tmp, path)  # atomic: a concurrent or killed run never leaves a half-written table
        return cls(table, {**info, "cache_hit": False, "forward_passes": passes})

    def logps(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> Tensor:
        device = next(model.parameters()).device
        return self.table[batch["global_ids"]].to(device)

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"key": self.info.get("key")}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("key") not in (None, self.info.get("key")):
            raise RuntimeError(
                "the checkpoint was trained against other reference log-probs (a different initial model, data "
                f"or settings): checkpoint key {state['key']}, now {self.info.get('key')}"
            )


class LoraReference:
    """The policy with its LoRA adapter switched off: the frozen base model is the reference."""

    kind = "lora"

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer
        self.info: dict[str, Any] = {"kind": "lora"}

    def logps(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> Tensor:
        if not hasattr(model, "disable_adapter"):
            raise ValueError("reference='lora' needs a peft model (set lora_r > 0)")
        with model.disable_adapter():
            return self.scorer(model, batch)

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class ModelReference:
    """An explicit frozen reference model (a second model in memory)."""

    kind = "model"

    def __init__(self, ref_model: torch.nn.Module, scorer: Scorer) -> None:
        self.model = _frozen(ref_model)
        self.scorer = scorer
        self.info: dict[str, Any] = {"kind": self.kind}

    @classmethod
    def copy_of(cls, policy: torch.nn.Module, scorer: Scorer, **kw: Any) -> ModelReference:
        return cls(copy.deepcopy(policy), scorer, **kw)

    def logps(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> Tensor:
        return self.scorer(self.model, batch)

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


@torch.no_grad()
def soft_update(ref: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """`ref ← α·policy + (1−α)·ref`, parameter by parameter (names must match)."""
    src = dict(policy.named_parameters())
    for name, p in ref.named_parameters():
        p.mul_(1.0 - alpha).add_(src[name].detach().to(p.dtype), alpha=alpha)


class SyncedReference(ModelReference):
    """TR-DPO: a reference model pulled toward the policy every `sync_steps` optimizer steps."""

    kind = "tr_dpo"

    def __init__(self, ref_model: torch.nn.Module, scorer: Scorer, *, alpha: float = 0.6, sync_steps: int = 512):
        if not 0.0 < alpha <= 1.0 or sync_steps < 1:
            raise ValueError(f"TR-DPO needs 0 < alpha <= 1 and sync_steps >= 1, got {alpha}, {sync_steps}")
        super().__init__(ref_model, scorer)
        self.alpha, self.sync_steps = alpha, sync_steps
        self.info.update(alpha=alpha, sync_steps=sync_steps)

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        if step % self.sync_steps == 0:
            soft_update(self.model, model, self.alpha)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "weights" in state:
            self.model.load_state_dict(state["weights"])
