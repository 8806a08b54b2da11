"""Methods from the same SFT and RM, one table: PPO, PPO-ptx, DPO, GRPO and RLOO.

PPO and PPO-ptx are the shared workdir's own (trained once); DPO trains SFT on the RM's
comparisons, GRPO and RLOO are the ppo stage (from sft_ptx, the RM as reward, PPO's episodes)
with group baselines of ``group_size`` samples per prompt instead of a value network. sweep.json
holds each method's win rate vs SFT with its CI, gold score, KL and capability; the point's
``stage_seconds`` are the new methods' wall times, ``shared_stage_seconds`` PPO's and PPO-ptx's.

    rlhf-jax sweep --config experiments/sweep_methods.py --workdir runs/sweep_methods \
        --config.shared_from=runs/seeds/points/seed=0
"""
import os

from rlhf_jax.config import load_config, sweep_config

PIPELINE = os.path.join(os.path.dirname(__file__), "instructgpt_tiny.py")
SHARED = ("world", "pretrain", "sft", "sft_ptx", "comparisons", "rm", "ppo", "ppo_ptx")
METHODS = ("dpo", "grpo", "rloo")


def get_config(arg=None):
    base = load_config(PIPELINE + (f":{arg}" if arg else ""))
    return sweep_config(base, name="methods", shared=SHARED, stages=METHODS,
                        models=("ppo", "ppo_ptx") + METHODS, x="",
                        points=[{"name": "methods", "set": {}}])
