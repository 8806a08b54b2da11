"""Fig. 1 / 3 and the alignment tax by size (Fig. 28/29, Table 14): three policy sizes, each
with its own pretraining, SFT, SFT-ptx, PPO and PPO-ptx, all judged against the *largest* SFT
model. One RM for every size (trained from the largest SFT), as the paper used one 6B RM for
every policy size; the value networks start from it too.

    rlhf-jax sweep --config experiments/sweep_sizes.py --workdir runs/sweep_sizes
    rlhf-jax sweep --config experiments/sweep_sizes.py --workdir runs/sweep_sizes \\
        --config.shared_from=runs/seeds/points/seed=0     # the largest size is the default run
"""
import os

from rlhf_jax.config import load_config, sweep_config

PIPELINE = os.path.join(os.path.dirname(__file__), "instructgpt_tiny.py")
# The largest is the default pipeline's model (instructgpt_tiny.MODEL).
SIZES = {"small": dict(d_model=64, n_layers=2, d_ff=256),
         "medium": dict(d_model=96, n_layers=3, d_ff=384)}
MICRO_SIZES = {"small": dict(d_model=16, n_layers=1, d_ff=32)}
POLICY_STAGES = ("pretrain", "sft", "sft_ptx", "ppo", "ppo_ptx")
MODELS = ("base", "base_prompted", "sft", "ppo", "ppo_ptx")


def get_config(arg=None):
    base = load_config(PIPELINE + (f":{arg}" if arg else ""))
    # Every size judged against the largest SFT, and its PPO-ptx head to head against the
    # largest base LM (Fig. 1's "1.3B InstructGPT preferred to 175B GPT-3").
    reference = {"eval.reference_sft": "{shared}/sft/model", "eval.reference_base": "{shared}/pretrain/model"}
    points = []
    for name, shape in (MICRO_SIZES if arg == "micro" else SIZES).items():
        points.append({"name": name, "shared": ("world", "comparisons", "rm"),
                       "stages": POLICY_STAGES,
                       "set": {**{f"pretrain.model.{k}": v for k, v in shape.items()},
                               **reference}})
    points.append({"name": "large", "shared": ("world",) + POLICY_STAGES[:3] + (
        "comparisons", "rm") + POLICY_STAGES[3:], "stages": (), "set": reference})
    return sweep_config(base, name="sizes", shared=(), stages=POLICY_STAGES, models=MODELS,
                        x="pretrain.model.d_model", points=points)
