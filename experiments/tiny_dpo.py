"""DPO on K-way rankings (or TRL chosen/rejected pairs), tiny scale.

    rlhf-jax dpo --config experiments/tiny_dpo.py --workdir runs/dpo \\
        --config.init_from=runs/sft/model --config.data.train=comparisons.jsonl
"""
from rlhf_jax.config import dpo_config


def get_config(arg=None):
    return dpo_config()
