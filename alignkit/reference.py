"""Reference log-probs, one protocol for DPO, KTO and the RL loops, found by name in :data:`REFERENCES`:

* ``"precomputed"`` — one no-grad pass of the *initial* policy over the tokenized data before training; the
  values are cached on disk under a key hashing the model weights (streamed, tensor by tensor), the model config,
  the tokenized data and every setting that changes log-probs. A later run on the same model and data loads the
  file and runs no reference forward at all. The policy itself does the pass, so no reference model is built.
* ``"lora"`` — the policy is a peft LoRA model; the reference is the same module with its adapter switched off
  (``with model.disable_adapter():``), so the frozen base weights serve as the reference: no second model.
* ``"model"`` — an explicit frozen reference model (a second model in memory): ``ref_model`` if given, else a
  frozen copy of the initial policy.
* ``"tr_dpo"`` — TR-DPO: such a model softly synchronised every k steps, ``ref ← α·policy + (1−α)·ref``; its
  weights travel in checkpoints for exact resume.
* ``"none"`` — reference-free losses (SimPO, CPO, ORPO).

Every reference is a :class:`Reference`: ``logps(policy, batch)`` runs its ``scorer(model, batch)`` on the right
model (DPO / KTO: :class:`alignkit.scoring.SequenceScorer` on a ``collate_*`` batch, ``[n]``; RL: completion-
aligned log-probs of ``(prompt_ids, completion_ids)``, ``[N, L]``), plus ``after_step`` / ``state_dict`` /
``load_state_dict`` hooks (no-ops unless a kind needs them). Build one with :func:`build_reference`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from alignkit import distributed
from alignkit.models import eval_mode, is_peft

__all__ = [
    "REFERENCES",
    "REFERENCE_KINDS",
    "Reference",
    "ReferenceInputs",
    "build_reference",
    "resolve_reference_kind",
    "hash_state_dict",
    "hash_sequences",
    "reference_cache_key",
    "default_cache_dir",
    "default_rl_reference_kind",
    "compute_reference_table",
    "PrecomputedReference",
    "LoraReference",
    "ModelReference",
    "SyncedReference",
    "NoReference",
    "soft_update",
]

CACHE_VERSION = "alignkit-reference-v1"

#: ``(model, batch) -> Tensor``: what a reference computes on its model (e.g. ``alignkit.scoring.SequenceScorer``).
Scorer = Callable[[torch.nn.Module, Any], Tensor]


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


def hash_sequences(sequences: Iterable[tuple[Any, ...]]) -> str:
    """Hex digest of an ordered list of (input_ids, labels) sequences; a third element (a vision-language row's
    :func:`alignkit.data.images.image_digest`) is hashed too, so other images under the same text miss the cache."""
    h = hashlib.blake2b(digest_size=20)
    for ids, labels, *images in sequences:
        a = np.asarray(ids, dtype=np.int64)
        b = np.asarray(labels, dtype=np.int64)
        h.update(np.int64(a.size).tobytes())
        h.update(a.tobytes())
        h.update(b.tobytes())
        for digest in images:
            h.update(str(digest).encode())
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


class Reference:
    """The protocol every reference follows, with no-op hooks; subclasses override what their kind needs."""

    kind = "reference"

    def __init__(self, scorer: Scorer | None = None) -> None:
        self.scorer = scorer
        self.info: dict[str, Any] = {"kind": self.kind}

    def logps(self, policy: torch.nn.Module, batch: Any) -> Tensor:
        """Reference values of ``batch`` (``policy`` is the model being trained, for kinds that need it)."""
        raise NotImplementedError

    def after_step(self, policy: torch.nn.Module, step: int) -> None:
        """Called after each optimizer step ``step`` (1-based)."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must carry to resume this reference exactly."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class NoReference(Reference):
    """Reference-free losses: asking for reference values is an error."""

    kind = "none"

    def logps(self, policy: torch.nn.Module, batch: Any) -> Tensor:
        raise RuntimeError("this loss is reference-free; no reference log-probs exist")


@torch.no_grad()
def compute_reference_table(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    n_total: int,
    scorer: Scorer,
    *,
    progress: bool = False,
    table: Tensor | None = None,
) -> tuple[Tensor, int]:
    """Run `scorer` over `batches` (each with `global_ids`), filling a `[n_total]` fp32 table (NaN = never seen).
    A batch whose ids already hold values in ``table`` (a cached table, the same on every rank) is skipped.
    Returns (table, number of forward passes of this process). The model is put in eval mode for the pass and
    restored after.

    In a distributed run (the model not yet wrapped for training) each rank scores every ``world_size``-th batch
    still to score, and the ranks' new rows are summed into one table on every rank."""
    world, rank = distributed.world_size(), distributed.rank()
    known = torch.full((n_total,), float("nan")) if table is None else table.clone()
    new = torch.full((n_total,), float("nan"))
    with eval_mode(model):
        passes = todo = 0
        it = batches
        if progress and distributed.is_main():
            from tqdm.auto import tqdm

            it = tqdm(batches, desc="reference log-probs", unit="batch")  # sized batches: a total and an ETA
        for b in it:
            if not torch.isnan(known[b["global_ids"]]).any():
                continue  # cached
            if todo % world == rank:
                new[b["global_ids"]] = scorer(model, b).float().cpu()
                passes += 1
            todo += 1
    if world > 1:  # each id was scored by exactly one rank: sum the ranks' rows, NaN kept where none did
        seen = ~torch.isnan(new)
        both = distributed.all_reduce_sum(torch.stack([torch.where(seen, new, 0.0), seen.float()]))
        new = torch.where(both[1] > 0, both[0], float("nan"))
    return torch.where(torch.isnan(new), known, new), passes


class PrecomputedReference(Reference):
    """Reference values looked up by sequence id in a table computed once (and cached on disk)."""

    kind = "precomputed"

    def __init__(self, table: Tensor, info: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.table = table
        self.info = {"kind": self.kind, **(info or {})}

    @classmethod
    def build(
        cls,
        model: torch.nn.Module,
        sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
        make_batches: Callable[[], Iterable[Mapping[str, Any]]],
        scorer: Any,
        *,
        cache_dir: str | Path | None = None,
        settings: Mapping[str, Any] | None = None,
        progress: bool = False,
    ) -> PrecomputedReference:
        """Load the table for (model, data, settings) from `cache_dir`, or compute it and save it there.

        Args:
            model: the *initial* policy (before any update, before a resume loads trained weights).
            sequences: every sequence, in table-id order (id k = `sequences[k]`); hashed for the key.
            make_batches: returns the batches of the ids the run reads (all, or those of the steps that will run);
            a batch whose ids the cached table already holds is skipped. The table file keeps every id scored
            so far (NaN: not yet), so a longer run later scores only what it adds.
            scorer: a :class:`alignkit.scoring.SequenceScorer` (temperature / LD-DPO settings, in the key).
            cache_dir: None = `default_cache_dir()`.
            settings: any further settings that shape the data or log-probs (chat format, max_length, ...).
        """
        cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        key = reference_cache_key(model, hash_sequences(sequences), {**scorer.key_settings(), **(settings or {})})
        path = cache / f"{key}.pt"
        info: dict[str, Any] = {"key": key, "path": str(path), "forward_passes": 0}
        cached = None
        if distributed.is_main() and path.is_file():
            cached = torch.load(path, map_location="cpu", weights_only=True)["logps"]
            cached = cached if cached.shape == (len(sequences),) else None
        cached = distributed.broadcast_object(cached)  # rank 0's file: every rank skips the same batches
        table, passes = compute_reference_table(
            model, make_batches(), len(sequences), scorer, progress=progress, table=cached
        )
        before = 0 if cached is None else int((~torch.isnan(cached)).sum())
        info["sequences_scored"] = int((~torch.isnan(table)).sum()) - before
        info["sequences_total"] = len(sequences)
        if info["sequences_scored"] == 0:  # every id the run reads was cached
            return cls(table, {**info, "cache_hit": True})
        if distributed.is_main():  # one cache file, written by rank 0
            cache.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            torch.save({"logps": table, "settings": {**scorer.key_settings(), **(settings or {})}}, tmp)
            os.replace(tmp, path)  # atomic: a concurrent or killed run never leaves a half-written table
        return cls(table, {**info, "cache_hit": False, "forward_passes": passes})

    def logps(self, policy: torch.nn.Module, batch: Mapping[str, Any]) -> Tensor:
        device = next(policy.parameters()).device
        return self.table[batch["global_ids"]].to(device)

    def state_dict(self) -> dict[str, Any]:
        return {"key": self.info.get("key")}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("key") not in (None, self.info.get("key")):
            raise RuntimeError(
                "the checkpoint was trained against other reference log-probs (a different initial model, data "
                f"or settings): checkpoint key {state['key']}, now {self.info.get('key')}"
            )


class LoraReference(Reference):
    """The policy with its LoRA adapter switched off: the frozen base model is the reference."""

    kind = "lora"

    def logps(self, policy: torch.nn.Module, batch: Any) -> Tensor:
        if not hasattr(policy, "disable_adapter"):
            raise ValueError("reference='lora' needs a peft model (set lora_r > 0)")
        with policy.disable_adapter():
            return self.scorer(policy, batch)


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class ModelReference(Reference):
    """An explicit frozen reference model (a second model in memory)."""

    kind = "model"

    def __init__(self, ref_model: torch.nn.Module, scorer: Scorer) -> None:
        super().__init__(scorer)
        self.model = _frozen(ref_model)

    @classmethod
    def copy_of(cls, policy: torch.nn.Module, scorer: Scorer, **kw: Any) -> ModelReference:
        return cls(copy.deepcopy(policy), scorer, **kw)

    def logps(self, policy: torch.nn.Module, batch: Any) -> Tensor:
        out = self.scorer(self.model, batch)
        if distributed.is_fsdp(self.model):  # no backward follows: free the gathered root parameters now
            self.model.reshard()
        return out


@torch.no_grad()
def soft_update(ref: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """`ref ← α·policy + (1−α)·ref`, parameter by parameter (names must match). An FSDP2 policy's shards are
    gathered first (a collective: every rank calls this at the same step), so every rank's reference is equal."""
    src = dict(policy.named_parameters())
    for name, p in ref.named_parameters():
        q = src[name].detach()
        if hasattr(p, "to_local") and hasattr(q, "to_local"):  # both sharded alike (FSDP2): shard by shard
            p, q = p.to_local(), q.to_local()
        elif hasattr(q, "full_tensor"):
            q = q.full_tensor()
        p.mul_(1.0 - alpha).add_(q.to(p.dtype), alpha=alpha)


class SyncedReference(ModelReference):
    """TR-DPO: a reference model pulled toward the policy every `sync_steps` optimizer steps."""

    kind = "tr_dpo"

    def __init__(self, ref_model: torch.nn.Module, scorer: Scorer, *, alpha: float = 0.6, sync_steps: int = 512):
        if not 0.0 < alpha <= 1.0 or sync_steps < 1:
            raise ValueError(f"TR-DPO needs 0 < alpha <= 1 and sync_steps >= 1, got {alpha}, {sync_steps}")
        super().__init__(ref_model, scorer)
        self.alpha, self.sync_steps = alpha, sync_steps
        self.info.update(alpha=alpha, sync_steps=sync_steps)

    def after_step(self, policy: torch.nn.Module, step: int) -> None:
        if step % self.sync_steps == 0:
            soft_update(self.model, policy, self.alpha)

    def state_dict(self) -> dict[str, Any]:
        if distributed.is_fsdp(self.model):  # gathered (a collective); rank 0, which writes it, gets the weights
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return {"weights": get_model_state_dict(self.model, options=full)}
        return {"weights": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "weights" not in state:
            return
        if distributed.is_fsdp(self.model):  # every rank read the full weights: each keeps its shard
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, state["weights"], options=StateDictOptions(full_state_dict=True))
        else:
            self.model.load_state_dict(state["weights"])


# ----------------------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ReferenceInputs:
    """Everything a reference kind may need; each builder reads its own fields.

    ``sequences`` / ``batches`` (precomputed): every sequence in table-id order, and a function returning the
    batches that cover them; ``ref_model``: a model object for ``model`` / ``tr_dpo`` (None: a frozen copy of
    the policy, taken when the reference is built, so build it before any update and before LoRA wraps it).
    """

    scorer: Any = None
    ref_model: torch.nn.Module | None = None
    sequences: Callable[[], Sequence[tuple[Sequence[int], Sequence[int]]]] | None = None
    batches: Callable[[], Iterable[Mapping[str, Any]]] | None = None
    cache_dir: str | None = None
    settings: Mapping[str, Any] | None = None
    progress: bool = False
    tr_dpo_alpha: float = 0.6
    tr_dpo_sync_steps: int = 512


def _precomputed(policy: torch.nn.Module, x: ReferenceInputs) -> Reference:
    if x.sequences is None or x.batches is None:
        raise ValueError("reference='precomputed' needs the sequences and batches of the data")
    return PrecomputedReference.build(
        policy, x.sequences(), x.batches, x.scorer, cache_dir=x.cache_dir, settings=x.settings, progress=x.progress
    )


def _separate_model(policy: torch.nn.Module, x: ReferenceInputs) -> torch.nn.Module:
    if x.ref_model is None:
        return copy.deepcopy(policy)
    return x.ref_model.to(next(policy.parameters()).device)


#: kind -> builder ``(policy, ReferenceInputs) -> Reference``.
REFERENCES: dict[str, Callable[[torch.nn.Module, ReferenceInputs], Reference]] = {
    "precomputed": _precomputed,
    "lora": lambda policy, x: LoraReference(x.scorer),
    "model": lambda policy, x: ModelReference(_separate_model(policy, x), x.scorer),
    "tr_dpo": lambda policy, x: SyncedReference(
        _separate_model(policy, x), x.scorer, alpha=x.tr_dpo_alpha, sync_steps=x.tr_dpo_sync_steps
    ),
    "none": lambda policy, x: NoReference(),
}
REFERENCE_KINDS = tuple(REFERENCES)


def resolve_reference_kind(kind: str, *, reference_free: bool = False, lora: bool = False) -> str:
    """The kind a run will use (``"none"`` for reference-free losses); raises on combinations that cannot work."""
    if reference_free:
        return "none"
    if kind not in REFERENCES or kind == "none":
        raise ValueError(f"reference={kind!r}; expected one of {[k for k in REFERENCES if k != 'none']}")
    if kind == "lora" and not lora:
        raise ValueError("reference='lora' switches the LoRA adapter off; it needs lora_r > 0 or a peft model")
    if kind == "tr_dpo" and lora:
        raise ValueError("reference='tr_dpo' syncs full weights; it cannot be combined with LoRA (lora_r > 0)")
    return kind


def build_reference(kind: str, policy: torch.nn.Module, inputs: ReferenceInputs) -> Reference:
    """The reference of ``kind`` (a :data:`REFERENCES` name) for ``policy``."""
    try:
        builder = REFERENCES[kind]
    except KeyError:
        raise ValueError(f"unknown reference kind {kind!r}; expected one of {list(REFERENCES)}") from None
    return builder(policy, inputs)


def default_rl_reference_kind(policy: torch.nn.Module, has_ref_model: bool) -> str:
    """The RL loops' reference: the adapter switched off for a peft policy without a named reference model, else
    a separate frozen model (``ref_model``, or a copy of the initial policy)."""
    return "lora" if is_peft(policy) and not has_ref_model else "model"
