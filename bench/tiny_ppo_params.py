"""Final parameters of a tiny PPO-ptx run, to compare two versions of the code.

A check, not a test: a change that should leave the numbers alone (a cache layout, a reordered
matmul) is run against the previous commit, from a ``git worktree``::

    git worktree add /tmp/before <commit>
    PYTHONPATH=/tmp/before:/tmp/before/tests python bench/tiny_ppo_params.py /tmp/before.npz
    PYTHONPATH=.:tests python bench/tiny_ppo_params.py /tmp/after.npz
    python bench/tiny_ppo_params.py --compare /tmp/before.npz /tmp/after.npz

The run is the PPO tests' toy (``tests/ppo_toys.py``: a 2-layer policy, a marker reward model):
6 iterations of 32 rollouts, minibatches of 8, ptx_coef 0.5. ``--compare`` prints, per leaf, the
largest |difference| over the leaf's largest |value| and the relative L2 difference, and the
relative L2 over all leaves but the attention key biases, whose gradient is zero in exact
arithmetic (softmax ignores a shift shared by all keys), so Adam fills them with rounding noise.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import numpy as np


def run(out: str) -> None:
    import jax
    from ppo_toys import build_base, build_toy_dirs, ppo_config, toy_overrides

    from rlhf_jax import model_io
    from rlhf_jax.stages import ppo
    root = pathlib.Path(tempfile.mkdtemp())
    dirs = build_toy_dirs(build_base(), root)
    cfg = ppo_config(*toy_overrides(dirs, "ppo.iterations=6", "ppo.rollout_batch_size=32",
                                    "ppo.minibatch_size=8", "ppo.lr=3e-3", "ppo.value_lr=3e-3",
                                    "ppo.ptx_coef=0.5"))
    ppo.train(cfg, str(root / "ppo"))
    _, params, _, _ = model_io.load_model(str(root / "ppo" / "model"), None)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    np.savez(out, **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves})
    print(f"wrote {out} ({len(leaves)} leaves)")


def compare(before_path: str, after_path: str) -> None:
    before, after = np.load(before_path), np.load(after_path)
    rows = []
    for name in before.files:
        a, b = before[name], after[name]
        rows.append((float(np.abs(a - b).max() / np.abs(a).max()),
                     float(np.linalg.norm(a - b) / np.linalg.norm(a)), name))
    for max_rel, l2_rel, name in sorted(rows):
        print(f"{max_rel:10.3e} {l2_rel:10.3e}  {name}")
    kept = [n for n in before.files if "['k']['bias']" not in n]
    num = sum(float(((before[n] - after[n]) ** 2).sum()) for n in kept)
    den = sum(float((before[n] ** 2).sum()) for n in kept)
    print(f"relative L2 over all leaves but the key biases: {np.sqrt(num / den):.3e}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", help="npz to write the final parameters to")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args(argv)
    if args.compare:
        compare(*args.compare)
    elif args.out:
        run(args.out)
    else:
        parser.error("give an output npz, or --compare BEFORE AFTER")


if __name__ == "__main__":
    main(sys.argv[1:])
