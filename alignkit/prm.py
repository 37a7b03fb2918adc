"""Process reward models at work: step logits from three kinds of head, batched step scoring, trajectory scores,
step-classification metrics, and a PRM as a reward function for the GRPO and RLOO loops.

Heads (all read at the label token itself, no shift; docs/LOSSES.md §6):
  * `classification`: a token-classification model with 2 labels (`AutoModelForTokenClassification`,
    `num_labels=2`), logits `[wrong, right]`;
  * `scalar`: the same with 1 label z; its logits are taken as `[0, z]`, so the two-class cross-entropy of
    `prm_loss` is exactly the BCE of σ(z), soft labels included;
  * `lm`: a causal LM read at two token ids `candidate_ids=(neg_id, pos_id)` (Math-Shepherd style); only those
    two rows of the output embedding are applied.

    scores = score_steps(model, tok, "2+2=?", ["2+2=4", "so the answer is 4"])     # [p_1, p_2]
    reward = prm_reward(model, tok, step_splitter="paragraphs", aggregation="min")  # for train_grpo(reward_funcs=)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from alignkit.data.collate import pad_collate
from alignkit.data.prm import StepSplitter, as_splitter, label_positions, step_layouts
from alignkit.losses.reward import STEP_AGGREGATIONS, aggregate_step_scores
from alignkit.models import eval_mode, pad_token_id
from alignkit.reward_funcs.core import completion_text
from alignkit.scoring import backbone, head_transform

HEADS = ("classification", "scalar", "lm")
Prompt = str | list[dict[str, Any]]


def prm_head(model: torch.nn.Module, candidate_ids: Sequence[int] | None = None) -> str:
    """Which head `model` is read through: `lm` when `candidate_ids` are given, else from its `score` layer."""
    if candidate_ids is not None:
        if len(candidate_ids) != 2:
            raise ValueError(f"candidate_ids must be (neg_id, pos_id), got {candidate_ids}")
        return "lm"
    score = getattr(model, "score", None)
    if isinstance(score, torch.nn.Linear) and score.out_features in (1, 2):
        return "scalar" if score.out_features == 1 else "classification"
    if isinstance(score, torch.nn.Linear):
        raise ValueError(f"a PRM head has 1 or 2 outputs, {type(model).__name__}.score has {score.out_features}")
    if getattr(model, "get_output_embeddings", lambda: None)() is not None:
        raise ValueError("an LM-head PRM needs candidate_ids=(neg_id, pos_id): the token ids read as wrong/right")
    raise ValueError(f"cannot find a PRM head on {type(model).__name__} (expected .score or an LM head)")


def step_logits(
    model: torch.nn.Module,
    input_ids: Tensor,
    positions: Tensor,
    *,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    candidate_ids: Sequence[int] | None = None,
) -> Tensor:
    """Two-class step logits `[wrong, right]` at the selected positions only.

    Args:
        input_ids: `[B,T]`.
        positions: `[B,T]` bool, True at label tokens (`labels != -100`).
        attention_mask, position_ids: `[B,T]`, passed to the backbone.
        candidate_ids: `(neg_id, pos_id)` for an LM-head PRM.

    Returns:
        `[N,2]` logits, N = positions.sum(), in row-major order of `positions` (input dtype of the head).
    """
    head = prm_head(model, candidate_ids)
    out = backbone(model)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    h = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])[positions]  # [N,H]
    if head == "lm":
        emb = model.get_output_embeddings()
        ids = torch.as_tensor(list(candidate_ids), device=h.device)
        bias = getattr(emb, "bias", None)
        z = torch.nn.functional.linear(h, emb.weight[ids], None if bias is None else bias[ids])
        scale, softcap = head_transform(model)
        z = z * scale
        return softcap * torch.tanh(z / softcap) if softcap else z
    dropout = getattr(model, "dropout", None)
    z = model.score(dropout(h) if isinstance(dropout, torch.nn.Module) else h)
    return torch.cat([torch.zeros_like(z), z], dim=-1) if head == "scalar" else z


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def score_steps(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: Prompt | Sequence[tuple[Prompt, Sequence[str]]],
    steps: Sequence[str] | None = None,
    *,
    step_separator: str = "\n",
    candidate_ids: Sequence[int] | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    chat_format: Any = None,
    add_bos: bool | None = None,
) -> list[float] | list[list[float]]:
    """Probability that each step is right, `softmax(logits_k)[1]`, in the layout the PRM was trained on.

    `score_steps(model, tok, prompt, steps)` -> `[p_1..p_K]`; `score_steps(model, tok, [(prompt, steps), ...])` ->
    one list per pair, computed in length-sorted batches of `batch_size`. Steps whose label token falls beyond
    `max_length` are NaN. Layout options must match training (see `alignkit.data.prm.tokenize_prm_rows`).
    """
    single = steps is not None
    pairs = [(prompt, steps)] if single else list(prompt)
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and not isinstance(pair[1], str)):
            raise TypeError(f"pair {i}: expected (prompt, [step, ...]), got {type(pair).__name__}")
    layouts = step_layouts(
        tokenizer,
        [p for p, _ in pairs],
        [list(s) for _, s in pairs],
        step_separator=step_separator,
        max_prompt_length=max_prompt_length,
        chat_format=chat_format,
        add_bos=add_bos,
    )
    results = [[math.nan] * len(s) for _, s in pairs]
    where = [label_positions(lay, max_length) for lay in layouts]
    todo = sorted((i for i in range(len(pairs)) if where[i]), key=lambda i: where[i][-1])
    pad_id = pad_token_id(tokenizer)
    device = _device(model)
    with eval_mode(model):
        for b in range(0, len(todo), batch_size):
            chunk = todo[b : b + batch_size]
            # Each sequence ends at its last scored label: later tokens cannot change it (causal, no shift).
            batch = pad_collate(
                [{"input_ids": layouts[i].input_ids()[: where[i][-1] + 1]} for i in chunk], pad_token_id=pad_id
            )
            pos = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
            for r, i in enumerate(chunk):
                pos[r, where[i]] = True
            logits = step_logits(
                model,
                batch["input_ids"].to(device),
                pos.to(device),
                attention_mask=batch["attention_mask"].to(device),
                position_ids=batch["position_ids"].to(device),
                candidate_ids=candidate_ids,
            )
            probs = logits.float().softmax(-1)[:, 1].cpu().tolist()
            k = 0
            for i in chunk:  # row-major order of `pos`: rows in chunk order, positions ascending
                n = len(where[i])
                results[i][:n] = probs[k : k + n]
                k += n
    return results[0] if single else results


def trajectory_scores(step_scores: Sequence[Sequence[float]], how: str = "min") -> list[float]:
    """One score per trajectory from its step probabilities with `aggregate_step_scores` (`min`, `prod`, `mean`,
    `last`, `geo_mean`); NaN steps (unscored) are left out, and a trajectory with no scored step is NaN."""
    if how not in STEP_AGGREGATIONS:
        raise ValueError(f"unknown step aggregation {how!r}; expected one of {list(STEP_AGGREGATIONS)}")
    if not step_scores:
        return []
    width = max(1, max(len(s) for s in step_scores))
    s = torch.full((len(step_scores), width), math.nan, dtype=torch.float64)
    for i, row in enumerate(step_scores):
        s[i, : len(row)] = torch.tensor(list(row), dtype=torch.float64)
    return aggregate_step_scores(s, ~s.isnan(), how).tolist()


def step_metrics(scores: Tensor, labels: Tensor, threshold: float = 0.5) -> dict[str, float]:
    """Step classification quality. A step is predicted right when its score > `threshold`.

    Args:
        scores: `[N]` predicted probabilities that each step is right.
        labels: `[N]` 0/1 (or probabilities, thresholded at 0.5) true labels.

    Returns: `step_accuracy`, `majority_baseline` (accuracy of always predicting the commoner label), and
    precision / recall / F1 of finding the *bad* steps (`bad_precision`, `bad_recall`, `bad_f1`), `n_steps`,
    `n_bad`.
    """
    pred_bad = scores.float() <= threshold
    bad = labels.float() <= 0.5
    n = bad.numel()
    tp = float((pred_bad & bad).sum())
    p_den, r_den = float(pred_bad.sum()), float(bad.sum())
    precision = tp / p_den if p_den else 0.0
    recall = tp / r_den if r_den else 0.0
    return {
        "step_accuracy": float((pred_bad == bad).float().mean()) if n else math.nan,
        "majority_baseline": max(r_den, n - r_den) / n if n else math.nan,
        "bad_precision": precision,
        "bad_recall": recall,
        "bad_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "n_steps": n,
        "n_bad": int(r_den),
    }


def prm_reward(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    step_splitter: str | StepSplitter | Callable[[str], list[str]] = "separator",
    aggregation: str = "min",
    step_separator: str = "\n",
    candidate_ids: Sequence[int] | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    chat_format: Any = None,
    add_bos: bool | None = None,
    name: str | None = None,
) -> Callable[..., list[float | None]]:
    """A PRM as a reward function `(prompts, completions, completion_ids, **columns) -> list[float | None]`.

    Each completion is cut into steps by `step_splitter` (a `StepSplitter` name, instance or any `text -> [step]`
    function), its steps are scored by `score_steps` and aggregated by `aggregation` (`min`, `prod`, `mean`,
    `last`, `geo_mean`). A completion with no step to score gives None (excluded from the advantages). The PRM
    can use a different tokenizer from the policy: it sees only text. Other keywords must match PRM training.
    """
    split = as_splitter(step_splitter)
    if aggregation not in STEP_AGGREGATIONS:
        raise ValueError(f"unknown step aggregation {aggregation!r}; expected one of {list(STEP_AGGREGATIONS)}")

    def reward(
        prompts: Sequence[Prompt], completions: Sequence[Any], completion_ids: Any = None, **columns: Any
    ) -> list[float | None]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        steps = [split(completion_text(c)) for c in completions]
        todo = [i for i, s in enumerate(steps) if s]
        scores = score_steps(
            model,
            tokenizer,
            [(prompts[i], steps[i]) for i in todo],
            step_separator=step_separator,
            candidate_ids=candidate_ids,
            batch_size=batch_size,
            max_length=max_length,
            chat_format=chat_format,
            add_bos=add_bos,
        )
        out: list[float | None] = [None] * len(completions)
        for i, v in zip(todo, trajectory_scores(scores, aggregation)):
            out[i] = None if math.isnan(v) else float(v)
        return out

    reward.__name__ = name or f"prm_{aggregation}"
    return reward
