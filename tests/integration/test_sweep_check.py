"""`rlhf-jax sweep` checks the config of every stage each point will run before the first stage
(the shared SFT / RM / PPO can take an hour): a bad field of a method stage (dpo, grpo, rloo)
that only a point's ``set`` introduces fails there, in one line naming the point and the field,
and nothing trains."""
import os

import pytest

from rlhf_jax import cli, pipeline, sweep
from rlhf_jax.config import group_method_stage, load_config, stage_configs
from rlhf_jax.errors import ConfigError

from paths import EXPERIMENTS
METHODS_MICRO = os.path.join(EXPERIMENTS, "sweep_methods.py") + ":micro"
PIPELINE_MICRO = os.path.join(EXPERIMENTS, "instructgpt_tiny.py") + ":micro"
# Where a stage's models and data are: the pipeline's workdir once the stages before have run,
# their starts and architectures when it checks before the first stage.
LOCATIONS = ("init_from", "policy_from", "reward_from", "value_from", "model", "policy_model",
             "reward_model", "value_model", "data.train", "data.prompts", "data.pretrain")


@pytest.fixture
def no_training(monkeypatch):
    """Any pipeline run (shared or a point's) fails the test: the check must stop first."""
    def run(*args, **kwargs):
        raise AssertionError("a pipeline stage started before the sweep's check failed")
    monkeypatch.setattr(pipeline, "run", run)


def _methods_sweep(*points: dict, **fields):
    spec = load_config(METHODS_MICRO)
    spec.points = list(points)
    for key, value in fields.items():
        spec[key] = value
    return spec


@pytest.mark.parametrize("point, expected", [
    pytest.param({"name": "bad_beta", "set": {"dpo.beta": -1.0}},
                 "sweep point 'bad_beta': config: dpo stage: beta=-1.0: expected a finite number "
                 "> 0", id="dpo.beta"),
    pytest.param({"name": "bad_dpo_batch", "set": {"dpo.train.batch_size": 0}},
                 "sweep point 'bad_dpo_batch': config: dpo stage: train.batch_size=0: expected a "
                 "positive", id="dpo.train.batch_size"),
    # 3 does not divide the micro PPO rollout (16 samples): grpo, the first group method, fails.
    pytest.param({"name": "bad_group", "set": {"group_size": 3}},
                 "sweep point 'bad_group': config: grpo stage: ppo.group_size=3: expected a "
                 "divisor", id="grpo.group_size"),
    pytest.param({"name": "rloo_only", "stages": ("rloo",), "set": {"group_size": 5}},
                 "sweep point 'rloo_only': config: rloo stage: ppo.group_size=5: expected a "
                 "divisor", id="rloo.group_size"),
    pytest.param({"name": "adaptive_grpo", "set": {"ppo.ppo.kl_controller": "adaptive"}},
                 "sweep point 'adaptive_grpo': config: grpo stage: ppo.kl_controller='adaptive': "
                 "expected 'fixed'", id="grpo.kl_controller"),
])
def test_a_points_method_stage_fails_the_check_before_any_stage(tmp_path, no_training, point,
                                                                 expected):
    spec = _methods_sweep({"name": "fine", "set": {}}, point)
    workdir = tmp_path / "sweep"
    with pytest.raises(ConfigError) as error:
        sweep.run(spec, str(workdir))
    message = str(error.value)
    assert message.startswith(expected), message
    assert "\n" not in message
    assert not workdir.exists()      # no stage output, not even the workdir


def test_a_shared_method_stage_is_checked_with_the_base(tmp_path, no_training):
    """A method stage in ``shared`` runs in the shared workdir with the base config."""
    spec = _methods_sweep({"name": "fine", "set": {}},
                          shared=tuple(load_config(METHODS_MICRO).shared) + ("dpo",),
                          stages=("grpo", "rloo"))
    spec.base.dpo.beta = 0.0
    with pytest.raises(ConfigError, match=r"^sweep shared stages \[.*'dpo'\]: config: dpo stage: "
                                          r"beta=0\.0: expected a finite number > 0"):
        sweep.run(spec, str(tmp_path / "sweep"))
    assert not (tmp_path / "sweep").exists()


def test_method_stages_a_sweep_does_not_run_are_not_checked(no_training):
    """Only what runs is checked: a point without dpo may leave the dpo section broken."""
    sweep.check(_methods_sweep({"name": "no_dpo", "stages": ("grpo",), "set": {"dpo.beta": -1.0}}))


def test_cli_reports_the_point_in_one_line(tmp_path, capsys, no_training):
    workdir = tmp_path / "sweep"
    code = cli.main(["sweep", "--config", METHODS_MICRO, "--workdir", str(workdir),
                     "--config.base.dpo.train.batch_size=0"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == ("rlhf-jax: error: sweep point 'methods': config: dpo stage: "
                   "train.batch_size=0: expected a positive integer"), err
    assert not workdir.exists()


def _without_locations(stage_cfg) -> dict:
    out = stage_cfg.to_dict()
    for key in LOCATIONS:
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node[part]
        node.pop(leaf, None)
    return out


def test_the_checked_method_configs_are_the_ones_the_pipeline_trains(tmp_path):
    """One source of truth: but for where models and data are, the method stages ``check``
    validates are the configs ``pipeline._run`` trains."""
    cfg = load_config(PIPELINE_MICRO)
    checked = stage_configs(cfg, methods=True)
    assert "dpo" not in stage_configs(cfg)      # validate.check's: the default pipeline's stages
    assert checked["dpo"].model.to_dict() == checked["sft"].model.to_dict()
    trained = {"dpo": pipeline.dpo_stage_config(cfg, str(tmp_path), "comparisons.jsonl"),
               **{m: pipeline.ppo_stage_config(cfg, str(tmp_path), m) for m in ("grpo", "rloo")}}
    for name, config in trained.items():
        validated = checked["dpo"] if name == "dpo" else group_method_stage(checked["ppo"], cfg,
                                                                            name)
        assert _without_locations(validated) == _without_locations(config), name
