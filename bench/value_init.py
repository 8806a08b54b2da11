"""Where the value network starts: the RM raw, or the RM with its normalization folded in.

    JAX_PLATFORMS=cpu python bench/value_init.py --workdir runs/tiny \\
        [--config experiments/instructgpt_tiny.py] [--iterations 3] \\
        [--out bench/results/value_init_tiny.json]

``--workdir`` is a finished pipeline run (its sft_ptx and rm models). PPO runs twice from there
for a few iterations, identical but for ``value_init_normalized``: with it off the value head
predicts the RM's raw score, while the returns PPO regresses on are built from the normalized
one (raw minus the demonstrations' mean). Iteration 1's rollouts are the same in both runs (the
value network does not sample), so its value statistics compare the two starting points directly.
Explained variance is 1 - Var(returns - values) / Var(returns): a constant offset does not move
it; the value loss and the value clip fraction show the offset.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

from out_path import add_out_argument, out_path
from rlhf_jax.config import load_config
from rlhf_jax.pipeline import ppo_stage_config
from rlhf_jax.stages import ppo

KEYS = {"value_loss": "loss/value_avg", "explained_variance": "val/var_explained",
        "value_clip_fraction": "val/clipfrac_avg", "score": "objective/scores"}


def run(config: str, workdir: str, iterations: int) -> dict:
    cfg = load_config(config)
    rows = {}
    for normalized in (False, True):
        stage = ppo_stage_config(cfg, workdir, "ppo")
        stage.ppo.iterations = iterations
        stage.value_init_normalized = normalized
        with tempfile.TemporaryDirectory() as out:
            ppo.train(stage, out)
            with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
                metrics = [json.loads(line) for line in f]
        rows["normalized" if normalized else "raw"] = [
            {"iteration": m["step"], **{k: m[v] for k, v in KEYS.items()}} for m in metrics]
    with open(os.path.join(workdir, "rm", "model", "extra.json"), encoding="utf-8") as f:
        norm = json.load(f).get("reward_norm")
    return {"config": config, "workdir": os.path.abspath(workdir), "reward_norm": norm,
            "iterations": iterations, "value_init": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a finished `rlhf-jax pipeline` run")
    parser.add_argument("--config", default="experiments/instructgpt_tiny.py")
    parser.add_argument("--iterations", type=int, default=3)
    add_out_argument(parser, "value_init_tiny")
    args = parser.parse_args()
    out = out_path(args.out, "value_init_tiny")
    result = run(args.config, args.workdir, args.iterations)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"{'init':<11} {'iter':>4} {'value loss':>10} {'expl. var':>9} {'v-clip':>6}")
    for name, rows in result["value_init"].items():
        for row in rows:
            print(f"{name:<11} {row['iteration']:>4} {row['value_loss']:>10.3f} "
                  f"{row['explained_variance']:>9.3f} {row['value_clip_fraction']:>6.3f}")


if __name__ == "__main__":
    main()
