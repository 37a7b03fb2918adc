"""Bounded packed rows ([R, L], sdpa/eager): logits equal per-document forwards; padding never trained."""

from __future__ import annotations

import pytest
import torch

from alignkit.data.collate import pack_rows, packed_forward_kwargs
from alignkit.models import build_tiny_model, tiny_llama_config


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_pack_rows_matches_unpacked(impl):
    torch.manual_seed(0)
    model = build_tiny_model(tiny_llama_config(97, hidden=32, layers=2, heads=2, kv_heads=2), attn_implementation=impl)
    lengths = [7, 3, 12, 1, 5, 9, 4, 2]
    docs = [{"input_ids": torch.randint(0, 97, (n,)).tolist()} for n in lengths]
    b = pack_rows(docs, capacity=16, pad_token_id=0)
    assert b["n_rows"] >= 3 and b["input_ids"].shape[1] <= 16
    kw = packed_forward_kwargs(b, impl)
    with torch.no_grad():
        packed = model(**kw).logits
        seen = 0
        for r in range(b["input_ids"].shape[0]):
            row_docs = b["document_ids"][r]
            for d in row_docs.unique().tolist():
                sel = row_docs == d
                ids = b["input_ids"][r][sel]
                alone = model(input_ids=ids[None]).logits[0]
                torch.testing.assert_close(packed[r][sel], alone, atol=1e-5, rtol=1e-5)
                seen += 1
    real = sum(lengths)
    padding = b["n_rows"] * b["input_ids"].shape[1] - real
    assert seen >= len(docs) and (padding == 0 or seen > len(docs)), seen
    # labels: every document's first token and all padding are ignored
    assert int((b["labels"] != -100).sum()) == sum(n - 1 for n in lengths)
