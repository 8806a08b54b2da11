"""Preference and prompt data in the shapes people have it: Anthropic HH transcripts,
TRL conversational rows, message-list prompts; and their chat-template rendering."""
from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rlhf_jax.data import (
    DataError,
    read_jsonl,
    render_prompt,
    tokenize_comparisons,
    tokenize_demonstrations,
    tokenize_prompts,
    validate_row,
    validate_rows,
    write_jsonl,
)


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


SINGLE = {
    "chosen": "\n\nHuman: What is the capital of France?\n\nAssistant: Paris is the capital.",
    "rejected": "\n\nHuman: What is the capital of France?\n\nAssistant: I do not know.",
}
MULTI = {
    "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: more?\n\nAssistant: sure",
    "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: more?\n\nAssistant: no",
}
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizers_pair() -> tuple[PreTrainedTokenizerFast, PreTrainedTokenizerFast]:
    """A tiny byte-level BPE (as GPT-2 / Llama 3 use) without and with a chat template."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator([SINGLE["chosen"], SINGLE["rejected"], MULTI["chosen"], MULTI["rejected"]] * 5,
                             trainer=trainer)
    plain = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
    templated = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
    templated.chat_template = TEMPLATE
    return plain, templated


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def decode(tokenizer, ids, mask) -> str:
    return tokenizer.decode([int(i) for i, m in zip(ids, mask) if m], clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------------------
# Anthropic HH transcripts: {"chosen": str, "rejected": str}
# ---------------------------------------------------------------------------


def test_hh_transcripts_split_at_last_assistant_turn(tmp_path):
    path = write_rows(tmp_path / "hh.jsonl", [SINGLE, {**MULTI, "meta": {"id": 3}}])
    single, multi = read_jsonl(path, "comparisons")
    assert single == {
        "prompt": "\n\nHuman: What is the capital of France?\n\nAssistant:",
        "completions": [" Paris is the capital.", " I do not know."],
        "ranking": [0, 1],
        "prompt_messages": [msg("user", "What is the capital of France?")],
    }
    assert multi["prompt"] == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: more?\n\nAssistant:"
    assert multi["completions"] == [" sure", " no"]
    assert multi["prompt_messages"] == [msg("user", "hi"), msg("assistant", "hello"), msg("user", "more?")]
    assert multi["meta"] == {"id": 3}
    # Nothing is lost or added at the split.
    for source, row in ((SINGLE, single), (MULTI, multi)):
        assert row["prompt"] + row["completions"][0] == source["chosen"]
        assert row["prompt"] + row["completions"][1] == source["rejected"]


def test_hh_split_is_a_token_boundary_for_byte_level_bpe(tokenizers_pair):
    # The space stays on the completion, so prompt ids + completion ids are exactly
    # the ids of the whole transcript: the reward model sees what a base model would.
    plain, _ = tokenizers_pair
    rows = validate_rows([MULTI], "comparisons")
    arrays, _ = tokenize_comparisons(rows, plain, max_prompt_len=48, max_response_len=8, max_k=2)
    for j, transcript in enumerate((MULTI["chosen"], MULTI["rejected"])):
        real = arrays["attention_mask"][0, j] == 1
        ids = arrays["input_ids"][0, j][real].tolist()
        assert ids == plain(transcript, add_special_tokens=False)["input_ids"] + [plain.eos_token_id]


def test_hh_preamble_becomes_system_message_and_markers_are_configurable():
    context = "Be brief.\n\nH: a\n\nA: b\n\nH: c\n\nA:"
    row = {"chosen": context + " d", "rejected": context + " e"}
    canonical = validate_row(row, "comparisons", assistant_marker="\n\nA:", human_marker="\n\nH:")
    assert canonical["prompt"] == "Be brief.\n\nH: a\n\nA: b\n\nH: c\n\nA:"
    assert canonical["completions"] == [" d", " e"]
    assert canonical["prompt_messages"] == [msg("system", "Be brief."), msg("user", "a"),
                                            msg("assistant", "b"), msg("user", "c")]
    with pytest.raises(DataError, match="'\\\\n\\\\nAssistant:'"):
        validate_row(row, "comparisons")  # the default markers are not in these transcripts
    with pytest.raises(ValueError, match="must differ"):
        validate_row(row, "comparisons", assistant_marker="\n\nA:", human_marker="\n\nA:")


HH_ERRORS = [
    # (row, field named in the message, part of the expectation)
    ({"chosen": "hello there", "rejected": MULTI["rejected"]}, "field 'chosen'",
     "at least one '\\n\\nAssistant:' turn"),
    ({"chosen": MULTI["chosen"], "rejected": "\n\nHuman: hi"}, "field 'rejected'", "at least one"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant:  ", "rejected": MULTI["rejected"]}, "field 'chosen'",
     "a non-empty final assistant turn"),
    ({"chosen": MULTI["chosen"], "rejected": MULTI["rejected"].replace("more?", "less?")}, "field 'rejected'",
     "both transcripts to share the text up to the last '\\n\\nAssistant:' turn"),
    ({"chosen": MULTI["chosen"], "rejected": MULTI["rejected"] + "\n\nHuman: ok\n\nAssistant: fine"},
     "field 'rejected'", "share the text up to the last"),
    ({"chosen": MULTI["chosen"] + "\n\nHuman: thanks", "rejected": MULTI["rejected"]}, "field 'chosen'",
     "end with an assistant turn"),
    ({"chosen": "\n\nAssistant: a", "rejected": "\n\nAssistant: b"}, "field 'chosen'", "some dialogue before"),
    ({"chosen": MULTI["chosen"]}, "field 'rejected'", "a 'rejected' field"),
    ({"chosen": MULTI["chosen"], "rejected": 3}, "field 'rejected'", "a string"),
]


@pytest.mark.parametrize("row,field,expected", HH_ERRORS)
def test_hh_errors_name_file_line_field_and_expectation(tmp_path, row, field, expected):
    path = write_rows(tmp_path / "hh.jsonl", [SINGLE, row])
    with pytest.raises(DataError) as info:
        read_jsonl(path, "comparisons")
    message = str(info.value)
    assert message.startswith(f"{path}, line 2: {field}: "), message
    assert expected in message, message
    assert "\n" not in message and len(message) < 400, message


def test_hh_prefix_mismatch_shows_where_the_transcripts_part():
    rejected = MULTI["rejected"].replace("more?", "less?")
    with pytest.raises(DataError) as info:
        validate_row({"chosen": MULTI["chosen"], "rejected": rejected}, "comparisons")
    at = MULTI["chosen"].index("more?")
    assert f"at character {at}" in str(info.value)
    assert "less?" in str(info.value) and "more?" in str(info.value)


# ---------------------------------------------------------------------------
# TRL conversational rows
# ---------------------------------------------------------------------------

PROMPT = [msg("system", "be kind"), msg("user", "hi")]


def test_trl_explicit_conversational_pair():
    row = {"prompt": PROMPT, "chosen": [msg("assistant", "hello!")], "rejected": [msg("assistant", "go away")],
           "score_chosen": 9.0}
    assert validate_row(row, "comparisons") == {
        "prompt": "System: be kind\nUser: hi\nAssistant:",
        "prompt_messages": PROMPT,
        "completions": ["hello!", "go away"],
        "ranking": [0, 1],
        "score_chosen": 9.0,
    }


def test_trl_explicit_pair_with_longer_continuations_extends_the_prompt():
    turns = [msg("assistant", "hello"), msg("user", "more?")]
    row = {"prompt": PROMPT, "chosen": turns + [msg("assistant", "sure")],
           "rejected": turns + [msg("assistant", "no")]}
    canonical = validate_row(row, "comparisons")
    assert canonical["prompt_messages"] == PROMPT + turns
    assert canonical["completions"] == ["sure", "no"]


def test_trl_implicit_conversational_pair():
    context = [msg("user", "hi"), msg("assistant", "hello"), msg("user", "more?")]
    row = {"chosen": context + [msg("assistant", "sure")], "rejected": context + [msg("assistant", "no")]}
    assert validate_row(row, "comparisons") == {
        "prompt": "User: hi\nAssistant: hello\nUser: more?\nAssistant:",
        "prompt_messages": context,
        "completions": ["sure", "no"],
        "ranking": [0, 1],
    }


TRL_ERRORS = [
    ({"chosen": [msg("user", "a"), msg("assistant", "b")], "rejected": [msg("user", "x"), msg("assistant", "c")]},
     "field 'rejected[0]'", "share every message before their final assistant reply"),
    ({"chosen": [msg("user", "a"), msg("assistant", "b")], "rejected": [msg("assistant", "c")]},
     "field 'rejected'", "share every message"),
    ({"chosen": [msg("user", "a"), msg("user", "b")], "rejected": [msg("user", "a"), msg("assistant", "c")]},
     "field 'chosen[-1].role'", "role 'assistant'"),
    ({"chosen": [msg("assistant", "b")], "rejected": [msg("assistant", "c")]}, "field 'chosen'",
     "before the assistant's reply"),
    ({"prompt": PROMPT, "chosen": [msg("assistant", "b")], "rejected": "c"}, "field 'rejected'",
     "list of {'role', 'content'} objects"),
    ({"prompt": PROMPT, "chosen": [msg("assistant", " ")], "rejected": [msg("assistant", "c")]},
     "field 'chosen[-1].content'", "non-empty assistant completion"),
    ({"prompt": [{"role": "user"}], "chosen": [msg("assistant", "b")], "rejected": [msg("assistant", "c")]},
     "field 'prompt[0].content'", "'content' string"),
    ({"prompt": 3, "chosen": "b", "rejected": "c"}, "field 'prompt'", "a string or a list"),
]


@pytest.mark.parametrize("row,field,expected", TRL_ERRORS)
def test_trl_errors_name_file_line_field_and_expectation(tmp_path, row, field, expected):
    good = {"prompt": PROMPT, "chosen": [msg("assistant", "b")], "rejected": [msg("assistant", "c")]}
    path = write_rows(tmp_path / "trl.jsonl", [good, good, row])
    with pytest.raises(DataError) as info:
        read_jsonl(path, "comparisons")
    message = str(info.value)
    assert message.startswith(f"{path}, line 3: {field}: "), message
    assert expected in message, message
    assert "\n" not in message


# ---------------------------------------------------------------------------
# Prompts and demonstrations as messages; K-way rows
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["prompt", "messages"])
def test_conversational_prompts(field):
    row = validate_row({field: PROMPT, "meta": 1}, "prompts")
    assert row == {"prompt": "System: be kind\nUser: hi\nAssistant:", "prompt_messages": PROMPT, "meta": 1}


@pytest.mark.parametrize("field", ["prompt", "messages"])
def test_conversational_prompt_ending_with_the_reply_is_rejected(field):
    with pytest.raises(DataError, match=rf"line 5: field '{field}\[-1\]\.role'.*ending before the assistant's reply"):
        validate_row({field: PROMPT + [msg("assistant", "x")]}, "prompts", source="p.jsonl", line=5)


def test_trl_conversational_demonstration():
    row = {"prompt": PROMPT, "completion": [msg("assistant", "hello")]}
    assert validate_row(row, "demonstrations") == {
        "prompt": "System: be kind\nUser: hi\nAssistant:", "prompt_messages": PROMPT, "completion": "hello",
    }
    with pytest.raises(DataError, match="field 'prompt'.*a list of messages when 'completion' is one"):
        validate_row({"prompt": "hi", "completion": [msg("assistant", "hello")]}, "demonstrations")


def test_k_way_rows_unchanged_and_prompt_may_be_messages():
    row = {"prompt": "p", "completions": ["a", "b", "c"], "ranking": [1, 0, 1], "meta": {"x": 1}}
    assert validate_row(row, "comparisons") == row
    chat = validate_row({"prompt": PROMPT, "completions": ["a", "b"], "ranking": [0, 1]}, "comparisons")
    assert chat["prompt_messages"] == PROMPT and chat["prompt"].endswith("Assistant:")


def test_canonical_rows_round_trip(tmp_path):
    rows = [
        MULTI,
        {"prompt": PROMPT, "chosen": [msg("assistant", "b")], "rejected": [msg("assistant", "c")]},
        {"chosen": PROMPT + [msg("assistant", "b")], "rejected": PROMPT + [msg("assistant", "c")]},
    ]
    canonical = validate_rows(rows, "comparisons")
    write_jsonl(tmp_path / "canonical.jsonl", canonical)
    assert read_jsonl(tmp_path / "canonical.jsonl", "comparisons") == canonical
    prompts = validate_rows([{"messages": PROMPT}], "prompts")
    write_jsonl(tmp_path / "prompts.jsonl", prompts)
    assert read_jsonl(tmp_path / "prompts.jsonl", "prompts") == prompts


# ---------------------------------------------------------------------------
# Rendering: chat template when the tokenizer has one, plain text otherwise
# ---------------------------------------------------------------------------


def test_tokenize_comparisons_renders_prompt_messages(tokenizers_pair):
    plain, templated = tokenizers_pair
    rows = validate_rows(
        [MULTI, {"prompt": PROMPT, "chosen": [msg("assistant", "sure")], "rejected": [msg("assistant", "no")]}],
        "comparisons",
    )
    p = 64
    for tokenizer in (plain, templated):
        arrays, stats = tokenize_comparisons(rows, tokenizer, max_prompt_len=p, max_response_len=8, max_k=3)
        assert stats.n_truncated == stats.n_dropped == 0
        for i, row in enumerate(rows):
            if tokenizer is templated:
                expected = templated.apply_chat_template(row["prompt_messages"], tokenize=False,
                                                         add_generation_prompt=True)
                assert expected.startswith("<|")
            else:
                expected = row["prompt"]
            assert render_prompt(row, tokenizer) == expected
            for j, completion in enumerate(row["completions"]):
                ids, mask = arrays["input_ids"][i, j], arrays["attention_mask"][i, j]
                assert decode(tokenizer, ids[:p], mask[:p]) == expected
                assert decode(tokenizer, ids[p:], arrays["response_mask"][i, j, p:]) == completion + "<eos>"
            assert not arrays["valid"][i, 2]


def test_tokenize_prompts_and_demonstrations_render_prompt_messages(tokenizers_pair):
    plain, templated = tokenizers_pair
    prompts = validate_rows([{"messages": PROMPT}, {"prompt": "\n\nHuman: hi\n\nAssistant:"}], "prompts")
    for tokenizer in (plain, templated):
        arrays, _ = tokenize_prompts(prompts, tokenizer, max_prompt_len=48)
        decoded = [decode(tokenizer, ids, mask) for ids, mask in zip(arrays["input_ids"], arrays["attention_mask"])]
        first = (templated.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
                 if tokenizer is templated else "System: be kind\nUser: hi\nAssistant:")
        # A plain string prompt has no messages, so it is used as is even with a template.
        assert decoded == [first, "\n\nHuman: hi\n\nAssistant:"]

    demos = validate_rows([{"prompt": PROMPT, "completion": [msg("assistant", "hello")]}], "demonstrations")
    arrays, _ = tokenize_demonstrations(demos, templated, max_prompt_len=48, max_response_len=8)
    assert decode(templated, arrays["input_ids"][0, :48], arrays["attention_mask"][0, :48]) == (
        templated.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    )
    np.testing.assert_array_equal(arrays["loss_mask"][0, 48:].sum(), 1 + len(
        templated("hello", add_special_tokens=False)["input_ids"]))


def test_identical_pairs_load():
    """Public HH dumps hold a few pairs whose chosen and rejected are the same text: they load
    (their loss has no gradient) instead of stopping a run at that line."""
    row = validate_row({"chosen": MULTI["chosen"], "rejected": MULTI["chosen"]}, "comparisons")
    assert row["completions"][0] == row["completions"][1]
    same = [msg("user", "a"), msg("assistant", "b")]
    assert validate_row({"chosen": same, "rejected": same}, "comparisons")["ranking"] == [0, 1]
