"""experiments/gpt2_hh.py for a chat model: a local Qwen2 (or Llama) checkpoint, TRL-style data.

The tokenizer's chat template renders every conversational row: prompts given as
``{"role", "content"}`` lists (TRL's ``prompt``/``chosen``/``rejected``, SFT ``messages``, PPO
prompts as message lists) are formatted exactly as the model saw them in its own fine-tuning::

    rlhf-jax pipeline --config experiments/qwen2_hh.py --workdir runs/qwen2_hh \\
        --config.base_model=/data/Qwen2.5-0.5B-Instruct \\
        --config.rm_base_model=/data/qwen2_rm \\
        --config.data.pretrain=/data/text.jsonl --config.data.sft=/data/sft.jsonl \\
        --config.data.comparisons=/data/prefs.jsonl --config.data.comparisons_test=/data/prefs_test.jsonl \\
        --config.data.ppo_prompts=/data/prompts.jsonl --config.data.eval_prompts=/data/eval.jsonl

``rm_base_model`` (optional) is a ``Qwen2ForSequenceClassification`` to start the RM from.

A Llama checkpoint works the same way (``LlamaForCausalLM`` / ``LlamaForSequenceClassification``).
Differences from the GPT-2 config: bfloat16 compute with float32 parameters, remat in every
stage, frozen reference and RM in bfloat16, and learning rates for ~0.5-1B models.
"""
import os

from rlhf_jax.config import load_config


def get_config(arg=None):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpt2_hh.py")
    c = load_config(f"{path}:{arg}" if arg else path)
    for stage in (c.sft, c.sft_ptx, c.rm, c.ppo):
        stage.model_runtime.dtype = "bfloat16"
        stage.model_runtime.remat = True
    c.ppo.ppo.frozen_dtype = "bfloat16"
    c.sft.optim.lr = c.sft_ptx.optim.lr = 1e-5
    c.rm.optim.lr = 5e-6
    c.ppo.ppo.lr = 1e-6
    c.ppo.ppo.value_lr = 5e-6
    return c
