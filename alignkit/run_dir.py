"""The run directory: what a fresh run refuses, what a resumed run checks.

``RUN_DIR/run.json`` holds the run's id, its resolved config and the command line. A fresh run (``resume=false``)
refuses a folder that already holds files unless ``overwrite=true``; a resumed run refuses config changes that
alter the trajectory unless ``allow_config_change`` lists them (:func:`prepare_run_dir`, before anything is
loaded), and a changed run length whose finished steps would have had other learning rates
(:func:`check_run_length`, once the checkpoint is read).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alignkit.checkpoint import write_atomic
from alignkit.config import ConfigError

__all__ = ["OBSERVATION_KEYS", "LENGTH_KEYS", "RUN_FILE", "prepare_run_dir", "check_run_length", "run_id_of"]


# Keys that change how a run is watched or stored, not what it computes: a resume may change them freely.
OBSERVATION_KEYS = frozenset(
    {"resume", "overwrite", "allow_config_change", "progress", "report_to", "run_name", "tracker_project",
     "log_every", "save_every",
     "keep_last", "output_dir", "eval_every", "eval_rows", "eval_dataset", "eval_split", "max_nonfinite_steps",
     "reference_cache_dir", "backend_kwargs", "max_reward_failures",
     # how many processes and how they share the work: an offline loop's steps are the same on any number
     "parallel", "nproc", "dist_timeout_s"}
)  # fmt: skip
LENGTH_KEYS = frozenset({"max_steps", "epochs"})
RUN_FILE = "run.json"


def _config_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def prepare_run_dir(cfg: Any) -> str:
    """Check ``cfg.output_dir`` before anything is loaded, and return the run's id.

    A fresh run (``resume=false``) refuses a folder that already holds files unless ``overwrite=true``, which
    clears it first. A resumed run compares ``cfg`` with the config saved in ``RUN_DIR/run.json`` and refuses
    keys that change the trajectory (anything outside :data:`OBSERVATION_KEYS`) unless they are listed in
    ``allow_config_change`` (``["all"]`` accepts any). The folder must be writable. Writes ``run.json`` (run id,
    loop config, command line) for a fresh run.
    """
    run_dir = Path(cfg.output_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output_dir={str(run_dir)!r} is not writable ({e.strerror or e})") from None
    # a run.json alone is a run that stopped before its first step (bad data, say): nothing to lose or continue
    entries = [p for p in run_dir.iterdir() if not p.name.startswith(".") and p.name != RUN_FILE]
    saved_path = run_dir / RUN_FILE
    if cfg.resume and entries:
        if not saved_path.is_file():
            raise ConfigError(f"resume=true, but output_dir={str(run_dir)!r} holds no {RUN_FILE}: not an alignkit run")
        saved = json.loads(saved_path.read_text())
        now, before = _config_dict(cfg), saved.get("config", {})
        # max_steps / epochs are judged in start_run, against the learning rates the finished steps used
        ignored = OBSERVATION_KEYS | LENGTH_KEYS
        changed = sorted(k for k in set(now) | set(before) if k not in ignored and now.get(k) != before.get(k))
        allowed = set(getattr(cfg, "allow_config_change", []) or [])
        refused = [k for k in changed if k not in allowed and "all" not in allowed]
        if refused:
            diffs = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in refused)
            raise ConfigError(
                f"resume: the config differs from the run's saved config in keys that change the trajectory "
                f"({diffs}); pass allow_config_change={','.join(refused)} to accept"
            )
        if changed:
            print(f"[alignkit] resume with changed config keys (allowed): {', '.join(changed)}", file=sys.stderr)
        return str(saved["run_id"])
    if entries and not cfg.resume:
        if not getattr(cfg, "overwrite", False):
            what = ", ".join(sorted(p.name for p in entries)[:5]) + (" ..." if len(entries) > 5 else "")
            raise ConfigError(
                f"output_dir={str(run_dir)!r} already holds files ({what}); pass resume=true to continue that run "
                "or overwrite=true to delete it and start anew"
            )
        for p in run_dir.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    run_id = uuid.uuid4().hex
    record = {"run_id": run_id, "loop": type(cfg).__name__, "config": _config_dict(cfg), "command": sys.argv}
    write_atomic(saved_path, json.dumps(record, indent=2))
    return run_id


def check_run_length(
    cfg: Any,
    state: dict[str, Any],
    total_steps: int,
    schedule: Callable[[int], float],
    schedule_for: Callable[[int], Callable[[int], float]],
) -> None:
    """A resumed run may be longer or shorter (``max_steps``, ``epochs``) when the steps already taken would have
    had the same learning rates under the new length (a constant schedule, or still in warmup); otherwise the
    change alters the trajectory and needs ``allow_config_change``. ``schedule`` is the new run's multiplier per
    step, ``schedule_for(total)`` the one a run of ``total`` steps had."""
    before = state.get("total_steps")
    allowed = set(getattr(cfg, "allow_config_change", []) or [])
    if before is None or before == total_steps or allowed & (LENGTH_KEYS | {"all"}):
        return
    old = schedule_for(int(before))
    if any(old(k) != schedule(k) for k in range(int(state["step"]))):
        raise ConfigError(
            f"resume: the run length changed ({before} -> {total_steps} optimizer steps, from max_steps / epochs), "
            f"so the steps already taken would have had other learning rates under cfg.schedule={cfg.schedule!r}; "
            "pass allow_config_change=max_steps to accept"
        )


def run_id_of(run_dir: str | Path) -> str | None:
    """The id in ``RUN_DIR/run.json`` (None when there is none)."""
    path = Path(run_dir) / RUN_FILE
    return json.loads(path.read_text())["run_id"] if path.is_file() else None
