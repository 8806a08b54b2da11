"""SFT on a tiny model (a smoke-test scale; the pipeline config composes real runs).

    rlhf-jax sft --config experiments/tiny_sft.py --workdir runs/sft \\
        --config.tokenizer=DIR --config.data.train=demos.jsonl
"""
from rlhf_jax.config import sft_config


def get_config(arg=None):
    return sft_config()
