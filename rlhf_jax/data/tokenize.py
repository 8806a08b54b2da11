"""Static-shape tokenization: canonical rows -> numpy arrays ready for jit.

Every array has a fixed shape so one compiled program serves every batch.

Prompt + response layout (demonstrations, comparisons), with
``T = max_prompt_len + max_response_len``::

    position:   0 ..................... P-1 | P ..................... T-1
    content:    <pad> <pad> prompt prompt   | resp resp resp <eos> <pad>
                (prompt LEFT-padded to P)   | (response RIGHT-padded to R)

* the prompt always ends at index ``P - 1`` and the response always starts at
  index ``P``, so generation (PPO) can append straight after the prompt block;
* ``attention_mask`` (int32) is 1 on real tokens, 0 on padding;
* ``position_ids`` (int32) = ``cumsum(attention_mask) - 1`` clipped at 0, so
  left padding does not shift the positions of real tokens;
* ``loss_mask`` (float32) is 1 on the tokens to be predicted -- response tokens
  including EOS, never prompt or padding. It is aligned with ``input_ids``:
  ``loss_mask[t]`` says "token t is a target"; the trainer shifts logits;
* every output has ``row_index`` [N] int32: the index of the source row, so
  per-row extras (e.g. a synthetic labeler's ``meta``) can be found again after
  overlong rows were dropped.

Prompt and response are tokenized separately and joined as token ids (never as
text), so the prompt/response boundary is exact for any tokenizer.

The response ends with EOS when it fits. A response longer than
``max_response_len`` keeps its first ``max_response_len`` tokens and gets *no*
EOS: teaching the policy to stop where the text was merely cut off would be
wrong. An overlong prompt keeps its END (the part closest to the response),
after the BOS token if one is added.

``overlong="drop"`` removes any row that would need truncating instead.
Rows that tokenize to an empty prompt are always dropped (they would give the
model nothing to condition on). Both are counted in :class:`TruncationStats`.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Sequence

import numpy as np

from rlhf_jax.errors import ConfigError

logger = logging.getLogger(__name__)

OVERLONG_CHOICES = ("truncate", "drop")
PRETRAIN_OVERLONG_CHOICES = ("truncate", "chunk", "drop")
INVALID_RANK = -1


@dataclasses.dataclass
class TruncationStats:
    """How many rows were tokenized, truncated and dropped."""

    n_total: int = 0
    n_truncated: int = 0
    n_dropped: int = 0
    kind: str = "rows"

    def __str__(self) -> str:
        def pct(n: int) -> str:
            return f"{100.0 * n / self.n_total:.1f}%" if self.n_total else "0.0%"

        return (
            f"{self.kind}: {self.n_total} total, {self.n_truncated} truncated ({pct(self.n_truncated)}), "
            f"{self.n_dropped} dropped ({pct(self.n_dropped)})"
        )

    def log(self, log: logging.Logger | None = None) -> None:
        """Log the summary at INFO (WARNING when anything was dropped)."""
        level = logging.WARNING if self.n_dropped else logging.INFO
        (log or logger).log(level, "%s", self)


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def positions_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """``cumsum(mask) - 1`` clipped at 0 along the last axis; int32, same shape."""
    return np.maximum(np.cumsum(attention_mask, axis=-1) - 1, 0).astype(np.int32)


def _check_overlong(overlong: str, choices: Sequence[str]) -> None:
    if overlong not in choices:
        raise ValueError(f"overlong={overlong!r} is not supported; expected one of {list(choices)}")


def _check_positive(**lengths: int) -> None:
    for name, value in lengths.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _pad_id(tokenizer: Any) -> int:
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer defines neither pad_token nor eos_token; set tokenizer.pad_token")
    return int(pad_id)


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer defines no eos_token; responses must end with EOS")
    return int(tokenizer.eos_token_id)


def _bos_id(tokenizer: Any, add_bos: bool) -> int | None:
    """The BOS id to prepend, or None when ``add_bos`` is off or the tokenizer has none."""
    if not add_bos or tokenizer.bos_token_id is None:
        return None
    return int(tokenizer.bos_token_id)


def _encode(texts: Sequence[str], tokenizer: Any) -> list[list[int]]:
    """Token ids of each text without special tokens (BOS/EOS are placed by hand)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def render_prompt(row: Mapping[str, Any], tokenizer: Any) -> str:
    """Prompt text of a canonical row of any format that has a prompt.

    Rows whose prompt came as messages or as a Human/Assistant transcript carry
    ``prompt_messages``; when the tokenizer has a chat template they are rendered
    with it (``add_generation_prompt=True``), otherwise the plain rendering stored
    in ``row["prompt"]`` is used. Every tokenize_* function that has a prompt
    (demonstrations, comparisons, prompts) goes through here, so a data set reads
    the same way in SFT, reward modelling and PPO.
    """
    messages = row.get("prompt_messages")
    if messages and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not isinstance(rendered, str):
            raise TypeError(
                f"apply_chat_template(tokenize=False) returned {type(rendered).__name__}, expected str"
            )
        return rendered
    return row["prompt"]


def _fit_prompt(ids: list[int], bos_id: int | None, max_prompt_len: int) -> tuple[list[int], bool]:
    """Prepend BOS (once) and keep the END of the prompt. Returns (ids, was_truncated)."""
    if bos_id is not None and (not ids or ids[0] != bos_id):
        ids = [bos_id] + ids
    if len(ids) <= max_prompt_len:
        return ids, False
    if bos_id is not None:
        # Keep BOS at the front: the model was trained to see it first.
        return [bos_id] + ids[len(ids) - (max_prompt_len - 1):], True
    return ids[len(ids) - max_prompt_len:], True


def _fit_response(ids: list[int], eos_id: int, max_response_len: int) -> tuple[list[int], bool]:
    """Append EOS when it fits, else keep the START without EOS. Returns (ids, was_truncated)."""
    if len(ids) + 1 <= max_response_len:
        return ids + [eos_id], False
    return ids[:max_response_len], True


def _has_prompt_tokens(prompt_ids: list[int], bos_id: int | None) -> bool:
    return len(prompt_ids) > (1 if bos_id is not None else 0)


def _place_prompt_response(
    prompt_ids: list[int],
    response_ids: list[int],
    max_prompt_len: int,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    response_mask: np.ndarray,
) -> None:
    """Write one example into preallocated [T] rows: prompt left-padded, response right-padded."""
    p, r = len(prompt_ids), len(response_ids)
    input_ids[max_prompt_len - p: max_prompt_len] = prompt_ids
    input_ids[max_prompt_len: max_prompt_len + r] = response_ids
    attention_mask[max_prompt_len - p: max_prompt_len + r] = 1
    response_mask[max_prompt_len: max_prompt_len + r] = 1.0


def _require_rows(n_kept: int, stats: TruncationStats, hint: str) -> None:
    # The lengths and ``overlong`` the caller chose emptied the data: theirs to change.
    if n_kept == 0:
        raise ConfigError(f"data: no {stats.kind} left after tokenization ({stats}); {hint}")


# ---------------------------------------------------------------------------
# Public tokenizers
# ---------------------------------------------------------------------------


def tokenize_demonstrations(
    rows: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_prompt_len: int,
    max_response_len: int,
    overlong: str = "truncate",
    *,
    add_bos: bool = False,
) -> tuple[dict[str, np.ndarray], TruncationStats]:
    """Tokenize canonical demonstration rows for SFT.

    Returns:
        arrays: ``input_ids`` [N, T] int32, ``attention_mask`` [N, T] int32,
            ``position_ids`` [N, T] int32, ``loss_mask`` [N, T] float32 (response
            tokens incl. EOS), ``row_index`` [N] int32; T = max_prompt_len + max_response_len.
        stats: rows seen / truncated / dropped.
    """
    _check_positive(max_prompt_len=max_prompt_len, max_response_len=max_response_len)
    _check_overlong(overlong, OVERLONG_CHOICES)
    pad_id, eos_id, bos_id = _pad_id(tokenizer), _eos_id(tokenizer), _bos_id(tokenizer, add_bos)
    prompts = _encode([render_prompt(row, tokenizer) for row in rows], tokenizer)
    responses = _encode([row["completion"] for row in rows], tokenizer)

    total_len = max_prompt_len + max_response_len
    stats = TruncationStats(n_total=len(rows), kind="demonstrations")
    input_ids = np.full((len(rows), total_len), pad_id, np.int32)
    attention_mask = np.zeros((len(rows), total_len), np.int32)
    loss_mask = np.zeros((len(rows), total_len), np.float32)
    kept: list[int] = []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        prompt, prompt_cut = _fit_prompt(prompt, bos_id, max_prompt_len)
        response, response_cut = _fit_response(response, eos_id, max_response_len)
        cut = prompt_cut or response_cut
        if not _has_prompt_tokens(prompt, bos_id) or (cut and overlong == "drop"):
            stats.n_dropped += 1
            continue
        stats.n_truncated += int(cut)
        slot = len(kept)
        _place_prompt_response(prompt, response, max_prompt_len,
                               input_ids[slot], attention_mask[slot], loss_mask[slot])
        kept.append(i)
    _require_rows(len(kept), stats, "raise max_prompt_len/max_response_len or use overlong='truncate'")
    n = len(kept)
    arrays = {
        "input_ids": input_ids[:n],
        "attention_mask": attention_mask[:n],
        "position_ids": positions_from_mask(attention_mask[:n]),
        "loss_mask": loss_mask[:n],
        "row_index": np.asarray(kept, np.int32),
    }
    return arrays, stats


def tokenize_pretrain(
    rows: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    seq_len: int,
    overlong: str = "chunk",
    *,
    add_bos: bool = False,
    pack: bool = False,
) -> tuple[dict[str, np.ndarray], TruncationStats]:
    """Tokenize pretraining text (the "ptx" mix of PPO-ptx) into fixed-length sequences.

    Each document becomes ``[BOS?] text <eos>`` so the model sees where
    documents end. Sequences are RIGHT-padded to ``seq_len``.

    ``overlong`` for documents longer than ``seq_len`` tokens:

    * ``"chunk"`` (default): split into consecutive, non-overlapping windows of
      ``seq_len`` tokens; every token is used once. A final window shorter
      than 2 tokens is discarded because it has no prediction target;
    * ``"truncate"``: keep the first ``seq_len`` tokens;
    * ``"drop"``: skip the document.

    ``pack=True`` (GPT-style packing; ``overlong`` is then moot) concatenates the
    documents in order into one stream and cuts it into consecutive rows of exactly
    ``seq_len`` tokens, so short documents no longer waste most of a row on padding.
    Only the last row is padded (dropped if it holds < 2 tokens); attention crosses
    document boundaries, and the ``<eos>`` between documents tells the model where
    one ends. ``row_index`` is then the document of the row's first token, and
    documents split across rows count as truncated.

    Returns:
        arrays: ``input_ids`` [M, seq_len] int32, ``attention_mask``, ``position_ids``
            [M, seq_len] int32, ``loss_mask`` [M, seq_len] float32 (1 on every real
            token after the first of its row), ``row_index`` [M] int32 (source
            document; M >= N kept documents when chunking).
        stats: documents seen / truncated-or-chunked (split when packing) / dropped.
    """
    _check_positive(seq_len=seq_len)
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 so each sequence has a prediction target, got {seq_len}")
    _check_overlong(overlong, PRETRAIN_OVERLONG_CHOICES)
    pad_id, eos_id, bos_id = _pad_id(tokenizer), _eos_id(tokenizer), _bos_id(tokenizer, add_bos)
    documents = _encode([row["text"] for row in rows], tokenizer)

    stats = TruncationStats(n_total=len(rows), kind="pretrain documents")
    if pack:
        return _pack_documents(documents, seq_len, pad_id, eos_id, bos_id, stats)
    sequences: list[list[int]] = []
    sources: list[int] = []
    for i, ids in enumerate(documents):
        ids = ([bos_id] if bos_id is not None else []) + ids + [eos_id]
        if len(ids) < 2:  # the text tokenized to nothing: no token would be a target
            stats.n_dropped += 1
            continue
        if len(ids) <= seq_len:
            windows = [ids]
        elif overlong == "drop":
            stats.n_dropped += 1
            continue
        elif overlong == "truncate":
            windows = [ids[:seq_len]]
        else:
            windows = [ids[start: start + seq_len] for start in range(0, len(ids), seq_len)]
            windows = [w for w in windows if len(w) >= 2]
        stats.n_truncated += int(len(ids) > seq_len)
        sequences.extend(windows)
        sources.extend([i] * len(windows))
    _require_rows(len(sequences), stats, "raise seq_len or use overlong='chunk'")

    input_ids = np.full((len(sequences), seq_len), pad_id, np.int32)
    attention_mask = np.zeros((len(sequences), seq_len), np.int32)
    for slot, ids in enumerate(sequences):
        input_ids[slot, : len(ids)] = ids
        attention_mask[slot, : len(ids)] = 1
    return _pretrain_arrays(input_ids, attention_mask, sources), stats


def _pretrain_arrays(input_ids: np.ndarray, attention_mask: np.ndarray,
                     sources: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    loss_mask = attention_mask.astype(np.float32)
    loss_mask[:, 0] = 0.0  # the first token has nothing before it (in its row) to predict it from
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": positions_from_mask(attention_mask),
        "loss_mask": loss_mask,
        "row_index": np.asarray(sources, np.int32),
    }


def _pack_documents(documents: list[list[int]], seq_len: int, pad_id: int, eos_id: int,
                    bos_id: int | None, stats: TruncationStats) -> tuple[dict[str, np.ndarray], TruncationStats]:
    """``tokenize_pretrain(pack=True)``: one stream of ``[BOS?] text <eos>`` cut every ``seq_len``."""
    prefix = [bos_id] if bos_id is not None else []
    pieces: list[list[int]] = []
    kept: list[int] = []
    for i, ids in enumerate(documents):
        ids = prefix + ids + [eos_id]
        if len(ids) < 2:  # same rule as unpacked: an empty text is not a document
            stats.n_dropped += 1
            continue
        pieces.append(ids)
        kept.append(i)
    _require_rows(len(pieces), stats, "the documents tokenized to nothing")
    lengths = np.asarray([len(ids) for ids in pieces], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    stream = np.fromiter((t for ids in pieces for t in ids), np.int32, count=int(lengths.sum()))
    n_rows = -(-len(stream) // seq_len)
    # A document is split when a row boundary (the end of a dropped tail included) falls inside it.
    boundaries = np.arange(1, n_rows, dtype=np.int64) * seq_len
    at = np.searchsorted(starts, boundaries, side="right") - 1
    stats.n_truncated = int(len(np.unique(at[boundaries > starts[at]])))
    if len(stream) - (n_rows - 1) * seq_len < 2:  # a 1-token tail has no prediction target
        n_rows -= 1  # never to 0: every document holds >= 2 tokens
        stream = stream[: n_rows * seq_len]
    input_ids = np.full(n_rows * seq_len, pad_id, np.int32)
    attention_mask = np.zeros(n_rows * seq_len, np.int32)
    input_ids[: len(stream)] = stream
    attention_mask[: len(stream)] = 1
    row_starts = np.arange(n_rows, dtype=np.int64) * seq_len
    sources = np.asarray(kept, np.int64)[np.searchsorted(starts, row_starts, side="right") - 1]
    return _pretrain_arrays(input_ids.reshape(n_rows, seq_len), attention_mask.reshape(n_rows, seq_len),
                            sources), stats


def tokenize_comparisons(
    rows: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_prompt_len: int,
    max_response_len: int,
    max_k: int,
    overlong: str = "truncate",
    *,
    add_bos: bool = False,
) -> tuple[dict[str, np.ndarray], TruncationStats]:
    """Tokenize K-way comparisons for the reward model, padded to ``max_k`` completions.

    Each completion is laid out like a demonstration (prompt left-padded, response
    right-padded) and shares the comparison's prompt. ``overlong="drop"`` drops the
    whole comparison if its prompt or any completion is too long.

    Padding completions (index >= K) have ``valid=False`` and ``ranks=-1``. Their
    tokens are a copy of completion 0 rather than all padding: a fully masked
    sequence makes masked softmax attention produce NaN, whose gradient would
    poison the batch even when the loss masks it out. Losses must use ``valid``.

    Returns:
        arrays: ``input_ids``, ``attention_mask``, ``position_ids`` [N, max_k, T] int32,
            ``response_mask`` [N, max_k, T] float32 (response tokens incl. EOS),
            ``ranks`` [N, max_k] int32 (0 = best, equal = tie, -1 = padding),
            ``valid`` [N, max_k] bool, ``row_index`` [N] int32.
        stats: comparisons seen / truncated / dropped.
    """
    _check_positive(max_prompt_len=max_prompt_len, max_response_len=max_response_len, max_k=max_k)
    _check_overlong(overlong, OVERLONG_CHOICES)
    if max_k < 2:
        raise ValueError(f"max_k must be >= 2 to compare completions, got {max_k}")
    for i, row in enumerate(rows):
        if len(row["completions"]) > max_k:
            raise ValueError(
                f"comparison row {i} has K={len(row['completions'])} completions but max_k={max_k}; "
                "raise max_k (and the max_k given to read_jsonl) to cover the data"
            )
    pad_id, eos_id, bos_id = _pad_id(tokenizer), _eos_id(tokenizer), _bos_id(tokenizer, add_bos)
    prompts = _encode([render_prompt(row, tokenizer) for row in rows], tokenizer)
    flat_completions = [c for row in rows for c in row["completions"]]
    flat_responses = _encode(flat_completions, tokenizer)

    n_rows = len(rows)
    total_len = max_prompt_len + max_response_len
    stats = TruncationStats(n_total=n_rows, kind="comparisons")
    input_ids = np.full((n_rows, max_k, total_len), pad_id, np.int32)
    attention_mask = np.zeros((n_rows, max_k, total_len), np.int32)
    response_mask = np.zeros((n_rows, max_k, total_len), np.float32)
    ranks = np.full((n_rows, max_k), INVALID_RANK, np.int32)
    valid = np.zeros((n_rows, max_k), bool)
    kept: list[int] = []
    offset = 0
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        k = len(row["completions"])
        responses = flat_responses[offset: offset + k]
        offset += k
        prompt, cut = _fit_prompt(prompt, bos_id, max_prompt_len)
        fitted = []
        for response in responses:
            response, response_cut = _fit_response(response, eos_id, max_response_len)
            fitted.append(response)
            cut = cut or response_cut
        if not _has_prompt_tokens(prompt, bos_id) or (cut and overlong == "drop"):
            stats.n_dropped += 1
            continue
        stats.n_truncated += int(cut)
        slot = len(kept)
        for j, response in enumerate(fitted):
            _place_prompt_response(prompt, response, max_prompt_len,
                                   input_ids[slot, j], attention_mask[slot, j], response_mask[slot, j])
        input_ids[slot, k:] = input_ids[slot, 0]
        attention_mask[slot, k:] = attention_mask[slot, 0]
        response_mask[slot, k:] = response_mask[slot, 0]
        ranks[slot, :k] = row["ranking"]
        valid[slot, :k] = True
        kept.append(i)
    _require_rows(len(kept), stats, "raise max_prompt_len/max_response_len or use overlong='truncate'")
    n = len(kept)
    arrays = {
        "input_ids": input_ids[:n],
        "attention_mask": attention_mask[:n],
        "position_ids": positions_from_mask(attention_mask[:n]),
        "response_mask": response_mask[:n],
        "ranks": ranks[:n],
        "valid": valid[:n],
        "row_index": np.asarray(kept, np.int32),
    }
    return arrays, stats


def comparisons_to_pairs(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Expand K-way comparisons into K=2 rows, one per strictly ordered pair.

    A comparison with K completions yields up to K*(K-1)/2 pairs (ties yield
    none). Each pair lists the better completion first (``ranking == [0, 1]``),
    keeps the row's extra fields, and records ``source_row`` (index into
    ``rows``) so that pairs from one comparison can be kept together or apart.
    This is the "shuffled pairs" baseline InstructGPT compares K-way training to.
    """
    pairs = []
    for source_row, row in enumerate(rows):
        extras = {k: v for k, v in row.items() if k not in ("completions", "ranking")}
        completions, ranking = row["completions"], row["ranking"]
        for a in range(len(completions)):
            for b in range(a + 1, len(completions)):
                if ranking[a] == ranking[b]:
                    continue
                better, worse = (a, b) if ranking[a] < ranking[b] else (b, a)
                pairs.append({
                    **extras,
                    "completions": [completions[better], completions[worse]],
                    "ranking": [0, 1],
                    "source_row": source_row,
                })
    return pairs


def tokenize_prompts(
    rows: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_prompt_len: int,
    overlong: str = "truncate",
    *,
    add_bos: bool = False,
) -> tuple[dict[str, np.ndarray], TruncationStats]:
    """Tokenize PPO prompts, LEFT-padded so generation appends at index ``max_prompt_len``.

    Returns:
        arrays: ``input_ids``, ``attention_mask``, ``position_ids`` [N, max_prompt_len]
            int32 and ``row_index`` [N] int32.
        stats: prompts seen / truncated / dropped.
    """
    _check_positive(max_prompt_len=max_prompt_len)
    _check_overlong(overlong, OVERLONG_CHOICES)
    pad_id, bos_id = _pad_id(tokenizer), _bos_id(tokenizer, add_bos)
    prompts = _encode([render_prompt(row, tokenizer) for row in rows], tokenizer)

    stats = TruncationStats(n_total=len(rows), kind="prompts")
    input_ids = np.full((len(rows), max_prompt_len), pad_id, np.int32)
    attention_mask = np.zeros((len(rows), max_prompt_len), np.int32)
    kept: list[int] = []
    for i, prompt in enumerate(prompts):
        prompt, cut = _fit_prompt(prompt, bos_id, max_prompt_len)
        if not _has_prompt_tokens(prompt, bos_id) or (cut and overlong == "drop"):
            stats.n_dropped += 1
            continue
        stats.n_truncated += int(cut)
        slot = len(kept)
        input_ids[slot, max_prompt_len - len(prompt):] = prompt
        attention_mask[slot, max_prompt_len - len(prompt):] = 1
        kept.append(i)
    _require_rows(len(kept), stats, "raise max_prompt_len or use overlong='truncate'")
    n = len(kept)
    arrays = {
        "input_ids": input_ids[:n],
        "attention_mask": attention_mask[:n],
        "position_ids": positions_from_mask(attention_mask[:n]),
        "row_index": np.asarray(kept, np.int32),
    }
    return arrays, stats
