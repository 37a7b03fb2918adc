"""Shared fixtures. `demo_run` trains the embedded demo once per session (the SFT'd tiny model other
learning tests start from: DPO, GRPO, ...). The preference-loop tests share a tiny model config, chat rows and a
loop-config builder (`preference_rows`, `loop_config`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

U = lambda s: {"role": "user", "content": s}  # noqa: E731
A = lambda s: {"role": "assistant", "content": s}  # noqa: E731


def preference_rows(n: int) -> list[dict]:
    """`n` conversational pairs "a+a": chosen the right sum, rejected a wrong one of varying length."""
    return [
        {"prompt": [U(f"{a}+{a}")], "chosen": [A(str(2 * a))], "rejected": [A(str(2 * a + 1) * (1 + a % 3))]}
        for a in range(n)
    ]


def reproducible_env() -> dict[str, str]:
    """The environment for a subprocess whose weights a test compares bit for bit with another process's: MKL's
    conditional bitwise reproducibility (``MKL_CBWR``), without which a matmul's last bit can depend on how its
    buffers happen to be aligned in memory, so two identical runs differ by an ulp now and then."""
    import os

    return {**os.environ, "MKL_CBWR": "AUTO"}


def loop_config(cls: type, tmp_path: Path, name: str, **kw):  # noqa: ANN201
    """A DPO / KTO config for the tiny-model loop tests: the run under `tmp_path/name`, a shared reference cache."""
    base = dict(
        output_dir=str(tmp_path / name),
        chat_format="chatml",
        batch_size=8,
        max_steps=2,
        lr=1e-2,
        reference_cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    return cls(**{**base, **kw})


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: tiny tensors and models gain nothing from more, and on a busy 2-core box
    the threads' synchronisation costs 10-25x. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def close(a, b, atol: float = 1e-5, rtol: float = 1e-4) -> None:  # noqa: ANN001
    """``assert_close`` in float64 at the loss tests' tolerances (docs/LOSSES.md §9: atol 1e-5, rtol 1e-4)."""
    torch.testing.assert_close(torch.as_tensor(a).double(), torch.as_tensor(b).double(), atol=atol, rtol=rtol)


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
