"""`alignkit sweep`: one loop over a grid (or random draws) of config values, each trial its own run folder.

    alignkit sweep sft --config base.yaml --out runs/sweep lr=1e-5,3e-5 batch_size=8,16     # a 2 x 2 grid
    alignkit sweep dpo --config base.yaml --sweep sweep.yaml --parallel 2                    # from a sweep file

A sweep file: ``method: grid | random | tpe``, ``n`` (random draws, TPE trials), ``seed``, and ``parameters``: a
key's list of values, or for random draws and TPE ``{min, max, log}`` (a float, log-uniform with ``log: true``) or
``{values: [...]}``. ``tpe`` (Optuna's TPE sampler, ``pip install 'alignkit[sweeps]'``) chooses each trial from the
results so far: ``metric`` (default ``eval_loss`` when the trials evaluate, else ``loss``; its final value),
``direction`` (``minimize`` for a loss, else ``maximize``), ``startup`` random trials first (default 4); with
``--parallel N`` it asks N trials at a time.

Each trial runs ``alignkit LOOP`` in its own process (a failing trial does not stop the others) in
``OUT/trial-K``; ``--parallel N`` runs N at a time, each with its share of the CPU threads (and of the GPUs named
in ``CUDA_VISIBLE_DEVICES``). Running the same sweep again resumes it: finished trials (a ``final_model``) are
skipped, started ones resume from their checkpoint. At the end ``OUT/summary.md`` / ``summary.json`` hold each
trial's values with its final and best metrics, and ``OUT/comparison.png`` overlays the loss curves.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import subprocess
import sys
import typing
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from alignkit.checkpoint import FINAL_MODEL, latest_checkpoint
from alignkit.config import ConfigError
from alignkit.metrics import read_metrics
from alignkit.plot import plot_runs

__all__ = ["split_sweep_overrides", "trials", "run_sweep", "run_tpe_sweep", "summarize", "load_sweep_file"]

METRICS = ("loss", "eval_loss", "reward", "rewards/accuracies", "accuracy")  # reported when a trial logs them


def split_sweep_overrides(cls: type, overrides: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """``key=a,b`` items of non-list keys are swept (``{key: [a, b]}``); the rest are fixed overrides."""
    hints = typing.get_type_hints(cls)
    fixed, swept = [], {}
    for item in overrides:
        key, _, value = item.partition("=")
        tp = hints.get(key)
        is_list = typing.get_origin(tp) in (list, tuple) or any(
            typing.get_origin(a) in (list, tuple) for a in typing.get_args(tp)
        )
        if "," in value and not is_list and not value.strip().startswith(("[", "{")):
            swept[key] = [v for v in value.split(",") if v]
        else:
            fixed.append(item)
    return fixed, swept


def trials(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The trials of a sweep spec (``method``, ``parameters``, ``n``, ``seed``): dicts of key -> value."""
    params = spec.get("parameters") or {}
    if not params:
        raise ConfigError("a sweep needs at least one parameter with several values")
    method = spec.get("method", "grid")
    if method == "grid":
        keys = list(params)
        grids = []
        for k in keys:
            v = params[k]
            if not isinstance(v, list):
                raise ConfigError(f"sweep parameter {k}: a grid needs a list of values, got {v!r}")
            grids.append(v)
        return [dict(zip(keys, combo)) for combo in itertools.product(*grids)]
    if method == "random":
        rng = random.Random(spec.get("seed", 0))
        out = []
        for _ in range(int(spec.get("n", 4))):
            trial = {}
            for k, v in params.items():
                if isinstance(v, list):
                    trial[k] = rng.choice(v)
                elif isinstance(v, dict) and "values" in v:
                    trial[k] = rng.choice(v["values"])
                elif isinstance(v, dict) and {"min", "max"} <= set(v):
                    lo, hi = float(v["min"]), float(v["max"])
                    trial[k] = (
                        math.exp(rng.uniform(math.log(lo), math.log(hi))) if v.get("log") else rng.uniform(lo, hi)
                    )
                else:
                    raise ConfigError(f"sweep parameter {k}: a list, {{values: [...]}} or {{min, max, log}}, got {v!r}")
            out.append(trial)
        return out
    raise ConfigError(f"sweep method={method!r}: grid, random or tpe")


def _state(run_dir: Path) -> str:
    if (run_dir / FINAL_MODEL).exists():
        return "finished"
    return "started" if latest_checkpoint(run_dir) is not None else "new"


def _command(loop: str, config: str | None, fixed: list[str], trial: dict[str, Any], run_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "alignkit", loop]
    if config:
        cmd += ["--config", config]
    cmd += [*fixed, *(f"{k}={v}" for k, v in trial.items()), f"output_dir={run_dir}", "progress=false"]
    # a started trial continues from its checkpoint; a new one may find a half-made folder from a kill
    cmd += ["resume=true", "overwrite=false"] if _state(run_dir) == "started" else ["resume=false", "overwrite=true"]
    return cmd


def _write_plan(out: Path, loop: str, config: str | None, fixed: list[str], trial_list: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"loop": loop, "config": config, "fixed": fixed,
                                                "trials": trial_list}, indent=1))  # fmt: skip


def _run_trials(
    loop: str, config: str | None, fixed: list[str], trial_list: list[dict[str, Any]], which: Sequence[int],
    out: Path, parallel: int,
) -> dict[int, int]:  # fmt: skip
    """Run (or resume, or skip when finished) the trials ``which`` of ``trial_list``, ``parallel`` at a time;
    their exit codes."""
    threads = max(1, (os.cpu_count() or 1) // parallel)
    gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]

    def one(k: int) -> int:
        run_dir = out / f"trial-{k}"
        if _state(run_dir) == "finished":
            print(f"[alignkit sweep] trial-{k} {trial_list[k]}: finished before, skipped", file=sys.stderr)
            return 0
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        if gpus:  # each slot its share of the GPUs
            slot = k % parallel
            share = gpus[slot::parallel] or gpus
            env["CUDA_VISIBLE_DEVICES"] = ",".join(share)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(out / f"trial-{k}.log", "a") as log:
            rc = subprocess.call(_command(loop, config, fixed, trial_list[k], run_dir), stdout=log,
                                 stderr=subprocess.STDOUT, env=env)  # fmt: skip
        print(f"[alignkit sweep] trial-{k} {trial_list[k]}: {'done' if rc == 0 else f'failed ({rc})'}", file=sys.stderr)
        return rc

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return dict(zip(which, pool.map(one, which)))


def run_sweep(
    loop: str, config: str | None, fixed: list[str], trial_list: list[dict[str, Any]], out: Path, parallel: int = 1
) -> list[dict[str, Any]]:
    """Run (or resume) every trial in ``out/trial-K``; returns the summary rows (see :func:`summarize`)."""
    _write_plan(out, loop, config, fixed, trial_list)
    codes = _run_trials(loop, config, fixed, trial_list, range(len(trial_list)), out, parallel)
    return _finish(out, trial_list, codes)


def _finish(out: Path, trial_list: list[dict[str, Any]], codes: dict[int, int], objective: str | None = None):  # noqa: ANN202
    rows = summarize(out, trial_list, objective)
    for k, row in enumerate(rows):
        row["exit"] = codes.get(k, 0)
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    return rows


def _final(run_dir: Path, metric: str) -> float | None:
    recs = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    vals = [r[metric] for r in recs if isinstance(r.get(metric), (int, float))]
    return vals[-1] if vals else None


def tpe_spec(spec: dict[str, Any], evaluates: bool) -> tuple[str, str, dict[str, Any]]:
    """The objective metric, its direction and the Optuna distributions of a TPE sweep spec."""
    try:
        import optuna
    except ImportError:
        raise ConfigError("sweep method=tpe needs optuna (pip install 'alignkit[sweeps]')") from None
    metric = spec.get("metric") or ("eval_loss" if evaluates else "loss")
    direction = spec.get("direction") or ("minimize" if "loss" in metric else "maximize")
    if direction not in ("minimize", "maximize"):
        raise ConfigError(f"sweep direction={direction!r}: minimize or maximize")
    dists: dict[str, Any] = {}
    for k, v in (spec.get("parameters") or {}).items():
        if isinstance(v, list) or (isinstance(v, dict) and "values" in v):
            dists[k] = optuna.distributions.CategoricalDistribution(v if isinstance(v, list) else v["values"])
        elif isinstance(v, dict) and {"min", "max"} <= set(v):
            dists[k] = optuna.distributions.FloatDistribution(float(v["min"]), float(v["max"]), log=bool(v.get("log")))
        else:
            raise ConfigError(f"sweep parameter {k}: a list, {{values: [...]}} or {{min, max, log}}, got {v!r}")
    if not dists:
        raise ConfigError("a sweep needs at least one parameter with several values")
    return metric, direction, dists


def run_tpe_sweep(
    loop: str, config: str | None, fixed: list[str], spec: dict[str, Any], out: Path, parallel: int = 1,
    evaluates: bool = False, check: Any = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Optuna TPE: each batch of ``parallel`` trials is asked from the results of the trials before it. A rerun
    replays the trials of ``out/sweep.json`` (finished ones told their result, unfinished ones run again) before
    asking for more, up to ``n``. ``check(trial)`` validates a trial's config before it runs."""
    import optuna

    metric, direction, dists = tpe_spec(spec, evaluates)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=int(spec.get("seed", 0)), n_startup_trials=int(spec.get("startup", 4)))
    study = optuna.create_study(direction=direction, sampler=sampler)
    plan = out / "sweep.json"
    trial_list: list[dict[str, Any]] = json.loads(plan.read_text())["trials"] if plan.exists() else []
    codes: dict[int, int] = {}

    def tell(k: int, trial: Any = None) -> None:
        value = _final(out / f"trial-{k}", metric) if codes.get(k, 0) == 0 else None
        state = optuna.trial.TrialState.COMPLETE if value is not None else optuna.trial.TrialState.FAIL
        if trial is None:  # a trial of an earlier run of this sweep
            study.add_trial(optuna.trial.create_trial(params=trial_list[k], distributions=dists, value=value,
                                                      state=state))  # fmt: skip
        else:
            study.tell(trial, value, state=state)

    # the trials an earlier run asked for: unfinished ones resume, then every one informs the sampler
    codes.update(_run_trials(loop, config, fixed, trial_list, range(len(trial_list)), out, parallel))
    for k in range(len(trial_list)):
        tell(k)
    n = int(spec.get("n", 8))
    while len(trial_list) < n:
        asked = [study.ask(dists) for _ in range(min(parallel, n - len(trial_list)))]
        first = len(trial_list)
        trial_list += [dict(t.params) for t in asked]
        for trial in trial_list[first:]:
            if check is not None:
                check(trial)
        _write_plan(out, loop, config, fixed, trial_list)  # before running: a kill keeps what was asked
        codes.update(_run_trials(loop, config, fixed, trial_list, range(first, len(trial_list)), out, parallel))
        for k, t in zip(range(first, len(trial_list)), asked):
            tell(k, t)
    return _finish(out, trial_list, codes, objective=metric)


def summarize(out: Path, trial_list: list[dict[str, Any]], objective: str | None = None) -> list[dict[str, Any]]:
    """One row per trial (its values, steps, final and best of each metric it logged), written to
    ``out/summary.md`` with ``out/comparison.png`` (the loss curves overlaid)."""
    rows = []
    plotted, labels = [], []
    for k, trial in enumerate(trial_list):
        run_dir = out / f"trial-{k}"
        recs = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
        row: dict[str, Any] = {"trial": f"trial-{k}", **trial, "state": _state(run_dir), "steps": len(recs)}
        for m in METRICS:
            vals = [r[m] for r in recs if isinstance(r.get(m), (int, float))]
            if vals:
                row[f"final_{m}"] = vals[-1]
                row[f"best_{m}"] = min(vals) if "loss" in m else max(vals)
        if objective is not None:  # what the TPE sampler was told: the final value of its metric
            row[f"objective_{objective}"] = _final(run_dir, objective)
        rows.append(row)
        if any(isinstance(r.get("loss"), (int, float)) for r in recs):
            plotted.append(run_dir)
            labels.append(f"trial-{k} " + " ".join(f"{a}={b}" for a, b in trial.items()))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(k, "")) for k in keys) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    if plotted:
        plot_runs(plotted, out / "comparison.png", keys=["loss"], labels=labels, title=f"sweep {out}")
    return rows


def _cell(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def load_sweep_file(path: str) -> dict[str, Any]:
    spec = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping (method, parameters, n, seed)")
    return spec
