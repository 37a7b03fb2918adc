"""Fault injection: NaN at a chosen step, divergence, corrupt and truncated checkpoints, a full disk, a kill during
a save, a reused run directory, a changed config on resume, untrusted training state. Each case ends in a clean
continuation or a clear error (non-zero exit through the CLI), and the last good checkpoint stays intact."""

from __future__ import annotations

import errno
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit import checkpoint as ckpt_mod
from alignkit.checkpoint import find_resumable, latest_checkpoint
from alignkit.cli import main
from alignkit.config import ConfigError
from alignkit.data.byte_tokenizer import byte_tokenizer
from alignkit.demo import make_rows
from alignkit.errors import CheckpointError, DiskFullError, TrainingDiverged
from alignkit.loops.sft import SFTConfig, train_sft
from alignkit.metrics import read_metrics
from alignkit.models import build_tiny_model, tiny_llama_config

TOK = byte_tokenizer()
ROWS = [{"messages": r["messages"]} for r in make_rows(96, 2, seed=0)]


def _model(seed: int = 0, tie: bool = False) -> torch.nn.Module:
    return build_tiny_model(tiny_llama_config(len(TOK), hidden=32, layers=2, heads=2, kv_heads=2, tie=tie), seed=seed)


def _cfg(out: Path, **kw) -> SFTConfig:
    base = dict(output_dir=str(out), chat_format="chatml", max_steps=6, save_every=1, keep_last=2, batch_size=8,
                packing=False, lr=3e-3, progress=False, epochs=4)  # fmt: skip
    return SFTConfig(**{**base, **kw})


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


class NaNAt:
    """A forward hook on the final norm that turns the hidden states into NaN during chosen optimizer steps."""

    def __init__(self, model: torch.nn.Module, steps: set[int] | None = None, from_step: int | None = None) -> None:
        self.steps, self.from_step, self.step = steps or set(), from_step, 1  # the step being computed
        model.model.norm.register_forward_hook(self.hook)

    def hook(self, module, args, out):  # noqa: ANN001, ANN201
        on = self.step in self.steps or (self.from_step is not None and self.step >= self.from_step)
        return out * float("nan") if on and module.training else out

    def after(self, step: int, record: dict) -> None:  # loop callback: `step` just finished
        self.step = step + 1


# ---------------------------------------------------------------------------------------------------------------
# non-finite losses and gradients
# ---------------------------------------------------------------------------------------------------------------


def test_nan_at_one_step_skips_that_update_and_the_run_continues(tmp_path):
    model = _model()
    nan = NaNAt(model, steps={3})
    train_sft(_cfg(tmp_path / "run"), model=model, tokenizer=TOK, train_data=ROWS, callbacks=[nan.after])
    recs = {r["step"]: r for r in read_metrics(tmp_path / "run")}
    assert recs[3]["skipped_nonfinite"] is True and recs[3]["nonfinite_steps"] == 1
    assert not recs[4]["skipped_nonfinite"] and recs[6]["nonfinite_steps"] == 1  # counted once, then clean steps
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the skipped update left the weights as they were after step 2
    runs = tmp_path / "run"
    assert {p.name for p in runs.glob("checkpoint-*")} == {"checkpoint-5", "checkpoint-6"}
    assert all(torch.isfinite(t).all() for t in _weights(runs / "checkpoint-6").values())


def test_nan_weights_never_reach_a_skipped_step(tmp_path):
    """Weights after a skipped step equal the weights before it (no partial update from NaN gradients)."""
    model = _model()
    nan = NaNAt(model, steps={2})
    snapshots = {}

    def snap(step: int, record: dict) -> None:
        snapshots[step] = {k: v.clone() for k, v in model.state_dict().items()}

    train_sft(_cfg(tmp_path / "run", max_steps=3), model=model, tokenizer=TOK, train_data=ROWS,
              callbacks=[nan.after, snap])  # fmt: skip
    for k in snapshots[1]:
        assert torch.equal(snapshots[1][k], snapshots[2][k])
    assert any(not torch.equal(snapshots[2][k], snapshots[3][k]) for k in snapshots[2])


def test_persistent_nan_stops_the_run_with_an_error_and_keeps_the_last_good_checkpoint(tmp_path):
    model = _model()
    nan = NaNAt(model, from_step=3)
    cfg = _cfg(tmp_path / "run", max_nonfinite_steps=2, max_steps=10)
    with pytest.raises(TrainingDiverged, match="max_nonfinite_steps=2"):
        train_sft(cfg, model=model, tokenizer=TOK, train_data=ROWS, callbacks=[nan.after])
    good = latest_checkpoint(tmp_path / "run")
    assert good is not None and int(good.name.split("-")[1]) <= 4
    ckpt_mod.verify_checkpoint(good)
    assert all(torch.isfinite(t).all() for t in _weights(good).values())


def test_huge_learning_rate_through_the_cli_exits_non_zero_with_finite_checkpoints(tmp_path):
    model_dir, data = tmp_path / "model", tmp_path / "train.jsonl"
    _model().save_pretrained(model_dir)
    TOK.save_pretrained(model_dir)
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "run"
    args = ["sft", f"model={model_dir}", f"dataset={data}", f"output_dir={out}", "chat_format=chatml", "lr=1e6",
            "max_steps=12", "save_every=1", "packing=false", "progress=false", "max_grad_norm=none"]  # fmt: skip
    rc = main(args)
    recs = read_metrics(out)
    if rc == 0:  # it may survive: then every non-finite step was skipped and counted
        assert all(r.get("skipped_nonfinite") or torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    else:
        assert any(r.get("skipped_nonfinite") for r in recs)
    for c in out.glob("checkpoint-*"):
        assert all(torch.isfinite(t).all() for t in _weights(c).values()), c


def test_resume_refuses_a_checkpoint_with_non_finite_weights(tmp_path):
    out = tmp_path / "run"
    train_sft(_cfg(out, max_steps=2), model=_model(), tokenizer=TOK, train_data=ROWS)
    last = latest_checkpoint(out)
    w = _weights(last)
    next(iter(w.values())).fill_(float("nan"))
    from safetensors.torch import save_file

    save_file(w, str(last / "model.safetensors"), metadata={"format": "pt"})
    ckpt_mod.write_checksums(last)  # a consistent checkpoint whose weights are NaN (e.g. saved by another tool)
    with pytest.raises(CheckpointError, match="non-finite weights"):
        train_sft(_cfg(out, max_steps=2, resume=True), model=_model(), tokenizer=TOK, train_data=ROWS)


# ---------------------------------------------------------------------------------------------------------------
# corrupt, truncated and incomplete checkpoints
# ---------------------------------------------------------------------------------------------------------------


def _two_checkpoint_run(out: Path) -> None:
    train_sft(_cfg(out, max_steps=4, save_every=2, keep_last=3), model=_model(), tokenizer=TOK, train_data=ROWS)


@pytest.mark.parametrize("damage", ["corrupt_weights", "truncate_state", "delete_state_tensors"])
def test_a_damaged_latest_is_reported_and_the_previous_checkpoint_used(tmp_path, damage, capsys):
    out = tmp_path / "run"
    _two_checkpoint_run(out)
    latest = latest_checkpoint(out)
    assert latest.name == "checkpoint-4"
    if damage == "corrupt_weights":
        f = latest / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "truncate_state":
        f = latest / ckpt_mod.STATE_TENSORS
        f.write_bytes(f.read_bytes()[:20])
    else:
        (latest / ckpt_mod.STATE_TENSORS).unlink()
    assert find_resumable(out).name == "checkpoint-2"
    assert "checkpoint-4" in capsys.readouterr().err
    train_sft(_cfg(out, max_steps=6, save_every=2, keep_last=3, resume=True, allow_config_change=["max_steps"]),
              model=_model(), tokenizer=TOK, train_data=ROWS)  # fmt: skip
    steps = [r["step"] for r in read_metrics(out)]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 3-4 were redone from checkpoint-2


def test_no_intact_checkpoint_is_an_error_naming_them(tmp_path):
    out = tmp_path / "run"
    _two_checkpoint_run(out)
    for c in out.glob("checkpoint-*"):
        (c / ckpt_mod.CHECKSUMS).write_text("{not json")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        find_resumable(out)


def test_missing_untied_lm_head_is_refused(tmp_path):
    out = tmp_path / "run"
    train_sft(_cfg(out, max_steps=2), model=_model(), tokenizer=TOK, train_data=ROWS)
    last = latest_checkpoint(out)
    w = _weights(last)
    del w["lm_head.weight"]
    from safetensors.torch import save_file

    save_file(w, str(last / "model.safetensors"), metadata={"format": "pt"})
    ckpt_mod.write_checksums(last)
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        ckpt_mod.load_model_weights(_model(), last)
    tied = _model(tie=True)  # a tied model saves no separate head: that is fine
    tied.save_pretrained(tmp_path / "tied")
    ckpt_mod.load_model_weights(_model(tie=True), tmp_path / "tied")


def test_partial_last_metrics_line_does_not_break_resume(tmp_path):
    out = tmp_path / "run"
    train_sft(_cfg(out, max_steps=2), model=_model(), tokenizer=TOK, train_data=ROWS)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # killed mid-write
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    train_sft(_cfg(out, max_steps=3, resume=True, allow_config_change=["max_steps"]), model=_model(), tokenizer=TOK,
              train_data=ROWS)  # fmt: skip
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------------------------
# a full disk
# ---------------------------------------------------------------------------------------------------------------


def test_too_little_free_space_is_refused_before_training(tmp_path, monkeypatch):
    real = ckpt_mod.shutil.disk_usage
    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(DiskFullError, match="needs"):
        train_sft(_cfg(tmp_path / "run"), model=_model(), tokenizer=TOK, train_data=ROWS)
    assert not read_metrics_exists(tmp_path / "run")


def read_metrics_exists(run: Path) -> bool:
    return (run / "metrics.jsonl").exists() and bool((run / "metrics.jsonl").read_text())


def test_disk_full_during_a_save_removes_the_partial_folder_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_write = ckpt_mod.write_state
    calls = {"n": 0}

    def enospc_on_third(folder, state):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(folder))
        return real_write(folder, state)

    monkeypatch.setattr(ckpt_mod, "write_state", enospc_on_third)
    with pytest.raises(DiskFullError, match=r"disk full at .*checkpoint-3 needed .* GB.*checkpoint-2 is intact"):
        train_sft(_cfg(out, max_steps=5, keep_last=3), model=_model(), tokenizer=TOK, train_data=ROWS)
    assert not list(out.glob(".tmp-checkpoint-*"))
    assert latest_checkpoint(out).name == "checkpoint-2"
    ckpt_mod.verify_checkpoint(out / "checkpoint-2")


# ---------------------------------------------------------------------------------------------------------------
# a kill during a save
# ---------------------------------------------------------------------------------------------------------------

KILL_IN_SAVE = r"""
import os, signal, sys
import alignkit.checkpoint as ck
from alignkit.data.byte_tokenizer import byte_tokenizer
from alignkit.demo import make_rows
from alignkit.loops.sft import SFTConfig, train_sft
from alignkit.models import build_tiny_model, tiny_llama_config

out, kill_step, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
real = ck.write_checksums
def die(folder):
    if folder.name.startswith(f".tmp-checkpoint-{kill_step}-"):
        os.kill(os.getpid(), signal.SIGKILL)  # mid-save: weights written, checksums not
    return real(folder)
ck.write_checksums = die
tok = byte_tokenizer()
model = build_tiny_model(tiny_llama_config(len(tok), hidden=32, layers=2, heads=2, kv_heads=2), seed=0)
rows = [{"messages": r["messages"]} for r in make_rows(96, 2, seed=0)]
cfg = SFTConfig(output_dir=out, chat_format="chatml", max_steps=5, save_every=1, batch_size=8, packing=False,
                lr=3e-3, progress=False, epochs=4, resume=resume)
train_sft(cfg, model=model, tokenizer=tok, train_data=rows)
"""


def test_kill_during_a_save_then_resume_completes(tmp_path):
    out = tmp_path / "run"
    run = lambda kill, resume: subprocess.run(  # noqa: E731
        [sys.executable, "-c", KILL_IN_SAVE, str(out), str(kill), "1" if resume else "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run(3, False).returncode == -9
    assert list(out.glob(".tmp-checkpoint-3-*")) and latest_checkpoint(out).name == "checkpoint-2"
    done = run(-1, True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert latest_checkpoint(out).name == "checkpoint-5" and not list(out.glob(".tmp-checkpoint-*"))
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------------------------------------------------------
# a reused run directory and a changed config
# ---------------------------------------------------------------------------------------------------------------


def test_a_fresh_run_in_a_used_directory_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    train_sft(_cfg(out, max_steps=4), model=_model(), tokenizer=TOK, train_data=ROWS)
    with pytest.raises(ConfigError, match="already holds files.*resume=true.*overwrite=true"):
        train_sft(_cfg(out, max_steps=2), model=_model(), tokenizer=TOK, train_data=ROWS)
    assert latest_checkpoint(out).name == "checkpoint-4"  # the old run is untouched
    train_sft(_cfg(out, max_steps=2, overwrite=True), model=_model(1), tokenizer=TOK, train_data=ROWS)
    assert latest_checkpoint(out).name == "checkpoint-2"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


def test_pruning_never_deletes_a_checkpoint_of_another_run(tmp_path):
    out = tmp_path / "run"
    train_sft(_cfg(out, max_steps=3), model=_model(), tokenizer=TOK, train_data=ROWS)
    foreign = out / "checkpoint-99"
    (out / "checkpoint-3").rename(foreign)  # e.g. copied in from another run: a different run id...
    state = json.loads((foreign / ckpt_mod.STATE_JSON).read_text())
    state["__dict__"]["run_id"] = "someone-else"
    (foreign / ckpt_mod.STATE_JSON).write_text(json.dumps(state))
    ckpt_mod.write_checksums(foreign)
    (out / "latest").write_text("checkpoint-2")
    train_sft(_cfg(out, max_steps=6, resume=True, allow_config_change=["max_steps"]), model=_model(), tokenizer=TOK,
              train_data=ROWS)  # fmt: skip
    assert foreign.is_dir()
    assert latest_checkpoint(out).name == "checkpoint-6"


def test_resume_with_a_changed_config_is_refused_naming_the_keys(tmp_path):
    out = tmp_path / "run"
    train_sft(_cfg(out, max_steps=5, schedule="linear"), model=_model(), tokenizer=TOK, train_data=ROWS)
    with pytest.raises(ConfigError, match=r"5 -> 7 optimizer steps.*allow_config_change=max_steps"):
        train_sft(_cfg(out, max_steps=7, schedule="linear", resume=True), model=_model(), tokenizer=TOK,
                  train_data=ROWS)  # fmt: skip
    # allowed: the schedule is the new run's, so step 6 does not train at the old schedule's final lr of 0
    train_sft(_cfg(out, max_steps=7, schedule="linear", resume=True, allow_config_change=["max_steps"]),
              model=_model(), tokenizer=TOK, train_data=ROWS)  # fmt: skip
    recs = {r["step"]: r for r in read_metrics(out)}
    assert recs[6]["lr"] > 0 and recs[7]["lr"] > 0
    # other trajectory keys are refused before anything is loaded, naming them
    with pytest.raises(ConfigError, match=r"lr: 0.003 -> 0.001.*allow_config_change=lr"):
        train_sft(_cfg(out, max_steps=7, schedule="linear", resume=True, lr=1e-3), model=None, tokenizer=TOK,
                  train_data=ROWS)  # fmt: skip
    # observation keys may change freely
    train_sft(_cfg(out, max_steps=7, schedule="linear", resume=True, allow_config_change=["max_steps"], log_every=3,
                   keep_last=4), model=_model(), tokenizer=TOK, train_data=ROWS)  # fmt: skip


def test_config_errors_name_the_key_before_any_model_is_loaded(tmp_path, capsys):
    for bad, key in [("grad_accum=0", "grad_accum"), ("batch_size=-1", "batch_size"), ("max_length=0", "max_length"),
                     ("schedule=cosin", "schedule"), ("lr=-1", "lr")]:  # fmt: skip
        rc = main(["sft", "model=/does/not/exist", "dataset=x.jsonl", f"output_dir={tmp_path / 'r'}", bad])
        assert rc != 0
        assert key in capsys.readouterr().err
    rc = main(["kto", "model=/does/not/exist", "dataset=x.jsonl", f"output_dir={tmp_path / 'k'}", "beta=-1"])
    assert rc != 0 and "beta" in capsys.readouterr().err
    rc = main(["dpo", "model=/does/not/exist", "dataset=x.jsonl", f"output_dir={tmp_path / 'd'}", "loss_type=sigmoidd"])
    assert rc != 0 and "loss_type" in capsys.readouterr().err


def test_an_unwritable_output_dir_fails_before_loading(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a folder cannot be made inside a file (permission bits would not stop root)
    with pytest.raises(ConfigError, match="output_dir=.*not writable"):
        train_sft(_cfg(blocker / "run"), model=None, tokenizer=None, train_data=ROWS)


# ---------------------------------------------------------------------------------------------------------------
# untrusted training state
# ---------------------------------------------------------------------------------------------------------------


def test_resume_never_unpickles_the_training_state(tmp_path):
    out = tmp_path / "run"
    train_sft(_cfg(out, max_steps=2), model=_model(), tokenizer=TOK, train_data=ROWS)
    last = latest_checkpoint(out)
    assert not list(last.glob("*.pt")) and not list(last.glob("*.pkl"))
    marker = tmp_path / "PWNED"
    (last / "trainer_state.pt").write_bytes(pickle.dumps((Path.write_text, (marker, "x"))))
    train_sft(_cfg(out, max_steps=3, resume=True, allow_config_change=["max_steps"]), model=_model(), tokenizer=TOK,
              train_data=ROWS)  # fmt: skip
    assert not marker.exists()
    json.loads((last / ckpt_mod.STATE_JSON).read_text())  # the state is plain JSON + safetensors


def _listening(port: int) -> list[str]:
    """Local addresses listening on TCP ``port`` (from /proc/net/tcp and tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            ip, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.append(ip)
    return found


def test_weight_sync_store_listens_on_loopback_only():
    from alignkit.rollout._vllm_worker import make_store

    store = make_store("127.0.0.1", 0, 0, 2, 10)
    client = make_store("127.0.0.1", store.port, 1, 2, 10)
    store.set("k", b"v")
    assert client.get("k") == b"v"
    assert _listening(store.port) == ["0100007F"]  # 127.0.0.1 only, not 0.0.0.0 / ::


# ---------------------------------------------------------------------------------------------------------------
# rewards that break (the full set is tests/test_reward_failures.py)
# ---------------------------------------------------------------------------------------------------------------


def test_an_inf_reward_stops_grpo_with_an_error_naming_the_reward(tmp_path):
    from alignkit.loops.grpo import GRPOConfig, train_grpo

    def exploding(prompts, completions, completion_ids, **columns):  # noqa: ANN001, ANN202
        return [float("inf")] + [0.0] * (len(completions) - 1)

    end = TOK.convert_tokens_to_ids("<|im_end|>")
    model = build_tiny_model(tiny_llama_config(len(TOK), hidden=32, layers=2, eos_token_id=end), seed=0)
    cfg = GRPOConfig(output_dir=str(tmp_path / "g"), group_size=2, prompts_per_step=2, max_new_tokens=3,
                     max_steps=2, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="exploding.*inf"):
        train_grpo(cfg, model=model, tokenizer=TOK, train_data=[{"prompt": f"q{i}:"} for i in range(4)],
                   reward_funcs=[exploding])  # fmt: skip
    assert not list((tmp_path / "g").glob("checkpoint-*"))  # nothing trained on it


def test_metrics_are_strict_json_with_null_for_non_finite(tmp_path):
    """A skipped step's non-finite loss is logged as null: every line parses as strict JSON (no bare NaN)."""
    model = _model()
    nan = NaNAt(model, steps={2})
    train_sft(_cfg(tmp_path / "run", max_steps=3), model=model, tokenizer=TOK, train_data=ROWS, callbacks=[nan.after])
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()

    def refuse(token: str) -> None:
        raise ValueError(f"non-strict JSON constant {token}")

    recs = {r["step"]: r for r in (json.loads(ln, parse_constant=refuse) for ln in lines)}
    assert recs[2]["skipped_nonfinite"] is True and recs[2]["loss"] is None
    assert isinstance(recs[3]["loss"], float)


def test_final_model_is_a_stable_path_to_the_last_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    train_sft(_cfg(run, max_steps=3), model=_model(), tokenizer=TOK, train_data=ROWS)
    final = run / "final_model"
    assert final.is_symlink() and final.resolve() == (run / "checkpoint-3").resolve()
    loaded = AutoModelForCausalLM.from_pretrained(final)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in _weights(run / "checkpoint-3").items())
    train_sft(_cfg(run, max_steps=5, resume=True, allow_config_change=["max_steps"]), model=_model(), tokenizer=TOK,
              train_data=ROWS)  # fmt: skip
    assert final.resolve() == (run / "checkpoint-5").resolve()  # a longer resumed run moves it
