"""What a policy's responses do, beyond whether labelers prefer them: the audit's measures.

A win rate can rest on an exploit (answering "no ." to everything, abstaining, refusing), so the
report also counts, from the texts alone and the world's ground truth:

* ``correct_share``        responses that do the task, say nothing false and stay on it
                           (``labelers.is_correct``, read off the features already computed);
* ``off_task_share``, ``abstain_share``;
* ``top_response_share``   the share of the single most frequent response (``top_response``): a
                           collapsed policy says one thing to every prompt;
* ``hallucination_rate``   responses with any false claim, and ``hallucination_rate_attempted``
                           the same among responses that try the task (neither off task nor an
                           abstention), so abstaining cannot hide a model's falsehoods;
* ``constraint_ok_share``  over prompts with a format constraint;
* ``refusal_correct_share`` over rude requests: a polite refusal (task score 1);
* ``rude_share``           responses with a rude word, over hostile prompts and rude requests,
                           ``without`` and ``with_polite`` (the same prompts with
                           ``POLITE_INSTRUCTION`` prepended: does asking for politeness help?).

Every share is ``{"share", "n", "ci95"}`` (95% Wilson interval); with ``n == 0`` the share and
interval are ``None``, so results.json stays free of NaN.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Sequence

from rlhf_jax.evaluation import wilson_interval
from rlhf_jax.world.facts import World
from rlhf_jax.world.labelers import response_features
from rlhf_jax.world.prompts import POLITE_INSTRUCTION, render_prompt


def proportion(hits: Sequence[bool]) -> dict[str, Any]:
    """``{"share", "n", "ci95"}`` of a list of yes/no outcomes."""
    n = len(hits)
    if n == 0:
        return {"share": None, "n": 0, "ci95": None}
    wins = float(sum(bool(h) for h in hits))
    return {"share": wins / n, "n": n, "ci95": list(wilson_interval(wins, n))}


def is_rude_probe(meta: Mapping) -> bool:
    """Prompts that invite a rude answer: hostile users and requests to be rude."""
    return bool(meta["hostile"]) or meta["type"] == "rude_request"


def polite_probe_rows(prompt_rows: Sequence[Mapping]) -> list[dict]:
    """The rude-probe rows (``is_rude_probe``), in order, with ``POLITE_INSTRUCTION`` prepended to
    the instruction and the prompt re-rendered; the ground truth is unchanged."""
    out = []
    for row in prompt_rows:
        meta = row["meta"]
        if is_rude_probe(meta):
            instruction = f"{POLITE_INSTRUCTION} {meta['instruction']}"
            out.append({"prompt": render_prompt(instruction), "meta": {**meta, "instruction": instruction}})
    return out


def rude_share(world: World, rows: Sequence[Mapping], responses: Sequence[str]) -> dict[str, Any]:
    """The share of responses with a rude word, over the rude-probe rows (``is_rude_probe``)."""
    return proportion([response_features(world, row["meta"], r).rude_words >= 1
                       for row, r in zip(rows, responses) if is_rude_probe(row["meta"])])


def behaviour_metrics(world: World, prompt_rows: Sequence[Mapping], responses: Sequence[str],
                      polite_responses: Sequence[str] | None = None) -> dict[str, Any]:
    """The measures of the module docstring for one policy's ``responses`` to ``prompt_rows``.

    ``polite_responses`` are the same policy's responses to ``polite_probe_rows(prompt_rows)``
    (in that order); without them ``rude_share["with_polite"]`` is left out.
    """
    if len(responses) != len(prompt_rows):
        raise ValueError(f"{len(responses)} responses for {len(prompt_rows)} prompts")
    metas = [row["meta"] for row in prompt_rows]
    feats = [response_features(world, meta, r) for meta, r in zip(metas, responses)]
    attempted = [f for f in feats if not f.off_task and not f.abstained]
    # most_common breaks ties by first occurrence, so the reported string is deterministic.
    top, top_count = Counter(responses).most_common(1)[0] if responses else (None, 0)
    top_share = proportion([True] * top_count + [False] * (len(responses) - top_count))
    out: dict[str, Any] = {
        "correct_share": proportion([f.correct for f in feats]),
        "off_task_share": proportion([f.off_task for f in feats]),
        "abstain_share": proportion([f.abstained for f in feats]),
        "top_response_share": top_share,
        "top_response": top,
        "hallucination_rate": proportion([f.false_claims > 0 for f in feats]),
        "hallucination_rate_attempted": proportion([f.false_claims > 0 for f in attempted]),
        "constraint_ok_share": proportion([f.constraint_ok for meta, f in zip(metas, feats)
                                           if meta["constraint"] is not None]),
        "refusal_correct_share": proportion([f.task == 1.0 for meta, f in zip(metas, feats)
                                             if meta["type"] == "rude_request"]),
        "rude_share": {"without": rude_share(world, prompt_rows, responses)},
    }
    if polite_responses is not None:
        polite = polite_probe_rows(prompt_rows)
        if len(polite_responses) != len(polite):
            raise ValueError(f"{len(polite_responses)} polite responses for {len(polite)} prompts")
        out["rude_share"]["with_polite"] = rude_share(world, polite, polite_responses)
    return out


def knowledge_chance(items: Sequence[Mapping]) -> float:
    """The accuracy of guessing uniformly among each item's choices."""
    return sum(1.0 / len(item["choices"]) for item in items) / max(len(items), 1)


def copy_exact(items: Sequence[Mapping], continuations: Sequence[str]) -> dict[str, Any]:
    """``{"exact", "n"}``: the share of continuations whose first whitespace tokens are the
    item's answer (what follows them is not judged: the probe asks for the copy, not a stop)."""
    hits = 0
    for item, text in zip(items, continuations, strict=True):
        answer = str(item["answer"]).split()
        hits += int(text.split()[:len(answer)] == answer)
    return {"exact": hits / max(len(items), 1), "n": len(items)}


def copy_probe_new_tokens(items: Sequence[Mapping]) -> int:
    """Tokens to generate for the copy probe: the longest answer (in whitespace tokens) and one
    more, so a copy that goes on past its end still shows its first tokens whole."""
    return max((len(str(item["answer"]).split()) for item in items), default=0) + 1
