"""Fig. 34 / 36: the KL reward coefficient beta, 0 and 1e-3..1 (log x), with gamma = 0 (the
pipeline's `ppo` stage): capability and validation reward (Fig. 34), and the held-out labelers'
preference over SFT (Fig. 36: the paper's optimum is near 0.01-0.02, poor at 0 and 2).

    rlhf-jax sweep --config experiments/sweep_kl.py --workdir runs/sweep_kl
"""
import os

from rlhf_jax.config import load_config, sweep_config

PIPELINE = os.path.join(os.path.dirname(__file__), "instructgpt_tiny.py")
UPSTREAM = ("world", "pretrain", "sft", "sft_ptx", "comparisons", "rm")


def get_config(arg=None):
    base = load_config(PIPELINE + (f":{arg}" if arg else ""))
    values = (0.0, 1e-3, 1e-2, 1e-1, 1.0) if arg != "micro" else (0.0, 1e-2)
    return sweep_config(base, name="kl_coef", shared=UPSTREAM, stages=("ppo",), models=("ppo",),
                        x="ppo.ppo.kl_coef",
                        points=[{"name": f"beta={v:g}", "set": {"ppo.ppo.kl_coef": v}}
                                for v in values])
