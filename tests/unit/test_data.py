"""Tests for rlhf_jax.data: formats, TFDS round trips, tokenization layout, iterator."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh, PartitionSpec
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlhf_jax.data import (
    BatchIterator,
    DataError,
    TruncationStats,
    build_tfds_from_jsonl,
    comparisons_to_pairs,
    load_tfds,
    make_global_batch,
    read_jsonl,
    tokenize_comparisons,
    tokenize_demonstrations,
    tokenize_pretrain,
    tokenize_prompts,
    validate_rows,
    write_jsonl,
)
from rlhf_jax.errors import UserError

VOCAB = {
    "<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3,
    "hello": 4, "world": 5, "how": 6, "are": 7, "you": 8, "fine": 9, "thanks": 10,
    "User": 11, ":": 12, "Assistant": 13, "a": 14, "b": 15, "c": 16, "d": 17,
    "good": 18, "bad": 19, "ok": 20, "user": 21, "assistant": 22, "says": 23,
}
PAD, UNK, BOS, EOS = 0, 1, 2, 3


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def write_lines(path, lines) -> str:
    """Write raw lines (str or bytes) joined by newlines; returns the path as str."""
    data = b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n"
    path.write_bytes(data)
    return str(path)


# ---------------------------------------------------------------------------
# Formats and validation
# ---------------------------------------------------------------------------

GOOD_LINE = {
    "pretrain": '{"text": "hello world"}',
    "demonstrations": '{"prompt": "hello", "completion": "fine"}',
    "comparisons": '{"prompt": "hello", "completions": ["good", "bad"], "ranking": [0, 1]}',
    "prompts": '{"prompt": "hello"}',
}

BAD_CASES = [
    # (format, bad line, substring naming the field (or the problem) in the message)
    ("prompts", '{"prompt": "unterminated"', "one JSON object per line"),
    ("prompts", "[1, 2]", "a JSON object"),
    ("demonstrations", '{"completion": "fine"}', "field 'prompt'"),
    ("demonstrations", '{"prompt": "hi", "completion": 7}', "field 'completion'"),
    ("prompts", '{"prompt": "   \\t "}', "non-empty"),
    ("pretrain", '{"text": ["hello"]}', "field 'text'"),
    ("comparisons", '{"prompt": "p", "completions": ["a"], "ranking": [0]}', "K >= 2"),
    ("comparisons", '{"prompt": "p", "completions": ["a", "b", "c"], "ranking": [0, 1]}', "exactly K=3"),
    ("comparisons", '{"prompt": "p", "completions": ["a", "b"], "ranking": [0, "1"]}', "field 'ranking'"),
    ("comparisons", '{"prompt": "p", "completions": ["a", "b"], "ranking": [0.0, 1.0]}', "list of 2 ints"),
    ("comparisons", '{"prompt": "p", "completions": ["a", "b"], "ranking": [true, false]}', "list of 2 ints"),
    ("comparisons", '{"prompt": "p", "completions": ["a", "b", "c"], "ranking": [1, 1, 1]}', "tied"),
    ("comparisons", '{"prompt": "p", "completions": ["a", 3], "ranking": [0, 1]}', "completions[1]"),
    ("comparisons", json.dumps({"prompt": "p", "completions": ["x"] * 10, "ranking": list(range(10))}),
     "max_k=9"),
    ("comparisons", '{"prompt": "p", "chosen": "a", "rejected": null}', "field 'rejected'"),
    ("demonstrations", '{"messages": [{"role": "user", "content": "hi"}]}', "messages[-1].role"),
    ("demonstrations", '{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}',
     "messages[0].content"),
    ("prompts", b'{"prompt": "caf\xc3 latte"}', "UTF-8"),
]


@pytest.mark.parametrize("fmt,bad_line,expected_text", BAD_CASES)
def test_bad_rows_name_file_line_and_problem(tmp_path, fmt, bad_line, expected_text):
    path = write_lines(tmp_path / "data.jsonl", [GOOD_LINE[fmt], "", bad_line])
    with pytest.raises(DataError) as info:
        read_jsonl(path, fmt)
    message = str(info.value)
    assert f"{path}, line 3" in message, message
    assert expected_text in message, message
    assert "expected" in message
    assert info.value.line == 3


def test_empty_file_is_rejected_with_its_path(tmp_path):
    path = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="file is empty") as info:
        read_jsonl(path, "prompts")
    assert path in str(info.value)


def test_a_key_twice_in_one_object_is_refused_naming_it(tmp_path):
    path = write_lines(tmp_path / "dup.jsonl", [
        json.dumps({"prompt": "a", "completion": "b"}),
        '{"messages": [{"role": "user", "content": "a"}, '
        '{"role": "assistant", "content": "b", "role": "user"}]}'])
    with pytest.raises(DataError) as info:
        read_jsonl(path, "demonstrations")
    assert str(info.value) == (f"{path}, line 2: field 'role': got a second 'role' in one "
                               "object -- expected each key once")


def test_json_nested_past_the_recursion_limit_is_a_data_error(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    path = write_lines(tmp_path / "deep.jsonl", ['{"prompt": "a", "meta": ' + deep + "}"])
    with pytest.raises(DataError, match=r"deep.jsonl, line 1: expected JSON nested at most "
                                        r"about \d+ levels deep") as info:
        read_jsonl(path, "prompts")
    assert len(str(info.value)) < 300


def test_identical_completions_ranked_apart_are_refused(tmp_path):
    row = {"prompt": "p", "completions": ["x", "y", "x"], "ranking": [0, 1, 2]}
    path = write_lines(tmp_path / "same.jsonl", [json.dumps(row)])
    with pytest.raises(DataError, match=r"same.jsonl, line 1: field 'ranking': got \[0, 1, 2\] "
                                        r"-- expected equal ranks for identical completions "
                                        r"\(completions\[0\] and completions\[2\]"):
        read_jsonl(path, "comparisons")
    # Tied, identical completions are consistent (the built-in labelers tie them).
    row["ranking"] = [0, 1, 0]
    assert read_jsonl(write_lines(tmp_path / "tied.jsonl", [json.dumps(row)]),
                      "comparisons")[0]["ranking"] == [0, 1, 0]


def test_max_k_is_configurable(tmp_path):
    row = {"prompt": "p", "completions": [f"x{i}" for i in range(10)], "ranking": list(range(10))}
    path = write_lines(tmp_path / "k10.jsonl", [json.dumps(row)])
    assert len(read_jsonl(path, "comparisons", max_k=10)[0]["completions"]) == 10


def test_long_values_are_abbreviated_in_errors(tmp_path):
    path = write_lines(tmp_path / "long.jsonl", [json.dumps({"prompt": 1.5, "x": "y" * 5000})])
    with pytest.raises(DataError) as info:
        read_jsonl(path, "prompts")
    assert len(str(info.value)) < 400


def test_pairs_read_as_k2_and_extras_preserved(tmp_path):
    rows = [{"prompt": "hello", "chosen": "good", "rejected": "bad", "meta": {"id": 7}}]
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, rows)
    (row,) = read_jsonl(path, "comparisons")
    assert row == {"prompt": "hello", "completions": ["good", "bad"], "ranking": [0, 1], "meta": {"id": 7}}


def test_messages_render_plain_fallback_and_roundtrip(tmp_path):
    messages = [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "fine thanks"},
    ]
    path = write_lines(tmp_path / "chat.jsonl", [json.dumps({"messages": messages, "meta": 1})])
    (row,) = read_jsonl(path, "demonstrations")
    assert row["prompt"] == "System: be nice\nUser: hello\nAssistant:"
    assert row["completion"] == "fine thanks"
    assert row["prompt_messages"] == messages[:2]
    assert row["meta"] == 1
    # Canonical rows written back read identically.
    write_jsonl(tmp_path / "again.jsonl", [row])
    assert read_jsonl(tmp_path / "again.jsonl", "demonstrations") == [row]


def test_messages_use_chat_template_when_set(tokenizer):
    rows = validate_rows(
        [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fine"}]}],
        "demonstrations",
    )
    plain, _ = tokenize_demonstrations(rows, tokenizer, max_prompt_len=6, max_response_len=2)
    # "User: hello\nAssistant:" -> User : hello Assistant :
    np.testing.assert_array_equal(plain["input_ids"][0, :6], [PAD, 11, 12, 4, 13, 12])

    templated = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, pad_token="<pad>", eos_token="<eos>",
        bos_token="<bos>", unk_token="<unk>",
    )
    templated.chat_template = (
        "{% for m in messages %}{{ m['role'] }} says {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant says{% endif %}"
    )
    chat, _ = tokenize_demonstrations(rows, templated, max_prompt_len=6, max_response_len=2)
    # "user says hello assistant says"
    np.testing.assert_array_equal(chat["input_ids"][0], [PAD, 21, 23, 4, 22, 23, 9, EOS])


# ---------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------


def test_demonstration_layout_golden(tokenizer):
    rows = [{"prompt": "hello world", "completion": "fine thanks"}]
    arrays, stats = tokenize_demonstrations(rows, tokenizer, max_prompt_len=4, max_response_len=4)
    np.testing.assert_array_equal(arrays["input_ids"], [[PAD, PAD, 4, 5, 9, 10, EOS, PAD]])
    np.testing.assert_array_equal(arrays["attention_mask"], [[0, 0, 1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(arrays["position_ids"], [[0, 0, 0, 1, 2, 3, 4, 4]])
    np.testing.assert_array_equal(arrays["loss_mask"], [[0, 0, 0, 0, 1, 1, 1, 0]])
    np.testing.assert_array_equal(arrays["row_index"], [0])
    assert arrays["input_ids"].dtype == np.int32 and arrays["attention_mask"].dtype == np.int32
    assert arrays["position_ids"].dtype == np.int32 and arrays["loss_mask"].dtype == np.float32
    assert (stats.n_total, stats.n_truncated, stats.n_dropped) == (1, 0, 0)


def test_bos_added_only_when_asked(tokenizer):
    rows = [{"prompt": "hello", "completion": "ok"}]
    with_bos, _ = tokenize_demonstrations(rows, tokenizer, 3, 2, add_bos=True)
    np.testing.assert_array_equal(with_bos["input_ids"], [[PAD, BOS, 4, 20, EOS]])
    without, _ = tokenize_demonstrations(rows, tokenizer, 3, 2)
    np.testing.assert_array_equal(without["input_ids"], [[PAD, PAD, 4, 20, EOS]])


def test_truncation_keeps_prompt_end_and_response_start(tokenizer):
    rows = [
        {"prompt": "a b c d hello", "completion": "a b c d"},  # both too long
        {"prompt": "hello", "completion": "a b c"},  # response + EOS fits exactly
    ]
    arrays, stats = tokenize_demonstrations(rows, tokenizer, 4, 4, add_bos=True)
    # BOS kept in front, then the last 3 prompt tokens; response start kept, no EOS.
    np.testing.assert_array_equal(arrays["input_ids"][0], [BOS, 16, 17, 4, 14, 15, 16, 17])
    np.testing.assert_array_equal(arrays["loss_mask"][0], [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(arrays["input_ids"][1], [PAD, PAD, BOS, 4, 14, 15, 16, EOS])
    assert (stats.n_total, stats.n_truncated, stats.n_dropped) == (2, 1, 0)
    assert "1 truncated" in str(stats)

    dropped, drop_stats = tokenize_demonstrations(rows, tokenizer, 4, 4, overlong="drop", add_bos=True)
    np.testing.assert_array_equal(dropped["row_index"], [1])
    np.testing.assert_array_equal(dropped["input_ids"], arrays["input_ids"][1:])
    assert (drop_stats.n_total, drop_stats.n_truncated, drop_stats.n_dropped) == (2, 0, 1)


def test_everything_dropped_is_an_error(tokenizer):
    # A UserError: the CLI reports it in one line (exit 2), not as a traceback.
    with pytest.raises(UserError, match="no demonstrations left"):
        tokenize_demonstrations([{"prompt": "a b c", "completion": "d"}], tokenizer, 2, 4, overlong="drop")
    with pytest.raises(ValueError, match="overlong"):
        tokenize_prompts([{"prompt": "a"}], tokenizer, 4, overlong="cut")


def test_pretrain_chunk_truncate_drop(tokenizer):
    rows = [{"text": "a b c d a"}, {"text": "hello"}]  # 6 and 2 tokens with EOS
    chunked, stats = tokenize_pretrain(rows, tokenizer, seq_len=4, overlong="chunk")
    np.testing.assert_array_equal(
        chunked["input_ids"], [[14, 15, 16, 17], [14, EOS, PAD, PAD], [4, EOS, PAD, PAD]]
    )
    np.testing.assert_array_equal(chunked["loss_mask"], [[0, 1, 1, 1], [0, 1, 0, 0], [0, 1, 0, 0]])
    np.testing.assert_array_equal(chunked["position_ids"], [[0, 1, 2, 3], [0, 1, 1, 1], [0, 1, 1, 1]])
    np.testing.assert_array_equal(chunked["row_index"], [0, 0, 1])
    assert (stats.n_truncated, stats.n_dropped) == (1, 0)

    truncated, _ = tokenize_pretrain(rows, tokenizer, seq_len=4, overlong="truncate")
    np.testing.assert_array_equal(truncated["input_ids"], [[14, 15, 16, 17], [4, EOS, PAD, PAD]])
    dropped, drop_stats = tokenize_pretrain(rows, tokenizer, seq_len=4, overlong="drop")
    np.testing.assert_array_equal(dropped["row_index"], [1])
    assert drop_stats.n_dropped == 1


def test_comparisons_variable_k_padded_to_max_k(tokenizer):
    rows = [
        {"prompt": "hello", "completions": ["good", "bad"], "ranking": [0, 1]},
        {"prompt": "how are you", "completions": ["fine", "ok", "bad"], "ranking": [1, 0, 1]},
    ]
    arrays, stats = tokenize_comparisons(rows, tokenizer, max_prompt_len=3, max_response_len=2, max_k=4)
    assert arrays["input_ids"].shape == (2, 4, 5)
    assert arrays["ranks"].dtype == np.int32 and arrays["valid"].dtype == bool
    np.testing.assert_array_equal(arrays["valid"], [[1, 1, 0, 0], [1, 1, 1, 0]])
    np.testing.assert_array_equal(arrays["ranks"], [[0, 1, -1, -1], [1, 0, 1, -1]])
    np.testing.assert_array_equal(arrays["input_ids"][0, 0], [PAD, PAD, 4, 18, EOS])
    np.testing.assert_array_equal(arrays["input_ids"][0, 1], [PAD, PAD, 4, 19, EOS])
    np.testing.assert_array_equal(arrays["input_ids"][1, 2], [6, 7, 8, 19, EOS])
    np.testing.assert_array_equal(arrays["response_mask"][1, 0], [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(arrays["position_ids"][0, 0], [0, 0, 0, 1, 2])
    # Padding completions copy completion 0 so no sequence is fully masked.
    for key in ("input_ids", "attention_mask", "response_mask"):
        np.testing.assert_array_equal(arrays[key][0, 2], arrays[key][0, 0])
    assert (stats.n_total, stats.n_truncated, stats.n_dropped) == (2, 0, 0)

    _, drop_stats = tokenize_comparisons(rows, tokenizer, 2, 2, max_k=4, overlong="drop")
    assert (drop_stats.n_dropped, drop_stats.n_truncated) == (1, 0)
    with pytest.raises(ValueError, match="max_k=2"):
        tokenize_comparisons(rows, tokenizer, 3, 2, max_k=2)


def test_comparisons_to_pairs_skips_ties():
    rows = [{"prompt": "p", "completions": ["x", "y", "z"], "ranking": [1, 0, 1], "meta": "m"}]
    pairs = comparisons_to_pairs(rows)
    assert [p["completions"] for p in pairs] == [["y", "x"], ["y", "z"]]
    assert all(p["ranking"] == [0, 1] and p["meta"] == "m" and p["source_row"] == 0 for p in pairs)


def test_prompts_left_padded(tokenizer):
    rows = [{"prompt": "hello"}, {"prompt": "a b c d"}]
    arrays, stats = tokenize_prompts(rows, tokenizer, max_prompt_len=3)
    np.testing.assert_array_equal(arrays["input_ids"], [[PAD, PAD, 4], [15, 16, 17]])
    np.testing.assert_array_equal(arrays["attention_mask"], [[0, 0, 1], [1, 1, 1]])
    np.testing.assert_array_equal(arrays["position_ids"], [[0, 0, 0], [0, 1, 2]])
    assert stats.n_truncated == 1


def test_truncation_stats_str_and_log(caplog):
    stats = TruncationStats(n_total=4, n_truncated=1, n_dropped=1, kind="prompts")
    assert str(stats) == "prompts: 4 total, 1 truncated (25.0%), 1 dropped (25.0%)"
    with caplog.at_level("INFO"):
        stats.log()
    assert "1 dropped" in caplog.text


# ---------------------------------------------------------------------------
# TFDS round trips
# ---------------------------------------------------------------------------

ROUND_TRIP_ROWS = {
    "pretrain": [{"text": "hello world"}, {"text": "café ünïcode", "meta": {"src": "x"}}],
    "demonstrations": [
        {"prompt": "hello", "completion": "fine"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "meta": 3},
    ],
    "comparisons": [
        {"prompt": "p", "completions": ["a", "b", "c"], "ranking": [2, 0, 1], "meta": {"k": [1, 2]}},
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
    ],
    "prompts": [{"prompt": "hello"}, {"prompt": "how are you", "meta": None}],
}


@pytest.mark.parametrize("fmt", sorted(ROUND_TRIP_ROWS))
def test_tfds_round_trip(tmp_path, fmt):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    write_jsonl(train, ROUND_TRIP_ROWS[fmt])
    write_jsonl(test, ROUND_TRIP_ROWS[fmt][:1])
    data_dir = tmp_path / "tfds"
    builder = build_tfds_from_jsonl(fmt, {"train": train, "test": test}, data_dir, name="mine")
    expected = read_jsonl(train, fmt)
    assert load_tfds(builder, "train", data_dir) == expected
    # By name, as a later stage (or another process) would load it.
    assert load_tfds(f"{builder.name}/mine", "test", data_dir) == expected[:1]


def test_tfds_rebuild_from_changed_files_needs_overwrite(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"prompt": "hello"}])
    build_tfds_from_jsonl("prompts", {"train": path}, tmp_path / "tfds")
    build_tfds_from_jsonl("prompts", {"train": path}, tmp_path / "tfds")  # unchanged: reused
    write_jsonl(path, [{"prompt": "how"}, {"prompt": "are"}])
    with pytest.raises(ValueError, match="overwrite=True"):
        build_tfds_from_jsonl("prompts", {"train": path}, tmp_path / "tfds")
    builder = build_tfds_from_jsonl("prompts", {"train": path}, tmp_path / "tfds", overwrite=True)
    assert [r["prompt"] for r in load_tfds(builder, "train", tmp_path / "tfds")] == ["how", "are"]


def test_tfds_build_reports_bad_jsonl_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ['{"prompt": "ok"}', '{"prompt": ""}'])
    with pytest.raises(DataError, match="bad.jsonl, line 2"):
        build_tfds_from_jsonl("prompts", {"train": path}, tmp_path / "tfds")


class RlhfDataTestQuestions(tfds.core.GeneratorBasedBuilder):
    """A stand-in for a registered third-party TFDS dataset with its own field names."""

    VERSION = tfds.core.Version("0.1.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"question": tfds.features.Text(), "info": {"topic": tfds.features.Text()}}
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, (question, topic) in enumerate([("how are you", "chat"), ("hello", "greeting")]):
            yield i, {"question": question, "info": {"topic": topic}}


def test_load_registered_tfds_dataset_with_field_map(tmp_path):
    RlhfDataTestQuestions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    rows = load_tfds("rlhf_data_test_questions", "train", tmp_path,
                     field_map={"prompt": "question", "topic": "info.topic"}, fmt="prompts")
    assert rows == [
        {"prompt": "how are you", "topic": "chat", "info": {"topic": "chat"}},
        {"prompt": "hello", "topic": "greeting", "info": {"topic": "greeting"}},
    ]
    with pytest.raises(DataError, match="example 1: field 'answer'"):
        load_tfds("rlhf_data_test_questions", "train", tmp_path, field_map={"prompt": "answer"})
    with pytest.raises(ValueError, match="not prepared"):
        load_tfds("rlhf_data_test_questions", "train", tmp_path / "elsewhere")


# ---------------------------------------------------------------------------
# Data on gs:// (a GCS emulator on loopback)
# ---------------------------------------------------------------------------


def test_jsonl_on_gcs_round_trips_and_feeds_every_stage_reader(gcs_path, tokenizer, tmp_path):
    from rlhf_jax import storage
    from rlhf_jax.config import ppo_config, rm_config
    from rlhf_jax.data.sources import read_source
    from rlhf_jax.stages.ppo.loop import load_data
    from rlhf_jax.stages.supervised import comparison_rows

    prompts, comparisons = ROUND_TRIP_ROWS["prompts"], ROUND_TRIP_ROWS["comparisons"]
    for name, rows in (("prompts", prompts), ("cmp", comparisons)):
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
        write_jsonl(storage.join(gcs_path, "data", f"{name}.jsonl"), rows)
        # The same bytes as a local file, and no temporary left beside the object.
        assert storage.read_bytes(storage.join(gcs_path, "data", f"{name}.jsonl")) == \
            (tmp_path / f"{name}.jsonl").read_bytes()
    assert storage.listdir(storage.join(gcs_path, "data")) == ["cmp.jsonl", "prompts.jsonl"]
    remote = {name: storage.join(gcs_path, "data", f"{name}.jsonl") for name in ("prompts", "cmp")}

    assert read_jsonl(remote["prompts"], "prompts") == read_jsonl(tmp_path / "prompts.jsonl", "prompts")
    assert read_source(remote["cmp"], "comparisons") == read_jsonl(tmp_path / "cmp.jsonl", "comparisons")
    rm = rm_config().data          # the RM's and DPO's reader
    rm.train, rm.valid = remote["cmp"], remote["cmp"]
    train, valid = comparison_rows(rm, seed=0)
    assert train == valid == read_jsonl(tmp_path / "cmp.jsonl", "comparisons")
    ppo = ppo_config()             # PPO's reader
    ppo.data.prompts, ppo.ppo.ptx_coef = remote["prompts"], 0.0
    arrays, ptx = load_data(ppo, tokenizer, ppo.data.max_prompt_len)
    assert ptx is None and arrays["input_ids"].shape == (2, ppo.data.max_prompt_len)
    with pytest.raises(FileNotFoundError):
        read_jsonl(storage.join(gcs_path, "data", "missing.jsonl"), "prompts")


def test_tfds_dataset_built_into_and_read_from_gcs(gcs_path, monkeypatch):
    import os

    from rlhf_jax import storage
    from rlhf_jax.data.sources import read_source

    # ArrayRecord reads gs:// with google-cloud-cpp, which finds an emulator through this variable
    # (storage sets it on import when STORAGE_EMULATOR_HOST is already set; here it was set later).
    monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", os.environ["STORAGE_EMULATOR_HOST"])
    jsonl, data_dir = storage.join(gcs_path, "p.jsonl"), storage.join(gcs_path, "tfds")
    write_jsonl(jsonl, ROUND_TRIP_ROWS["prompts"])
    builder = build_tfds_from_jsonl("prompts", {"train": jsonl}, data_dir, name="mine")
    expected = read_jsonl(jsonl, "prompts")
    assert load_tfds(builder, "train") == expected
    assert read_source(f"tfds:{builder.name}/mine:train", "prompts", data_dir=data_dir) == expected
    assert build_tfds_from_jsonl("prompts", {"train": jsonl}, data_dir, name="mine").is_prepared()
    write_jsonl(jsonl, ROUND_TRIP_ROWS["prompts"][:1])
    with pytest.raises(ValueError, match="overwrite=True"):       # the stored fingerprint, read back
        build_tfds_from_jsonl("prompts", {"train": jsonl}, data_dir, name="mine")
    builder = build_tfds_from_jsonl("prompts", {"train": jsonl}, data_dir, name="mine", overwrite=True)
    assert load_tfds(builder, "train") == expected[:1]


# ---------------------------------------------------------------------------
# Iterator
# ---------------------------------------------------------------------------


def example_arrays(n: int = 10) -> dict[str, np.ndarray]:
    return {"x": np.arange(n, dtype=np.int32), "y": np.arange(2 * n, dtype=np.float32).reshape(n, 2)}


def take(iterator, steps: int) -> list[np.ndarray]:
    return [next(iterator)["x"] for _ in range(steps)]


def test_iterator_deterministic_epochwise_and_seeded():
    a = take(BatchIterator(example_arrays(), 4, seed=1, process_index=0, process_count=1), 6)
    b = take(BatchIterator(example_arrays(), 4, seed=1, process_index=0, process_count=1), 6)
    c = take(BatchIterator(example_arrays(), 4, seed=2, process_index=0, process_count=1), 6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # 10 examples, batch 4 -> 2 steps per epoch, each epoch without repeats.
    for epoch in range(3):
        seen = np.concatenate(a[2 * epoch: 2 * epoch + 2])
        assert len(set(seen.tolist())) == 8
    ordered = BatchIterator(example_arrays(), 4, seed=0, shuffle=False, process_index=0, process_count=1)
    assert ordered.steps_per_epoch == 2
    np.testing.assert_array_equal(take(ordered, 3), [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]])


def test_iterator_batches_keep_arrays_aligned():
    batch = next(BatchIterator(example_arrays(), 4, seed=3, process_index=0, process_count=1))
    np.testing.assert_array_equal(batch["y"][:, 0], 2 * batch["x"])


def test_two_processes_cover_global_batch_once():
    arrays = example_arrays(16)
    whole = BatchIterator(arrays, 8, seed=5, process_index=0, process_count=1)
    procs = [BatchIterator(arrays, 8, seed=5, process_index=i, process_count=2) for i in range(2)]
    for _ in range(4):
        global_batch = next(whole)["x"]
        p0, p1 = (next(p)["x"] for p in procs)
        assert len(p0) == len(p1) == 4
        assert not set(p0.tolist()) & set(p1.tolist())
        np.testing.assert_array_equal(np.concatenate([p0, p1]), global_batch)


def test_state_restore_continues_identically():
    original = BatchIterator(example_arrays(), 4, seed=9, process_index=1, process_count=2)
    take(original, 3)  # stop mid-epoch 1
    saved = json.loads(json.dumps(original.state()))
    assert saved["epoch"] == 1 and saved["index"] == 1 and saved["seed"] == 9
    expected = take(original, 5)  # crosses epoch boundaries
    resumed = BatchIterator(example_arrays(), 4, seed=0, process_index=1, process_count=2)
    resumed.restore(saved)
    np.testing.assert_array_equal(take(resumed, 5), expected)
    with pytest.raises(ValueError, match="num_examples"):
        BatchIterator(example_arrays(12), 4, seed=9, process_index=0, process_count=1).restore(saved)


def test_iterator_rejects_bad_layouts():
    with pytest.raises(UserError, match="fewer than one global batch"):   # the data's size
        BatchIterator(example_arrays(3), 4, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="divisible by process_count=3"):
        BatchIterator(example_arrays(), 4, seed=0, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="leading"):
        BatchIterator({"x": np.zeros(4), "y": np.zeros(5)}, 2, seed=0, process_index=0, process_count=1)


def test_keep_remainder_tops_up_last_batch():
    it = BatchIterator(example_arrays(), 4, seed=0, shuffle=False, drop_remainder=False,
                       process_index=0, process_count=1)
    assert it.steps_per_epoch == 3
    np.testing.assert_array_equal(take(it, 3)[-1], [8, 9, 0, 1])


def test_iterator_defaults_to_jax_process_and_builds_global_batch():
    it = BatchIterator(example_arrays(16), 8, seed=0)
    assert (it.process_index, it.process_count) == (0, 1)
    local = next(it)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch = make_global_batch(local, mesh, PartitionSpec("data"))
    assert batch["x"].shape == (8,) and batch["y"].shape == (8, 2)
    assert len(batch["x"].sharding.device_set) == len(jax.devices())
    np.testing.assert_array_equal(np.asarray(batch["x"]), local["x"])
