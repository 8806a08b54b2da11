"""Kill anywhere: RM, DPO, PPO (GAE with an EMA, GRPO, LoRA on policy and value) and the micro
pipeline, each SIGKILLed at seeded moments (during checkpoint and model writes among them) and
restarted until it completes, end bit for bit where an uninterrupted run ends (SFT, the quick
tier's case: tests/integration/test_kill_anywhere_sft.py)."""
import json
import os
import random

import pytest

from kill_anywhere import (WORDS, assert_same_outputs, comparable, data,  # noqa: F401
                           kill_plan, leftovers, ppo_args, reference_run, run_with_kills)
from paths import EXPERIMENTS

PPO_RUN = ("--config.ppo.iterations=9", "--config.ppo.checkpoint_every=2")
SUPERVISED_RUN = ("--config.train.steps=16", "--config.train.checkpoint_every=4",
                  "--config.train.log_every=1", "--config.train.eval_every=0",
                  "--config.train.batch_size=8", "--config.data.max_prompt_len=12",
                  "--config.data.max_response_len=8", "--config.data.max_k=2")


@pytest.fixture(scope="module")
def comparisons(data):
    r = random.Random(1)
    path = os.path.join(data["root"], "comparisons.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(96):
            xs = r.choices(WORDS, k=r.randint(2, 5))
            f.write(json.dumps({"prompt": f"instruction : repeat {' '.join(xs)} response :",
                                "chosen": " ".join(xs), "rejected": " ".join(xs[1:])}) + "\n")
    return path


def supervised_args(stage, data, comparisons, workdir):
    return [stage, "--config", os.path.join(EXPERIMENTS, f"tiny_{stage}.py"),
            "--workdir", workdir, "--compilation-cache", data["cache"],
            f"--config.init_from={data['policy']}", f"--config.data.train={comparisons}",
            *SUPERVISED_RUN]


STAGES = {
    "rm": lambda d, c, w: supervised_args("rm", d, c, w),
    "dpo": lambda d, c, w: supervised_args("dpo", d, c, w),
    "ppo_gae_ema": lambda d, c, w: ppo_args(d, w, *PPO_RUN, "--config.ppo.ema_decay=0.9"),
    "ppo_grpo": lambda d, c, w: ppo_args(d, w, *PPO_RUN, "--config.ppo.advantage=grpo",
                                         "--config.ppo.group_size=4"),
    "ppo_lora": lambda d, c, w: ppo_args(d, w, *PPO_RUN, "--config.ppo.lora.rank=2",
                                         "--config.ppo.value_lora.rank=2"),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_killed_anywhere_ends_as_if_never_killed(stage, data, comparisons, capsys):
    reference, killed = (os.path.join(data["root"], f"ka_{stage}{end}") for end in ("_ref", ""))
    ref = reference_run(STAGES[stage](data, comparisons, reference), reference)
    # LoRA: a kill while the adapters are written and one while the merged model is.
    plan = kill_plan(ref, seed=len(stage), moments=1, checkpoints=1,
                     models=2 if stage == "ppo_lora" else 1)
    report = run_with_kills(STAGES[stage](data, comparisons, killed), killed, ref, plan)
    with capsys.disabled():
        print("\n" + report.line(stage))
    assert report.during_checkpoint >= 1 and report.during_model >= 1, report.line(stage)
    compared = assert_same_outputs(killed, reference)
    assert "lora" in compared or stage != "ppo_lora"
    assert not leftovers(killed)


# --- the pipeline ---------------------------------------------------------------------------------

# The micro pipeline with checkpoints in every training stage, evaluating SFT and PPO-ptx only
# (each further model is more of the same decoding).
PIPELINE_RUN = ("--config.eval.models=('sft','ppo_ptx')",
                *(f"--config.{stage}.train.checkpoint_every=2"
                  for stage in ("pretrain", "sft", "sft_ptx", "rm")),
                "--config.ppo.ppo.checkpoint_every=1")
VOLATILE_RESULTS = ("stage_seconds", "wall_seconds", "this_invocation_seconds")


def pipeline_args(workdir, cache):
    return ["pipeline", "--config", os.path.join(EXPERIMENTS, "instructgpt_tiny.py") + ":micro",
            "--workdir", workdir, "--compilation-cache", cache, *PIPELINE_RUN]


def test_pipeline_killed_anywhere_ends_as_if_never_killed(tmp_path, capsys):
    cache = str(tmp_path / "compilation_cache")
    reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
    ref = reference_run(pipeline_args(reference, cache), reference, nested=True)
    plan = kill_plan(ref, seed=24, moments=2, checkpoints=1, models=1)
    report = run_with_kills(pipeline_args(killed, cache), killed, ref, plan, nested=True)
    with capsys.disabled():
        print("\n" + report.line("pipeline"))
    assert report.during_checkpoint >= 1 and report.during_model >= 1, report.line("pipeline")

    stages = sorted(name for name in os.listdir(reference)
                    if os.path.exists(os.path.join(reference, name, "DONE")))
    assert len(stages) == 9, stages
    for stage in stages:
        # A stage's result, its output paths (the world's) under either workdir alike.
        done = lambda root: comparable([json.loads(open(os.path.join(root, stage, "DONE")).read()
                                                   .replace(root, "WORKDIR"))["result"]])[0]
        assert done(killed) == done(reference), stage
        if os.path.exists(os.path.join(reference, stage, "model")):
            assert_same_outputs(os.path.join(killed, stage), os.path.join(reference, stage))
    # What the world, the comparisons and the evaluation wrote, byte for byte.
    for stage in ("world", "comparisons", "eval"):
        for name in sorted(os.listdir(os.path.join(reference, stage))):
            if name.endswith(".jsonl") or name.endswith(".json"):
                read = lambda root: open(os.path.join(root, stage, name), "rb").read()
                assert read(killed) == read(reference), f"{stage}/{name}"
    results = lambda root: {k: v for k, v in json.load(open(os.path.join(root, "results.json")))
                            .items() if k not in VOLATILE_RESULTS}
    assert results(killed) == results(reference)
    assert not leftovers(killed)
