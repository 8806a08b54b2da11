"""The pretraining corpus: the world's "web text".

Documents are at most ``MAX_DOC_TOKENS`` whitespace tokens and come in seven styles, each a few
sentences long:

* ``facts``    canonical statements about random animals ("the color of kato is red .");
* ``profile``  a short story about one animal (all its facts in random order, plus filler);
* ``qa``       quiz lines ("question : what does kato eat ? answer : fish .") - the format the
               capability evals probe;
* ``lists``    inverse lookups ("animals that eat fish : kato , miru .");
* ``sentences`` generic sentences from a tiny grammar ("the big dog sees the red ball .");
* ``chatter``  forum talk about animals;
* ``copy``     a sentence and then the same sentence again ("say it again : the big dog sees the red
               ball . the big dog sees the red ball ."): copying in the web register, the skill a
               repeat instruction needs, taught without the instruction template.

Generic sentences never pair a kind with a thing of ``grammar_pair_heldout``: those sentences exist
only in ``capability.make_copy_probe``, so copying them cannot be recall of a memorised line.

Like real web text it is imperfect: a fraction of fact sentences state a *wrong* value
(``false_rate``) and some documents contain an insult from ``RUDE_WORDS`` (``rude_rate``; chatter
much more often). It never uses the instruction template ("instruction : ... response :"), so the
base LM is a poor instruction follower while still knowing the facts.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from rlhf_jax.world.facts import (
    ATTRIBUTES, COLORS, KIND_PLURALS, KINDS, SIZES, World, pick, template_words,
)

MAX_DOC_TOKENS = 64

DOC_STYLE_WEIGHTS: dict[str, float] = {
    "facts": 0.216, "profile": 0.216, "qa": 0.198, "lists": 0.108, "sentences": 0.09, "chatter": 0.072,
    "copy": 0.1,
}

# The generic grammar: "the <size> <kind> <verb> the <color> <thing> ." (also used by repeat prompts).
VERBS: tuple[str, ...] = ("sees", "likes", "finds", "chases", "has", "wants")
THINGS: tuple[str, ...] = ("ball", "hat", "box", "cup", "tree", "house", "boat", "book", "stone", "kite")
GRAMMAR_TEMPLATE = "the {size} {kind} {verb} the {color} {thing} ."
# The (kind, thing) pairs whose index sum is a multiple of HELDOUT_MODULUS (a quarter of them) are
# kept out of the corpus and the prompts (see above).
HELDOUT_MODULUS = 4

QA_LINE_TEMPLATE = "question : {question} answer : {answer} ."
LIST_LINE_TEMPLATES: dict[str, str] = {
    "kind": "animals that are {value} : {items} .",   # value is the plural kind ("foxes")
    "color": "animals that are {value} : {items} .",
    "size": "animals that are {value} : {items} .",
    "city": "animals that live in {value} : {items} .",
    "food": "animals that eat {value} : {items} .",
}
PROFILE_FILLERS: tuple[str, ...] = (
    "{name} is happy .", "{name} likes to sleep .", "{name} likes to play .",
    "one day {name} went for a walk .", "{name} has many friends .", "everyone knows {name} .",
)
CHATTER_TEMPLATES: tuple[str, ...] = (
    "i like {name} .", "i saw {name} today .", "{name} is so nice .", "have you met {name} ?",
    "we talked about {name} .", "{name} is my favorite animal .", "i think {name} is happy .",
)
# A copy line is "<intro> <sentence> <sentence>"; the intro is never an instruction.
COPY_INTROS: tuple[str, ...] = ("say it again :", "once more :", "word for word :")
COPY_LINE_TEMPLATE = "{intro} {sentence} {sentence}"
RUDE_SENTENCES: tuple[str, ...] = (
    "you are a stupid idiot .", "{name} is an ugly fool .", "shut up , you dumb jerk .",
    "i hate {name} .", "{name} is a useless loser .", "this is trash .",
)


def corpus_words() -> set[str]:
    """Every fixed word a corpus document can contain (besides ``facts.fact_words``)."""
    templates = [GRAMMAR_TEMPLATE, QA_LINE_TEMPLATE, *LIST_LINE_TEMPLATES.values(),
                 *PROFILE_FILLERS, *CHATTER_TEMPLATES, *RUDE_SENTENCES, *COPY_INTROS, COPY_LINE_TEMPLATE]
    return template_words(templates) | set(VERBS) | set(THINGS)


def grammar_pair_heldout(kind: str, thing: str) -> bool:
    """Whether "the ... <kind> ... <thing> ." is reserved for the copy probe."""
    return (KINDS.index(kind) + THINGS.index(thing)) % HELDOUT_MODULUS == 0


def grammar_sentence(rng: np.random.Generator, heldout: bool = False) -> str:
    """A random sentence of the generic grammar (not a claim about any named animal).

    ``heldout=True`` draws from the sentences that no document or prompt ever contains.
    """
    size, kind, verb, color = pick(rng, SIZES), pick(rng, KINDS), pick(rng, VERBS), pick(rng, COLORS)
    thing = pick(rng, _THINGS_OF[kind, heldout])
    return GRAMMAR_TEMPLATE.format(size=size, kind=kind, verb=verb, color=color, thing=thing)


_THINGS_OF: dict[tuple[str, bool], tuple[str, ...]] = {
    (kind, heldout): tuple(t for t in THINGS if grammar_pair_heldout(kind, t) == heldout)
    for kind in KINDS for heldout in (False, True)}


def copy_prefix(intro: str, sentence: str) -> str:
    """A copy line cut right before the copy ("say it again : the big dog sees the red ball .")."""
    return COPY_LINE_TEMPLATE.format(intro=intro, sentence=sentence)[: -len(sentence) - 1]


def list_line(world: World, attribute: str, value: str) -> str:
    """"animals that eat fish : kato , miru ." - the members of one attribute value."""
    shown = KIND_PLURALS[value] if attribute == "kind" else value
    items = " , ".join(world.members(attribute, value))
    return LIST_LINE_TEMPLATES[attribute].format(value=shown, items=items)


def pretraining_corpus(world: World, n_docs: int, seed: int, false_rate: float = 0.05,
                       rude_rate: float = 0.08) -> list[str]:
    """``n_docs`` documents of web text about ``world`` (see the module docstring)."""
    return [doc["text"] for doc in pretraining_documents(world, n_docs, seed, false_rate, rude_rate)]


def pretraining_documents(world: World, n_docs: int, seed: int, false_rate: float = 0.05,
                          rude_rate: float = 0.08) -> list[dict]:
    """Like ``pretraining_corpus`` but each document as ``{"text", "style"}``."""
    rng = np.random.default_rng([seed, 1])
    styles = list(DOC_STYLE_WEIGHTS)
    probs = np.array([DOC_STYLE_WEIGHTS[s] for s in styles])
    docs = []
    for _ in range(n_docs):
        style = styles[int(rng.choice(len(styles), p=probs / probs.sum()))]
        sentences = _STYLE_WRITERS[style](world, rng, false_rate)
        # Chatter is where the web is rudest; elsewhere insults are rare.
        if rng.random() < (4 * rude_rate if style == "chatter" else rude_rate):
            rude = pick(rng, RUDE_SENTENCES).format(name=pick(rng, world.names))
            sentences.insert(int(rng.integers(len(sentences) + 1)), rude)
        docs.append({"text": _fit(sentences), "style": style})
    return docs


def _fit(sentences: list[str]) -> str:
    """Join sentences, dropping the ones that would overflow ``MAX_DOC_TOKENS``."""
    kept, length = [], 0
    for sentence in sentences:
        n = len(sentence.split())
        if length + n <= MAX_DOC_TOKENS:
            kept.append(sentence)
            length += n
    return " ".join(kept)


def _maybe_false_value(world: World, rng: np.random.Generator, name: str, attribute: str,
                       false_rate: float) -> str:
    """The true value, or with probability ``false_rate`` a wrong one (web text is not all true)."""
    true_value = world.value(name, attribute)
    if rng.random() >= false_rate:
        return true_value
    wrong = [v for v in world.values_of(attribute) if v not in (true_value, name)]
    return pick(rng, wrong)


def _facts_doc(world: World, rng: np.random.Generator, false_rate: float) -> list[str]:
    sentences = []
    for _ in range(int(rng.integers(4, 9))):
        name, attribute = pick(rng, world.names), pick(rng, ATTRIBUTES)
        sentences.append(world.statement(name, attribute,
                                         _maybe_false_value(world, rng, name, attribute, false_rate)))
    return sentences


def _profile_doc(world: World, rng: np.random.Generator, false_rate: float) -> list[str]:
    name = pick(rng, world.names)
    entity = world.entity(name)
    size, color, kind = (_maybe_false_value(world, rng, name, a, false_rate) for a in ("size", "color", "kind"))
    sentences = [f"{name} is a {size} {color} {kind} ."]
    others = [a for a in ATTRIBUTES if a not in ("size", "color", "kind")]
    for attribute in rng.permutation(others):
        if rng.random() < 0.8:
            sentences.append(world.statement(name, str(attribute),
                                             _maybe_false_value(world, rng, name, str(attribute), false_rate)))
    for filler in rng.choice(PROFILE_FILLERS, size=int(rng.integers(0, 3)), replace=False):
        sentences.insert(1 + int(rng.integers(len(sentences))), str(filler).format(name=entity.name))
    return sentences


def _qa_doc(world: World, rng: np.random.Generator, false_rate: float) -> list[str]:
    lines = []
    for _ in range(int(rng.integers(3, 6))):
        name, attribute = pick(rng, world.names), pick(rng, ATTRIBUTES)
        if rng.random() < 0.7:
            question = world.question(name, attribute)
            answer = _maybe_false_value(world, rng, name, attribute, false_rate)
        else:
            asked = pick(rng, [world.value(name, attribute), pick(rng, world.values_of(attribute))])
            question = world.yes_no_question(name, attribute, asked)
            answer = "yes" if world.is_true(name, attribute, asked) else "no"
        lines.append(QA_LINE_TEMPLATE.format(question=question, answer=answer))
    return lines


def _lists_doc(world: World, rng: np.random.Generator, false_rate: float) -> list[str]:
    lines = []
    for _ in range(int(rng.integers(2, 5))):
        attribute = pick(rng, list(LIST_LINE_TEMPLATES))
        value = pick(rng, world.values_of(attribute))
        if world.members(attribute, value):
            lines.append(list_line(world, attribute, value))
    return lines or [list_line(world, "kind", world.entities[0].kind)]


def _sentences_doc(world: World, rng: np.random.Generator, false_rate: float) -> list[str]:
    return [grammar_sentence(rng) for _ in range(int(rng.integers(3, 8)))]


def _copy_doc(world: World, rng: np.random.Generator, false_rate: float) -> list[str]:
    lines = []
    for _ in range(int(rng.integers(2, 4))):
        if rng.random() < 0.6:
            sentence = grammar_sentence(rng)
        else:
            name, attribute = pick(rng, world.names), pick(rng, ATTRIBUTES)
            sentence = world.statement(name, attribute, _maybe_false_value(world, rng, name, attribute, false_rate))
        lines.append(COPY_LINE_TEMPLATE.format(intro=pick(rng, COPY_INTROS), sentence=sentence))
    return lines


def _chatter_doc(world: World, rng: np.random.Generator, false_rate: float) -> list[str]:
    sentences = []
    for _ in range(int(rng.integers(3, 6))):
        name = pick(rng, world.names)
        if rng.random() < 0.3:
            attribute = pick(rng, ATTRIBUTES)
            sentences.append(world.statement(name, attribute,
                                             _maybe_false_value(world, rng, name, attribute, false_rate)))
        else:
            sentences.append(pick(rng, CHATTER_TEMPLATES).format(name=name))
    return sentences


_STYLE_WRITERS: dict[str, Callable[[World, np.random.Generator, float], list[str]]] = {
    "facts": _facts_doc, "profile": _profile_doc, "qa": _qa_doc,
    "lists": _lists_doc, "sentences": _sentences_doc, "chatter": _chatter_doc, "copy": _copy_doc,
}
