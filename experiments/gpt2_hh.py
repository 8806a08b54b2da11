r"""The same pipeline on real data: a local GPT-2 checkpoint and Anthropic-HH-style comparisons.

Nothing is downloaded: point the paths at local files (any transformers GPT-2 directory; its
tokenizer may have no pad token, EOS is used for padding)::

    rlhf-jax pipeline --config experiments/gpt2_hh.py --workdir runs/gpt2_hh \
        --config.base_model=/data/gpt2 \
        --config.data.pretrain=/data/openwebtext.jsonl \
        --config.data.sft=/data/hh_sft.jsonl \
        --config.data.comparisons=/data/hh_train.jsonl \
        --config.data.comparisons_test=/data/hh_test.jsonl \
        --config.data.ppo_prompts=/data/hh_prompts.jsonl \
        --config.data.eval_prompts=/data/hh_eval_prompts.jsonl

The rows: pretraining text ``{"text"}``; demonstrations ``{"prompt", "completion"}`` or
``{"messages"}``; prompts ``{"prompt"}`` as text or messages.

Comparisons may be HH transcripts ``{"chosen", "rejected"}`` (the prompt is their shared text up
to the last "\n\nAssistant:"), TRL rows (``prompt``/``chosen``/``rejected`` as strings or as
``{"role", "content"}`` lists, rendered with the tokenizer's chat template), or K-way rankings.

A published reward model (a transformers ``*ForSequenceClassification`` directory) replaces RM
training's starting point with ``--config.rm_base_model=/data/rm``; add
``--config.rm.train.epochs=0`` to use it as it is (the rm stage then only measures it on the
comparisons and computes the demonstrations' normalization). Export what the run made with
``rlhf-jax convert jax-to-hf runs/gpt2_hh/ppo_ptx/model out/policy`` (and ``rm/model``, which
becomes a ``GPT2ForSequenceClassification`` scoring as ours, normalization included).

Any path may also be ``tfds:<name>:<split>`` (with ``<stage>.data.tfds_data_dir`` and
``field_map``). There are no labelers on real data, so the report gives RM scores, KL to SFT,
RM accuracy on the held-out comparisons and samples; judge win rates with your own raters.
Mesh: FSDP over all devices by default; set ``--config.<stage>.mesh.shape='(D,F,T)'`` on a pod.
"""
import ml_collections

from rlhf_jax.config import ppo_config, rm_config, sft_config


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.world = ml_collections.ConfigDict(dict(enabled=False, seed=0, sizes={}, labeler_noise_scale=1.0))
    c.base_model = ""                        # transformers checkpoint dir (GPT-2 / Llama / Qwen2)
    c.rm_base_model = ""                     # where the RM starts: empty = SFT; or a reward model
                                             #   (transformers *ForSequenceClassification or ours)
    c.data = ml_collections.ConfigDict(dict(
        pretrain="", sft="", comparisons="", comparisons_test="", ppo_prompts="", eval_prompts=""))
    mesh = (1, -1, 1)                        # FSDP over every device

    c.sft = sft_config()
    c.sft.mesh.shape = mesh
    c.sft.data.max_prompt_len = 256
    c.sft.data.max_response_len = 128
    c.sft.train.batch_size = 32
    c.sft.train.epochs = 2.0
    c.sft.train.dropout = 0.1
    c.sft.train.eval_every = 200
    c.sft.optim.lr = 2e-5
    c.sft.optim.warmup_steps = 50
    c.sft_ptx = ml_collections.ConfigDict(c.sft.to_dict())
    c.sft_ptx.name = "sft_ptx"
    c.sft_ptx.data.pretrain_mix = 0.1
    c.pretrain = sft_config()                # unused with base_model, kept for a uniform layout

    c.rm = rm_config()
    c.rm.mesh.shape = mesh
    c.rm.data.max_k = 2
    c.rm.data.max_prompt_len = 256
    c.rm.data.max_response_len = 128
    c.rm.train.batch_size = 32
    c.rm.optim.lr = 9e-6                     # paper's RM learning rate
    c.rm.normalize.unit_std = False

    c.comparisons = ml_collections.ConfigDict(dict(k=4, n_prompts=0, n_test_prompts=0, temperature=1.0))

    c.ppo = ppo_config()
    c.ppo.mesh.shape = mesh
    c.ppo.data.max_prompt_len = 256
    c.ppo.data.max_response_len = 128
    c.ppo.data.ptx_seq_len = 384
    c.ppo.ppo.total_episodes = 256_000       # paper
    c.ppo.ppo.rollout_batch_size = 512       # paper
    c.ppo.ppo.minibatch_size = 64            # paper
    c.ppo.ppo.lr = 5e-6
    c.ppo.ppo.value_lr = 9e-6                # paper
    c.ppo.ppo.ema_decay = 0.992              # paper
    c.ppo.ppo.ptx_per_episode = 8            # paper
    c.ppo.model_runtime.remat = True
    c.ppo_ptx_coef = 27.8                    # paper's gamma

    c.eval = ml_collections.ConfigDict(dict(
        n_prompts=500, temperature=1.0, few_shot=2, prompted_max_prompt_len=768,
        n_capability=0, capability_max_prompt_len=256))
    return c
