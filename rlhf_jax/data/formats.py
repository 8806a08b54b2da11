"""JSONL formats for every stage, validated up front.

Each line of a JSONL file is one JSON object. Four formats exist. Wherever a
prompt appears it may be a string or a message list
``[{"role": str, "content": str}, ...]`` (a "conversational" prompt).

* ``pretrain``:       ``{"text": str}``
* ``demonstrations``:
    - ``{"prompt": str | [messages], "completion": str}``;
    - ``{"messages": [messages]}`` whose final message is the assistant's completion;
    - TRL conversational ``{"prompt": [messages], "completion": [messages]}`` whose
      final completion message is the assistant's reply (any earlier completion
      messages continue the prompt).
* ``comparisons``:
    - K-way ``{"prompt": str | [messages], "completions": [K str], "ranking": [K int]}``
      (rank 0 is best, equal ranks are ties);
    - explicit-prompt pair ``{"prompt": str, "chosen": str, "rejected": str}``;
    - implicit-prompt transcripts (Anthropic HH) ``{"chosen": str, "rejected": str}``,
      each a full ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` dialogue. The prompt is
      the text up to and including the LAST assistant marker (default
      ``"\\n\\nAssistant:"``, see ``assistant_marker``), which both transcripts must
      share exactly; the completions are what follows it;
    - TRL explicit conversational ``{"prompt": [messages], "chosen": [messages],
      "rejected": [messages]}``;
    - TRL implicit conversational ``{"chosen": [messages], "rejected": [messages]}``
      whose messages before the final assistant reply are the shared prompt.
    Every pair is read as K=2 with ranking ``[0, 1]`` (chosen first). An identical
    chosen/rejected pair is kept (public dumps hold a few; its loss has no gradient).
    A K-way ranking that ranks two identical completions apart is refused with its
    line: nobody can prefer a text to itself, so such a ranking was not made by looking
    at the texts (a labeling or export bug), and every pair it yields is noise the
    reward model's loss cannot learn from (``-log sigmoid(0)`` with no gradient) while
    it still counts in the loss and the accuracy. Identical completions sharing a rank
    are a tie and fine (the built-in labelers tie them).
* ``prompts``:        ``{"prompt": str | [messages]}`` or ``{"messages": [messages]}``
  (the conversation so far; its last message must not be the assistant's).

A line whose object repeats a key (at any depth) is refused naming the key: JSON
parsers disagree on which copy wins, so the row would mean different things to
different tools.

Fields not listed above (for instance a ``"meta"`` dict consumed by a synthetic
labeler) are kept untouched on the canonical row.

Every row is checked before any training starts, so a bad line fails in
seconds with its file and line number instead of hours later on a TPU pod.

Canonical rows (what :func:`read_jsonl` returns):

* pretrain:       ``{"text", ...extras}``
* demonstrations: ``{"prompt", "completion", ...extras}``
* comparisons:    ``{"prompt", "completions", "ranking", ...extras}``
* prompts:        ``{"prompt", ...extras}``

Rows whose prompt came as messages (or was parsed from a transcript) also carry
``"prompt_messages"``: the list of messages before the reply. Tokenization
renders them with the tokenizer's chat template when it has one; otherwise the
plain ``"prompt"`` string is used. For message rows that string is
:func:`render_messages_plain`; for transcripts it is the transcript prefix
verbatim. Canonical rows written back with :func:`write_jsonl` read identically.

Whitespace at the transcript split: the prompt ends with the marker itself
(``"...\\n\\nAssistant:"``) and the completion keeps the text after it verbatim,
leading space included (``" sure"``). Byte-level BPE tokenizers (GPT-2, Llama 3,
...) merge that space into the first word (``" sure"`` is one token), which is how the
words occur in the transcript, and ``prompt + completion`` is exactly the
transcript. The same completion text is used when a chat template renders the
prompt; chosen and rejected then both start with that one space, so the
comparison itself is unaffected. Message contents parsed from a transcript are
stripped of surrounding whitespace (chat templates add their own separators).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Iterable, Mapping

from rlhf_jax import storage
from rlhf_jax.errors import UserError

FORMATS: tuple[str, ...] = ("pretrain", "demonstrations", "comparisons", "prompts")
DEFAULT_MAX_K = 9
# Anthropic HH-RLHF turn markers; a transcript's prompt ends with its last assistant marker.
DEFAULT_ASSISTANT_MARKER = "\n\nAssistant:"
DEFAULT_HUMAN_MARKER = "\n\nHuman:"
_VALUE_PREVIEW_CHARS = 80
_UTF8_BOM = b"\xef\xbb\xbf"


def abbreviate(value: Any, limit: int = _VALUE_PREVIEW_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters so huge rows stay readable in errors."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return text[: limit - 3] + "..."


class DataError(UserError, ValueError):
    """A row (or a whole file) that does not match its format.

    The message always names the source (file path or TFDS split), the line
    (1-based) or example number, the field, an abbreviated offending value and
    what was expected, e.g.::

        data/cmp.jsonl, line 7: field 'ranking': got [0, 'a'] -- expected a list of 2 ints (0 = best, equal = tie)
    """

    def __init__(
        self,
        source: str,
        line: int | None,
        field: str | None,
        value: Any,
        expected: str,
        *,
        unit: str = "line",
        show_value: bool = True,
        got: str | None = None,
    ):
        self.source = str(source)
        self.line = line
        self.field = field
        self.value = value
        self.expected = expected
        where = self.source if line is None else f"{self.source}, {unit} {line}"
        what = f"field '{field}': " if field else ""
        if got is None:
            got = f"got {abbreviate(value)}" if show_value else ""
        got_part = f"{got} -- " if got else ""
        super().__init__(f"{where}: {what}{got_part}expected {expected}")


class _Location:
    """Where a row came from; builds :class:`DataError` s that name it."""

    def __init__(self, source: str, line: int | None, unit: str = "line"):
        self.source = source
        self.line = line
        self.unit = unit

    def error(self, field: str | None, value: Any, expected: str, **kw: Any) -> DataError:
        return DataError(self.source, self.line, field, value, expected, unit=self.unit, **kw)


def _require_field(row: Mapping[str, Any], field: str, where: _Location) -> Any:
    if field not in row:
        got = f"missing (the row has fields {abbreviate(sorted(row))})"
        raise where.error(field, None, f"a '{field}' field", got=got)
    return row[field]


def _require_str(row: Mapping[str, Any], field: str, where: _Location, *, non_empty: bool) -> str:
    value = _require_field(row, field, where)
    if not isinstance(value, str):
        raise where.error(field, value, f"a string, not {type(value).__name__}")
    if non_empty and not value.strip():
        raise where.error(field, value, "a non-empty string (whitespace only is not allowed)")
    return value


def _extras(row: Mapping[str, Any], consumed: Iterable[str]) -> dict[str, Any]:
    consumed = set(consumed)
    return {k: v for k, v in row.items() if k not in consumed}


def _lookup(row: Mapping[str, Any], dotted: str, target: str, where: _Location) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            have = abbreviate(sorted(value)) if isinstance(value, Mapping) else type(value).__name__
            raise where.error(dotted, None, f"a field {dotted!r} (data.field_map maps {target!r} to it)",
                              got=f"missing{'' if part == dotted else f' at {part!r}'} "
                                  f"(the row has {have})")
        value = value[part]
    return value


def _apply_field_map(row: Any, field_map: Mapping[str, str] | None, where: _Location) -> Any:
    """``row`` with canonical fields taken from its own (``field_map``: canonical field -> source
    field, nested fields with dots, e.g. ``{"prompt": "question", "topic": "info.topic"}``).

    A renamed top-level source field is dropped; nested ones stay in their parent, and every
    other field is kept as an extra. Rows that are not objects are left to the validator."""
    if not field_map or not isinstance(row, Mapping):
        return row
    mapped = {target: _lookup(row, source, target, where) for target, source in field_map.items()}
    consumed = {source for source in field_map.values() if "." not in source} - set(field_map)
    rest = {k: v for k, v in row.items() if k not in consumed and k not in mapped}
    return {**mapped, **rest}


def map_fields(rows: Iterable[Any], field_map: Mapping[str, str] | None, *, source: str,
               unit: str = "example") -> list[Any]:
    """In-memory rows (numbered from 1) through ``field_map`` (see :func:`validate_rows`),
    not validated: for sources whose format is not known."""
    return [_apply_field_map(row, field_map, _Location(source, i, unit))
            for i, row in enumerate(rows, start=1)]


def render_messages_plain(messages: list[dict[str, str]]) -> str:
    """Plain-text prompt for tokenizers without a chat template.

    Each message becomes ``"<Role>: <content>"`` (role capitalized), lines are
    joined with ``"\\n"`` and a final ``"\\nAssistant:"`` cues the reply, e.g.
    ``[{"role": "user", "content": "hi"}]`` -> ``"User: hi\\nAssistant:"``.
    """
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    lines.append("Assistant:")
    return "\n".join(lines)


def _validate_message_list(messages: Any, field: str, where: _Location) -> list[dict[str, str]]:
    """Structure only: a non-empty list of objects with a 'role' and a 'content' string."""
    if not isinstance(messages, list) or not messages:
        raise where.error(field, messages, "a non-empty list of {'role', 'content'} objects")
    cleaned = []
    for i, message in enumerate(messages):
        item = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise where.error(item, message, "an object with 'role' and 'content' strings")
        role = message.get("role")
        if not isinstance(role, str) or not role.strip():
            raise where.error(f"{item}.role", role, "a non-empty 'role' string in every message")
        content = message.get("content")
        if not isinstance(content, str):
            raise where.error(f"{item}.content", content, "a 'content' string in every message")
        cleaned.append(dict(message))
    return cleaned


def _check_reply(messages: list[dict[str, str]], field: str, where: _Location) -> None:
    """The final message must be a non-empty assistant reply."""
    if messages[-1]["role"] != "assistant":
        raise where.error(
            f"{field}[-1].role", messages[-1]["role"],
            "the final message to be the assistant's completion (role 'assistant')",
        )
    if not messages[-1]["content"].strip():
        raise where.error(f"{field}[-1].content", messages[-1]["content"], "a non-empty assistant completion")


def _validate_messages(
    messages: Any, field: str, where: _Location, *, ends_with_assistant: bool
) -> list[dict[str, str]]:
    cleaned = _validate_message_list(messages, field, where)
    if ends_with_assistant:
        _check_reply(cleaned, field, where)
        if len(cleaned) < 2:
            raise where.error(field, messages, "at least one message before the assistant's completion")
    context = cleaned[:-1] if ends_with_assistant else cleaned
    if not any(m["content"].strip() for m in context):
        raise where.error(field, messages, "a prompt with some non-whitespace content")
    return cleaned


def _read_prompt(row: Mapping[str, Any], where: _Location) -> tuple[str, list[dict[str, str]] | None]:
    """``(plain prompt, prompt messages or None)`` from a string or message-list ``prompt``.

    A string prompt may come with ``prompt_messages`` (a canonical row written back).
    """
    value = _require_field(row, "prompt", where)
    if isinstance(value, list):
        messages = _validate_messages(value, "prompt", where, ends_with_assistant=False)
        return render_messages_plain(messages), messages
    if not isinstance(value, str):
        raise where.error("prompt", value,
                          f"a string or a list of {{'role', 'content'}} messages, not {type(value).__name__}")
    prompt = _require_str(row, "prompt", where, non_empty=True)
    messages = None
    if "prompt_messages" in row:
        messages = _validate_messages(row["prompt_messages"], "prompt_messages", where, ends_with_assistant=False)
    return prompt, messages


def _with_messages(canonical: dict[str, Any], messages: list[dict[str, str]] | None) -> dict[str, Any]:
    if messages is not None:
        canonical["prompt_messages"] = messages
    return canonical


class _Options:
    """Per-call settings every validator sees (``max_k``, transcript turn markers)."""

    def __init__(self, max_k: int, assistant_marker: str, human_marker: str):
        for name, marker in (("assistant_marker", assistant_marker), ("human_marker", human_marker)):
            if not isinstance(marker, str) or not marker.strip():
                raise ValueError(f"{name} must be a non-empty string, got {marker!r}")
        if assistant_marker == human_marker:
            raise ValueError(f"assistant_marker and human_marker must differ, both are {assistant_marker!r}")
        self.max_k = max_k
        self.assistant_marker = assistant_marker
        self.human_marker = human_marker


def _validate_pretrain(row: Mapping[str, Any], where: _Location, opts: _Options) -> dict[str, Any]:
    text = _require_str(row, "text", where, non_empty=True)
    return {"text": text, **_extras(row, ["text"])}


def _validate_demonstration(row: Mapping[str, Any], where: _Location, opts: _Options) -> dict[str, Any]:
    if "messages" in row and "prompt" not in row:
        messages = _validate_messages(row["messages"], "messages", where, ends_with_assistant=True)
        context = messages[:-1]
        return {
            "prompt": render_messages_plain(context),
            "completion": messages[-1]["content"],
            "prompt_messages": context,
            **_extras(row, ["messages", "prompt_messages"]),
        }
    prompt, prompt_messages = _read_prompt(row, where)
    completion = _require_field(row, "completion", where)
    if isinstance(completion, list):
        # TRL conversational: earlier completion messages continue the conversation.
        if not isinstance(row["prompt"], list):
            raise where.error("prompt", row["prompt"],
                              "a list of messages when 'completion' is one (TRL conversational rows)")
        reply = _validate_message_list(completion, "completion", where)
        _check_reply(reply, "completion", where)
        prompt_messages = prompt_messages + reply[:-1]
        prompt, completion = render_messages_plain(prompt_messages), reply[-1]["content"]
    else:
        completion = _require_str(row, "completion", where, non_empty=True)
    canonical = {"prompt": prompt, "completion": completion,
                 **_extras(row, ["prompt", "completion", "prompt_messages"])}
    return _with_messages(canonical, prompt_messages)


def _is_int(value: Any) -> bool:
    # bool is a subclass of int in Python; a ranking of True/False is a bug.
    return isinstance(value, int) and not isinstance(value, bool)


def _pair_row(prompt: str, prompt_messages: list[dict[str, str]] | None, chosen: str, rejected: str,
              row: Mapping[str, Any]) -> dict[str, Any]:
    canonical = {
        "prompt": prompt,
        "completions": [chosen, rejected],
        "ranking": [0, 1],
        **_extras(row, ["prompt", "chosen", "rejected", "prompt_messages"]),
    }
    return _with_messages(canonical, prompt_messages)


def _snippet(text: str, at: int) -> str:
    """The text around character ``at``, for showing where two transcripts part."""
    if at >= len(text):
        return f"the end of the text ({len(text)} chars)"
    start = max(0, at - 20)
    return ("..." if start else "") + abbreviate(text[start: at + 40], 70)


def _split_turns(text: str, opts: _Options) -> list[dict[str, str]]:
    """Messages of a Human/Assistant transcript (roles user/assistant), contents stripped.

    Text before the first marker, if any, is a preamble and becomes a 'system' message.
    """
    markers = ((opts.human_marker, "user"), (opts.assistant_marker, "assistant"))
    messages: list[dict[str, str]] = []
    role, pos = "system", 0
    while True:
        hits = [(text.find(marker, pos), -len(marker), marker, r) for marker, r in markers]
        hits = [hit for hit in hits if hit[0] >= 0]
        end = min(hits)[0] if hits else len(text)
        content = text[pos:end].strip()
        if role != "system" or content:
            messages.append({"role": role, "content": content})
        if not hits:
            return messages
        start, _, marker, role = min(hits)  # the earliest marker; the longer one on a tie
        pos = start + len(marker)


def _split_transcript(text: str, field: str, where: _Location, opts: _Options) -> int:
    """Index just after the last assistant marker of ``text``, the prompt/completion boundary."""
    marker = opts.assistant_marker
    at = text.rfind(marker)
    if at < 0:
        raise where.error(field, text,
                          f"a Human/Assistant transcript with at least one {marker!r} turn "
                          "(or an explicit 'prompt' field)")
    cut = at + len(marker)
    completion = text[cut:]
    if not completion.strip():
        raise where.error(field, text, f"a non-empty final assistant turn after the last {marker!r}",
                          got=f"got {_snippet(text, at)} (nothing after the last marker)")
    if opts.human_marker in completion:
        raise where.error(field, text,
                          f"the transcript to end with an assistant turn, not a {opts.human_marker!r} one",
                          got=f"got {_snippet(text, cut + completion.index(opts.human_marker))}")
    return cut


def _validate_transcript_pair(row: Mapping[str, Any], where: _Location, opts: _Options) -> dict[str, Any]:
    chosen = _require_str(row, "chosen", where, non_empty=True)
    rejected = _require_str(row, "rejected", where, non_empty=True)
    cut = _split_transcript(chosen, "chosen", where, opts)
    rejected_cut = _split_transcript(rejected, "rejected", where, opts)
    marker = opts.assistant_marker
    prompt = chosen[:cut]
    if rejected[:rejected_cut] != prompt:
        at = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
        raise where.error(
            "rejected", rejected, f"both transcripts to share the text up to the last {marker!r} turn",
            got=f"got {_snippet(rejected, at)} at character {at}, where 'chosen' has {_snippet(chosen, at)}",
        )
    messages = _split_turns(prompt[: len(prompt) - len(marker)], opts)
    if not any(m["content"] for m in messages):
        raise where.error("chosen", chosen, f"some dialogue before the last {marker!r} turn")
    return _pair_row(prompt, messages, chosen[cut:], rejected[rejected_cut:], row)


def _validate_message_pair(
    row: Mapping[str, Any], prefix: list[dict[str, str]], where: _Location
) -> dict[str, Any]:
    """TRL conversational pair: ``prefix`` (the explicit prompt, possibly empty) + chosen/rejected."""
    sides = {}
    for field in ("chosen", "rejected"):
        messages = _validate_message_list(_require_field(row, field, where), field, where)
        _check_reply(messages, field, where)
        sides[field] = messages
    chosen, rejected = sides["chosen"], sides["rejected"]
    expected = "'chosen' and 'rejected' to share every message before their final assistant reply"
    if len(chosen) != len(rejected):
        raise where.error("rejected", rejected, expected,
                          got=f"got {len(rejected) - 1} message(s) before its reply where 'chosen' has "
                              f"{len(chosen) - 1}")
    for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])):
        if a != b:
            raise where.error(f"rejected[{i}]", b, expected,
                              got=f"got {abbreviate(b, 70)} where 'chosen[{i}]' is {abbreviate(a, 70)}")
    context = prefix + chosen[:-1]
    if not any(m["content"].strip() for m in context):
        raise where.error("chosen", chosen, "at least one message with some content before the assistant's reply")
    return _pair_row(render_messages_plain(context), context,
                     chosen[-1]["content"], rejected[-1]["content"], row)


def _validate_pair(row: Mapping[str, Any], where: _Location, opts: _Options) -> dict[str, Any]:
    if "prompt" not in row:
        if isinstance(row.get("chosen"), list):
            return _validate_message_pair(row, [], where)
        return _validate_transcript_pair(row, where, opts)
    prompt, prompt_messages = _read_prompt(row, where)
    if isinstance(row["prompt"], list):
        return _validate_message_pair(row, prompt_messages, where)
    chosen = _require_str(row, "chosen", where, non_empty=False)
    rejected = _require_str(row, "rejected", where, non_empty=False)
    return _pair_row(prompt, prompt_messages, chosen, rejected, row)


def _validate_comparison(row: Mapping[str, Any], where: _Location, opts: _Options) -> dict[str, Any]:
    if "completions" not in row and ("chosen" in row or "rejected" in row):
        return _validate_pair(row, where, opts)
    prompt, prompt_messages = _read_prompt(row, where)
    max_k = opts.max_k
    completions = _require_field(row, "completions", where)
    if not isinstance(completions, list):
        raise where.error("completions", completions, "a list of K completion strings")
    for i, completion in enumerate(completions):
        if not isinstance(completion, str):
            raise where.error(f"completions[{i}]", completion, "a string")
    k = len(completions)
    if k < 2:
        raise where.error("completions", completions, "at least 2 completions to compare (K >= 2)")
    if k > max_k:
        raise where.error("completions", f"{k} completions", f"at most max_k={max_k} completions")
    ranking = _require_field(row, "ranking", where)
    if not isinstance(ranking, list) or not all(_is_int(r) for r in ranking):
        raise where.error("ranking", ranking, f"a list of {k} ints (0 = best, equal = tie)")
    if len(ranking) != k:
        raise where.error("ranking", ranking, f"exactly K={k} ranks, one per completion")
    if any(r < 0 for r in ranking):
        raise where.error("ranking", ranking, "non-negative ranks (0 = best)")
    if len(set(ranking)) < 2:
        raise where.error("ranking", ranking, "at least two different ranks (all completions are tied)")
    first_of: dict[str, int] = {}
    for j, completion in enumerate(completions):
        i = first_of.setdefault(completion, j)
        if ranking[i] != ranking[j]:
            raise where.error("ranking", ranking,
                              f"equal ranks for identical completions (completions[{i}] and "
                              f"completions[{j}] are the same text)")
    canonical = {
        "prompt": prompt,
        "completions": list(completions),
        "ranking": list(ranking),
        **_extras(row, ["prompt", "completions", "ranking", "prompt_messages"]),
    }
    return _with_messages(canonical, prompt_messages)


def _check_not_reply(messages: list[dict[str, str]], field: str, where: _Location) -> None:
    # A prompt ending in the assistant's turn is usually a demonstration given as a prompt.
    if messages[-1]["role"] == "assistant":
        raise where.error(f"{field}[-1].role", "assistant",
                          "the conversation so far, ending before the assistant's reply "
                          "(drop the final assistant message, or use the 'demonstrations' format)")


def _validate_prompt(row: Mapping[str, Any], where: _Location, opts: _Options) -> dict[str, Any]:
    if "messages" in row and "prompt" not in row:
        messages = _validate_messages(row["messages"], "messages", where, ends_with_assistant=False)
        _check_not_reply(messages, "messages", where)
        return {"prompt": render_messages_plain(messages), "prompt_messages": messages,
                **_extras(row, ["messages", "prompt_messages"])}
    prompt, messages = _read_prompt(row, where)
    if isinstance(row["prompt"], list):
        _check_not_reply(messages, "prompt", where)
    return _with_messages({"prompt": prompt, **_extras(row, ["prompt", "prompt_messages"])}, messages)


_VALIDATORS = {
    "pretrain": _validate_pretrain,
    "demonstrations": _validate_demonstration,
    "comparisons": _validate_comparison,
    "prompts": _validate_prompt,
}


def check_format(fmt: str) -> None:
    """Raise ``ValueError`` unless ``fmt`` is one of :data:`FORMATS`."""
    if fmt not in _VALIDATORS:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {list(FORMATS)}")


def validate_row(
    row: Any,
    fmt: str,
    *,
    source: str = "<memory>",
    line: int | None = None,
    unit: str = "line",
    max_k: int = DEFAULT_MAX_K,
    assistant_marker: str = DEFAULT_ASSISTANT_MARKER,
    human_marker: str = DEFAULT_HUMAN_MARKER,
) -> dict[str, Any]:
    """Check one decoded row against ``fmt`` and return its canonical dict.

    ``assistant_marker``/``human_marker`` are the turn markers of implicit-prompt
    transcripts (``{"chosen": str, "rejected": str}`` comparisons); the prompt
    ends with the last ``assistant_marker``.

    Raises :class:`DataError` naming ``source``/``line`` on any problem.
    """
    check_format(fmt)
    opts = _Options(max_k, assistant_marker, human_marker)
    return _validate(row, fmt, _Location(source, line, unit), opts)


def _validate(row: Any, fmt: str, where: _Location, opts: _Options) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise where.error(None, row, f"a JSON object for format '{fmt}', not {type(row).__name__}")
    return _VALIDATORS[fmt](row, where, opts)


def validate_rows(
    rows: Iterable[Any],
    fmt: str,
    *,
    source: str = "<memory>",
    unit: str = "example",
    max_k: int = DEFAULT_MAX_K,
    assistant_marker: str = DEFAULT_ASSISTANT_MARKER,
    human_marker: str = DEFAULT_HUMAN_MARKER,
    field_map: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Validate in-memory rows (numbered from 1) and return canonical dicts.

    The markers are those of :func:`validate_row`. ``field_map`` (canonical field -> the row's
    field, dots for nested ones, e.g. ``{"prompt": "question"}``) renames fields first: a
    renamed top-level field is dropped, every other field stays as an extra, and a row without
    a mapped field is a :class:`DataError` naming it.
    """
    check_format(fmt)
    opts = _Options(max_k, assistant_marker, human_marker)
    canonical = []
    for i, row in enumerate(rows, start=1):
        where = _Location(source, i, unit)
        canonical.append(_validate(_apply_field_map(row, field_map, where), fmt, where, opts))
    if not canonical:
        raise DataError(source, None, None, [], f"at least one '{fmt}' row", show_value=False)
    return canonical


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' object hook: a dict, unless a key repeats (json would keep the last)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def _parse_line(text: str, source: str, line_number: int) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise DataError(source, line_number, None, text,
                        f"one JSON object per line ({e.msg} at column {e.colno})") from None
    except _DuplicateKey as e:
        raise DataError(source, line_number, e.key, None, "each key once",
                        got=f"got a second {e.key!r} in one object") from None
    except RecursionError:
        raise DataError(source, line_number, None, None,
                        f"JSON nested at most about {sys.getrecursionlimit()} levels deep "
                        "(Python's recursion limit)", show_value=False) from None


def read_jsonl(
    path: str | os.PathLike,
    fmt: str,
    *,
    max_k: int = DEFAULT_MAX_K,
    assistant_marker: str = DEFAULT_ASSISTANT_MARKER,
    human_marker: str = DEFAULT_HUMAN_MARKER,
    field_map: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Read and validate every row of a JSONL file of format ``fmt`` (a local path or a URL).

    ``assistant_marker``/``human_marker``: turn markers of implicit-prompt
    transcript comparisons (see :func:`validate_row`); ``field_map``: renames each row's
    fields first, as in :func:`validate_rows`.

    The file is read as bytes and decoded line by line so that invalid UTF-8
    is reported with its line number. Blank lines are skipped. A leading UTF-8
    byte-order mark is tolerated.

    Returns:
        Canonical row dicts (see the module docstring), in file order.
    Raises:
        DataError: on the first bad line (malformed JSON, not an object, missing
            field, wrong type, whitespace-only prompt, K < 2 or K > ``max_k``,
            ranking length != K, non-int ranks, all completions tied, identical
            completions ranked apart, a pair whose transcripts or messages
            disagree before the final reply, invalid UTF-8, a key twice in one
            object, nesting deeper than Python's recursion limit) or when the
            file holds no rows.
    """
    check_format(fmt)
    opts = _Options(max_k, assistant_marker, human_marker)
    source = os.fspath(path)
    raw = storage.read_bytes(source)
    if raw.startswith(_UTF8_BOM):
        raw = raw[len(_UTF8_BOM):]
    rows = []
    raw_lines = raw.split(b"\n")
    for line_number, raw_line in enumerate(raw_lines, start=1):
        try:
            text = raw_line.decode("utf-8")
        except UnicodeDecodeError as e:
            bad = raw_line[max(0, e.start - 10): e.end + 10]
            raise DataError(source, line_number, None, bad,
                            f"valid UTF-8 text (invalid byte at column {e.start + 1})") from None
        if not text.strip():
            continue
        where = _Location(source, line_number)
        row = _apply_field_map(_parse_line(text, source, line_number), field_map, where)
        rows.append(_validate(row, fmt, where, opts))
    if not rows:
        raise DataError(source, None, None, None,
                        f"at least one '{fmt}' row, but the file is empty "
                        f"({len(raw)} bytes, {len(raw_lines)} line(s), all blank)",
                        show_value=False)
    return rows


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write rows as UTF-8 JSONL (one object per line), atomically (``storage.write_text``).

    A crash never leaves a half-written file for the next stage to read; ``path`` may be a
    URL (``gs://...``).
    """
    storage.write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
