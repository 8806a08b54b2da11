"""Llama-3-70B policy with a Llama-3-8B-shaped RM and value, SFT/RM/PPO-ptx at InstructGPT's
batch geometry, on a v5p 8x8x8 slice (512 chips).

A pod-shape config for ahead-of-time checks, no data paths::

    JAX_PLATFORMS=cpu rlhf-jax compile --config experiments/llama3_70b.py --topology v5p:8x8x8 \\
        --stage ppo --out bench/compile_reports/llama3_70b_v5p-8x8x8.json

Networks:
* policy (and the frozen reference): Llama-3-70B, vocab 128256, d 8192, 80 layers, 64 heads,
  8 KV heads, d_ff 28672, RoPE theta 500000 with Llama 3.1's frequency scaling, untied head.
* RM and value: Llama-3-8B-shaped (``llama3_8b.LLAMA3_8B`` with a scalar head): the paper's 175B
  policy was trained against a 6B RM; the 8B is the nearest Llama 3 size on the same tokenizer.

Geometry (paper, arXiv:2203.02155 App. C): prompt 512 + response 256; SFT batch 32; RM 64
prompts x K = 9; PPO-ptx 512 episodes per rollout, minibatch 64, 8 pretraining sequences per
episode, gamma = 27.8, EMA 0.992.

Layout: mesh (2, 32, 8): FSDP over 32, tensor parallelism over 8 (64 heads / 8, the 8 KV heads
one per device, d_ff, vocab), two data-parallel replicas of that. Batches split over data x
fsdp = 64: SFT's 32 sequences do not divide it, so SFT here takes 64 (two of the paper's
batches per step). The rollout decodes from the sampler's layout (``ppo.sampler``): the 70B
policy resharded once per rollout into bfloat16 weights over tensor 8, each of the 64 data x
fsdp groups decoding 8 of the 512 prompts.
"""
from rlhf_jax.config import paper_pod_config

LLAMA3_70B = dict(arch="llama", vocab_size=128256, d_model=8192, n_layers=80, n_heads=64,
                  n_kv_heads=8, d_ff=28672, max_position=8192, rope_theta=500000.0,
                  rope_scaling="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
                  rope_high_freq_factor=4.0, rope_original_max_position=8192,
                  norm_eps=1e-5, tie_embeddings=False)
LLAMA3_8B = dict(LLAMA3_70B, d_model=4096, n_layers=32, n_heads=32, d_ff=14336)
MESH = (2, 32, 8)
RUNTIME = dict(dtype="bfloat16", remat=True, scan_layers=True)
CHUNK = 64


def get_config(arg=None):
    c = paper_pod_config(LLAMA3_70B, mesh=MESH, runtime=RUNTIME, logprob_chunk=CHUNK,
                         rm_model=LLAMA3_8B, sft_lr=5e-6)   # the RM (and value) architecture
    c.sft.train.batch_size = 64            # paper 32; data x fsdp = 64 here
    return c
