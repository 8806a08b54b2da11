"""rlhf_jax.registry: the one table of the pipeline's stages, and the modules that read it
(pipeline, config, validate, cli, compile, profile, evaluation_report, sweep)."""
import os
import subprocess
import sys

import pytest

from rlhf_jax import cli, compile as aot, config, evaluation_report, pipeline, profile, registry
from rlhf_jax import sweep, validate
from rlhf_jax.config import load_config, stage_configs

from paths import EXPERIMENTS, REPO
PIPELINE_MICRO = os.path.join(EXPERIMENTS, "instructgpt_tiny.py") + ":micro"


def test_the_pipeline_order_and_its_method_stages():
    assert registry.ALL_STAGES == ("world", "pretrain", "sft", "sft_ptx", "comparisons", "rm",
                                   "ppo", "ppo_ptx", "dpo", "grpo", "rloo", "eval")
    assert registry.DEFAULT_STAGES == ("world", "pretrain", "sft", "sft_ptx", "comparisons", "rm",
                                       "ppo", "ppo_ptx", "eval")
    assert registry.METHOD_STAGES == ("dpo", "grpo", "rloo")
    # the pipeline's names are the registry's
    assert (pipeline.STAGES, pipeline.METHOD_STAGES, pipeline.ALL_STAGES) == (
        registry.DEFAULT_STAGES, registry.METHOD_STAGES, registry.ALL_STAGES)
    assert registry.stages(engine="ppo", method=False) == ("ppo", "ppo_ptx")
    assert registry.stages(engine="ppo", method=True) == ("grpo", "rloo")
    assert registry.stages(engine="sft") == ("pretrain", "sft", "sft_ptx")


def test_every_stage_reads_only_stages_that_ran_before_it():
    order = registry.ALL_STAGES.index
    for stage in registry.STAGE_LIST:
        for before in stage.after + tuple(stage.models_from.values()):
            assert order(before) < order(stage.name), (stage.name, before)
        for source in stage.models_from.values():
            assert registry.STAGES[source].model_dir, (stage.name, source)
        # a stage trained by an engine writes a model; the others write none
        assert bool(stage.engine) == bool(stage.model_dir) == bool(stage.section), stage.name
        if stage.advantage is not None:
            assert stage.engine == "ppo" and stage.method
    assert registry.model_path("w", "sft_ptx") == os.path.join("w", "sft_ptx", "model")


def test_every_function_string_imports_and_is_callable():
    for engine in registry.ENGINES.values():
        for target in (engine.train, engine.build, engine.config):
            assert callable(registry.load(target)), target
        assert engine.train.partition(":")[0] == engine.build.partition(":")[0]
        defaults = registry.load(engine.config)()
        assert defaults.name == engine.name    # profile's report names the stage config by it
        for section in engine.model_sections:
            assert section in defaults, (engine.name, section)
    for stage in registry.STAGE_LIST:
        if stage.engine:
            assert (stage.train, stage.build, stage.config) == (
                registry.ENGINES[stage.engine].train, registry.ENGINES[stage.engine].build,
                registry.ENGINES[stage.engine].config)
        else:
            assert stage.train is None and stage.build is None


def test_the_advantage_estimators_are_ppos():
    from rlhf_jax.stages.ppo.estimators import ESTIMATORS
    assert registry.ADVANTAGES == tuple(ESTIMATORS)
    assert registry.GROUP_ADVANTAGES == tuple(k for k, e in ESTIMATORS.items() if e.grouped)
    assert {s.advantage for s in registry.STAGE_LIST} - {None} == set(registry.GROUP_ADVANTAGES)
    assert validate.ENUMS["ppo.advantage"] == registry.ADVANTAGES
    assert config.ppo_config().ppo.advantage in registry.ADVANTAGES


def test_the_registry_and_the_cli_import_no_jax():
    code = ("import sys, rlhf_jax.registry, rlhf_jax.cli; "
            "assert 'jax' not in sys.modules and 'rlhf_jax.stages' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def _choices(parser, command: str) -> list:
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return list(next(a for a in sub._actions if a.dest == "stage").choices)


def test_cli_compile_and_profile_take_their_stages_from_the_registry():
    assert list(cli.TRAIN_COMMANDS) == [*registry.COMMANDS, "pipeline", "sweep"]
    assert set(registry.COMMANDS) == set(registry.ENGINES)
    for name in registry.COMMANDS:
        assert cli.TRAIN_COMMANDS[name] == (registry.ENGINES[name].train,
                                            registry.ENGINES[name].help)
        assert f"rlhf_jax.config:{cli.DEFAULT_CONFIGS[name]}" == registry.ENGINES[name].config
    parser = cli.build_parser()
    assert _choices(parser, "compile") == ["sft", "rm", "ppo", "dpo", "all"]
    assert _choices(parser, "profile") == ["sft", "rm", "ppo", "dpo"] == list(registry.ENGINE_ORDER)
    with pytest.raises(ValueError, match="expected one of sft, rm, ppo, dpo"):
        profile.build_program("grpo", None, None)


def test_compile_selects_and_sizes_stages_by_the_registry():
    cfg = load_config(PIPELINE_MICRO)
    assert list(aot.select_stages(cfg, "all")) == ["sft", "rm", "ppo"]
    cfg.methods = ("dpo",)
    assert list(aot.select_stages(cfg, "all")) == list(registry.ENGINE_ORDER)
    configs = stage_configs(cfg, methods=True)
    assert list(aot.layer_sections("ppo", configs["ppo"])) == ["policy_model", "reward_model",
                                                                "value_model"]
    configs["ppo"].ppo.advantage = "grpo"
    assert list(aot.layer_sections("ppo", configs["ppo"])) == ["policy_model", "reward_model"]
    assert list(aot.layer_sections("sft", configs["sft"])) == ["model"]


def test_pipeline_config_sections_and_pipeline_detection():
    cfg = load_config(PIPELINE_MICRO)
    assert registry.DEFAULT_SECTIONS == ("pretrain", "sft", "sft_ptx", "rm", "ppo")
    assert all(section in cfg for section in registry.DEFAULT_SECTIONS)
    assert registry.DEFAULT_ENGINES == ("sft", "rm", "ppo")
    # validate checks these sections itself (stage_configs has no entry for them)
    assert [s for s in registry.DEFAULT_SECTIONS if s not in registry.DEFAULT_ENGINES] == [
        "pretrain", "sft_ptx"]
    assert list(stage_configs(cfg)) == ["sft", "rm", "ppo"]
    assert list(stage_configs(config.dpo_config())) == ["dpo"]      # one stage's config


def test_the_pipelines_ppo_family_stages_from_the_registry(tmp_path):
    cfg = load_config(PIPELINE_MICRO)
    workdir = os.path.abspath(str(tmp_path))
    for name in registry.stages(engine="ppo"):
        stage_cfg = pipeline.ppo_stage_config(cfg, workdir, name)
        assert stage_cfg.name == name
        assert stage_cfg.policy_from == os.path.join(workdir, "sft_ptx", "model")
        assert stage_cfg.reward_from == os.path.join(workdir, "rm", "model")
        assert stage_cfg.ppo.ptx_coef == (cfg.ppo_ptx_coef if name == "ppo_ptx" else 0.0)
        assert stage_cfg.ppo.advantage == (registry.STAGES[name].advantage or "gae")
        assert stage_cfg.ppo.group_size == (cfg.group_size if registry.STAGES[name].advantage
                                            else cfg.ppo.ppo.group_size)
    dpo = pipeline.dpo_stage_config(cfg, workdir, "c.jsonl")
    assert dpo.init_from == os.path.join(workdir, "sft", "model") and dpo.data.train == "c.jsonl"


def test_profile_starts_each_stage_from_the_models_the_registry_names(tmp_path):
    cfg = load_config(PIPELINE_MICRO)
    for stage in ("pretrain", "sft", "sft_ptx", "rm"):
        os.makedirs(tmp_path / stage / "model")
    paths = {stage: profile.stage_config(cfg, stage, str(tmp_path)) for stage in ("sft", "rm", "ppo")}
    assert paths["sft"].init_from == str(tmp_path / "pretrain" / "model")
    assert paths["rm"].init_from == str(tmp_path / "sft" / "model")
    assert (paths["ppo"].policy_from, paths["ppo"].reward_from) == (
        str(tmp_path / "sft_ptx" / "model"), str(tmp_path / "rm" / "model"))


def test_eval_models_from_the_registry():
    assert evaluation_report.MODELS == ("base", "base_prompted", "sft", "ppo", "ppo_ptx", "ppo_ema",
                                        "ppo_ptx_ema", "dpo", "grpo", "rloo", "grpo_ema",
                                        "rloo_ema")
    assert evaluation_report.MODEL_DIRS["base"] == ("pretrain", "model")
    assert evaluation_report.MODEL_DIRS["ppo_ptx_ema"] == ("ppo_ptx", "model_ema")
    assert evaluation_report.OPTIONAL_MODELS == ("ppo_ema", "ppo_ptx_ema", "dpo", "grpo", "rloo",
                                                 "grpo_ema", "rloo_ema")
    assert evaluation_report.PPO_INIT == "sft_ptx"
    assert evaluation_report.FROM_PPO_INIT == ("ppo", "ppo_ptx", "ppo_ema", "ppo_ptx_ema", "grpo",
                                               "rloo", "grpo_ema", "rloo_ema")
    assert list(evaluation_report.TRAINED_BY) == ["ppo", "ppo_ptx", "dpo", "grpo", "rloo"]
    assert evaluation_report.METHODS == registry.METHOD_STAGES


def test_sweep_stage_names_are_the_registrys():
    from ml_collections import ConfigDict
    spec = ConfigDict(dict(stages=("ppo", "nope"), shared=()))
    with pytest.raises(Exception, match=r"\['nope'\] are not pipeline stages; expected some of "
                                        + r"\['world', 'pretrain'.*'rloo', 'eval'\]"):
        sweep._stages(spec, {"name": "p"}, "stages")
