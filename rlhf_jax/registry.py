"""The stage graph, in one place: every stage of the pipeline, what trains it, what it reads and
what it writes.

    world -> pretrain -> sft, sft_ptx -> comparisons -> rm -> ppo, ppo_ptx -> [dpo, grpo, rloo] -> eval

Two tables, each read by the modules that used to keep their own copy of it:

* ``ENGINES``: the four kinds of training (``sft``, ``rm``, ``ppo``, ``dpo``), each a
  ``rlhf-jax`` command and a ``compile`` / ``profile`` ``--stage``: its ``train`` and ``build``
  functions, its default config (``rlhf_jax.config``), the config sections holding its networks.
  Functions are ``"module:function"`` strings, imported only by ``load`` where they run, so this
  module imports nothing but the standard library (the CLI reads it before jax is imported).
* ``STAGES``: the pipeline's stages in the order they run. Each names its kind, the engine that
  trains it and the pipeline config section it trains with, the stages whose outputs it reads
  (``after``) and whose models it starts from (``models_from``: stage config field -> stage),
  the model directory it writes, the names eval reports its model under, and whether it is a
  default stage or a *method* stage (run only when ``cfg.methods`` names it or a sweep selects
  it). The method stages grpo and rloo are the ppo engine with a fixed advantage estimator.

``ADVANTAGES`` lists PPO's advantage estimators (``ppo.advantage``) by name; the estimators
themselves are ``rlhf_jax.stages.ppo.estimators.ESTIMATORS`` (jax code), which a unit test
keeps in step with this list.
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from rlhf_jax import storage


@dataclasses.dataclass(frozen=True)
class Engine:
    """A kind of training: an ``rlhf-jax`` command and a ``compile`` / ``profile`` stage."""
    name: str
    train: str                         # "module:function": train(cfg, workdir) -> metrics
    build: str                         # "module:function": build(cfg, mesh, **kw) -> Program
    config: str                        # "module:function": the stage's default ConfigDict
    model_sections: tuple[str, ...]    # config sections holding a network architecture
    help: str                          # the command's one-line help


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the pipeline (``<workdir>/<name>``, finished when ``<name>/DONE`` exists)."""
    name: str
    kind: str                          # world / pretrain / sft / comparisons / rm / ppo / dpo / eval
    engine: str | None = None          # the ENGINES entry that trains it (None: not a training)
    section: str | None = None         # the pipeline config section it trains with
    after: tuple[str, ...] = ()        # stages whose outputs it reads
    models_from: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}))   # stage config field -> stage it reads
    model_dir: str | None = None       # <workdir>/<name>/<model_dir>: the model it writes
    ema: bool = False                  # also writes <name>/model_ema (with ppo.ema_decay > 0)
    method: bool = False               # only when cfg.methods names it or a sweep selects it
    advantage: str | None = None       # the ppo engine's estimator it fixes (grpo / rloo)
    ptx: bool = False                  # trains with pretraining text mixed in (sft_ptx, ppo_ptx)
    eval_names: tuple[str, ...] = ()   # the models eval reports from its model directory

    @property
    def train(self) -> str | None:
        return ENGINES[self.engine].train if self.engine else None

    @property
    def build(self) -> str | None:
        return ENGINES[self.engine].build if self.engine else None

    @property
    def config(self) -> str | None:
        return ENGINES[self.engine].config if self.engine else None


def _frozen(mapping: dict) -> Mapping:
    return MappingProxyType(dict(mapping))


ENGINES: Mapping[str, Engine] = _frozen({e.name: e for e in (
    Engine("sft", "rlhf_jax.stages.sft:train", "rlhf_jax.stages.sft:build",
           "rlhf_jax.config:sft_config", ("model",),
           "supervised fine-tuning on demonstrations (loss on response tokens only); with "
           "--config.data.format=pretrain it trains a base LM on plain text"),
    Engine("rm", "rlhf_jax.stages.reward:train", "rlhf_jax.stages.reward:build",
           "rlhf_jax.config:rm_config", ("model",),
           "reward model on K-way rankings (InstructGPT Eq. 1), then the demo-mean-0 bias"),
    Engine("ppo", "rlhf_jax.stages.ppo:train", "rlhf_jax.stages.ppo:build",
           "rlhf_jax.config:ppo_config", ("policy_model", "reward_model", "value_model"),
           "PPO / PPO-ptx from an SFT policy, value from the RM, frozen SFT reference and RM"),
    Engine("dpo", "rlhf_jax.stages.dpo:train", "rlhf_jax.stages.dpo:build",
           "rlhf_jax.config:dpo_config", ("model",),
           "DPO: the SFT policy trained directly on the RM's comparisons (every pair of a "
           "K-way ranking), against the frozen SFT reference; no RM, no PPO"),
)})
# The training commands in the order `rlhf-jax --help` lists them.
COMMANDS: tuple[str, ...] = ("sft", "rm", "dpo", "ppo")

# PPO's advantage estimators (``ppo.advantage``), and those with group baselines instead of a
# value network (G samples per prompt): the pipeline's grpo and rloo stages are its ppo stage
# with one of them.
ADVANTAGES: tuple[str, ...] = ("gae", "grpo", "rloo")
GROUP_ADVANTAGES: tuple[str, ...] = ("grpo", "rloo")

EMA_DIR = "model_ema"
_PPO_INPUTS = ("sft_ptx", "rm", "world")
_PPO_MODELS = {"policy_from": "sft_ptx", "reward_from": "rm"}

STAGE_LIST: tuple[Stage, ...] = (
    Stage("world", "world"),
    Stage("pretrain", "pretrain", "sft", "pretrain", ("world",), model_dir="model",
          eval_names=("base", "base_prompted")),
    Stage("sft", "sft", "sft", "sft", ("pretrain", "world"), _frozen({"init_from": "pretrain"}),
          model_dir="model", eval_names=("sft",)),
    Stage("sft_ptx", "sft", "sft", "sft_ptx", ("pretrain", "world"),
          _frozen({"init_from": "pretrain"}), model_dir="model", ptx=True),
    Stage("comparisons", "comparisons", after=("sft", "world")),
    Stage("rm", "rm", "rm", "rm", ("sft", "comparisons", "world"), _frozen({"init_from": "sft"}),
          model_dir="model"),
    Stage("ppo", "ppo", "ppo", "ppo", _PPO_INPUTS, _frozen(_PPO_MODELS), model_dir="model",
          ema=True, eval_names=("ppo",)),
    Stage("ppo_ptx", "ppo", "ppo", "ppo", _PPO_INPUTS, _frozen(_PPO_MODELS), model_dir="model",
          ema=True, ptx=True, eval_names=("ppo_ptx",)),
    Stage("dpo", "dpo", "dpo", "dpo", ("sft", "comparisons"), _frozen({"init_from": "sft"}),
          model_dir="model", method=True, eval_names=("dpo",)),
    Stage("grpo", "ppo", "ppo", "ppo", _PPO_INPUTS, _frozen(_PPO_MODELS), model_dir="model",
          ema=True, method=True, advantage="grpo", eval_names=("grpo",)),
    Stage("rloo", "ppo", "ppo", "ppo", _PPO_INPUTS, _frozen(_PPO_MODELS), model_dir="model",
          ema=True, method=True, advantage="rloo", eval_names=("rloo",)),
    Stage("eval", "eval", after=("world", "pretrain", "sft", "sft_ptx", "comparisons", "rm", "ppo",
                                 "ppo_ptx")),
)
STAGES: Mapping[str, Stage] = _frozen({s.name: s for s in STAGE_LIST})

# Every stage in the order the pipeline runs them; the default pipeline; the other methods from
# the same SFT / RM (run only when ``cfg.methods`` names them or a sweep selects them).
ALL_STAGES: tuple[str, ...] = tuple(STAGES)
DEFAULT_STAGES: tuple[str, ...] = tuple(s.name for s in STAGE_LIST if not s.method)
METHOD_STAGES: tuple[str, ...] = tuple(s.name for s in STAGE_LIST if s.method)
# The stage a ``base_model`` checkpoint stands in for (the pipeline then skips it).
BASE_STAGE = "pretrain"
# The engines in the order the pipeline first runs them (compile's and profile's stages).
ENGINE_ORDER: tuple[str, ...] = tuple(dict.fromkeys(s.engine for s in STAGE_LIST if s.engine))
# The engines the default pipeline runs: a config with a section of one of these names is a
# pipeline config (a stage's own config has none).
DEFAULT_ENGINES: tuple[str, ...] = tuple(
    e for e in ENGINE_ORDER if any(STAGES[s].engine == e for s in DEFAULT_STAGES))
# The pipeline config sections the default stages train with.
DEFAULT_SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(
    STAGES[s].section for s in DEFAULT_STAGES if STAGES[s].section))


def _eval_models() -> dict[str, tuple[str, str]]:
    """model name -> (stage, model subdirectory): each group (the default stages, then the
    methods) lists its stages' models, then their EMAs."""
    out: dict[str, tuple[str, str]] = {}
    for method in (False, True):
        group = [s for s in STAGE_LIST if s.method == method and s.model_dir]
        out.update({name: (s.name, s.model_dir) for s in group for name in s.eval_names})
        out.update({f"{s.name}_ema": (s.name, EMA_DIR) for s in group if s.ema})
    return out


# The models `rlhf-jax eval` reports, in the order of its tables, with their directories.
EVAL_MODELS: Mapping[str, tuple[str, str]] = _frozen(_eval_models())


def stages(*, engine: str | None = None, method: bool | None = None) -> tuple[str, ...]:
    """Stage names in pipeline order, those trained by ``engine`` / (not) methods only."""
    return tuple(s.name for s in STAGE_LIST if (engine is None or s.engine == engine)
                 and (method is None or s.method == method))


def model_path(workdir: str, stage: str) -> str:
    """The model directory ``stage`` writes in a pipeline ``workdir``."""
    return storage.join(workdir, stage, STAGES[stage].model_dir)


def load(target: str) -> Callable[..., Any]:
    """The function a ``"module:function"`` string names (the module imported now)."""
    module_name, _, name = target.partition(":")
    return getattr(importlib.import_module(module_name), name)
