"""The default pipeline at 3 seeds (the world, its labelers and every stage's training): which of
the paper's findings hold at every seed (sweep.md's "Findings across points").

    rlhf-jax sweep --config experiments/sweep_seeds.py --workdir runs/seeds
"""
import os

from rlhf_jax.config import load_config, sweep_config
from rlhf_jax.pipeline import STAGES

PIPELINE = os.path.join(os.path.dirname(__file__), "instructgpt_tiny.py")
TRAINED = tuple(f"{stage}.seed" for stage in ("pretrain", "sft", "sft_ptx", "rm", "ppo"))


def get_config(arg=None):
    base = load_config(PIPELINE + (f":{arg}" if arg else ""))
    return sweep_config(base, name="seeds", shared=(), stages=STAGES[:-1], models=None, x="seed",
                        points=[{"name": f"seed={s}", "set": {
                            key: s for key in ("seed", "world.seed", *TRAINED)}}
                                for s in ((0, 1) if arg == "micro" else (0, 1, 2))])
