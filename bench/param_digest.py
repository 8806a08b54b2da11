"""Digests of the final parameters of tiny PPO runs, one per engine path, to check that a
refactor of the PPO engine changes no bit of what it trains.

    JAX_PLATFORMS=cpu python bench/param_digest.py > before.txt     # on the old commit
    JAX_PLATFORMS=cpu python bench/param_digest.py > after.txt      # on the new one
    diff before.txt after.txt                                      # empty: bit-identical

Each run is the PPO tests' toy world (``tests/ppo_toys.py``: a tiny policy, a hand-set marker
RM) for 3 iterations on 8 fake CPU devices; the digest is a SHA-256 over every leaf of
``model/`` (and ``model_ema/`` / ``lora/adapters`` where written), in tree order. Digests are
comparable only on one machine and jax build (XLA's kernels differ across CPUs).
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from ppo_toys import build_base, build_toy_dirs, ppo_config, toy_overrides  # noqa: E402

from rlhf_jax import checkpoint as ckpt_lib  # noqa: E402
from rlhf_jax.stages import ppo  # noqa: E402

COMMON = ("ppo.iterations=3", "ppo.rollout_batch_size=16", "ppo.minibatch_size=8",
          "ppo.lr=3e-2", "ppo.value_lr=3e-2", "ppo.ema_decay=0.9")
RUNS = {
    "gae": (),
    "gae_ptx": ("ppo.ptx_coef=1.0",),
    "grpo": ("ppo.advantage=grpo", "ppo.group_size=4", "ppo.ptx_coef=1.0"),
    "rloo": ("ppo.advantage=rloo", "ppo.group_size=4"),
    "lora": ("ppo.lora.rank=2", "ppo.lora.alpha=4", "ppo.ptx_coef=1.0"),
    "lora_value_lora": ("ppo.lora.rank=2", "ppo.value_lora.rank=2",
                        "ppo.value_lora.targets=('all',)"),
}


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for sub in ("model/params", "model_ema/params", "lora/adapters"):
        path = directory / sub
        if path.exists():
            tree = ckpt_lib.load_pytree(str(path))
            for leaf in jax.tree.leaves(tree):
                h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        toy = build_toy_dirs(build_base(), Path(tmp))
        for name, extra in RUNS.items():
            workdir = Path(tmp) / name
            ppo.train(ppo_config(*toy_overrides(toy, *COMMON, *extra)), str(workdir))
            print(name, digest(workdir), flush=True)


if __name__ == "__main__":
    main()
