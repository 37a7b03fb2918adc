"""Conversations per second: alignkit's SFT tokenization vs TRL 1.16's SFTTrainer preparation (assistant-only loss).

    /work/venvs/dev/bin/python benchmarks/tokenize_vs_trl.py [--n 2000] [--repeats 3] [--rust-threads]

Needs the bench extra (trl==1.16.0, accelerate) and the shared fixtures ($ALIGNKIT_SHARED, else ../shared next
to the repo): data/ for the conversations, conformance/ for the tokenizer and the official Qwen2.5 template.

Workload: 2,000 real conversations from shared/data, in order: alpaca_cleaned_1000 (1,000, single turn),
dolly_subset (151, single turn), fastchat_dummy_conversation (500, 1-3 turns), hh_rlhf_harmless prompt + chosen
(349, 1-12 turns). Tokenizer: the real Qwen2 BPE tokenizer of the conformance kit with the official Qwen2.5 chat
template (byte-identical to trl/chat_templates/qwen2_5.jinja); no truncation.

What is compared (one process; the Rust tokenizer's thread pool is off unless --rust-threads):
- alignkit `tokenize_rows(tok, rows, chat_format="qwen2.5")`: render in Python, one batched tokenizer call with
  offsets, labels from character spans.
- alignkit `tokenize_dataset(Dataset, tok, chat_format="qwen2.5")`: the same in `datasets.map(batched=True)`.
- TRL per example: the SFTTrainer's own preparation for a conversational row with `assistant_only_loss=True`,
  i.e. `trl.data_utils._tokenize(tok, messages, return_assistant_tokens_mask=True, chat_template=...)` (which is
  `tokenizer.apply_chat_template(..., tokenize=True, return_dict=True, return_assistant_tokens_mask=True)`), then
  its `build_labels` rule, in a plain loop. The template is what SFTTrainer swaps in, found by TRL's own
  `get_training_chat_template(tok)` (trl/chat_templates/qwen2_5_training.jinja, with `{% generation %}` markers).
- TRL `SFTTrainer._prepare_dataset` itself (called unbound on a stand-in `self`): the same per-example steps as
  two `datasets.map` passes. Its output is asserted equal to the per-example loop's.

Same tokens, same mask: input_ids are asserted identical on every conversation. TRL's shipped training template
puts `{% generation %}` around `'\\n' + content + '<|im_end|>\\n'`, so it also trains the newline after the
`assistant` header and the one after `<|im_end|>`; alignkit (like its spec) trains content through `<|im_end|>`
only. The script asserts alignkit's trained set is TRL's minus exactly such newline tokens, and, for an exact
check, runs TRL's same code path with a generation-marked template that puts the markers where alignkit's spans
are (`EXACT_TEMPLATE` below, asserted to render the same text): labels are asserted identical on every
conversation, and that variant is timed too.

Last measured (2026-11-27; 2,000 conversations, 320,214 tokens, 190,457 trained; 2 CPU cores shared with
other jobs, load average ~5, so wall times swing up to 2x between runs and process CPU time is the steadier
signal; medians of 3; Rust thread pool off):

| path                                  | wall s | CPU s | conv/s | vs TRL per-example (wall / CPU) |
|---------------------------------------|--------|-------|--------|---------------------------------|
| alignkit tokenize_rows                | 2.77   | 1.19  | 722    | 1.64x / 1.86x                   |
| alignkit tokenize_dataset (map)       | 3.12   | 1.42  | 641    | 1.45x / 1.57x                   |
| TRL per-example, shipped template     | 4.53   | 2.22  | 441    | 1.00x / 1.00x                   |
| TRL per-example, alignkit-marked tmpl | 3.67   | 1.81  | 544    | 1.23x / 1.23x                   |
| TRL SFTTrainer._prepare_dataset (map) | 5.96   | 2.68  | 335    | 0.76x / 0.83x                   |
| floor: Rust encode_batch of the texts | 1.51   | 0.74  | 1321   | 2.99x / 3.01x                   |

tokenize_dataset vs _prepare_dataset: 1.91x wall, 1.89x CPU. (A previous run: tokenize_rows 1.92x / 1.62x,
tokenize_dataset 2.06x / 2.41x.) The 2x goal is NOT met by tokenize_rows single-threaded. The Rust BPE
encode, which both pay, is ~60 % of alignkit's time; rendering is ~3 % unprofiled (0.04 CPU s for all 2,000).
Most of alignkit's remaining overhead is the per-token label mapping (np.asarray over the offset tuples, the
cumulative character mask, counting trained tokens twice per row with a Python generator); labels taken from
`Encoding.char_to_token` at span boundaries instead gave identical labels on all 2,000 rows at 0.71 CPU s,
against 1.03 for tokenize_rows and 2.2 for TRL, in a separate experiment. TRL: the same encode ~50 %, Jinja
~20 %, its per-token offsets -> mask loop ~12 %, transformers' per-call overhead the rest.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any

from _common import REPO, load_conversations, median, print_table, shared_dir, time_interleaved, time_once

FORMAT = "qwen2.5"

# TRL's qwen2_5_training.jinja for tool-free conversations, with {% generation %} moved to alignkit's
# trainable span: assistant content through <|im_end|>, not the newlines around it.
EXACT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{%- generation %}{{- message.content + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- elif message.role == 'user' or not loop.first %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def trl_prepare_example(tok: Any, example: dict[str, Any], chat_template: str) -> dict[str, list[int]]:
    """SFTTrainer._prepare_dataset's `tokenize_fn` (language-modeling, conversational branch) followed by its
    `build_labels`, for one row. Those two are closures inside the method, so their bodies are restated here
    around TRL's importable `_tokenize`; the result is checked against the method itself."""
    import json

    from trl.data_utils import _tokenize

    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    kwargs = {"chat_template": chat_template, "tools": tools, **example.get("chat_template_kwargs", {})}
    processed = _tokenize(tok, example["messages"], return_assistant_tokens_mask=True, **kwargs)
    ids, mask = processed["input_ids"], processed["assistant_masks"]
    if 1 not in mask:
        raise RuntimeError("TRL would refuse this row: no assistant tokens")
    return {"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]}


def trl_prepare_dataset(dataset: Any, tok: Any, chat_template: str, tmp: Path) -> Any:
    """TRL's own `SFTTrainer._prepare_dataset`, called unbound on a stand-in for the trainer (it reads only
    these three attributes), with the config SFTTrainer would use for assistant-only loss, no truncation."""
    from trl import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer

    with warnings.catch_warnings():  # deprecation notices about unrelated TrainingArguments fields
        warnings.simplefilter("ignore")
        cfg = SFTConfig(
            output_dir=str(tmp),
            assistant_only_loss=True,
            max_length=None,
            packing=False,
            dataset_num_proc=None,
            shuffle_dataset=False,
            use_cpu=True,
            bf16=False,
            report_to="none",
        )
    fake = types.SimpleNamespace(_tokenizer=tok, chat_template=chat_template, completion_only_loss=False)
    return SFTTrainer._prepare_dataset(fake, dataset, tok, cfg, packing=False, formatting_func=None, dataset_name="x")


def check_same(tok: Any, rows: list, ak: list[dict], trl_shipped: list[dict], trl_exact: list[dict]) -> None:
    """Assert identical input_ids everywhere, identical labels against the alignkit-marked template, and labels
    that differ from TRL's shipped template only by the newline tokens its wider generation block covers."""
    is_newline: dict[int, bool] = {}
    n = len(rows)
    same_ids = sum(a["input_ids"] == b["input_ids"] == c["input_ids"] for a, b, c in zip(ak, trl_shipped, trl_exact))
    same_exact = sum(a["labels"] == c["labels"] for a, c in zip(ak, trl_exact))
    same_shipped = 0
    extra_tokens = 0
    for k, (a, b) in enumerate(zip(ak, trl_shipped)):
        for t, la, lb in zip(a["input_ids"], a["labels"], b["labels"]):
            if la != lb:
                # alignkit trains a subset of TRL's tokens; the difference is newline tokens only.
                if t not in is_newline:
                    is_newline[t] = set(tok.decode([t])) <= {"\n"}
                assert la == -100 and lb == t and is_newline[t], f"row {k}: token {tok.decode([t])!r} differs"
                extra_tokens += 1
        same_shipped += a["labels"] == b["labels"]
    turns = sum(sum(m["role"] == "assistant" for m in r["messages"]) for r in rows)
    print(f"identical input_ids (alignkit / TRL shipped / TRL alignkit-marked): {same_ids}/{n}")
    print(f"identical labels, alignkit vs TRL with the alignkit-marked template:  {same_exact}/{n}")
    print(
        f"identical labels, alignkit vs TRL shipped qwen2_5_training template: {same_shipped}/{n}; "
        f"the rest differ only by {extra_tokens} newline tokens TRL also trains ({turns} assistant turns)"
    )
    assert same_ids == n and same_exact == n, "alignkit and TRL disagree; the comparison would not be fair"


def _stat(stats: pstats.Stats, func: str, file_end: str = "", cumulative: bool = True) -> float:
    """Summed time of the profiled functions named `func` (builtins match by substring, e.g. "encode_batch")."""
    k = 3 if cumulative else 2
    return sum(
        v[k]
        for (f, _, fn), v in stats.stats.items()  # type: ignore[attr-defined]
        if (fn == func and f.endswith(file_end)) or (f == "~" and func in fn)
    )


# (label, function name, file suffix, cumulative?) per path; indentation marks parts of the line above.
_PARTS = {
    "alignkit tokenize_rows": [
        ("render (Python chat format)", "_render_sample", "alignkit/data/tokenize.py", True),
        ("char mask from spans", "_trainable_char_mask", "alignkit/data/tokenize.py", True),
        ("tokenizer call", "__call__", "tokenization_utils_base.py", True),
        ("  Rust encode_batch", "encode_batch", "", False),
        ("  transformers Encoding -> lists", "_convert_encoding", "tokenization_utils_tokenizers.py", True),
        ("offsets -> labels (numpy)", "_labels_from_offsets", "alignkit/data/tokenize.py", True),
        ("normalize_row (row checks)", "normalize_row", "alignkit/data/rows.py", True),
        ("Encoded.num_trained_tokens (x2/row)", "num_trained_tokens", "alignkit/data/tokenize.py", True),
    ],
    "TRL per-example": [
        ("apply_chat_template", "apply_chat_template", "tokenization_utils_base.py", True),
        ("  Jinja render + generation indices", "render_jinja_template", "chat_template_utils.py", True),
        ("  tokenizer call", "__call__", "tokenization_utils_base.py", True),
        ("    Rust encode_batch", "encode_batch", "", False),
        ("  own lines (offsets -> assistant mask loop)", "apply_chat_template", "tokenization_utils_base.py", False),
    ],
}


def profile_breakdown(fns: dict[str, Any]) -> None:
    """Where the time goes, by cProfile. The profiler inflates Python-heavy parts, not the Rust call."""
    rows = []
    for name, fn in fns.items():
        prof = cProfile.Profile()
        prof.enable()
        fn()
        prof.disable()
        st = pstats.Stats(prof)
        total = max(v[3] for v in st.stats.values())  # type: ignore[attr-defined]
        rows.append([name, "TOTAL (profiled)", f"{total:.2f}", "100%"])
        for label, func, file_end, cumulative in _PARTS[name]:
            t = _stat(st, func, file_end, cumulative)
            rows.append(["", label, f"{t:.2f}", f"{100 * t / total:.0f}%"])
        rust = _stat(st, "encode_batch", cumulative=False)
        rows.append(
            ["", "everything but Rust encode_batch", f"{total - rust:.2f}", f"{100 * (total - rust) / total:.0f}%"]
        )
    print_table(["path", "part", "s", "share"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="conversations (default 2000)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per variant, after one checked run")
    ap.add_argument("--rust-threads", action="store_true", help="let the Rust tokenizer use its thread pool")
    ap.add_argument("--no-profile", action="store_true", help="skip the cProfile breakdown")
    args = ap.parse_args()

    os.environ["TOKENIZERS_PARALLELISM"] = "true" if args.rust_threads else "false"
    shared = shared_dir("data", "conformance")
    os.environ["ALIGNKIT_SHARED"] = str(shared)  # so tests/conformance_kit.py reads the same folder
    t_start = time.perf_counter()
    sys.path.insert(0, str(REPO))
    try:
        import trl
        from trl.chat_template_utils import get_training_chat_template, has_generation_markers
    except ImportError:
        sys.exit("trl is not installed: run with the bench venv (pip install -e '.[bench]')")
    import datasets
    import transformers

    from alignkit.data import tokenize_dataset, tokenize_rows
    from alignkit.templates import get_format
    from tests.conformance_kit import load_tokenizer, template_text

    datasets.disable_progress_bars()
    datasets.disable_caching()
    transformers.logging.set_verbosity_error()

    rows, counts = load_conversations(shared, args.n)
    tok = load_tokenizer("qwen2")
    tok.chat_template = template_text(FORMAT)
    shipped_equal = tok.chat_template == (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    trl_template = get_training_chat_template(tok)
    assert trl_template is not None and has_generation_markers(trl_template)
    fmt = get_format(FORMAT)
    for r in rows:  # the exact-mask template must be the same text as alignkit's render (hence as Qwen2.5's)
        assert tok.apply_chat_template(r["messages"], tokenize=False, chat_template=EXACT_TEMPLATE) == (
            fmt.render(r["messages"]).text
        )
    dataset = datasets.Dataset.from_list(rows)
    texts = [fmt.render(r["messages"]).text for r in rows]
    backend = tok.backend_tokenizer
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "alignkit_bench_sft"

    turns = [sum(m["role"] == "assistant" for m in r["messages"]) for r in rows]
    print(f"trl {trl.__version__}, transformers {transformers.__version__}, datasets {datasets.__version__}")
    print(f"{len(rows)} conversations: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"assistant turns per conversation: mean {sum(turns) / len(turns):.2f}, max {max(turns)}")
    print(
        f"tokenizer: conformance qwen2 ({type(tok).__name__}), chat template: official {FORMAT}"
        f" ({'==' if shipped_equal else '!='} trl/chat_templates/qwen2_5.jinja); TRL swaps in its training template"
    )
    print(f"Rust tokenizer thread pool: {'on' if args.rust_threads else 'off'}\n")

    variants = {
        "alignkit tokenize_rows": lambda: tokenize_rows(tok, rows, chat_format=FORMAT, train_on="assistant")[0],
        "alignkit tokenize_dataset (map)": lambda: tokenize_dataset(dataset, tok, chat_format=FORMAT)[0],
        "TRL per-example, shipped template": lambda: [trl_prepare_example(tok, r, trl_template) for r in rows],
        "TRL per-example, alignkit-marked tmpl": lambda: [trl_prepare_example(tok, r, EXACT_TEMPLATE) for r in rows],
        "TRL SFTTrainer._prepare_dataset (map)": lambda: trl_prepare_dataset(dataset, tok, trl_template, tmp),
        # Reference, not a pipeline: the Rust BPE alone on the final texts, a floor both paths pay.
        "floor: Rust encode_batch of the texts": lambda: backend.encode_batch(texts, add_special_tokens=False),
    }

    # One checked (untimed, warm-up) run of every variant.
    out = {k: time_once(fn)[2] for k, fn in variants.items()}
    ak = out["alignkit tokenize_rows"]
    ak_ds = out["alignkit tokenize_dataset (map)"]
    assert len(ak) == len(rows), "alignkit dropped rows"
    assert list(ak_ds["input_ids"]) == [e["input_ids"] for e in ak] and list(ak_ds["labels"]) == [
        e["labels"] for e in ak
    ]
    trl_ds = out["TRL SFTTrainer._prepare_dataset (map)"]
    trl_loop = out["TRL per-example, shipped template"]
    assert list(trl_ds["input_ids"]) == [e["input_ids"] for e in trl_loop], "per-example replica != SFTTrainer's"
    assert list(trl_ds["labels"]) == [e["labels"] for e in trl_loop], "per-example replica != SFTTrainer's"
    print("SFTTrainer._prepare_dataset == per-example replica on every conversation; tokenize_dataset == tokenize_rows")
    check_same(tok, rows, ak, trl_loop, out["TRL per-example, alignkit-marked tmpl"])
    n_tokens = sum(len(e["input_ids"]) for e in ak)
    trained = sum(e["num_trained_tokens"] for e in ak)
    print(f"{n_tokens:,} tokens, {trained:,} trained (alignkit convention)\n")

    times = time_interleaved(variants, args.repeats)
    med = {k: {m: median(v[m]) for m in ("wall", "cpu")} for k, v in times.items()}
    ref = med["TRL per-example, shipped template"]
    table = []
    for k, m in med.items():
        runs = ", ".join(f"{t:.2f}" for t in times[k]["wall"])
        ratio = f"{ref['wall'] / m['wall']:.2f}x / {ref['cpu'] / m['cpu']:.2f}x"
        table.append([k, f"{m['wall']:.2f}", f"{m['cpu']:.2f}", runs, f"{len(rows) / m['wall']:.0f}", ratio])
    print(f"Medians of {args.repeats} runs, {len(rows)} conversations (wall-clock and process CPU seconds):")
    print_table(["path", "wall s", "CPU s", "wall runs s", "conv/s", "vs TRL per-example (wall / CPU)"], table)
    pairs = [
        ("alignkit tokenize_rows", "TRL per-example, shipped template", "tokenize_rows vs TRL per-example"),
        (
            "alignkit tokenize_dataset (map)",
            "TRL SFTTrainer._prepare_dataset (map)",
            "tokenize_dataset vs _prepare_dataset",
        ),
    ]
    print()
    worst = float("inf")
    for ours, theirs, label in pairs:
        w, c = (med[theirs][m] / med[ours][m] for m in ("wall", "cpu"))
        worst = min(worst, w, c)
        print(f"{label:40s} {w:.2f}x wall, {c:.2f}x CPU")
    print(f"goal >= 2x: {'met' if worst >= 2 else 'NOT met'} (worst of the four ratios: {worst:.2f}x)\n")

    if not args.no_profile:
        profile_breakdown(
            {
                "alignkit tokenize_rows": variants["alignkit tokenize_rows"],
                "TRL per-example": variants["TRL per-example, shipped template"],
            }
        )
    print(f"\ntotal benchmark time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
