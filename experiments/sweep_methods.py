"""Methods from the same SFT and RM, one table: PPO, PPO-ptx, DPO, GRPO and RLOO.

PPO and PPO-ptx are the shared workdir's own (trained once); DPO trains SFT on the RM's
comparisons, GRPO and RLOO are the ppo stage (from sft_ptx, the RM as reward, PPO's episodes)
with group baselines of ``group_size`` samples per prompt instead of a value network. sweep.json
holds each method's win rate vs SFT with its CI, gold score, KL and capability; the point's
``stage_seconds`` are the new methods' wall times, ``shared_stage_seconds`` PPO's and PPO-ptx's.

    rlhf-jax sweep --config experiments/sweep_methods.py --workdir runs/sweep_methods \\
        --config.shared_from=runs/seeds/points/seed=0

The same table at another seed of the seeds sweep (its world, labelers, SFT, RM and PPO runs;
the new methods train with that seed too): ``--config experiments/sweep_methods.py:seed=1
--config.shared_from=runs/seeds/points/seed=1``. Arguments combine: ``:micro,seed=1``.
"""
import os

from rlhf_jax.config import load_config, sweep_config

PIPELINE = os.path.join(os.path.dirname(__file__), "instructgpt_tiny.py")
SHARED = ("world", "pretrain", "sft", "sft_ptx", "comparisons", "rm", "ppo", "ppo_ptx")
METHODS = ("dpo", "grpo", "rloo")


SEEDED = ("seed", "world.seed", *(f"{stage}.seed" for stage in
                                   ("pretrain", "sft", "sft_ptx", "rm", "ppo", "dpo")))


def get_config(arg=None):
    args = dict(a.partition("=")[::2] for a in (arg or "").split(",") if a)
    unknown = set(args) - {"micro", "seed"}
    if unknown:
        raise ValueError(f"sweep_methods.py:{arg}: unknown argument(s) {sorted(unknown)}; "
                         "expected 'micro' and/or 'seed=N'")
    base = load_config(PIPELINE + (":micro" if "micro" in args else ""))
    if "seed" in args:      # as the seeds sweep sets its points (experiments/sweep_seeds.py)
        for key in SEEDED:
            section, _, field = key.rpartition(".")
            (base[section] if section else base)[field] = int(args["seed"])
    return sweep_config(base, name="methods", shared=SHARED, stages=METHODS,
                        models=("ppo", "ppo_ptx") + METHODS, x="",
                        points=[{"name": "methods", "set": {}}])
