"""`rlhf-jax eval`: evaluate every model of a pipeline workdir and write the results.

Models: ``base`` (the pretrained LM), ``base_prompted`` (the same with a few-shot prefix of
demonstrations), ``sft``, ``ppo`` and ``ppo_ptx``, and ``ppo_ema`` / ``ppo_ptx_ema`` (the policy
weights' EMA, the paper's decay 0.992) where PPO saved them. KL is measured to ``sft`` for every
model and, for the PPO models, also to the policy PPO started from and was penalized against
(``sft_ptx``). With the labeler world, gold scores are also reported per kind of instruction,
with the share of responses that do not attempt it. Writes ``results.json``, ``results.md`` and
PNG plots into the workdir.
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
from rlhf_jax.world.export import read_jsonl as read_plain_jsonl
from rlhf_jax.metrics import format_table, plot_curves, plot_win_rates

log = logging.getLogger(__name__)

MODELS = ("base", "base_prompted", "sft", "ppo", "ppo_ptx", "ppo_ema", "ppo_ptx_ema")
# name -> (stage directory, model subdirectory)
MODEL_DIRS = {"base": ("pretrain", "model"), "base_prompted": ("pretrain", "model"),
              "sft": ("sft", "model"), "ppo": ("ppo", "model"), "ppo_ptx": ("ppo_ptx", "model"),
              "ppo_ema": ("ppo", "model_ema"), "ppo_ptx_ema": ("ppo_ptx", "model_ema")}
OPTIONAL_MODELS = ("ppo_ema", "ppo_ptx_ema")    # only when PPO kept an EMA
PPO_INIT = "sft_ptx"                             # the pipeline's PPO policy init and KL reference


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
    rm, rm_params, _, rm_extra = load("rm")
    norm = rm_extra.get("reward_norm") or {}
    max_p, max_r = cfg.rm.data.max_prompt_len, cfg.rm.data.max_response_len

    results: dict[str, Any] = {"win_rate_vs_sft": {}, "capability": {}, "kl_to_sft": {},
                               "kl_to_ppo_init": {}, "gold_score": {}, "gold_by_category": {},
                               "proxy_score": {}, "samples": {}}
    responses: dict[str, list[str]] = {}
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
        if name.startswith("ppo"):
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
            by_group[group] = ev.win_rate(prompt_rows, responses[name], responses["sft"], labelers,
                                          seed=cfg.seed + offset)
        results["win_rate_vs_sft"][name] = {
            "train_labelers": by_group["train_labelers"]["rate"],
            "heldout_labelers": by_group["heldout_labelers"]["rate"],
            "ci95": {g: by_group[g]["ci95"] for g in by_group}, "n": by_group["heldout_labelers"]["n"]}

    for group in ("train_labelers", "heldout_labelers"):
        rows = read_jsonl(os.path.join(workdir, "comparisons", f"test_{group}.jsonl"), "comparisons")
        acc = ev.rm_pair_accuracy(rm, rm_params, tokenizer, rows, max_prompt_len=max_p,
                                  max_response_len=max_r, mesh=mesh)
        results["rm_accuracy"][group] = acc["accuracy"]
        results["rm_accuracy"][f"{group}_n_pairs"] = acc["n_pairs"]
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


def findings(results: dict[str, Any]) -> list[str]:
    """The paper's findings, each stated with the measured numbers and whether it appeared."""
    win = results["win_rate_vs_sft"]
    cap = results["capability_score"]
    acc = results["rm_accuracy"]
    out = []
    out.append(f"RM accuracy >= 0.70 on training labelers: {acc['train_labelers']:.3f} "
               f"({'yes' if acc['train_labelers'] >= 0.70 else 'NO'}); held-out labelers "
               f"{acc['heldout_labelers']:.3f}")
    out.append(f"SFT beats base (held-out win rate of base vs SFT < 0.5): "
               f"{win['base']['heldout_labelers']:.3f} "
               f"({'yes' if win['base']['heldout_labelers'] < 0.5 else 'NO'})")
    for name in ("ppo", "ppo_ptx"):
        rate = win[name]["heldout_labelers"]
        out.append(f"{name} beats SFT with held-out win rate >= 0.65: {rate:.3f} "
                   f"({'yes' if rate >= 0.65 else 'NO'})")
    tax = cap["sft"] - cap["ppo"]
    recovered = (cap["ppo_ptx"] - cap["ppo"]) / tax if tax > 0 else float("nan")
    out.append(f"alignment tax (capability SFT - PPO): {tax:+.3f}; PPO-ptx recovers "
               f"{recovered:.0%} of it" if tax > 0 else
               f"alignment tax (capability SFT - PPO): {tax:+.3f} (no regression measured)")
    return out


def write_report(results: dict[str, Any], workdir: str) -> None:
    """results.json, results.md and the plots, each replaced atomically (a kill leaves the
    previous report, never a truncated one)."""
    atomic_write_text(os.path.join(workdir, "results.json"),
                      json.dumps(results, indent=2, sort_keys=True, default=float) + "\n")
    lines = ["# Results", "", results_table(results), ""]
    if results.get("gold_by_category"):
        lines += ["## Gold score by kind of instruction (held-out labelers; share off task)", "",
                  category_table(results), ""]
    if results.get("win_rate_vs_sft"):
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
              "ppo_ptx": ["objective/scores", "objective/kl", "ptx/loss"]}
    for stage, keys in curves.items():
        path = os.path.join(workdir, stage, "metrics.jsonl")
        if os.path.exists(path):
            plot_curves(path, keys, os.path.join(workdir, f"curves_{stage}.png"), title=stage)
