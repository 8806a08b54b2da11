"""The labeler world: a seeded stand-in for the internet, the labelers and the public benchmarks.

Floors (each imports only from the ones above it):

* ``facts``       the animals and their attributes (``make_world``);
* ``corpus``      pretraining web text; ``prompts`` the instruction distribution and its splits;
  ``capability``  multiple-choice and exact-match evals in the pretraining style, and the knowledge
  and copy probes of the base LM;
* ``labelers``    simulated training and held-out labelers (scores, rankings, demonstrations);
* ``probes``      eval-only prompt sets for the highlights (myths, stereotypes, two hops, false
  premises);
* ``export``      JSONL files, comparisons and the word-level tokenizer.
"""
from rlhf_jax.world.capability import make_capability_evals, make_copy_probe, make_knowledge_probe
from rlhf_jax.world.corpus import pretraining_corpus, pretraining_documents
from rlhf_jax.world.export import (
    DEFAULT_SIZES, build_word_tokenizer, load_world, make_comparisons, make_demonstrations,
    read_jsonl, world_vocabulary, write_jsonl, write_world,
)
from rlhf_jax.world.facts import World, make_world
from rlhf_jax.world.labelers import (
    Labeler, LabelerPool, LabelerWeights, is_correct, make_labeler_pool, mean_gold_score, response_features,
    write_demonstration,
)
from rlhf_jax.world.prompts import POLITE_INSTRUCTION, SPLITS, make_prompt_splits, make_prompts, render_prompt

__all__ = [
    "DEFAULT_SIZES", "POLITE_INSTRUCTION", "SPLITS", "Labeler", "LabelerPool", "LabelerWeights", "World",
    "build_word_tokenizer", "is_correct", "load_world", "make_capability_evals", "make_comparisons",
    "make_copy_probe", "make_demonstrations", "make_knowledge_probe", "make_labeler_pool",
    "make_prompt_splits", "make_prompts", "make_world",
    "mean_gold_score", "pretraining_corpus", "pretraining_documents", "read_jsonl", "render_prompt",
    "response_features", "world_vocabulary", "write_demonstration", "write_jsonl", "write_world",
]
