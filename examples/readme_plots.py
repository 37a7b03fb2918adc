"""The README's curves: the demo (SFT, then its GRPO stage) and DPO on the same task, plotted with the loops'
default panels into docs/images/. No downloads, no GPU; about 4 minutes on 2 CPU cores.

    python examples/readme_plots.py [--out runs/readme-plots]

DPO starts from an SFT model stopped early (140 steps: about 70% held-out exact match, room to improve); its
pairs are chosen = the right answer, rejected = an answer one digit away.
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

from alignkit import demo
from alignkit.checkpoint import FINAL_MODEL
from alignkit.loops.dpo import DPOConfig, train_dpo
from alignkit.models import load_model_and_tokenizer
from alignkit.plot import plot_run

IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"


def one_digit_off(answer: str, rng: random.Random) -> str:
    pos = rng.randrange(len(answer))
    digit = (int(answer[pos]) + rng.choice([1, 9])) % 10
    wrong = answer[:pos] + str(digit) + answer[pos + 1 :]
    return wrong if wrong != answer and (len(wrong) == 1 or wrong[0] != "0") else str(int(answer) + 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/readme-plots")
    args = parser.parse_args()
    out = Path(args.out)
    IMAGES.mkdir(parents=True, exist_ok=True)

    # the demo as `alignkit demo` runs it: SFT, then GRPO (its run in OUT/demo/grpo)
    demo.run_demo(demo.DemoConfig(output_dir=str(out / "demo"), progress=False))
    shutil.copy(plot_run(out / "demo" / "grpo", title="GRPO stage of alignkit demo"), IMAGES / "grpo_demo.png")

    # DPO from a weaker SFT start on the same task
    demo.run_demo(demo.DemoConfig(output_dir=str(out / "weak"), steps=140, grpo_steps=0, progress=False))
    model, tokenizer = load_model_and_tokenizer(str(out / "weak" / FINAL_MODEL))
    rng = random.Random(0)
    rows = demo.make_rows(800, 3, seed=0)
    wrong = [{"role": "assistant", "content": one_digit_off(r["answer"], rng)} for r in rows]
    pairs = [{"prompt": r["messages"][:1], "chosen": r["messages"][1:], "rejected": [w]} for r, w in zip(rows, wrong)]
    cfg = DPOConfig(output_dir=str(out / "dpo"), overwrite=True, chat_format=demo.FORMAT, beta=0.1, lr=1e-4,
                    batch_size=32, max_steps=60, log_every=2, progress=False,
                    reference_cache_dir=str(out / "reference-cache"))  # fmt: skip
    train_dpo(cfg, model=model, tokenizer=tokenizer, train_data=pairs)
    shutil.copy(plot_run(out / "dpo", title="DPO on the demo task"), IMAGES / "dpo_demo.png")
    print(f"wrote {IMAGES / 'grpo_demo.png'} and {IMAGES / 'dpo_demo.png'}")


if __name__ == "__main__":
    main()
