"""The PPO tests' toy world: a 28-word vocabulary, a tiny policy, a hand-set reward model whose
score rises with the share of marker tokens ("good"; see ``marker_reward_params``), hand-built
rollouts and the config overrides that run the PPO loop on it. The fixtures that build them once
per test run (``base``, ``toy_dirs``) are in ``conftest.py``."""
from __future__ import annotations

import json
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_counting import counting_compiles
from tokenizers import Tokenizer, models as tk_models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlhf_jax import objectives as obj
from rlhf_jax.config import apply_overrides, load_config
from rlhf_jax.model_io import save_our_checkpoint
from rlhf_jax.models import Transformer, init_params, tiny_config
from rlhf_jax.stages import ppo
from rlhf_jax.stages.ppo import loop as ppo_loop
from rlhf_jax.stages.reward import reward_model_from_lm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "experiments", "tiny_ppo.py")

WORDS = [f"w{i}" for i in range(20)]
VOCAB = ["<pad>", "<eos>", "<unk>", "good", "say", ":", "please", "ok"] + WORDS   # 28 tokens
MARKER = "good"
PAD, EOS = 0, 1

# Hand-built rollouts for the pure pieces: B episodes, P prompt slots, N response slots.
B, P, N = 8, 5, 6



def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(tk_models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def tiny_policy(dtype: str = "float32") -> Transformer:
    return Transformer(tiny_config("gpt2", vocab_size=len(VOCAB), d_model=32, n_layers=2, n_heads=4,
                                   d_ff=64, max_position=64, pad_token_id=PAD, eos_token_id=EOS,
                                   dtype=dtype))


def toy_roles(policy, value, reward, *overrides: str):
    """The roles ``ppo_config(*overrides)`` gives these networks, without a mesh."""
    return ppo.make_roles(ppo_config(*overrides).ppo, policy, reward, value)[0]


def ppo_config(*overrides: str):
    """The full tiny_ppo config with dotted overrides (`cfg.ppo` is what the pure pieces take)."""
    return apply_overrides(load_config(CONFIG), list(overrides))


def marker_reward_params(rm_params, marker_id: int, d_model: int = 32):
    """Hand-set reward-model weights: score = increasing function of the marker-token fraction.

    * token embeddings one-hot (token i -> e_i, vocab 28 < d_model), position embeddings 0;
    * layer 0 attention: q = k = 0, so every position attends uniformly to the real tokens up to
      it; v (head 0, dim 0) = 1 on the marker, -1/(d-1) elsewhere (through the pre-attention
      LayerNorm, which maps e_i to (e_i - 1/d) / sigma); o writes G * mean(v) into dim d-1 and
      a constant B into dim d-2 (G = 20, B = 10; the constant keeps the final LayerNorm from
      erasing magnitude);
    * every other residual write (MLPs, layer 1 attention) is zeroed;
    * score head reads dim d-1 of the final LayerNorm output.
    At the last real token the score is therefore monotone in the fraction of marker tokens in
    prompt + response (raw): about -0.55 with none, +1.7 with 1 of 5 tokens, +3.8 with 4 of 8,
    +4.5 with 8 of 10. The value network starts as a copy of it, as in the paper.
    """
    p = jax.tree.map(lambda x: np.array(x, np.float32), rm_params)
    d = d_model
    vocab = p["embed"]["embedding"].shape[0]
    p["embed"]["embedding"][:] = 0.0
    p["embed"]["embedding"][np.arange(vocab), np.arange(vocab)] = 1.0
    p["pos_embed"]["embedding"][:] = 0.0
    for name in ("layer_0", "layer_1"):
        layer = p[name]
        for proj in ("q", "k", "v", "o"):
            layer["attn"][proj]["kernel"][:] = 0.0
            layer["attn"][proj]["bias"][:] = 0.0
        layer["mlp"]["fc_out"]["kernel"][:] = 0.0
        layer["mlp"]["fc_out"]["bias"][:] = 0.0
        for norm in ("attn_norm", "mlp_norm"):
            layer[norm]["scale"][:] = 1.0
            layer[norm]["bias"][:] = 0.0
    onehot = np.eye(d)[marker_id]
    normalized_marker = (onehot - 1.0 / d) / np.sqrt((1.0 - 1.0 / d) / d)   # LayerNorm(e_marker)
    p["layer_0"]["attn"]["v"]["kernel"][:, 0, 0] = normalized_marker / d
    p["layer_0"]["attn"]["o"]["kernel"][0, 0, d - 1] = 20.0
    p["layer_0"]["attn"]["o"]["bias"][d - 2] = 10.0
    p["final_norm"]["scale"][:] = 1.0
    p["final_norm"]["bias"][:] = 0.0
    p["score_head"]["kernel"][:] = 0.0
    p["score_head"]["kernel"][d - 1, 0] = 1.0
    p["score_head"]["bias"][:] = 0.0
    return jax.tree.map(jnp.asarray, p)


def hand_rollout(seed: int = 0) -> dict[str, jax.Array]:
    """Left-padded prompts, right-padded responses of varied lengths, some ending with EOS."""
    rng = np.random.default_rng(seed)
    seqs = np.full((B, P + N), PAD, np.int32)
    attn = np.zeros((B, P + N), np.int32)
    resp_mask = np.zeros((B, N), np.int32)
    has_eos = np.zeros((B,), bool)
    lengths = [N, 3, 1, N, 4, N, 2, 5]             # N without EOS = cut at max_new_tokens
    for b in range(B):
        n_prompt = 2 + b % (P - 1)
        seqs[b, P - n_prompt:P] = rng.integers(3, len(VOCAB), n_prompt)
        attn[b, P - n_prompt:P] = 1
        n = lengths[b]
        ends_with_eos = b in (1, 2, 4, 6, 7)
        response = rng.integers(3, len(VOCAB), n)
        if ends_with_eos:
            response[-1] = EOS
        seqs[b, P:P + n] = response
        attn[b, P:P + n] = 1
        resp_mask[b, :n] = 1
        has_eos[b] = ends_with_eos
    return {"sequences": jnp.asarray(seqs), "attention_mask": jnp.asarray(attn),
            "response_mask": jnp.asarray(resp_mask), "has_eos": jnp.asarray(has_eos)}


def perturbed(params, seed: int, scale: float):
    """params + scale * N(0, 1) noise (host RNG: no per-shape eager compiles)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape),
                                              x.dtype), params)


def log_softmax_np(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def gae_numpy(rewards, values, mask, gamma, lam):
    """Textbook reverse loop; nothing is bootstrapped past the last response token."""
    rewards, values, mask = (np.asarray(x, np.float64) for x in (rewards, values, mask))
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        next_value = next_adv = 0.0
        for t in reversed(range(rewards.shape[1])):
            if not mask[b, t]:
                next_value = next_adv = 0.0
                continue
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_adv = delta + gamma * lam * next_adv
            next_value = values[b, t]
            adv[b, t] = next_adv
    return adv, (adv + values) * mask



BETA = 0.1



def ptx_batch(seed: int = 3, batch: int = 4, length: int = 8) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, len(VOCAB), (batch, length)).astype(np.int32)
    attn = np.ones((batch, length), np.int32)
    attn[1, 6:] = 0                                            # right padding on one row
    ids[1, 6:] = PAD
    loss_mask = attn.astype(np.float32)
    loss_mask[:, 0] = 0
    pos = np.maximum(np.cumsum(attn, 1) - 1, 0).astype(np.int32)
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(attn),
            "position_ids": jnp.asarray(pos), "loss_mask": jnp.asarray(loss_mask)}



TOY_RESPONSE_LEN = 8


def raw_scores_fn(rm, tok):
    """texts -> raw RM scores at each text's last token (one jitted call on a padded batch)."""
    fn = jax.jit(lambda params, ids, mask: obj.value_at_last_token(
        rm.apply({"params": params}, ids, mask), mask))

    def scores(params, texts, length=12, rows=8):
        # Always `rows` x `length` (one compile); rows past the texts are padding, dropped below.
        ids = np.full((rows, length), PAD, np.int32)
        ids[:, 0] = tok.convert_tokens_to_ids("say")
        for i, text in enumerate(texts):
            row = tok(text)["input_ids"]
            ids[i, :len(row)] = row
        out = fn(params, jnp.asarray(ids), jnp.asarray((ids != PAD).astype(np.int32)))
        return np.asarray(out)[:len(texts)]
    return scores



def toy_overrides(toy_dirs, *extra: str) -> list[str]:
    root = toy_dirs["root"]
    return [f"policy_from={root / 'sft'}", f"reward_from={root / 'rm'}",
            f"data.prompts={root / 'prompts.jsonl'}", f"data.pretrain={root / 'pretrain.jsonl'}",
            "data.max_prompt_len=6", f"data.max_response_len={TOY_RESPONSE_LEN}",
            "data.ptx_seq_len=12", "ppo.warmup_iterations=0", "ppo.checkpoint_every=0",
            "ppo.sample_every=10", *extra]


def run_train(cfg, workdir):
    """`ppo.train` that also records the compile count at each iteration's metrics write.

    Robust per-iteration accounting: `train` writes metrics exactly once per iteration, after
    that iteration's rollout, experience and update, so the count seen by the k-th `write` is
    every compile of iterations 1..k (whatever happens after the write of iteration k, logging
    included, lands in iteration k+1's window, which only makes the check stricter). Counting
    in one run avoids comparing separate runs, which share jax's caches for eager ops.
    """
    per_iteration = []
    with counting_compiles() as counter:

        class RecordingWriter(ppo_loop.MetricsWriter):
            def write(self, step, metrics):
                per_iteration.append(counter.count)
                super().write(step, metrics)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ppo_loop, "MetricsWriter", RecordingWriter)
            final = ppo.train(cfg, str(workdir))
    return final, per_iteration




def build_base():
    """One tiny policy init and its RM twin (fresh scalar head), shared by every fixture."""
    policy = tiny_policy()
    params = init_params(policy, jax.random.key(0))
    reward, reward_params = reward_model_from_lm(policy, params, jax.random.key(1), None)
    return policy, params, reward, reward_params


def build_toy_dirs(base, root):
    """SFT-stand-in policy (the random init), hand-set marker RM, prompts and text on disk."""
    tok = make_tokenizer()
    marker = tok.convert_tokens_to_ids(MARKER)
    policy, policy_params, rm, rm_init = base
    rm_params = marker_reward_params(rm_init, marker)
    raw_scores = raw_scores_fn(rm, tok)
    # Normalization as the RM stage would store it: here the raw score of a marker-free sequence.
    norm = {"mean": float(raw_scores(rm_params, ["say w1 w2 : w3 w4 <eos>"])[0]), "std": 1.0}
    save_our_checkpoint(str(root / "sft"), policy, policy_params, tok, extra={"stage": "sft"})
    save_our_checkpoint(str(root / "rm"), rm, rm_params, tok, extra={"reward_norm": norm})
    r = random.Random(0)
    with open(root / "prompts.jsonl", "w") as f:
        for _ in range(64):
            words = " ".join(r.choices(WORDS, k=r.randint(1, 4)))
            f.write(json.dumps({"prompt": f"say {words} :"}) + "\n")
    with open(root / "pretrain.jsonl", "w") as f:
        for _ in range(64):
            f.write(json.dumps({"text": " ".join(r.choices(WORDS, k=10))}) + "\n")
    return dict(root=root, tok=tok, marker=marker, policy=policy, policy_params=policy_params,
                rm=rm, rm_params=rm_params, norm=norm, raw_scores=raw_scores)
