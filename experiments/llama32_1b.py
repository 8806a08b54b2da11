"""Llama-3.2-1B through SFT, RM and PPO-ptx at InstructGPT's batch geometry, on a v5e 4x4 (16 chips).

A pod-shape config for ahead-of-time checks and profiling, no data paths (set ``base_model`` to
a local transformers Llama-3.2-1B directory and the data paths to run it)::

    JAX_PLATFORMS=cpu rlhf-jax compile --config experiments/llama32_1b.py --topology v5e:4x4 \\
        --out bench/compile_reports/llama32_1b_v5e-4x4.json

Networks: policy, reference, RM and value all Llama-3.2-1B-shaped (vocab 128256, d 2048, 16
layers, 32 heads, 8 KV heads, d_ff 8192, tied embeddings, RoPE theta 500000). The paper trains
one 6B RM for every policy size; at 1B the pipeline's default (RM = SFT network with a scalar
head) keeps the RM on the policy's tokenizer and within a v5e's 16 GB. RoPE uses Llama 3's
frequency scaling as the released checkpoint does (factor 32, low/high 1/4, original 8192).

Geometry (paper, arXiv:2203.02155 App. C), unscaled: prompt 512 + response 256 = 768 tokens;
SFT batch 32, 16 epochs, dropout 0.2; RM 64 prompts x K = 9 (576 sequences per step), 1 epoch;
PPO-ptx 512 episodes per rollout, minibatch 64, 8 pretraining sequences (768 tokens) per
episode: 512 ptx + 64 RL sequences in every update, one epoch, gamma = 27.8.

Layout: FSDP over all 16 chips, mesh (1, 16, 1): parameters, gradients and Adam moments sharded
16 ways (the PPO state, policy + EMA + value, is ~35 GB in float32, 2.2 GB per chip); batches
split 16 ways (32 SFT sequences = 2 per chip). Tensor parallelism would not shrink the part that
limits v5e here: the [B, heads, T, T] attention maps are divided by 16 either way. bfloat16
compute, float32 parameters, remat + scanned layers everywhere; the frozen reference and RM in
bfloat16; LM-head log-probs in blocks of 32 positions (a float32 [36, 32, 128256] block is
0.6 GB per chip).
"""
from rlhf_jax.config import paper_pod_config

LLAMA32_1B = dict(arch="llama", vocab_size=128256, d_model=2048, n_layers=16, n_heads=32,
                  n_kv_heads=8, d_ff=8192, max_position=131072, rope_theta=500000.0,
                  rope_scaling="llama3", rope_factor=32.0, rope_low_freq_factor=1.0,
                  rope_high_freq_factor=4.0, rope_original_max_position=8192,
                  norm_eps=1e-5, tie_embeddings=True)
MESH = (1, 16, 1)
RUNTIME = dict(dtype="bfloat16", remat=True, scan_layers=True)
CHUNK = 32


def get_config(arg=None):
    c = paper_pod_config(LLAMA32_1B, mesh=MESH, runtime=RUNTIME, logprob_chunk=CHUNK)
    return c
