"""Fig. 33: the pretraining coefficient gamma of PPO-ptx, 0..100 (log x), against capability and
the validation reward (RM score on held-out prompts). SFT, RM and the PPO init are trained once.

    rlhf-jax sweep --config experiments/sweep_ptx.py --workdir runs/sweep_ptx
    rlhf-jax sweep --config experiments/sweep_ptx.py --workdir runs/sweep_ptx \\
        --config.shared_from=runs/seeds/points/seed=0      # reuse a finished pipeline's stages
"""
import os

from rlhf_jax.config import load_config, sweep_config

PIPELINE = os.path.join(os.path.dirname(__file__), "instructgpt_tiny.py")
UPSTREAM = ("world", "pretrain", "sft", "sft_ptx", "comparisons", "rm")


def get_config(arg=None):
    base = load_config(PIPELINE + (f":{arg}" if arg else ""))
    values = (0.0, 1.0, 10.0, 100.0) if arg != "micro" else (0.0, 10.0)
    return sweep_config(base, name="ptx_coef", shared=UPSTREAM, stages=("ppo_ptx",),
                        models=("ppo_ptx",), x="ppo_ptx_coef",
                        points=[{"name": f"gamma={v:g}", "set": {"ppo_ptx_coef": v}}
                                for v in values])
