"""Floor policies (rlhf_jax.world.floors) and the finding that a model must beat them."""
import json

import pytest

from rlhf_jax import evaluation_report
from rlhf_jax.world.floors import FLOORS, floor_responses

TYPES = ("fact", "yes_no", "describe", "list", "repeat", "rude_request")
ROWS = [{"prompt": f"instruction : a {kind} prompt response :", "meta": {"type": kind}} for kind in TYPES]


def test_every_floor_answers_by_prompt_type_only():
    assert set(FLOORS) == {"abstain", "always_no", "abstain_no_sorry"}
    idk = "i do not know ."
    assert floor_responses("abstain", ROWS) == [idk] * 6
    assert floor_responses("always_no", ROWS) == ["no ."] * 6
    assert floor_responses("abstain_no_sorry", ROWS) == [idk, "no .", idk, idk, idk, "sorry ."]
    assert floor_responses("abstain", []) == []
    with pytest.raises(KeyError, match="unknown floor 'always_yes'"):
        floor_responses("always_yes", ROWS)


def _win(heldout, heldout_lo, train_lo):
    return {"heldout_labelers": heldout, "train_labelers": heldout,
            "ci95": {"heldout_labelers": [heldout_lo, 0.9], "train_labelers": [train_lo, 0.9]}, "n": 300}


def _floor(win):
    return {"win_heldout": win, "win_heldout_ci": [win - 0.05, win + 0.05], "win_train": win,
            "win_train_ci": [win - 0.05, win + 0.05], "gold": -1.0}


def test_preferred_to_sft_needs_both_groups_and_every_floor_beaten():
    results = {
        "win_rate_vs_sft": {
            "ppo": _win(0.62, 0.56, 0.55),        # both CIs clear 0.5, but under always_no
            "ppo_ptx": _win(0.70, 0.64, 0.51),    # clears everything
            "dpo": _win(0.70, 0.64, 0.49),        # the training labelers' CI reaches 0.5
        },
        "floors": {"abstain": _floor(0.55), "always_no": _floor(0.66), "abstain_no_sorry": _floor(0.60)},
    }
    checks = evaluation_report.finding_checks(results)
    assert {k: checks[f"{k}_beats_sft"]["holds"] for k in ("ppo", "ppo_ptx", "dpo")} == {
        "ppo": False, "ppo_ptx": True, "dpo": False}
    assert checks["ppo_beats_sft"]["value"] == 0.62
    assert checks["ppo_beats_sft"]["detail"] == (
        "95% CI lower bounds: train 0.550, held-out 0.560; highest floor always_no 0.660")
    # The claim is the same in every run (a sweep labels its tally with one point's claim).
    assert checks["ppo_beats_sft"]["claim"] == checks["ppo_ptx_beats_sft"]["claim"].replace("ppo_ptx", "ppo")
    line = next(f for f in evaluation_report.findings(results) if f.startswith("ppo preferred"))
    assert line.endswith(": 0.620 (NO) [95% CI lower bounds: train 0.550, held-out 0.560; "
                         "highest floor always_no 0.660]")
    # Without floors (a report written before them) the CIs alone decide.
    del results["floors"]
    assert evaluation_report.finding_checks(results)["ppo_beats_sft"]["holds"] is True


def test_report_has_floor_behaviour_and_probe_tables(tmp_path):
    share = {"share": 0.5, "n": 2, "ci95": [0.1, 0.9]}
    none = {"share": None, "n": 0, "ci95": None}
    behaviour = {"correct_share": share, "off_task_share": share, "abstain_share": none,
                 "top_response_share": share, "top_response": "no .", "hallucination_rate": share,
                 "hallucination_rate_attempted": share, "constraint_ok_share": none,
                 "refusal_correct_share": none, "rude_share": {"without": share, "with_polite": none}}
    results = {"win_rate_vs_sft": {}, "floors": {"always_no": _floor(0.66)},
               "behaviour": {"sft": behaviour, "always_no": behaviour},
               "knowledge_probe": {"sft": {"accuracy": 0.75, "n": 8, "chance": 0.25}},
               "copy_probe": {"sft": {"exact": 0.5, "n": 4}}}
    evaluation_report.write_report(results, str(tmp_path))
    md = (tmp_path / "results.md").read_text()
    assert f"| always_no | {'0.6600':>21} | [0.61, 0.71] | {'0.6600':>18} | [0.61, 0.71]   |" in md
    behaviour_rows = [line for line in md.splitlines() if line.startswith(("| sft ", "| always_no "))
                      and "'no .'" in line]
    assert len(behaviour_rows) == 2
    assert [c.strip() for c in behaviour_rows[0].split("|")[1:-1]] == [
        "sft", "50%", "50%", "n/a", "50% 'no .'", "50%", "50%", "n/a", "n/a", "50%", "n/a"]
    assert "| sft   |             0.7500 | 0.2500 |     0.5000 |" in md
    assert json.loads((tmp_path / "results.json").read_text()) == results


def test_responses_file_has_a_row_per_model_and_prompt(tmp_path):
    path = evaluation_report.write_responses(str(tmp_path), ["p1", "p2"],
                                             {"sft": ["a", "b"], "abstain": ["i do not know ."] * 2})
    assert path == str(tmp_path / "eval" / "responses.jsonl")
    assert [json.loads(line) for line in open(path)] == [
        {"model": "sft", "prompt": "p1", "response": "a"}, {"model": "sft", "prompt": "p2", "response": "b"},
        {"model": "abstain", "prompt": "p1", "response": "i do not know ."},
        {"model": "abstain", "prompt": "p2", "response": "i do not know ."}]


def test_grpo_and_rloo_emas_are_optional_models_from_the_ppo_init():
    for name, stage in (("grpo_ema", "grpo"), ("rloo_ema", "rloo")):
        assert evaluation_report.MODEL_DIRS[name] == (stage, "model_ema")
        assert name in evaluation_report.OPTIONAL_MODELS and name in evaluation_report.FROM_PPO_INIT
        assert name in evaluation_report.MODELS


def test_machine_and_versions():
    machine = evaluation_report.machine_info()
    assert machine["cpu"] and machine["logical_cores"] >= 1
    assert machine["accelerator"]["count"] >= 1
    versions = evaluation_report.package_versions()
    assert set(versions) == {"python", "jax", "jaxlib", "flax", "optax", "numpy", "rlhf_jax"}
    import jax
    import numpy as np
    assert versions["jax"] == jax.__version__ and versions["numpy"] == np.__version__


def test_behaviour_and_ceiling_findings():
    """PPO must answer correctly more often (>= +0.10), be off task no more than SFT and not
    collapse onto one response; the RM must reach 0.85 of the labelers' noise-free ceiling."""
    from rlhf_jax.evaluation_report import finding_checks
    sh = lambda v: {"share": v, "n": 100, "ci95": [0.0, 1.0]}
    results = {
        "rm_accuracy": {"train_labelers": 0.68, "heldout_labelers": 0.67,
                        "train_labelers_ceiling": 0.80},
        "behaviour": {
            "sft": {"correct_share": sh(0.40), "off_task_share": sh(0.10),
                    "top_response_share": sh(0.02)},
            "ppo": {"correct_share": sh(0.45), "off_task_share": sh(0.30),
                    "top_response_share": sh(0.33)},
            "ppo_ptx": {"correct_share": sh(0.55), "off_task_share": sh(0.05),
                        "top_response_share": sh(0.03)}}}
    f = finding_checks(results)
    assert f["rm_near_ceiling"]["value"] == pytest.approx(0.85) and f["rm_near_ceiling"]["holds"]
    assert f["ppo_more_correct"]["value"] == pytest.approx(0.05) and not f["ppo_more_correct"]["holds"]
    assert f["ppo_ptx_more_correct"]["value"] == pytest.approx(0.15) and f["ppo_ptx_more_correct"]["holds"]
    assert not f["ppo_not_more_off_task"]["holds"] and f["ppo_ptx_not_more_off_task"]["holds"]
    assert f["ppo_diverse"]["value"] == pytest.approx(0.33) and not f["ppo_diverse"]["holds"]
    assert f["ppo_ptx_diverse"]["holds"]
    results["rm_accuracy"]["train_labelers"] = 0.67
    assert not finding_checks(results)["rm_near_ceiling"]["holds"]


def test_report_responses_and_plots_to_gcs(gcs_path):
    from rlhf_jax import storage
    from rlhf_jax.metrics import MetricsWriter
    with MetricsWriter(storage.join(gcs_path, "sft"), enabled=True) as writer:
        writer.write(1, {"train/loss": 2.0})
        writer.write(2, {"train/loss": 1.0})
    results = {"win_rate_vs_sft": {"ppo": _win(0.6, 0.55, 0.55)}, "floors": {"abstain": _floor(0.5)}}
    evaluation_report.write_report(results, gcs_path)
    assert json.loads(storage.read_text(storage.join(gcs_path, "results.json"))) == results
    assert "| abstain " in storage.read_text(storage.join(gcs_path, "results.md"))
    for png in ("win_rates_heldout_labelers.png", "curves_sft.png"):
        assert storage.read_bytes(storage.join(gcs_path, png)).startswith(b"\x89PNG")
    path = evaluation_report.write_responses(gcs_path, ["p"], {"sft": ["a"]})
    assert path == storage.join(gcs_path, "eval", "responses.jsonl")
    assert json.loads(storage.read_text(path)) == {"model": "sft", "prompt": "p", "response": "a"}


def test_only_process_0_writes_the_report(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation_report, "is_main", lambda: False)
    evaluation_report.write_report({"win_rate_vs_sft": {"ppo": _win(0.6, 0.55, 0.55)}}, str(tmp_path))
    path = evaluation_report.write_responses(str(tmp_path), ["p"], {"sft": ["a"]})
    assert path == str(tmp_path / "eval" / "responses.jsonl") and not list(tmp_path.iterdir())
