"""Rows -> tokens: row formats, tokenization with loss masks, collation and packing."""

from alignkit.data.rows import RowError, Sample, normalize_row
from alignkit.data.tokenize import (
    IGNORE_INDEX,
    TokenizeReport,
    tokenize_batch_fn,
    tokenize_conversation,
    tokenize_dataset,
    tokenize_rows,
)

__all__ = [
    "IGNORE_INDEX",
    "RowError",
    "Sample",
    "TokenizeReport",
    "normalize_row",
    "tokenize_batch_fn",
    "tokenize_conversation",
    "tokenize_dataset",
    "tokenize_rows",
]
