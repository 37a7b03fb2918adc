"""Model construction: tiny random Llamas for tests and benchmarks, and one loader for real checkpoints."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """Map a name ("bfloat16", "bf16", ...) or a torch.dtype to a torch.dtype; "auto" passes through."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)} or 'auto'") from None


def tiny_llama_config(
    vocab_size: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    max_positions: int = 2048,
    tie: bool = False,
    **overrides: Any,
) -> LlamaConfig:
    """A small Llama config (GQA when kv_heads < heads). ``intermediate`` defaults to 4 * hidden.

    ``overrides`` go straight to ``LlamaConfig`` (e.g. ``eos_token_id``, ``initializer_range``).
    """
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"need hidden % heads == 0 and heads % kv_heads == 0, got {hidden=}, {heads=}, {kv_heads=}")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate or 4 * hidden,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
        **overrides,
    )


def build_tiny_model(
    config: LlamaConfig,
    seed: int = 0,
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    """Randomly initialised causal LM from ``config``; same seed -> same weights.

    The seed is applied inside a forked RNG so building a model does not disturb the caller's random stream.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation
        )
    return model


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else is meant as a filesystem path.
    return name.startswith(("/", "./", "../", "~", "\\")) or name.count("/") > 1 or "\\" in name


def load_model_and_tokenizer(
    name_or_path: str | Path,
    *,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    auto_class: type = AutoModelForCausalLM,
    **model_kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model (``auto_class``, default causal LM) and its tokenizer from a Hub id or a local directory.

    A tokenizer without a pad token gets ``pad_token = eos_token`` (collators need one; labels mask the pads).
    Errors: a path-like name that does not exist raises ``FileNotFoundError`` without touching the network;
    a Hub id that cannot be fetched raises ``OSError`` saying how to work offline.
    """
    torch_dtype = resolve_dtype(dtype)
    name = str(name_or_path)
    local = Path(name).expanduser()
    if local.exists():
        name = str(local)
    elif _looks_like_path(name):
        raise FileNotFoundError(f"{name!r} looks like a local path but does not exist")

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    try:
        if auto_class is AutoModelForCausalLM and _is_vision_checkpoint(name, trust_remote_code):
            from transformers import AutoModelForImageTextToText

            auto_class = AutoModelForImageTextToText
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        model = auto_class.from_pretrained(name, dtype=torch_dtype, **kwargs, **model_kwargs)
    except OSError as err:
        if local.exists():
            raise
        raise OSError(
            f"could not load {name!r}: it is not a local directory and fetching it from the Hugging Face Hub "
            "failed. Without network access, download it elsewhere and pass the local directory, or pre-fill "
            "the HF cache and set HF_HUB_OFFLINE=1. Original error: " + str(err)
        ) from err

    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _is_vision_checkpoint(name: str, trust_remote_code: bool) -> bool:
    """Whether ``name``'s config describes a vision-language model (loaded with AutoModelForImageTextToText)."""
    from transformers import AutoConfig

    return (
        getattr(AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code), "vision_config", None)
        is not None
    )


def pad_token_id(tokenizer: Any) -> int:
    """The id collators pad with: the tokenizer's pad token, else its eos token, else 0."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else 0


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack of a Hugging Face model (hidden states after the final norm, no head), through a peft
    wrapper: ``get_decoder()`` (transformers 5 resolves language_model / text_model / base_model), else the
    ``base_model_prefix`` attribute (sequence-classification models), else ``.model``."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    get = getattr(inner, "get_decoder", None)
    decoder = get() if callable(get) else None
    if decoder is None or decoder is inner:
        decoder = getattr(inner, getattr(inner, "base_model_prefix", "") or "model", None)
    if decoder is None or decoder is inner:
        decoder = getattr(inner, "model", None)
    if decoder is None:
        raise ValueError(f"cannot find the decoder backbone of {type(inner).__name__}")
    return decoder


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The repeated decoder layers of ``model`` (what activation checkpointing, compile and FSDP2 act on)."""
    layers = getattr(decoder_of(model), "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
    return layers


def is_peft(model: torch.nn.Module | None) -> bool:
    """Whether ``model`` is a peft model (it can switch its adapter off)."""
    return model is not None and hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def add_lora(
    model: torch.nn.Module, *, r: int, alpha: int = 16, dropout: float = 0.0, targets: Sequence[str] = ()
) -> torch.nn.Module:
    """Wrap ``model`` in a peft LoRA adapter of rank ``r`` on the ``targets`` modules (only the adapter trains).
    On a vision-language model the adapter goes on the language model only: ``targets`` (module names, or
    ``all-linear``) are matched among its linear layers, never the vision encoder's or the projector's."""
    from peft import LoraConfig, get_peft_model

    names: Any = list(targets)
    if getattr(model.config, "vision_config", None) is not None:
        decoder = decoder_of(model)
        prefix = next(n for n, m in model.named_modules() if m is decoder)
        every = "all-linear" in names
        names = [n for n, m in model.named_modules() if n.startswith(prefix + ".") and isinstance(m, torch.nn.Linear)
                 and (every or n.rsplit(".", 1)[-1] in names)]  # fmt: skip
        if not names:
            raise ValueError(f"no linear layer of the language model ({prefix}) is named like {list(targets)}")
    lc = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names)
    return get_peft_model(model, lc)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode without autograd for the block; its training mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
