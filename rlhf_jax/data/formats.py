"""JSONL formats for every stage, validated up front.

Each line of a JSONL file is one JSON object. Four formats exist:

* ``pretrain``:       ``{"text": str}``
* ``demonstrations``: ``{"prompt": str, "completion": str}`` or
  ``{"messages": [{"role": str, "content": str}, ...]}`` whose final message is
  the assistant's completion.
* ``comparisons``:    ``{"prompt": str, "completions": [K str], "ranking": [K int]}``
  (rank 0 is best, equal ranks are ties), or a TRL pair
  ``{"prompt": str, "chosen": str, "rejected": str}`` read as K=2, ranking [0, 1].
* ``prompts``:        ``{"prompt": str}``

Fields not listed above (for instance a ``"meta"`` dict consumed by a synthetic
labeler) are kept untouched on the canonical row.

Every row is checked before any training starts, so a bad line fails in
seconds with its file and line number instead of hours later on a TPU pod.

Canonical rows (what :func:`read_jsonl` returns):

* pretrain:       ``{"text", ...extras}``
* demonstrations: ``{"prompt", "completion", ...extras}``; a ``messages`` row also
  gets ``"prompt_messages"`` (every message before the final assistant one). Its
  ``"prompt"`` is the plain-text rendering of those messages (see
  :func:`render_messages_plain`), used whenever the tokenizer has no chat template.
* comparisons:    ``{"prompt", "completions", "ranking", ...extras}``
* prompts:        ``{"prompt", ...extras}``
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Iterable, Mapping

FORMATS: tuple[str, ...] = ("pretrain", "demonstrations", "comparisons", "prompts")
DEFAULT_MAX_K = 9
_VALUE_PREVIEW_CHARS = 80
_UTF8_BOM = b"\xef\xbb\xbf"


def abbreviate(value: Any, limit: int = _VALUE_PREVIEW_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters so huge rows stay readable in errors."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return text[: limit - 3] + "..."


class DataError(ValueError):
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


def render_messages_plain(messages: list[dict[str, str]]) -> str:
    """Plain-text prompt for tokenizers without a chat template.

    Each message becomes ``"<Role>: <content>"`` (role capitalized), lines are
    joined with ``"\\n"`` and a final ``"\\nAssistant:"`` cues the reply, e.g.
    ``[{"role": "user", "content": "hi"}]`` -> ``"User: hi\\nAssistant:"``.
    """
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    lines.append("Assistant:")
    return "\n".join(lines)


def _validate_messages(
    messages: Any, field: str, where: _Location, *, ends_with_assistant: bool
) -> list[dict[str, str]]:
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
    if ends_with_assistant:
        if cleaned[-1]["role"] != "assistant":
            raise where.error(
                f"{field}[-1].role", cleaned[-1]["role"],
                "the final message to be the assistant's completion (role 'assistant')",
            )
        if not cleaned[-1]["content"].strip():
            raise where.error(f"{field}[-1].content", cleaned[-1]["content"],
                              "a non-empty assistant completion")
        if len(cleaned) < 2:
            raise where.error(field, messages, "at least one message before the assistant's completion")
    context = cleaned[:-1] if ends_with_assistant else cleaned
    if not any(m["content"].strip() for m in context):
        raise where.error(field, messages, "a prompt with some non-whitespace content")
    return cleaned


def _validate_pretrain(row: Mapping[str, Any], where: _Location, max_k: int) -> dict[str, Any]:
    text = _require_str(row, "text", where, non_empty=True)
    return {"text": text, **_extras(row, ["text"])}


def _validate_demonstration(row: Mapping[str, Any], where: _Location, max_k: int) -> dict[str, Any]:
    if "messages" in row and "prompt" not in row:
        messages = _validate_messages(row["messages"], "messages", where, ends_with_assistant=True)
        context = messages[:-1]
        return {
            "prompt": render_messages_plain(context),
            "completion": messages[-1]["content"],
            "prompt_messages": context,
            **_extras(row, ["messages"]),
        }
    prompt = _require_str(row, "prompt", where, non_empty=True)
    completion = _require_str(row, "completion", where, non_empty=True)
    canonical = {"prompt": prompt, "completion": completion, **_extras(row, ["prompt", "completion"])}
    if "prompt_messages" in row:  # a canonical row written back by write_jsonl
        canonical["prompt_messages"] = _validate_messages(
            row["prompt_messages"], "prompt_messages", where, ends_with_assistant=False
        )
    return canonical


def _is_int(value: Any) -> bool:
    # bool is a subclass of int in Python; a ranking of True/False is a bug.
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_comparison(row: Mapping[str, Any], where: _Location, max_k: int) -> dict[str, Any]:
    prompt = _require_str(row, "prompt", where, non_empty=True)
    if "completions" not in row and ("chosen" in row or "rejected" in row):
        chosen = _require_str(row, "chosen", where, non_empty=False)
        rejected = _require_str(row, "rejected", where, non_empty=False)
        return {
            "prompt": prompt,
            "completions": [chosen, rejected],
            "ranking": [0, 1],
            **_extras(row, ["prompt", "chosen", "rejected"]),
        }
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
    return {
        "prompt": prompt,
        "completions": list(completions),
        "ranking": list(ranking),
        **_extras(row, ["prompt", "completions", "ranking"]),
    }


def _validate_prompt(row: Mapping[str, Any], where: _Location, max_k: int) -> dict[str, Any]:
    prompt = _require_str(row, "prompt", where, non_empty=True)
    canonical = {"prompt": prompt, **_extras(row, ["prompt"])}
    if "prompt_messages" in row:
        canonical["prompt_messages"] = _validate_messages(
            row["prompt_messages"], "prompt_messages", where, ends_with_assistant=False
        )
    return canonical


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
) -> dict[str, Any]:
    """Check one decoded row against ``fmt`` and return its canonical dict.

    Raises :class:`DataError` naming ``source``/``line`` on any problem.
    """
    check_format(fmt)
    where = _Location(source, line, unit)
    if not isinstance(row, dict):
        raise where.error(None, row, f"a JSON object for format '{fmt}', not {type(row).__name__}")
    return _VALIDATORS[fmt](row, where, max_k)


def validate_rows(
    rows: Iterable[Any],
    fmt: str,
    *,
    source: str = "<memory>",
    unit: str = "example",
    max_k: int = DEFAULT_MAX_K,
) -> list[dict[str, Any]]:
    """Validate in-memory rows (numbered from 1) and return canonical dicts."""
    canonical = [
        validate_row(row, fmt, source=source, line=i, unit=unit, max_k=max_k)
        for i, row in enumerate(rows, start=1)
    ]
    if not canonical:
        raise DataError(source, None, None, [], f"at least one '{fmt}' row", show_value=False)
    return canonical


def read_jsonl(path: str | os.PathLike, fmt: str, *, max_k: int = DEFAULT_MAX_K) -> list[dict[str, Any]]:
    """Read and validate every row of a JSONL file of format ``fmt``.

    The file is read as bytes and decoded line by line so that invalid UTF-8
    is reported with its line number. Blank lines are skipped. A leading UTF-8
    byte-order mark is tolerated.

    Returns:
        Canonical row dicts (see the module docstring), in file order.
    Raises:
        DataError: on the first bad line (malformed JSON, not an object, missing
            field, wrong type, whitespace-only prompt, K < 2 or K > ``max_k``,
            ranking length != K, non-int ranks, all completions tied, invalid
            UTF-8) or when the file holds no rows.
    """
    check_format(fmt)
    source = os.fspath(path)
    with open(source, "rb") as f:
        raw = f.read()
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
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(source, line_number, None, text,
                            f"one JSON object per line ({e.msg} at column {e.colno})") from None
        rows.append(validate_row(obj, fmt, source=source, line=line_number, max_k=max_k))
    if not rows:
        raise DataError(source, None, None, None,
                        f"at least one '{fmt}' row, but the file is empty "
                        f"({len(raw)} bytes, {len(raw_lines)} line(s), all blank)",
                        show_value=False)
    return rows


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write rows as UTF-8 JSONL (one object per line), atomically.

    The file is written to a temporary sibling and renamed into place so a
    crash never leaves a half-written file for the next stage to read.
    """
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False))
                f.write("\n")
        os.replace(tmp_path, target)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
