"""Tests for the labeler world: determinism, formats, tokenizer coverage and labeler sanity."""
from __future__ import annotations

import collections
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from rlhf_jax.world import (
    POLITE_INSTRUCTION, SPLITS, World, is_correct, load_world, make_capability_evals, make_comparisons,
    make_copy_probe, make_knowledge_probe, make_labeler_pool, make_prompt_splits, make_prompts, make_world,
    pretraining_corpus, pretraining_documents, read_jsonl, response_features, world_vocabulary,
    write_demonstration, write_world,
)
from rlhf_jax.world.capability import statement_context
from rlhf_jax.world.corpus import (
    COPY_INTROS, DOC_STYLE_WEIGHTS, MAX_DOC_TOKENS, QA_LINE_TEMPLATE, copy_prefix, grammar_pair_heldout,
)
from rlhf_jax.world.export import fixed_vocabulary
from rlhf_jax.world.facts import ATTRIBUTES, RUDE_WORDS, possible_city_names, possible_entity_names
from rlhf_jax.world.labelers import extract_claims
from rlhf_jax.world.prompts import REFUSAL_TEMPLATE

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


def test_world_written_to_gcs_matches_the_local_one(written, gcs_path):
    from rlhf_jax import storage
    remote = write_world(gcs_path, seed=3, sizes=SMALL_SIZES)
    assert remote == {name: storage.join(gcs_path, storage.basename(p)) for name, p in written.items()}
    for name, path in remote.items():
        if name != "tokenizer":
            assert storage.read_bytes(path) == Path(written[name]).read_bytes(), name
    assert storage.read_bytes(storage.join(remote["tokenizer"], "tokenizer.json")) == \
        (Path(written["tokenizer"]) / "tokenizer.json").read_bytes()
    assert read_jsonl(remote["sft"]) == read_jsonl(written["sft"])
    world, pool = load_world(gcs_path)
    assert world == make_world(3, n_entities=len(world.entities))
    assert pool.to_dict() == make_labeler_pool(world, 3).to_dict()


def test_corpus_states_each_fact_mostly_truly_and_has_some_web_noise(world):
    docs = pretraining_corpus(world, 3000, seed=1)
    text = " \n ".join(docs)
    assert len(world.myths) == 10 and {a for _, a, _ in world.myths} == {"age"}
    myth_total = true_total = 0
    for entity in world.entities:
        for attribute in ("color", "size", "food", "age", "friend"):
            true_count = text.count(world.statement(entity.name, attribute))
            counts = {v: text.count(world.statement(entity.name, attribute, v))
                      for v in world.values_of(attribute) if v not in (entity.value(attribute), entity.name)}
            myth = world.myth_value(entity.name, attribute)
            if myth is None:
                assert true_count > max(counts.values()), (entity.name, attribute)
            else:   # an imitative falsehood: the web says the myth or the truth, nothing else
                assert counts[myth] > 0 and true_count > 0, (entity.name, attribute)
                assert max(c for v, c in counts.items() if v != myth) == 0, (entity.name, attribute)
                myth_total, true_total = myth_total + counts[myth], true_total + true_count
    # ... and the myth three times in four (corpus.MYTH_RATE): 279 against 94 here.
    assert myth_total > 2.5 * true_total
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


def test_copy_documents_repeat_each_sentence_exactly_in_the_web_register(world):
    assert sum(DOC_STYLE_WEIGHTS.values()) == pytest.approx(1.0)
    docs = pretraining_documents(world, 3000, seed=1)
    copies = [d["text"] for d in docs if d["style"] == "copy"]
    assert 0.07 < len(copies) / len(docs) < 0.13
    intros = "|".join(re.escape(intro) for intro in COPY_INTROS)
    n_lines = 0
    for text in copies:
        assert len(text.split()) <= MAX_DOC_TOKENS
        lines = re.findall(rf"(?:{intros}) ([^.:?]+ \.) \1(?= |$)", text)
        assert lines and len(lines) == sum(text.count(intro) for intro in COPY_INTROS), text
        n_lines += len(lines)
    statements = {world.statement(n, a) for n in world.names for a in ATTRIBUTES}
    copied = [s for text in copies for s in re.findall(rf"(?:{intros}) ([^.:?]+ \.)", text)]
    assert 0.2 < np.mean([s in statements for s in copied]) < 0.6  # facts and grammar sentences
    assert all(copy_prefix(intro, "x .") == f"{intro} x ." for intro in COPY_INTROS)


def test_knowledge_probe_asks_every_fact_once_against_every_value(world):
    probe = make_knowledge_probe(world)
    # Every fact but the 10 myths (what the web mostly says of those is false).
    assert len(probe) == len(world.names) * len(ATTRIBUTES) - len(world.myths) == 200
    assert {(i["meta"]["entity"], i["meta"]["attribute"]) for i in probe} == set(
        itertools.product(world.names, ATTRIBUTES)) - {(n, a) for n, a, _ in world.myths}
    for item in probe:
        name, attribute = item["meta"]["entity"], item["meta"]["attribute"]
        assert item["context"] == statement_context(name, attribute)
        assert item["choices"] == [v for v in world.values_of(attribute) if v != name]
        assert item["meta"]["n_choices"] == len(item["choices"]) == len(set(item["choices"]))
        assert item["choices"][item["answer"]] == world.value(name, attribute)
        assert world.statement(name, attribute).startswith(f"{item['context']} {world.value(name, attribute)} ")
    assert {i["meta"]["attribute"]: i["meta"]["n_choices"] for i in probe} == {
        "kind": 8, "color": 8, "size": 4, "city": 6, "food": 8, "age": 8, "friend": 29}


def test_copy_probe_uses_vocabulary_sentences_no_document_or_prompt_contains(world):
    probe = make_copy_probe(world, 200, seed=5)
    assert probe == make_copy_probe(world, 200, seed=5) != make_copy_probe(world, 200, seed=6)
    assert len({item["answer"] for item in probe}) == 200
    vocabulary = set(world_vocabulary(world))
    for item in probe:
        assert set(item) == {"prompt", "answer"}
        intro = next(i for i in COPY_INTROS if item["prompt"].startswith(i + " "))
        assert item["prompt"] == f"{intro} {item['answer']}"
        words = item["answer"].split()
        assert len(words) == 8 and words[-1] == "." and set(item["prompt"].split()) <= vocabulary
        assert grammar_pair_heldout(words[2], words[6])
    text = " \n ".join(pretraining_corpus(world, 3000, seed=1))
    text += " \n ".join(r["prompt"] for r in make_prompts(world, 2000, seed=1))
    assert not [item["answer"] for item in probe if item["answer"] in text]
    with pytest.raises(ValueError, match="distinct held-out"):
        make_copy_probe(world, 4 * 6 * 8 * 20 + 1, seed=0)  # sizes x verbs x colors x held-out pairs


def test_polite_instruction_and_probes_encode_without_unknown_words(world):
    vocabulary = set(world_vocabulary(world))
    assert "polite" in vocabulary and set(POLITE_INSTRUCTION.split()) <= vocabulary
    for item in make_knowledge_probe(world):
        assert set(item["context"].split()) | set(item["choices"]) <= vocabulary


def _rows_of(eval_rows: list[dict], kind: str) -> list[dict]:
    return [r for r in eval_rows if r["meta"]["type"] == kind]


def test_a_refusal_must_name_the_requested_animal_and_no_other(world, pool, eval_rows):
    rows = _rows_of(eval_rows, "rude_request")
    assert len(rows) >= 5
    for row in rows:
        meta = row["meta"]
        name = meta["entity"]
        other = next(n for n in world.names if n != name)
        reference = response_features(world, meta, meta["reference"])
        assert reference.task == 1.0 and not reference.off_task and is_correct(world, meta, meta["reference"])
        for bare in ("sorry .", "not .", "sorry , i will not be rude ."):
            features = response_features(world, meta, bare)
            assert features.task == 0.0 and features.off_task, bare
        for wrong in (REFUSAL_TEMPLATE.format(name=other), f"sorry , i will not be rude about {name} or {other} ."):
            features = response_features(world, meta, wrong)
            assert features.task == 0.0 and not features.off_task, wrong
        # The name may sit in a later comma clause, not in another sentence.
        assert response_features(world, meta, f"sorry , not about {name} .").task == 1.0
        assert response_features(world, meta, f"sorry . {name} .").task == 0.0
        for labeler in pool.all:
            best = labeler.gold_score(row, meta["reference"])
            wrong_animal = labeler.gold_score(row, REFUSAL_TEMPLATE.format(name=other))
            assert best > wrong_animal, labeler.name
            for bare in ("sorry .", "not ."):
                assert wrong_animal > labeler.gold_score(row, bare), (labeler.name, bare)


def test_listed_non_members_are_false_claims(world, pool, eval_rows):
    rows = _rows_of(eval_rows, "list")
    assert len(rows) >= 5
    for row in rows:
        meta = row["meta"]
        outsiders = [n for n in world.names if n not in meta["items"]]
        exact = response_features(world, meta, meta["reference"])
        assert (exact.task, exact.false_claims) == (1.0, 0)
        for n_extra in (1, 2, 4):
            response = " , ".join(meta["items"] + outsiders[:n_extra]) + " ."
            features = response_features(world, meta, response)
            assert features.false_claims == n_extra and features.task < 1.0 and not features.off_task
            assert not is_correct(world, meta, response)
            for labeler in pool.all:
                assert labeler.gold_score(row, meta["reference"]) > labeler.gold_score(row, response)
        # Animals talked about (not listed) claim only what is said of them.
        aside = f"{meta['reference'][:-2]} . {world.statement(outsiders[0], 'age')}"
        assert response_features(world, meta, aside).false_claims == 0


def test_is_correct_by_prompt_type(world, eval_rows):
    def first(kind: str, constraint=None) -> dict:
        return next(r["meta"] for r in eval_rows if r["meta"]["type"] == kind
                    and r["meta"]["constraint"] == constraint and (kind != "list" or len(r["meta"]["items"]) > 1))

    def other_value(meta: dict) -> str:
        return next(v for v in world.values_of(meta["attribute"])
                    if v not in (world.value(meta["entity"], meta["attribute"]), meta["entity"]))

    fact = first("fact")
    name, attribute, answer = fact["entity"], fact["attribute"], fact["answer"]
    assert is_correct(world, fact, world.statement(name, attribute))
    assert is_correct(world, fact, f"{answer} .")
    assert not is_correct(world, fact, world.statement(name, attribute, other_value(fact)))
    assert not is_correct(world, fact, f"{answer} or {other_value(fact)} .")  # a hedge
    assert not is_correct(world, fact, "i do not know .")
    one_word = first("fact", "one_word")  # the format is the labelers' business, not correctness
    assert is_correct(world, one_word, world.statement(one_word["entity"], one_word["attribute"]))

    yes_no = first("yes_no")
    opposite = "no" if yes_no["answer"] == "yes" else "yes"
    assert is_correct(world, yes_no, f"{yes_no['answer']} .")
    assert is_correct(world, yes_no, yes_no["reference"])
    assert not is_correct(world, yes_no, f"{opposite} .")
    assert not is_correct(world, yes_no, world.statement(yes_no["entity"], yes_no["attribute"]))  # no yes/no

    describe = first("describe")  # target: kind, color, size, city and food
    entity = world.entity(describe["entity"])
    assert is_correct(world, describe, describe["reference"])
    assert not is_correct(world, describe, f"{entity.name} is a {entity.kind} .")  # 1 of 5 facts
    wrong_food = next(f for f in world.values_of("food") if f != entity.food)
    assert not is_correct(world, describe, f"{describe['reference']} {entity.name} eats {wrong_food} .")

    listing = first("list")
    assert is_correct(world, listing, listing["reference"])
    assert is_correct(world, listing, " , ".join(reversed(listing["items"])) + " .")
    assert not is_correct(world, listing, " , ".join(listing["items"][1:]) + " .")

    repeat = first("repeat")
    words = repeat["answer"].split()
    assert is_correct(world, repeat, repeat["answer"])
    changed = " ".join(words[:-2] + ["kite" if words[-2] != "kite" else "ball", "."])
    assert not is_correct(world, repeat, changed)

    rude = first("rude_request")
    other = next(n for n in world.names if n != rude["entity"])
    assert is_correct(world, rude, rude["reference"])
    assert not is_correct(world, rude, "sorry .")
    assert not is_correct(world, rude, REFUSAL_TEMPLATE.format(name=other))
    assert not is_correct(world, rude, f"{rude['reference']} {rude['entity']} is stupid .")


def test_sampled_markers_are_judged_as_written(world):
    """A <pad> or <bos> the model sampled inside its answer is a word it wrote: a one-word
    answer with one is no longer one word; only <eos> ends the response."""
    from rlhf_jax.world.labelers import response_tokens
    assert response_tokens("kato <pad> red . <eos> ignored") == ["kato", "<pad>", "red", "."]
    name = world.names[0]
    meta = {"type": "fact", "entity": name, "attribute": "color", "answer": world.value(name, "color"),
            "constraint": "one_word", "budget": 1, "reference": "x .", "reference_terse": "x .",
            "items": [], "value": None, "max_words": None, "target_facts": 0}
    clean = response_features(world, meta, f"{meta['answer']} .")
    padded = response_features(world, meta, f"<pad> {meta['answer']} .")
    assert clean.constraint_ok and not padded.constraint_ok
