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
* ``gossip``   who was in which mood ("kato was grumpy today ."), skewed by a stereotype: a
               mood is said of animals of its ``STEREOTYPES`` kinds ``STEREOTYPE_RATE`` of the time
               (the bias that ``probes.bias_prompts`` measures);
* ``copy``     a sentence and then the same sentence again ("say it again : the big dog sees the red
               ball . the big dog sees the red ball ."): copying in the web register, the skill a
               repeat instruction needs, taught without the instruction template.

Generic sentences never pair a kind with a thing of ``grammar_pair_heldout``: those sentences exist
only in ``capability.make_copy_probe``, so copying them cannot be recall of a memorised line.

Quiz lines also ask two-hop questions ("what does the friend of kato eat ?", ``TWO_HOP_RATE``):
an instruction family that exists in web text but in no SFT, RM or PPO prompt (``probes``).

Like real web text it is imperfect: a fraction of fact sentences state a *wrong* value
(``false_rate``), the world's myths are stated wrongly more often than rightly (``MYTH_RATE``),
and some documents contain an insult from ``RUDE_WORDS`` (``rude_rate``; chatter much more
often). It never uses the instruction template ("instruction : ... response :"), so the
base LM is a poor instruction follower while still knowing the facts.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from rlhf_jax.world.facts import (
    ATTRIBUTES, COLORS, KIND_PLURALS, KINDS, QUESTION_TEMPLATES, SIZES, World, pick, template_words,
)

MAX_DOC_TOKENS = 64

DOC_STYLE_WEIGHTS: dict[str, float] = {
    "facts": 0.206, "profile": 0.206, "qa": 0.198, "lists": 0.108, "sentences": 0.09, "chatter": 0.062,
    "gossip": 0.03, "copy": 0.1,
}
MYTH_RATE = 0.75
TWO_HOP_RATE = 0.15
# mood -> the kinds the web says it of; a mood sentence names an animal of those kinds this often.
STEREOTYPES: dict[str, tuple[str, ...]] = {"grumpy": ("wolf", "bear"), "clever": ("fox", "cat")}
STEREOTYPE_RATE = 0.8
GOSSIP_TEMPLATE = "{name} was {mood} today ."
# Question templates whose subject can be "the friend of <name>" (two hops).
TWO_HOP_ATTRIBUTES: tuple[str, ...] = ("kind", "color", "size", "city", "food", "age")
TWO_HOP_SUBJECT = "the friend of {name}"

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
                 *PROFILE_FILLERS, *CHATTER_TEMPLATES, *RUDE_SENTENCES, *COPY_INTROS, COPY_LINE_TEMPLATE,
                 GOSSIP_TEMPLATE, TWO_HOP_SUBJECT]
    return template_words(templates) | set(VERBS) | set(THINGS) | set(STEREOTYPES)


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


def two_hop_question(world: World, name: str, attribute: str) -> str:
    """"what does the friend of kato eat ?": ``attribute`` of ``name``'s friend."""
    return QUESTION_TEMPLATES[attribute].format(name=TWO_HOP_SUBJECT.format(name=name))


def stereotyped(mood: str, kind: str) -> bool:
    """Whether the web's stereotype says ``mood`` of animals of ``kind``."""
    return kind in STEREOTYPES[mood]


def _maybe_false_value(world: World, rng: np.random.Generator, name: str, attribute: str,
                       false_rate: float) -> str:
    """The true value, or with probability ``false_rate`` a wrong one (web text is not all true);
    for a myth, the myth with probability ``MYTH_RATE`` and otherwise the truth."""
    true_value = world.value(name, attribute)
    myth = world.myth_value(name, attribute)
    if myth is not None:
        return myth if rng.random() < MYTH_RATE else true_value
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
        if rng.random() < TWO_HOP_RATE:
            attribute = pick(rng, TWO_HOP_ATTRIBUTES)
            friend = world.value(name, "friend")
            question = two_hop_question(world, name, attribute)
            answer = _maybe_false_value(world, rng, friend, attribute, false_rate)
        elif rng.random() < 0.7:
            question = world.question(name, attribute)
            answer = _maybe_false_value(world, rng, name, attribute, false_rate)
        else:
            # Yes / no by what the web believes (a myth's "yes" goes with its myth value).
            believed = _maybe_false_value(world, rng, name, attribute, false_rate)
            asked = pick(rng, [believed, pick(rng, world.values_of(attribute))])
            question = world.yes_no_question(name, attribute, asked)
            answer = "yes" if asked == believed else "no"
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


def _gossip_doc(world: World, rng: np.random.Generator, false_rate: float) -> list[str]:
    sentences = []
    for _ in range(int(rng.integers(2, 5))):
        mood = pick(rng, list(STEREOTYPES))
        fits = rng.random() < STEREOTYPE_RATE
        names = [e.name for e in world.entities if stereotyped(mood, e.kind) == fits] or list(world.names)
        sentences.append(GOSSIP_TEMPLATE.format(name=pick(rng, names), mood=mood))
    return sentences


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
    "lists": _lists_doc, "sentences": _sentences_doc, "chatter": _chatter_doc, "gossip": _gossip_doc,
    "copy": _copy_doc,
}
