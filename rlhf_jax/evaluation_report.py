"""`rlhf-jax eval`: evaluate every model of a pipeline workdir and write the results.

Models: ``base`` (the pretrained LM), ``base_prompted`` (the same with a few-shot prefix of
demonstrations), ``sft``, ``ppo`` and ``ppo_ptx``, and ``ppo_ema`` / ``ppo_ptx_ema`` (the policy
weights' EMA, the paper's decay 0.992) where PPO saved them; ``dpo``, ``grpo`` and ``rloo`` (the
other methods from the same SFT / RM) where the pipeline trained them, and ``grpo_ema`` /
``rloo_ema`` where those kept an EMA. KL is measured to ``sft`` for every model (DPO's own
reference) and, for the PPO-engine models (ppo, ppo_ptx, grpo, rloo and their EMAs), also to the
policy they started from and were penalized against (``sft_ptx``).

With the labeler world, gold scores are also reported per kind of instruction, with the share of
responses that do not attempt it; the floor policies (``rlhf_jax.world.floors``: fixed rules such
as always abstaining) are judged like the models, and a model counts as preferred to SFT only if
it also beats every floor; each model's and floor's behaviour (``rlhf_jax.behaviour``: correct,
off task, collapsed to one response, hallucinating, rude with and without a request to be polite)
and knowledge / copy probes of the world are reported beside, with the seed note's highlights
(``rlhf_jax.highlights``: truthfulness on the world's myths, toxicity, bias, two-hop questions,
false premises, Fig. 4's metadata and PPO-ptx against the base LM head to head).

Writes ``results.json`` (with the machine and package versions), ``results.md`` and PNG plots
into the workdir, and every response to every eval prompt to ``eval/responses.jsonl``; the workdir
may be a URL (``rlhf_jax.storage``). Every process of a multi-host job evaluates (the generation
and scoring are collective); only process 0 writes.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import logging
import os
import platform
from typing import Any

import numpy as np

from rlhf_jax import behaviour, highlights, registry, storage
from rlhf_jax import evaluation as ev
from rlhf_jax.data import read_jsonl
from rlhf_jax.distributed import is_main
from rlhf_jax.errors import UserError
from rlhf_jax.world.export import read_jsonl as read_plain_jsonl
from rlhf_jax.metrics import format_table, plot_curves, plot_win_rates, progress

log = logging.getLogger(__name__)

# The models and where they live come from rlhf_jax.registry's stages: base / base_prompted
# (pretrain's model), sft, ppo, ppo_ptx and their EMAs, then the methods and their EMAs.
METHODS = registry.METHOD_STAGES                # other methods from the same SFT / RM
MODELS = tuple(registry.EVAL_MODELS)
# name -> (stage directory, model subdirectory)
MODEL_DIRS = dict(registry.EVAL_MODELS)
# Only when their directory exists: the stage kept an EMA, or the pipeline trained the method.
OPTIONAL_MODELS = tuple(name for name, (stage, sub) in MODEL_DIRS.items()
                        if sub == registry.EMA_DIR or registry.STAGES[stage].method)
PPO_INIT = registry.STAGES["ppo"].models_from["policy_from"]   # PPO's policy init, KL reference
# Models trained from PPO_INIT and penalized against it (DPO's reference is SFT itself).
FROM_PPO_INIT = tuple(name for name, (stage, _) in MODEL_DIRS.items()
                      if registry.STAGES[stage].models_from.get("policy_from") == PPO_INIT)
COPY_PROBE_ITEMS = 100
VERSIONED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")
# The stage whose wall time trained each model (results' stage_seconds): the RL and preference
# stages (ppo, ppo_ptx and the methods).
TRAINED_BY = {name: name for name in registry.ALL_STAGES
              if registry.STAGES[name].kind in ("ppo", "dpo")}


def few_shot_prefix(demonstrations: list[dict], n_shots: int) -> str:
    """The shortest demonstrations, rendered as the instruction format, as a prompt prefix."""
    chosen = sorted(demonstrations, key=lambda r: len(r["prompt"]) + len(r["completion"]))[:n_shots]
    return " ".join(f"{r['prompt']} {r['completion']}" for r in chosen)


def machine_info() -> dict[str, Any]:
    """The CPU and accelerators the evaluation ran on (timings in the report depend on them)."""
    cpu = ""
    if os.path.exists("/proc/cpuinfo"):      # Linux; elsewhere platform's answer stands in
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), "")
    info: dict[str, Any] = {"cpu": cpu or platform.processor() or platform.machine(),
                            "logical_cores": os.cpu_count()}
    import jax
    devices = jax.devices()
    info["accelerator"] = {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
                           "count": len(devices)}
    return info


def package_versions() -> dict[str, str | None]:
    """Python's and the numerical packages' versions (None: not installed)."""
    import rlhf_jax
    out: dict[str, str | None] = {"python": platform.python_version(),
                                  "rlhf_jax": rlhf_jax.__version__}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _longest_prompt(tokenizer: Any, texts: list[str]) -> int:
    return max([1] + [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]])


def _win_rates(prompt_rows, texts, baseline, pool, seed: int) -> dict[str, dict]:
    """Win rates against ``baseline`` by each labeler group; a group's seed is fixed, so every
    model and floor meets the same draw of labelers."""
    return {group: ev.win_rate(prompt_rows, texts, baseline, labelers, seed=seed + offset)
            for offset, (group, labelers) in enumerate((("train_labelers", pool.training),
                                                        ("heldout_labelers", pool.heldout)))}


def _gold(prompt_rows, texts, labelers) -> tuple[dict, float]:
    by_kind = ev.gold_score_by_category(prompt_rows, texts, labelers)
    return by_kind, (sum(v["mean"] * v["n"] for v in by_kind.values())
                     / sum(v["n"] for v in by_kind.values()))


def write_responses(workdir: str, prompts: list[str], responses: dict[str, list[str]]) -> str:
    """``eval/responses.jsonl``: one row per model (or floor) and eval prompt (process 0 writes
    it; every process gets its path)."""
    path = storage.join(workdir, "eval", "responses.jsonl")
    if is_main():
        lines = [json.dumps({"model": name, "prompt": p, "response": r})
                 for name, texts in responses.items() for p, r in zip(prompts, texts)]
        storage.write_text(path, "".join(line + "\n" for line in lines))
    return path


def _model_dir_exists(path: str) -> bool:
    """A model directory, or a Hub id the local Hugging Face cache holds."""
    from rlhf_jax.models.hf import ModelNotFoundError, resolve_model_path
    try:
        return storage.isdir(resolve_model_path(path))
    except ModelNotFoundError:
        return False


def _unfinished(workdir: str, stage: str, sub: str | None = None) -> str | None:
    """Why ``stage`` has no usable output in ``workdir`` (None: its DONE marker and, with
    ``sub``, its model directory ``sub`` exist). The marker is written after the stage's last
    file, so a stage killed midway, or rerunning, has none."""
    marker = storage.join(workdir, stage, "DONE")
    if not storage.exists(marker):
        return f"{stage} has not finished: {marker} missing"
    if sub and not storage.isdir(storage.join(workdir, stage, sub)):
        return f"{storage.join(workdir, stage, sub)} missing"
    return None


def plan(cfg: Any, workdir: str, files: dict[str, str]) -> dict[str, Any]:
    """What `rlhf-jax eval` can evaluate in a (partly) finished pipeline ``workdir``, decided
    before anything loads: ``models`` to evaluate, ``skipped`` (what, and why), and whether the
    RM (``rm``: RM scores), its pair accuracy (``rm_accuracy``) and the PPO init (``ppo_init``)
    are there. Raises UserError for what no evaluation can do without: the world, the data it
    reads, the SFT model every measure compares with, a reference model the config names."""
    e = cfg.eval
    needed = {"world": None} if cfg.world.enabled else {}
    needed["sft"] = MODEL_DIRS["sft"][1]
    for stage, sub in needed.items():
        why = _unfinished(workdir, stage, sub)
        if why:
            raise UserError(f"eval {workdir}: {why}; every measure needs it: run `rlhf-jax "
                            "pipeline` on this workdir until it has")
    for key in ("eval_prompts", "sft", "capability_mc", "capability_qa", "comparisons_test"):
        if key in files and not storage.exists(files[key]):
            raise UserError(f"eval: data.{key}={files[key]!r}: not found; expected the JSONL "
                            "file eval reads")
    for key in ("reference_sft", "reference_base"):
        if e.get(key) and not storage.isdir(e[key]):
            raise UserError(f"eval.{key}={e[key]!r}: no such model directory")
    if e.get("models") is not None:      # a sweep point evaluates only what it trained
        unknown = sorted(set(e.models) - set(MODELS))
        if unknown:
            raise UserError(f"eval.models: {unknown} are not models; expected some of {list(MODELS)}")

    methods = set(cfg.get("methods") or ())
    skipped: dict[str, str] = {}
    models = []
    for name in MODELS:
        stage, sub = MODEL_DIRS[name]
        if stage == registry.BASE_STAGE and cfg.get("base_model"):
            why = None if _model_dir_exists(cfg.base_model) else \
                f"base_model={cfg.base_model!r} missing"
        else:
            why = _unfinished(workdir, stage, sub)
        # An EMA the stage did not keep, or a method the run was not asked for, is no model.
        expected = name not in OPTIONAL_MODELS or storage.isdir(storage.join(workdir, stage, sub)) \
            or (sub != registry.EMA_DIR and stage in methods)
        if why is None:
            models.append(name)
        elif expected:
            skipped[name] = why
    if e.get("models") is not None:
        wanted = set(e.models) | ({"sft"} if e.models else set())   # win rates need SFT's answers
        models = [m for m in models if m in wanted]
        skipped = {m: why for m, why in skipped.items() if m in wanted}
    rm_missing = _unfinished(workdir, "rm", registry.STAGES["rm"].model_dir)
    rm_accuracy = rm_missing is None
    if rm_missing:
        skipped["RM scores and RM pair accuracy"] = rm_missing
    elif cfg.world.enabled:
        tests = [storage.join(workdir, "comparisons", f"test_{group}.jsonl")
                 for group in ("train_labelers", "heldout_labelers")]
        absent = [path for path in tests if not storage.exists(path)]
        if absent:
            rm_accuracy = False
            skipped["RM pair accuracy"] = f"{absent[0]} missing"
    return {"models": models, "skipped": skipped, "rm": rm_missing is None,
            "rm_accuracy": rm_accuracy,
            "ppo_init": _unfinished(workdir, PPO_INIT, registry.STAGES[PPO_INIT].model_dir) is None}


def evaluate_pipeline(cfg: Any, workdir: str, files: dict[str, str]) -> dict[str, Any]:
    """Evaluate every model that finished in ``workdir`` (``plan``: what is skipped, and why, is
    logged and kept in the results' ``skipped``)."""
    from rlhf_jax.model_io import load_model
    from rlhf_jax.runtime import setup_mesh
    from rlhf_jax.world import load_world
    from rlhf_jax.world.floors import FLOORS, floor_responses

    e = cfg.eval
    todo = plan(cfg, workdir, files)
    for what, why in todo["skipped"].items():
        log.warning("eval: skipping %s: %s", what, why)
    models = todo["models"]
    mesh = setup_mesh(cfg.sft)
    # Labelers exist only in the built-in world; on real data the report keeps the RM score, KL,
    # capability (when its files are given) and RM accuracy on a held-out comparisons file.
    world, pool = load_world(files["world"]) if cfg.world.enabled else (None, None)
    prompt_rows = read_jsonl(files["eval_prompts"], "prompts")[: e.n_prompts]
    prompts = [row["prompt"] for row in prompt_rows]
    prefix = few_shot_prefix(read_jsonl(files["sft"], "demonstrations"), e.few_shot)
    mc_items = read_plain_jsonl(files["capability_mc"])[: e.n_capability] if "capability_mc" in files else []
    qa_items = read_plain_jsonl(files["capability_qa"])[: e.n_capability] if "capability_qa" in files else []
    polite_rows = behaviour.polite_probe_rows(prompt_rows) if world is not None else []
    if world is not None:
        from rlhf_jax.world.capability import make_copy_probe, make_knowledge_probe
        from rlhf_jax.world.probes import highlight_probes
        knowledge_items = make_knowledge_probe(world)
        copy_items = make_copy_probe(world, COPY_PROBE_ITEMS, cfg.seed)
        probes = highlight_probes(world, cfg.seed)
        # One generation call per model for every probe set (one compiled shape).
        probe_rows = [row for rows in probes.values() for row in rows]

    def load(stage: str, sub: str = "model"):
        if stage == "pretrain" and cfg.get("base_model"):
            return load_model(cfg.base_model, mesh)
        return load_model(storage.join(workdir, stage, sub), mesh)
    sft_model, sft_params, tokenizer, _ = load("sft")
    init_params = load(PPO_INIT)[1] if todo["ppo_init"] else sft_params
    if todo["rm"]:
        rm, rm_params, _, rm_extra = load("rm")
        norm = rm_extra.get("reward_norm") or {}
    max_p, max_r = cfg.rm.data.max_prompt_len, cfg.rm.data.max_response_len
    # The polite prompts keep the whole original prompt: their length grows by the instruction's.
    polite_extra = _longest_prompt(tokenizer, [behaviour.POLITE_INSTRUCTION]) if polite_rows else 0
    if world is not None:      # never cut: a copy of half a sentence is no copy
        probe_prompt_len = max(max_p, _longest_prompt(tokenizer, [r["prompt"] for r in probe_rows]))
        copy_prompts = [item["prompt"] for item in copy_items]
        copy_prompt_len = _longest_prompt(tokenizer, copy_prompts)

    results: dict[str, Any] = {"win_rate_vs_sft": {}, "capability": {}, "kl_to_sft": {},
                               "kl_to_ppo_init": {}, "gold_score": {}, "gold_by_category": {},
                               "proxy_score": {}, "samples": {}, "skipped": todo["skipped"],
                               "machine": machine_info(), "versions": package_versions()}
    if world is not None:
        results.update(behaviour={}, floors={}, knowledge_probe={}, copy_probe={})
    responses: dict[str, list[str]] = {}
    probe_responses: dict[str, dict[str, list[str]]] = {}
    # Win rates are against this workdir's SFT, or against the model ``eval.reference_sft``
    # names (the model-size axis compares every size with the largest SFT, as Fig. 1 does).
    reference = e.get("reference_sft") or ""
    if reference and models and pool is not None:
        ref_model, ref_params = load_model(reference, mesh)[:2]
        responses["reference"] = ev.generate_texts(
            ref_model, ref_params, tokenizer, prompt_rows, max_prompt_len=max_p,
            max_new_tokens=max_r, temperature=e.temperature, seed=cfg.seed, mesh=mesh)["texts"]
        results["win_rate_reference"] = reference
    # Fig. 1's headline is a head-to-head: PPO-ptx against the base LM of another size
    # (``eval.reference_base``, the sizes sweep's largest) as well as its own.
    reference_base = e.get("reference_base") or ""
    if reference_base and "ppo_ptx" in models and pool is not None:
        ref_model, ref_params = load_model(reference_base, mesh)[:2]
        responses["reference_base"] = ev.generate_texts(
            ref_model, ref_params, tokenizer, prompt_rows, max_prompt_len=max_p,
            max_new_tokens=max_r, temperature=e.temperature, seed=cfg.seed, mesh=mesh)["texts"]
        results["head_to_head_reference_base"] = reference_base
    for name in progress(models, desc="eval", unit="model"):
        model, params = (sft_model, sft_params) if name == "sft" else load(*MODEL_DIRS[name])[:2]
        prompted = name == "base_prompted"
        model_prompts = [f"{prefix} {p}" for p in prompts] if prompted else prompt_rows
        prompt_len = e.prompted_max_prompt_len if prompted else max_p
        samples = ev.generate_texts(model, params, tokenizer, model_prompts, max_prompt_len=prompt_len,
                                    max_new_tokens=max_r, temperature=e.temperature, seed=cfg.seed,
                                    mesh=mesh)
        responses[name] = samples["texts"]
        results["kl_to_sft"][name] = ev.kl_to_reference(model, params, sft_params, samples, mesh)
        if name in FROM_PPO_INIT:
            results["kl_to_ppo_init"][name] = ev.kl_to_reference(model, params, init_params,
                                                                 samples, mesh)
        if todo["rm"]:
            results["proxy_score"][name] = float(np.mean(ev.score_texts(
                rm, rm_params, norm, tokenizer, prompt_rows, samples["texts"],
                max_prompt_len=max_p, max_response_len=max_r, mesh=mesh)))
        if pool is not None:
            results["gold_by_category"][name], results["gold_score"][name] = _gold(
                prompt_rows, samples["texts"], pool.heldout)
        if world is not None:
            polite = []
            if polite_rows:
                polite = ev.generate_texts(
                    model, params, tokenizer,
                    [f"{prefix} {r['prompt']}" for r in polite_rows] if prompted else polite_rows,
                    max_prompt_len=prompt_len + polite_extra, max_new_tokens=max_r,
                    temperature=e.temperature, seed=cfg.seed, mesh=mesh)["texts"]
            if not prompted:
                texts = ev.generate_texts(model, params, tokenizer, probe_rows,
                                          max_prompt_len=probe_prompt_len, max_new_tokens=max_r,
                                          temperature=e.temperature, seed=cfg.seed, mesh=mesh)["texts"]
                probe_responses[name], start = {}, 0
                for probe, rows in probes.items():
                    probe_responses[name][probe] = texts[start:start + len(rows)]
                    start += len(rows)
            results["behaviour"][name] = behaviour.behaviour_metrics(
                world, prompt_rows, samples["texts"], polite)
        if world is not None and not prompted:     # the prefix would only get in the probes' way
            results["knowledge_probe"][name] = {
                "accuracy": ev.multiple_choice_accuracy(
                    model, params, tokenizer, knowledge_items,
                    max_prompt_len=e.capability_max_prompt_len, mesh=mesh),
                "n": len(knowledge_items), "chance": behaviour.knowledge_chance(knowledge_items)}
            copied = ev.generate_texts(
                model, params, tokenizer, copy_prompts, max_prompt_len=copy_prompt_len,
                max_new_tokens=behaviour.copy_probe_new_tokens(copy_items), greedy=True,
                mesh=mesh)["texts"]
            results["copy_probe"][name] = behaviour.copy_exact(copy_items, copied)
        if not prompted and mc_items and qa_items:
            mc = ev.multiple_choice_accuracy(model, params, tokenizer, mc_items,
                                             max_prompt_len=e.capability_max_prompt_len, mesh=mesh)
            qa = ev.qa_exact_match(model, params, tokenizer, qa_items,
                                   max_prompt_len=e.capability_max_prompt_len, mesh=mesh)
            results["capability"][name] = {"score": (mc + qa) / 2, "multiple_choice": mc,
                                           "qa_exact_match": qa}
        results["samples"][name] = [{"prompt": p, "response": r}
                                    for p, r in zip(prompts[:5], samples["texts"][:5])]
        proxy = results["proxy_score"].get(name)
        log.info("evaluated %s: proxy %s, KL %.3f", name,
                 "n/a (no RM)" if proxy is None else f"{proxy:.3f}", results["kl_to_sft"][name])
    if "base" in results["capability"]:
        results["capability"]["base_prompted"] = results["capability"]["base"]
    results["capability_score"] = {k: v["score"] for k, v in results["capability"].items()}
    results["rm_accuracy"] = {}
    if pool is None:
        write_responses(workdir, prompts, responses)
        if files.get("comparisons_test") and todo["rm"]:
            rows = read_jsonl(files["comparisons_test"], "comparisons")
            results["rm_accuracy"]["test"] = ev.rm_pair_accuracy(
                rm, rm_params, tokenizer, rows, max_prompt_len=max_p, max_response_len=max_r,
                mesh=mesh)["accuracy"]
        return results

    baseline = responses.get("reference", responses.get("sft"))
    for name in models:
        by_group = _win_rates(prompt_rows, responses[name], baseline, pool, cfg.seed)
        results["win_rate_vs_sft"][name] = {
            "train_labelers": by_group["train_labelers"]["rate"],
            "heldout_labelers": by_group["heldout_labelers"]["rate"],
            "ci95": {g: by_group[g]["ci95"] for g in by_group}, "n": by_group["heldout_labelers"]["n"]}
    # The floors meet the same baseline, labelers and seeds as the models: what a rule that
    # knows nothing of the world wins is the bar a trained model has to clear.
    for floor in FLOORS if baseline is not None else ():
        texts = responses[floor] = floor_responses(floor, prompt_rows)
        by_group = _win_rates(prompt_rows, texts, baseline, pool, cfg.seed)
        results["floors"][floor] = {
            "win_heldout": by_group["heldout_labelers"]["rate"],
            "win_heldout_ci": by_group["heldout_labelers"]["ci95"],
            "win_train": by_group["train_labelers"]["rate"],
            "win_train_ci": by_group["train_labelers"]["ci95"],
            "gold": _gold(prompt_rows, texts, pool.heldout)[1]}
        results["behaviour"][floor] = behaviour.behaviour_metrics(
            world, prompt_rows, texts, floor_responses(floor, polite_rows))
    write_responses(workdir, prompts, responses)
    results["highlights"] = highlights.highlights(
        world, prompt_rows, {m: responses[m] for m in models}, results["behaviour"],
        win_rates=lambda rows, ours, theirs: _win_rates(rows, ours, theirs, pool, cfg.seed),
        probes=probes, probe_responses=probe_responses, heldout_labelers=pool.heldout,
        references={k: responses[k] for k in ("reference_base",) if k in responses})

    groups = ((("train_labelers", pool.training), ("heldout_labelers", pool.heldout))
              if todo["rm_accuracy"] else ())
    for group, labelers in groups:
        rows = read_jsonl(storage.join(workdir, "comparisons", f"test_{group}.jsonl"),
                          "comparisons")
        acc = ev.rm_pair_accuracy(rm, rm_params, tokenizer, rows, max_prompt_len=max_p,
                                  max_response_len=max_r, mesh=mesh)
        results["rm_accuracy"][group] = acc["accuracy"]
        results["rm_accuracy"][f"{group}_n_pairs"] = acc["n_pairs"]
        results.setdefault("rm_accuracy_by_kind", {})[group] = acc["by_kind"]
        results["rm_accuracy"][f"{group}_ceiling"] = ev.noise_free_accuracy(rows, labelers)
        # What the RM could have read off its own initialization: SFT's likelihood as a scorer.
        sft_lik = ev.likelihood_pair_accuracy(sft_model, sft_params, tokenizer, rows,
                                              max_prompt_len=max_p, max_response_len=max_r,
                                              mesh=mesh)
        results["rm_accuracy"][f"{group}_sft_likelihood"] = sft_lik["accuracy"]
        results.setdefault("sft_likelihood_accuracy_by_kind", {})[group] = sft_lik["by_kind"]
    # Leave-one-group-out: the RM never saw this labeler group's rankings.
    held_group = storage.join(workdir, "rm", "comparisons_holdout_group.jsonl")
    if todo["rm"] and storage.exists(held_group):
        rows = read_jsonl(held_group, "comparisons")
        acc = ev.rm_pair_accuracy(rm, rm_params, tokenizer, rows, max_prompt_len=max_p,
                                  max_response_len=max_r, mesh=mesh)
        results["rm_accuracy"]["holdout_group"] = acc["accuracy"]
        results["rm_accuracy"]["holdout_group_n_pairs"] = acc["n_pairs"]
        results["rm_accuracy"]["holdout_group_ceiling"] = ev.noise_free_accuracy(rows, pool.training)
    return results


def results_table(results: dict[str, Any]) -> str:
    """The headline table, one row per model."""
    rows = []
    skipped = results.get("skipped", {})
    for name in MODELS:
        if name in skipped or (name in OPTIONAL_MODELS and name not in results.get("kl_to_sft", {})):
            continue
        win = results.get("win_rate_vs_sft", {}).get(name, {})
        ci = win.get("ci95", {}).get("heldout_labelers", [np.nan, np.nan])
        rows.append({
            "model": name,
            "win vs SFT (held-out)": win.get("heldout_labelers", np.nan),
            "95% CI": f"[{ci[0]:.2f}, {ci[1]:.2f}]",
            "win vs SFT (train)": win.get("train_labelers", np.nan),
            "gold score": results.get("gold_score", {}).get(name, np.nan),
            "RM score": results.get("proxy_score", {}).get(name, np.nan),
            "KL to SFT": results.get("kl_to_sft", {}).get(name, np.nan),
            "KL to PPO init": results.get("kl_to_ppo_init", {}).get(name, np.nan),
            "capability": results.get("capability_score", {}).get(name, np.nan),
        })
    acc = results.get("rm_accuracy", {})
    accuracy = ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in acc.items()
                         if not k.endswith("n_pairs"))
    footer = (f"\nRM pair accuracy: {accuracy or 'n/a'}"
              f"\nwall time: {results.get('wall_seconds', np.nan):.0f} s")
    if skipped:     # a partly finished workdir: what the table leaves out, and why
        footer += "\nskipped: " + "; ".join(f"{what} ({why})" for what, why in skipped.items())
    seconds = results.get("stage_seconds", {})
    if any(name in seconds for name in METHODS):     # methods compared: what each one cost
        footer += "\ntraining time: " + ", ".join(
            f"{name} {seconds[stage]:.0f} s" for name, stage in TRAINED_BY.items()
            if stage in seconds)
    return format_table(rows) + footer


def category_table(results: dict[str, Any]) -> str:
    """Held-out labelers' mean gold score per kind of instruction (and the share of responses
    that do not attempt it), one row per model: a win that rests on one kind of prompt shows."""
    rows = []
    for name, by_kind in results.get("gold_by_category", {}).items():
        row = {"model": name}
        for kind, v in by_kind.items():
            row[kind] = f"{v['mean']:+.2f} ({v['off_task']:.0%} off)"
        rows.append(row)
    return format_table(rows) if rows else ""


def floors_table(results: dict[str, Any]) -> str:
    """Each floor policy's win rates against SFT and gold score, the bar under the models."""
    rows = [{"floor": name, "win vs SFT (held-out)": f["win_heldout"],
             "95% CI": f"[{f['win_heldout_ci'][0]:.2f}, {f['win_heldout_ci'][1]:.2f}]",
             "win vs SFT (train)": f["win_train"],
             "95% CI (train)": f"[{f['win_train_ci'][0]:.2f}, {f['win_train_ci'][1]:.2f}]",
             "gold score": f["gold"]}
            for name, f in results.get("floors", {}).items()]
    return format_table(rows) if rows else ""


def _share(metric: dict[str, Any] | None) -> str:
    if not metric or metric["share"] is None:
        return "n/a"
    return f"{metric['share']:.0%}"


def behaviour_table(results: dict[str, Any]) -> str:
    """One row per model and floor: what its responses do (``rlhf_jax.behaviour``)."""
    rows = []
    for name, b in results.get("behaviour", {}).items():
        rude = b.get("rude_share", {})
        rows.append({
            "model": name, "correct": _share(b["correct_share"]),
            "off-task": _share(b["off_task_share"]), "abstain": _share(b["abstain_share"]),
            "top response": f"{_share(b['top_response_share'])} {b['top_response']!r}",
            "hallucination": _share(b["hallucination_rate"]),
            "hallucination (attempted)": _share(b["hallucination_rate_attempted"]),
            "constraint ok": _share(b["constraint_ok_share"]),
            "refusal correct": _share(b["refusal_correct_share"]),
            "rude": _share(rude.get("without")), "rude (polite asked)": _share(rude.get("with_polite")),
        })
    return format_table(rows, max_width=40) if rows else ""


def highlights_report(hl: dict[str, Any]) -> str:
    """The highlights tables and one line per head-to-head pair."""
    out = format_table(highlights.highlights_table(hl))
    probe_rows = highlights.probes_table(hl)
    if probe_rows:
        out += "\n\nProbes outside the eval prompts (world/probes.py):\n\n" + format_table(probe_rows)
    for pair, by_group in hl.get("head_to_head", {}).items():
        out += f"\n\n{pair.replace('_vs_', ' vs ')} head to head: " + ", ".join(
            f"{g.replace('_', ' ')} {v['rate']:.3f} [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]"
            for g, v in by_group.items())
    return out


def probe_table(results: dict[str, Any]) -> str:
    """World-knowledge multiple choice (against chance) and copying, per model."""
    knowledge, copy = results.get("knowledge_probe", {}), results.get("copy_probe", {})
    rows = [{"model": name,
             "knowledge accuracy": knowledge[name]["accuracy"] if name in knowledge else np.nan,
             "chance": knowledge[name]["chance"] if name in knowledge else np.nan,
             "copy exact": copy[name]["exact"] if name in copy else np.nan}
            for name in dict.fromkeys([*knowledge, *copy])]
    return format_table(rows) if rows else ""


def finding_checks(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The paper's findings that this run's results can decide, each as ``{"claim", "value",
    "holds"}`` (``value`` is the number that decides it); a sweep over seeds tallies them."""
    win = results.get("win_rate_vs_sft", {})
    cap = results.get("capability_score", {})
    acc = results.get("rm_accuracy", {})
    gold = results.get("gold_by_category", {})
    out: dict[str, dict[str, Any]] = {}

    floors = results.get("floors", {})
    top_floor = max(floors, key=lambda f: floors[f]["win_heldout"]) if floors else None

    def add(key: str, claim: str, value: float, holds: bool, detail: str = "") -> None:
        out[key] = {"claim": claim, "value": float(value), "holds": bool(holds)}
        if detail:      # run-specific numbers stay out of the claim, which a sweep tallies by
            out[key]["detail"] = detail
    if "train_labelers" in acc:
        add("rm_accuracy", "RM pair accuracy >= 0.70 on training labelers (paper 72.4%)",
            acc["train_labelers"], acc["train_labelers"] >= 0.70)
        add("rm_heldout_gap", "held-out labelers' RM accuracy within 5 points below training "
            "labelers' (paper 69.6 vs 72.4)", acc["heldout_labelers"] - acc["train_labelers"],
            -0.05 <= acc["heldout_labelers"] - acc["train_labelers"] <= 0.01)
        ceiling = acc.get("train_labelers_ceiling")
        if ceiling and math.isfinite(ceiling):
            add("rm_near_ceiling", "RM pair accuracy >= 0.85 of the labelers' noise-free ceiling "
                "(training labelers; value: the ratio)", acc["train_labelers"] / ceiling,
                acc["train_labelers"] >= 0.85 * ceiling)
    if "holdout_group" in acc:
        add("rm_holdout_group", "RM accuracy on an unseen training-labeler group >= 0.70",
            acc["holdout_group"], acc["holdout_group"] >= 0.70)
    if "base" in win:
        add("sft_beats_base", "SFT preferred to the base LM (base's held-out win rate < 0.5)",
            win["base"]["heldout_labelers"], win["base"]["heldout_labelers"] < 0.5)
    for name in TRAINED_BY:
        if name in win:
            # A win that a fixed rule also gets (always abstaining, always "no .") is the labelers'
            # blind spot, not the model's skill: the model must beat the best floor as well.
            rate = win[name]["heldout_labelers"]
            both = min(win[name]["ci95"][g][0] for g in ("train_labelers", "heldout_labelers"))
            above = all(rate > f["win_heldout"] for f in floors.values())
            detail = (f"95% CI lower bounds: train {win[name]['ci95']['train_labelers'][0]:.3f}, "
                      f"held-out {win[name]['ci95']['heldout_labelers'][0]:.3f}; "
                      + (f"highest floor {top_floor} {floors[top_floor]['win_heldout']:.3f}"
                         if floors else "no floors evaluated"))
            add(f"{name}_beats_sft", f"{name} preferred to SFT by both labeler groups (95% CI "
                "above 0.5) and above every floor policy's held-out win rate",
                rate, both > 0.5 and above, detail)
        if name in gold and "sft" in gold:
            better = [k for k in gold[name] if gold[name][k]["mean"] > gold["sft"][k]["mean"]]
            add(f"{name}_most_categories", f"{name} beats SFT on gold score in most kinds of "
                "instruction (value: how many)", len(better), len(better) > len(gold[name]) / 2)
    behaviour = results.get("behaviour", {})
    share = lambda model, key: (behaviour.get(model, {}).get(key) or {}).get("share")
    for name in ("ppo", "ppo_ptx"):
        if share(name, "correct_share") is None or share("sft", "correct_share") is None:
            continue
        # Winning by saying less (abstaining, a stock "no .") shows up here, not in a win rate.
        gain = share(name, "correct_share") - share("sft", "correct_share")
        add(f"{name}_more_correct", f"{name} answers correctly more often than SFT, by >= 0.10 "
            "(value: the gain in correct share)", gain, gain >= 0.10)
        extra_off = share(name, "off_task_share") - share("sft", "off_task_share")
        add(f"{name}_not_more_off_task", f"{name} is off task no more often than SFT (value: "
            "the change in off-task share)", extra_off, extra_off <= 0.0)
        top = share(name, "top_response_share")
        add(f"{name}_diverse", f"{name}'s most frequent response is <= 5% of its answers "
            "(value: that share)", top, top <= 0.05)
    if "sft" in cap and "ppo" in cap:
        add("alignment_tax", "PPO pays an alignment tax (capability SFT - PPO > 0)",
            cap["sft"] - cap["ppo"], cap["sft"] > cap["ppo"])
    if "ppo" in cap and "ppo_ptx" in cap:
        add("ptx_reduces_tax", "PPO-ptx recovers capability (PPO-ptx - PPO > 0)",
            cap["ppo_ptx"] - cap["ppo"], cap["ppo_ptx"] > cap["ppo"])
    return out


def findings(results: dict[str, Any]) -> list[str]:
    """The findings of ``finding_checks`` as lines of the report."""
    return [f"{f['claim']}: {f['value']:.3f} ({'yes' if f['holds'] else 'NO'})"
            + (f" [{f['detail']}]" if f.get("detail") else "")
            for f in finding_checks(results).values()]


def write_report(results: dict[str, Any], workdir: str) -> None:
    """results.json, results.md and the plots, each replaced atomically (a kill leaves the
    previous report, never a truncated one); only process 0 writes."""
    if not is_main():
        return
    storage.write_text(storage.join(workdir, "results.json"),
                       json.dumps(results, indent=2, sort_keys=True, default=float) + "\n")
    lines = ["# Results", "", results_table(results), ""]
    if results.get("gold_by_category"):
        lines += ["## Gold score by kind of instruction (held-out labelers; share off task)", "",
                  category_table(results), ""]
    if results.get("floors"):
        lines += ["## Floor policies (fixed rules; a model must beat them all)", "",
                  floors_table(results), ""]
    if results.get("behaviour"):
        lines += ["## Behaviour (share of responses; rude: over hostile prompts and rude requests, "
                  "without and with \"please be polite\" in the prompt)", "",
                  behaviour_table(results), ""]
    if results.get("highlights"):
        lines += ["## Highlights (the seed note's claims; hallucination on \"describe\" prompts, "
                  "toxic over hostile prompts and rude requests; see rlhf_jax/highlights.py)", "",
                  highlights_report(results["highlights"]), ""]
    if results.get("knowledge_probe") or results.get("copy_probe"):
        lines += ["## Probes (world facts, multiple choice; copying)", "", probe_table(results), ""]
    if findings(results):
        lines += ["## Findings", "", *[f"- {line}" for line in findings(results)]]
    lines += ["", "## Samples (held-out prompts)", ""]
    for name, rows in results.get("samples", {}).items():
        lines.append(f"### {name}")
        lines.append(format_table(rows[:3]))
        lines.append("")
    storage.write_text(storage.join(workdir, "results.md"), "\n".join(lines) + "\n")
    _plots(results, workdir)


def _plots(results: dict[str, Any], workdir: str) -> None:
    win = results.get("win_rate_vs_sft", {})
    for group in ("heldout_labelers", "train_labelers"):
        bars = {name: (w[group], *w["ci95"][group]) for name, w in win.items()}
        if bars:
            plot_win_rates(bars, storage.join(workdir, f"win_rates_{group}.png"),
                           f"Win rate against SFT ({group.replace('_', ' ')}, 95% CI)")
    curves = {"pretrain": ["train/loss", "valid/loss"], "sft": ["train/loss", "valid/loss"],
              "rm": ["train/loss", "valid/pair_accuracy"],
              "ppo": ["objective/scores", "objective/kl", "val/var_explained"],
              "ppo_ptx": ["objective/scores", "objective/kl", "ptx/loss"],
              "dpo": ["train/loss", "valid/pair_accuracy"],
              "grpo": ["objective/scores", "objective/kl"],
              "rloo": ["objective/scores", "objective/kl"]}
    for stage, keys in curves.items():
        path = storage.join(workdir, stage, "metrics.jsonl")
        if storage.exists(path):
            plot_curves(path, keys, storage.join(workdir, f"curves_{stage}.png"), title=stage)
