"""Tiny stand-ins for what researchers bring, made with transformers' own classes.

A byte-level BPE tokenizer saved the way GPT-2's is (no pad token), causal LMs and
``*ForSequenceClassification`` reward models with random weights, and Anthropic-HH-style
transcripts / TRL conversational rows. Nothing is downloaded.
"""
from __future__ import annotations

import json
import os

import numpy as np

EOS = "<|endoftext|>"
WORDS = ["hello", "thanks", "sure", "no", "help", "please", "ok", "good", "bad", "rude", "kind",
         "answer", "question", "why", "the", "sky", "is", "blue", "tell", "me", "a", "story"]
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def bpe_tokenizer(path: str, *, chat_template: str | None = None, vocab_size: int = 300):
    """A GPT-2-style byte-level BPE tokenizer trained here and saved without a pad token."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    corpus += ["\n\nHuman: " + w + "\n\nAssistant: " + w for w in WORDS]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=1, special_tokens=[EOS])
    tokenizer = transformers.GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS,
                                               eos_token=EOS, unk_token=EOS)
    assert tokenizer.pad_token is None
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    return tokenizer


def _save(model, tokenizer, path: str) -> str:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def gpt2_pair(root: str, tokenizer, *, n_positions: int = 96, seed: int = 0) -> tuple[str, str]:
    """(GPT2LMHeadModel dir, GPT2ForSequenceClassification dir), random weights, no pad id."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = dict(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
               bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg))
    # transformers' seq-cls pooling needs a pad id to find the last token of a batch row;
    # published GPT-2 RMs set it to EOS.
    rm = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        **cfg, num_labels=1, pad_token_id=tokenizer.eos_token_id))
    return (_save(lm, tokenizer, os.path.join(root, "gpt2_lm")),
            _save(rm, tokenizer, os.path.join(root, "gpt2_rm")))


def qwen2_pair(root: str, tokenizer, *, max_position: int = 128, seed: int = 0) -> tuple[str, str]:
    """(Qwen2ForCausalLM dir, Qwen2ForSequenceClassification dir), tiny GQA, random weights."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=max_position, tie_word_embeddings=True,
               bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    lm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg))
    rm = transformers.Qwen2ForSequenceClassification(transformers.Qwen2Config(
        **cfg, num_labels=1, pad_token_id=tokenizer.eos_token_id))
    return (_save(lm, tokenizer, os.path.join(root, "qwen2_lm")),
            _save(rm, tokenizer, os.path.join(root, "qwen2_rm")))


def _sentence(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS, n))


def hh_rows(rng, n: int) -> list[dict]:
    """Anthropic-HH-style pairs: full transcripts, the prompt implicit in their shared prefix."""
    rows = []
    for i in range(n):
        context = f"\n\nHuman: {_sentence(rng, 3)}"
        if i % 3 == 0:   # some multi-turn transcripts
            context += f"\n\nAssistant: {_sentence(rng, 2)}\n\nHuman: {_sentence(rng, 2)}"
        context += "\n\nAssistant:"
        rows.append({"chosen": context + " sure kind answer", "rejected": context + " no rude"})
    return rows


def conversational_rows(rng, n: int) -> list[dict]:
    """TRL conversational preference rows: prompt / chosen / rejected as message lists."""
    return [{"prompt": [{"role": "user", "content": _sentence(rng, 3)}],
             "chosen": [{"role": "assistant", "content": "sure kind answer"}],
             "rejected": [{"role": "assistant", "content": "no rude"}]} for _ in range(n)]


def write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def hh_files(root: str, *, conversational: bool = False, seed: int = 0) -> dict[str, str]:
    """The data files of experiments/gpt2_hh.py: pretraining text, demonstrations, HH (or TRL
    conversational) comparisons and prompts."""
    rng = np.random.default_rng(seed)
    path = lambda name: os.path.join(root, f"{name}.jsonl")
    files = {"pretrain": write_jsonl(path("pretrain"),
                                     [{"text": _sentence(rng, 16)} for _ in range(64)])}
    if conversational:
        user = lambda: [{"role": "user", "content": _sentence(rng, 3)}]
        files["sft"] = write_jsonl(path("sft"), [
            {"messages": user() + [{"role": "assistant", "content": "sure kind answer"}]}
            for _ in range(48)])
        files["comparisons"] = write_jsonl(path("comparisons"), conversational_rows(rng, 48))
        files["comparisons_test"] = write_jsonl(path("comparisons_test"),
                                                conversational_rows(rng, 16))
        files["ppo_prompts"] = write_jsonl(path("ppo_prompts"),
                                           [{"prompt": user()} for _ in range(32)])
        files["eval_prompts"] = write_jsonl(path("eval_prompts"),
                                            [{"prompt": user()} for _ in range(16)])
        return files
    prompt = lambda: f"\n\nHuman: {_sentence(rng, 3)}\n\nAssistant:"
    files["sft"] = write_jsonl(path("sft"), [{"prompt": prompt(), "completion": " sure kind answer"}
                                             for _ in range(48)])
    files["comparisons"] = write_jsonl(path("comparisons"), hh_rows(rng, 48))
    files["comparisons_test"] = write_jsonl(path("comparisons_test"), hh_rows(rng, 16))
    files["ppo_prompts"] = write_jsonl(path("ppo_prompts"), [{"prompt": prompt()} for _ in range(32)])
    files["eval_prompts"] = write_jsonl(path("eval_prompts"), [{"prompt": prompt()} for _ in range(16)])
    return files
