"""The reward model's two checks of the paper.

* ``rm.mode``: all C(K,2) pairs of a prompt in one batch element ("kway", the paper's choice)
  against every pair its own example, shuffled ("shuffled_pairs": footnote 5, each completion is
  in K-1 updates per epoch and the RM overfits within the first epoch);
* ``labelers`` (``:labelers``): leave-one-group-out over the world's training-labeler groups
  (App. E.2): the RM trains without one group's rankings and is tested on them.

    rlhf-jax sweep --config experiments/sweep_rm.py --workdir runs/sweep_rm
    rlhf-jax sweep --config experiments/sweep_rm.py:labelers --workdir runs/sweep_rm_labelers
"""
import os

from rlhf_jax.config import load_config, sweep_config

PIPELINE = os.path.join(os.path.dirname(__file__), "instructgpt_tiny.py")
UPSTREAM = ("world", "pretrain", "sft", "comparisons")
N_TRAINING_GROUPS = 4        # rlhf_jax.world.labelers.make_labeler_pool


def get_config(arg=None):
    args = set((arg or "").split(","))
    base = load_config(PIPELINE + (":micro" if "micro" in args else ""))
    # Validation accuracy and loss 4 times per epoch: overfitting shows within one. A K-way row
    # holds C(K,2) pairs, so shuffled pairs take that many times the steps per epoch.
    # One epoch each: the footnote's claim is about the first epoch, and it keeps the sweep short.
    base.rm.train.epochs = 1.0
    k, batch = base.comparisons.k, base.rm.train.batch_size
    steps_per_epoch = {"kway": base.comparisons.n_prompts // batch,
                       "shuffled_pairs": base.comparisons.n_prompts * k * (k - 1) // 2 // batch}
    if "labelers" in args:
        base.rm.train.eval_every = max(1, steps_per_epoch["kway"] // 4)
        points = [{"name": f"without=train-{g}", "set": {"comparisons.holdout_group": f"train-{g}"}}
                  for g in range(N_TRAINING_GROUPS)]
        return sweep_config(base, name="rm_labeler_groups", shared=UPSTREAM, stages=("rm",),
                            models=(), x="comparisons.holdout_group", points=points)
    points = [{"name": mode, "set": {"rm.mode": mode,
                                     "rm.train.eval_every": max(1, steps_per_epoch[mode] // 4)}}
              for mode in ("kway", "shuffled_pairs")]
    return sweep_config(base, name="rm_batching", shared=UPSTREAM, stages=("rm",), models=(),
                        x="rm.mode", points=points)
