"""GPT-2 124M through SFT, RM and PPO-ptx at InstructGPT's batch geometry, on a v5e 2x2 (4 chips).

A pod-shape config for ahead-of-time checks, no data paths (set them, and ``base_model``, to
run the pipeline on real data the way experiments/gpt2_hh.py does)::

    JAX_PLATFORMS=cpu rlhf-jax compile --config experiments/gpt2_124m.py --topology v5e:2x2 \\
        --out bench/compile_reports/gpt2_124m_v5e-2x2.json

Geometry (paper, arXiv:2203.02155 App. C; docs/paper_spec.md), unscaled: the whole model is
small enough that the paper's batches fit four v5e chips as they are.

* sequences: prompt 512 + response 256 = 768 tokens (GPT-2's context is 1024; the paper's
  2k context with 1k prompts / 1k responses does not fit GPT-2's positions).
* SFT: batch 32 demonstrations (paper: 32 for 1.3B and 6B), 16 epochs, dropout 0.2.
* RM: 64 prompts x K = 9 completions = 576 sequences per step (up to 2,304 comparisons), 1 epoch.
  The RM is the SFT network with a scalar head (the paper's 6B RM is bigger than its 1.3B
  policy; at 124M the pipeline's default, RM = SFT architecture, is kept).
* PPO-ptx: 512 episodes per rollout, minibatches of 64, and 8 pretraining sequences per episode
  (512 ptx sequences of 768 tokens in every update, the paper's gamma = 27.8); a single epoch.

Layout: FSDP over the four chips, mesh (1, 4, 1), in every stage. Pure data parallelism
(4, 1, 1) was tried first: SFT (13.5 GiB) and RM (14.2 GiB) fit, but the PPO update needed
16.0 GiB of the 15.75 GiB XLA can use on a v5e: the policy (+ EMA) and value train states,
replicated, are 3.25 GiB per chip, and the update's 576 sequences of 768 tokens (512 ptx + 64
episodes) need ~11 GiB of activations even with remat (a float32 [heads, 144, 768, 768]
attention map of one layer is 3.4 GB per chip). Sharding the states 4 ways brings the update to
12.2 GiB without touching the paper's batch geometry. bfloat16 compute, float32 parameters,
scanned layers; remat on for the RM and PPO (576 sequences in one backward pass), off for SFT
(8 sequences per chip). The frozen reference and RM are held in bfloat16.
"""
import ml_collections

from rlhf_jax.config import ppo_config, rm_config, sft_config

GPT2_124M = dict(arch="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12,
                 d_ff=3072, max_position=1024)
PROMPT_LEN, RESPONSE_LEN = 512, 256
MESH = (1, 4, 1)


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.vocab_size = GPT2_124M["vocab_size"]
    c.base_model = ""                      # a transformers GPT-2 directory for real runs
    c.world = ml_collections.ConfigDict(dict(enabled=False, seed=0, sizes={}))

    c.sft = sft_config()
    c.sft.model = ml_collections.ConfigDict(GPT2_124M)
    c.sft.model_runtime = ml_collections.ConfigDict(dict(dtype="bfloat16", remat=False,
                                                         scan_layers=True))
    c.sft.mesh.shape = MESH
    c.sft.data.max_prompt_len = PROMPT_LEN
    c.sft.data.max_response_len = RESPONSE_LEN
    c.sft.train.batch_size = 32            # paper
    c.sft.train.epochs = 16.0              # paper
    c.sft.train.dropout = 0.2              # paper
    c.sft.train.logprob_chunk = 0          # [8, 768, 50257] f32 logits are 1.2 GB: keep whole
    c.sft.optim.lr = 2e-5

    c.rm = rm_config()
    c.rm.model_runtime = ml_collections.ConfigDict(dict(dtype="bfloat16", remat=True,
                                                        scan_layers=True))
    c.rm.mesh.shape = MESH
    c.rm.data.max_k = 9                    # paper: K = 4..9
    c.rm.data.max_prompt_len = PROMPT_LEN
    c.rm.data.max_response_len = RESPONSE_LEN
    c.rm.train.batch_size = 64             # paper: 64 prompts
    c.rm.train.epochs = 1.0                # paper
    c.rm.optim.lr = 9e-6                   # paper

    c.ppo = ppo_config()
    c.ppo.model_runtime = ml_collections.ConfigDict(dict(dtype="bfloat16", remat=True,
                                                         scan_layers=True))
    c.ppo.mesh.shape = MESH
    c.ppo.data.max_prompt_len = PROMPT_LEN
    c.ppo.data.max_response_len = RESPONSE_LEN
    c.ppo.data.ptx_seq_len = PROMPT_LEN + RESPONSE_LEN
    c.ppo.ppo.total_episodes = 256_000     # paper
    c.ppo.ppo.rollout_batch_size = 512     # paper
    c.ppo.ppo.minibatch_size = 64          # paper
    c.ppo.ppo.epochs = 1                   # paper
    c.ppo.ppo.lr = 5e-6
    c.ppo.ppo.value_lr = 9e-6              # paper
    c.ppo.ppo.ema_decay = 0.992            # paper
    c.ppo.ppo.ptx_coef = 27.8              # paper's PPO-ptx gamma
    c.ppo.ppo.ptx_per_episode = 8          # paper
    c.ppo.ppo.frozen_dtype = "bfloat16"
    c.ppo.ppo.logprob_chunk = 128          # response positions per LM-head block
    return c
