"""Fig. 35: capability (and preference) against PPO-ptx training episodes (log x). Each point is
its own run of that length (its warm-up and learning-rate schedule scale with it).

    rlhf-jax sweep --config experiments/sweep_episodes.py --workdir runs/sweep_episodes
"""
import os

from rlhf_jax.config import load_config, sweep_config

PIPELINE = os.path.join(os.path.dirname(__file__), "instructgpt_tiny.py")
UPSTREAM = ("world", "pretrain", "sft", "sft_ptx", "comparisons", "rm")


def get_config(arg=None):
    base = load_config(PIPELINE + (f":{arg}" if arg else ""))
    rollout = base.ppo.ppo.rollout_batch_size
    iterations = (8, 30, 120) if arg != "micro" else (1, 2)
    return sweep_config(base, name="episodes", shared=UPSTREAM, stages=("ppo_ptx",),
                        models=("ppo_ptx",), x="ppo.ppo.iterations",
                        points=[{"name": f"episodes={n * rollout}",
                                 "set": {"ppo.ppo.iterations": n,
                                         "ppo.ppo.warmup_iterations": max(1, n // 12)}}
                                for n in iterations])
