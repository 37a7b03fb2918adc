"""`alignkit plot`: the default panels of a GRPO and a DPO run, `--keys`, several runs overlaid."""

from __future__ import annotations

import pytest

from alignkit.cli import main
from alignkit.data.byte_tokenizer import byte_tokenizer
from alignkit.loops.dpo import DPOConfig, train_dpo
from alignkit.loops.grpo import GRPOConfig, train_grpo
from alignkit.metrics import read_metrics
from alignkit.models import build_tiny_model, tiny_llama_config
from alignkit.plot import build_figure, choose_panels, loop_of
from tests.conftest import loop_config, preference_rows
from tests.rl_support import even_first

TOK = byte_tokenizer()


def _model():
    end = TOK.convert_tokens_to_ids("<|im_end|>")
    cfg = tiny_llama_config(len(TOK), hidden=16, layers=1, heads=2, kv_heads=2, eos_token_id=end)
    return build_tiny_model(cfg, seed=0)


def short(prompts, completions, completion_ids, **columns):
    return [-len(c) / 4 for c in completion_ids]


@pytest.fixture(scope="module")
def grpo_runs(tmp_path_factory):
    """Two GRPO runs (two learning rates) with two reward functions and a KL term."""
    root = tmp_path_factory.mktemp("grpo")
    for name, lr in (("lr-a", 1e-2), ("lr-b", 1e-3)):
        cfg = GRPOConfig(output_dir=str(root / name), max_steps=3, prompts_per_step=2, group_size=4,
                         max_new_tokens=4, kl_coef=0.05, lr=lr, progress=False)  # fmt: skip
        rows = [{"prompt": f"q{i}:"} for i in range(8)]
        train_grpo(cfg, model=_model(), tokenizer=TOK, train_data=rows, reward_funcs=[even_first, short])
    return root / "lr-a", root / "lr-b"


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    cfg = loop_config(DPOConfig, root, "dpo", max_steps=3, log_every=1)
    train_dpo(cfg, model=_model(), tokenizer=TOK, train_data=preference_rows(24))
    return root / "dpo"


def _panels(fig):
    return {ax.get_title(): [ln.get_label() for ln in ax.get_lines()] for ax in fig.axes if ax.get_title()}


def test_grpo_default_panels(grpo_runs):
    run = grpo_runs[0]
    assert loop_of(run) == "GRPOConfig"
    panels = dict(choose_panels(read_metrics(run), "GRPOConfig"))
    # the quantities one watches in GRPO, not 40 alphabetical panels
    assert list(panels) == [
        "reward", "reward per function", "reward spread", "KL to the reference", "clip fraction", "entropy",
        "completion length", "truncated completions", "loss", "grad norm", "step time (s)",
    ]  # fmt: skip
    assert panels["reward per function"] == ["rewards/even_first/mean", "rewards/short/mean"]
    assert panels["clip fraction"] == ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
    assert panels["completion length"] == ["completions/mean_length", "completions/min_length",
                                           "completions/max_length"]  # fmt: skip
    fig = build_figure([run])
    drawn = _panels(fig)
    assert list(drawn) == list(panels)
    assert drawn["reward per function"] == ["rewards/even_first/mean", "rewards/short/mean"]  # labelled series
    assert all(len(ln.get_xdata()) == 3 for ax in fig.axes for ln in ax.get_lines())  # every step drawn


def test_dpo_default_panels(dpo_run):
    panels = dict(choose_panels(read_metrics(dpo_run), loop_of(dpo_run)))
    assert list(panels) == ["loss", "rewards", "reward margin", "preference accuracy", "log-probs", "grad norm",
                            "learning rate", "throughput (tokens/s)"]  # fmt: skip
    assert panels["rewards"] == ["rewards/chosen", "rewards/rejected"]


def test_keys_pick_panels_and_globs_group(grpo_runs):
    run = grpo_runs[0]
    fig = build_figure([run], keys=["rewards/*/mean", "kl"])
    assert _panels(fig) == {"rewards/*/mean": ["rewards/even_first/mean", "rewards/short/mean"], "kl": ["_child0"]}
    with pytest.raises(ValueError, match="none of --keys nope"):
        build_figure([run], keys=["nope"])


def test_several_runs_overlaid_and_cli(grpo_runs, tmp_path):
    fig = build_figure(list(grpo_runs))
    reward = _panels(fig)["reward"]
    assert reward == ["lr-a", "lr-b"]  # one line per run, labelled by its folder
    a, b = (ln.get_ydata() for ax in fig.axes if ax.get_title() == "reward" for ln in ax.get_lines())
    assert list(a) == [r["reward"] for r in read_metrics(grpo_runs[0])]
    assert list(b) == [r["reward"] for r in read_metrics(grpo_runs[1])]
    out = tmp_path / "both.png"
    assert main(["plot", *map(str, grpo_runs), "--keys", "reward,kl", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(grpo_runs[0]), "--keys", "nope"]) == 2  # an input error, not a traceback
