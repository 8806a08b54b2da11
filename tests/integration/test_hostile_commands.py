"""Hostile commands: `sample` and `eval` given what they cannot use, and a disk that fills up.

The table runs the real CLI entry point (``rlhf_jax.cli.main``) in this process, as
test_hostile_inputs.py does: exit code, a phrase of the one-line message (for exit 0: of stderr),
never a traceback, and what must be intact afterwards. A row marked ``before_load`` must be
refused before any model loads. The full-disk tests inject ENOSPC where it really arises (a
Python write; orbax's background array writes, with the echoes they print); tests/e2e/
test_disk_full.py fills a real tmpfs.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import sys
import threading

import pytest

from rlhf_jax import cli, model_io
from rlhf_jax.cli import main

from test_hostile_inputs import EXP, Case, _inputs_intact, check_outcome, env, sft  # noqa: F401

MICRO = EXP("instructgpt_tiny.py") + ":micro"
# 30 tokens: with 8 new ones, past the env models' 32 positions.
LONG_PROMPT = " ".join(["w1"] * 30)


@dataclasses.dataclass
class Command(Case):
    before_load: bool = False        # refused before any model loads


def sample(e, *flags: str, checkpoint: str = "", prompt: str = "w1 w2") -> list[str]:
    return ["sample", "--checkpoint", checkpoint or e["policy"], "--prompt", prompt, *flags]


def bad_flag(case_id: str, flag: str, value: str, phrase: str) -> Command:
    """`sample` with one flag out of its range: refused before any model loads."""
    return Command(case_id, lambda e: sample(e, flag, value), 2, flag + phrase, workdir=False,
                   before_load=True)


# --- a partly finished pipeline workdir -------------------------------------------------------
# Real data instead of the world (world.enabled=False): the env's tiny models stand in for the
# base LM and the stages' outputs, so `eval` has models to evaluate without training any.

def _eval_config(e) -> dict:
    """The micro pipeline's config on the env's files and models, as `rlhf-jax pipeline` saves
    it (experiments/gpt2_hh.py's fields for real data)."""
    from rlhf_jax.config import load_config
    cfg = load_config(MICRO).to_dict()
    cfg["world"]["enabled"] = False
    cfg["base_model"] = e["policy"]
    cfg["data"] = {"pretrain": e["text"], "sft": e["demos"], "comparisons": e["cmp"],
                   "ppo_prompts": e["prompts"], "eval_prompts": e["prompts"]}
    cfg["rm"]["data"].update(max_prompt_len=8, max_response_len=8)   # the env models: 32 positions
    cfg["eval"].update(n_prompts=8, prompted_max_prompt_len=16)
    cfg["sft"]["mesh"]["shape"] = [1, 1, 1]
    return cfg


def _finished(workdir: str, stage: str, model: str) -> None:
    shutil.copytree(model, os.path.join(workdir, stage, "model"))
    with open(os.path.join(workdir, stage, "DONE"), "w") as f:
        json.dump({"seconds": 1.0, "result": {}}, f)


def _partly_finished(e, workdir, *, rm: bool = False) -> None:
    """SFT (and with ``rm`` the RM) finished; PPO and PPO-ptx never ran; the config saved as
    `rlhf-jax pipeline` saves it."""
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config_pipeline.json"), "w") as f:
        json.dump(_eval_config(e), f)
    _finished(workdir, "sft", e["policy"])
    if rm:
        _finished(workdir, "rm", e["rm"])


def _without(*names: str, rm: bool = False):
    def prepare(e, workdir) -> None:
        _partly_finished(e, workdir, rm=rm)
        for name in names:
            os.remove(os.path.join(workdir, name))
    return prepare


def _results(workdir) -> dict:
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


def _evaluated_sft_and_base(e, workdir) -> bool:
    results = _results(workdir)
    return (set(results["kl_to_sft"]) == {"base", "base_prompted", "sft"}
            and set(results["skipped"]) == {"ppo", "ppo_ptx", "RM scores and RM pair accuracy"}
            and not results["proxy_score"]
            and "skipped: ppo (ppo has not finished" in open(os.path.join(workdir, "results.md")).read())


def _evaluated_with_rm(e, workdir) -> bool:
    results = _results(workdir)
    return (set(results["proxy_score"]) == {"base", "base_prompted", "sft"}
            and set(results["skipped"]) == {"ppo", "ppo_ptx"})


def _no_report(e, workdir) -> bool:
    return not os.path.exists(os.path.join(workdir, "results.json"))


CASES = [
    # --- sample: flags, then the model's config and the prompts, all before the weights load ----
    Command("sample-prompt-past-max-position",
            lambda e: sample(e, "--max-new-tokens", "8", prompt=LONG_PROMPT),
            2, "30 tokens (--max-prompt-len=64) and --max-new-tokens=8: 38 positions, past the "
            "model's max_position=32", workdir=False, intact=_inputs_intact, before_load=True),
    Command("sample-reward-model", lambda e: sample(e, checkpoint=e["rm"]), 2,
            "a model with a 'scalar' head (a reward or value model) scores text and cannot sample",
            workdir=False, intact=_inputs_intact, before_load=True),
    *[bad_flag(case_id, flag, value, phrase) for case_id, flag, value, phrase in (
        ("sample-negative-max-new-tokens", "--max-new-tokens", "-1", "=-1: expected a positive integer"),
        ("sample-negative-max-prompt-len", "--max-prompt-len", "-4", "=-4: expected a positive integer"),
        ("sample-zero-samples", "--num-samples", "0", "=0: expected a positive integer"),
        ("sample-negative-temperature", "--temperature", "-1", "=-1.0: expected a finite number > 0"),
        ("sample-negative-top-k", "--top-k", "-1", "=-1: expected an integer >= 0"),
        ("sample-top-p-above-one", "--top-p", "1.5", "=1.5: expected a number in (0, 1]"),
        ("sample-top-p-zero", "--top-p", "0", "=0.0: expected a number in (0, 1]"))],
    Command("sample-top-k-past-vocab", lambda e: sample(e, "--top-k", "1000"), 2,
            "--top-k=1000: expected at most the model's vocab_size 26", workdir=False,
            before_load=True),
    Command("sample-chat-without-template", lambda e: sample(e, "--chat"), 2,
            "has no chat template; expected a chat model's directory", workdir=False,
            before_load=True),
    Command("sample-empty-prompt", lambda e: sample(e, prompt=""), 2,
            "--prompt #1 '': no tokens", workdir=False, before_load=True),
    Command("sample-missing-checkpoint",
            lambda e: sample(e, checkpoint=os.path.join(e["root"], "no_model")), 2,
            "no_model: no such directory", workdir=False, before_load=True),
    Command("sample-prompt-filling-max-position",
            lambda e: sample(e, "--max-new-tokens", "8", prompt=" ".join(["w1"] * 24)),
            0, "", workdir=False),
    Command("sample-greedy-at-temperature-zero",
            lambda e: sample(e, "--greedy", "--temperature", "0", "--max-new-tokens", "3"), 0, "",
            workdir=False),
    # --- eval: whatever finished, after saying what it skips; what it cannot do, up front -----
    Command("eval-partly-finished-pipeline", lambda e: ["eval"], 0,
            "eval: skipping ppo_ptx: ppo_ptx has not finished", prepare=_partly_finished,
            intact=_evaluated_sft_and_base),
    Command("eval-partly-finished-pipeline-with-rm", lambda e: ["eval"], 0,
            "eval: skipping ppo: ppo has not finished",
            prepare=lambda e, workdir: _partly_finished(e, workdir, rm=True),
            intact=_evaluated_with_rm),
    Command("eval-sft-not-finished", lambda e: ["eval"], 2,
            "sft has not finished", prepare=_without(os.path.join("sft", "DONE")),
            intact=_no_report, before_load=True),
    Command("eval-world-not-finished", lambda e: ["eval", "--config", MICRO], 2,
            "world has not finished", prepare=lambda e, workdir: os.makedirs(workdir),
            intact=_no_report, before_load=True),
    Command("eval-without-saved-config", lambda e: ["eval"], 2,
            "config_pipeline.json: not found; `rlhf-jax eval` reads the config the pipeline "
            "saved there", prepare=_without("config_pipeline.json"), intact=_no_report,
            before_load=True),
    Command("eval-missing-reference-sft",
            lambda e: ["eval", f"--config.eval.reference_sft={e['root']}/no_sft"], 2,
            "eval.reference_sft=", prepare=_partly_finished, intact=_no_report, before_load=True),
    Command("eval-missing-eval-prompts",
            lambda e: ["eval", f"--config.data.eval_prompts={e['root']}/none.jsonl"], 2,
            "data.eval_prompts=", prepare=_partly_finished, intact=_no_report, before_load=True),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_command(case: Command, env, tmp_path, capsys, monkeypatch):
    workdir = str(tmp_path / "work")
    if case.prepare:
        case.prepare(env, workdir)
    if case.before_load:
        def loaded(*args, **kwargs):
            raise AssertionError(f"{case.id}: a model loaded before the input was refused")
        monkeypatch.setattr(model_io, "load_model", loaded)
    argv = case.argv(env) + (["--workdir", workdir] if case.workdir else [])
    check_outcome(case, main(argv), capsys.readouterr().err, env, workdir)


# --- a full disk --------------------------------------------------------------------------------

def _sft_run(e, workdir: str) -> list[str]:
    return sft(e, "--config.train.steps=6", "--config.train.checkpoint_every=2",
               "--config.train.log_every=1", "--compilation-cache", "none",
               "--workdir", workdir)


def _committed(workdir: str) -> list[int]:
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def _one_line(err: str) -> str:
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("rlhf-jax:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


@pytest.mark.heavy     # a full disk is also the quick tier's hostile-input row; tests/e2e/test_disk_full.py mounts one
def test_disk_full_writing_metrics_is_one_line_and_a_rerun_resumes(env, tmp_path, capsys,
                                                                     monkeypatch):
    """ENOSPC from a plain write (metrics.jsonl at step 5): one line naming the file and the
    committed checkpoints; with space again the same command resumes and finishes."""
    from rlhf_jax import metrics
    workdir = str(tmp_path / "work")
    append = metrics._append_json_line

    def full_from_step_5(path, record):
        if record.get("step", 0) >= 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        append(path, record)
    monkeypatch.setattr(metrics, "_append_json_line", full_from_step_5)
    assert main(_sft_run(env, workdir)) == 2
    line = _one_line(capsys.readouterr().err)
    checkpoints = os.path.join(workdir, "checkpoints")
    assert line == (f"rlhf-jax: error: no space left on device writing "
                    f"{os.path.join(workdir, 'metrics.jsonl')}; checkpoints up to step 4 in "
                    f"{checkpoints} are intact; free space and rerun the same command to resume")
    assert _committed(workdir) == [2, 4] and not os.path.exists(os.path.join(workdir, "model"))

    monkeypatch.setattr(metrics, "_append_json_line", append)
    assert main(_sft_run(env, workdir)) == 0
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [row["step"] for row in rows if "train/loss" in row] == [1, 2, 3, 4, 5, 6]
    assert os.path.exists(os.path.join(workdir, "model", "params"))


def _flush_events() -> None:
    """TensorBoard's writer thread flushing onto a full disk (no file name in the error)."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _LateLoopCallback:
    """What TensorStore leaves behind: a callback into an event loop orbax has closed."""

    def __del__(self):
        raise RuntimeError("Event loop is closed")


def test_disk_full_in_orbax_background_write_is_one_line(env, tmp_path, capsys, monkeypatch):
    """A checkpoint's array writes fail in orbax's threads: TensorStore's ValueError (its text
    alone says ENOSPC), each pending write's error logged with a traceback (absl, asyncio),
    unraisable "Event loop is closed" callbacks, a writer thread dying on its flush;
    the user sees only the one line."""
    from rlhf_jax import checkpoint
    workdir = str(tmp_path / "work")
    tmp = os.path.join(workdir, "checkpoints", "4.orbax-checkpoint-tmp")
    save = checkpoint.Checkpointer.save

    def full_at_step_4(self, step, *args, **kwargs):
        if step < 4:
            return save(self, step, *args, **kwargs)
        error = ValueError(
            f'RESOURCE_EXHAUSTED: Error writing "params.embed.embedding/0.0" in OCDBT database at '
            f'local file "{tmp}/state.orbax-checkpoint-tmp/ocdbt.process_0/": Failed writing: '
            f'"{tmp}/state.orbax-checkpoint-tmp/ocdbt.process_0/d/5e1f": Failed to write 43296 '
            f"bytes to file 14: No space left on device [os_error_code='28']")
        for _ in range(3):
            try:
                raise error
            except ValueError:
                logging.getLogger("absl").error("[thread=array_type_handler] _SignalingThread."
                                                "run() raised an exception: %s", error,
                                                exc_info=True)
                logging.getLogger("asyncio").error("_GatheringFuture exception was never "
                                                   "retrieved", exc_info=True)
            _LateLoopCallback()
        writer = threading.Thread(target=_flush_events, name="tensorboard")
        writer.start()
        writer.join()
        raise error
    monkeypatch.setattr(checkpoint.Checkpointer, "save", full_at_step_4)
    unraisable, died = [], []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    monkeypatch.setattr(threading, "excepthook", died.append)

    assert main(_sft_run(env, workdir)) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"rlhf-jax: error: no space left on device writing {tmp}; "
                           "checkpoints up to step 2 in "), line
    assert unraisable == [] and died == []
    # Called in-process, main leaves the hooks and loggers as it found them.
    assert not logging.getLogger("absl").filters and not logging.getLogger("asyncio").filters
    assert sys.unraisablehook == unraisable.append and threading.excepthook == died.append


def test_a_run_that_survived_hidden_disk_full_reports_says_so(capsys, monkeypatch):
    """A disk-full report a background writer logged is hidden as an echo; if the command then
    ends without the one line, it says that something was hidden rather than nothing at all."""
    def logs_a_failed_write(args):
        logging.getLogger("absl").error("_SignalingThread.run() raised an exception: "
                                        "[Errno 28] No space left on device")
        return 0
    monkeypatch.setattr(cli, "_sample", logs_a_failed_write)
    assert main(["sample", "--checkpoint", "unused", "--prompt", "p"]) == 0
    err = capsys.readouterr().err
    assert "raised an exception" not in err
    assert err.strip().splitlines()[-1] == (
        "rlhf-jax: warning: 1 reports of background writes that failed on a full disk were "
        "hidden; some output may be missing (--debug shows them)")


def test_disk_full_names_what_a_pipeline_kept(tmp_path):
    """In a pipeline the finished stages and the writing stage's committed checkpoints."""
    import argparse
    workdir = str(tmp_path)
    for stage in ("world", "pretrain", "sft"):
        os.makedirs(os.path.join(workdir, stage))
        open(os.path.join(workdir, stage, "DONE"), "w").write("{}")
    for step in ("10", "20", "30.orbax-checkpoint-tmp"):
        os.makedirs(os.path.join(workdir, "sft_ptx", "checkpoints", step))
    args = argparse.Namespace(command="pipeline", workdir=workdir)
    error = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    path = os.path.join(workdir, "sft_ptx", "tb", "events")
    assert cli._disk_full_message(args, error, path) == (
        f"no space left on device (disk quota exceeded) writing {path}; finished stages (world, "
        f"pretrain, sft) are intact; checkpoints up to step 20 in "
        f"{os.path.join(workdir, 'sft_ptx', 'checkpoints')} are intact; free space and rerun "
        "the same command to resume")
