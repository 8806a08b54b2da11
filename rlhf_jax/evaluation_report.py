"""`rlhf-jax eval`: evaluate every model of a pipeline workdir and write the results.

Models: ``base`` (the pretrained LM), ``base_prompted`` (the same with a few-shot prefix of
demonstrations), ``sft``, ``ppo`` and ``ppo_ptx``, and ``ppo_ema`` / ``ppo_ptx_ema`` (the policy
weights' EMA, the paper's decay 0.992) where PPO saved them; ``dpo``, ``grpo`` and ``rloo`` (the
other methods from the same SFT / RM) where the pipeline trained them. KL is measured to ``sft``
for every model (DPO's own reference) and, for the PPO-engine models (ppo, ppo_ptx, grpo, rloo),
also to the policy they started from and were penalized against (``sft_ptx``). With the labeler
world, gold scores are also reported per kind of instruction, with the share of responses that
do not attempt it. Writes ``results.json``, ``results.md`` and PNG plots into the workdir.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np

from rlhf_jax import evaluation as ev
from rlhf_jax.checkpoint import atomic_write_text
from rlhf_jax.data import read_jsonl
from rlhf_jax.errors import UserError
from rlhf_jax.world.export import read_jsonl as read_plain_jsonl
from rlhf_jax.metrics import format_table, plot_curves, plot_win_rates

log = logging.getLogger(__name__)

METHODS = ("dpo", "grpo", "rloo")               # other methods from the same SFT / RM
MODELS = ("base", "base_prompted", "sft", "ppo", "ppo_ptx", "ppo_ema", "ppo_ptx_ema") + METHODS
# name -> (stage directory, model subdirectory)
MODEL_DIRS = {"base": ("pretrain", "model"), "base_prompted": ("pretrain", "model"),
              "sft": ("sft", "model"), "ppo": ("ppo", "model"), "ppo_ptx": ("ppo_ptx", "model"),
              "ppo_ema": ("ppo", "model_ema"), "ppo_ptx_ema": ("ppo_ptx", "model_ema"),
              **{name: (name, "model") for name in METHODS}}
# Only when their directory exists: PPO kept an EMA, or the pipeline trained the method.
OPTIONAL_MODELS = ("ppo_ema", "ppo_ptx_ema") + METHODS
PPO_INIT = "sft_ptx"                             # the pipeline's PPO policy init and KL reference
# Models trained from PPO_INIT and penalized against it (DPO's reference is SFT itself).
FROM_PPO_INIT = ("ppo", "ppo_ptx", "ppo_ema", "ppo_ptx_ema", "grpo", "rloo")
# The stage whose wall time trained each model (results' stage_seconds).
TRAINED_BY = {"ppo": "ppo", "ppo_ptx": "ppo_ptx", **{name: name for name in METHODS}}


def few_shot_prefix(demonstrations: list[dict], n_shots: int) -> str:
    """The shortest demonstrations, rendered as the instruction format, as a prompt prefix."""
    chosen = sorted(demonstrations, key=lambda r: len(r["prompt"]) + len(r["completion"]))[:n_shots]
    return " ".join(f"{r['prompt']} {r['completion']}" for r in chosen)


def evaluate_pipeline(cfg: Any, workdir: str, files: dict[str, str]) -> dict[str, Any]:
    from rlhf_jax.stages.common import load_model, setup_mesh
    from rlhf_jax.world import load_world

    e = cfg.eval
    mesh = setup_mesh(cfg.sft)
    # Labelers exist only in the built-in world; on real data the report keeps the RM score, KL,
    # capability (when its files are given) and RM accuracy on a held-out comparisons file.
    pool = load_world(files["world"])[1] if cfg.world.enabled else None
    prompt_rows = read_jsonl(files["eval_prompts"], "prompts")[: e.n_prompts]
    prompts = [row["prompt"] for row in prompt_rows]
    prefix = few_shot_prefix(read_jsonl(files["sft"], "demonstrations"), e.few_shot)
    mc_items = read_plain_jsonl(files["capability_mc"])[: e.n_capability] if "capability_mc" in files else []
    qa_items = read_plain_jsonl(files["capability_qa"])[: e.n_capability] if "capability_qa" in files else []

    def load(stage: str, sub: str = "model"):
        if stage == "pretrain" and cfg.get("base_model"):
            return load_model(cfg.base_model, mesh)
        return load_model(os.path.join(workdir, stage, sub), mesh)
    sft_model, sft_params, tokenizer, _ = load("sft")
    has_init = os.path.isdir(os.path.join(workdir, PPO_INIT, "model"))
    init_params = load(PPO_INIT)[1] if has_init else sft_params
    models = [m for m in MODELS if m not in OPTIONAL_MODELS
              or os.path.isdir(os.path.join(workdir, *MODEL_DIRS[m]))]
    if e.get("models") is not None:      # a sweep point evaluates only what it trained
        unknown = sorted(set(e.models) - set(MODELS))
        if unknown:
            raise UserError(f"eval.models: {unknown} are not models; expected some of {list(MODELS)}")
        wanted = set(e.models) | ({"sft"} if e.models else set())   # win rates need SFT's answers
        models = [m for m in models if m in wanted]
    rm, rm_params, _, rm_extra = load("rm")
    norm = rm_extra.get("reward_norm") or {}
    max_p, max_r = cfg.rm.data.max_prompt_len, cfg.rm.data.max_response_len

    results: dict[str, Any] = {"win_rate_vs_sft": {}, "capability": {}, "kl_to_sft": {},
                               "kl_to_ppo_init": {}, "gold_score": {}, "gold_by_category": {},
                               "proxy_score": {}, "samples": {}}
    responses: dict[str, list[str]] = {}
    # Win rates are against this workdir's SFT, or against the model ``eval.reference_sft``
    # names (the model-size axis compares every size with the largest SFT, as Fig. 1 does).
    reference = e.get("reference_sft") or ""
    if reference and models and pool is not None:
        ref_model, ref_params = load_model(reference, mesh)[:2]
        responses["reference"] = ev.generate_texts(
            ref_model, ref_params, tokenizer, prompt_rows, max_prompt_len=max_p,
            max_new_tokens=max_r, temperature=e.temperature, seed=cfg.seed, mesh=mesh)["texts"]
        results["win_rate_reference"] = reference
    for name in models:
        model, params = (sft_model, sft_params) if name == "sft" else load(*MODEL_DIRS[name])[:2]
        model_prompts = ([f"{prefix} {p}" for p in prompts] if name == "base_prompted"
                         else prompt_rows)
        prompt_len = e.prompted_max_prompt_len if name == "base_prompted" else max_p
        samples = ev.generate_texts(model, params, tokenizer, model_prompts, max_prompt_len=prompt_len,
                                    max_new_tokens=max_r, temperature=e.temperature, seed=cfg.seed,
                                    mesh=mesh)
        responses[name] = samples["texts"]
        results["kl_to_sft"][name] = ev.kl_to_reference(model, params, sft_params, samples, mesh)
        if name in FROM_PPO_INIT:
            results["kl_to_ppo_init"][name] = ev.kl_to_reference(model, params, init_params,
                                                                 samples, mesh)
        results["proxy_score"][name] = float(np.mean(ev.score_texts(
            rm, rm_params, norm, tokenizer, prompt_rows, samples["texts"], max_prompt_len=max_p,
            max_response_len=max_r, mesh=mesh)))
        if pool is not None:
            by_kind = ev.gold_score_by_category(prompt_rows, samples["texts"], pool.heldout)
            results["gold_by_category"][name] = by_kind
            results["gold_score"][name] = (sum(v["mean"] * v["n"] for v in by_kind.values())
                                           / sum(v["n"] for v in by_kind.values()))
        if name != "base_prompted" and mc_items and qa_items:
            mc = ev.multiple_choice_accuracy(model, params, tokenizer, mc_items,
                                             max_prompt_len=e.capability_max_prompt_len, mesh=mesh)
            qa = ev.qa_exact_match(model, params, tokenizer, qa_items,
                                   max_prompt_len=e.capability_max_prompt_len, mesh=mesh)
            results["capability"][name] = {"score": (mc + qa) / 2, "multiple_choice": mc,
                                           "qa_exact_match": qa}
        results["samples"][name] = [{"prompt": p, "response": r}
                                    for p, r in zip(prompts[:5], samples["texts"][:5])]
        log.info("evaluated %s: proxy %.3f, KL %.3f", name, results["proxy_score"][name],
                 results["kl_to_sft"][name])
    if "base" in results["capability"]:
        results["capability"]["base_prompted"] = results["capability"]["base"]
    results["capability_score"] = {k: v["score"] for k, v in results["capability"].items()}
    results["rm_accuracy"] = {}
    if pool is None:
        if files.get("comparisons_test"):
            rows = read_jsonl(files["comparisons_test"], "comparisons")
            results["rm_accuracy"]["test"] = ev.rm_pair_accuracy(
                rm, rm_params, tokenizer, rows, max_prompt_len=max_p, max_response_len=max_r,
                mesh=mesh)["accuracy"]
        return results

    for name in models:
        by_group = {}
        for offset, (group, labelers) in enumerate((("train_labelers", pool.training),
                                                    ("heldout_labelers", pool.heldout))):
            by_group[group] = ev.win_rate(prompt_rows, responses[name],
                                          responses.get("reference", responses["sft"]), labelers,
                                          seed=cfg.seed + offset)
        results["win_rate_vs_sft"][name] = {
            "train_labelers": by_group["train_labelers"]["rate"],
            "heldout_labelers": by_group["heldout_labelers"]["rate"],
            "ci95": {g: by_group[g]["ci95"] for g in by_group}, "n": by_group["heldout_labelers"]["n"]}

    for group, labelers in (("train_labelers", pool.training), ("heldout_labelers", pool.heldout)):
        rows = read_jsonl(os.path.join(workdir, "comparisons", f"test_{group}.jsonl"), "comparisons")
        acc = ev.rm_pair_accuracy(rm, rm_params, tokenizer, rows, max_prompt_len=max_p,
                                  max_response_len=max_r, mesh=mesh)
        results["rm_accuracy"][group] = acc["accuracy"]
        results["rm_accuracy"][f"{group}_n_pairs"] = acc["n_pairs"]
        results.setdefault("rm_accuracy_by_kind", {})[group] = acc["by_kind"]
        results["rm_accuracy"][f"{group}_ceiling"] = ev.noise_free_accuracy(rows, labelers)
    # Leave-one-group-out: the RM never saw this labeler group's rankings.
    held_group = os.path.join(workdir, "rm", "comparisons_holdout_group.jsonl")
    if os.path.exists(held_group):
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
    for name in MODELS:
        if name in OPTIONAL_MODELS and name not in results.get("proxy_score", {}):
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


def finding_checks(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The paper's findings that this run's results can decide, each as ``{"claim", "value",
    "holds"}`` (``value`` is the number that decides it); a sweep over seeds tallies them."""
    win = results.get("win_rate_vs_sft", {})
    cap = results.get("capability_score", {})
    acc = results.get("rm_accuracy", {})
    gold = results.get("gold_by_category", {})
    out: dict[str, dict[str, Any]] = {}

    def add(key: str, claim: str, value: float, holds: bool) -> None:
        out[key] = {"claim": claim, "value": float(value), "holds": bool(holds)}
    if "train_labelers" in acc:
        add("rm_accuracy", "RM pair accuracy >= 0.70 on training labelers (paper 72.4%)",
            acc["train_labelers"], acc["train_labelers"] >= 0.70)
        add("rm_heldout_gap", "held-out labelers' RM accuracy within 5 points below training "
            "labelers' (paper 69.6 vs 72.4)", acc["heldout_labelers"] - acc["train_labelers"],
            -0.05 <= acc["heldout_labelers"] - acc["train_labelers"] <= 0.01)
    if "holdout_group" in acc:
        add("rm_holdout_group", "RM accuracy on an unseen training-labeler group >= 0.70",
            acc["holdout_group"], acc["holdout_group"] >= 0.70)
    if "base" in win:
        add("sft_beats_base", "SFT preferred to the base LM (base's held-out win rate < 0.5)",
            win["base"]["heldout_labelers"], win["base"]["heldout_labelers"] < 0.5)
    for name in ("ppo", "ppo_ptx") + METHODS:
        if name in win:
            low = win[name]["ci95"]["heldout_labelers"][0]
            add(f"{name}_beats_sft", f"{name} preferred to SFT by held-out labelers (win rate, "
                "95% CI above 0.5)", win[name]["heldout_labelers"], low > 0.5)
        if name in gold and "sft" in gold:
            better = [k for k in gold[name] if gold[name][k]["mean"] > gold["sft"][k]["mean"]]
            add(f"{name}_most_categories", f"{name} beats SFT on gold score in most kinds of "
                "instruction (value: how many)", len(better), len(better) > len(gold[name]) / 2)
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
            for f in finding_checks(results).values()]


def write_report(results: dict[str, Any], workdir: str) -> None:
    """results.json, results.md and the plots, each replaced atomically (a kill leaves the
    previous report, never a truncated one)."""
    atomic_write_text(os.path.join(workdir, "results.json"),
                      json.dumps(results, indent=2, sort_keys=True, default=float) + "\n")
    lines = ["# Results", "", results_table(results), ""]
    if results.get("gold_by_category"):
        lines += ["## Gold score by kind of instruction (held-out labelers; share off task)", "",
                  category_table(results), ""]
    if findings(results):
        lines += ["## Findings", "", *[f"- {line}" for line in findings(results)]]
    lines += ["", "## Samples (held-out prompts)", ""]
    for name, rows in results.get("samples", {}).items():
        lines.append(f"### {name}")
        lines.append(format_table(rows[:3]))
        lines.append("")
    atomic_write_text(os.path.join(workdir, "results.md"), "\n".join(lines) + "\n")
    _plots(results, workdir)


def _plots(results: dict[str, Any], workdir: str) -> None:
    win = results.get("win_rate_vs_sft", {})
    for group in ("heldout_labelers", "train_labelers"):
        bars = {name: (w[group], *w["ci95"][group]) for name, w in win.items()}
        if bars:
            plot_win_rates(bars, os.path.join(workdir, f"win_rates_{group}.png"),
                           f"Win rate against SFT ({group.replace('_', ' ')}, 95% CI)")
    curves = {"pretrain": ["train/loss", "valid/loss"], "sft": ["train/loss", "valid/loss"],
              "rm": ["train/loss", "valid/pair_accuracy"],
              "ppo": ["objective/scores", "objective/kl", "val/var_explained"],
              "ppo_ptx": ["objective/scores", "objective/kl", "ptx/loss"],
              "dpo": ["train/loss", "valid/pair_accuracy"],
              "grpo": ["objective/scores", "objective/kl"],
              "rloo": ["objective/scores", "objective/kl"]}
    for stage, keys in curves.items():
        path = os.path.join(workdir, stage, "metrics.jsonl")
        if os.path.exists(path):
            plot_curves(path, keys, os.path.join(workdir, f"curves_{stage}.png"), title=stage)
