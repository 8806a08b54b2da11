"""Tiny random transformers models and a word-level tokenizer for parity tests against torch
(our logits on a left-padded batch against transformers' own, per architecture)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers


PARITY_ATOL = 1e-4
VOCAB = 97
WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "park", "and", "then"]
PAD_ID, UNK_ID, EOS_ID = 0, 1, 2


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {"[PAD]": PAD_ID, "[UNK]": UNK_ID, "[EOS]": EOS_ID}
    vocab.update({word: i + 3 for i, word in enumerate(WORDS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def hf_model(arch: str) -> transformers.PreTrainedModel:
    """A tiny random transformers model; Llama and Qwen2 use grouped-query attention."""
    torch.manual_seed({"gpt2": 0, "llama": 1, "qwen2": 2}[arch])
    ids = dict(pad_token_id=PAD_ID, bos_token_id=EOS_ID, eos_token_id=EOS_ID)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2,
                                      n_head=4, **ids)
        return transformers.GPT2LMHeadModel(cfg).eval()
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **ids)
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)).eval()


def left_padded_batch(length: int = 10, pads_per_row: tuple[int, ...] = (0, 3, 6, 1),
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random ids, one row per entry of ``pads_per_row`` with that many left-padding tokens
    (by default 4 rows of length 10 with 0, 3, 6 and 1)."""
    ids = np.random.RandomState(seed).randint(3, VOCAB, (len(pads_per_row), length)).astype(np.int32)
    mask = np.ones_like(ids)
    for row, pads in enumerate(pads_per_row):
        mask[row, :pads] = 0
        ids[row, :pads] = PAD_ID
    return ids, mask


def torch_logits(model: transformers.PreTrainedModel, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()


def our_logits(model, params, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids),
                                           jnp.asarray(mask)), np.float32)


def max_diff_at_real_positions(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(a - b)[mask.astype(bool)].max())


ARCHS = ("gpt2", "llama", "qwen2")
