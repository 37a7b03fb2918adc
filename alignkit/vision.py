"""Vision-language models: what differs per model family, in one place.

A chat format renders each image part as a placeholder span (``Span.image``); :class:`VisionProcessor` runs the
family's image processor, expands each placeholder into the tokens the model fills with image features (as the
family's own processor does: ``<image>`` x N for LLaVA, ``<|image_pad|>`` x (grid/merge²) for Qwen2-VL, the
tiled ``<fake_token_around_image><row_1_col_1><image>...`` prompt for Idefics3 / SmolVLM), and builds the model's
image inputs for a batch (``pixel_values`` and the family's extras: ``image_grid_thw`` and per-token
``mm_token_type_ids`` for Qwen2-VL, ``pixel_attention_mask`` for Idefics3). Every token of an expansion is an
image token: never trained (the chat format marks the span untrainable; :func:`image_token_ids` lets tests check).

Families (``VISION_FAMILIES``, found by the model config's ``model_type``): ``llava``, ``qwen2_vl`` /
``qwen2_5_vl``, ``idefics3`` / ``smolvlm``. Packing (several rows in one padding-free sequence) is supported for
LLaVA and Idefics3 (1-D positions); Qwen2-VL's 3-D M-RoPE positions are computed by the model per row, so its rows
are padded (``packing`` is refused with the reason).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from alignkit.models import decoder_of

__all__ = [
    "VISION_FAMILIES",
    "VisionFamily",
    "VisionProcessor",
    "freeze_vision_tower",
    "is_vision_model",
    "encode_images_once",
    "vision_backbone",
    "vision_family",
]


def _config(model_or_config: Any) -> Any:  # noqa: ANN401
    inner = model_or_config.get_base_model() if hasattr(model_or_config, "get_base_model") else model_or_config
    return getattr(inner, "config", inner)


def is_vision_model(model_or_config: Any) -> bool:
    """Whether a model (or its config) has a vision encoder (``vision_config``)."""
    return getattr(_config(model_or_config), "vision_config", None) is not None


class VisionFamily:
    """What a family of vision-language models needs from the data path. Subclasses fill the class attributes
    and the four methods; they hold no state (the image processor and token ids come in as arguments)."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    image_token: str = ""  # the token repeated once per image feature
    tokens: tuple[str, ...] = ()  # every token an expansion may contain (all of them image tokens)
    packing: bool = True  # rows may be packed into one sequence with 1-D positions restarting per row
    packing_refusal: str = ""
    own_positions: bool = False  # the model computes its positions from the image layout (no position_ids)
    encoder_keys: tuple[str, ...] = ("pixel_values",)  # the image inputs the vision encoder reads
    per_image_keys: tuple[str, ...] = ()  # image inputs the language side reads too (repeated with the features)

    def image_processor(self, config: Any) -> Any:  # noqa: ANN401
        """An image processor matching ``config`` (for models built in code, with no processor files)."""
        raise NotImplementedError

    def process(self, image_processor: Any, images: list[Any]) -> dict[str, Any]:  # noqa: ANN401
        """The image processor's output for ``images`` (one example's or a batch's, in order)."""
        return dict(image_processor(images=images, return_tensors="pt"))

    def expansions(self, processed: Mapping[str, Any], config: Any) -> list[str]:  # noqa: ANN401
        """The text each image's placeholder becomes (one string per image of ``processed``)."""
        raise NotImplementedError

    def model_inputs(self, processed: Mapping[str, Any]) -> dict[str, Tensor]:
        """The model's image keyword arguments from :meth:`process` output for all images of a batch."""
        return {"pixel_values": processed["pixel_values"]}

    def token_inputs(self, input_ids: Tensor, token_ids: Mapping[str, int]) -> dict[str, Tensor]:
        """Per-token inputs the model needs beside ``input_ids`` (``[B, T]``)."""
        return {}

    def prefill_positions(
        self, core: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, positions: Tensor,
        inputs: Mapping[str, Tensor],
    ) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        """Generation: the positions of a left-padded prompt batch (``positions``: the 1-D ones) and what later
        decode positions need (None for 1-D positions)."""
        return positions, None

    def decode_positions(self, pos: Tensor, state: Tensor | None) -> Tensor:
        """Generation: the positions of the next token of each row (``pos``: its 1-D position, ``[B]``)."""
        return pos[:, None]

    def hf_processor(self, image_processor: Any, tokenizer: Any, config: Any) -> Any:  # noqa: ANN401
        """The family's transformers processor (saved with checkpoints so ``AutoProcessor`` reloads them), or None
        where it cannot be built here (Qwen2-VL's needs torchvision): then its parts are saved."""
        return None

    def image_count(self, input_ids: Sequence[int], token_ids: Mapping[str, int]) -> int:
        """How many feature slots (``image_token``) ``input_ids`` holds."""
        tid = token_ids[self.image_token]
        return sum(1 for t in input_ids if t == tid)


class LlavaFamily(VisionFamily):
    """LLaVA 1.5 (CLIP-style encoder + projector + decoder): each image becomes a fixed number of ``<image>``
    tokens, (image_size / patch_size)² (+1 with ``vision_feature_select_strategy="full"``, the CLS feature)."""

    name = "llava"
    model_types = ("llava",)
    image_token = "<image>"
    tokens = ("<image>",)

    @staticmethod
    def _features(config: Any) -> int:  # noqa: ANN401
        vc = config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        return n + (1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0)

    def image_processor(self, config: Any) -> Any:  # noqa: ANN401
        from transformers.models.clip import CLIPImageProcessorPil

        size = config.vision_config.image_size
        return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})

    def expansions(self, processed: Mapping[str, Any], config: Any) -> list[str]:  # noqa: ANN401
        return [self.image_token * self._features(config)] * len(processed["pixel_values"])

    def hf_processor(self, image_processor: Any, tokenizer: Any, config: Any) -> Any:  # noqa: ANN401
        from transformers import LlavaProcessor

        strategy = getattr(config, "vision_feature_select_strategy", "default")
        return LlavaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
            vision_feature_select_strategy=strategy, num_additional_image_tokens=1, image_token=self.image_token,
        )  # fmt: skip


class Qwen2VLFamily(VisionFamily):
    """Qwen2-VL / Qwen2.5-VL: dynamic resolution; an image of grid (t, h, w) patches becomes t·h·w / merge²
    ``<|image_pad|>`` tokens between ``<|vision_start|>`` and ``<|vision_end|>`` (the template writes those)."""

    name = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    image_token = "<|image_pad|>"
    tokens = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
    packing = False
    own_positions = True
    encoder_keys = ("pixel_values", "image_grid_thw")
    per_image_keys = ("image_grid_thw",)
    packing_refusal = (
        "Qwen2-VL computes its 3-D M-RoPE positions per row inside the model, so packed rows would share one "
        "position sequence; set packing: false (rows are padded)"
    )

    def image_processor(self, config: Any) -> Any:  # noqa: ANN401
        from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

        vc = config.vision_config
        unit = vc.patch_size * vc.spatial_merge_size
        return Qwen2VLImageProcessorPil(
            patch_size=vc.patch_size, merge_size=vc.spatial_merge_size, temporal_patch_size=vc.temporal_patch_size,
            min_pixels=unit * unit * 4, max_pixels=unit * unit * 16,
        )  # fmt: skip

    def expansions(self, processed: Mapping[str, Any], config: Any) -> list[str]:  # noqa: ANN401
        merge = config.vision_config.spatial_merge_size**2
        pad = self.image_token
        return [f"<|vision_start|>{pad * (int(g.prod()) // merge)}<|vision_end|>" for g in processed["image_grid_thw"]]

    def model_inputs(self, processed: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"pixel_values": processed["pixel_values"], "image_grid_thw": processed["image_grid_thw"]}

    def token_inputs(self, input_ids: Tensor, token_ids: Mapping[str, int]) -> dict[str, Tensor]:
        # 1 marks an image token, so the model can lay out its 3-D positions (transformers' convention)
        return {"mm_token_type_ids": (input_ids == token_ids[self.image_token]).long()}

    def prefill_positions(
        self, core: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, positions: Tensor,
        inputs: Mapping[str, Tensor],
    ) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        # M-RoPE: image tokens get (t, h, w) grid positions, text after an image continues from the grid's extent;
        # each row's offset against its 1-D position (rope delta) carries over to every decoded token
        pos3, deltas = core.get_rope_index(
            input_ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
            attention_mask=attention_mask,
        )  # fmt: skip
        return pos3, deltas.reshape(-1).to(positions.device)

    def decode_positions(self, pos: Tensor, state: Tensor | None) -> Tensor:
        step = pos[:, None] + (0 if state is None else state[:, None])
        return step.unsqueeze(0).expand(3, -1, -1)


class Idefics3Family(VisionFamily):
    """Idefics3 / SmolVLM: an image is split into rows x cols tiles plus a global view; each tile becomes
    ``image_seq_len`` ``<image>`` tokens after a ``<fake_token_around_image><row_r_col_c>`` header."""

    name = "idefics3"
    model_types = ("idefics3", "smolvlm")
    encoder_keys = ("pixel_values", "pixel_attention_mask")
    image_token = "<image>"
    fake = "<fake_token_around_image>"
    global_tag = "<global-img>"
    tokens = ("<image>", "<fake_token_around_image>", "<global-img>") + tuple(
        f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)
    )

    @staticmethod
    def _seq_len(config: Any) -> int:  # noqa: ANN401
        vc = config.vision_config
        return int(((vc.image_size // vc.patch_size) ** 2) / (config.scale_factor**2))

    def image_processor(self, config: Any) -> Any:  # noqa: ANN401
        from transformers.models.idefics3 import Idefics3ImageProcessorPil

        size = config.vision_config.image_size
        return Idefics3ImageProcessorPil(
            size={"longest_edge": 2 * size}, max_image_size={"longest_edge": size}, do_image_splitting=True
        )

    def process(self, image_processor: Any, images: list[Any]) -> dict[str, Any]:  # noqa: ANN401
        # one "sample" per image, so each image's tiles (and rows / cols) are its own
        out = dict(image_processor(images=[[im] for im in images], return_tensors="pt", return_row_col_info=True))
        return out

    def expansions(self, processed: Mapping[str, Any], config: Any) -> list[str]:  # noqa: ANN401
        n = self._seq_len(config)
        tile = self.image_token * n
        out = []
        for (rows,), (cols,) in zip(processed["rows"], processed["cols"]):
            text = ""
            for r in range(rows):
                text += "".join(f"{self.fake}<row_{r + 1}_col_{c + 1}>{tile}" for c in range(cols)) + "\n"
            text = (f"{text}\n" if rows or cols else "") + f"{self.fake}{self.global_tag}{tile}{self.fake}"
            out.append(text)
        return out

    def hf_processor(self, image_processor: Any, tokenizer: Any, config: Any) -> Any:  # noqa: ANN401
        from transformers import Idefics3Processor

        return Idefics3Processor(
            image_processor=image_processor, tokenizer=tokenizer, image_seq_len=self._seq_len(config)
        )

    def model_inputs(self, processed: Mapping[str, Any]) -> dict[str, Tensor]:
        # every image's real tiles in order as one [1, tiles, C, H, W] "sample": the model drops all-zero padding
        # tiles and fills the <image> slots in order, so no padding across rows is needed
        pv, mask = processed["pixel_values"], processed["pixel_attention_mask"]
        real = pv.flatten(2).any(-1)  # [images, max_tiles]
        return {"pixel_values": pv[real].unsqueeze(0), "pixel_attention_mask": mask[real].unsqueeze(0)}


VISION_FAMILIES: dict[str, VisionFamily] = {f.name: f for f in (LlavaFamily(), Qwen2VLFamily(), Idefics3Family())}


def vision_family(model_or_config: Any) -> VisionFamily:  # noqa: ANN401
    """The family of a vision-language model, by its config's ``model_type``."""
    mt = getattr(_config(model_or_config), "model_type", None)
    for fam in VISION_FAMILIES.values():
        if mt in fam.model_types:
            return fam
    known = sorted(t for f in VISION_FAMILIES.values() for t in f.model_types)
    raise ValueError(f"vision-language model type {mt!r} is not supported yet; supported: {known}")


@dataclass
class VisionProcessor:
    """A tokenizer, an image processor and the model's family: expands image placeholders and batches images.

    Build with :meth:`for_model` (the image processor from the model's folder when it has one, else made to
    match its config)."""

    tokenizer: Any
    image_processor: Any
    family: VisionFamily
    config: Any
    token_ids: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in self.family.tokens if t not in vocab and t == self.family.image_token]
        if missing:
            raise ValueError(f"the tokenizer has no {missing[0]!r} token, which a {self.family.name} model needs")
        self.token_ids = {t: vocab[t] for t in self.family.tokens if t in vocab}

    @classmethod
    def for_model(cls, model: Any, tokenizer: Any, image_processor: Any = None) -> VisionProcessor:  # noqa: ANN401
        config = _config(model)
        family = vision_family(config)
        if image_processor is None:
            path = getattr(config, "_name_or_path", "") or ""
            image_processor = _load_image_processor(path) if path else None
        return cls(tokenizer, image_processor or family.image_processor(config), family, config)

    def process(self, images: list[Any]) -> dict[str, Any]:
        return self.family.process(self.image_processor, images)

    def expansions(self, images: list[Any]) -> list[str]:
        """The expanded placeholder text of each image."""
        return self.family.expansions(self.process(images), self.config) if images else []

    def batch_inputs(self, images: list[Any], input_ids: Tensor) -> dict[str, Tensor]:
        """The model's image inputs for a micro-batch: all its images in row order, plus per-token extras."""
        out = self.family.token_inputs(input_ids, self.token_ids)
        if images:
            out.update(self.family.model_inputs(self.process(images)))
        return out

    def row_inputs(self, rows_images: Sequence[Sequence[Any] | None], input_ids: Tensor) -> dict[str, Tensor]:
        """:meth:`batch_inputs` of each row's images as the rows gave them (paths, bytes, PIL), decoded here in
        row order (``None`` or ``[]``: a row without images)."""
        from alignkit.data.images import decode_image

        return self.batch_inputs([decode_image(v, None, "images") for r in rows_images for v in r or []], input_ids)

    def require_packing(self) -> None:
        """Refuse packing, with the reason, for a family whose positions depend on the image layout."""
        if not self.family.packing:
            raise ValueError(f"packing is not supported for {self.family.name} models: {self.family.packing_refusal}")

    def collate(self, examples: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, Any]:
        """A padded micro-batch of encoded vision-language rows (:func:`alignkit.data.tokenize.tokenize_vision_rows`):
        ``input_ids`` / ``labels`` / ``attention_mask`` / ``position_ids`` ``[B, T]`` plus the model's image inputs,
        the rows' images decoded again here in row order."""
        from alignkit.data.collate import pad_collate

        text = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
        padded = pad_collate(text, pad_token_id=pad_token_id)
        keep = ("input_ids", "labels", "attention_mask") + (() if self.family.own_positions else ("position_ids",))
        batch = {k: padded[k] for k in keep}
        batch.update(self.row_inputs([e.get("images") for e in examples], batch["input_ids"]))
        return batch

    def pack(
        self,
        examples: Sequence[Mapping[str, Any]],
        *,
        capacity: int | None,
        pad_token_id: int,
        attn_implementation: str,
    ) -> dict[str, Any]:
        """A packed micro-batch as model inputs (:func:`alignkit.data.collate.packed_forward_kwargs`) plus ``labels``
        and the image inputs, the images in the order their rows were packed. ``capacity`` None: one padding-free
        row of every example (flash varlen, flex attention); else rows of at most ``capacity`` tokens
        (:func:`alignkit.data.collate.pack_rows`, for sdpa / eager). Families whose positions depend on the image
        layout (Qwen2-VL) refuse."""
        from alignkit.data.collate import pack_best_fit_decreasing, pack_collate, pack_rows, packed_forward_kwargs

        self.require_packing()
        text = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
        if capacity is None:
            bins = [list(range(len(text)))]
            batch = pack_collate(text)
        else:
            bins = pack_best_fit_decreasing([len(e["input_ids"]) for e in text], capacity)
            batch = pack_rows(text, capacity=capacity, pad_token_id=pad_token_id, bins=bins)
        images = [examples[i].get("images") for b in bins for i in b]  # in the order the rows were packed
        kwargs = packed_forward_kwargs(batch, attn_implementation)
        kwargs.pop("use_cache", None)
        return {**kwargs, "labels": batch["labels"], **self.row_inputs(images, batch["input_ids"])}

    def save_pretrained(self, path: Any) -> None:  # noqa: ANN401
        """The tokenizer and image processor (as the family's processor where it can be built), so the folder
        reloads with ``AutoProcessor`` / ``AutoImageProcessor`` + ``AutoTokenizer``."""
        try:
            proc = self.family.hf_processor(self.image_processor, self.tokenizer, self.config)
        except (ImportError, ValueError, TypeError):
            proc = None
        if proc is not None:
            proc.save_pretrained(path)
            return
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)

    def image_token_ids(self) -> set[int]:
        """Ids of every token an image expands to (never trained)."""
        return set(self.token_ids.values())


def _load_image_processor(path: str) -> Any:  # noqa: ANN401
    from pathlib import Path

    if not (Path(path) / "preprocessor_config.json").is_file():
        return None
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(path)


def vision_backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The multimodal backbone of a vision-language model (vision encoder + projector + language model, no head):
    it takes ``pixel_values`` and returns the language model's last hidden states."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    core = getattr(inner, "model", None)
    if core is None or not hasattr(core, "get_image_features"):
        name = type(inner).__name__
        raise ValueError(f"cannot find the multimodal backbone of {name} (no .model.get_image_features)")
    return core


def encode_images_once(model: torch.nn.Module, family: VisionFamily, inputs: dict[str, Any], repeat: int) -> dict:
    """``inputs`` (a batch's image inputs) with the images run through the vision encoder ONCE and their features
    used ``repeat`` times, in order (``mm_encoder_outputs``): the batch holds each image's sequences ``repeat``
    times (a DPO batch's chosen rows, then its rejected rows), the encoder's gradient accumulates over all."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    core = vision_backbone(model)
    enc = {k: inputs.pop(k) for k in family.encoder_keys if k in inputs}
    if not enc:
        return inputs
    feats = core.get_image_features(**enc, return_dict=True).pooler_output
    pooled = torch.cat([feats] * repeat) if isinstance(feats, Tensor) else list(feats) * repeat
    for k in family.per_image_keys:
        inputs[k] = torch.cat([enc[k]] * repeat)
    inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=pooled)}
    return inputs


def freeze_vision_tower(model: torch.nn.Module) -> int:
    """Train the language side only: every parameter outside the language model and the LM head (vision encoder
    and projector) stops requiring gradients. Returns how many parameters were frozen."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    keep = {id(p) for p in decoder_of(inner).parameters()}
    keep |= {id(p) for p in inner.get_output_embeddings().parameters()}
    frozen = 0
    for p in inner.parameters():
        if id(p) not in keep and p.requires_grad:
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


# ----------------------------------------------------------------------------------------------------------
# Tiny random-init vision-language models (tests, benchmarks, examples): no files, no downloads
# ----------------------------------------------------------------------------------------------------------

END_TOKENS = ("<end_of_utterance>",)  # end-of-turn markers of the multimodal chat formats that are not ChatML


def vision_byte_tokenizer(family: str) -> Any:  # noqa: ANN401
    """alignkit's byte tokenizer with ``family``'s image tokens (and SmolVLM's end of turn) as special tokens."""
    from alignkit.data.byte_tokenizer import byte_tokenizer

    return byte_tokenizer([*VISION_FAMILIES[family].tokens, *END_TOKENS])


def tiny_vlm(
    family: str,
    tokenizer: Any,  # noqa: ANN401
    *,
    hidden: int = 64,
    layers: int = 2,
    vision_hidden: int = 32,
    image_size: int = 32,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> torch.nn.Module:
    """A randomly initialised vision-language model of ``family`` (``llava``: CLIP encoder + Llama; ``qwen2_vl``;
    ``idefics3``: SigLIP + Llama) sized for CPU tests; same seed -> same weights."""
    from transformers import (
        CLIPVisionConfig,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    vocab = tokenizer.get_vocab()
    text = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )  # fmt: skip
    vision = dict(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=2,
                  num_attention_heads=2, image_size=image_size, patch_size=8)  # fmt: skip
    if family == "llava":
        cfg: Any = LlavaConfig(
            vision_config=CLIPVisionConfig(**vision, projection_dim=vision_hidden),
            text_config={"model_type": "llama", **text},
            image_token_index=vocab["<image>"], vision_feature_layer=-1, vision_feature_select_strategy="default",
            image_seq_length=(image_size // 8) ** 2,
        )  # fmt: skip
        cls: Any = LlavaForConditionalGeneration
    elif family == "qwen2_vl":
        cfg = Qwen2VLConfig(
            text_config={**text, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}},
            vision_config=dict(depth=2, embed_dim=vision_hidden, hidden_size=hidden, num_heads=2, mlp_ratio=2,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
            image_token_id=vocab["<|image_pad|>"], vision_start_token_id=vocab["<|vision_start|>"],
            vision_end_token_id=vocab["<|vision_end|>"], video_token_id=vocab["<|vision_end|>"],
        )  # fmt: skip
        cls = Qwen2VLForConditionalGeneration
    elif family == "idefics3":
        cfg = Idefics3Config(
            vision_config=vision, text_config={"model_type": "llama", **text}, image_token_id=vocab["<image>"],
            scale_factor=2,
        )  # fmt: skip
        cls = Idefics3ForConditionalGeneration
    else:
        raise ValueError(f"no tiny model for vision family {family!r}; choose one of {sorted(VISION_FAMILIES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(cfg, attn_implementation=attn_implementation)
    return model
