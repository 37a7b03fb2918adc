"""A byte-level tokenizer built in code: no files, no downloads, exact round trip for any unicode string.

Token id ``b`` (0..255) is the UTF-8 byte ``b``; ids 256.. are the special tokens ``<|endoftext|>`` (eos and
pad), ``<|im_start|>``, ``<|im_end|>`` and any extra ones, in that order. It is a real
``transformers.PreTrainedTokenizerFast`` (offsets, chat template, ``save_pretrained``/``from_pretrained``), so code
and tests that run on it run unchanged on a real model's tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END)

# ChatML with no default system prompt. The {% generation %} markers change nothing in the render; they let
# `apply_chat_template(..., return_assistant_tokens_mask=True)` mark the assistant spans (content + <|im_end|>).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_to_char() -> dict[int, str]:
    """The GPT-2 byte -> printable-character table that tokenizers' ByteLevel pre-tokenizer/decoder use.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to chr(256 + k) in byte order.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    for k, b in enumerate(shifted):
        table[b] = chr(256 + k)
    return table


def byte_tokenizer(extra_special_tokens: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """Build the byte-level ChatML tokenizer (vocab 256 bytes + 3 specials + extras).

    No normalizer (so no NFC/NFKC rewriting) and a BPE model with zero merges: every UTF-8 byte is one token,
    hence ``decode(encode(s)) == s`` for every string. Special tokens are atomic added tokens; offsets are
    character offsets into the input (all bytes of a multi-byte character share that character's span).
    """
    byte_to_char = _byte_to_char()
    vocab = {char: byte for byte, char in byte_to_char.items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: with no merges the GPT-2 word split would only cost time.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    # trim_offsets=False: trimming would shrink the span of a lone space token to an empty one.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)

    extras = [t for t in (extra_special_tokens or ()) if t not in SPECIAL_TOKENS]
    specials = [*SPECIAL_TOKENS, *dict.fromkeys(extras)]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        extra_special_tokens=specials[1:],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
