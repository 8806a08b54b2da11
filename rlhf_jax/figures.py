"""What the figure notebooks share: the sweeps' summaries, the paper's numbers, and verdicts.

A notebook reads ``notebooks/data/<sweep>.json``, a copy of the ``sweep.json`` that
``rlhf-jax sweep`` wrote for a full-size run (the notebook names the command). With
``RLHF_JAX_SWEEPS=DIR`` it reads ``DIR/<sweep>/sweep.json`` instead (CI points it at micro-sized
sweeps so that every notebook runs against fresh output of the current code); ``DIR`` may be a URL
(``gs://bucket/sweeps``, ``rlhf_jax.storage``).
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from rlhf_jax import storage

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks", "data")

# The paper's numbers the figures are compared with (Ouyang et al. 2022; values read off the
# plots are approximate: shared/docs/reference/instructgpt_paper_notes.md).
PAPER = {
    # Fig. 1: win rate against SFT 175B by size (1.3B, 6B, 175B).
    "fig1": {"ppo_ptx": (0.52, 0.55, 0.65), "ppo": (0.50, 0.54, 0.62), "sft": (0.35, 0.42, 0.48),
             "base_prompted": (0.22, 0.30, 0.40), "base": (0.15, 0.22, 0.28)},
    "fig1_sizes": ("1.3B", "6B", "175B"),
    # Section 4.1 / App. E.2: RM accuracy, training labelers vs held-out labeler groups.
    "rm_accuracy": {"train_labelers": 0.724, "heldout_groups": 0.696},
    # Fig. 33: gamma 1 -> 100: validation reward about -0.6 -> -1.6, SQuADv2 F1 48 -> 60.
    "fig33": {"reward": (-0.6, -1.6), "squad_f1": (48, 60), "drop_f1": (18, 27)},
    # Fig. 36 / App. E.7: the preference optimum is near beta 0.01-0.02; 0 and 2 are poor.
    "fig36_best_beta": (0.01, 0.02),
}


def _sweep_path(name: str) -> str:
    root = os.environ.get("RLHF_JAX_SWEEPS")
    return storage.join(root, name, "sweep.json") if root else os.path.join(DATA, f"{name}.json")


def load_sweep(name: str) -> dict[str, Any]:
    """The summary of sweep ``name`` (see the module docstring for where it is read from)."""
    with storage.open(_sweep_path(name)) as f:
        return json.load(f)


def load_sweeps(*names: str) -> list[dict[str, Any]]:
    """The summaries of those of ``names`` that exist, in order (the same table at more seeds
    where they were run; CI's micro sweeps have only the first)."""
    return [load_sweep(name) for name in names if storage.exists(_sweep_path(name))]


def get(tree: Any, path: str, default: float = float("nan")) -> Any:
    """``tree["a"]["b"]`` for ``path="a.b"`` (model names may contain no dots)."""
    for key in path.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return default
        tree = tree[key]
    return tree


def column(summary: dict, path: str) -> np.ndarray:
    """One number per point (``nan`` where a point lacks it)."""
    return np.array([float(get(p, path)) for p in summary["points"]], dtype=float)


def xs(summary: dict) -> np.ndarray:
    return np.array([float(p["x"]) for p in summary["points"]], dtype=float)


def win(summary: dict, model: str, group: str = "heldout_labelers") -> tuple[np.ndarray, np.ndarray]:
    """Win rates of ``model`` at every point and their 95% CIs as [2, n] error-bar offsets."""
    rate = column(summary, f"win_rate_vs_sft.{model}.{group}")
    ci = np.array([get(p, f"win_rate_vs_sft.{model}.ci95.{group}", [np.nan, np.nan])
                   for p in summary["points"]], dtype=float).reshape(-1, 2)
    return rate, np.stack([rate - ci[:, 0], ci[:, 1] - rate])


def average_ranks(v: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing the mean of the ranks they span (scipy's "average")."""
    v = np.asarray(v, dtype=float)
    order = np.argsort(v, kind="stable")
    ordered = v[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    sizes = np.diff(np.r_[starts, len(v)])
    group_rank = starts + (sizes + 1) / 2.0
    ranks = np.empty(len(v), dtype=float)
    ranks[order] = np.repeat(group_rank, sizes)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Rank correlation of the finite pairs: the sign of a trend without assuming its shape.

    As ``scipy.stats.spearmanr``: tied values share their average rank, and a constant series
    gives nan, since it has no trend to agree or disagree with (distinct ranks for ties would
    make a flat series a perfect +1). Verdicts compare it with 0, so nan reads as "does not
    hold". Under 3 finite pairs is nan too: two points always correlate perfectly.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3:
        return float("nan")
    rx, ry = average_ranks(x[keep]), average_ranks(y[keep])
    if np.all(rx == rx[0]) or np.all(ry == ry[0]):
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def verdict(reproduced: bool, partly: bool = False) -> str:
    return "reproduced" if reproduced else ("partly reproduced" if partly else "not reproduced")


def findings_table(summary: dict) -> list[dict]:
    """The seeds sweep's findings: mean, spread and in how many seeds each holds."""
    rows = []
    claims = summary["points"][0]["findings"]
    for key, agg in summary.get("aggregate", {}).items():
        if not key.startswith("findings."):
            continue
        name = key[len("findings."):]
        holds, of = agg["holds"], agg["of"]
        rows.append({"finding": claims[name]["claim"], "mean": round(agg["mean"], 3),
                     "std": round(agg["std"], 3),
                     "per seed": [round(p["findings"][name]["value"], 3) for p in summary["points"]],
                     "holds": f"{holds}/{of}",
                     "verdict": ("holds at every seed" if holds == of else
                                 "never holds" if holds == 0 else
                                 f"holds at {holds} of {of} seeds only")})
    return rows
