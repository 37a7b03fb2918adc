"""Scalar reward models on any causal-LM backbone: build, load, score, save.

Where transformers has a `...ForSequenceClassification` class for the architecture (Llama, Qwen, Mistral, ...),
the reward model is exactly that class with `num_labels=1`, so a saved checkpoint is a folder any HF tool loads.
Otherwise `ScalarHeadModel` puts a `Linear(H, 1)` on the bare backbone (`AutoModel`) and saves its own folder.

`score` reads the head at each sequence's last real token, found from the attention mask (never from
`pad_token_id`: HF's own pooling confuses a final eos with padding when pad == eos, which is the common setup).

    model, tok = load_reward_model("runs/sft/checkpoint-900")
    r = score(model, input_ids, attention_mask)  # [B] fp32
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer, PretrainedConfig

from alignkit.models import resolve_dtype
from alignkit.scoring import backbone as scoring_backbone

__all__ = [
    "ScalarHeadModel",
    "supports_sequence_classification",
    "build_reward_model",
    "load_reward_model",
    "last_token_index",
    "score",
]

HEAD_MARKER = "alignkit_scalar_head.json"  # present only in ScalarHeadModel folders


def supports_sequence_classification(config: PretrainedConfig) -> bool:
    """Whether transformers maps this config class to a `...ForSequenceClassification` model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    return type(config) in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING


class ScalarHeadModel(nn.Module):
    """`backbone` (a bare HF transformer returning `last_hidden_state`) plus `head = Linear(hidden_size, 1)`.

    The fallback for architectures without a sequence-classification class. Saved as the backbone's
    `config.json`, one `model.safetensors` holding this module's own state dict (`backbone.*`, `head.*`), and a
    marker file; `from_pretrained` (or `load_reward_model`) reads it back.
    """

    def __init__(self, backbone: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1, bias=False)
        nn.init.normal_(self.head.weight, std=getattr(backbone.config, "initializer_range", 0.02))

    @property
    def config(self) -> PretrainedConfig:
        return self.backbone.config

    def get_decoder(self) -> nn.Module:
        return self.backbone

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """`[B,T]` ids and mask -> `[B]` fp32 rewards at each row's last real token."""
        return score(self, input_ids, attention_mask)

    def save_pretrained(self, path: str | Path, **_: Any) -> None:
        from safetensors.torch import save_model

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.config.save_pretrained(path)
        save_model(self, str(path / "model.safetensors"))  # handles shared (tied) tensors
        (path / HEAD_MARKER).write_text(json.dumps({"hidden_size": self.head.in_features}))

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype: str | torch.dtype = "float32", attn_implementation: str | None = None
    ) -> ScalarHeadModel:
        from safetensors.torch import load_model

        path = Path(path)
        hidden = json.loads((path / HEAD_MARKER).read_text())["hidden_size"]
        config = AutoConfig.from_pretrained(path)
        kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = cls(AutoModel.from_config(config, dtype=resolve_dtype(dtype), **kw), hidden)
        load_model(model, str(path / "model.safetensors"))
        return model


def _set_pad(model: nn.Module, pad_token_id: int | None) -> None:
    # HF's sequence-classification forward refuses batches > 1 without it; keep the saved config usable.
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    if model.config.pad_token_id is None:
        raise ValueError("the reward model needs config.pad_token_id: pass pad_token_id (the tokenizer's pad id)")


def build_reward_model(
    config: PretrainedConfig,
    *,
    seed: int = 0,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str = "sdpa",
    pad_token_id: int | None = None,
) -> nn.Module:
    """A randomly initialised reward model from a backbone config (tests, from scratch); same seed, same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kw: dict[str, Any] = {"dtype": resolve_dtype(dtype), "attn_implementation": attn_implementation}
        if supports_sequence_classification(config):
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config, **kw)
        else:
            model = ScalarHeadModel(AutoModel.from_config(config, **kw), config.get_text_config().hidden_size)
    _set_pad(model, pad_token_id)
    return model


def _config_or_none(name_or_path: str | Path) -> PretrainedConfig | None:
    try:
        return AutoConfig.from_pretrained(str(name_or_path))
    except OSError:  # missing path or offline hub id: the model loader below raises the explanatory error
        return None


def load_reward_model(
    name_or_path: str | Path,
    *,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
) -> tuple[nn.Module, Any]:
    """(reward model, tokenizer) from a causal-LM or reward-model folder or hub id.

    A causal-LM checkpoint gets a fresh head (initialised under `seed`, so runs repeat); a reward checkpoint
    keeps its head. `config.pad_token_id` is set from `pad_token_id`, else the tokenizer's pad (or eos) id.
    """
    from alignkit.models import load_model_and_tokenizer

    path = Path(str(name_or_path)).expanduser()
    config = None if (path / HEAD_MARKER).is_file() else _config_or_none(name_or_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if (path / HEAD_MARKER).is_file():
            model = ScalarHeadModel.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
            tokenizer = AutoTokenizer.from_pretrained(path)
            if tokenizer.pad_token is None and tokenizer.eos_token is not None:
                tokenizer.pad_token = tokenizer.eos_token
        elif config is None or supports_sequence_classification(config):
            model, tokenizer = load_model_and_tokenizer(
                name_or_path,
                dtype=dtype,
                attn_implementation=attn_implementation,
                auto_class=AutoModelForSequenceClassification,
                num_labels=1,
            )
        else:
            backbone, tokenizer = load_model_and_tokenizer(
                name_or_path, dtype=dtype, attn_implementation=attn_implementation, auto_class=AutoModel
            )
            model = ScalarHeadModel(backbone, backbone.config.get_text_config().hidden_size)
    _set_pad(model, pad_token_id if pad_token_id is not None else tokenizer.pad_token_id)
    return model, tokenizer


def last_token_index(attention_mask: Tensor) -> Tensor:
    """`[B,T]` mask -> `[B]` index of each row's rightmost real token (right or left padding alike).

    Raises on a row with no real token (it has no reward).
    """
    mask = attention_mask.bool()
    pos = torch.arange(mask.shape[-1], device=mask.device)
    idx = torch.where(mask, pos, -1).amax(-1)
    if bool((idx < 0).any()):
        raise ValueError(f"rows {torch.nonzero(idx < 0).flatten().tolist()} have no real token to score")
    return idx


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps in place
    if isinstance(inner, ScalarHeadModel):
        return scoring_backbone(model), inner.head
    head = getattr(inner, "score", None)
    backbone = scoring_backbone(model) if head is not None else None
    if backbone is None or head is None:
        raise TypeError(
            f"{type(inner).__name__} is not a reward model: expected a ...ForSequenceClassification model "
            "(backbone + `score` head) or a ScalarHeadModel"
        )
    return backbone, head


def score(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Scalar rewards: the head applied to the hidden state of each row's last real token.

    Position ids count real tokens only, so a left- or right-padded row scores as it would alone.

    Args:
        model: a sequence-classification model with one label, or a `ScalarHeadModel` (peft-wrapped or not).
        input_ids: `[B,T]` token ids.
        attention_mask: `[B,T]` 1 at real tokens, 0 at padding.

    Returns:
        `[B]` fp32 rewards.
    """
    backbone, head = _backbone_and_head(model)
    idx = last_token_index(attention_mask)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    pooled = out.last_hidden_state[torch.arange(input_ids.shape[0], device=idx.device), idx]  # [B,H]
    # The head is per-position linear, so applying it to the pooled states alone equals pooling its [B,T,1] output.
    return head(pooled).squeeze(-1).float()
