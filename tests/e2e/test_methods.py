"""The pipeline's other methods from the same SFT / RM (dpo, grpo, rloo) at micro scale: trained
after ppo_ptx when ``methods`` names them, evaluated like PPO, with their wall times."""
import json
import math
import os

import pytest

from rlhf_jax import sweep
from rlhf_jax.config import load_config
from rlhf_jax.errors import ConfigError
from rlhf_jax.pipeline import ALL_STAGES, METHOD_STAGES, STAGES, run

from paths import EXPERIMENTS
METHODS = ("dpo", "grpo", "rloo")


def _micro(**fields):
    cfg = load_config(os.path.join(EXPERIMENTS, "instructgpt_tiny.py") + ":micro")
    for key, value in fields.items():
        cfg[key] = value
    return cfg


def test_method_stages_are_optional_and_ordered():
    assert METHOD_STAGES == METHODS and not set(METHODS) & set(STAGES)
    assert ALL_STAGES.index("ppo_ptx") < ALL_STAGES.index("dpo") < ALL_STAGES.index("rloo") \
        < ALL_STAGES.index("eval")
    assert _micro().methods == () and load_config(
        os.path.join(EXPERIMENTS, "instructgpt_tiny.py")).methods == ()
    spec = load_config(os.path.join(EXPERIMENTS, "sweep_methods.py:micro"))
    sweep.check(spec)
    assert spec.points[0]["name"] == "methods" and tuple(spec.stages) == METHODS


def test_method_config_errors_name_the_stage(tmp_path):
    with pytest.raises(ConfigError, match=r"grpo stage.*group_size=3"):
        run(_micro(methods=("grpo",), group_size=3), str(tmp_path))
    with pytest.raises(ConfigError, match=r"'ppo_dpo'"):
        run(_micro(methods=("ppo_dpo",)), str(tmp_path))
    bad_beta = _micro(methods=("dpo",))
    bad_beta.dpo.beta = 0.0
    with pytest.raises(ConfigError, match=r"dpo stage.*beta"):
        run(bad_beta, str(tmp_path))
    # A sweep selecting a method is checked as well, with methods left empty.
    with pytest.raises(ConfigError, match=r"rloo stage.*group_size"):
        run(_micro(group_size=5), str(tmp_path), stages=("rloo",))
    assert not (tmp_path / "world").exists()     # checked before the first stage


def test_shared_stage_seconds_read_from_done_markers(tmp_path):
    (tmp_path / "shared" / "ppo").mkdir(parents=True)
    (tmp_path / "shared" / "ppo" / "DONE").write_text(json.dumps({"seconds": 12.5, "result": {}}))
    (tmp_path / "shared" / "rm").mkdir()
    (tmp_path / "shared" / "rm" / "DONE").write_text("{not json")
    point = tmp_path / "point"
    point.mkdir()
    for stage in ("ppo", "rm"):
        os.symlink(os.path.join("..", "shared", stage), point / stage)
    assert sweep.shared_stage_seconds(str(point), ("ppo", "rm", "ppo_ptx")) == {"ppo": 12.5}


@pytest.mark.slow   # test_sweep.py's micro sweep_methods runs the same stages in the default suite
def test_micro_pipeline_with_every_method(tmp_path):
    results = run(_micro(methods=METHODS), str(tmp_path))
    for stage in ALL_STAGES:
        assert (tmp_path / stage / "DONE").exists(), stage
    for method in METHODS:
        assert (tmp_path / method / "model" / "model_config.json").exists(), method
        assert (tmp_path / method / "metrics.jsonl").exists(), method
        assert results["stage_seconds"][method] > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    for method in METHODS + ("ppo", "sft"):
        win = saved["win_rate_vs_sft"][method]
        lo, hi = win["ci95"]["heldout_labelers"]
        assert 0.0 <= lo <= win["heldout_labelers"] <= hi <= 1.0, method
        for table in ("gold_score", "proxy_score", "kl_to_sft", "capability_score"):
            assert math.isfinite(saved[table][method]), (table, method)
    # GRPO / RLOO start from the PPO init like PPO; DPO's reference is SFT.
    assert {"grpo", "rloo"} <= set(saved["kl_to_ppo_init"]) and "dpo" not in saved["kl_to_ppo_init"]
    # GRPO / RLOO trained without a value network, G samples per prompt, PPO's episodes.
    extra = json.loads((tmp_path / "grpo" / "model" / "extra.json").read_text())
    assert extra.get("advantage") == "grpo" and extra.get("group_size") == 4
    rows = [json.loads(line) for line in open(tmp_path / "rloo" / "metrics.jsonl")]
    assert "objective/kl" in rows[-1] and not any("val/var_explained" in r for r in rows)
    report = (tmp_path / "results.md").read_text()
    assert "| dpo" in report and "training time: ppo" in report and "rloo" in report

    # Finished: a rerun skips every stage and keeps the methods in the report.
    again = run(_micro(methods=METHODS), str(tmp_path))
    assert set(METHODS) <= set(again["gold_score"])
    assert again["this_invocation_seconds"] < results["wall_seconds"]
