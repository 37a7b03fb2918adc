"""Config blocks every loop config is made from: a shared key is declared (and documented) once, here.

A loop config is a dataclass inheriting the blocks it needs (``class SFTConfig(ModelBlock, DataBlock, ...)``)
plus its own keys; a loop changes a shared key's default by re-declaring it with a new default only. Keys stay
flat (``lr=1e-5``, not ``optim.lr``), so YAML files, ``key=value`` overrides and strict-key errors are as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "ModelBlock",
    "DataBlock",
    "EvalBlock",
    "BatchBlock",
    "OptimBlock",
    "LoRABlock",
    "RunBlock",
    "ReferenceBlock",
    "OfflineConfig",
]


@dataclass
class ModelBlock:
    model: str = ""  # HF id or local folder (ignored when a model object is passed to the train function)
    dtype: str = "float32"  # weights' dtype: float32 | bfloat16 | float16
    attn_implementation: str | None = "sdpa"  # sdpa | eager | flash_attention_2 | ...
    token_chunk: int = 2048  # tokens per tile of the chunked LM-head log-prob computation


@dataclass
class DataBlock:
    dataset: str = ""  # hub id, .json/.jsonl/.parquet/.csv file or folder
    dataset_split: str = "train"
    chat_format: str | None = None  # registered name; None = detect from the tokenizer's template
    max_length: int | None = 1024  # tokens per sequence (prompt + completion)


@dataclass
class EvalBlock:
    eval_dataset: str | None = None
    eval_split: str = "test"
    eval_rows: int | None = 256  # cap on evaluation rows
    eval_every: int | None = None  # steps between evaluations


@dataclass
class BatchBlock:
    batch_size: int = 8  # examples (pairs for paired losses) per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: float = 1.0
    max_steps: int | None = None  # cap on optimizer steps (None: the epochs decide)


@dataclass
class OptimBlock:
    lr: float = 1e-6
    weight_decay: float = 0.0  # AdamW; never on biases and norm weights
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "linear"  # after the linear warmup
    min_lr_ratio: float = 0.0  # floor of the cosine / linear decay, as a fraction of lr
    max_grad_norm: float | None = 1.0  # clip the gradient norm (None: measure only)


@dataclass
class LoRABlock:
    lora_r: int = 0  # > 0 trains a LoRA adapter through peft
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class RunBlock:
    output_dir: str = "runs/run"
    seed: int = 0
    log_every: int = 1  # steps between metrics.jsonl records
    save_every: int | None = None  # steps between checkpoints; the final state is always saved
    keep_last: int = 2  # checkpoints kept
    resume: bool = False  # continue from RUN_DIR/latest if present
    tensorboard: bool = False  # mirror the metrics to RUN_DIR/tensorboard
    progress: bool = True  # tqdm progress bar


@dataclass
class ReferenceBlock:
    reference: Literal["precomputed", "lora", "model", "tr_dpo"] = "precomputed"  # see alignkit.reference
    reference_cache_dir: str | None = None  # None = $ALIGNKIT_CACHE/reference or ~/.cache/alignkit/reference
    ref_model: str | None = None  # for model / tr_dpo; None = a frozen copy of the initial policy
    tr_dpo_alpha: float = 0.6
    tr_dpo_sync_steps: int = 512
    temperature: float = 1.0  # log-probs of logits / temperature (policy and reference alike)


@dataclass
class OfflineConfig(ModelBlock, DataBlock, EvalBlock, BatchBlock, OptimBlock, LoRABlock, RunBlock):
    """The blocks of a loop that trains a (LoRA-able) policy on a fixed dataset: SFT, DPO, KTO."""
