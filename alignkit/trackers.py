"""Experiment trackers beside ``metrics.jsonl``: TensorBoard, Weights & Biases, trackio (``report_to``).

Each tracker gets every logged record as scalars under grouped names (:func:`tracker_tag`: ``train/``,
``eval/``, ``reward/``, ``timing/``), the run's resolved config as its hyperparameters, and tables (an RL run's
sample completions). A W&B or trackio run is named by ``run_name`` (default: the run folder's name) and resumes
with the alignkit run (the run id of ``RUN_DIR/run.json``). Offline use is the trackers' own: ``WANDB_MODE=offline``
writes ``RUN_DIR/wandb/offline-run-*`` (``wandb sync`` uploads it later); trackio is local by default
(``TRACKIO_DIR``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from alignkit.config import ConfigError

__all__ = ["Tracker", "TRACKERS", "check_report_to", "open_trackers", "tracker_tag"]


def tracker_tag(key: str) -> str:
    """The tracker name of a metric: grouped as ``eval/``, ``reward/``, ``timing/`` (speed, memory, times) or
    ``train/``, so each group is one section of the dashboard."""
    if key.startswith("eval_"):
        return f"eval/{key[5:]}"
    if key.startswith(("reward", "advantage", "kl_reward/")):
        return f"reward/{key}"
    if key.endswith("_s") or key in ("mfu", "weight_sync_s") or key.startswith("mem_"):
        return f"timing/{key}"
    return f"train/{key}"


class Tracker(Protocol):
    def scalars(self, values: dict[str, float], step: int) -> None: ...  # tagged names (tracker_tag)

    def table(self, name: str, rows: list[dict[str, Any]], step: int) -> None: ...  # rows share their keys

    def close(self) -> None: ...


class TensorBoardTracker:
    """``RUN_DIR/tensorboard``: scalars, the config as a text table, tables as markdown text."""

    def __init__(self, run_dir: Path, *, hparams: dict[str, Any], **_: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        if hparams:
            self.writer.add_text("config", _markdown([{"key": k, "value": repr(v)} for k, v in hparams.items()]), 0)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        self.writer.add_text(name, _markdown(rows), step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run in ``RUN_DIR/wandb`` (project ``tracker_project``; ``WANDB_MODE=offline`` for no network)."""

    def __init__(self, run_dir: Path, *, hparams: dict[str, Any], project: str, run_name: str, run_id: str) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=project, name=run_name, id=run_id, resume="allow", config=hparams,
                              dir=str(run_dir))  # fmt: skip

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        cols = list(rows[0])
        self.run.log({name: self.wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])}, step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    """A trackio run (local by default, under ``TRACKIO_DIR``), project ``tracker_project``."""

    def __init__(self, run_dir: Path, *, hparams: dict[str, Any], project: str, run_name: str, run_id: str) -> None:
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=project, name=run_name, config=hparams, resume="allow")

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.trackio.log(values, step=step)

    def table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        cols = list(rows[0])
        self.trackio.log({name: self.trackio.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])},
                         step=step)  # fmt: skip

    def close(self) -> None:
        self.trackio.finish()


# name -> (class, the package it needs, the extra that installs it)
TRACKERS: dict[str, tuple[type, str, str]] = {
    "tensorboard": (TensorBoardTracker, "tensorboard", "tensorboard"),
    "wandb": (WandbTracker, "wandb", "wandb"),
    "trackio": (TrackioTracker, "trackio", "trackio"),
}


def check_report_to(names: Sequence[str]) -> list[str]:
    """The trackers of ``report_to`` (TRL's values too: ``none``, ``all`` = every installed one); refuses an
    unknown tracker, or one whose package is not installed, before the run starts."""
    if "all" in names:
        return [t for t, (_, package, _) in TRACKERS.items() if importlib.util.find_spec(package) is not None]
    names = [n for n in names if n != "none"]
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"report_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
        package, extra = TRACKERS[name][1:]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"report_to={name}: the {package} package is not installed (pip install 'alignkit[{extra}]')"
            )
    return list(dict.fromkeys(names))


def open_trackers(
    names: Sequence[str], run_dir: str | Path, *, hparams: dict[str, Any], project: str, run_name: str, run_id: str
) -> list[Tracker]:
    """The trackers named in ``report_to`` (checked with :func:`check_report_to`)."""
    kw = dict(hparams=hparams, project=project, run_name=run_name, run_id=run_id)
    return [TRACKERS[n][0](Path(run_dir), **kw) for n in check_report_to(names)]


def _markdown(rows: list[dict[str, Any]]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows])
