"""Bring your own models and data: transformers checkpoints and public data formats end to end.

A GPT-2-style byte-level BPE tokenizer without a pad token, transformers' own causal LMs and
``*ForSequenceClassification`` reward models, HH transcripts and TRL conversational rows, through
sampling, the experiments/*_hh.py pipelines, and back out to transformers.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_standins
from rlhf_jax import scoring
from rlhf_jax.evaluation import generate_texts
from rlhf_jax.models.hf import from_pretrained
from rlhf_jax.sampling import SamplingConfig


def test_sampling_config_falls_back_to_eos_without_pad():
    assert SamplingConfig(max_new_tokens=2, eos_token_id=7, pad_token_id=None).pad_token_id == 7
    assert SamplingConfig(max_new_tokens=2, eos_token_id=None, pad_token_id=None).pad_token_id == 0
    assert SamplingConfig(max_new_tokens=2, eos_token_id=7, pad_token_id=3).pad_token_id == 3


def test_generate_with_a_tokenizer_that_has_no_pad_token(tmp_path):
    tokenizer = hf_standins.bpe_tokenizer(str(tmp_path / "tok"))
    lm_dir, _ = hf_standins.gpt2_pair(str(tmp_path), tokenizer)
    model, params, loaded = from_pretrained(lm_dir)
    assert loaded.pad_token_id is None
    prompts = ["\n\nHuman: hello\n\nAssistant:", "\n\nHuman: tell me a story please\n\nAssistant:"]
    out = generate_texts(model, params, loaded, prompts, max_prompt_len=16, max_new_tokens=6,
                         seed=0, batch_size=4)
    assert len(out["texts"]) == 2 and all(isinstance(t, str) for t in out["texts"])
    # Positions after EOS hold the EOS id (the fallback pad), never garbage.
    responses = out["sequences"][:, 16:]
    assert np.all((out["response_mask"] > 0) | (responses == tokenizer.eos_token_id))


def test_fold_normalization_matches_normalized_scores(tmp_path):
    tokenizer = hf_standins.bpe_tokenizer(str(tmp_path / "tok"))
    _, rm_dir = hf_standins.gpt2_pair(str(tmp_path), tokenizer)
    model, params, _ = from_pretrained(rm_dir)
    params = {**params, "score_head": {**params["score_head"], "bias": jnp.array([0.3])}}
    ids = jnp.array(np.random.default_rng(0).integers(1, len(tokenizer), (3, 10)), jnp.int32)
    mask = jnp.ones_like(ids).at[0, :4].set(0)
    norm = {"mean": 1.3, "std": 2.5}
    raw = scoring.raw_rewards(model, params, ids, mask)
    folded = scoring.raw_rewards(model, scoring.fold_normalization(params, norm), ids, mask)
    np.testing.assert_allclose(folded, (np.asarray(raw) - 1.3) / 2.5, atol=1e-5)
    assert scoring.fold_normalization(params, {}) is params


# --- the *_hh experiments end to end on transformers checkpoints, and back out -----------------

from paths import EXPERIMENTS


def _tiny_overrides(max_prompt_len: int) -> list[str]:
    out = []
    for stage in ("sft", "sft_ptx", "rm", "ppo"):
        out += [f"{stage}.mesh.shape=(1,1,1)", f"{stage}.data.max_prompt_len={max_prompt_len}",
                f"{stage}.data.max_response_len=8"]
    for stage in ("sft", "sft_ptx", "rm"):
        out += [f"{stage}.train.steps=2", f"{stage}.train.batch_size=8",
                f"{stage}.optim.warmup_steps=0"]
    return out + ["sft.train.eval_every=0", "sft_ptx.train.eval_every=0",
                  "ppo.data.ptx_seq_len=16", "ppo.ppo.iterations=1",
                  "ppo.ppo.rollout_batch_size=8", "ppo.ppo.minibatch_size=4",
                  "ppo.ppo.warmup_iterations=0", "ppo.ppo.ptx_per_episode=1", "eval.n_prompts=8",
                  f"eval.prompted_max_prompt_len={max_prompt_len + 24}"]


def _run_hh(tmp_path, experiment: str, lm_dir: str, rm_dir: str, files: dict, max_prompt_len: int):
    from rlhf_jax.config import apply_overrides, load_config
    from rlhf_jax.pipeline import run

    cfg = load_config(os.path.join(EXPERIMENTS, experiment))
    apply_overrides(cfg, [f"base_model={lm_dir}", f"rm_base_model={rm_dir}"]
                    + [f"data.{k}={v}" for k, v in files.items()] + _tiny_overrides(max_prompt_len))
    workdir = tmp_path / "run"
    results = run(cfg, str(workdir))
    assert 0.0 <= results["rm_accuracy"]["test"] <= 1.0
    for name in ("base", "sft", "ppo", "ppo_ptx"):
        assert np.isfinite(results["proxy_score"][name]) and np.isfinite(results["kl_to_sft"][name])
    return workdir


def _check_exports(workdir, tmp_path, prompts: list[str], texts: list[str]):
    """The run's PPO-ptx policy and RM, exported, load in transformers and generate / score as
    ours do (ours loaded in float32 from the run's own model directories)."""
    import torch
    import transformers
    from rlhf_jax.convert import orbax_to_hf
    from rlhf_jax.model_io import load_our_checkpoint, read_extra
    from rlhf_jax.data import tokenize_prompts

    policy_dir = orbax_to_hf(str(workdir / "ppo_ptx" / "model"), str(tmp_path / "hf_policy"))
    rm_dir = orbax_to_hf(str(workdir / "rm" / "model"), str(tmp_path / "hf_rm"))
    model, params, tokenizer = load_our_checkpoint(str(workdir / "ppo_ptx" / "model"),
                                                   dtype="float32")
    ours = generate_texts(model, params, tokenizer, prompts, max_prompt_len=32, max_new_tokens=8,
                          greedy=True, batch_size=4)
    hf_policy = transformers.AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = hf_policy.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=8, pad_token_id=tokenizer.eos_token_id)
        theirs = out[0, ids.shape[1]:].tolist()
        mine = ours["sequences"][i, 32:][ours["response_mask"][i] > 0].tolist()
        assert theirs[:len(mine)] == mine, (prompt, theirs, mine)

    rm, rm_params, _ = load_our_checkpoint(str(workdir / "rm" / "model"), dtype="float32")
    norm = read_extra(str(workdir / "rm" / "model"))["reward_norm"]
    # Sequences that do not end in EOS: transformers' pooling skips trailing pad (= EOS) ids.
    rows = [{"prompt": p + t} for p, t in zip(prompts, texts)]
    arrays, _ = tokenize_prompts(rows, tokenizer, 40)
    ids, mask = arrays["input_ids"], arrays["attention_mask"]
    mine = np.asarray(scoring.rm_scores(rm, rm_params, norm, jnp.asarray(ids), jnp.asarray(mask)))
    hf_rm = transformers.AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        logits = hf_rm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(positions)).logits[:, 0].numpy()
    theirs = logits + getattr(hf_rm.config, "rlhf_jax_score_offset", 0.0)
    np.testing.assert_allclose(theirs, mine, atol=1e-4)
    return float(np.max(np.abs(theirs - mine)))


def test_gpt2_hh_end_to_end_and_back_to_transformers(tmp_path):
    """GPT-2 with its pad-less byte-level BPE, a GPT2ForSequenceClassification RM, HH transcripts."""
    tokenizer = hf_standins.bpe_tokenizer(str(tmp_path / "tok"))
    lm_dir, rm_dir = hf_standins.gpt2_pair(str(tmp_path), tokenizer)
    files = hf_standins.hh_files(str(tmp_path))
    workdir = _run_hh(tmp_path, "gpt2_hh.py", lm_dir, rm_dir, files, max_prompt_len=32)
    prompts = ["\n\nHuman: tell me a story\n\nAssistant:", "\n\nHuman: why is the sky blue\n\nAssistant:"]
    _check_exports(workdir, tmp_path, prompts, [" sure kind answer", " no"])


@pytest.mark.slow   # the same path as the GPT-2 run; the chat-template and Qwen2 pieces have fast tests
def test_qwen2_hh_end_to_end_and_back_to_transformers(tmp_path):
    """Qwen2 with a chat template, a Qwen2ForSequenceClassification RM, TRL conversational data."""
    tokenizer = hf_standins.bpe_tokenizer(str(tmp_path / "tok"),
                                          chat_template=hf_standins.CHAT_TEMPLATE)
    lm_dir, rm_dir = hf_standins.qwen2_pair(str(tmp_path), tokenizer)
    files = hf_standins.hh_files(str(tmp_path), conversational=True)
    workdir = _run_hh(tmp_path, "qwen2_hh.py", lm_dir, rm_dir, files, max_prompt_len=32)
    # PPO's prompts went through the chat template.
    samples = [json.loads(line) for line in open(workdir / "ppo" / "samples.jsonl")]
    assert samples and all(s["prompt"].endswith("<assistant>") for s in samples)
    chat = lambda text: tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                      tokenize=False, add_generation_prompt=True)
    prompts = [chat("tell me a story"), chat("why is the sky blue")]
    _check_exports(workdir, tmp_path, prompts, ["sure kind answer", "no"])
