"""Write the labeler world to disk in the project's data formats, and build its tokenizer.

``write_world(out_dir, seed, sizes)`` writes (one JSON object per line; extra fields are allowed):

====================  ==========================================================================
``pretrain.jsonl``    ``{"text", "style"}`` - web text for the base LM
``sft.jsonl``         ``{"prompt", "completion", "meta", "labeler"}`` - training-labeler
                      demonstrations (``completion`` has no ``<eos>``: the data pipeline appends it;
                      prompt and completion join with one space)
``rm_prompts.jsonl``  ``{"prompt", "meta"}`` - to be answered K times by the SFT model, then ranked
                      with ``make_comparisons``
``ppo_prompts.jsonl`` ``{"prompt", "meta"}``
``eval_prompts.jsonl`` ``{"prompt", "meta"}`` - held out from every training stage
``capability_mc.jsonl`` ``{"context", "choices", "answer", "meta"}``
``capability_qa.jsonl`` ``{"question", "answer", "meta"}``
``labelers.json``     the labeler pool's parameters (``LabelerPool.to_dict``)
``world.json``        the facts (``World.to_dict``)
``tokenizer/``        a word-level ``PreTrainedTokenizerFast`` (``save_pretrained``)
====================  ==========================================================================

``out_dir`` may be a URL (``gs://...``). In a multi-process run only process 0 writes; the others
wait until the files are there.

The tokenizer's vocabulary is the *complete* word list of the world (every template word, value,
name, number and rude word), not the words that happen to occur in a sample, so any text the world
can produce - including a policy's recombinations of it - encodes without ``<unk>``.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Mapping, Sequence

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlhf_jax import distributed, storage
from rlhf_jax.data.formats import write_jsonl
from rlhf_jax.world.capability import make_capability_evals
from rlhf_jax.world.corpus import corpus_words, pretraining_documents
from rlhf_jax.world.facts import World, fact_words, make_world
from rlhf_jax.world.labelers import SPECIAL_TOKENS, Labeler, LabelerPool, make_labeler_pool, write_demonstration
from rlhf_jax.world.probes import probe_words
from rlhf_jax.world.prompts import SPLITS, make_prompt_splits, prompt_words

PAD, EOS, UNK, BOS = SPECIAL_TOKENS

DEFAULT_SIZES: dict[str, int] = {
    "entities": 30, "pretrain": 20000, "sft": 1500, "rm": 1000, "ppo": 1500, "eval": 300,
    "capability_mc": 300, "capability_qa": 200,
}
PROMPT_FILES: dict[str, str] = {"rm": "rm_prompts.jsonl", "ppo": "ppo_prompts.jsonl", "eval": "eval_prompts.jsonl"}


def fixed_vocabulary() -> set[str]:
    """Every seed-independent word the world can produce."""
    return fact_words() | corpus_words() | prompt_words() | probe_words()


def world_vocabulary(world: World) -> list[str]:
    """The complete, sorted word list of ``world`` (fixed words plus its names and cities)."""
    fixed = fixed_vocabulary()
    clash = fixed & world.words()
    if clash:
        raise ValueError(f"generated names collide with vocabulary words: {sorted(clash)}")
    return sorted(fixed | world.words())


def world_vocab_size(seed: int, n_entities: int | None = None) -> int:
    """Size of the tokenizer ``write_world(seed, ...)`` builds, without writing anything."""
    world = make_world(seed, **({} if n_entities is None else {"n_entities": n_entities}))
    return len(SPECIAL_TOKENS) + len(world_vocabulary(world))


def build_word_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every whitespace token of ``texts``.

    Pass the complete word list (``world_vocabulary``) rather than samples. Ids: ``<pad>`` 0,
    ``<eos>`` 1, ``<unk>`` 2, ``<bos>`` 3, then the words in sorted order. The pre-tokenizer is
    ``WhitespaceSplit`` (not ``Whitespace``, which would split words at punctuation): world text is
    already space-separated. No special tokens are added on encoding. Saved with ``save_pretrained``.
    """
    words = sorted({token for text in texts for token in text.split()} - set(SPECIAL_TOKENS))
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS,
                                        unk_token=UNK, bos_token=BOS)
    with storage.writable_local(out_dir) as local_dir:
        tokenizer.save_pretrained(local_dir)
    return tokenizer


def make_demonstrations(prompt_rows: Sequence[Mapping], labelers: Sequence[Labeler], seed: int) -> list[dict]:
    """One demonstration per prompt, each by a labeler drawn uniformly from ``labelers``."""
    rng = np.random.default_rng([seed, 8])
    rows = []
    for row in prompt_rows:
        labeler = labelers[int(rng.integers(len(labelers)))]
        rows.append({"prompt": row["prompt"], "completion": write_demonstration(row, labeler, rng),
                     "meta": row["meta"], "labeler": labeler.name})
    return rows


def make_comparisons(prompt_rows: Sequence[Mapping], completions_per_prompt: Sequence[Sequence[str]],
                     labelers: Sequence[Labeler], seed: int) -> list[dict]:
    """Have labelers rank the K completions of each prompt (the RM's training or test data).

    Each prompt is ranked by one labeler drawn uniformly from ``labelers`` (pass the training
    labelers for RM data, the held-out ones for held-out accuracy). Returns rows
    ``{"prompt", "completions", "ranking", "meta", "labeler", "group"}`` where ``ranking[i]`` is the
    rank of ``completions[i]`` (0 = best; identical completions tie).
    """
    if len(prompt_rows) != len(completions_per_prompt):
        raise ValueError("need one list of completions per prompt")
    rng = np.random.default_rng([seed, 7])
    rows = []
    for row, completions in zip(prompt_rows, completions_per_prompt):
        labeler = labelers[int(rng.integers(len(labelers)))]
        rows.append({"prompt": row["prompt"], "completions": list(completions),
                     "ranking": labeler.rank(row, completions, rng), "meta": row["meta"],
                     "labeler": labeler.name, "group": labeler.group})
    return rows


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file (a local path or a URL)."""
    with storage.open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_world(out_dir: str | os.PathLike) -> tuple[World, LabelerPool]:
    """The world and labeler pool written by ``write_world`` (to judge model samples later)."""
    world = World.from_dict(json.loads(storage.read_text(storage.join(out_dir, "world.json"))))
    pool = LabelerPool.from_dict(json.loads(storage.read_text(storage.join(out_dir, "labelers.json"))),
                                 world)
    return world, pool


def write_world(out_dir: str | os.PathLike, seed: int, sizes: Mapping[str, int] | None = None,
                labeler_noise_scale: float = 1.0) -> dict[str, str]:
    """Generate the whole world from ``seed`` and write it under ``out_dir`` (a path or a URL).

    ``sizes`` overrides entries of ``DEFAULT_SIZES`` (numbers of animals, documents, prompts per
    split and capability items). ``labeler_noise_scale`` multiplies every labeler's ranking noise
    (see ``make_labeler_pool``). Returns the written paths by name (``"pretrain"``, ``"sft"``,
    ``"rm_prompts"``, ``"ppo_prompts"``, ``"eval_prompts"``, ``"capability_mc"``,
    ``"capability_qa"``, ``"labelers"``, ``"world"``, ``"tokenizer"``).

    Multi-process: call on every process; process 0 writes, and the call returns once it has.
    """
    import jax       # here, not at the top: nothing else in the world package needs JAX

    unknown = set(sizes or {}) - set(DEFAULT_SIZES)
    if unknown:
        raise KeyError(f"unknown sizes {sorted(unknown)}")
    n = {**DEFAULT_SIZES, **(sizes or {})}
    out = os.fspath(out_dir)
    paths = {name: storage.join(out, f"{name}.jsonl")
             for name in ("pretrain", "sft", "capability_mc", "capability_qa")}
    paths.update({f"{split}_prompts": storage.join(out, filename) for split, filename in PROMPT_FILES.items()})
    paths.update({name: storage.join(out, f"{name}.json") for name in ("labelers", "world")})
    paths["tokenizer"] = storage.join(out, "tokenizer")

    # Every process generates (cheap, and the same everywhere), so a generation error is raised
    # on all of them rather than leaving the others waiting for process 0.
    world = make_world(seed, n_entities=n["entities"])
    pool = make_labeler_pool(world, seed, noise_scale=labeler_noise_scale)
    docs = pretraining_documents(world, n["pretrain"], seed)
    splits = make_prompt_splits(world, {s: n[s] for s in SPLITS}, seed)
    demonstrations = make_demonstrations(splits["sft"], pool.training, seed)
    capability = make_capability_evals(world, n["capability_mc"], n["capability_qa"], seed)
    vocabulary = world_vocabulary(world)
    _check_covered(vocabulary, [d["text"] for d in docs],
                   [r["prompt"] for rows in splits.values() for r in rows],
                   [r["completion"] for r in demonstrations],
                   [" ".join([m["context"], *m["choices"]]) for m in capability["mc"]],
                   [f'{q["question"]} {q["answer"]}' for q in capability["qa"]])

    def write() -> None:
        write_jsonl(paths["pretrain"], docs)
        write_jsonl(paths["sft"], demonstrations)
        for split in PROMPT_FILES:
            write_jsonl(paths[f"{split}_prompts"], splits[split])
        write_jsonl(paths["capability_mc"], capability["mc"])
        write_jsonl(paths["capability_qa"], capability["qa"])
        storage.write_json(paths["labelers"], pool.to_dict(), indent=1)
        storage.write_json(paths["world"], world.to_dict(), indent=1)
        build_word_tokenizer(vocabulary, paths["tokenizer"])
    distributed.on_main(write, "rlhf_jax write_world")
    return paths


def _check_covered(vocabulary: Sequence[str], *text_lists: Sequence[str]) -> None:
    """Fail loudly if generated text uses a word outside the declared vocabulary."""
    known = set(vocabulary)
    missing = {w for texts in text_lists for text in texts for w in text.split()} - known
    if missing:
        raise ValueError(f"generated words missing from the vocabulary: {sorted(missing)}")
