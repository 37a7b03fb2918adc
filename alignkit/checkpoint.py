"""Checkpoints that survive a crash and are checked before they are trusted.

A checkpoint folder `RUN_DIR/checkpoint-STEP/` holds the HF model (`save_pretrained`, safetensors), the
tokenizer, the training state (optimizer, scheduler, RNG states, step, anything else the loop passes) as
`trainer_state.tensors` (tensors, in safetensors format; not named `*.safetensors`, which vLLM would load as
weights) + `trainer_state.json` (everything else: no pickle, so a run folder made by someone else cannot run
code on resume), and `checksums.json` (SHA-256 of every file). It is written to a
temporary folder, fsynced, then renamed into place; `RUN_DIR/latest` names the newest complete checkpoint. A
process killed mid-save leaves only a `.tmp-*` folder, which the next save removes.

In a distributed run (a process group is up: DDP or FSDP2) the weights and optimizer are also saved sharded with
``torch.distributed.checkpoint`` into `checkpoint-STEP/dcp/` (each rank writes its shards; DCP's `.metadata` is
a pickle: resume only run folders you trust), each rank's RNG into `ranks/rank-R/`, and rank 0 writes the HF
export from the gathered full state dict, so the folder still loads in plain transformers and vLLM. A sharded
checkpoint resumes on any number of ranks (DCP reshards), one process included.

On load a checkpoint is verified (every file present with its checksum, finite weights); a corrupt `latest` is
reported by path and the newest intact earlier checkpoint is used instead (:func:`find_resumable`). Pruning
(`keep_last`) only ever deletes checkpoints of the same run (`run_id`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignkit.errors import CheckpointError, DiskFullError

# safetensors format, but not named *.safetensors: loaders that take every *.safetensors file of a folder as
# weights (vLLM) must see only the model's
STATE_TENSORS = "trainer_state.tensors"
OLD_STATE_TENSORS = "trainer_state.safetensors"  # checkpoints written before that rename
STATE_JSON = "trainer_state.json"
CHECKSUMS = "checksums.json"
STATE_FILE = STATE_JSON  # the file whose presence marks a complete checkpoint


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------------------
# pickle-free state: tensors to safetensors, the rest to JSON
# ---------------------------------------------------------------------------------------------------------------


def encode_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tuples, tensors, numpy arrays, numbers, strings) into a JSON-able
    structure with placeholders and a flat ``{key: tensor}`` dict for safetensors."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = x.detach().cpu().clone().contiguous()
            return {"__tensor__": key}
        if isinstance(x, np.ndarray):
            return {"__ndarray__": enc(torch.from_numpy(x.astype(np.int64) if x.dtype == np.uint32 else x)),
                    "dtype": str(x.dtype)}  # fmt: skip
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x):
                return {"__dict__": {k: enc(v) for k, v in x.items()}}
            return {"__items__": [[enc(k), enc(v)] for k, v in x.items()]}  # e.g. optimizer state: int keys
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if isinstance(x, float) and not math.isfinite(x):
            return {"__float__": repr(x)}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, (np.integer, np.floating, np.bool_)):
            return enc(x.item())
        raise TypeError(f"cannot store a {type(x).__name__} in a checkpoint's training state")

    return enc(obj), tensors


def decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_state`."""
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return decode_state(obj["__ndarray__"], tensors).numpy().astype(obj["dtype"])
    if "__dict__" in obj:
        return {k: decode_state(v, tensors) for k, v in obj["__dict__"].items()}
    if "__items__" in obj:
        return {decode_state(k, tensors): decode_state(v, tensors) for k, v in obj["__items__"]}
    if "__tuple__" in obj:
        return tuple(decode_state(v, tensors) for v in obj["__tuple__"])
    if "__float__" in obj:
        return float(obj["__float__"])
    raise CheckpointError(f"unknown entry in a training state: {sorted(obj)}")


def write_state(folder: Path, state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    structure, tensors = encode_state(state)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / STATE_TENSORS))
    (folder / STATE_JSON).write_text(json.dumps(structure))


def read_state(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    path = next((folder / n for n in (STATE_TENSORS, OLD_STATE_TENSORS) if (folder / n).is_file()), None)
    tensors = load_file(str(path)) if path is not None else {}
    return decode_state(json.loads((folder / STATE_JSON).read_text()), tensors)


# ---------------------------------------------------------------------------------------------------------------
# integrity
# ---------------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> Iterator[Path]:
    return (p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != CHECKSUMS)


def write_checksums(folder: Path) -> None:
    sums = {str(p.relative_to(folder)): _sha256(p) for p in _files(folder)}
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=0, sort_keys=True))


def verify_checkpoint(folder: str | Path) -> None:
    """Raise :class:`CheckpointError` naming ``folder`` and the file when a file is missing or its checksum
    differs from the one written at save time (a truncated or corrupted checkpoint)."""
    folder = Path(folder)
    if not (folder / CHECKSUMS).is_file():
        raise CheckpointError(f"checkpoint {folder} is incomplete: no {CHECKSUMS}")
    try:
        sums = json.loads((folder / CHECKSUMS).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {folder}: {CHECKSUMS} is corrupt ({e})") from None
    for name, digest in sums.items():
        p = folder / name
        if not p.is_file():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {name} is missing")
        if _sha256(p) != digest:
            raise CheckpointError(f"checkpoint {folder} is corrupt: {name} does not match its checksum")


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsynced and renamed: never half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# disk space
# ---------------------------------------------------------------------------------------------------------------


def estimate_checkpoint_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes one checkpoint takes: the weights as stored plus the optimizer state (AdamW: two fp32 moments per
    trainable parameter when none exists yet)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    moments = 2 * 4 * trainable
    if optimizer is not None and optimizer.state:
        moments = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                      if isinstance(t, torch.Tensor))  # fmt: skip
    return weights + moments


def check_free_space(path: str | Path, needed: int, what: str = "a checkpoint") -> None:
    """Raise :class:`DiskFullError` when the file system of ``path`` has less than ``needed`` bytes free."""
    path = Path(path)
    probe = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise DiskFullError(
            f"not enough disk space at {path} for {what}: needs {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB free"
        )


# ---------------------------------------------------------------------------------------------------------------
# save, find, load
# ---------------------------------------------------------------------------------------------------------------


def _step_of(p: Path) -> int:
    return int(p.name.split("-")[-1])


def _run_id_of(ckpt: Path) -> str | None:
    try:
        return json.loads((ckpt / STATE_JSON).read_text())["__dict__"].get("run_id")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    tokenizer: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    state: dict[str, Any] | None = None,
    keep_last: int | None = 2,
    run_id: str | None = None,
) -> Path:
    """Write `checkpoint-STEP` atomically and point `latest` at it; keep the newest `keep_last` checkpoints of
    run ``run_id`` (others in the folder are never touched). A save that fails for lack of space removes its
    partial folder and raises :class:`DiskFullError`; the previous checkpoint stays intact."""
    from alignkit import distributed

    run_dir = Path(run_dir)
    if distributed.is_initialized():
        return _save_sharded(run_dir, step, model, tokenizer, optimizer, scheduler, state, keep_last, run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(".tmp-checkpoint-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".tmp-checkpoint-{step}-{os.getpid()}"
    needed = estimate_checkpoint_bytes(model, optimizer)
    check_free_space(run_dir, needed, f"checkpoint-{step}")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        full = {
            "step": step,
            "run_id": run_id,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
            **(state or {}),
        }
        write_state(tmp, full)
        write_checksums(tmp)
        _fsync_tree(tmp)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno != errno.ENOSPC and "enforce fail" not in str(e):
            raise
        if not isinstance(e, OSError) and "enforce fail" not in str(e) and "No space" not in str(e):
            raise
        previous = latest_checkpoint(run_dir)
        kept = f"; the previous checkpoint {previous} is intact" if previous else ""
        raise DiskFullError(f"disk full at {run_dir}: checkpoint-{step} needed ~{needed / 1e9:.2f} GB{kept}") from e
    _publish(run_dir, tmp, final, keep_last, run_id)
    return final


def _publish(run_dir: Path, tmp: Path, final: Path, keep_last: int | None, run_id: str | None) -> None:
    # the complete folder replaces any older one of that step, `latest` names it, older ones of this run go
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_atomic(run_dir / "latest", final.name)
    if keep_last:
        mine = [p for p in run_dir.glob("checkpoint-*") if _run_id_of(p) == run_id]
        for old in sorted(mine, key=_step_of)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def _save_sharded(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    state: dict[str, Any] | None,
    keep_last: int | None,
    run_id: str | None,
) -> Path:
    """:func:`save_checkpoint` in a distributed run: every rank takes part (DCP and the full-state gather are
    collectives); rank 0 writes the HF export, the shared state and the checksums, then publishes the folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    from alignkit import distributed

    main = distributed.is_main()
    final, tmp = run_dir / f"checkpoint-{step}", run_dir / f".tmp-checkpoint-{step}"
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob(".tmp-checkpoint-*"):
            shutil.rmtree(stale, ignore_errors=True)
        needed = estimate_checkpoint_bytes(model, optimizer) + estimate_checkpoint_bytes(model)  # + the HF export
        check_free_space(run_dir, needed, f"checkpoint-{step}")
        tmp.mkdir()
    distributed.barrier()
    # an optimizer that has not stepped yet is left out: get_state_dict would fill its empty state with a zero-grad
    # step, and Adam's bias correction would then count a step that never happened (the ranks agree: they step together)
    with_optimizer = optimizer is not None and bool(optimizer.state)
    if with_optimizer:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    else:
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(tmp / "dcp"))
    state = dict(state or {})
    per_rank = state.pop("per_rank", {})  # this rank's own entries (e.g. its share of an RL round)
    write_state(tmp / "ranks" / f"rank-{distributed.rank()}", {"rng": rng_state(), "per_rank": per_rank})
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if main:
        tied = _tied_keys(model)  # the export holds a tied head once, as save_pretrained of the model itself does
        full = {k: v for k, v in full.items() if k not in tied}
        model.save_pretrained(tmp, state_dict=full, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shared = {
            "step": step,
            "run_id": run_id,
            "optimizer": None,  # in dcp/
            "dcp_optimizer": with_optimizer,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
            "world_size": distributed.world_size(),
            **state,
        }
        write_state(tmp, shared)
    distributed.barrier()  # every rank's shards are on disk
    if main:
        write_checksums(tmp)
        _fsync_tree(tmp)
        _publish(run_dir, tmp, final, keep_last, run_id)
    distributed.barrier()
    return final


FINAL_MODEL = "final_model"  # RUN_DIR/final_model: the finished run's HF folder, at a path that does not change


def publish_final_model(run_dir: str | Path, ckpt: Path) -> Path:
    """Point ``RUN_DIR/final_model`` at the run's last checkpoint (a relative symlink, replaced atomically): the
    model loads with ``from_pretrained(RUN_DIR/final_model)`` whatever its step."""
    link = Path(run_dir) / FINAL_MODEL
    if link.is_dir() and not link.is_symlink():  # a copied run folder turned the link into a copy: ours to replace
        shutil.rmtree(link)
    tmp = link.with_name(f".{FINAL_MODEL}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(ckpt.name, target_is_directory=True)
    os.replace(tmp, link)
    return link


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, else the highest-step complete one (not verified: see `find_resumable`)."""
    run_dir = Path(run_dir)
    pointer = run_dir / "latest"
    if pointer.is_file():
        p = run_dir / pointer.read_text().strip()
        if (p / STATE_FILE).is_file():
            return p
    ckpts = [p for p in run_dir.glob("checkpoint-*") if (p / STATE_FILE).is_file()]
    return max(ckpts, key=_step_of) if ckpts else None


def find_resumable(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of ``run_dir`` that verifies. A corrupt newer one (`latest` included) is reported
    on stderr by path and skipped; None when the folder has no checkpoint at all. Raises
    :class:`CheckpointError` when checkpoints exist but none is intact."""
    run_dir = Path(run_dir)
    first = latest_checkpoint(run_dir)
    others = sorted((p for p in run_dir.glob("checkpoint-*") if p.is_dir()), key=_step_of, reverse=True)
    candidates = ([first] if first is not None else []) + [p for p in others if p != first]
    problems = []
    for ckpt in candidates:
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as e:
            problems.append(str(e))
            print(f"[alignkit] WARNING: {e}; trying the previous checkpoint", file=sys.stderr)
            continue
        return ckpt
    if problems:
        raise CheckpointError("no intact checkpoint to resume from: " + "; ".join(problems))
    return None


def _tied_keys(model: torch.nn.Module) -> set[str]:
    """Parameter names the model ties to another (only when its config really ties the embeddings)."""
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    if not getattr(text, "tie_word_embeddings", False):
        return set()
    keys = getattr(model, "_tied_weights_keys", None) or []  # a list, or (transformers 5) {target: source}
    return set(keys) | {"lm_head.weight"}


def weight_files(ckpt: Path) -> list[Path]:
    """The model's ``*.safetensors`` files in a checkpoint folder (not an old-style training-state file)."""
    return sorted(p for p in Path(ckpt).glob("*.safetensors") if p.name != OLD_STATE_TENSORS)


def read_full_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's model weight files, refused when there are none or one is not finite."""
    from safetensors.torch import load_file

    files = weight_files(ckpt)
    if not files:
        raise CheckpointError(f"no .safetensors weights in {ckpt}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(f))
    _check_finite(sd, ckpt)
    return sd


def load_model_weights(model: torch.nn.Module, ckpt: str | Path) -> None:
    """Load the safetensors weights of a checkpoint into an already built model (full or peft adapter); refuse
    weights that do not fit the model (a missing untied head included) or that are not finite."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    if (ckpt / "adapter_model.safetensors").is_file():
        from peft import set_peft_model_state_dict

        sd = load_file(ckpt / "adapter_model.safetensors")
        _check_finite(sd, ckpt)
        set_peft_model_state_dict(model, sd)
        return
    sd = read_full_weights(ckpt)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = _tied_keys(model)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {ckpt} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def _check_finite(sd: dict[str, torch.Tensor], ckpt: Path) -> None:
    bad = [k for k, t in sd.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"checkpoint {ckpt} has non-finite weights ({len(bad)} tensors, e.g. {bad[0]})")


def load_checkpoint(
    ckpt: str | Path,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> dict[str, Any]:
    """Verify ``ckpt``, then restore weights, optimizer, scheduler and RNG; returns the saved state dict."""
    from alignkit import distributed

    ckpt = Path(ckpt)
    verify_checkpoint(ckpt)
    state = read_state(ckpt)
    if (ckpt / "dcp").is_dir():  # sharded: DCP reshards onto this run's ranks (one process included)
        _load_sharded(ckpt, model, optimizer if state.get("dcp_optimizer", True) else None)
    elif model is not None and distributed.is_fsdp(model):  # a one-process checkpoint onto FSDP2 shards
        _load_full_into_sharded(ckpt, model, optimizer, state.get("optimizer"))
    else:
        if model is not None:
            load_model_weights(model, ckpt)
        if optimizer is not None and state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    mine = ckpt / "ranks" / f"rank-{distributed.rank()}"
    if (mine / STATE_FILE).is_file():  # a sharded checkpoint: this rank's RNG and entries
        own = read_state(mine)
        set_rng_state(own["rng"])
        state["per_rank"] = own.get("per_rank", {})
    else:
        set_rng_state(state["rng"])
    return state


def _load_full_into_sharded(
    ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, optim_state: dict[str, Any] | None
) -> None:
    """A one-process checkpoint (full weights, optimizer state by parameter index) into an FSDP2 model: every
    rank reads the full tensors and keeps its shard of each."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import distribute_tensor

    if (ckpt / "adapter_model.safetensors").is_file():
        raise CheckpointError(f"{ckpt} holds a LoRA adapter from one process: resume it in one process or under ddp")
    sd = read_full_weights(ckpt)
    missing = [k for k in model.state_dict() if k not in sd and k not in _tied_keys(model)]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt} does not fit the model: missing {missing[:5]}")
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=False))
    if optimizer is None or optim_state is None:
        return
    optimizer.load_state_dict(optim_state)  # the same parameters in the same order, now as DTensors
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            for k, v in st.items():
                if torch.is_tensor(v) and v.ndim > 0 and hasattr(p, "device_mesh"):  # moments: shard like p
                    st[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)


def _load_sharded(ckpt: Path, model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    if model is None:
        return
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        both = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(both, checkpoint_id=str(ckpt / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optimizer"])
    else:
        only = {"model": get_model_state_dict(model)}
        dcp.load(only, checkpoint_id=str(ckpt / "dcp"))
        set_model_state_dict(model, only["model"])
    from alignkit import distributed

    local = {k: t.to_local() if hasattr(t, "to_local") else t for k, t in model.state_dict().items()}  # shards
    bad = [k for k, t in local.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    # every rank refuses, not only the one holding the bad shard (the others would wait in a collective)
    if distributed.all_reduce_sum(torch.tensor(float(len(bad)))) > 0:
        bad = bad or ["(a shard on another rank)"]
        raise CheckpointError(f"checkpoint {ckpt} has non-finite weights ({len(bad)} tensors, e.g. {bad[0]})")
