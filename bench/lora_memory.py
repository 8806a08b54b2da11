"""PPO's update and value_update per-device memory on a TPU topology, full fine-tune vs LoRA.

Ahead-of-time on this CPU (``pip install -e ".[tpu]"``, ``JAX_PLATFORMS=cpu``), from shapes only,
with the same ``compile_step`` as ``rlhf-jax compile``: peak bytes = arguments + unaliased
outputs + temporaries (or XLA's heap peak, whichever is larger). LoRA here is rank ``--rank`` on
every attention and MLP projection of the policy (``ppo.lora``) and of the value network
(``ppo.value_lora``, on the frozen RM):

    JAX_PLATFORMS=cpu python bench/lora_memory.py --config experiments/llama32_1b.py \
        --topology v5e:4x4 --out bench/results/lora_memory_llama32_1b.json
"""
from __future__ import annotations

import argparse
import json
import os
import time

from out_path import add_out_argument, out_path
from rlhf_jax import compile as aot
from rlhf_jax.config import apply_overrides, load_config

STEPS = ("update", "value_update")


def measure(config: str, topology: str, overrides: list[str]) -> dict:
    cfg = apply_overrides(load_config(config), overrides)
    target = aot.get_target(topology)
    stage_cfg = aot.select_stages(cfg, "ppo")["ppo"]
    mesh = aot.stage_mesh("ppo", stage_cfg, target)
    program = aot._builder("ppo")(stage_cfg, mesh)
    out = {"mesh": dict(mesh.shape)}
    for name in STEPS:
        start = time.time()
        row = aot.compile_step(program.steps[name], target)
        out[name] = {k: row.get(k) for k in ("peak_bytes_per_device", "argument_bytes",
                                             "temp_bytes", "fits")}
        out[name]["compile_s"] = round(time.time() - start, 1)
        print(name, json.dumps(out[name]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--topology", required=True)
    parser.add_argument("--rank", type=int, default=16)
    add_out_argument(parser, "lora_memory_<config>")
    args = parser.parse_args()
    out = out_path(args.out, f"lora_memory_{os.path.splitext(os.path.basename(args.config))[0]}")
    lora = [f"ppo.ppo.{section}.{field}" for section in ("lora", "value_lora")
            for field in (f"rank={args.rank}", 'targets=("attn","mlp")')]
    report = {"config": args.config, "topology": args.topology, "rank": args.rank,
              "full": measure(args.config, args.topology, []),
              "lora": measure(args.config, args.topology, lora)}
    for name in STEPS:
        full, low = report["full"][name], report["lora"][name]
        report[f"{name}_lora_over_full"] = round(
            low["peak_bytes_per_device"] / full["peak_bytes_per_device"], 3)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k.endswith("_over_full")}))


if __name__ == "__main__":
    main()
