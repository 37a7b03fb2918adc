"""`alignkit plot RUN [RUN ...]`: a run's curves from metrics.jsonl as one PNG, several runs overlaid.

Each loop has a default set of panels (:data:`PANELS`, keyed by the config class named in ``RUN_DIR/run.json``):
the quantities one watches for that loop, each panel one quantity with its related series (``loss`` with
``eval_loss``, the chosen and rejected rewards together). ``keys`` picks the panels instead: one per key, a
``*`` glob grouping every matching series (``rewards/*/mean``). A panel no record has a value for is left out.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignkit.metrics import read_metrics
from alignkit.run_dir import RUN_FILE

# (title, series patterns); a pattern is a key or an fnmatch glob
Panel = tuple[str, tuple[str, ...]]

_RL: list[Panel] = [
    ("reward", ("reward", "eval_reward")),
    ("reward per function", ("rewards/*/mean",)),
    ("reward spread", ("reward_std", "frac_reward_zero_std")),
    ("KL to the reference", ("kl",)),
    ("clip fraction", ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")),
    ("entropy", ("entropy",)),
    ("completion length", ("completions/mean_length", "completions/min_length", "completions/max_length")),
    ("truncated completions", ("completions/clipped_ratio",)),
    ("loss", ("loss",)),
    ("grad norm", ("grad_norm",)),
    ("step time (s)", ("step_time_s", "gen_time_s")),
]
_PAIRS: list[Panel] = [
    ("loss", ("loss", "eval_loss")),
    ("rewards", ("rewards/chosen", "rewards/rejected", "eval_rewards/chosen", "eval_rewards/rejected")),
    ("reward margin", ("rewards/margins", "eval_rewards/margins")),
    ("preference accuracy", ("rewards/accuracies", "eval_rewards/accuracies")),
    ("log-probs", ("logps/chosen", "logps/rejected")),
    ("KL estimate", ("kl",)),
    ("grad norm", ("grad_norm",)),
    ("learning rate", ("lr",)),
    ("throughput (tokens/s)", ("tokens_per_s",)),
]
PANELS: dict[str, list[Panel]] = {
    "SFTConfig": [
        ("loss", ("loss", "eval_loss")),
        ("grad norm", ("grad_norm",)),
        ("learning rate", ("lr",)),
        ("throughput (tokens/s)", ("tokens_per_s",)),
        ("step time (s)", ("step_time_s",)),
    ],
    "DPOConfig": _PAIRS,
    "KTOConfig": _PAIRS,
    "GRPOConfig": _RL,
    "RLOOConfig": _RL,
    "RewardConfig": [
        ("loss", ("loss", "eval_loss")),
        ("accuracy", ("accuracy", "eval_accuracy")),
        ("margin", ("margin", "eval_margin")),
        ("rewards", ("rewards/chosen", "rewards/rejected")),
        ("grad norm", ("grad_norm",)),
        ("learning rate", ("lr",)),
    ],
    "PRMConfig": [
        ("loss", ("loss", "eval_loss")),
        ("step accuracy", ("step_accuracy", "eval_step_accuracy", "eval_accuracy")),
        ("grad norm", ("grad_norm",)),
        ("learning rate", ("lr",)),
    ],
}
# not curves: counters and the step itself
NOT_PLOTTED = {"step", "num_tokens", "num_trained_tokens", "round", "iteration"}


def loop_of(run_dir: str | Path) -> str | None:
    """The config class of the run in ``run_dir`` (``RUN_DIR/run.json``), None when it has no run.json."""
    path = Path(run_dir) / RUN_FILE
    return json.loads(path.read_text()).get("loop") if path.is_file() else None


def _numeric_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    seen = {k: None for r in records for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return [k for k in seen if k not in NOT_PLOTTED]


def choose_panels(
    records: Sequence[dict[str, Any]], loop: str | None, keys: Sequence[str] | None = None
) -> list[tuple[str, list[str]]]:
    """The panels to draw: ``(title, series keys present in records)``, in order, empty panels left out.

    ``keys`` (each a key or a glob) makes one panel each; otherwise the loop's :data:`PANELS`, or for a loop
    without defaults every numeric key alphabetically."""
    present = _numeric_keys(records)
    if keys:
        panels: list[Panel] = [(k, (k,)) for k in keys]
    elif loop in PANELS:
        panels = PANELS[loop]
    else:
        panels = [(k, (k,)) for k in sorted(present)]
    out = []
    for title, patterns in panels:
        series = [k for pat in patterns for k in (sorted(fnmatch.filter(present, pat)) if "*" in pat else [pat])]
        series = [k for k in dict.fromkeys(series) if k in present]
        if series:
            out.append((title, series))
    if keys and not out:
        raise ValueError(f"none of --keys {', '.join(keys)} is in the metrics; they hold: {', '.join(sorted(present))}")
    return out


def build_figure(
    run_dirs: Sequence[str | Path],
    *,
    keys: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Any:
    """The matplotlib figure of one or several runs: the first run's loop picks the default panels, every run is
    drawn in each panel (one colour per run; within a run, one line style per series)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for d in run_dirs:
        records = read_metrics(d)
        if not records:
            raise ValueError(f"{d}/metrics.jsonl has no records")
        runs.append(records)
    labels = list(labels) if labels else [Path(d).name or str(d) for d in run_dirs]
    panels = choose_panels([r for recs in runs for r in recs], loop_of(run_dirs[0]), keys)
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.3 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for ax, (panel_title, series) in zip(axes.flat, panels):
        for i, (records, label) in enumerate(zip(runs, labels)):
            for j, key in enumerate(series):
                pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
                if not pts:
                    continue
                name = " ".join(x for x in (label if len(runs) > 1 else "", key if len(series) > 1 else "") if x)
                ax.plot(
                    [p[0] for p in pts], [p[1] for p in pts], color=colours[i % len(colours)],
                    linestyle=styles[j % len(styles)], marker="." if len(pts) < 30 else None, label=name or None,
                )  # fmt: skip
        ax.set_title(panel_title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(runs) > 1 or len(series) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title or ", ".join(str(d) for d in run_dirs))
    fig.tight_layout()
    return fig


def plot_runs(
    run_dirs: Sequence[str | Path],
    out: str | Path | None = None,
    *,
    keys: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Write the runs' figure (:func:`build_figure`) to ``out`` (default: ``RUN/curves.png`` for one run,
    ``comparison.png`` beside the first run for several); returns the PNG path."""
    import matplotlib.pyplot as plt

    fig = build_figure(run_dirs, keys=keys, labels=labels, title=title)
    if out is None:
        first = Path(run_dirs[0])
        out = first / "curves.png" if len(run_dirs) == 1 else first.parent / "comparison.png"
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None, title: str | None = None) -> Path:
    """One run's default panels as ``RUN_DIR/curves.png`` (or ``out``)."""
    return plot_runs([run_dir], out, title=title)
