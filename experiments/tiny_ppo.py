"""PPO / PPO-ptx at tiny scale. InstructGPT's values in comments; CPU-sized defaults.

    rlhf-jax ppo --config experiments/tiny_ppo.py --workdir runs/ppo \
        --config.policy_from=runs/sft_ptx/model --config.reward_from=runs/rm/model \
        --config.data.prompts=ppo_prompts.jsonl [--config.ppo.ptx_coef=27.8 \
        --config.data.pretrain=pretrain.jsonl]
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "ppo"
    c.seed = 0
    c.policy_from = ""                 # PPO-init SFT model dir: the policy and the KL reference
    c.reward_from = ""                 # reward model dir (scalar head + demo normalization)
    c.value_from = ""                  # empty: initialize the value network from the RM (paper)
    c.model_runtime = ml_collections.ConfigDict(dict(dtype="float32", remat=False))
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))

    c.data = ml_collections.ConfigDict()
    c.data.prompts = ""                # prompts JSONL ({"prompt"}) or tfds:<name>:<split>
    c.data.pretrain = ""               # pretraining text for the ptx term ({"text"})
    c.data.tfds_data_dir = ""
    c.data.field_map = ml_collections.ConfigDict()
    c.data.max_prompt_len = 24
    c.data.max_response_len = 24       # = max new tokens per episode
    c.data.ptx_seq_len = 48
    c.data.overlong = "truncate"

    c.ppo = ml_collections.ConfigDict()
    c.ppo.iterations = 0               # >0 overrides total_episodes / rollout_batch_size
    c.ppo.total_episodes = 2048        # paper: 256k
    c.ppo.rollout_batch_size = 64      # paper: 512 episodes per iteration
    c.ppo.minibatch_size = 16          # paper: 64 (8 minibatches)
    c.ppo.epochs = 1                   # paper: a single inner epoch
    c.ppo.lr = 1e-4                    # paper: ~1e-5 scale for 1.3B; tiny models need more
    c.ppo.value_lr = 1e-4              # paper: 9e-6
    c.ppo.warmup_iterations = 10       # paper: 10 iterations from 0.1x
    c.ppo.b1 = 0.9
    c.ppo.b2 = 0.95
    c.ppo.grad_clip_norm = 1.0         # not stated by the paper
    c.ppo.clip_eps = 0.2               # paper: 0.2
    c.ppo.value_clip = 0.2             # not stated; <= 0 disables value clipping
    c.ppo.entropy_coef = 0.0           # not stated
    c.ppo.gamma = 1.0                  # paper: no discount
    c.ppo.lam = 0.95                   # Stiennon et al.
    c.ppo.whiten_advantages = True     # not stated
    c.ppo.whiten_rewards = False       # not stated
    c.ppo.kl_coef = 0.02               # paper: beta = 0.02 fixed
    c.ppo.kl_controller = "fixed"      # or "adaptive" (Ziegler et al.)
    c.ppo.kl_target = 6.0
    c.ppo.kl_horizon = 10000
    c.ppo.ptx_coef = 0.0               # gamma; paper's PPO-ptx: 27.8
    c.ppo.ptx_per_episode = 1          # paper: 8 pretraining sequences per RL episode
    c.ppo.ema_decay = 0.0              # paper: 0.992
    c.ppo.missing_eos_penalty = ml_collections.FieldReference(None, field_type=float)
    c.ppo.temperature = 1.0            # paper: 1
    c.ppo.top_k = 0
    c.ppo.top_p = 1.0
    c.ppo.sample_every = 10            # iterations between sample tables
    c.ppo.n_samples_logged = 8
    c.ppo.checkpoint_every = 20
    return c
