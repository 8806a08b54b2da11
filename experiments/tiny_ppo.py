"""PPO / PPO-ptx at tiny scale. InstructGPT's values in comments; CPU-sized defaults.

    rlhf-jax ppo --config experiments/tiny_ppo.py --workdir runs/ppo \\
        --config.policy_from=runs/sft_ptx/model --config.reward_from=runs/rm/model \\
        --config.data.prompts=ppo_prompts.jsonl

PPO-ptx: add ``--config.ppo.ptx_coef=27.8 --config.data.pretrain=pretrain.jsonl``.
"""
from rlhf_jax.config import ppo_config


def get_config(arg=None):
    return ppo_config()
