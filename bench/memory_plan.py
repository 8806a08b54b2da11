"""The PPO memory plan on a GPT-2 124M update, before and after, on this machine's CPU.

    JAX_PLATFORMS=cpu python bench/memory_plan.py [--out bench/results/memory_plan_gpt2_124m.json]

(without ``--out``: a new ``bench/results/memory_plan_gpt2_124m-<UTC time>.json``)

Builds the PPO program for GPT-2 124M shapes (vocab 50257, d 768, 12 layers) twice, from shapes
alone, at the paper's minibatch geometry (64 episodes, 8 pretraining sequences each: compiled
only) and at a small one (run): "before" = reference and RM in float32, log-probs over the full [B, N, V] logits, no remat;
"after" = the memory plan (reference and RM in bfloat16, log-probs and entropy in chunks of 32
response positions, per-layer remat). The LM head runs only on response positions in both (that
part is structural). For each: XLA's memory_analysis() of the compiled update and experience
steps, the frozen networks' bytes, then one update on the same random weights and data, whose
statistics and new parameters must agree.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import ml_collections
import numpy as np

from out_path import add_out_argument, out_path
from rlhf_jax.config import ppo_config
from rlhf_jax.sharding import make_mesh
from rlhf_jax.stages import ppo

GPT2_124M = dict(arch="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
                 max_position=1024)


def config(plan: bool, paper_geometry: bool) -> ml_collections.ConfigDict:
    """``paper_geometry``: the paper's minibatch of 64 episodes with 8 pretraining sequences each
    (compiled only: memory); otherwise 8 episodes x 1 (small enough to run the update here)."""
    c = ppo_config()
    c.policy_model = ml_collections.ConfigDict(GPT2_124M)
    c.reward_model = ml_collections.ConfigDict(GPT2_124M)
    c.mesh.shape = (1, 1, 1)
    c.data.max_prompt_len, c.data.max_response_len, c.data.ptx_seq_len = 128, 128, 256
    if paper_geometry:
        c.ppo.rollout_batch_size, c.ppo.minibatch_size, c.ppo.ptx_per_episode = 64, 64, 8
    else:
        c.ppo.rollout_batch_size, c.ppo.minibatch_size, c.ppo.ptx_per_episode = 16, 8, 1
    c.ppo.ptx_coef = 1.0
    c.ppo.frozen_dtype = "bfloat16" if plan else "float32"
    c.ppo.logprob_chunk = 32 if plan else 0
    c.model_runtime.remat = plan
    return c


def memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def measure(plan: bool, paper_geometry: bool) -> dict:
    program = ppo.build(config(plan, paper_geometry), make_mesh((1, 1, 1)))
    out: dict = {"plan": plan}
    compiled = {}
    for name in ("update", "experience"):
        t0 = time.perf_counter()
        compiled[name] = program.steps[name].lower().compile()
        out[f"{name}_compile_s"] = time.perf_counter() - t0
        out[f"{name}_bytes"] = memory(compiled[name])
    if paper_geometry:
        return out
    state, frozen = program.init_state(jax.random.key(0))
    out["frozen_bytes"] = int(sum(x.nbytes for x in jax.tree.leaves((frozen.reference, frozen.reward))))
    args = program.random_args("update", state, frozen, jax.random.key(1))
    t0 = time.perf_counter()
    new_policy, _, stats = compiled["update"](*args)
    jax.block_until_ready(new_policy)
    out["update_s"] = time.perf_counter() - t0
    out["stats"] = {k: float(v) for k, v in jax.device_get(stats).items()}
    out["_params"] = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(new_policy.params))]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_argument(parser, "memory_plan_gpt2_124m")
    args = parser.parse_args()
    out = out_path(args.out, "memory_plan_gpt2_124m")
    paper = {"before": measure(False, True), "after": measure(True, True)}
    before, after = measure(False, False), measure(True, False)
    max_param_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(before.pop("_params"),
                                                                         after.pop("_params")))
    stat_diff = {k: abs(before["stats"][k] - after["stats"][k]) for k in before["stats"]}
    report = {"model": "gpt2-124m", "device": str(jax.devices()[0].device_kind),
              "paper_geometry": "minibatch 64 x (128 prompt + 128 response), ptx 512 x 256, "
                                "rollout 64 (compiled only)",
              "paper": paper,
              "small_geometry": "minibatch 8 x (128 + 128), ptx 8 x 256, rollout 16 (run)",
              "before": before, "after": after, "max_param_diff": max_param_diff,
              "stat_abs_diff": stat_diff}
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    gb = lambda n: f"{n / 2**30:.2f} GiB"
    for label, (b_, a_) in (("paper geometry", (paper["before"], paper["after"])),
                            ("small geometry", (before, after))):
        for step in ("update", "experience"):
            b, a = b_[f"{step}_bytes"], a_[f"{step}_bytes"]
            print(f"{label} {step:10s} peak {gb(b['peak'])} -> {gb(a['peak'])}   "
                  f"temp {gb(b['temp'])} -> {gb(a['temp'])}")
    print(f"frozen reference + RM {gb(before['frozen_bytes'])} -> {gb(after['frozen_bytes'])}")
    print(f"same update: max |param diff| {max_param_diff:.2e}, stats diff "
          f"{max(stat_diff.values()):.2e}; report in {out}")


if __name__ == "__main__":
    main()
