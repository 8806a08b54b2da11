"""The whole pipeline at micro scale, every stage (real-data configs: tests/e2e/test_byo.py)."""
import json
import math
import os

import numpy as np
import pytest

from rlhf_jax.config import load_config
from rlhf_jax.pipeline import STAGES, run

from paths import EXPERIMENTS


def _finite(tree) -> bool:
    if isinstance(tree, dict):
        return all(_finite(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(_finite(v) for v in tree)
    if isinstance(tree, (int, float)):
        return math.isfinite(tree)
    return True


def test_micro_pipeline_every_stage_and_artifact(tmp_path):
    cfg = load_config(os.path.join(EXPERIMENTS, "instructgpt_tiny.py") + ":micro")
    results = run(cfg, str(tmp_path))
    for stage in STAGES:
        assert os.path.exists(tmp_path / stage / "DONE"), stage
    for stage in ("pretrain", "sft", "sft_ptx", "rm", "ppo", "ppo_ptx"):
        assert (tmp_path / stage / "model" / "model_config.json").exists(), stage
        assert (tmp_path / stage / "metrics.jsonl").exists(), stage
    for name in ("results.json", "results.md", "win_rates_heldout_labelers.png", "curves_ppo.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["wall_seconds"] > 0
    for key in ("train_labelers", "heldout_labelers"):
        assert 0.0 <= saved["rm_accuracy"][key] <= 1.0
    for model in ("base", "base_prompted", "sft", "ppo", "ppo_ptx"):
        win = saved["win_rate_vs_sft"][model]
        assert 0.0 <= win["train_labelers"] <= 1.0 and 0.0 <= win["heldout_labelers"] <= 1.0
        lo, hi = win["ci95"]["heldout_labelers"]
        assert lo <= win["heldout_labelers"] <= hi
        for table in ("capability", "kl_to_sft", "gold_score", "proxy_score"):
            assert model in saved[table], (table, model)
    assert saved["win_rate_vs_sft"]["sft"]["heldout_labelers"] == 0.5  # SFT against itself ties
    # The EMA policies are evaluated; PPO models' KL is also taken to their own init (sft_ptx).
    for model in ("ppo_ema", "ppo_ptx_ema"):
        assert model in saved["win_rate_vs_sft"] and model in saved["kl_to_ppo_init"], model
    assert set(saved["kl_to_ppo_init"]) == {"ppo", "ppo_ptx", "ppo_ema", "ppo_ptx_ema"}
    # Gold scores per kind of instruction, for every model.
    counts = {sum(v["n"] for v in by_kind.values()) for by_kind in saved["gold_by_category"].values()}
    assert len(counts) == 1 and counts.pop() > 0
    for model, by_kind in saved["gold_by_category"].items():
        assert set(by_kind) <= {"fact", "yes_no", "describe", "list", "repeat", "rude_request"}
        assert all(0.0 <= v["off_task"] <= 1.0 for v in by_kind.values())
    assert "Gold score by kind of instruction" in (tmp_path / "results.md").read_text()
    # The floor policies, judged like the models; every model's and floor's behaviour.
    assert set(saved["floors"]) == {"abstain", "always_no", "abstain_no_sorry"}
    for floor in saved["floors"].values():
        lo, hi = floor["win_heldout_ci"]
        assert lo <= floor["win_heldout"] <= hi
    assert set(saved["behaviour"]) == set(saved["win_rate_vs_sft"]) | set(saved["floors"])
    assert saved["behaviour"]["abstain"]["abstain_share"]["share"] == 1.0
    assert saved["behaviour"]["abstain"]["top_response"] == "i do not know ."
    n_prompts = saved["win_rate_vs_sft"]["sft"]["n"]
    assert all(b["correct_share"]["n"] == n_prompts for b in saved["behaviour"].values())
    rows = [json.loads(line) for line in open(tmp_path / "eval" / "responses.jsonl")]
    assert len(rows) == n_prompts * len(saved["behaviour"])
    assert {r["model"] for r in rows} == set(saved["behaviour"])
    # The probes: every fact of the 12 animals (7 attributes), 100 copy items.
    assert {"base", "sft", "ppo"} <= set(saved["knowledge_probe"]) == set(saved["copy_probe"])
    assert saved["knowledge_probe"]["base"]["n"] == 12 * 7 - 4     # every fact but the 4 myths
    assert 0 < saved["knowledge_probe"]["base"]["chance"] < 1
    assert saved["copy_probe"]["sft"]["n"] == 100
    assert saved["machine"]["logical_cores"] >= 1 and saved["versions"]["jax"]
    # The highlights: per model on the eval prompts, the probe sets for every unprompted model.
    hl = saved["highlights"]
    assert set(hl["fig4"]) == set(saved["win_rate_vs_sft"])
    assert set(hl["truthfulness"]) == set(saved["win_rate_vs_sft"]) - {"base_prompted"}
    assert hl["truthfulness"]["sft"]["true"]["n"] == 3 * 4         # 4 myths, 3 phrasings each
    assert {"ppo_ptx_vs_base", "ppo_ptx_vs_base_prompted"} == set(hl["head_to_head"])
    assert hl["ood"]["sft"]["win_heldout"]["rate"] == 0.5           # SFT against itself
    for heading in ("Floor policies", "Behaviour", "Probes", "Highlights"):
        assert heading in (tmp_path / "results.md").read_text(), heading
    assert _finite({k: v for k, v in saved.items() if k != "samples"})
    ppo_metrics = [json.loads(line) for line in open(tmp_path / "ppo_ptx" / "metrics.jsonl")]
    assert "ptx/loss" in ppo_metrics[-1] and np.isfinite(ppo_metrics[-1]["ptx/loss"])

    # A second invocation skips every finished stage and reproduces the report.
    again = run(cfg, str(tmp_path))
    assert again["this_invocation_seconds"] < results["wall_seconds"]
