"""pad_collate, pack_best_fit_decreasing and pack_collate: layouts and packing properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignkit.data.collate import (
    IGNORE_INDEX,
    block_causal_mask,
    pack_best_fit_decreasing,
    pack_collate,
    pad_collate,
)

PAD = 99


def _examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, 50, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX if j < n // 3 else t for j, t in enumerate(ids)]  # a masked "prompt"
        out.append({"input_ids": ids, "labels": labels, "weights": [float(j) for j in range(n)], "score": n * 0.5})
    return out


# ----------------------------------------------------------------------------------------------- pad_collate


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=5),
    multiple=st.one_of(st.none(), st.integers(1, 8)),
    side=st.sampled_from(["left", "right"]),
)
def test_pad_collate_layout(lengths, multiple, side):
    examples = _examples(lengths)
    batch = pad_collate(examples, pad_token_id=PAD, pad_to_multiple_of=multiple, padding_side=side)
    width = batch["input_ids"].shape[1]
    assert batch["input_ids"].shape == (len(lengths), width)
    assert width >= max(lengths) and width < max(lengths) + (multiple or 1)
    if multiple:
        assert width % multiple == 0
    for b, (ex, n) in enumerate(zip(examples, lengths)):
        real = slice(0, n) if side == "right" else slice(width - n, width)
        pads = slice(n, width) if side == "right" else slice(0, width - n)
        assert batch["input_ids"][b, real].tolist() == ex["input_ids"]
        assert batch["labels"][b, real].tolist() == ex["labels"]
        assert batch["weights"][b, real].tolist() == ex["weights"]
        assert batch["position_ids"][b, real].tolist() == list(range(n))
        assert batch["attention_mask"][b, real].tolist() == [1] * n
        assert (batch["input_ids"][b, pads] == PAD).all()
        assert (batch["labels"][b, pads] == IGNORE_INDEX).all()
        assert (batch["attention_mask"][b, pads] == 0).all()
        assert (batch["weights"][b, pads] == 0).all()
    assert batch["score"].tolist() == [n * 0.5 for n in lengths]
    assert batch["attention_mask"].sum().item() == sum(lengths)


def test_pad_collate_defaults_and_options():
    examples = [{"input_ids": [5, 6, 7], "mask": [1, 1, 0], "tag": "a"}, {"input_ids": [8], "mask": [1], "tag": "b"}]
    batch = pad_collate(examples, pad_token_id=0, label_pad=-1, pad_values={"mask": 7})
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -1, -1]]  # no labels -> copy of input_ids
    assert batch["mask"].tolist() == [[1, 1, 0], [1, 7, 7]]
    assert batch["tag"] == ["a", "b"]
    left = pad_collate(examples, pad_token_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    with pytest.raises(ValueError, match="padding_side"):
        pad_collate(examples, pad_token_id=0, padding_side="middle")
    with pytest.raises(ValueError, match="labels has length"):
        pad_collate([{"input_ids": [1, 2], "labels": [1]}], pad_token_id=0)


# ------------------------------------------------------------------------------------- best-fit decreasing


def _reference_bfd(lengths, capacity):
    """Readable O(n * bins) best-fit decreasing, the spec the fast version must match exactly."""
    bins, loads = [], []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        fits = [b for b in range(len(bins)) if loads[b] + lengths[i] <= capacity]
        if fits:
            best = min(fits, key=lambda b: (capacity - loads[b], b))
            bins[best].append(i)
            loads[best] += lengths[i]
        else:
            bins.append([i])
            loads.append(lengths[i])
    return bins


@st.composite
def _packing_problem(draw):
    capacity = draw(st.integers(1, 64))
    lengths = draw(st.lists(st.integers(1, capacity), max_size=40))
    return lengths, capacity


@settings(max_examples=50, deadline=None)
@given(problem=_packing_problem())
def test_bfd_properties(problem):
    lengths, capacity = problem
    bins = pack_best_fit_decreasing(lengths, capacity)
    flat = [i for b in bins for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert all(0 < load <= capacity for load in loads)
    assert bins == pack_best_fit_decreasing(list(lengths), capacity)  # deterministic
    assert bins == _reference_bfd(lengths, capacity)
    # Any-fit guarantee: a bin was only opened when its first item fit nowhere, so no two bins could be
    # merged. Hence at most one bin is at most half full, and len(bins) < 2 * sum / capacity + 1.
    for a in range(len(bins)):
        for b in range(a + 1, len(bins)):
            assert loads[a] + loads[b] > capacity
    assert len(bins) >= -(-sum(lengths) // capacity)


def test_bfd_beats_first_fit_on_a_known_case():
    # First-fit in arrival order needs 4 bins ([1,1,1,6], [6,4], [6,4], [4]); best-fit decreasing fills 3 exactly.
    lengths, capacity = [1, 1, 1, 6, 6, 6, 4, 4, 4], 11
    bins = pack_best_fit_decreasing(lengths, capacity)
    assert len(bins) == 3
    assert sorted(sum(lengths[i] for i in b) for b in bins) == [11, 11, 11]


def test_bfd_errors_name_the_example():
    with pytest.raises(ValueError, match="example 2 has length 9 > capacity 8"):
        pack_best_fit_decreasing([3, 8, 9], 8)
    with pytest.raises(ValueError, match="example 1 has length 0"):
        pack_best_fit_decreasing([3, 0], 8)
    assert pack_best_fit_decreasing([], 8) == []


# ----------------------------------------------------------------------------------------------- pack_collate


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 10), min_size=1, max_size=6))
def test_pack_collate_layout(lengths):
    examples = _examples(lengths, seed=1)
    batch = pack_collate(examples)
    total = sum(lengths)
    for key in ("input_ids", "labels", "position_ids", "document_ids", "weights"):
        assert batch[key].shape == (1, total), key
    start = 0
    for d, (ex, n) in enumerate(zip(examples, lengths)):
        sl = slice(start, start + n)
        assert batch["input_ids"][0, sl].tolist() == ex["input_ids"]
        assert batch["labels"][0, sl].tolist() == [IGNORE_INDEX, *ex["labels"][1:]]
        assert batch["position_ids"][0, sl].tolist() == list(range(n))
        assert batch["document_ids"][0, sl].tolist() == [d] * n
        assert batch["weights"][0, sl].tolist() == ex["weights"]
        assert batch["cu_seqlens"][d].item() == start
        start += n
    assert batch["cu_seqlens"].tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["seq_lens"].tolist() == lengths
    assert batch["max_seqlen"] == max(lengths)
    assert batch["score"].tolist() == [n * 0.5 for n in lengths]
    assert "attention_mask" not in batch


def test_pack_collate_capacity_and_empty():
    examples = _examples([3, 4])
    assert pack_collate(examples, capacity=7)["input_ids"].shape == (1, 7)
    with pytest.raises(ValueError, match="7 tokens > capacity 6"):
        pack_collate(examples, capacity=6)
    with pytest.raises(ValueError, match="example 1 is empty"):
        pack_collate([{"input_ids": [1]}, {"input_ids": []}])


def test_pack_collate_accepts_tensors():
    examples = [{"input_ids": torch.tensor([4, 5]), "labels": torch.tensor([4, 5])}, {"input_ids": torch.tensor([6])}]
    batch = pack_collate(examples)
    assert batch["input_ids"].tolist() == [[4, 5, 6]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 5, IGNORE_INDEX]]


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=5))
def test_block_causal_mask_matches_definition(lengths):
    doc = pack_collate(_examples(lengths))["document_ids"]
    mask = block_causal_mask(doc)
    t = doc.shape[1]
    assert mask.shape == (1, 1, t, t) and mask.dtype == torch.bool
    for q in range(t):
        for k in range(t):
            assert mask[0, 0, q, k].item() == (k <= q and doc[0, q].item() == doc[0, k].item())
    additive = block_causal_mask(doc, dtype=torch.float32)
    assert torch.equal(additive == 0, mask)
    assert (additive[~mask] == torch.finfo(torch.float32).min).all()
