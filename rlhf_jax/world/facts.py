"""The facts of the labeler world: named animals with attributes, generated from a seed.

The world stands in for "what the internet knows". It is deliberately small and regular so that a
tiny word-level transformer can memorise it from a few thousand short documents:

* ``n_entities`` animals, each named by a two-syllable made-up word (``kato``, ``miru``), with seven
  attributes: ``kind`` (fox, dog, ...), ``color``, ``size``, home ``city`` (a three-syllable made-up
  word), ``food``, ``age`` (a number word) and ``friend`` (another animal's name).
* Every attribute has one canonical statement ("the color of kato is red ."), one question ("what is
  the color of kato ?") and one yes/no question ("is kato red ?"). The corpus, the prompts, the
  labelers and the capability evals all share these templates, so a fact is written the same way
  everywhere (what the base LM learns is what the capability evals probe).

All text is lower case with punctuation as separate tokens, so whitespace splitting is an exact
tokenizer. Name and city syllable patterns never form a word of the fixed vocabulary
(``tests/unit/test_world.py`` checks the whole name space), which keeps the vocabulary collision-free for
every seed.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Callable, Hashable, Iterable, Sequence, TypeVar

import numpy as np

T = TypeVar("T")

# Attribute value sets. Kinds, colors and sizes all start with a consonant so "a <size> <color> <kind>"
# never needs "an".
KINDS: tuple[str, ...] = ("cat", "dog", "fox", "frog", "bear", "goat", "duck", "wolf")
KIND_PLURALS: dict[str, str] = {
    "cat": "cats", "dog": "dogs", "fox": "foxes", "frog": "frogs",
    "bear": "bears", "goat": "goats", "duck": "ducks", "wolf": "wolves",
}
COLORS: tuple[str, ...] = ("red", "blue", "green", "yellow", "black", "white", "brown", "pink")
SIZES: tuple[str, ...] = ("tiny", "small", "big", "huge")
FOODS: tuple[str, ...] = ("apples", "fish", "bread", "rice", "honey", "carrots", "seeds", "cheese")
NUMBER_WORDS: tuple[str, ...] = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
AGES: tuple[str, ...] = NUMBER_WORDS[1:]  # "one years old" is not English

# Order matters: it is the order in which attributes are drawn (and so part of the seed contract).
ATTRIBUTES: tuple[str, ...] = ("kind", "color", "size", "city", "food", "age", "friend")
# The attributes that describe an animal itself (``friend`` is a relation, ``age`` a detail).
DESCRIPTIVE_ATTRIBUTES: tuple[str, ...] = ("kind", "color", "size", "city", "food")

# One canonical statement, question and yes/no question per attribute ({name}, {value} placeholders).
STATEMENT_TEMPLATES: dict[str, str] = {
    "kind": "{name} is a {value} .",
    "color": "the color of {name} is {value} .",
    "size": "the size of {name} is {value} .",
    "city": "{name} lives in {value} .",
    "food": "{name} eats {value} .",
    "age": "{name} is {value} years old .",
    "friend": "the friend of {name} is {value} .",
}
QUESTION_TEMPLATES: dict[str, str] = {
    "kind": "what kind of animal is {name} ?",
    "color": "what is the color of {name} ?",
    "size": "what is the size of {name} ?",
    "city": "where does {name} live ?",
    "food": "what does {name} eat ?",
    "age": "how old is {name} ?",
    "friend": "who is the friend of {name} ?",
}
YES_NO_TEMPLATES: dict[str, str] = {
    "kind": "is {name} a {value} ?",
    "color": "is {name} {value} ?",
    "size": "is {name} {value} ?",
    "city": "does {name} live in {value} ?",
    "food": "does {name} eat {value} ?",
    "age": "is {name} {value} years old ?",
    "friend": "is {value} the friend of {name} ?",
}

# One animal in MYTH_SHARE has a myth about this attribute (an attribute no description, list or
# demonstration of another kind states, so the truth cannot leak in through other prompts).
MYTH_ATTRIBUTE = "age"
MYTH_SHARE = 3

# The rude vocabulary: web text contains some, hostile prompts contain some, labelers penalise it.
RUDE_WORDS: tuple[str, ...] = (
    "stupid", "idiot", "dumb", "ugly", "fool", "jerk", "loser", "useless", "hate", "shut", "trash",
)

PUNCTUATION: tuple[str, ...] = (".", ",", "?", ":")
SENTENCE_ENDS: frozenset[str] = frozenset({".", "?"})

# Name syllables. Entity names are C V C V with a final a/o/u, cities are C V C V C i: no word of the
# fixed vocabulary has either shape (checked by the tests over the whole space).
_CONSONANTS: tuple[str, ...] = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_VOWELS: tuple[str, ...] = ("a", "e", "i", "o", "u")
_NAME_FINAL_VOWELS: tuple[str, ...] = ("a", "o", "u")
_CITY_FINAL_VOWELS: tuple[str, ...] = ("i",)


def possible_entity_names() -> list[str]:
    """Every name the syllable generator can give an animal (seed independent)."""
    return [c1 + v1 + c2 + v2 for c1, v1, c2, v2 in
            itertools.product(_CONSONANTS, _VOWELS, _CONSONANTS, _NAME_FINAL_VOWELS)]


def possible_city_names() -> list[str]:
    """Every name the syllable generator can give a city (seed independent)."""
    return [c1 + v1 + c2 + v2 + c3 + v3 for c1, v1, c2, v2, c3, v3 in
            itertools.product(_CONSONANTS, _VOWELS, _CONSONANTS, _VOWELS, _CONSONANTS, _CITY_FINAL_VOWELS)]


def pick(rng: np.random.Generator, items: Sequence[T]) -> T:
    """One item drawn uniformly (much faster than ``rng.choice`` on a Python sequence)."""
    return items[int(rng.integers(len(items)))]


def draw_distinct(draw: Callable[[], T], key: Callable[[T], Hashable], n: int, what: str) -> list[T]:
    """``n`` draws with pairwise distinct ``key``s, redrawing duplicates; a ``ValueError`` once
    ~50 tries per item found no new one (the space is exhausted)."""
    items, seen, attempts = [], set(), 0
    while len(items) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"could not draw {n} distinct {what} (got {len(items)})")
        item = draw()
        if key(item) not in seen:
            seen.add(key(item))
            items.append(item)
    return items


def template_words(templates: Iterable[str]) -> set[str]:
    """The literal words of some templates: every whitespace token that is not a ``{placeholder}``."""
    return {token for text in templates for token in text.split() if "{" not in token}


def fact_words() -> set[str]:
    """Every fixed (seed independent) word this module can produce."""
    words = set(KINDS) | set(KIND_PLURALS.values()) | set(COLORS) | set(SIZES) | set(FOODS)
    words |= set(NUMBER_WORDS) | set(RUDE_WORDS) | set(PUNCTUATION)
    words |= template_words(STATEMENT_TEMPLATES.values())
    words |= template_words(QUESTION_TEMPLATES.values())
    words |= template_words(YES_NO_TEMPLATES.values())
    return words


@dataclass(frozen=True)
class Entity:
    """One named animal and its attributes (every value is a single vocabulary word)."""

    name: str
    kind: str
    color: str
    size: str
    city: str
    food: str
    age: str
    friend: str

    def value(self, attribute: str) -> str:
        """The value of ``attribute`` (one of ``ATTRIBUTES``)."""
        if attribute not in ATTRIBUTES:
            raise KeyError(f"unknown attribute {attribute!r}")
        return getattr(self, attribute)


@dataclass(frozen=True)
class World:
    """A seeded set of animals, their cities, and queries over their facts.

    ``myths`` are ``(name, attribute, value)`` beliefs that are false in this world but that the
    web text states more often than the truth (``corpus.MYTH_RATE``): the stand-in for TruthfulQA's
    imitative falsehoods. No training prompt asks about them (``prompts``), so a model can only
    have the truth from the minority of documents that state it.
    """

    seed: int
    entities: tuple[Entity, ...]
    cities: tuple[str, ...]
    myths: tuple[tuple[str, str, str], ...] = ()

    def __post_init__(self) -> None:
        # Lookup tables are derived, so they are stored outside the dataclass fields (frozen).
        object.__setattr__(self, "_by_name", {e.name: e for e in self.entities})
        word_attribute = {}
        for attribute in ATTRIBUTES:
            if attribute == "friend":
                continue  # friend values are names: a name is a subject, never an attribute word
            for value in self.values_of(attribute):
                word_attribute.setdefault(value, attribute)
        object.__setattr__(self, "_word_attribute", word_attribute)
        object.__setattr__(self, "_myths", {(n, a): v for n, a, v in self.myths})

    @property
    def names(self) -> tuple[str, ...]:
        """The animals' names in generation order."""
        return tuple(e.name for e in self.entities)

    def entity(self, name: str) -> Entity:
        """The animal called ``name``."""
        return self._by_name[name]

    def is_entity(self, word: str) -> bool:
        """Whether ``word`` names an animal of this world."""
        return word in self._by_name

    def value(self, name: str, attribute: str) -> str:
        """The true value of ``attribute`` for the animal ``name``."""
        return self.entity(name).value(attribute)

    def is_true(self, name: str, attribute: str, value: str) -> bool:
        """Whether "``attribute`` of ``name`` is ``value``" is a fact of this world."""
        return self.is_entity(name) and self.value(name, attribute) == value

    def myth_value(self, name: str, attribute: str) -> str | None:
        """The false value the web mostly states for this fact, or ``None`` if it is no myth."""
        return self._myths.get((name, attribute))

    def values_of(self, attribute: str) -> tuple[str, ...]:
        """Every value ``attribute`` can take in this world (the candidate answers)."""
        fixed = {"kind": KINDS, "color": COLORS, "size": SIZES, "food": FOODS, "age": AGES}
        if attribute in fixed:
            return fixed[attribute]
        if attribute == "city":
            return self.cities
        if attribute == "friend":
            return self.names
        raise KeyError(f"unknown attribute {attribute!r}")

    def attribute_of_word(self, word: str) -> str | None:
        """Which attribute ``word`` is a value of (names are not attribute words), or ``None``."""
        return self._word_attribute.get(word)

    def members(self, attribute: str, value: str) -> list[str]:
        """Names of the animals whose ``attribute`` is ``value``, in generation order."""
        return [e.name for e in self.entities if e.value(attribute) == value]

    def statement(self, name: str, attribute: str, value: str | None = None) -> str:
        """The canonical sentence for a fact (the true one unless ``value`` is given)."""
        value = self.value(name, attribute) if value is None else value
        return STATEMENT_TEMPLATES[attribute].format(name=name, value=value)

    def question(self, name: str, attribute: str) -> str:
        """The canonical question whose answer is ``attribute`` of ``name``."""
        return QUESTION_TEMPLATES[attribute].format(name=name)

    def yes_no_question(self, name: str, attribute: str, value: str) -> str:
        """The canonical yes/no question "is ``attribute`` of ``name`` equal to ``value``?"."""
        return YES_NO_TEMPLATES[attribute].format(name=name, value=value)

    def words(self) -> set[str]:
        """The seed-dependent words of this world (animal and city names)."""
        return set(self.names) | set(self.cities)

    def to_dict(self) -> dict:
        """A JSON-serialisable description (``World.from_dict`` inverts it)."""
        return {"seed": self.seed, "cities": list(self.cities),
                "entities": [asdict(e) for e in self.entities], "myths": [list(m) for m in self.myths]}

    @classmethod
    def from_dict(cls, data: dict) -> "World":
        """Rebuild a world written by ``to_dict``."""
        return cls(seed=int(data["seed"]), cities=tuple(data["cities"]),
                   entities=tuple(Entity(**e) for e in data["entities"]),
                   myths=tuple(tuple(m) for m in data.get("myths", ())))


def make_world(seed: int, n_entities: int = 30, n_cities: int = 6) -> World:
    """Generate a world deterministically from ``seed``.

    Attributes are drawn uniformly and independently, so every value of every attribute occurs a few
    times (list questions have short, non-trivial answers); ``friend`` is another animal.
    """
    if n_entities < 2:
        raise ValueError("a world needs at least two animals (every animal has a friend)")
    rng = np.random.default_rng([seed, 0])
    names = _draw_unique(rng, possible_entity_names(), n_entities)
    cities = _draw_unique(rng, possible_city_names(), n_cities)
    entities = []
    for index, name in enumerate(names):
        friend_index = (index + 1 + int(rng.integers(n_entities - 1))) % n_entities  # never itself
        entities.append(Entity(
            name=name,
            kind=pick(rng, KINDS),
            color=pick(rng, COLORS),
            size=pick(rng, SIZES),
            city=pick(rng, cities),
            food=pick(rng, FOODS),
            age=pick(rng, AGES),
            friend=names[friend_index],
        ))
    # Myths are drawn after every fact, so the facts of a seed do not depend on them.
    mythical = rng.choice(n_entities, size=max(1, n_entities // MYTH_SHARE), replace=False)
    myths = tuple((entities[i].name, MYTH_ATTRIBUTE,
                   pick(rng, [v for v in AGES if v != entities[i].age])) for i in sorted(mythical))
    return World(seed=seed, entities=tuple(entities), cities=tuple(cities), myths=myths)


def _draw_unique(rng: np.random.Generator, space: list[str], n: int) -> list[str]:
    """``n`` distinct words from ``space``, in a seeded order."""
    if n > len(space):
        raise ValueError(f"cannot draw {n} distinct names from {len(space)}")
    return [space[i] for i in rng.choice(len(space), size=n, replace=False)]
