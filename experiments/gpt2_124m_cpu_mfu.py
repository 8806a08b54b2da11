"""GPT-2 124M shapes at a compute-bound size for one CPU host: what ``rlhf-jax profile`` needs to
report the SFT and PPO update steps' share of this machine's matmul peak (MFU)::

    JAX_PLATFORMS=cpu rlhf-jax profile --config experiments/gpt2_124m_cpu_mfu.py --stage sft \\
        --phases train --steps 2 --out bench/results/mfu_gpt2_124m_sft.json
    JAX_PLATFORMS=cpu rlhf-jax profile --config experiments/gpt2_124m_cpu_mfu.py --stage ppo \\
        --phases update,value_update --steps 2 --out bench/results/mfu_gpt2_124m_ppo.json

experiments/gpt2_124m.py's architecture (d_model 768, 12 layers, 12 heads, vocabulary 50257) with
sequences of 512 tokens (prompt 256 + response 256), float32 (bfloat16 matmuls are slower than
float32 on CPUs without AMX), one device, no remat, unscanned layers, and batches a 2-core host
steps through in seconds: SFT 2 sequences, PPO minibatches of 2 episodes. PPO is profiled without
the ptx term (it adds an SFT-like pass to the same update, see the SFT figure).
"""
import os

from rlhf_jax.config import load_config

PROMPT_LEN, RESPONSE_LEN = 256, 256


def get_config(arg=None):
    c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpt2_124m.py"))
    for stage in (c.sft, c.rm, c.ppo):
        stage.model_runtime.dtype = "float32"
        stage.model_runtime.remat = False
        stage.model_runtime.scan_layers = False
        stage.mesh.shape = (1, 1, 1)
        stage.data.max_prompt_len = PROMPT_LEN
        stage.data.max_response_len = RESPONSE_LEN
    c.sft.train.batch_size = 2
    c.sft.train.dropout = 0.0
    c.rm.train.batch_size = 1
    c.rm.data.max_k = 4
    p = c.ppo.ppo
    p.rollout_batch_size = p.minibatch_size = 2
    p.ptx_coef = 0.0
    p.frozen_dtype = "float32"
    p.logprob_chunk = 0
    p.ema_decay = 0.0
    c.ppo.data.ptx_seq_len = PROMPT_LEN + RESPONSE_LEN
    return c
