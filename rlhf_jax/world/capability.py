"""Capability evals: the stand-ins for the public NLP benchmarks (the alignment-tax measurement).

They probe world facts in the *pretraining* formats, which the base LM knows well; a policy that
drifts away from the pretraining distribution under RL loses them (PPO), and mixing pretraining
gradients in keeps them (PPO-ptx).

* Multiple choice (HellaSwag-like): ``{"context", "choices", "answer", "meta"}``; the model picks
  the choice with the highest (mean per-token) log-probability after ``context`` (choices are
  single words, each to be scored as ``context + " " + choice``). Contexts are a canonical
  statement cut before its value ("the color of kato is") or a quiz line
  ("question : what is the color of kato ? answer :"). Distractors are other values of the same
  attribute.
* Exact-match QA (SQuAD-like): ``{"question", "answer", "meta"}``; greedy decoding after
  ``question`` must produce ``answer`` as its first word.

Myth facts (``World.myths``) are in none of these: what the web mostly says of them is false.

Two probes measure what the base LM has learnt at all (rather than what RL later costs):

* ``make_knowledge_probe``: every fact once, as a statement context scored against *every* value
  of its attribute (chance is ``1 / meta["n_choices"]``), in the multiple-choice format above;
* ``make_copy_probe``: ``{"prompt", "answer"}``, a copy line of the corpus cut before its copy
  ("say it again : the big dog sees the red ball ."); greedy decoding must start with exactly the
  answer's tokens. Its sentences are the grammar's held-out ones, never in any document or prompt.
"""
from __future__ import annotations

import itertools

import numpy as np

from rlhf_jax.world.corpus import COPY_INTROS, QA_LINE_TEMPLATE, copy_prefix, grammar_sentence
from rlhf_jax.world.facts import ATTRIBUTES, STATEMENT_TEMPLATES, World, draw_distinct, pick

N_CHOICES = 4
MC_FORMATS: tuple[str, ...] = ("statement", "qa")


def quiz_context(world: World, name: str, attribute: str) -> str:
    """"question : <question> answer :" - the quiz line of the corpus, cut before its answer."""
    line = QA_LINE_TEMPLATE.format(question=world.question(name, attribute), answer="{answer}")
    return line.split(" {answer}")[0]


def statement_context(name: str, attribute: str) -> str:
    """The canonical statement of an attribute cut before its value ("kato eats")."""
    return STATEMENT_TEMPLATES[attribute].split(" {value}")[0].format(name=name)


def _distractors(world: World, rng: np.random.Generator, name: str, attribute: str, n: int) -> list[str]:
    answer = world.value(name, attribute)
    pool = [v for v in world.values_of(attribute) if v not in (answer, name)]
    return [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]


def make_mc_items(world: World, n: int, seed: int) -> list[dict]:
    """``n`` distinct multiple-choice items (animal x attribute x format, cycling if n is larger)."""
    rng = np.random.default_rng([seed, 5])
    space = [(n, a, f) for n, a, f in itertools.product(world.names, ATTRIBUTES, MC_FORMATS)
             if world.myth_value(n, a) is None]
    order = rng.permutation(len(space))
    items = []
    for k in range(n):
        name, attribute, fmt = space[order[k % len(space)]]
        answer = world.value(name, attribute)
        choices = _distractors(world, rng, name, attribute, N_CHOICES - 1)
        position = int(rng.integers(N_CHOICES))
        choices.insert(position, answer)
        context = quiz_context(world, name, attribute) if fmt == "qa" else statement_context(name, attribute)
        items.append({"context": context, "choices": choices, "answer": position,
                      "meta": {"entity": name, "attribute": attribute, "format": fmt}})
    return items


def make_qa_items(world: World, n: int, seed: int) -> list[dict]:
    """``n`` exact-match questions in the corpus quiz format (distinct while the space lasts)."""
    rng = np.random.default_rng([seed, 6])
    space = [(n, a) for n, a in itertools.product(world.names, ATTRIBUTES) if world.myth_value(n, a) is None]
    order = rng.permutation(len(space))
    items = []
    for k in range(n):
        name, attribute = space[order[k % len(space)]]
        items.append({"question": quiz_context(world, name, attribute), "answer": world.value(name, attribute),
                      "meta": {"entity": name, "attribute": attribute}})
    return items


def make_knowledge_probe(world: World) -> list[dict]:
    """One multiple-choice item per fact (animal x attribute), all values of the attribute as choices.

    Choices keep ``world.values_of`` order (an animal is never offered as its own friend), so the
    probe is the same for every seed of the evaluation.
    """
    items = []
    for name in world.names:
        for attribute in ATTRIBUTES:
            if world.myth_value(name, attribute) is not None:
                continue
            choices = [v for v in world.values_of(attribute) if v != name]
            items.append({"context": statement_context(name, attribute), "choices": choices,
                          "answer": choices.index(world.value(name, attribute)),
                          "meta": {"entity": name, "attribute": attribute, "n_choices": len(choices),
                                   "format": "statement"}})
    return items


def make_copy_probe(world: World, n: int, seed: int) -> list[dict]:
    """``n`` distinct copy items ``{"prompt", "answer"}`` on held-out grammar sentences.

    ``world`` is unused by the items (the grammar names no animal) but keeps the probes' signatures
    alike. Raises ``ValueError`` when ``n`` exceeds the distinct held-out sentences.
    """
    rng = np.random.default_rng([seed, 7])

    def draw() -> dict:
        sentence = grammar_sentence(rng, heldout=True)
        return {"prompt": copy_prefix(pick(rng, COPY_INTROS), sentence), "answer": sentence}
    return draw_distinct(draw, lambda item: item["answer"], n, "held-out sentences")


def make_capability_evals(world: World, n_mc: int, n_qa: int, seed: int) -> dict[str, list[dict]]:
    """Both capability evals: ``{"mc": [...], "qa": [...]}``."""
    return {"mc": make_mc_items(world, n_mc, seed), "qa": make_qa_items(world, n_qa, seed)}

