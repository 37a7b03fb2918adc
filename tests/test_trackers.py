"""Trackers through `report_to` (TensorBoard, W&B offline, trackio local) and an RL run's sample completions."""

from __future__ import annotations

import glob
import importlib.util
import json
import sqlite3
import struct
import uuid

import pytest

from alignkit.config import ConfigError, build_config
from alignkit.data.byte_tokenizer import byte_tokenizer
from alignkit.loops.grpo import GRPOConfig, train_grpo
from alignkit.loops.sft import SFTConfig
from alignkit.metrics import read_metrics
from alignkit.models import build_tiny_model, tiny_llama_config

for _package in ("wandb", "trackio"):  # found, not imported: trackio reads TRACKIO_DIR when first imported
    if importlib.util.find_spec(_package) is None:
        pytest.skip(f"{_package} is not installed (the trackers extra)", allow_module_level=True)
PROJECT = f"alignkit-test-{uuid.uuid4().hex[:8]}"

TOK = byte_tokenizer()


def n_digits(prompts, completions, completion_ids, **columns):
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def short(prompts, completions, completion_ids, **columns):
    return [-len(c) / 4 for c in completion_ids]


def wandb_history(run_file: str) -> list[dict]:
    """The history records of an offline W&B run file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, out, part = open(run_file, "rb").read(), 7, [], b""  # 7 bytes: the ":W&B" header
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        frag, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        part = frag if kind in (1, 2) else part + frag
        if kind in (1, 4):  # a whole record, or the last fragment of one
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(part)
            if rec.WhichOneof("record_type") == "history":
                out.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return out


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("tracked")
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("TRACKIO_DIR", str(root / "trackio"))
    end = TOK.convert_tokens_to_ids("<|im_end|>")
    model = build_tiny_model(tiny_llama_config(len(TOK), hidden=16, layers=1, heads=2, kv_heads=2, eos_token_id=end))
    cfg = GRPOConfig(output_dir=str(root / "run"), max_steps=4, prompts_per_step=2, group_size=4, max_new_tokens=6,
                     progress=False, report_to=["tensorboard", "wandb", "trackio"], run_name="tiny-grpo",
                     tracker_project=PROJECT, log_completions_every=2, log_completions_n=4)  # fmt: skip
    try:
        train_grpo(cfg, model=model, tokenizer=TOK, train_data=[{"prompt": f"{i}+{i}="} for i in range(8)],
                   reward_funcs=[n_digits, short])  # fmt: skip
    finally:
        mp.undo()
    return root


def test_sample_completions_jsonl(tracked_run):
    rows = [json.loads(ln) for ln in (tracked_run / "run" / "completions.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [1, 2, 4] and len(rows) == 12  # step 1, then every 2; 4 rows each
    for r in rows:
        assert set(r) == {"step", "prompt", "completion", "rewards/n_digits", "rewards/short", "advantage", "length"}
        assert r["prompt"] in {f"{i}+{i}=" for i in range(8)}  # plain-text prompts, as the model saw them
        assert r["rewards/n_digits"] == sum(ch.isdigit() for ch in r["completion"])  # the value the reward gave
        assert r["rewards/short"] == -r["length"] / 4
    first = [r for r in rows if r["step"] == 1]
    assert len({r["prompt"] for r in first}) == 1  # whole groups first: the 4 samples of the first prompt
    assert abs(sum(r["advantage"] for r in first)) < 1e-4  # a group's advantages are centred


def test_wandb_offline_run_has_the_metrics_and_the_table(tracked_run):
    [run_file] = glob.glob(str(tracked_run / "run" / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = wandb_history(run_file)
    ours = read_metrics(tracked_run / "run")
    losses = [h["train/loss"] for h in history if "train/loss" in h]
    assert losses == pytest.approx([r["loss"] for r in ours])  # grouped names, every logged step
    assert [h["_step"] for h in history if "train/loss" in h] == [r["step"] for r in ours]
    assert all("reward/reward" in h and "timing/step_time_s" in h for h in history if "train/loss" in h)
    tables = glob.glob(str(tracked_run / "run" / "wandb" / "offline-run-*" / "files" / "media" / "table" / "*.json"))
    assert len(tables) == 3
    table = json.loads(open(sorted(tables)[0]).read())
    assert table["columns"][:2] == ["prompt", "completion"] and len(table["data"]) == 4


def test_trackio_local_run_has_the_metrics_config_and_table(tracked_run):
    from trackio.utils import TRACKIO_DIR  # TRACKIO_DIR of the fixture, unless trackio was imported before it

    db = sqlite3.connect(TRACKIO_DIR / f"{PROJECT}.db")
    metrics = [
        (s, json.loads(m)) for s, m in db.execute("select step, metrics from metrics where run_name='tiny-grpo'")
    ]
    losses = [m["train/loss"] for _, m in metrics if "train/loss" in m]
    assert losses == pytest.approx([r["loss"] for r in read_metrics(tracked_run / "run")])
    assert sum("completions" in m for _, m in metrics) == 3
    [(config,)] = db.execute("select config from configs where run_name='tiny-grpo'").fetchall()
    assert json.loads(config)["group_size"] == 4  # the resolved config as hyperparameters


def test_tensorboard_has_the_completions_text(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / "run" / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    assert any("completions" in t for t in events.Tags()["tensors"])
    assert "reward/reward" in events.Tags()["scalars"] and "train/entropy" in events.Tags()["scalars"]


def test_report_to_values(monkeypatch):
    assert build_config(SFTConfig, {"report_to": "none"}).report_to == []  # TRL's values are accepted
    assert set(build_config(SFTConfig, {"report_to": "all"}).report_to) == {"tensorboard", "wandb", "trackio"}
    with pytest.raises(ConfigError, match="unknown tracker 'comet'"):
        build_config(SFTConfig, {"report_to": ["comet"]})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"wandb package is not installed \(pip install 'alignkit\[wandb\]'\)"):
        build_config(SFTConfig, {"report_to": ["wandb"]})
