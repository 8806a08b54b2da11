"""Reward model on K-way rankings, tiny scale.

    rlhf-jax rm --config experiments/tiny_rm.py --workdir runs/rm \\
        --config.init_from=runs/sft/model --config.data.train=comparisons.jsonl
"""
from rlhf_jax.config import rm_config


def get_config(arg=None):
    return rm_config()
