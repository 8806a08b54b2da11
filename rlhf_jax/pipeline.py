"""The whole InstructGPT method, stage by stage, on the built-in labeler world (or real data).

    world -> pretrain (base LM) -> sft, sft_ptx (PPO init, 10% pretraining mix)
          -> comparisons (K SFT samples per prompt, ranked by training labelers) -> rm
          -> ppo, ppo_ptx -> [dpo, grpo, rloo] -> eval (results.json, results.md, plots)

The bracketed stages are other methods from the same SFT / RM, run only when ``methods`` names
them (or a sweep selects them): ``dpo`` trains SFT on the comparisons directly (SFT is also its
frozen reference); ``grpo`` and ``rloo`` are the ``ppo`` stage (from sft_ptx, reward from the
RM, the same episodes) with the group baselines of ``group_size`` samples per prompt instead of
a value network.

Every stage writes ``<workdir>/<stage>/DONE`` when it finishes; a stage whose marker exists is
skipped, so an interrupted run continues from its last finished stage (and a stage killed midway
resumes from its own checkpoints).

    rlhf-jax pipeline --config experiments/instructgpt_tiny.py --workdir runs/tiny
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import ml_collections
from rlhf_jax import distributed, locking, registry, storage
from rlhf_jax.config import dpo_stage, group_method_stage, stage_configs
from rlhf_jax.data import read_jsonl, write_jsonl
from rlhf_jax.errors import ConfigError, Preempted, UserError

log = logging.getLogger(__name__)

# The stage graph is rlhf_jax.registry's: the default pipeline, the other methods from the same
# SFT / RM (run only when ``cfg.methods`` names them or a sweep selects them, ``stages=``), and
# every stage in the order they run.
STAGES = registry.DEFAULT_STAGES
METHOD_STAGES = registry.METHOD_STAGES
ALL_STAGES = registry.ALL_STAGES


def _done_path(workdir: str, stage: str) -> str:
    return storage.join(workdir, stage, "DONE")


def _read_json(path: str, what: str) -> Any:
    """A JSON file the pipeline wrote; a damaged one is a one-line UserError naming it."""
    try:
        with storage.open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{error.lineno}: damaged {what} ({error.msg}); {_REDO[what]}") \
            from error
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: damaged {what} (not UTF-8 text); {_REDO[what]}") from error


_REDO = {"stage marker": "delete it to run the stage again",
         "results file": "delete it and run `rlhf-jax eval` again"}


def run_stage(workdir: str, stage: str, fn: Callable[[], Any], timings: dict,
              preemption: Any = None) -> None:
    """Run ``fn`` unless the stage finished before; record its wall time.

    The ``DONE`` marker is written atomically once ``fn`` returns, so an exception (NaN,
    preemption, a kill) leaves the stage to run again. With ``preemption`` (a
    ``reliability.Preemption``), a SIGTERM / SIGINT that arrived during an earlier stage
    stops the pipeline here, before the next stage starts.
    """
    marker = _done_path(workdir, stage)
    if storage.exists(marker):
        done = _read_json(marker, "stage marker")
        timings[stage] = done.get("seconds", 0.0) if isinstance(done, dict) else 0.0
        log.info("stage %-11s already done, skipping", stage)
        return
    if preemption is not None and preemption.requested():
        raise Preempted(preemption.signum)
    log.info("stage %-11s starting", stage)
    storage.makedirs(storage.dirname(marker))
    start = time.time()
    result = fn()
    seconds = time.time() - start
    timings[stage] = seconds
    text = json.dumps({"seconds": seconds, "result": result}, indent=2, default=str) + "\n"
    distributed.on_main(lambda: storage.write_text(marker, text), f"rlhf_jax stage {stage} done")
    log.info("stage %-11s done in %.1fs", stage, seconds)


def _with(cfg: ml_collections.ConfigDict, **paths: Any) -> ml_collections.ConfigDict:
    """A copy of a stage config with dotted fields filled in (``data__train`` -> data.train)."""
    out = ml_collections.ConfigDict(cfg.to_dict())
    for key, value in paths.items():
        *parents, leaf = key.split("__")
        node = out
        for p in parents:
            node = node[p]
        node[leaf] = value
    return out


def world_files(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Where the data comes from: the generated world, or the paths the config names."""
    if cfg.world.enabled:
        base = storage.join(workdir, "world")
        return {name: storage.join(base, f"{name}.jsonl") for name in
                ("pretrain", "sft", "rm_prompts", "ppo_prompts", "eval_prompts", "capability_mc",
                 "capability_qa")} | {"tokenizer": storage.join(base, "tokenizer"), "world": base}
    files = {k: v for k, v in dict(cfg.data).items() if v}
    missing = [k for k in ("pretrain", "sft", "comparisons", "ppo_prompts", "eval_prompts")
               if k not in files]
    if missing or not cfg.get("base_model"):
        raise ValueError(f"world.enabled=False needs base_model and data.{{{', '.join(missing)}}}"
                         if missing else "world.enabled=False needs base_model (a checkpoint dir)")
    return files


def make_comparisons_stage(cfg, workdir: str, files: dict[str, str]) -> dict[str, Any]:
    """Sample K completions per RM prompt from the SFT model and have labelers rank them."""
    from rlhf_jax.evaluation import generate_texts
    from rlhf_jax.model_io import load_model
    from rlhf_jax.runtime import setup_mesh
    from rlhf_jax.world import load_world, make_comparisons

    c = cfg.comparisons
    mesh = setup_mesh(cfg.sft)
    model, params, tokenizer, _ = load_model(storage.join(workdir, "sft", "model"), mesh)
    _, pool = load_world(files["world"])
    out_dir = storage.join(workdir, "comparisons")

    def sample_k(rows: list[dict], seed: int) -> list[list[str]]:
        prompts = [row["prompt"] for row in rows for _ in range(c.k)]
        texts = generate_texts(model, params, tokenizer, prompts, max_prompt_len=cfg.rm.data.max_prompt_len,
                               max_new_tokens=cfg.rm.data.max_response_len,
                               temperature=c.temperature, seed=seed, mesh=mesh)["texts"]
        return [texts[i * c.k:(i + 1) * c.k] for i in range(len(rows))]

    rm_rows = read_jsonl(files["rm_prompts"], "prompts")[: c.n_prompts]
    train = make_comparisons(rm_rows, sample_k(rm_rows, cfg.seed), pool.training, cfg.seed)
    train = [row for row in train if len(set(row["ranking"])) > 1]   # all-tied rows carry no pairs
    outputs = {"train": train}
    # Held-out test comparisons on eval prompts, ranked by both labeler groups.
    test_rows = read_jsonl(files["eval_prompts"], "prompts")[: c.n_test_prompts]
    test_samples = sample_k(test_rows, cfg.seed + 1)
    for group, labelers in (("train_labelers", pool.training), ("heldout_labelers", pool.heldout)):
        outputs[f"test_{group}"] = [
            r for r in make_comparisons(test_rows, test_samples, labelers, cfg.seed + 2)
            if len(set(r["ranking"])) > 1]

    def write() -> None:
        for name, rows in outputs.items():
            write_jsonl(storage.join(out_dir, f"{name}.jsonl"), rows)
    distributed.on_main(write, "rlhf_jax comparisons written")
    return {"n_train": len(train)}


def ppo_stage_config(cfg: ml_collections.ConfigDict, workdir: str,
                     name: str = "ppo") -> ml_collections.ConfigDict:
    """The config the pipeline's ``ppo``, ``ppo_ptx``, ``grpo`` or ``rloo`` stage runs with:
    policy from sft_ptx, reward (and GAE's value) from rm, the pipeline's prompts and
    pretraining text. grpo / rloo are ``ppo`` (no ptx, the same episodes) with that advantage
    estimator over ``group_size`` samples per prompt."""
    files = world_files(cfg, workdir)
    stage = registry.STAGES[name]
    models = {field: registry.model_path(storage.absolute(workdir), source)
              for field, source in stage.models_from.items()}
    out = _with(cfg.ppo, name=name, **models,
                data__prompts=files["ppo_prompts"], data__pretrain=files["pretrain"],
                ppo__ptx_coef=cfg.ppo_ptx_coef if stage.ptx else 0.0)
    return group_method_stage(out, cfg, stage.advantage) if stage.advantage else out


def dpo_stage_config(cfg: ml_collections.ConfigDict, workdir: str,
                     comparisons: str) -> ml_collections.ConfigDict:
    """The config the pipeline's ``dpo`` stage runs with: the policy and its frozen reference
    are the SFT model, the data the comparisons the RM trains on."""
    sft_model = registry.model_path(storage.absolute(workdir),
                                    registry.STAGES["dpo"].models_from["init_from"])
    return _with(dpo_stage(cfg, sft_model), data__train=comparisons)


def methods_to_run(cfg: ml_collections.ConfigDict,
                   stages: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The method stages this run may train: those ``cfg.methods`` names (when every stage
    runs) or those ``stages`` selects."""
    methods = tuple(cfg.get("methods") or ())
    unknown = sorted(set(methods) - set(METHOD_STAGES))
    if unknown:
        raise ConfigError(f"config: methods={list(methods)}: {unknown} are not methods; expected "
                          f"some of {list(METHOD_STAGES)}")
    wanted = set(methods) if stages is None else set(stages)
    return tuple(m for m in METHOD_STAGES if m in wanted)


def check(cfg: ml_collections.ConfigDict, stages: tuple[str, ...] | None = None) -> None:
    """Every config ``run(cfg, workdir, stages)`` will train with, before any stage starts: the
    default stages' (``validate.check``) and that of each method stage that will run, built
    with the helpers ``_run`` uses (``dpo_stage``, ``group_method_stage``) from
    ``stage_configs``, where SFT's and the RM's architectures and starts stand for the models
    they will train. ``rlhf_jax.sweep`` runs it for every point before any stage."""
    from rlhf_jax import validate

    validate.check(cfg)
    unknown = sorted(set(stages or ()) - set(ALL_STAGES))
    if unknown:
        raise UserError(f"stages {unknown}: not pipeline stages; expected some of "
                        f"{list(ALL_STAGES)}")
    methods = methods_to_run(cfg, stages)
    if not methods:
        return
    if "dpo" in methods and "dpo" not in cfg:
        raise ConfigError("config: methods names 'dpo' but the config has no dpo section "
                          "(a rlhf_jax.config.dpo_config())")
    configs = stage_configs(cfg, methods=True)
    for name in methods:
        stage = registry.STAGES[name]
        section = (configs[stage.engine] if stage.advantage is None
                   else group_method_stage(configs[stage.engine], cfg, stage.advantage))
        try:
            validate.check(section)
        except ConfigError as error:
            raise ConfigError(f"config: {name} stage: {str(error).removeprefix('config: ')}") \
                from None


# The results a tracker gets as numbers (every number under these keys, "/"-joined) and as a
# table per model: the headline of results.md. The rest of results.json is too fine-grained to
# chart (behaviour, highlights, probes: over a thousand numbers).
TRACKED_RESULTS = ("gold_score", "proxy_score", "kl_to_sft", "kl_to_ppo_init", "capability_score",
                   "win_rate_vs_sft", "rm_accuracy", "stage_seconds", "wall_seconds")


def _numbers(tree: Any, prefix: str) -> dict[str, float]:
    if isinstance(tree, (dict, list)):
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        return {k: v for key, value in items for k, v in _numbers(value, f"{prefix}/{key}").items()}
    return {prefix: tree} if isinstance(tree, (int, float)) and not isinstance(tree, bool) else {}


def results_for_tracker(results: dict[str, Any]) -> tuple[dict[str, float], dict[str, list[dict]]]:
    """The numbers of ``results`` under ``TRACKED_RESULTS``, and the tables "results" (a row per
    model: scores, KL, held-out and training labelers' win rate vs SFT) and "samples"."""
    values = {k: v for key in TRACKED_RESULTS if key in results
              for k, v in _numbers(results[key], key).items()}
    per_model = ("gold_score", "proxy_score", "kl_to_sft", "capability_score")
    rows = [{"model": name, **{key: results.get(key, {}).get(name) for key in per_model},
             **{f"win_{group}": results.get("win_rate_vs_sft", {}).get(name, {}).get(group)
                for group in ("heldout_labelers", "train_labelers")}}
            for name in results.get("gold_score", {})]
    samples = [{"model": name, **row} for name, model_rows in results.get("samples", {}).items()
               for row in model_rows]
    return values, {"results": rows, "samples": samples}


def track_results(cfg: ml_collections.ConfigDict, workdir: str, results: dict[str, Any]) -> None:
    """Give the evaluation to the tracker the stages used (a run of its own, ``workdir/eval``):
    W&B's summary / TensorBoard's scalars at step 1, and the results and samples tables. A new
    evaluation replaces the last one (``discard_after(0)``: TensorBoard purges its points)."""
    from rlhf_jax.metrics import MetricsWriter
    sections = [cfg[stage] for stage in ALL_STAGES if stage in cfg and "tracker" in cfg[stage]]
    tracker = cfg.get("tracker") or (sections[0].tracker if sections else None)
    values, tables = results_for_tracker(results)
    with MetricsWriter(storage.join(workdir, "eval"), config=cfg, tracker=tracker) as writer:
        writer.discard_after(0)
        writer.write_summary(1, values, tables)


def evaluate_workdir(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """`rlhf-jax eval`: (re-)evaluate the models of a pipeline workdir and rewrite the report."""
    from rlhf_jax import evaluation_report
    workdir = storage.absolute(workdir)
    results = evaluation_report.evaluate_pipeline(cfg, workdir, world_files(cfg, workdir))
    timings_path = storage.join(workdir, "results.json")
    if storage.exists(timings_path):
        try:
            previous = _read_json(timings_path, "results file")
        except UserError as error:
            log.warning("%s; its stage timings are not carried over", error)
            previous = {}
        for key in ("stage_seconds", "wall_seconds"):
            if key in previous:
                results[key] = previous[key]
    evaluation_report.write_report(results, workdir)
    track_results(cfg, workdir, results)
    print(evaluation_report.results_table(results))
    return results


def run(cfg: ml_collections.ConfigDict, workdir: str,
        stages: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Run every stage (skipping finished ones); returns the evaluation results.

    ``stages`` runs only those stages (a sweep's point reruns PPO on stages another workdir
    finished); the others must be done already where a selected stage needs their outputs.
    The method stages (``METHOD_STAGES``) run when ``cfg.methods`` names them, or when
    ``stages`` selects them.

    SIGTERM / SIGINT: a training stage checkpoints and stops (Preempted); during another stage
    the pipeline stops once that stage is done. Rerunning the command continues either way.
    """
    from rlhf_jax import reliability

    check(cfg, stages)
    workdir = storage.absolute(workdir)
    storage.makedirs(workdir)
    # Up front, so a read-only output of a late stage does not waste the earlier ones.
    reliability.check_writable(workdir, recursive=False)
    reliability.check_writable(*(storage.join(workdir, stage, output) for stage in ALL_STAGES
                                 for output in ("model", "checkpoints")))
    with locking.RunLock(workdir), reliability.Preemption() as preemption:
        return _run(cfg, workdir, preemption, stages)


def labeler_group_split(rows: list[dict], group: str) -> tuple[list[dict], list[dict]]:
    """Comparisons ranked by labelers outside ``group`` (to train on) and inside it (to test
    on): the paper's leave-one-group-out check that the RM generalizes to unseen labelers."""
    inside = [row for row in rows if row.get("group") == group]
    if not inside:
        groups = sorted({str(row.get("group")) for row in rows})
        raise UserError(f"comparisons.holdout_group={group!r}: no comparison was ranked by that "
                        f"group; expected one of {groups}")
    return [row for row in rows if row.get("group") != group], inside


def _warn_if_evaluated_before(workdir: str, methods: tuple[str, ...]) -> None:
    """A method added to a finished workdir trains, but eval/DONE keeps the old report: say so."""
    marker = _done_path(workdir, "eval")
    if not storage.exists(marker):
        return
    later = [m for m in methods if storage.exists(_done_path(workdir, m))
             and storage.mtime(_done_path(workdir, m)) > storage.mtime(marker)]
    if later:
        log.warning("%s finished after eval: the report leaves them out; run `rlhf-jax eval` "
                    "on this workdir (or delete %s) to evaluate them", ", ".join(later), marker)


def _run(cfg: ml_collections.ConfigDict, workdir: str, preemption: Any,
         selected: tuple[str, ...] | None = None) -> dict[str, Any]:
    from rlhf_jax.stages import dpo, ppo, reward, sft
    from rlhf_jax import evaluation_report

    start = time.time()
    timings: dict[str, float] = {}
    files = world_files(cfg, workdir)
    # The flag is the pipeline's; each training stage compares its own section's config.
    allow = {"allow_config_change": True} if cfg.get("allow_config_change", False) else {}
    section = lambda stage_cfg, **paths: _with(stage_cfg, **allow, **paths)
    model_dir = lambda stage: registry.model_path(workdir, stage)
    stage_dir = lambda stage: storage.join(workdir, stage)

    def stage(name: str, fn: Callable[[], Any]) -> None:
        if selected is None or name in selected:
            run_stage(workdir, name, fn, timings, preemption)

    if cfg.world.enabled:
        from rlhf_jax.world import write_world
        stage("world", lambda: write_world(
            files["world"], cfg.world.seed, dict(cfg.world.sizes),
            cfg.world.get("labeler_noise_scale", 1.0)))
    # The base LM: pretrained here on the world's corpus, or a checkpoint the config names.
    base = cfg.get("base_model") or model_dir("pretrain")
    if not cfg.get("base_model"):
        stage("pretrain", lambda: sft.train(section(
            cfg.pretrain, tokenizer=files["tokenizer"], data__train=files["pretrain"]),
            stage_dir("pretrain")))
    stage("sft", lambda: sft.train(section(
        cfg.sft, init_from=base, data__train=files["sft"]), stage_dir("sft")))
    stage("sft_ptx", lambda: sft.train(section(
        cfg.sft_ptx, init_from=base, data__train=files["sft"],
        data__pretrain_path=files["pretrain"]), stage_dir("sft_ptx")))
    # Comparisons: SFT samples ranked by the world's labelers, or a comparisons file.
    comparisons = files.get("comparisons") or storage.join(workdir, "comparisons", "train.jsonl")
    if not files.get("comparisons"):
        stage("comparisons", lambda: make_comparisons_stage(cfg, workdir, files))
    # The RM starts from SFT, or from its own base when it is a different network (rm_model).
    rm_base = cfg.get("rm_base_model") or model_dir("sft")
    if cfg.get("rm_model") and not cfg.get("rm_base_model"):
        raise ValueError("config: rm_model is set (an RM architecture unlike the policy's) but "
                         "rm_base_model is empty; set rm_base_model to that checkpoint's directory")
    holdout_group = cfg.comparisons.get("holdout_group", "") if "comparisons" in cfg else ""

    def train_rm():
        from rlhf_jax.world.export import read_jsonl as read_rows
        rm_comparisons = comparisons
        if holdout_group:
            rows, inside = labeler_group_split(read_rows(comparisons), holdout_group)
            rm_comparisons = storage.join(stage_dir("rm"), "comparisons_train.jsonl")

            def write() -> None:
                write_jsonl(rm_comparisons, rows)
                write_jsonl(storage.join(stage_dir("rm"), "comparisons_holdout_group.jsonl"),
                            inside)
            distributed.on_main(write, "rlhf_jax rm comparisons split")
        return reward.train(section(cfg.rm, init_from=rm_base, data__train=rm_comparisons,
                                    normalize__demonstrations=files["sft"]), stage_dir("rm"))
    stage("rm", train_rm)
    for name in registry.stages(engine="ppo", method=False):
        stage(name, lambda name=name: ppo.train(section(ppo_stage_config(cfg, workdir, name)),
                                                stage_dir(name)))
    # Other methods from the same SFT / RM (only those cfg.methods names or a sweep selects).
    methods = methods_to_run(cfg, selected)

    def train_dpo():
        dpo_comparisons = comparisons
        if holdout_group:      # DPO sees the comparisons the RM trained on, no more
            from rlhf_jax.world.export import read_jsonl as read_rows
            dpo_comparisons = storage.join(stage_dir("dpo"), "comparisons_train.jsonl")
            rows = labeler_group_split(read_rows(comparisons), holdout_group)[0]
            distributed.on_main(lambda: write_jsonl(dpo_comparisons, rows), "rlhf_jax dpo comparisons")
        return dpo.train(section(dpo_stage_config(cfg, workdir, dpo_comparisons)),
                         stage_dir("dpo"))
    if "dpo" in methods:
        stage("dpo", train_dpo)
    for name in registry.stages(engine="ppo", method=True):
        if name in methods:
            stage(name, lambda name=name: ppo.train(section(ppo_stage_config(cfg, workdir, name)),
                                                    stage_dir(name)))
    _warn_if_evaluated_before(workdir, methods)
    results: dict[str, Any] = {}

    def evaluate():
        results.update(evaluation_report.evaluate_pipeline(cfg, workdir, files))
        return {"models": sorted(results.get("gold_score", {}))}
    stage("eval", evaluate)
    if not results and selected is not None and "eval" not in selected:
        results["stage_seconds"] = timings
        return results
    if not results:
        path = storage.join(workdir, "results.json")
        try:
            results = _read_json(path, "results file") if storage.exists(path) else {}
        except UserError as error:
            log.warning("%s", error)
        if not results:
            # eval/DONE without a readable report: evaluating again is cheaper than stopping.
            log.warning("%s is missing or damaged; evaluating again", path)
            evaluate()
    results["stage_seconds"] = timings
    results["wall_seconds"] = float(sum(timings.values()))
    results["this_invocation_seconds"] = time.time() - start
    evaluation_report.write_report(results, workdir)
    track_results(cfg, workdir, results)
    print(evaluation_report.results_table(results))
    return results
