"""`rlhf-jax sweep` at micro scale: every sweep of experiments/, sharing one seed's finished
stages, and every notebook re-executed (nbclient) against these fresh summaries."""
import glob
import json
import math
import os

import ml_collections
import pytest

from rlhf_jax import sweep
from rlhf_jax.config import load_config, sweep_config
from rlhf_jax.errors import ConfigError

from paths import REPO as ROOT
EXPERIMENTS = os.path.join(ROOT, "experiments")
# sweep name (what the notebooks load) -> experiment spec
SHARING = {"sweep_ptx": "sweep_ptx.py:micro", "sweep_kl": "sweep_kl.py:micro",
           "sweep_episodes": "sweep_episodes.py:micro", "sweep_rm": "sweep_rm.py:micro",
           "sweep_rm_labelers": "sweep_rm.py:labelers,micro", "sizes": "sweep_sizes.py:micro",
           "sweep_methods": "sweep_methods.py:micro"}


def _load(spec: str) -> ml_collections.ConfigDict:
    return load_config(os.path.join(EXPERIMENTS, spec))


@pytest.fixture
def compilation_cache(tmp_path):
    """What `rlhf-jax sweep` does from the command line: points of one shape compile once."""
    import jax
    from jax._src import compilation_cache as cc
    from rlhf_jax.runtime import enable_compilation_cache
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    enable_compilation_cache(str(tmp_path / "jax_cache"))
    cc.reset_cache()
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    cc.reset_cache()


def test_micro_sweeps_and_every_notebook(tmp_path, monkeypatch, compilation_cache):
    seeds = sweep.run(_load("sweep_seeds.py:micro"), str(tmp_path / "seeds"))
    assert [p["name"] for p in seeds["points"]] == ["seed=0", "seed=1"]
    # Each seed is a whole pipeline of its own: its world differs.
    worlds = [(tmp_path / "seeds" / "points" / p / "world" / "world.json").read_text()
              for p in ("seed=0", "seed=1")]
    assert worlds[0] != worlds[1]
    agg = seeds["aggregate"]
    assert agg["findings.ppo_beats_sft"]["of"] == 2 and 0 <= agg["findings.ppo_beats_sft"]["holds"] <= 2
    lo, hi = agg["gold_score.ppo"]["min"], agg["gold_score.ppo"]["max"]
    assert lo <= agg["gold_score.ppo"]["mean"] <= hi
    assert "Findings across points" in (tmp_path / "seeds" / "sweep.md").read_text()

    shared = tmp_path / "seeds" / "points" / "seed=0"
    before = {stage: (shared / stage / "DONE").stat().st_mtime for stage in ("sft", "rm")}
    summaries = {}
    for name, spec in SHARING.items():
        summaries[name] = sweep.run(_with_shared(spec, shared), str(tmp_path / name))
        for point in summaries[name]["points"]:
            point_dir = tmp_path / name / "points" / point["name"]
            for stage in summaries[name]["shared_stages"]:
                if (point_dir / stage).is_symlink():
                    assert (point_dir / stage).resolve() == (shared / stage).resolve()
            assert point["seconds"] > 0
    # SFT and RM were trained once, by the seed sweep; no sweep retrained them.
    assert before == {stage: (shared / stage / "DONE").stat().st_mtime for stage in ("sft", "rm")}

    ptx = summaries["sweep_ptx"]["points"]
    assert [p["x"] for p in ptx] == [0.0, 10.0]
    assert all(set(p["gold_score"]) == {"sft", "ppo_ptx"} for p in ptx)   # eval.models
    assert "ptx/loss" in ptx[1]["curves"]["ppo_ptx"][-1] and "objective/kl" in ptx[0]["curves"]["ppo_ptx"][-1]
    kl = summaries["sweep_kl"]["points"]
    assert [p["set"]["ppo.ppo.kl_coef"] for p in kl] == [0.0, 0.01]
    # The RM points evaluate no policy, only the RM, and keep its validation curve.
    for p in summaries["sweep_rm"]["points"]:
        assert not p["gold_score"] and 0 <= p["rm_accuracy"]["train_labelers"] <= 1
        assert any("valid/pair_accuracy" in row for row in p["curves"]["rm"])
    for p in summaries["sweep_rm_labelers"]["points"]:
        group = p["set"]["comparisons.holdout_group"]
        train = tmp_path / "sweep_rm_labelers" / "points" / p["name"] / "rm" / "comparisons_train.jsonl"
        held = train.with_name("comparisons_holdout_group.jsonl")
        assert all(json.loads(line)["group"] != group for line in train.open())
        assert all(json.loads(line)["group"] == group for line in held.open())
        assert 0 <= p["rm_accuracy"]["holdout_group"] <= 1
    # Sizes: every size judged against the shared (largest) SFT.
    sizes = summaries["sizes"]["points"]
    assert [p["policy_model"]["d_model"] for p in sizes] == [16, 32]
    for p in sizes:
        assert p["win_rate_reference"] == str(shared / "sft" / "model")
        assert {"base", "base_prompted", "sft", "ppo", "ppo_ptx"} <= set(p["win_rate_vs_sft"])
        # Fig. 1's head-to-head: each size's PPO-ptx against the largest base LM directly.
        assert p["head_to_head_reference_base"] == str(shared / "pretrain" / "model")
        assert {"train_labelers", "heldout_labelers"} <= set(
            p["highlights"]["head_to_head"]["ppo_ptx_vs_reference_base"])

    # Methods from the same SFT / RM: every method evaluated, the new ones trained in the point,
    # PPO / PPO-ptx reused with the wall times of their shared stages.
    (methods,) = summaries["sweep_methods"]["points"]
    for model in ("ppo", "ppo_ptx", "dpo", "grpo", "rloo"):
        lo, hi = methods["win_rate_vs_sft"][model]["ci95"]["heldout_labelers"]
        assert lo <= methods["win_rate_vs_sft"][model]["heldout_labelers"] <= hi, model
        assert math.isfinite(methods["gold_score"][model]), model
    for model in ("dpo", "grpo", "rloo"):
        assert (tmp_path / "sweep_methods" / "points" / "methods" / model / "model").is_dir()
        assert methods["stage_seconds"][model] > 0
    assert {"ppo", "ppo_ptx", "rm"} <= set(methods["shared_stage_seconds"])

    # A rerun finds every stage done and rewrites the same summary.
    again = sweep.run(_with_shared(SHARING["sweep_ptx"], shared), str(tmp_path / "sweep_ptx"))
    assert again["points"][1]["gold_score"] == ptx[1]["gold_score"]

    # Every notebook runs on these summaries.
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("RLHF_JAX_SWEEPS", str(tmp_path))
    notebooks = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
    assert len(notebooks) >= 7
    for path in notebooks:
        book = nbformat.read(path, as_version=4)
        nbclient.NotebookClient(book, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": os.path.dirname(path)}}).execute()
        errors = [o for cell in book.cells for o in cell.get("outputs", [])
                  if o.get("output_type") == "error"]
        assert not errors, (path, errors)


def _with_shared(spec, shared):
    cfg = _load(spec)
    cfg.shared_from = str(shared)
    return cfg


def test_sweep_config_errors_name_the_point_and_field():
    base = load_config(os.path.join(EXPERIMENTS, "instructgpt_tiny.py") + ":micro")
    bad_field = sweep_config(base, name="x", shared=(), stages=("ppo",), models=("ppo",),
                             points=[{"name": "a", "set": {"ppo.ppo.no_such": 1}}])
    with pytest.raises(ConfigError, match=r"point 'a'.*no_such"):
        sweep.check(bad_field)
    bad_stage = sweep_config(base, name="x", shared=("rmm",), stages=("ppo",), models=None,
                             points=[{"name": "a", "set": {}}])
    with pytest.raises(ConfigError, match=r"rmm"):
        sweep.check(bad_stage)
    bad_name = sweep_config(base, name="x", shared=(), stages=("ppo",), models=None,
                            points=[{"name": "a/b", "set": {}}])
    with pytest.raises(ConfigError, match=r"a/b"):
        sweep.check(bad_name)
    repeated = sweep_config(base, name="x", shared=(), stages=("ppo",), models=None,
                            points=[{"name": "a", "set": {}}, {"name": "a", "set": {}}])
    with pytest.raises(ConfigError, match="repeat"):
        sweep.check(repeated)
    bad_value = sweep_config(base, name="x", shared=(), stages=("ppo",), models=None,
                             points=[{"name": "a", "set": {"ppo.ppo.kl_coef": "high"}}])
    with pytest.raises(ConfigError, match=r"kl_coef"):
        sweep.check(bad_value)
