"""Llama-3-8B policy with a Llama-3.2-3B-shaped RM and value, SFT/RM/PPO-ptx at InstructGPT's
batch geometry, on a v5p 4x4x4 slice (64 chips).

A pod-shape config for ahead-of-time checks and profiling, no data paths::

    JAX_PLATFORMS=cpu rlhf-jax compile --config experiments/llama3_8b.py --topology v5p:4x4x4 \\
        --out bench/compile_reports/llama3_8b_v5p-4x4x4.json

Networks:
* policy (and the frozen reference): Llama-3-8B, vocab 128256, d 4096, 32 layers, 32 heads,
  8 KV heads, d_ff 14336, RoPE theta 500000, untied head.
* RM and value: Llama-3.2-3B-shaped (d 3072, 28 layers, 24 heads, 8 KV heads, d_ff 8192, tied
  embeddings), trained by the RM stage from its own base (``rm_model``), not from the 8B SFT.
  The paper used one 6B RM for every policy size (175B RMs were unstable and costlier); Llama 3
  has no 6B, and the 3B is the largest smaller model on the same tokenizer, which an RM needs to
  score the policy's tokens. The value network is initialized from the RM, as in the paper.
* RoPE with Llama 3.1's frequency scaling ("rope_type": "llama3": factor 8 for the 8B, 32 for
  the 3.2 family; low/high frequency factors 1/4; original context 8192), as the Llama-3.1-8B
  and Llama-3.2 checkpoints ship; it changes neither shapes, memory nor FLOPs.

Geometry (paper, arXiv:2203.02155 App. C), unscaled: prompt 512 + response 256 = 768 tokens;
SFT batch 32 (the paper's for 1.3B and 6B), 16 epochs, dropout 0.2; RM 64 prompts x K = 9 (576
sequences per step), 1 epoch; PPO-ptx 512 episodes per rollout, minibatch 64, 8 pretraining
sequences (768 tokens) per episode: 512 ptx + 64 RL sequences in every update, gamma = 27.8.

Layout: mesh (1, 16, 4): FSDP over 16 and tensor parallelism over 4 (heads 32/4, KV heads 8/4,
d_ff, vocab 128256/4; the 3B's 24 heads too). Batches are split over data x fsdp = 16, which
SFT's 32 sequences divide (pure FSDP over 64 would need batches of 64), and the tensor axis
quarters each chip's share of the attention maps and logits. bfloat16 compute, float32
parameters, remat + scanned layers; frozen reference and RM in bfloat16; LM-head log-probs in
blocks of 64 positions.
"""
from rlhf_jax.config import paper_pod_config

LLAMA3_8B = dict(arch="llama", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32,
                 n_kv_heads=8, d_ff=14336, max_position=8192, rope_theta=500000.0,
                 rope_scaling="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
                 rope_high_freq_factor=4.0, rope_original_max_position=8192,
                 norm_eps=1e-5, tie_embeddings=False)
LLAMA32_3B = dict(arch="llama", vocab_size=128256, d_model=3072, n_layers=28, n_heads=24,
                  n_kv_heads=8, d_ff=8192, max_position=131072, rope_theta=500000.0,
                  rope_scaling="llama3", rope_factor=32.0, rope_low_freq_factor=1.0,
                  rope_high_freq_factor=4.0, rope_original_max_position=8192,
                  norm_eps=1e-5, tie_embeddings=True)
MESH = (1, 16, 4)
RUNTIME = dict(dtype="bfloat16", remat=True, scan_layers=True)
CHUNK = 64


def get_config(arg=None):
    c = paper_pod_config(LLAMA3_8B, mesh=MESH, runtime=RUNTIME, logprob_chunk=CHUNK,
                         rm_model=LLAMA32_3B)   # the RM (and value) architecture
    return c
