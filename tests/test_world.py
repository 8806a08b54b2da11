"""Tests for the labeler world: determinism, formats, tokenizer coverage and labeler sanity."""
from __future__ import annotations

import collections
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from rlhf_jax.world import (
    SPLITS, World, load_world, make_capability_evals, make_comparisons, make_labeler_pool,
    make_prompt_splits, make_prompts, make_world, pretraining_corpus, read_jsonl, response_features,
    world_vocabulary, write_demonstration, write_world,
)
from rlhf_jax.world.corpus import QA_LINE_TEMPLATE
from rlhf_jax.world.export import fixed_vocabulary
from rlhf_jax.world.facts import ATTRIBUTES, RUDE_WORDS, possible_city_names, possible_entity_names
from rlhf_jax.world.labelers import extract_claims

SMALL_SIZES = {"pretrain": 400, "sft": 300, "rm": 150, "ppo": 150, "eval": 100,
               "capability_mc": 80, "capability_qa": 60}
META_KEYS = {"type", "hostile", "instruction", "entity", "attribute", "value", "answer", "items",
             "constraint", "max_words", "reference", "reference_terse", "budget", "target_facts"}
REQUIRED_FIELDS = {
    "pretrain": {"text"},
    "sft": {"prompt", "completion", "meta"},
    "rm_prompts": {"prompt", "meta"},
    "ppo_prompts": {"prompt", "meta"},
    "eval_prompts": {"prompt", "meta"},
    "capability_mc": {"context", "choices", "answer"},
    "capability_qa": {"question", "answer"},
}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, str]:
    return write_world(tmp_path_factory.mktemp("world_a"), seed=3, sizes=SMALL_SIZES)


@pytest.fixture(scope="module")
def world() -> World:
    return make_world(3)


@pytest.fixture(scope="module")
def pool(world):
    return make_labeler_pool(world, 3)


@pytest.fixture(scope="module")
def eval_rows(world) -> list[dict]:
    return make_prompts(world, 400, seed=11)


def _file_bytes(paths: dict[str, str]) -> dict[str, bytes]:
    files = {name: Path(p).read_bytes() for name, p in paths.items() if name != "tokenizer"}
    files["tokenizer.json"] = (Path(paths["tokenizer"]) / "tokenizer.json").read_bytes()
    return files


def _all_texts(paths: dict[str, str]) -> list[str]:
    texts = [r["text"] for r in read_jsonl(paths["pretrain"])]
    texts += [r["prompt"] + " " + r["completion"] for r in read_jsonl(paths["sft"])]
    for name in ("rm_prompts", "ppo_prompts", "eval_prompts"):
        rows = read_jsonl(paths[name])
        texts += [r["prompt"] for r in rows] + [r["meta"]["reference_terse"] for r in rows]
    texts += [" ".join([r["context"], *r["choices"]]) for r in read_jsonl(paths["capability_mc"])]
    texts += [r["question"] + " " + r["answer"] for r in read_jsonl(paths["capability_qa"])]
    return texts


def test_same_seed_gives_identical_files_and_other_seed_differs(written, tmp_path):
    again = write_world(tmp_path / "again", seed=3, sizes=SMALL_SIZES)
    assert _file_bytes(again) == _file_bytes(written)
    other = _file_bytes(write_world(tmp_path / "other", seed=4, sizes=SMALL_SIZES))
    first = _file_bytes(written)
    for name in ("pretrain", "sft", "eval_prompts", "capability_mc", "world"):
        assert other[name] != first[name], name


def test_every_row_has_the_required_fields(written):
    for name, fields in REQUIRED_FIELDS.items():
        rows = read_jsonl(written[name])
        assert rows, name
        for row in rows:
            assert fields <= set(row), (name, row)
            if "meta" in row and name not in ("capability_mc", "capability_qa"):
                assert set(row["meta"]) == META_KEYS
    sizes = {"sft": "sft", "rm_prompts": "rm", "ppo_prompts": "ppo", "eval_prompts": "eval",
             "pretrain": "pretrain", "capability_mc": "capability_mc", "capability_qa": "capability_qa"}
    for name, key in sizes.items():
        assert len(read_jsonl(written[name])) == SMALL_SIZES[key]
    labelers = json.loads(Path(written["labelers"]).read_text())
    assert labelers["training"] and labelers["heldout"]
    assert {"name", "group", "weights", "noise", "slip_rate"} <= set(labelers["training"][0])


def test_written_prompt_sets_are_disjoint(written):
    sets = {name: {r["prompt"] for r in read_jsonl(written[name])}
            for name in ("sft", "rm_prompts", "ppo_prompts", "eval_prompts")}
    for a, b in itertools.combinations(sets, 2):
        assert not sets[a] & sets[b], (a, b)


def test_splits_are_disjoint_and_sized(world):
    sizes = {"sft": 700, "rm": 500, "ppo": 600, "eval": 200}
    splits = make_prompt_splits(world, sizes, seed=5)
    texts = [r["prompt"] for s in SPLITS for r in splits[s]]
    assert len(texts) == len(set(texts)) == sum(sizes.values())
    assert {s: len(splits[s]) for s in SPLITS} == sizes
    for split in SPLITS:  # the shuffle keeps every prompt type in every split
        assert {r["meta"]["type"] for r in splits[split]} == {
            "fact", "yes_no", "describe", "list", "repeat", "rude_request"}


def test_lengths_and_vocabulary_size(written, world):
    assert len(world_vocabulary(world)) < 600
    assert max(len(r["text"].split()) for r in read_jsonl(written["pretrain"])) <= 64
    for name in ("sft", "rm_prompts", "ppo_prompts", "eval_prompts"):
        for row in read_jsonl(written[name]):
            assert len(row["prompt"].split()) <= 24
            assert len(row["meta"]["reference"].split()) <= 24
    assert max(len(r["completion"].split()) for r in read_jsonl(written["sft"])) <= 24


def test_generated_names_can_never_clash_with_vocabulary_words():
    names = set(possible_entity_names()) | set(possible_city_names())
    assert not names & fixed_vocabulary()
    assert not set(possible_entity_names()) & set(possible_city_names())


def test_tokenizer_round_trips_every_generated_text(written):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(written["tokenizer"])
    specials = [tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id]
    assert len(set(specials)) == 4 and tokenizer.pad_token_id != tokenizer.eos_token_id
    for text in _all_texts(written):
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
        assert len(ids) == len(text.split())
        assert tokenizer.decode(ids) == text


def test_world_and_labelers_round_trip_through_disk(written):
    world, pool = load_world(Path(written["world"]).parent)
    assert world == make_world(3, n_entities=len(world.entities))
    assert World.from_dict(world.to_dict()) == world
    assert pool.to_dict() == make_labeler_pool(world, 3).to_dict()


def test_corpus_states_each_fact_mostly_truly_and_has_some_web_noise(world):
    docs = pretraining_corpus(world, 3000, seed=1)
    text = " \n ".join(docs)
    for entity in world.entities:
        for attribute in ("color", "size", "food", "age", "friend"):
            true_count = text.count(world.statement(entity.name, attribute))
            false_counts = [text.count(world.statement(entity.name, attribute, v))
                            for v in world.values_of(attribute) if v not in (entity.value(attribute), entity.name)]
            assert true_count > max(false_counts), (entity.name, attribute)
    rude_share = np.mean([any(w in RUDE_WORDS for w in d.split()) for d in docs])
    assert 0.03 < rude_share < 0.25
    assert "instruction" not in text and "response" not in text


def test_claims_are_read_from_responses(world):
    kato = world.entities[0]
    wrong_color = next(c for c in world.values_of("color") if c != kato.color)
    claims = extract_claims(world, f"{kato.name} is a {kato.size} {wrong_color} {kato.kind} .".split(), None)
    assert claims == {(kato.name, "size", kato.size), (kato.name, "color", wrong_color), (kato.name, "kind", kato.kind)}
    assert extract_claims(world, f"is {kato.name} {wrong_color} ?".split(), None) == set()
    assert extract_claims(world, f"{kato.name} is not {wrong_color} .".split(), None) == set()
    assert extract_claims(world, [wrong_color, "."], kato.name) == {(kato.name, "color", wrong_color)}


def test_features_check_constraints_lists_and_truth(world, eval_rows):
    by_type = collections.defaultdict(list)
    for row in eval_rows:
        by_type[(row["meta"]["type"], row["meta"]["constraint"])].append(row)
    one_word = by_type[("fact", "one_word")][0]["meta"]
    assert response_features(world, one_word, one_word["reference"]).constraint_ok
    assert not response_features(world, one_word, f"it is {one_word['answer']} .").constraint_ok
    listing = by_type[("list", None)][0]["meta"]
    assert response_features(world, listing, listing["reference"]).task == 1.0
    if len(listing["items"]) > 1:
        assert 0 < response_features(world, listing, listing["items"][0] + " .").task < 1
    fact = by_type[("fact", None)][0]["meta"]
    wrong = next(v for v in world.values_of(fact["attribute"]) if v not in (fact["answer"], fact["entity"]))
    features = response_features(world, fact, world.statement(fact["entity"], fact["attribute"], wrong))
    assert features.task == 0 and (features.false_claims == 1 or fact["attribute"] == "friend")
    describe = by_type[("describe", "max_words")][0]["meta"]
    assert response_features(world, describe, describe["reference"]).task == 1.0
    assert response_features(world, describe, describe["reference"]).constraint_ok


def _bad_responses(world: World, row: dict, rng: np.random.Generator) -> dict[str, str]:
    meta = row["meta"]
    reference = meta["reference"]
    ramble = " ".join(pretraining_corpus(world, 2, int(rng.integers(10**6))))
    bad = {"empty": "", "rude": f"{reference[:-2]} , you stupid idiot .", "ramble": f"{reference} {ramble}",
           "repeated": " ".join([reference] * 4)}
    if meta["type"] == "fact":
        wrong = next(v for v in world.values_of(meta["attribute"]) if v not in (meta["answer"], meta["entity"]))
        bad["wrong"] = world.statement(meta["entity"], meta["attribute"], wrong)
    if meta["type"] == "yes_no":
        bad["wrong"] = ("no" if meta["answer"] == "yes" else "yes") + " ."
    return bad


def test_gold_scores_order_sensible_responses(world, pool, eval_rows):
    rng = np.random.default_rng(0)
    for row in eval_rows[:150]:
        bad = _bad_responses(world, row, rng)
        for labeler in pool.all:
            good = labeler.gold_score(row, row["meta"]["reference"])
            demo = labeler.gold_score(row, write_demonstration(row, labeler, rng))
            for name, response in bad.items():
                assert good > labeler.gold_score(row, response), (labeler.name, name, row["prompt"], response)
                if name != "ramble":  # a slipped demonstration may trail a mild ramble
                    assert demo > labeler.gold_score(row, response), (labeler.name, name, row["prompt"])


def test_groups_agree_on_clear_pairs_but_not_on_all_close_calls(pool, eval_rows):
    rng = np.random.default_rng(1)

    def agreement(pairs: list[tuple[dict, str, str]]) -> float:
        same = []
        for row, a, b in pairs:
            trainer = pool.training[int(rng.integers(len(pool.training)))]
            judge = pool.heldout[int(rng.integers(len(pool.heldout)))]
            same.append(trainer.rank(row, [a, b], rng) == judge.rank(row, [a, b], rng))
        return float(np.mean(same))

    clear = [(row, row["meta"]["reference"], "") for row in eval_rows]
    clear += [(row, row["meta"]["reference"], "you stupid idiot .") for row in eval_rows]
    close = [(row, row["meta"]["reference"], row["meta"]["reference_terse"]) for row in eval_rows
             if row["meta"]["reference"] != row["meta"]["reference_terse"]]
    assert len(close) > 30
    clear_rate, close_rate = agreement(clear), agreement(close)
    assert clear_rate > 0.9
    assert 0.2 < close_rate < 0.9 and close_rate < clear_rate


def test_rankings_are_permutations_with_zero_best_and_ties_for_duplicates(world, pool, eval_rows):
    rows = eval_rows[:60]
    completions = [[r["meta"]["reference"], "", "you stupid idiot .", r["meta"]["reference"][:-2]] for r in rows]
    comparisons = make_comparisons(rows, completions, pool.training, seed=0)
    assert comparisons == make_comparisons(rows, completions, pool.training, seed=0)
    reference_beats_bad = 0
    for row, comparison in zip(rows, comparisons):
        assert {"prompt", "completions", "ranking", "meta", "labeler"} <= set(comparison)
        assert comparison["prompt"] == row["prompt"]
        ranking = comparison["ranking"]
        assert sorted(ranking) == [0, 1, 2, 3]
        reference_beats_bad += ranking[0] < ranking[1] and ranking[0] < ranking[2]
    assert reference_beats_bad > 0.9 * len(rows)

    row = rows[0]
    reference = row["meta"]["reference"]
    ranking = pool.heldout[0].rank(row, ["", reference, f" {reference} ", "trash ."], np.random.default_rng(2))
    assert ranking[1] == ranking[2]  # identical up to whitespace: a tie
    assert min(ranking) == 0
    # Competition ranking: a rank counts the strictly better completions.
    assert all(rank == sum(other < rank for other in ranking) for rank in ranking)


def test_capability_items_agree_with_the_facts(world):
    evals = make_capability_evals(world, n_mc=200, n_qa=100, seed=2)
    assert evals == make_capability_evals(world, n_mc=200, n_qa=100, seed=2)
    for item in evals["mc"]:
        meta = item["meta"]
        assert item["choices"][item["answer"]] == world.value(meta["entity"], meta["attribute"])
        assert len(set(item["choices"])) == len(item["choices"]) == 4
        statement = world.statement(meta["entity"], meta["attribute"])
        quiz = QA_LINE_TEMPLATE.format(question=world.question(meta["entity"], meta["attribute"]),
                                       answer=item["choices"][item["answer"]])
        assert (statement if meta["format"] == "statement" else quiz).startswith(
            item["context"] + " " + item["choices"][item["answer"]])
    for item in evals["qa"]:
        assert item["answer"] == world.value(item["meta"]["entity"], item["meta"]["attribute"])
        assert item["question"].startswith("question : ") and item["question"].endswith("answer :")
    assert {i["meta"]["attribute"] for i in evals["qa"]} == set(ATTRIBUTES)


def _degenerate_responses(world: World, row: dict) -> dict[str, str]:
    """Responses that do not attempt the instruction, as a person would judge them."""
    meta = row["meta"]
    other = next(n for n in world.names if n != meta.get("entity")
                 and n not in (meta.get("items") or ()) and n != meta.get("answer"))
    off_attribute = next(a for a in ("color", "size", "home", "food", "age") if a in ATTRIBUTES
                         and a != meta.get("attribute"))
    return {"yes": "yes .", "empty": "", "prompt repeated": row["prompt"],
            "off-topic true fact": world.statement(other, off_attribute)}


DEGENERATE_CATEGORIES = ("fact", "yes_no", "describe", "list", "repeat", "rude_request")


@pytest.mark.parametrize("category", DEGENERATE_CATEGORIES)
def test_not_attempting_the_task_scores_below_i_do_not_know_below_the_answer(world, pool,
                                                                            eval_rows, category):
    """The loophole the old world had: "yes ." to anything scored like an honest answer."""
    rows = [r for r in eval_rows if r["meta"]["type"] == category
            and not (category == "yes_no" and r["meta"]["answer"] == "yes")][:15]
    assert rows, category
    for row in rows:
        for labeler in pool.all:
            correct = labeler.gold_score(row, row["meta"]["reference"])
            honest = labeler.gold_score(row, "i do not know .")
            assert correct > honest + 0.5, (labeler.name, row["prompt"])
            for name, response in _degenerate_responses(world, row).items():
                features = response_features(world, row["meta"], response)
                # exceptions: "yes ." answers a yes/no question (wrongly here: a false claim);
                # repeating a rude request repeats its insult (a harmlessness penalty).
                if not (category == "yes_no" and name == "yes") and \
                        not (category == "rude_request" and name == "prompt repeated"):
                    assert features.off_task, (name, response)
                assert honest > labeler.gold_score(row, response) + 0.5, \
                    (labeler.name, category, name, row["prompt"], response)
