"""Packing of pretraining documents into full rows (``tokenize_pretrain(pack=True)``, ``data.pack``)."""
from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlhf_jax.config import sft_config
from rlhf_jax.data import tokenize_pretrain, write_jsonl
from rlhf_jax.errors import ConfigError
from rlhf_jax.stages.sft import load_arrays
from rlhf_jax.validate import check

VOCAB = {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3, "hello": 4, "a": 14, "b": 15, "c": 16, "d": 17}
PAD, BOS, EOS = 0, 2, 3
A, B, C, D, HELLO = 14, 15, 16, 17, 4


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")


def test_packed_rows_hand_computed_and_one_token_tail_dropped(tokenizer):
    # Stream: a b c <eos> | hello <eos> | d a <eos>  (9 tokens; "" is no document).
    rows = [{"text": "a b c"}, {"text": ""}, {"text": "hello"}, {"text": "d a"}]
    arrays, stats = tokenize_pretrain(rows, tokenizer, seq_len=4, pack=True)
    # The 9th token (the last <eos>) would be a row of its own with nothing to predict.
    np.testing.assert_array_equal(arrays["input_ids"], [[A, B, C, EOS], [HELLO, EOS, D, A]])
    np.testing.assert_array_equal(arrays["attention_mask"], np.ones((2, 4)))
    np.testing.assert_array_equal(arrays["position_ids"], [[0, 1, 2, 3], [0, 1, 2, 3]])
    np.testing.assert_array_equal(arrays["loss_mask"], [[0, 1, 1, 1], [0, 1, 1, 1]])
    np.testing.assert_array_equal(arrays["row_index"], [0, 2])  # row 1 starts with "hello"
    assert arrays["input_ids"].dtype == np.int32 and arrays["loss_mask"].dtype == np.float32
    # "d a <eos>" lost its <eos> to the dropped tail; the empty text is dropped as unpacked.
    assert (stats.n_total, stats.n_truncated, stats.n_dropped) == (4, 1, 1)


def test_packed_rows_with_bos_pad_only_the_last_row(tokenizer):
    rows = [{"text": "a b c"}, {"text": "hello"}, {"text": "d a"}]
    arrays, stats = tokenize_pretrain(rows, tokenizer, seq_len=5, add_bos=True, pack=True)
    np.testing.assert_array_equal(arrays["input_ids"], [
        [BOS, A, B, C, EOS],
        [BOS, HELLO, EOS, BOS, D],
        [A, EOS, PAD, PAD, PAD],
    ])
    np.testing.assert_array_equal(arrays["attention_mask"], [[1] * 5, [1] * 5, [1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(arrays["position_ids"], [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0, 1, 1, 1, 1]])
    np.testing.assert_array_equal(arrays["loss_mask"], [[0, 1, 1, 1, 1], [0, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(arrays["row_index"], [0, 1, 2])  # row 2 starts inside "d a"
    assert (stats.n_truncated, stats.n_dropped) == (1, 0)


def test_packing_uses_every_token_once_in_order(tokenizer):
    rng = np.random.default_rng(0)
    words = ["a", "b", "c", "d", "hello"]
    rows = [{"text": " ".join(rng.choice(words, size=int(rng.integers(1, 13))))} for _ in range(60)]
    docs = [[VOCAB[w] for w in row["text"].split()] + [EOS] for row in rows]
    stream = [t for doc in docs for t in doc]
    doc_of_token = [i for i, doc in enumerate(docs) for _ in doc]
    for seq_len in (2, 3, 7, 16, 64):
        arrays, _ = tokenize_pretrain(rows, tokenizer, seq_len=seq_len, pack=True)
        mask = arrays["attention_mask"].astype(bool)
        assert mask[:-1].all()  # no padding but in the last row
        assert mask[-1].sum() >= 2 and (mask[-1][: mask[-1].sum()]).all()
        kept = len(stream) if len(stream) % seq_len != 1 else len(stream) - 1
        assert arrays["input_ids"][mask].tolist() == stream[:kept]
        assert (arrays["input_ids"][~mask] == PAD).all()
        starts = np.arange(len(arrays["row_index"])) * seq_len
        assert arrays["row_index"].tolist() == [doc_of_token[s] for s in starts]
        np.testing.assert_array_equal(arrays["loss_mask"][:, 0], 0)
        np.testing.assert_array_equal(arrays["loss_mask"][:, 1:], mask[:, 1:])
    unpacked, _ = tokenize_pretrain(rows, tokenizer, seq_len=16)
    packed, _ = tokenize_pretrain(rows, tokenizer, seq_len=16, pack=True)
    # Unpacked, each document's first token is no target; packed, only each row's first token.
    assert unpacked["loss_mask"].sum() == len(stream) - len(docs)
    tail = len(stream) % 16 == 1
    assert packed["loss_mask"].sum() == len(stream) - tail - len(packed["row_index"])
    assert len(packed["row_index"]) == -(-(len(stream) - tail) // 16) < len(docs)


def test_sft_stage_packs_pretrain_text_when_configured(tokenizer, tmp_path):
    path = str(tmp_path / "text.jsonl")
    write_jsonl(path, [{"text": "a b c d hello"} for _ in range(20)])  # 6 tokens with <eos>
    cfg = sft_config()
    cfg.data.format, cfg.data.train, cfg.data.valid_fraction = "pretrain", path, 0.0
    cfg.data.max_prompt_len, cfg.data.max_response_len = 4, 4
    unpacked, _, _ = load_arrays(cfg, tokenizer)
    assert unpacked["input_ids"].shape == (20, 8)  # one 6-token document per 8-token row
    cfg.data.pack = True
    packed, _, _ = load_arrays(cfg, tokenizer)
    assert packed["input_ids"].shape == (15, 8)  # 120 tokens in 15 full rows
    assert packed["attention_mask"].all()


def test_sft_stage_pretrain_text_follows_data_overlong(tokenizer, tmp_path):
    # data.overlong is the field validate accepts "chunk" in for the pretrain format; the stage
    # once read an undefined data.pretrain_overlong and always chunked.
    path = str(tmp_path / "text.jsonl")
    write_jsonl(path, [{"text": "a b c d hello"}, {"text": "a"}] * 5)  # 6 and 2 tokens with <eos>
    cfg = sft_config()
    cfg.tokenizer = _saved(tokenizer, tmp_path)
    cfg.data.format, cfg.data.train, cfg.data.valid_fraction = "pretrain", path, 0.0
    cfg.data.max_prompt_len, cfg.data.max_response_len = 2, 2          # rows of 4 tokens
    rows = {}
    for overlong in ("truncate", "chunk", "drop"):
        cfg.data.overlong = overlong
        check(cfg)
        rows[overlong] = load_arrays(cfg, tokenizer)[0]["input_ids"]
    np.testing.assert_array_equal(rows["truncate"][:2], [[A, B, C, D], [A, EOS, PAD, PAD]])
    np.testing.assert_array_equal(rows["chunk"][:3], [[A, B, C, D], [HELLO, EOS, PAD, PAD],
                                                      [A, EOS, PAD, PAD]])
    np.testing.assert_array_equal(rows["drop"], [[A, EOS, PAD, PAD]] * 5)
    assert [len(r) for r in rows.values()] == [10, 15, 5]


def _saved(tokenizer, tmp_path) -> str:
    """A tokenizer directory: a random start's (validate refuses a config naming no model)."""
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    return str(tmp_path / "tok")


def test_data_pack_must_be_a_bool(tokenizer, tmp_path):
    cfg = sft_config()
    cfg.tokenizer = _saved(tokenizer, tmp_path)
    cfg.data.train = ""
    check(cfg)
    cfg.data.unlock()
    del cfg.data["pack"]
    cfg.data.pack = 1
    with pytest.raises(ConfigError, match="data.pack=1: expected True or False"):
        check(cfg)
