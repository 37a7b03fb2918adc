"""Shared fixtures. `demo_run` trains the embedded demo once per session (the SFT'd tiny model other
learning tests start from: DPO, GRPO, ...)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> dict:
    """{"dir": run dir, "checkpoint": HF folder of the final SFT model, "result": demo_result.json}."""
    from alignkit.checkpoint import latest_checkpoint
    from alignkit.demo import DemoConfig, run_demo

    out = tmp_path_factory.mktemp("demo")
    run_demo(DemoConfig(output_dir=str(out), progress=False))
    return {
        "dir": Path(out),
        "checkpoint": latest_checkpoint(out),
        "result": json.loads((Path(out) / "demo_result.json").read_text()),
    }


def _hypothesis_profile() -> None:
    """In CI (CI=true) hypothesis runs derandomized: the same examples every run, so a red build is
    reproducible and never a coin flip. Locally it explores new examples each run."""
    import os

    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")


_hypothesis_profile()
