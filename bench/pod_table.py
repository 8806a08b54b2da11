"""The pod table of docs/pod.md, from the compile reports in ``bench/compile_reports/``.

    python bench/pod_table.py      # markdown on stdout

One row group per report: the peak per device against HBM, TFLOP per call, and each step's
seconds as an overlapped .. serial range (``rlhf_jax/compile.py``: compute at peak, HBM traffic,
ICI collectives), with the model FLOPs utilization at each end; then one PPO-ptx iteration.
"""
from __future__ import annotations

import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ORDER = ("gpt2_124m", "llama32_1b", "llama3_8b", "llama3_70b")


def _s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{1e3 * x:.0f} ms" if x < 1 else f"{x:.2f} s"


def _range(row: dict) -> str:
    o, s = row.get("step_s_overlapped"), row.get("step_s_serial")
    mo, ms = row.get("mfu_overlapped"), row.get("mfu_serial")
    if o is None:
        return "-"
    bound = f" ({row['bound']})" if row.get("bound") else ""
    return f"{_s(o)} .. {_s(s)}, {100 * mo:.0f}% .. {100 * ms:.0f}%{bound}"


def table(paths: list[str]) -> str:
    lines = ["| config (slice, mesh data x fsdp x tensor) | stage: step | peak GB / device "
             "(HBM) | TFLOP / call | ICI | step: overlapped .. serial, MFU (bound) |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    key = lambda p: next((i for i, n in enumerate(ORDER) if os.path.basename(p).startswith(n + "_")),
                         len(ORDER))
    for path in sorted(paths, key=key):
        report = json.load(open(path))
        name = os.path.basename(path).split("_v")[0]
        hbm = report.get("hbm_bytes_per_device")
        first = True
        for stage, rows in report["stages"].items():
            info = report["stage_info"][stage]
            mesh = "x".join(str(v) for v in info["mesh"].values())
            label = f"`{name}.py` ({report['topology']}, {mesh})" if first else ""
            first = False
            for step, row in rows.items():
                peak = row.get("peak_bytes_per_device")
                lines.append(
                    f"| {label} | {stage}: {step}{'*' if 'loop_body_of' in row else ''}"
                    f"{'+' if 'included_in' in row else ''} | "
                    f"{peak / 1e9:.2f} ({hbm / 1e9:.1f}) | {(row.get('flops') or 0) / 1e12:,.1f} | "
                    f"{_s(row.get('comm_s'))} | {_range(row)} |")
                label = ""
            it = info.get("iteration")
            if it and stage == "ppo":
                lines.append(f"| | **one PPO-ptx iteration** | | {it['flops'] / 1e12:,.0f} | "
                             f"{_s(it.get('comm_s'))} | **{_range(it)}** |")
            sampler = info.get("sampler")
            if sampler:
                lines.append(f"| | sampler copy + KV cache (per device) | "
                             f"{sampler['weights_bytes_per_device'] / 1e9:.2f} + "
                             f"{sampler['kv_cache_bytes_per_device'] / 1e9:.2f} | | | "
                             f"{sampler['layout']} layout, {sampler['dtype']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(glob.glob(os.path.join(HERE, "compile_reports", "*.json"))))
