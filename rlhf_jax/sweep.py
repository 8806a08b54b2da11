"""`rlhf-jax sweep`: one pipeline config, many points, finished stages trained once.

A sweep config (``experiments/sweep_*.py``) holds the pipeline config it varies (``base``) and:

    shared   stages run once in ``<workdir>/shared`` and linked into every point (SFT, RM, ...);
             ``shared_from`` names another pipeline workdir to take (or finish) them in instead,
             so several sweeps share one SFT and RM
    stages   the stages each point runs itself (e.g. ``("ppo_ptx",)``); eval always follows
    models   the models each point's eval reports (``eval.models``)
    points   a list of ``{"name": str, "set": {dotted.field: value}}``; a point may also name its
             own ``shared``/``stages``/``models``
    x        the dotted field the points vary (the x axis of the tables and plots), or ""

A value ``"{shared}/..."`` in a point's ``set`` is a path into the shared workdir (the model-size
sweep compares every size with the shared, largest SFT). Each point is a pipeline workdir
``<workdir>/points/<name>`` whose shared stages are symlinks (where either side is a URL,
copies without the training checkpoints: object stores have no links), so every finished stage
is skipped on a rerun and a killed sweep continues where it stopped.
``<workdir>/sweep.json`` gathers every point's results, stage times and the sweep's wall time;
``sweep.md`` is the same as tables (with mean and spread over the points when they are seeds).

    rlhf-jax sweep --config experiments/sweep_ptx.py --workdir runs/sweep_ptx
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from typing import Any

import ml_collections
import numpy as np

from rlhf_jax import distributed, pipeline, registry, storage
from rlhf_jax.config import apply_overrides
from rlhf_jax.errors import ConfigError
from rlhf_jax.evaluation_report import finding_checks
from rlhf_jax.metrics import format_table

log = logging.getLogger(__name__)

# Training curves sweep.json keeps of the stages a point ran (for the figures).
CURVES = {"rm": ("train/epoch", "train/loss", "train/pair_accuracy", "valid/loss",
                 "valid/pair_accuracy"),
          "ppo": ("episodes", "objective/scores", "objective/kl"),
          "ppo_ptx": ("episodes", "objective/scores", "objective/kl", "ptx/loss")}
# What sweep.json keeps of a point's results.json (samples stay in the point's own report).
KEPT = ("win_rate_vs_sft", "win_rate_reference", "head_to_head_reference_base", "gold_score",
        "gold_by_category", "proxy_score", "kl_to_sft", "kl_to_ppo_init", "capability_score", "capability", "rm_accuracy",
        "rm_accuracy_by_kind", "sft_likelihood_accuracy_by_kind", "floors", "behaviour",
        "knowledge_probe", "copy_probe", "highlights",
        "machine", "versions")


def point_name(point: dict) -> str:
    name = str(point.get("name") or "")
    if not re.fullmatch(r"[A-Za-z0-9_.=+-]+", name):
        raise ConfigError(f"sweep point {point!r}: its name {name!r} must be a non-empty "
                          "file name (letters, digits, _ . = + -)")
    return name


def shared_dir(sweep: ml_collections.ConfigDict, workdir: str) -> str:
    return storage.absolute(sweep.get("shared_from") or storage.join(workdir, "shared"))


def point_config(sweep: ml_collections.ConfigDict, point: dict,
                 shared: str = "") -> ml_collections.ConfigDict:
    """The pipeline config of one point: the base with the point's fields set, and eval
    restricted to the models the point trained."""
    cfg = ml_collections.ConfigDict(sweep.base.to_dict())
    overrides = [f"{key}={value.replace('{shared}', shared)}" if isinstance(value, str)
                 else f"{key}={value!r}" for key, value in dict(point.get("set", {})).items()]
    try:
        apply_overrides(cfg, overrides)
    except ConfigError as error:
        raise ConfigError(f"sweep point {point_name(point)!r}: {error}") from None
    with cfg.eval.unlocked():
        models = point.get("models", sweep.models)
        cfg.eval.models = None if models is None else tuple(models)
    return cfg


def _stages(sweep, point: dict, key: str) -> tuple[str, ...]:
    stages = tuple(point.get(key, sweep[key]))
    unknown = sorted(set(stages) - set(registry.ALL_STAGES))
    if unknown:
        raise ConfigError(f"sweep point {point_name(point)!r}: {key} {unknown} are not pipeline "
                          f"stages; expected some of {list(registry.ALL_STAGES)}")
    return stages


def _shared_stages(sweep: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The stages the shared workdir runs: every point's ``shared``, in pipeline order."""
    return tuple(sorted({s for p in sweep.points for s in _stages(sweep, p, "shared")},
                        key=registry.ALL_STAGES.index))


def check(sweep: ml_collections.ConfigDict) -> None:
    """Every config a stage of the sweep will train with, before any stage starts: the shared
    run's and each point's (its ``set`` applied), as ``pipeline.run`` will check them, so a bad
    field of a stage that runs last (a point's dpo, grpo or rloo) fails now, not after the
    shared stages."""
    for field in ("base", "shared", "stages", "models", "points"):
        if field not in sweep:
            raise ConfigError(f"sweep config: no field {field!r} (see rlhf_jax/sweep.py)")
    if not sweep.points:
        raise ConfigError("sweep config: points is empty; expected at least one point")
    names = [point_name(p) for p in sweep.points]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep config: point names repeat: {names}")
    shared = _shared_stages(sweep)
    if shared:
        try:
            pipeline.check(sweep.base, shared)
        except ConfigError as error:
            raise ConfigError(f"sweep shared stages {list(shared)}: {error}") from None
    for point in sweep.points:
        stages = _stages(sweep, point, "stages") + ("eval",)
        cfg = point_config(sweep, point)
        try:
            pipeline.check(cfg, stages)
        except ConfigError as error:
            raise ConfigError(f"sweep point {point_name(point)!r}: {error}") from None


def _link_shared(shared: str, point_dir: str, stages: tuple[str, ...]) -> None:
    if storage.is_url(shared) or storage.is_url(point_dir):
        _copy_shared(shared, point_dir, stages)
        return
    os.makedirs(point_dir, exist_ok=True)
    for stage in stages:
        link = os.path.join(point_dir, stage)
        target = os.path.relpath(os.path.join(shared, stage), point_dir)
        if os.path.islink(link):
            if os.readlink(link) == target:
                continue
            os.unlink(link)
        elif os.path.exists(link):
            continue          # the point trained this stage itself in an earlier layout
        os.symlink(target, link)


# What a point never reads of a shared stage: its training checkpoints (only resuming that
# stage's own training does), by far the largest part.
_NOT_COPIED = "checkpoints"


def _copy_shared(shared: str, point_dir: str, stages: tuple[str, ...]) -> None:
    """The shared stages in a point where links are impossible: each stage's outputs copied
    into the point (object by object by the store itself within one bucket). The DONE marker
    goes last, so a copy cut short is redone by the next run; a stage the point has finished
    is kept, as a directory is where a link would go."""
    for stage in stages:
        source, target = storage.join(shared, stage), storage.join(point_dir, stage)
        if storage.exists(storage.join(target, "DONE")) or not storage.isdir(source):
            continue
        for name in storage.listdir(source):
            if name not in (_NOT_COPIED, "DONE"):
                storage.copy(storage.join(source, name), storage.join(target, name))
        if storage.exists(storage.join(source, "DONE")):
            storage.copy(storage.join(source, "DONE"), storage.join(target, "DONE"))


def run(sweep: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Run the shared stages once, then every point; returns (and writes) the summary."""
    check(sweep)
    workdir = storage.absolute(workdir)
    start = time.time()
    shared = shared_dir(sweep, workdir)
    shared_all = _shared_stages(sweep)
    shared_seconds = 0.0
    if shared_all:
        log.info("sweep: shared stages %s in %s", shared_all, shared)
        out = pipeline.run(sweep.base, shared, stages=shared_all)
        shared_seconds = float(sum(out.get("stage_seconds", {}).values()))
    points = []
    for i, point in enumerate(sweep.points):
        name = point_name(point)
        point_dir = storage.join(workdir, "points", name)
        log.info("sweep: point %d/%d %s", i + 1, len(sweep.points), name)
        cfg = point_config(sweep, point, shared)

        def prepare() -> None:
            _link_shared(shared, point_dir, _stages(sweep, point, "shared"))
            storage.write_text(storage.join(point_dir, "config_pipeline.json"),
                               json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str))
        distributed.on_main(prepare, f"rlhf_jax sweep point {name}")
        stages = _stages(sweep, point, "stages") + ("eval",)
        results = pipeline.run(cfg, point_dir, stages=stages)
        own = {k: v for k, v in results.get("stage_seconds", {}).items() if k in stages}
        points.append({"name": name, "set": dict(point.get("set", {})),
                       "x": dict(point.get("set", {})).get(sweep.get("x", "")),
                       "policy_model": cfg.pretrain.model.to_dict() if "pretrain" in cfg else {},
                       "stage_seconds": own, "seconds": float(sum(own.values())),
                       "shared_stage_seconds": shared_stage_seconds(
                           point_dir, _stages(sweep, point, "shared")),
                       "findings": finding_checks(results),
                       "curves": curves(point_dir, stages),
                       **{k: results[k] for k in KEPT if k in results}})
    summary = {"sweep": sweep.get("name", ""), "x": sweep.get("x", ""),
               "shared_dir": shared, "shared_stages": shared_all, "shared_seconds": shared_seconds,
               "points": points, "aggregate": aggregate(points),
               "wall_seconds": shared_seconds + sum(p["seconds"] for p in points),
               "this_invocation_seconds": time.time() - start}

    def write() -> None:
        storage.write_text(storage.join(workdir, "sweep.json"),
                           json.dumps(summary, indent=2, sort_keys=True, default=float) + "\n")
        storage.write_text(storage.join(workdir, "sweep.md"), report(summary))
    distributed.on_main(write, "rlhf_jax sweep summary")
    print(report(summary))
    return summary


def shared_stage_seconds(point_dir: str, stages: tuple[str, ...]) -> dict[str, float]:
    """The wall time of each shared stage, from its ``DONE`` marker (read through the point's
    link into the shared workdir): what the stages the point reuses cost when they ran."""
    out = {}
    for stage in stages:
        path = storage.join(point_dir, stage, "DONE")
        try:
            done = json.loads(storage.read_text(path))
        except (OSError, ValueError):
            continue       # not finished (or damaged): the pipeline reported it already
        if isinstance(done, dict) and isinstance(done.get("seconds"), (int, float)):
            out[stage] = float(done["seconds"])
    return out


def curves(point_dir: str, stages: tuple[str, ...]) -> dict[str, list[dict]]:
    """The metrics rows of each stage the point ran, cut to ``CURVES``' keys."""
    out = {}
    for stage in stages:
        path = storage.join(point_dir, stage, "metrics.jsonl")
        if stage not in CURVES or not storage.exists(path):
            continue
        rows = []
        with storage.open(path) as f:
            for line in f:
                row = json.loads(line)
                kept = {k: row[k] for k in CURVES[stage] if k in row}
                if kept:
                    rows.append({"step": row.get("step"), **kept})
        out[stage] = rows
    return out


def _numbers(point: dict, prefix: str = "") -> dict[str, float]:
    """Every number of a point's results, by dotted path (``gold_score.ppo``, ...)."""
    out: dict[str, float] = {}
    for key, value in point.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_numbers(value, f"{path}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[path] = float(value)
    return out


def aggregate(points: list[dict]) -> dict[str, dict[str, float]]:
    """Mean, standard deviation, min and max over the points of every number they share, and
    in how many points each finding holds: the spread over seeds."""
    if len(points) < 2:
        return {}
    numbers = [_numbers({k: v for k, v in p.items()
                         if k not in ("set", "x", "findings", "policy_model", "curves")})
               for p in points]
    out = {}
    for key in sorted(set.intersection(*(set(n) for n in numbers))):
        values = np.array([n[key] for n in numbers])
        if np.all(np.isfinite(values)):
            out[key] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)),
                        "min": float(values.min()), "max": float(values.max())}
    for key in sorted(set.intersection(*(set(p["findings"]) for p in points))):
        values = np.array([p["findings"][key]["value"] for p in points])
        out[f"findings.{key}"] = {
            "mean": float(values.mean()), "std": float(values.std(ddof=1)),
            "min": float(values.min()), "max": float(values.max()),
            "holds": int(sum(p["findings"][key]["holds"] for p in points)), "of": len(points)}
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def report(summary: dict) -> str:
    """sweep.md: one row per point and model, then the findings across points."""
    lines = [f"# Sweep {summary['sweep']}", "",
             f"shared stages {', '.join(summary['shared_stages']) or '(none)'}: "
             f"{summary['shared_seconds']:.0f} s; total stage time {summary['wall_seconds']:.0f} s", ""]
    rows = []
    for p in summary["points"]:
        win = p.get("win_rate_vs_sft", {})
        for model in sorted(p.get("gold_score", {})):
            ci = win.get(model, {}).get("ci95", {}).get("heldout_labelers", [np.nan, np.nan])
            rows.append({"point": p["name"], "model": model,
                         "win (held-out)": _fmt(win.get(model, {}).get("heldout_labelers", np.nan)),
                         "95% CI": f"[{ci[0]:.2f}, {ci[1]:.2f}]",
                         "gold": _fmt(p["gold_score"][model]),
                         "RM score": _fmt(p.get("proxy_score", {}).get(model, np.nan)),
                         "KL to init": _fmt(p.get("kl_to_ppo_init", {}).get(model, np.nan)),
                         "capability": _fmt(p.get("capability_score", {}).get(model, np.nan)),
                         "seconds": f"{p['seconds']:.0f}"})
        if not p.get("gold_score"):
            acc = p.get("rm_accuracy", {})
            rows.append({"point": p["name"], **{k: _fmt(v) for k, v in acc.items()
                                                if not k.endswith("n_pairs")},
                         "seconds": f"{p['seconds']:.0f}"})
    lines += [format_table(rows), ""]
    agg = summary.get("aggregate", {})
    found = {k[len("findings."):]: v for k, v in agg.items() if k.startswith("findings.")}
    if found:
        claims = summary["points"][0]["findings"]
        lines += ["## Findings across points", "", format_table([
            {"finding": claims[k]["claim"], "mean": _fmt(v["mean"]), "std": _fmt(v["std"]),
             "min..max": f"{v['min']:.3f}..{v['max']:.3f}", "holds in": f"{v['holds']}/{v['of']}"}
            for k, v in found.items()]), ""]
    return "\n".join(lines) + "\n"
