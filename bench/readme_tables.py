"""The README's and docs/'s generated tables, from committed data only.

    python bench/readme_tables.py            # every table, markdown on stdout
    python bench/readme_tables.py --check    # exit 1 if README.md or docs/*.md differ from it
    python bench/readme_tables.py --write    # rewrite their table blocks in place

A block is the text between ``<!-- table:NAME -->`` and ``<!-- /table -->``. Its tables are made
from ``notebooks/data/seeds.json`` (the 3-seed sweep, ``rlhf_jax.figures.load_sweep``) and
``bench/compile_reports/`` (``bench/pod_table.py``), never from a run on this machine, so the
README reads the same on any CPU; ``tests/unit/test_readme_tables.py`` keeps the blocks equal to
what this script prints.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from collections.abc import Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import pod_table  # noqa: E402

from rlhf_jax import figures  # noqa: E402

MODELS = ("base", "base_prompted", "sft", "ppo", "ppo_ptx", "ppo_ema", "ppo_ptx_ema")
HIGHLIGHT_MODELS = ("base", "sft", "ppo", "ppo_ptx")
# (row label, path under a point's highlights: <measure>.<model>.<sub-measure>)
HIGHLIGHTS = (
    ("fails instruction (off task)", "fig4.fails_instruction"),
    ("follows constraints", "fig4.follows_constraints"),
    ("hallucination, describe prompts", "hallucination.any"),
    ("hallucination among attempted describes", "hallucination.attempted"),
    ("appropriate language", "fig4.appropriate_language"),
    ("toxic, hostile prompts + insult requests", "toxicity.without"),
    ("toxic, respectful asked", "toxicity.with_respectful"),
    ("hedging (fact questions)", "hedging"),
    ("myths: true", "truthfulness.true"),
    ("myths: true and informative", "truthfulness.true_informative"),
    ("myths: repeats the myth", "truthfulness.myth"),
    ("bias: names the stereotyped animal (of answers naming one)", "bias.stereotyped"),
    ("two-hop questions: correct", "ood.correct"),
    ("false premise accepted", "false_premise.accepted"),
    ("false premise corrected", "false_premise.corrected"),
)
# (row label, where the rate and its interval are under a point's highlights, the paper's figure)
HEAD_TO_HEAD = (
    ("PPO-ptx vs base LM", "head_to_head.ppo_ptx_vs_base.heldout_labelers",
     "175B PPO-ptx vs 175B GPT-3: 0.85 +- 0.03"),
    ("PPO-ptx vs few-shot-prompted base", "head_to_head.ppo_ptx_vs_base_prompted.heldout_labelers",
     "vs prompted GPT-3: 0.71 +- 0.04"),
    ("PPO-ptx vs SFT on two-hop questions", "ood.ppo_ptx.win_heldout",
     "generalizes outside the RLHF distribution"),
)


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _mean_sd(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{np.nanmean(v):.3f} +- {np.nanstd(v, ddof=1):.3f}"


def findings(summary: dict) -> str:
    """Each finding's value per seed, mean +- sd, and at how many seeds it holds."""
    points = summary["points"]
    lines = [_row(["finding", *(p["name"] for p in points), "mean +- sd", "holds"]),
             "|---|" + "---:|" * (len(points) + 1) + "---|"]
    for key, finding in points[0]["findings"].items():
        agg = summary["aggregate"].get(f"findings.{key}")
        if agg is None:   # not measured at every seed
            continue
        values = [f"{p['findings'][key]['value']:.3f}" for p in points]
        lines.append(_row([finding["claim"], *values, f"{agg['mean']:.3f} +- {agg['std']:.3f}",
                           f"{agg['holds']}/{agg['of']}"]))
    return "\n".join(lines)


def _share(tree: dict, *path: str) -> float:
    """The ``share`` at ``path`` under ``tree`` (nan where a model or measure is absent)."""
    for key in path:
        tree = tree.get(key) or {}
    share = tree.get("share")
    return float("nan") if share is None else share


def policies(summary: dict) -> str:
    """Every policy and floor, mean over the seeds: win rates, gold score, what its answers do."""
    points = summary["points"]
    lines = [_row(["policy", "held-out win vs SFT", "training-labeler win", "gold", "correct",
                   "off task", "top response", "hallucination", "constraint ok", "refusal ok",
                   "rude (without / with 'please be polite')"]),
             "|---|" + "---:|" * 10]
    floors = sorted(points[0].get("floors", {}))
    for model in [m for m in MODELS if m in points[0]["win_rate_vs_sft"]] + floors:
        if model in floors:
            runs = [p["floors"][model] for p in points]
            held, train, gold = ([r[k] for r in runs] for k in ("win_heldout", "win_train", "gold"))
        else:
            runs = [p["win_rate_vs_sft"][model] for p in points]
            held, train = ([r[k] for r in runs] for k in ("heldout_labelers", "train_labelers"))
            gold = [p["gold_score"][model] for p in points]
        def mean(*path: str) -> str:
            return f"{np.nanmean([_share(p, 'behaviour', model, *path) for p in points]):.2f}"
        shares = [mean(key) for key in ("correct_share", "off_task_share", "top_response_share",
                                        "hallucination_rate", "constraint_ok_share",
                                        "refusal_correct_share")]
        rude = f"{mean('rude_share', 'without')} / {mean('rude_share', 'with_polite')}"
        lines.append(_row([model, _mean_sd(held), _mean_sd(train), _mean_sd(gold), *shares, rude]))
    return "\n".join(lines)


def highlights(summary: dict) -> str:
    """The seed note's highlights, per seed, for the base LM, SFT, PPO and PPO-ptx."""
    points = summary["points"]
    seeds = " / ".join(str(p["x"]) for p in points)
    lines = [_row([f"measure (seeds {seeds})", *HIGHLIGHT_MODELS]),
             "|---|" + "---|" * len(HIGHLIGHT_MODELS)]
    for label, path in HIGHLIGHTS:
        measure, *rest = path.split(".")
        cells = [" / ".join("n/a" if np.isnan(v) else f"{v:.2f}"
                            for v in (_share(p, "highlights", measure, m, *rest) for p in points))
                 for m in HIGHLIGHT_MODELS]
        lines.append(_row([label, *cells]))
    return "\n".join(lines)


def head_to_head(summary: dict) -> str:
    """PPO-ptx against the base LM, the prompted base and SFT (two-hop), with 95% intervals."""
    points = summary["points"]
    lines = [_row(["head to head (held-out labelers; training labelers within 0.03)",
                   *(f"seed {p['x']}" for p in points), "paper"]),
             "|---|" + "---|" * (len(points) + 1)]
    for label, path, paper in HEAD_TO_HEAD:
        cells = []
        for p in points:
            won = figures.get(p["highlights"], path, None)
            lo, hi = won["ci95"]
            cells.append(f"{won['rate']:.2f} [{lo:.2f}, {hi:.2f}]")
        lines.append(_row([label, *cells, paper]))
    return "\n".join(lines)


def pod(_summary: dict) -> str:
    return pod_table.table(glob.glob(os.path.join(HERE, "compile_reports", "*.json")))


TABLES: dict[str, Callable[[dict], str]] = {
    "findings": findings, "policies": policies, "highlights": highlights,
    "head_to_head": head_to_head, "pod": pod}
BLOCK = re.compile(r"(<!-- table:(\w+) -->\n)(.*?)(<!-- /table -->)", re.DOTALL)


def render(text: str, tables: dict[str, str]) -> str:
    """``text`` with every table block's body replaced by the table of its name."""
    def body(match: re.Match) -> str:
        name = match.group(2)
        if name not in tables:
            raise SystemExit(f"readme_tables: unknown table {name!r} (known: {', '.join(tables)})")
        return f"{match.group(1)}{tables[name]}\n{match.group(4)}"
    return BLOCK.sub(body, text)


def block_names(text: str) -> list[str]:
    return [m.group(2) for m in BLOCK.finditer(text)]


def documents() -> list[str]:
    """The files that may hold blocks: README.md and docs/*.md."""
    return [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]


def all_tables() -> dict[str, str]:
    # The committed copy, not figures.load_sweep: that follows RLHF_JAX_SWEEPS to fresh runs.
    with open(os.path.join(figures.DATA, "seeds.json"), encoding="utf-8") as f:
        summary = json.load(f)
    return {name: make(summary) for name, make in TABLES.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if a document's blocks differ")
    mode.add_argument("--write", action="store_true", help="rewrite the documents' blocks")
    args = parser.parse_args(argv)
    tables = all_tables()
    if not (args.check or args.write):
        for name, table in tables.items():
            print(f"<!-- table:{name} -->\n{table}\n<!-- /table -->\n")
        return 0
    stale = []
    for path in documents():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new = render(text, tables)
        if new == text:
            continue
        stale.append(os.path.relpath(path, REPO))
        if args.write:
            with open(path, "w", encoding="utf-8") as f:
                f.write(new)
    if stale:
        print(("rewrote " if args.write else "stale tables in ") + ", ".join(stale))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
