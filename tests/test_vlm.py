"""Vision-language rows, tokenization, batching and SFT on tiny random-init VLMs (LLaVA, Qwen2-VL, Idefics3).

Each family is built from configs with alignkit's byte tokenizer (its image tokens added as special tokens) and
an image processor made in code; no downloads, no torchvision.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from alignkit import vision
from alignkit.data.rows import RowError, normalize_row
from alignkit.data.tokenize import tokenize_vision_rows
from alignkit.logprobs import IGNORE_INDEX
from alignkit.loops.sft import SFTConfig, train_sft
from alignkit.scoring import model_token_logps
from alignkit.templates import get_format
from tests import vlm_tasks

# (vision family, chat format whose end-of-turn marker the tokenizer holds)
FAMILIES = [("llava", "llava-1.5"), ("qwen2_vl", "qwen2.5-vl"), ("idefics3", "smolvlm")]


@pytest.fixture(scope="module", params=FAMILIES, ids=[f for f, _ in FAMILIES])
def family(request):
    fam, fmt = request.param
    tok = vision.vision_byte_tokenizer(fam)
    model = vision.tiny_vlm(fam, tok, seed=0)
    return fam, fmt, tok, model, vision.VisionProcessor.for_model(model, tok)


def _image(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _row(question: str, answer: str, n_images: int = 1, seed: int = 0) -> dict:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return {
        "images": [_image(seed + k) for k in range(n_images)],
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
    }


# ------------------------------------------------------------------------------------------------------------
# Rows: images as paths, PIL, bytes, dicts; errors name row, field and expectation
# ------------------------------------------------------------------------------------------------------------


def test_image_sources_decode_alike(tmp_path, family):
    _, fmt, tok, _, vp = family
    img = _image(3)
    path = tmp_path / "a.png"
    img.save(path)
    raw = path.read_bytes()
    forms = [str(path), img, raw, {"bytes": raw, "path": None}, {"bytes": None, "path": str(path)}, np.asarray(img)]
    outs = []
    for form in forms:
        ex, _ = tokenize_vision_rows(vp, [{**_row("q?", "a"), "images": [form]}], chat_format=fmt)
        outs.append(vp.collate(ex, tok.pad_token_id))
    for o in outs[1:]:
        assert torch.equal(o["input_ids"], outs[0]["input_ids"])
        assert torch.equal(o["pixel_values"], outs[0]["pixel_values"])


def test_relative_image_paths_are_relative_to_the_dataset_file(tmp_path, family):
    _, fmt, tok, _, vp = family
    (tmp_path / "imgs").mkdir()
    _image(1).save(tmp_path / "imgs" / "x.png")
    row = {**_row("q?", "a"), "images": ["imgs/x.png"]}
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    from alignkit.data.loading import load_rows

    ex, rep = tokenize_vision_rows(vp, load_rows(str(tmp_path / "d.jsonl")), chat_format=fmt)
    assert rep.rows == 1 and ex[0]["images"] == [str((tmp_path / "imgs" / "x.png").resolve())]


def test_bad_images_raise_naming_row_and_field(tmp_path):
    tok = vision.vision_byte_tokenizer("llava")
    vp = vision.VisionProcessor.for_model(vision.tiny_vlm("llava", tok), tok)
    rows = [_row("q", "a"), {**_row("q", "a", n_images=2), "images": ["/no/such/file.png", _image(0)]}]
    with pytest.raises(RowError, match=r"row 1, field 'images\[0\]': expected an existing image file; got no file"):
        tokenize_vision_rows(vp, rows, chat_format="llava-1.5")
    with pytest.raises(RowError, match=r"row 0, field 'images': expected 2 image\(s\), one per image part"):
        normalize_row({**_row("q", "a", n_images=2), "images": [_image(0)]}, 0)
    bad = {**_row("q", "a"), "images": [b"not an image"]}
    with pytest.raises(
        RowError, match=r"field 'images\[0\]': expected an image that decodes; got UnidentifiedImageError"
    ):
        tokenize_vision_rows(vp, [bad], chat_format="llava-1.5")
    with pytest.raises(RowError, match=r"field 'messages\[0\]\.content\[0\]\.type'"):
        normalize_row({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, 0)
    with pytest.raises(ValueError, match="text-only"):
        tokenize_vision_rows(vp, [_row("q", "a")], chat_format="chatml")


def test_truncation_through_an_image_is_refused(family):
    _, fmt, _, _, vp = family
    row = {"images": [_image(0)], "messages": [
        {"role": "user", "content": [{"type": "text", "text": "x" * 5}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "answer"}]},
    ]}  # fmt: skip
    with pytest.raises(RowError, match=r"row 0, field 'images': expected at most max_length=12 tokens without cutting"):
        tokenize_vision_rows(vp, [row], chat_format=fmt, max_length=12)


# ------------------------------------------------------------------------------------------------------------
# Tokens: what the family's own processor makes; only assistant text trained
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fam", ["llava", "idefics3"])
def test_input_ids_and_pixels_equal_the_official_processor(fam):
    fmt = dict(FAMILIES)[fam]
    tok = vision.vision_byte_tokenizer(fam)
    model = vision.tiny_vlm(fam, tok)
    vp = vision.VisionProcessor.for_model(model, tok)
    proc = vp.family.hf_processor(vp.image_processor, tok, model.config)
    row = _row("What is it?", "A cat.", n_images=2, seed=5)
    ex, _ = tokenize_vision_rows(vp, [row], chat_format=fmt)
    text = get_format(fmt).render(row["messages"]).text
    ref = proc(text=[text], images=[row["images"]], return_tensors="pt", add_special_tokens=False)
    assert ex[0]["input_ids"] == ref["input_ids"][0].tolist()
    ours = vp.collate(ex, tok.pad_token_id)
    want = ref["pixel_values"].flatten(0, 1) if fam == "idefics3" else ref["pixel_values"]
    got = ours["pixel_values"].flatten(0, 1) if fam == "idefics3" else ours["pixel_values"]
    assert torch.equal(got, want)


def test_qwen2_vl_image_tokens_follow_the_grid():
    tok = vision.vision_byte_tokenizer("qwen2_vl")
    model = vision.tiny_vlm("qwen2_vl", tok)
    vp = vision.VisionProcessor.for_model(model, tok)
    row = {**_row("q", "a", n_images=2), "images": [_image(0, (30, 30)), _image(1, (120, 30))]}
    ex, _ = tokenize_vision_rows(vp, [row], chat_format="qwen2.5-vl")
    grid = vp.process([row["images"][0], row["images"][1]])["image_grid_thw"]
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert ex[0]["input_ids"].count(pad) == int(sum(g.prod() for g in grid)) // 4
    assert grid[0].tolist() != grid[1].tolist()  # dynamic resolution: the two images differ


_words = st.text(st.sampled_from(list("abcdefgh XYZ.,?!é")), min_size=1, max_size=12).filter(lambda s: s.strip())


@st.composite
def vlm_rows(draw):
    turns = draw(st.integers(1, 3))
    images_per_turn = [draw(st.integers(0, 2)) for _ in range(turns)]
    if sum(images_per_turn) == 0:
        images_per_turn[0] = 1
    msgs, n = [], 0
    for t in range(turns):
        parts = [{"type": "image"}] * images_per_turn[t] + [{"type": "text", "text": draw(_words)}]
        msgs.append({"role": "user", "content": draw(st.permutations(parts))})
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": draw(_words)}]})
        n += images_per_turn[t]
    return {"images": [_image(k, (32 + 8 * k, 24 + 8 * k)) for k in range(n)], "messages": msgs}


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(row=vlm_rows())
def test_only_assistant_text_is_trained_never_an_image_token(family, row):
    _, fmt, tok, _, vp = family
    ex, _ = tokenize_vision_rows(vp, [row], chat_format=fmt)
    ids, labels = ex[0]["input_ids"], ex[0]["labels"]
    trained = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert not set(trained) & vp.image_token_ids()
    r = get_format(fmt).render(row["messages"])
    assert tok.decode(trained) == "".join(r.trainable_text())  # exactly the format's trainable spans
    answers = [m["content"][0]["text"] for m in row["messages"] if m["role"] == "assistant"]
    text = tok.decode(trained)
    pos = 0
    for a in answers:  # every assistant text, in order
        pos = text.index(a, pos) + len(a)
    image_slots = sum(1 for t in ids if t == vp.token_ids[vp.family.image_token])
    assert image_slots == sum(e.count(vp.family.image_token) for e in vp.expansions(row["images"]))


# ------------------------------------------------------------------------------------------------------------
# Batches: padding and packing do not change any example's log-probs
# ------------------------------------------------------------------------------------------------------------


def _per_example(model, vp, tok, examples):
    out = []
    for e in examples:
        b = vp.collate([e], tok.pad_token_id)
        labels = b.pop("labels")
        out.append(model_token_logps(model, labels=labels, **b)["logps"].sum())
    return torch.stack(out)


def test_batch_loss_equals_the_sum_of_per_example_losses(family):
    _, fmt, tok, model, vp = family
    rows = [_row("What?" * (k + 1), "ans" * (k + 1), n_images=1 + k % 2, seed=10 * k) for k in range(4)]
    rows.append({"messages": [{"role": "user", "content": [{"type": "text", "text": "no image here"}]},
                              {"role": "assistant", "content": [{"type": "text", "text": "fine"}]}]})  # fmt: skip
    ex, _ = tokenize_vision_rows(vp, rows, chat_format=fmt)
    model.eval()
    with torch.no_grad():
        single = _per_example(model, vp, tok, ex)
        b = vp.collate(ex, tok.pad_token_id)
        labels = b.pop("labels")
        padded = model_token_logps(model, labels=labels, **b)["logps"].sum(1)
        torch.testing.assert_close(padded, single, rtol=1e-5, atol=1e-4)
        if vp.family.packing:
            p = vp.pack(ex, capacity=10_000, pad_token_id=tok.pad_token_id, attn_implementation="sdpa")
            labels = p.pop("labels")
            packed = model_token_logps(model, labels=labels, **p)["logps"].sum()
            torch.testing.assert_close(packed, single.sum(), rtol=1e-5, atol=1e-3)
        else:
            with pytest.raises(ValueError, match="packing is not supported for qwen2_vl"):
                vp.pack(ex, capacity=10_000, pad_token_id=tok.pad_token_id, attn_implementation="sdpa")


# ------------------------------------------------------------------------------------------------------------
# The SFT loop: freeze_vision, packing refusal, checkpoints that reload as VLMs
# ------------------------------------------------------------------------------------------------------------


def _sft_cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=2, lr=1e-3, warmup_ratio=0.0,
                progress=False, packing=False, save_every=None)  # fmt: skip
    return SFTConfig(**{**base, **kw})


def test_sft_freeze_vision_trains_the_language_side_only(tmp_path, family):
    fam, fmt, tok, _, _ = family
    model = vision.tiny_vlm(fam, tok, seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = [_row("q?", "yes", seed=k) for k in range(4)]
    train_sft(_sft_cfg(tmp_path, chat_format=fmt, freeze_vision=True), model=model, tokenizer=tok, train_data=rows)
    lm = {id(p) for p in vision.decoder_of(model).parameters()} | {id(model.lm_head.weight)}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    names_lm = {n for n, p in model.named_parameters() if id(p) in lm}
    assert changed and changed <= names_lm  # something trained, and only the language side
    assert not any(p.requires_grad for n, p in model.named_parameters() if n not in names_lm)


def test_sft_checkpoint_reloads_as_a_vision_language_model(tmp_path, family):
    fam, fmt, tok, _, _ = family
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    model = vision.tiny_vlm(fam, tok, seed=2)
    rows = [_row("q?", "yes", seed=k) for k in range(4)]
    out = train_sft(_sft_cfg(tmp_path, chat_format=fmt), model=model, tokenizer=tok, train_data=rows)
    final = tmp_path / "run" / "final_model"
    assert out["steps"] == 2 and final.exists()
    again = AutoModelForImageTextToText.from_pretrained(final)
    assert type(again) is type(model)
    for (n, p), (_, q) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), n
    ip = AutoImageProcessor.from_pretrained(final)
    vp = vision.VisionProcessor.for_model(again, tok, ip)
    assert vp.expansions([_image(0)]) == vision.VisionProcessor.for_model(model, tok).expansions([_image(0)])
    if fam != "qwen2_vl":  # Qwen2-VL's full processor needs torchvision, absent here (its parts are saved)
        from transformers import AutoProcessor

        assert AutoProcessor.from_pretrained(final).tokenizer.get_vocab() == tok.get_vocab()


def test_sft_refuses_packing_for_qwen2_vl_with_the_reason(tmp_path):
    from alignkit.config import ConfigError

    tok = vision.vision_byte_tokenizer("qwen2_vl")
    with pytest.raises(ConfigError, match="packing=True: Qwen2-VL computes its 3-D M-RoPE positions"):
        train_sft(_sft_cfg(tmp_path, chat_format="qwen2.5-vl", packing=True), model=vision.tiny_vlm("qwen2_vl", tok),
                  tokenizer=tok, train_data=[_row("q", "a")])  # fmt: skip


def test_freeze_vision_on_a_text_model_is_refused(tmp_path):
    from alignkit.config import ConfigError
    from alignkit.data.byte_tokenizer import byte_tokenizer
    from alignkit.models import build_tiny_model, tiny_llama_config

    tok = byte_tokenizer()
    model = build_tiny_model(tiny_llama_config(len(tok), hidden=32, heads=2, kv_heads=2))
    with pytest.raises(ConfigError, match="freeze_vision=True: the model has no vision encoder"):
        rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
        train_sft(_sft_cfg(tmp_path, chat_format="chatml", freeze_vision=True), model=model, tokenizer=tok,
                  train_data=rows)  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# Learning: the images carry the answer, and SFT uses them
# ------------------------------------------------------------------------------------------------------------


def _held_out_accuracy(model, tok, held, with_image: bool) -> float:
    """Exact match by likelihood: the colour whose answer tokens the model scores highest."""
    vp = vision.VisionProcessor.for_model(model, tok)
    model.eval()
    hits = 0
    with torch.no_grad():
        for path, colour in held:
            rows = [vlm_tasks.conversation(path, c, with_image) for c in vlm_tasks.COLOURS]
            ex, _ = tokenize_vision_rows(vp, rows, chat_format="llava-1.5")
            b = vp.collate(ex, tok.pad_token_id)
            labels = b.pop("labels")
            scores = model_token_logps(model, labels=labels, **b)["logps"].sum(1)
            hits += vlm_tasks.COLOURS[int(scores.argmax())] == colour
    return hits / len(held)


@pytest.mark.skipif(not vlm_tasks.HAVE_FLAGS, reason=vlm_tasks.SKIP_REASON)
def test_sft_of_a_tiny_llava_uses_the_image(tmp_path):
    """Flags -> majority colour: the VLM's held-out exact match ends far above a text-only control trained on the
    same rows without their images (which can only learn the answers' prior)."""
    train, held = vlm_tasks.split(vlm_tasks.flag_colours())
    acc = {}
    for with_image in (True, False):
        tok = vision.vision_byte_tokenizer("llava")
        model = vision.tiny_vlm("llava", tok, seed=0)
        rows = [vlm_tasks.conversation(p, c, with_image) for p, c in train]
        cfg = _sft_cfg(tmp_path / str(with_image), chat_format="llava-1.5", max_steps=150, epochs=100, batch_size=16,
                       lr=3e-3, warmup_ratio=0.05, log_every=50)  # fmt: skip
        train_sft(cfg, model=model, tokenizer=tok, train_data=rows)
        acc[with_image] = _held_out_accuracy(model, tok, held, with_image)
    prior = max(sum(c == k for _, c in held) for k in vlm_tasks.COLOURS) / len(held)
    assert acc[False] <= prior + 0.05, acc  # the control cannot see the colour
    assert acc[True] >= 0.6 and acc[True] >= acc[False] + 0.3, (acc, prior)


def _colour_pairs(rows, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for path, colour in rows:
        prompt = vlm_tasks.conversation(path, None)
        wrong = str(rng.choice([c for c in vlm_tasks.COLOURS if c != colour]))
        out.append({"images": prompt["images"], "prompt": prompt["messages"],
                    "chosen": [{"role": "assistant", "content": [{"type": "text", "text": colour}]}],
                    "rejected": [{"role": "assistant", "content": [{"type": "text", "text": wrong}]}]})  # fmt: skip
    return out


@pytest.mark.skipif(not vlm_tasks.HAVE_FLAGS, reason=vlm_tasks.SKIP_REASON)
@pytest.mark.parametrize("loop", ["dpo", "kto"])
def test_dpo_and_kto_on_images_raise_held_out_exact_match(tmp_path, loop):
    """Preference pairs (the flag's colour over a wrong one) with a precomputed, cached reference: held-out exact
    match of a tiny LLaVA rises from chance to well above the answers' prior; a second run reads the cache, and
    other images under the same text miss it."""
    from alignkit.loops.dpo import DPOConfig, train_dpo
    from alignkit.loops.kto import KTOConfig, train_kto

    train, held = vlm_tasks.split(vlm_tasks.flag_colours())
    rows = _colour_pairs(train)
    tok = vision.vision_byte_tokenizer("llava")
    model = vision.tiny_vlm("llava", tok, seed=0)
    before = _held_out_accuracy(model, tok, held, True)
    Config, run = (DPOConfig, train_dpo) if loop == "dpo" else (KTOConfig, train_kto)
    base = dict(max_steps=100, epochs=100, batch_size=16, lr=3e-3, warmup_ratio=0.05, progress=False, save_every=None,
                chat_format="llava-1.5", log_every=50, reference_cache_dir=str(tmp_path / "cache"))  # fmt: skip
    out = run(Config(output_dir=str(tmp_path / "a"), **base), model=model, tokenizer=tok, train_data=rows)
    after = _held_out_accuracy(model, tok, held, True)
    prior = max(sum(c == k for _, c in held) for k in vlm_tasks.COLOURS) / len(held)
    assert out["reference"]["cache_hit"] is False
    assert after >= prior + 0.1 and after >= before + 0.2, (before, after, prior)
    small = dict(base, max_steps=1)
    again = run(Config(output_dir=str(tmp_path / "b"), **small), model=vision.tiny_vlm("llava", tok, seed=0),
                tokenizer=tok, train_data=rows)  # fmt: skip
    assert again["reference"]["cache_hit"] is True
    swapped = [dict(r, images=[rows[(k + 1) % len(rows)]["images"][0]]) for k, r in enumerate(rows)]
    other = run(Config(output_dir=str(tmp_path / "c"), **small), model=vision.tiny_vlm("llava", tok, seed=0),
                tokenizer=tok, train_data=swapped)  # fmt: skip
    assert other["reference"]["cache_hit"] is False and other["reference"]["key"] != again["reference"]["key"]


def _first_word_is_answer(completions, answer, **kw):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if (t.strip().split() or [""])[0] == a else 0.0 for t, a in zip(texts, answer)]


@pytest.mark.skipif(not vlm_tasks.HAVE_FLAGS, reason=vlm_tasks.SKIP_REASON)
def test_grpo_on_images_raises_the_reward(tmp_path):
    """GRPO with images on the HF backend after a short SFT warm start: the mean reward (the flag's colour named
    first) rises and ends well above what the answers' prior allows, so the sampled answers use the image."""
    from alignkit.loops.grpo import GRPOConfig, train_grpo
    from alignkit.metrics import read_metrics

    train, held = vlm_tasks.split(vlm_tasks.flag_colours())
    tok = vision.vision_byte_tokenizer("llava")
    model = vision.tiny_vlm("llava", tok, seed=0)
    warm = _sft_cfg(tmp_path / "sft", chat_format="qwen2.5-vl", max_steps=80, epochs=100, batch_size=16, lr=3e-3,
                    warmup_ratio=0.05, log_every=100)  # fmt: skip
    train_sft(warm, model=model, tokenizer=tok, train_data=[vlm_tasks.conversation(p, c) for p, c in train])
    rows = [{**vlm_tasks.conversation(p, None), "answer": c} for p, c in train]
    cfg = GRPOConfig(output_dir=str(tmp_path / "rl"), max_steps=60, group_size=8, prompts_per_step=16, lr=1e-3,
                     max_new_tokens=6, progress=False, save_every=None, chat_format="qwen2.5-vl", log_every=1,
                     warmup_ratio=0.0, micro_batch_size=64, log_completions_every=0,
                     stop_tokens=["<|im_end|>"])  # fmt: skip
    train_grpo(cfg, model=model, tokenizer=tok, train_data=rows, reward_funcs=[_first_word_is_answer])
    rewards = [r["reward"] for r in read_metrics(tmp_path / "rl")]
    assert len(rewards) == 60
    first, last = np.mean(rewards[:10]), np.mean(rewards[-10:])
    prior = max(sum(c == k for _, c in train) for k in vlm_tasks.COLOURS) / len(train)
    assert last >= first + 0.1 and last >= prior + 0.2, (first, last, prior)


def test_shared_prompt_scoring_with_images_equals_padded_rows(family):
    """GRPO's scoring: a group's prompt (and its images) run once, same log-probs as padded prompt+completion rows;
    two prompts with the same tokens but other images are not merged."""
    from alignkit.data.prompts import load_prompts
    from alignkit.scoring import completion_logps

    fam, fmt, tok, model, vp = family
    rows = [{**_row("same question", "x", seed=1), "messages": _row("same question", "x")["messages"][:1]},
            {**_row("same question", "x", seed=2), "messages": _row("same question", "x")["messages"][:1]}]  # fmt: skip
    prompts = load_prompts(rows, tok, chat_format=fmt, vision=vp)
    assert prompts[0].ids == prompts[1].ids  # the images differ, the tokens do not
    p_ids = [prompts[0].ids] * 2 + [prompts[1].ids] * 2
    images = [prompts[0].images] * 2 + [prompts[1].images] * 2
    comps = [[65, 66, 67], [68, 69], [65, 66, 67], [70]]
    model.eval()
    with torch.no_grad():
        kw = dict(images=images, vision=vp, pad_id=tok.pad_token_id)
        shared = completion_logps(model, p_ids, comps, shared_prefix=True, **kw)
        padded = completion_logps(model, p_ids, comps, shared_prefix=False, **kw)
    torch.testing.assert_close(shared["logps"], padded["logps"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(padded["logps"][0], padded["logps"][2])  # other image, other log-probs


@pytest.mark.parametrize("fam", ["llava", "idefics3"])
def test_hf_generation_with_images_never_samples_an_image_token(fam):
    from alignkit.data.prompts import load_prompts
    from alignkit.rollout.hf import HFGenerator

    tok = vision.vision_byte_tokenizer(fam)
    model = vision.tiny_vlm(fam, tok, seed=3)
    vp = vision.VisionProcessor.for_model(model, tok)
    rows = [{**_row("q?", "a", seed=k), "messages": _row("q?", "a")["messages"][:1]} for k in range(3)]
    prompts = load_prompts(rows, tok, chat_format=dict(FAMILIES)[fam], vision=vp)
    # bias the head towards the image token: unsuppressed, greedy decoding would pick it every step
    with torch.no_grad():
        model.lm_head.weight[vp.token_ids[vp.family.image_token]] += 50.0
    gen = HFGenerator(model, tok.pad_token_id, vision=vp)
    ro = gen.generate(
        [p.ids for p in prompts], n=2, max_new_tokens=5, temperature=0.0, images=[p.images for p in prompts]
    )
    assert len(ro.completion_ids) == 6 and all(len(c) == 5 for c in ro.completion_ids)
    assert not {t for c in ro.completion_ids for t in c} & vp.image_token_ids()
    with pytest.raises(ValueError, match="prompts with images need a generator made with the model's VisionProcessor"):
        HFGenerator(model, tok.pad_token_id).generate(
            [prompts[0].ids], n=1, max_new_tokens=2, images=[prompts[0].images]
        )


def test_rl_refuses_what_vision_models_cannot_do_yet(tmp_path):
    from alignkit.loops.grpo import GRPOConfig, train_grpo

    tok = vision.vision_byte_tokenizer("llava")
    cfg = GRPOConfig(output_dir=str(tmp_path / "rl"), max_steps=1, async_rollout=True, progress=False)
    with pytest.raises(ValueError, match="vision-language models generate with the hf backend, synchronously"):
        train_grpo(cfg, model=vision.tiny_vlm("llava", tok), tokenizer=tok, train_data=[{"prompt": "x"}],
                   reward_funcs=[_first_word_is_answer])  # fmt: skip


def test_sampler_logprobs_with_images_equal_the_models_own_forward(family):
    """Generation with images (left-padded prompts, KV cache, rows leaving as they stop; Qwen2-VL's M-RoPE positions
    carried per row) scores each sampled token as the model's own full forward over prompt + completion does (its
    positions laid out by the model itself), with the image tokens suppressed in both."""
    from alignkit.data.prompts import load_prompts
    from alignkit.rollout.hf import HFGenerator

    fam, fmt, tok, model, vp = family
    rows = []
    for k in range(3):  # prompts of different lengths and image sizes
        r = _row("why?" * (k + 1), "x", n_images=1 + k % 2, seed=30 + k)
        r["images"] = [_image(30 + j, (32 + 16 * k, 28 + 8 * j)) for j in range(len(r["images"]))]
        rows.append({**r, "messages": r["messages"][:1]})
    prompts = load_prompts(rows, tok, chat_format=fmt, vision=vp)
    gen = HFGenerator(model, tok.pad_token_id, vision=vp)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ro = gen.generate([p.ids for p in prompts], n=2, max_new_tokens=6, temperature=1.0, seed=7,
                      images=[p.images for p in prompts], stop_token_ids=[eos, *range(100)])  # fmt: skip
    assert len({len(c) for c in ro.completion_ids}) > 1  # some rows stopped early
    examples = [{"input_ids": p + c, "labels": p + c, "images": prompts[i // 2].images}
                for i, (p, c) in enumerate(zip(ro.prompt_ids, ro.completion_ids))]  # fmt: skip
    batch = vp.collate(examples, tok.pad_token_id)
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits.float()
    logits[..., sorted(vp.image_token_ids())] = float("-inf")
    logps = torch.log_softmax(logits, -1)
    for i, (p, c) in enumerate(zip(ro.prompt_ids, ro.completion_ids)):
        want = logps[i, len(p) - 1 : len(p) + len(c) - 1].gather(1, torch.tensor(c)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(ro.logprobs[i]), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fam", ["idefics3", "qwen2_vl"])
def test_rloo_runs_on_images(tmp_path, fam):
    from alignkit.loops.rloo import RLOOConfig, train_rloo

    tok = vision.vision_byte_tokenizer(fam)
    model = vision.tiny_vlm(fam, tok, seed=0)
    rows = [{**_row("colour?", "x", seed=k), "messages": _row("colour?", "x")["messages"][:1], "answer": "red"}
            for k in range(4)]  # fmt: skip
    cfg = RLOOConfig(output_dir=str(tmp_path / "rl"), max_steps=2, group_size=2, prompts_per_step=2, max_new_tokens=4,
                     progress=False, chat_format=dict(FAMILIES)[fam], log_completions_every=1,
                     kl_coef=0.05)  # fmt: skip
    out = train_rloo(cfg, model=model, tokenizer=tok, train_data=rows, reward_funcs=[_first_word_is_answer])
    assert out["steps"] == 2 and (tmp_path / "rl" / "final_model").exists()


def test_dpo_pairs_run_each_image_through_the_vision_encoder_once(family):
    """chosen and rejected share their prompt's image features: one encoder pass per image, the same per-sequence
    log-probs (and encoder gradients) as running every sequence's images through it."""
    from alignkit.data.preference import collate_pairs, tokenize_pairs
    from alignkit.scoring import batch_sequence_logps

    fam, fmt, tok, model, vp = family
    pairs = []
    for k in range(3):
        prompt = _row(f"question {k}?", "x", n_images=1 + k % 2, seed=20 + k)
        pairs.append({"images": prompt["images"], "prompt": prompt["messages"][:1],
                      "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "yes" * (k + 1)}]}],
                      "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "no"}]}]})  # fmt: skip
    ex, _ = tokenize_pairs(tok, pairs, chat_format=fmt, vision=vp)
    once = collate_pairs(ex, pad_token_id=tok.pad_token_id, vision=vp)
    assert once["vision_inputs"]["vision_repeat"] == 2
    twice = dict(once, vision_inputs=dict(once["vision_inputs"]))
    twice["vision_inputs"].pop("vision_repeat")
    full = vp.batch_inputs([vision_image for p in pairs for vision_image in p["images"]] * 2, once["input_ids"])
    twice["vision_inputs"].update({k: v for k, v in full.items() if k != "mm_token_type_ids"})
    encoder = vision.vision_backbone(model).get_image_features
    calls = []
    tower = next(
        m for n, m in vision.vision_backbone(model).named_children() if n in ("vision_tower", "visual", "vision_model")
    )

    def count(mod, args, kwargs):  # noqa: ANN001, ANN202 - images (or patches) entering the encoder
        x = args[0] if args else kwargs.get("pixel_values", kwargs.get("hidden_states"))
        calls.append(x.shape[0])

    handle = tower.register_forward_pre_hook(count, with_kwargs=True)
    model.eval()
    try:
        grads = []
        for batch in (once, twice):
            calls.clear()
            model.zero_grad()
            res = batch_sequence_logps(model, batch)
            res["sum"].sum().backward()
            grads.append({n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None})
            if batch is once:
                sums, n_once = res["sum"].detach(), sum(calls)
            else:
                torch.testing.assert_close(res["sum"].detach(), sums, rtol=1e-5, atol=1e-4)
                n_twice = sum(calls)
        assert encoder is not None and n_once > 0 and 2 * n_once == n_twice  # each image (its patches) once
        for name in grads[0]:
            torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5)
    finally:
        handle.remove()
        model.zero_grad()


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["all-linear"]])
def test_lora_on_a_vlm_adapts_the_language_model_only(tmp_path, targets):
    tok = vision.vision_byte_tokenizer("llava")
    model = vision.tiny_vlm("llava", tok, seed=4)
    rows = [_row("q?", "yes", seed=k) for k in range(4)]
    cfg = _sft_cfg(tmp_path, chat_format="llava-1.5", lora_r=4, lora_targets=targets)
    train_sft(cfg, model=model, tokenizer=tok, train_data=rows)
    adapted = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
    assert adapted and all(".language_model." in n for n in adapted), adapted
    assert any("vision_tower" in n for n, _ in model.named_modules())  # the encoder is there, unadapted


@pytest.mark.parametrize("fam", ["llava", "idefics3"])
def test_cli_sft_on_a_saved_vlm_and_jsonl_with_relative_image_paths(tmp_path, fam):
    """The user's path: a model folder (model + tokenizer + processor), a jsonl with images beside it, the CLI."""
    from alignkit.cli import main

    tok = vision.vision_byte_tokenizer(fam)
    model = vision.tiny_vlm(fam, tok, seed=5)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    vision.VisionProcessor.for_model(model, tok).save_pretrained(folder)
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    lines = []
    for k in range(4):
        _image(k).save(tmp_path / "data" / "imgs" / f"{k}.png")
        lines.append(json.dumps({**_row("Which?", f"answer {k}"), "images": [f"imgs/{k}.png"]}))
    (tmp_path / "data" / "train.jsonl").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    argv = ["sft", f"model={folder}", f"dataset={tmp_path / 'data' / 'train.jsonl'}", f"output_dir={run}",
            f"chat_format={dict(FAMILIES)[fam]}", "max_steps=2", "batch_size=2", "progress=false"]  # fmt: skip
    assert main(argv) == 0
    from transformers import AutoModelForImageTextToText, AutoProcessor

    assert type(AutoModelForImageTextToText.from_pretrained(run / "final_model")) is type(model)
    assert AutoProcessor.from_pretrained(run / "final_model").image_processor.to_dict() == (
        AutoProcessor.from_pretrained(folder).image_processor.to_dict()
    )
