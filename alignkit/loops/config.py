"""Config blocks every loop config is made from: a shared key is declared (and documented) once, here.

A loop config is a dataclass inheriting the blocks it needs (``class SFTConfig(ModelBlock, DataBlock, ...)``)
plus its own keys; a loop changes a shared key's default by re-declaring it with a new default only. Keys stay
flat (``lr=1e-5``, not ``optim.lr``), so YAML files, ``key=value`` overrides and strict-key errors are as before.

Every block checks its own keys in a ``check`` method; :class:`Checked` runs all of them when a config is built,
so a bad value (a range, an enum, a missing name) is refused with the key named before any model is loaded.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from alignkit.config import ConfigError
from alignkit.data.loading import MIXTURE_KEYS, Mixture
from alignkit.trackers import check_report_to

__all__ = [
    "Checked",
    "require",
    "ParallelBlock",
    "ModelBlock",
    "DatasetBlock",
    "DataBlock",
    "EvalBlock",
    "BatchBlock",
    "OptimBlock",
    "LoRABlock",
    "RunBlock",
    "ReferenceBlock",
    "OfflineConfig",
]


def require(cfg: Any, ok: bool, key: str, expected: str) -> None:
    """Raise :class:`ConfigError` naming ``key``, its value and the expectation unless ``ok``."""
    if not ok:
        raise ConfigError(f"{type(cfg).__name__}.{key}={getattr(cfg, key)!r}: expected {expected}")


class Checked:
    """Runs every block's ``check`` (each block checks its own keys) and the ``Literal`` choices of every key."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            tp = hints.get(f.name)
            if typing.get_origin(tp) is Literal:
                choices = typing.get_args(tp)
                require(self, getattr(self, f.name) in choices, f.name, f"one of {list(choices)}")
        for cls in reversed(type(self).__mro__):
            check = cls.__dict__.get("check")
            if check is not None:
                check(self)


@dataclass
class ParallelBlock(Checked):
    # several processes (alignkit.distributed): under torchrun, or `nproc=N` starts torchrun for you
    parallel: Literal["auto", "none", "ddp", "fsdp2"] = "auto"  # auto: ddp under several processes, else none
    nproc: int = 1  # processes on this machine (the CLI starts `torchrun --nproc_per_node nproc`)
    dist_timeout_s: float = 600.0  # longest wait of any collective: a lost rank fails the others after this

    def check(self) -> None:
        from alignkit.distributed import env_world_size

        require(self, self.nproc >= 1, "nproc", "an integer >= 1")
        require(self, self.dist_timeout_s > 0, "dist_timeout_s", "a number of seconds > 0")
        world = env_world_size()
        require(self, not (world > 1 and self.parallel == "none"), "parallel",
                f"ddp or fsdp2 (or auto): this process is one of WORLD_SIZE={world}")  # fmt: skip
        grad_accum = getattr(self, "grad_accum", None)
        require(self, grad_accum is None or grad_accum % world == 0, "grad_accum",
                f"a multiple of the WORLD_SIZE={world} ranks: each rank runs grad_accum / WORLD_SIZE of a step's "
                "micro-batches")  # fmt: skip
        if self.parallel == "fsdp2" or world > 1:
            require(self, getattr(self, "precision", "fp32") != "bf16", "precision",
                    "fp32 or bf16-mixed under several processes or parallel=fsdp2 (bf16's fp32 master copies are "
                    "not in the sharded checkpoint; bf16-mixed computes in bf16 over fp32 weights)")  # fmt: skip


@dataclass
class ModelBlock(ParallelBlock):
    model: str = ""  # HF id or local folder (ignored when a model object is passed to the train function)
    dtype: str = "float32"  # weights' dtype: float32 | bfloat16 | float16
    attn_implementation: str | None = "sdpa"  # sdpa | eager | flash_attention_2 | ...
    token_chunk: int = 2048  # tokens per tile of the chunked LM-head log-prob computation
    device: str = "auto"  # auto (this rank's GPU if any, else CPU) | cpu | cuda | cuda:N
    # fp32 | bf16-mixed (bf16 autocast over fp32 weights) | bf16 (bf16 weights, fp32 master copies): alignkit.hardware
    precision: Literal["fp32", "bf16-mixed", "bf16"] = "fp32"
    gradient_checkpointing: bool = False  # recompute decoder-layer activations in backward (less memory)
    compile: bool = False  # torch.compile each decoder layer
    freeze_vision: bool = False  # vision-language models: train the language side only (encoder + projector frozen)

    def check(self) -> None:
        from alignkit.models import resolve_dtype

        dev = self.device
        require(self, dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:"), "device", "auto, cpu, cuda or cuda:N")

        try:
            resolve_dtype(self.dtype)
        except ValueError:
            require(self, False, "dtype", "float32, bfloat16, float16 or auto")
        require(self, self.token_chunk >= 1, "token_chunk", "an integer >= 1")


@dataclass
class DatasetBlock:
    dataset: str = ""  # hub id, .json/.jsonl/.parquet/.csv file or folder
    # several datasets read as one, in order (TRL's datasets:): entries {path, split, name, data_files, columns, rows}
    dataset_mixture: list[dict[str, Any]] = field(default_factory=list)
    dataset_split: str = "train"  # split of the dataset (hub datasets and folders with splits)

    def check(self) -> None:
        require(self, not (self.dataset and self.dataset_mixture), "dataset_mixture", "unset when dataset is set")
        for k, entry in enumerate(self.dataset_mixture):
            ok = isinstance(entry, dict) and bool(entry.get("path")) and set(entry) <= MIXTURE_KEYS
            require(self, ok, "dataset_mixture", f"entry {k} a mapping with a path and only {sorted(MIXTURE_KEYS)}")

    def train_source(self) -> Any:
        """What the loops load the training rows from: ``dataset``, or the mixture."""
        return Mixture(self.dataset_mixture, self.dataset_split) if self.dataset_mixture else self.dataset


@dataclass
class DataBlock(DatasetBlock):
    chat_format: str | None = None  # registered name; None = detect from the tokenizer's template
    max_length: int | None = 1024  # tokens per sequence (prompt + completion)

    def check(self) -> None:
        require(self, self.max_length is None or self.max_length >= 1, "max_length", "an integer >= 1 (or none)")


@dataclass
class EvalBlock:
    eval_dataset: str | None = None  # evaluation rows (same formats as dataset); None: no evaluation
    eval_split: str = "test"  # split of eval_dataset
    eval_rows: int | None = 256  # cap on evaluation rows
    eval_every: int | None = None  # steps between evaluations

    def check(self) -> None:
        require(self, self.eval_rows is None or self.eval_rows >= 1, "eval_rows", "an integer >= 1 (or none)")
        require(self, self.eval_every is None or self.eval_every >= 1, "eval_every", "an integer >= 1 (or none)")


@dataclass
class BatchBlock:
    batch_size: int = 8  # examples (pairs for paired losses) per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: float = 1.0  # passes over the training data (fractions allowed)
    max_steps: int | None = None  # cap on optimizer steps (None: the epochs decide)

    def check(self) -> None:
        require(self, self.batch_size >= 1, "batch_size", "an integer >= 1")
        require(self, self.grad_accum >= 1, "grad_accum", "an integer >= 1")
        require(self, self.epochs > 0, "epochs", "a number > 0")
        require(self, self.max_steps is None or self.max_steps >= 1, "max_steps", "an integer >= 1 (or none)")


@dataclass
class OptimBlock:
    lr: float = 1e-6  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW; never on biases and norm weights
    warmup_steps: int = 0  # optimizer steps of linear warmup from 0 to lr
    warmup_ratio: float = 0.0  # the warmup as a fraction of the run's steps instead (with warmup_steps=0)
    schedule: Literal["cosine", "linear", "constant"] = "linear"  # learning-rate decay after the linear warmup
    min_lr_ratio: float = 0.0  # floor of the cosine / linear decay, as a fraction of lr
    max_grad_norm: float | None = 1.0  # clip the gradient norm (None: measure only)

    def check(self) -> None:
        require(self, self.lr > 0, "lr", "a learning rate > 0")
        require(self, self.weight_decay >= 0, "weight_decay", "a number >= 0")
        require(self, self.warmup_steps >= 0, "warmup_steps", "an integer >= 0")
        require(self, 0 <= self.warmup_ratio < 1, "warmup_ratio", "a fraction in [0, 1)")
        require(self, not (self.warmup_ratio and self.warmup_steps), "warmup_ratio",
                "0 when warmup_steps is set (one or the other)")  # fmt: skip
        require(self, 0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "a fraction in [0, 1]")
        require(self, self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "a number > 0 (or none)")


@dataclass
class LoRABlock:
    lora_r: int = 0  # > 0 trains a LoRA adapter through peft
    lora_alpha: int = 16  # LoRA scale numerator (update scaled by lora_alpha / lora_r)
    lora_dropout: float = 0.0  # dropout on the LoRA input
    # module names that get an adapter
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def check(self) -> None:
        require(self, self.lora_r >= 0, "lora_r", "an integer >= 0 (0: no LoRA)")
        require(self, self.lora_alpha > 0, "lora_alpha", "a number > 0")
        require(self, 0 <= self.lora_dropout < 1, "lora_dropout", "a probability in [0, 1)")
        require(self, self.lora_r == 0 or bool(self.lora_targets), "lora_targets", "at least one module name")


@dataclass
class RunBlock:
    output_dir: str = "runs/run"  # run folder: metrics.jsonl, run.json, checkpoint-N/
    seed: int = 0  # seeds the data order, initialisation and sampling
    log_every: int = 1  # steps between metrics.jsonl records
    save_every: int | None = None  # steps between checkpoints; the final state is always saved
    keep_last: int = 2  # checkpoints kept
    resume: bool = False  # continue from RUN_DIR/latest if present
    report_to: list[str] = field(default_factory=list)  # trackers beside metrics.jsonl: tensorboard, wandb, trackio
    run_name: str | None = None  # the run's name in W&B / trackio (default: the output_dir folder's name)
    tracker_project: str = "alignkit"  # the W&B / trackio project
    progress: bool = True  # tqdm progress bar
    overwrite: bool = False  # a fresh run in a non-empty output_dir deletes what is there (else: refused)
    allow_config_change: list[str] = field(default_factory=list)  # keys a resume may change ("all": any)
    max_nonfinite_steps: int = 3  # non-finite losses / grad norms in a row (each update skipped) before the run stops

    def check(self) -> None:
        require(self, bool(self.output_dir), "output_dir", "a folder for the run")
        require(self, self.log_every >= 1, "log_every", "an integer >= 1")
        require(self, self.save_every is None or self.save_every >= 1, "save_every", "an integer >= 1 (or none)")
        require(self, self.keep_last >= 1, "keep_last", "an integer >= 1")
        require(self, self.max_nonfinite_steps >= 0, "max_nonfinite_steps", "an integer >= 0")
        self.report_to = check_report_to(self.report_to)  # TRL's none / all become the list they mean
        require(self, not (self.resume and self.overwrite), "overwrite", "false when resume=true (one or the other)")


@dataclass
class ReferenceBlock:
    # precomputed table | lora (the adapter switched off) | model (a separate or frozen copy) | tr_dpo
    reference: Literal["precomputed", "lora", "model", "tr_dpo"] = "precomputed"
    reference_cache_dir: str | None = None  # None = $ALIGNKIT_CACHE/reference or ~/.cache/alignkit/reference
    ref_model: str | None = None  # for model / tr_dpo; None = a frozen copy of the initial policy
    tr_dpo_alpha: float = 0.6  # TR-DPO: the reference moves this fraction toward the policy at each sync
    tr_dpo_sync_steps: int = 512  # TR-DPO: optimizer steps between reference syncs
    temperature: float = 1.0  # log-probs of logits / temperature (policy and reference alike)

    def check(self) -> None:
        require(self, self.temperature > 0, "temperature", "a number > 0")
        require(self, 0 < self.tr_dpo_alpha <= 1, "tr_dpo_alpha", "a number in (0, 1]")
        require(self, self.tr_dpo_sync_steps >= 1, "tr_dpo_sync_steps", "an integer >= 1")


@dataclass
class OfflineConfig(ModelBlock, DataBlock, EvalBlock, BatchBlock, OptimBlock, LoRABlock, RunBlock):
    """The blocks of a loop that trains a (LoRA-able) policy on a fixed dataset: SFT, DPO, KTO."""
