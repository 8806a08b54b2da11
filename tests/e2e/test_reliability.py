"""A run is never lost: preemption, atomic outputs, damaged checkpoints, metrics after a resume,
config changes on resume, NaN guards, unwritable outputs.

The end-to-end cases run the real CLI (`python -m rlhf_jax.cli`) in subprocesses on a one-device
CPU with a shared compilation cache, so only the first run of each stage pays for compiling.
"""
from __future__ import annotations

import functools
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import checkpoint as ckpt_lib
from rlhf_jax import errors, model_io, pipeline, reliability
from rlhf_jax.config import sft_config
from rlhf_jax.metrics import MetricsWriter, read_jsonl_metrics

from paths import REPO
TINY_SFT = os.path.join(REPO, "experiments", "tiny_sft.py")
TINY_PPO = os.path.join(REPO, "experiments", "tiny_ppo.py")

WORDS = [f"w{i}" for i in range(20)]
VOCAB = ["<pad>", "<eos>", "<unk>", "instruction", ":", "repeat", "reverse", "response", "say",
         "good"] + WORDS
PAD, EOS = 0, 1


# --- data, tiny models, the CLI -------------------------------------------------------------------

def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


@functools.lru_cache(maxsize=None)
def _tiny_init():
    from rlhf_jax.models import Transformer, init_params, tiny_config
    model = Transformer(tiny_config("gpt2", vocab_size=len(VOCAB), d_model=16, n_layers=1,
                                    n_heads=2, d_ff=32, max_position=32, pad_token_id=PAD,
                                    eos_token_id=EOS))
    return model, jax.device_get(init_params(model, jax.random.key(0)))


def _tiny_model(seed: int = 0):
    """A tiny GPT-2 and its params, distinct per ``seed`` (one init: each costs a compile)."""
    model, params = _tiny_init()
    return model, jax.tree.map(lambda x: x + np.float32(seed), params)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("reliability"))
    tokenizer = _tokenizer()
    tokenizer.save_pretrained(os.path.join(root, "tok"))
    r = random.Random(0)
    with open(os.path.join(root, "demos.jsonl"), "w", encoding="utf-8") as f:
        for _ in range(200):
            xs = r.choices(WORDS, k=r.randint(2, 6))
            op = r.choice(["repeat", "reverse"])
            out = xs if op == "repeat" else xs[::-1]
            f.write(json.dumps({"prompt": f"instruction : {op} {' '.join(xs)} response :",
                                "completion": " ".join(out)}) + "\n")
    with open(os.path.join(root, "prompts.jsonl"), "w", encoding="utf-8") as f:
        for _ in range(64):
            f.write(json.dumps({"prompt": "say " + " ".join(r.choices(WORDS, k=r.randint(1, 4)))
                                + " :"}) + "\n")
    from rlhf_jax.stages.reward import reward_model_from_lm
    policy, params = _tiny_model()
    rm, rm_params = reward_model_from_lm(policy, params, jax.random.key(1), None)
    model_io.save_our_checkpoint(os.path.join(root, "policy"), policy, params, tokenizer)
    model_io.save_our_checkpoint(os.path.join(root, "rm"), rm, rm_params, tokenizer,
                                 extra={"reward_norm": {"mean": 0.0, "std": 1.0}})
    return {"root": root, "tok": os.path.join(root, "tok"),
            "demos": os.path.join(root, "demos.jsonl"),
            "prompts": os.path.join(root, "prompts.jsonl"),
            "policy": os.path.join(root, "policy"), "rm": os.path.join(root, "rm"),
            "cache": os.path.join(root, "compilation_cache")}


def sft_args(data, workdir, *extra):
    return ["sft", "--config", TINY_SFT, "--workdir", str(workdir),
            "--compilation-cache", data["cache"],
            f"--config.tokenizer={data['tok']}", f"--config.data.train={data['demos']}",
            "--config.model.d_model=16", "--config.model.n_layers=1", "--config.model.d_ff=32",
            "--config.model.n_heads=2", "--config.model.max_position=32",
            "--config.data.max_prompt_len=12", "--config.data.max_response_len=8",
            "--config.train.batch_size=8", "--config.train.log_every=1",
            "--config.train.eval_every=0", *extra]


def ppo_args(data, workdir, *extra):
    return ["ppo", "--config", TINY_PPO, "--workdir", str(workdir),
            "--compilation-cache", data["cache"],
            f"--config.policy_from={data['policy']}", f"--config.reward_from={data['rm']}",
            f"--config.data.prompts={data['prompts']}", "--config.data.max_prompt_len=6",
            "--config.data.max_response_len=4", "--config.ppo.rollout_batch_size=8",
            "--config.ppo.minibatch_size=4", "--config.ppo.warmup_iterations=0",
            "--config.ppo.sample_every=0", "--config.ppo.lr=3e-3", *extra]


def cli_env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    # One CPU device: conftest's 8 fake devices would only make the subprocesses slower.
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "force_host_platform_device_count" not in f)
    return env


def run_cli(args, *, timeout=300, **kwargs):
    return subprocess.run([sys.executable, "-m", "rlhf_jax.cli", *args], env=cli_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, **kwargs)


def interrupt_cli(args, workdir, *, after_lines=3, timeout=300):
    """Start the CLI, SIGTERM it once metrics.jsonl has ``after_lines`` lines; (rc, stderr)."""
    metrics = os.path.join(workdir, "metrics.jsonl")

    def lines_logged():
        if not os.path.exists(metrics):
            return 0
        with open(metrics, encoding="utf-8") as f:
            return len(f.readlines())

    # Output to a file, not a pipe nobody reads until the end (a full pipe would block the run).
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "rlhf_jax.cli", *args], env=cli_env(),
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, text=True)
        try:
            deadline = time.time() + timeout
            while time.time() < deadline and proc.poll() is None and lines_logged() < after_lines:
                time.sleep(0.02)
            assert proc.poll() is None, "the run ended before it could be interrupted"
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        return proc.returncode, err.read()


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def no_tmp_dirs(directory) -> bool:
    return not [p for p in glob.glob(os.path.join(directory, "**"), recursive=True)
                if "tmp" in os.path.basename(p.rstrip("/"))]


def committed_steps(directory) -> list[int]:
    with ckpt_lib.Checkpointer(directory) as checkpointer:
        return checkpointer.all_steps()


def load_params(model_dir):
    return jax.device_get(model_io.load_our_checkpoint(model_dir, with_tokenizer=False)[1])


def assert_same_tree(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


def comparable(records, volatile=("time", "train/tokens_per_s", "tokens/s")):
    return [{k: v for k, v in r.items() if k not in volatile and not k.startswith("time/")}
            for r in records]


# --- 1. preemption ------------------------------------------------------------------------------

SFT_STEPS = 120


@pytest.fixture(scope="module")
def sft_runs(data):
    """An SFT run SIGTERMed after a few steps and rerun, and the same run uninterrupted."""
    root = data["root"]
    interrupted, reference = os.path.join(root, "sft_int"), os.path.join(root, "sft_ref")
    extra = (f"--config.train.steps={SFT_STEPS}", "--config.train.checkpoint_every=50")
    ref = run_cli(sft_args(data, reference, *extra))
    assert ref.returncode == 0, ref.stderr[-3000:]
    rc, stderr = interrupt_cli(sft_args(data, interrupted, *extra), interrupted)
    stopped = {"rc": rc, "stderr": stderr,
               "metrics": read_jsonl_metrics(os.path.join(interrupted, "metrics.jsonl")),
               "steps": committed_steps(os.path.join(interrupted, "checkpoints")),
               "tidy": no_tmp_dirs(os.path.join(interrupted, "checkpoints")),
               "model": os.path.exists(os.path.join(interrupted, "model"))}
    resumed = run_cli(sft_args(data, interrupted, *extra))
    return dict(interrupted=interrupted, reference=reference, extra=extra, stopped=stopped,
                resumed=resumed)


@pytest.mark.slow
def test_sigterm_sft_checkpoints_then_resumes_exactly(sft_runs):
    stopped = sft_runs["stopped"]
    assert stopped["rc"] == 128 + signal.SIGTERM, stopped["stderr"][-3000:]
    assert last_line(stopped["stderr"]) == \
        "rlhf-jax: stopped by SIGTERM; run the same command again to resume"
    # The step in flight finished and was checkpointed, committed, nothing half-written.
    logged = [r["step"] for r in stopped["metrics"]]
    assert stopped["steps"] and stopped["steps"][-1] == logged[-1] < SFT_STEPS
    assert stopped["tidy"] and not stopped["model"]

    resumed = sft_runs["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {sft_runs['interrupted']}/checkpoints at step {stopped['steps'][-1]}" \
        in resumed.stderr
    assert_same_tree(load_params(os.path.join(sft_runs["interrupted"], "model")),
                     load_params(os.path.join(sft_runs["reference"], "model")))
    # metrics.jsonl: every step once, the same values as the uninterrupted run.
    got = read_jsonl_metrics(os.path.join(sft_runs["interrupted"], "metrics.jsonl"))
    want = read_jsonl_metrics(os.path.join(sft_runs["reference"], "metrics.jsonl"))
    assert [r["step"] for r in got if "train/loss" in r] == list(range(1, SFT_STEPS + 1))
    assert comparable(got) == comparable(want)


@pytest.mark.slow
def test_sigterm_ppo_checkpoints_then_resumes_exactly(data):
    root = data["root"]
    interrupted, reference = os.path.join(root, "ppo_int"), os.path.join(root, "ppo_ref")
    extra = ("--config.ppo.iterations=60", "--config.ppo.checkpoint_every=25")
    ref = run_cli(ppo_args(data, reference, *extra))
    assert ref.returncode == 0, ref.stderr[-3000:]
    rc, stderr = interrupt_cli(ppo_args(data, interrupted, *extra), interrupted)
    assert rc == 128 + signal.SIGTERM, stderr[-3000:]
    assert last_line(stderr) == "rlhf-jax: stopped by SIGTERM; run the same command again to resume"
    logged = [r["step"] for r in read_jsonl_metrics(os.path.join(interrupted, "metrics.jsonl"))]
    steps = committed_steps(os.path.join(interrupted, "checkpoints"))
    assert steps and steps[-1] == logged[-1] < 60
    assert no_tmp_dirs(os.path.join(interrupted, "checkpoints"))

    resumed = run_cli(ppo_args(data, interrupted, *extra))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_tree(load_params(os.path.join(interrupted, "model")),
                     load_params(os.path.join(reference, "model")))
    got = read_jsonl_metrics(os.path.join(interrupted, "metrics.jsonl"))
    want = read_jsonl_metrics(os.path.join(reference, "metrics.jsonl"))
    assert [r["step"] for r in got] == list(range(1, 61))
    assert comparable(got) == comparable(want)


def test_preemption_handlers_nest_and_restore():
    before = {s: signal.getsignal(s) for s in reliability.Preemption.SIGNALS}
    with reliability.Preemption() as outer:
        with reliability.Preemption() as inner:
            os.kill(os.getpid(), signal.SIGTERM)
            assert inner.requested() and inner.signum == signal.SIGTERM
            # A second signal means "now": raised from the handler.
            with pytest.raises(errors.Preempted) as stop:
                os.kill(os.getpid(), signal.SIGINT)
            assert stop.value.exit_code == 130
        # Not consumed by the inner loop (it finished): handed to the enclosing guard, which
        # is how the pipeline stops before its next stage.
        assert outer.signum == signal.SIGTERM
    assert {s: signal.getsignal(s) for s in reliability.Preemption.SIGNALS} == before


def test_pipeline_stops_between_stages_after_a_signal(tmp_path):
    ran = []
    with reliability.Preemption() as preemption:
        pipeline.run_stage(str(tmp_path), "a", lambda: ran.append("a") or {}, {}, preemption)
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(errors.Preempted):
            pipeline.run_stage(str(tmp_path), "b", lambda: ran.append("b"), {}, preemption)
    assert ran == ["a"] and (tmp_path / "a" / "DONE").exists()
    assert not (tmp_path / "b" / "DONE").exists()


# --- 2. atomic outputs ------------------------------------------------------------------------

def test_truncated_done_marker_is_a_one_line_error(tmp_path):
    marker = tmp_path / "sft" / "DONE"
    pipeline.run_stage(str(tmp_path), "sft", lambda: {"loss": 1.0}, {})
    assert json.loads(marker.read_text())["result"] == {"loss": 1.0}
    assert [p.name for p in marker.parent.iterdir()] == ["DONE"]       # no temporary left
    marker.write_text(marker.read_text()[:7])                          # a torn write
    with pytest.raises(errors.UserError) as error:
        pipeline.run_stage(str(tmp_path), "sft", lambda: pytest.fail("must not rerun"), {})
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{marker}:2: damaged stage marker (")
    assert "delete it to run the stage again" in message


def test_stage_that_fails_is_never_marked_done(tmp_path):
    def nan_stage():
        raise errors.NonFiniteError("sft: step 2: non-finite loss (nan)")
    with pytest.raises(errors.NonFiniteError):
        pipeline.run_stage(str(tmp_path), "sft", nan_stage, {})
    assert not (tmp_path / "sft" / "DONE").exists()


def test_reports_are_written_atomically(tmp_path):
    from rlhf_jax import evaluation_report
    results = {"gold_score": {"sft": 0.5}, "win_rate_vs_sft": {}}
    evaluation_report.write_report(results, str(tmp_path))
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]
    assert oct((tmp_path / "results.json").stat().st_mode & 0o777) != oct(0o600)


class _Killed(BaseException):
    """Stands for SIGKILL at a chosen point (BaseException: no cleanup code catches it)."""


def _save(our_dir, seed):
    model, params = _tiny_model(seed)
    model_io.save_our_checkpoint(our_dir, model, params, None, extra={"seed": seed},
                                 overwrite=True)
    return jax.device_get(params)


def _model_seed(our_dir):
    """Which save the directory holds, after checking it is complete and loads."""
    assert model_io.is_our_checkpoint(our_dir)
    params = load_params(our_dir)
    seed = model_io.read_extra(our_dir)["seed"]
    assert_same_tree(params, jax.device_get(_tiny_model(seed)[1]))
    return seed


@pytest.mark.parametrize("kill_at", ["writing", "after_exchange", "between_renames"])
def test_model_dir_survives_a_kill_during_save(tmp_path, monkeypatch, kill_at):
    our_dir = str(tmp_path / "model")
    _save(our_dir, 0)

    real_rename, renames = os.rename, []
    if kill_at == "writing":
        real_save = ckpt_lib.save_pytree

        def dying_save(path, tree, **kwargs):
            real_save(path, tree, **kwargs)
            os.remove(os.path.join(path, "manifest.ocdbt"))    # part of it on disk
            raise _Killed()
        monkeypatch.setattr(model_io, "save_pytree", dying_save)
    elif kill_at == "after_exchange":
        def dying_remove(path):
            raise _Killed()
        monkeypatch.setattr(model_io, "_remove_tree", dying_remove)
    else:
        def dying_rename(src, dst):
            if os.fspath(src) in (our_dir, our_dir + ".saving"):    # the swap's, not orbax's
                renames.append((src, dst))
                if len(renames) == 2:
                    raise _Killed()
            real_rename(src, dst)
        monkeypatch.setattr(model_io, "_exchange", lambda a, b: False)
        monkeypatch.setattr(model_io.os, "rename", dying_rename)
    with pytest.raises(_Killed):
        _save(our_dir, 1)
    monkeypatch.undo()

    if kill_at == "between_renames":
        # Old model moved aside, the complete new one not yet in place: the only window a
        # filesystem without an atomic exchange has. The next save (or recover_model_dir)
        # finishes the swap.
        assert not os.path.exists(our_dir)
        model_io.recover_model_dir(our_dir)
        assert _model_seed(our_dir) == 1
    else:
        assert _model_seed(our_dir) == (0 if kill_at == "writing" else 1)
    _save(our_dir, 2)                         # cleans up whatever the kill left
    assert _model_seed(our_dir) == 2
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_save_refuses_to_replace_a_model_without_overwrite(tmp_path):
    model, params = _tiny_model()
    model_io.save_our_checkpoint(str(tmp_path / "m"), model, params)
    with pytest.raises(errors.UserError, match="already holds a model"):
        model_io.save_our_checkpoint(str(tmp_path / "m"), model, params)


# --- damaged checkpoints ----------------------------------------------------------------------

def _state(value: float):
    return {"w": jnp.full((64,), value, jnp.float32), "b": {"c": jnp.ones((3,), jnp.float32)}}


def _checkpoints(directory, steps=(2, 4)):
    with ckpt_lib.Checkpointer(directory, max_to_keep=5) as checkpointer:
        for step in steps:
            checkpointer.save(step, _state(step), {"iterators": {}, "config": {"lr": 1.0}})


def _truncate_arrays(step_dir):
    """Cut every array data file of a checkpoint short, as a disk-full or a kill mid-copy can."""
    files = [p for p in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
             if os.path.isfile(p) and "/d/" in p]
    assert files
    for path in files:
        os.truncate(path, 10)


@pytest.mark.parametrize("damage", ["truncated", "deleted_meta", "deleted_state"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, damage):
    directory = str(tmp_path / "checkpoints")
    _checkpoints(directory)
    step_dir = os.path.join(directory, "4")
    if damage == "truncated":
        _truncate_arrays(step_dir)
    elif damage == "deleted_meta":
        os.remove(os.path.join(step_dir, "meta", "metadata"))
    else:
        shutil.rmtree(os.path.join(step_dir, "state"))
    with ckpt_lib.Checkpointer(directory) as checkpointer, caplog.at_level("WARNING"):
        state, step, meta = reliability.resume(checkpointer, _state(0), {})
        assert step == 2 and float(state["w"][0]) == 2.0
        assert "checkpoint " + directory + " (step 4) cannot be" in caplog.text
        # Set aside (kept for a post-mortem), so step 4 can be saved again.
        assert checkpointer.all_steps() == [2]
        assert glob.glob(os.path.join(directory, "damaged-4-*"))
        assert checkpointer.save(4, _state(5.0), {})
    with ckpt_lib.Checkpointer(directory) as checkpointer:
        assert float(reliability.resume(checkpointer, _state(0), {})[0]["w"][0]) == 5.0


def test_no_readable_checkpoint_is_a_one_line_error(tmp_path):
    directory = str(tmp_path / "checkpoints")
    _checkpoints(directory)
    for step in (2, 4):
        _truncate_arrays(os.path.join(directory, str(step)))
    with ckpt_lib.Checkpointer(directory) as checkpointer:
        with pytest.raises(errors.UserError) as error:
            reliability.resume(checkpointer, _state(0), {})
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{directory}: no checkpoint can be restored")
    assert "step 4:" in message and "step 2:" in message


# --- 3. metrics after a resume ------------------------------------------------------------------

def test_metrics_of_replayed_steps_are_dropped(tmp_path):
    with MetricsWriter(str(tmp_path)) as writer:
        for step in range(1, 7):
            writer.write(step, {"loss": float(step)})
        writer.write_table(5, "samples", [{"text": "a"}])
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 7, "loss"')                       # cut short by a kill
    with MetricsWriter(str(tmp_path)) as writer:
        writer.discard_after(4, tables=("samples",))        # resumed from checkpoint 4
        for step in range(5, 8):
            writer.write(step, {"loss": step + 0.5})
    records = read_jsonl_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, 8))
    assert [r["loss"] for r in records] == [1.0, 2.0, 3.0, 4.0, 5.5, 6.5, 7.5]
    assert read_jsonl_metrics(str(tmp_path / "samples.jsonl")) == []


# --- 4. config stored with each checkpoint ------------------------------------------------------

def test_config_is_stored_and_compared_on_resume(tmp_path):
    cfg = sft_config()
    directory = str(tmp_path / "checkpoints")
    with ckpt_lib.Checkpointer(directory) as checkpointer:
        checkpointer.save(3, _state(1.0), reliability.checkpoint_meta(cfg, {}))
    with ckpt_lib.Checkpointer(directory) as checkpointer:
        assert checkpointer.read_meta(3)["config"]["optim"]["lr"] == cfg.optim.lr
        free = sft_config()
        free.train.log_every, free.train.eval_every, free.train.checkpoint_every = 1, 2, 3
        free.mesh.shape = (1, 1, 1)
        assert reliability.resume(checkpointer, _state(0), {}, free)[1] == 3
        changed = sft_config()
        changed.optim.lr, changed.data.max_response_len = 0.5, 7
        with pytest.raises(errors.ConfigError) as error:
            reliability.resume(checkpointer, _state(0), {}, changed)
        assert "optim.lr (checkpoint 0.001, now 0.5)" in str(error.value)
        assert "data.max_response_len (checkpoint 24, now 7)" in str(error.value)
        assert "train" not in str(error.value).split("differs")[1]
        with changed.unlocked():
            changed.allow_config_change = True
        assert reliability.resume(checkpointer, _state(0), {}, changed)[1] == 3


# --- 5. finite-value guards ---------------------------------------------------------------------

def _all_finite(directory):
    with ckpt_lib.Checkpointer(directory) as checkpointer:
        for step in checkpointer.all_steps():
            state, _ = checkpointer.restore(step, None)
            assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state)
                       if np.issubdtype(np.asarray(x).dtype, np.inexact)), step
        return checkpointer.all_steps()


@pytest.fixture(scope="module")
def sft_nan_run(data):
    """SFT with lr=1e9 (NaN at step 2), checkpointing every step."""
    workdir = os.path.join(data["root"], "sft_nan")
    out = run_cli(sft_args(data, workdir, *NAN_RUN, "--config.optim.lr=1e9"))
    return dict(workdir=workdir, out=out)


NAN_RUN = ("--config.train.steps=30", "--config.train.checkpoint_every=1")


def test_nan_in_sft_stops_the_run_keeping_finite_checkpoints(sft_nan_run):
    workdir, out = sft_nan_run["workdir"], sft_nan_run["out"]
    assert out.returncode == errors.EXIT_NON_FINITE, out.stderr[-3000:]
    line = last_line(out.stderr)
    assert line.startswith("rlhf-jax: error: sft: step ") and "non-finite " in line
    assert "loss" in line or "grad_norm" in line or "params/" in line
    steps = _all_finite(os.path.join(workdir, "checkpoints"))
    assert steps and f"the last finite checkpoint, step {steps[-1]} in {workdir}/checkpoints, " \
        "is kept" in line
    assert not os.path.exists(os.path.join(workdir, "model"))


def test_resume_with_a_changed_config_needs_allow_config_change(sft_nan_run, data):
    workdir = os.path.join(data["root"], "sft_nan_resumed")
    shutil.copytree(sft_nan_run["workdir"], workdir)
    step = committed_steps(os.path.join(workdir, "checkpoints"))[-1]
    # The fix the NaN message suggests: a lower learning rate. Refused by default, one line.
    out = run_cli(sft_args(data, workdir, *NAN_RUN, "--config.optim.lr=0.001",
                           "--config.seed=3", "--config.train.log_every=7"))
    assert out.returncode == errors.EXIT_USER_ERROR, out.stderr[-3000:]
    assert last_line(out.stderr) == (
        f"rlhf-jax: error: {workdir}/checkpoints (step {step}): the config differs from the one "
        "this checkpoint was saved with: optim.lr (checkpoint 1000000000.0, now 0.001); seed "
        "(checkpoint 0, now 3); rerun with the checkpoint's values, use a new --workdir, or pass "
        "--allow_config_change to resume anyway")
    # Allowed: resumes from the last finite checkpoint. The 1e9 step before it left the params
    # finite but huge, so step 2 is NaN again and is refused again, now under the new config;
    # the replayed step is logged once.
    out = run_cli(sft_args(data, workdir, *NAN_RUN, "--config.optim.lr=0.001",
                           "--allow_config_change"))
    assert out.returncode == errors.EXIT_NON_FINITE, out.stderr[-3000:]
    assert "resuming with a changed config (allowed): optim.lr (checkpoint 1000000000.0" \
        in out.stderr
    assert f"resumed from {workdir}/checkpoints at step {step}" in out.stderr
    assert last_line(out.stderr).startswith(f"rlhf-jax: error: sft: step {step + 1}: non-finite")
    records = read_jsonl_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, step + 2))
    with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")) as checkpointer:
        assert checkpointer.read_meta(step)["config"]["optim"]["lr"] == 1e9


def test_nan_in_ppo_stops_the_run(data):
    workdir = os.path.join(data["root"], "ppo_nan")
    out = run_cli(ppo_args(data, workdir, "--config.ppo.iterations=20",
                           "--config.ppo.checkpoint_every=1", "--config.ppo.lr=1e9"))
    assert out.returncode == errors.EXIT_NON_FINITE, out.stderr[-3000:]
    line = last_line(out.stderr)
    assert line.startswith("rlhf-jax: error: ppo: step ") and "non-finite " in line
    steps = _all_finite(os.path.join(workdir, "checkpoints"))
    assert steps and f"the last finite checkpoint, step {steps[-1]} in {workdir}/checkpoints, " \
        "is kept" in line
    assert not os.path.exists(os.path.join(workdir, "model"))


def test_finite_guard_names_the_first_bad_step_and_metric():
    guard = reliability.FiniteGuard("sft", ("loss", "grad_norm"))
    guard.observe(1, {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(2.0)})
    guard.check()
    guard.observe(2, {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(jnp.inf)})
    guard.observe(3, {"loss": jnp.float32(jnp.nan), "grad_norm": jnp.float32(1.0)})
    with pytest.raises(errors.NonFiniteError, match=r"^sft: step 2: non-finite grad_norm \(inf\)"):
        guard.check()
    with pytest.raises(errors.NonFiniteError, match=r"step 7: non-finite params/b/c"):
        guard.check_tree(7, {"a": jnp.ones(3), "b": {"c": jnp.array([1.0, jnp.nan])}}, "params")


# --- unwritable outputs ----------------------------------------------------------------------------

def test_read_only_model_dir_fails_fast(data, tmp_path):
    workdir = str(tmp_path / "ro")
    model_dir = os.path.join(workdir, "model")
    os.makedirs(os.path.join(model_dir, "params"))
    if os.geteuid() == 0:
        # Root writes through any mode bits; the immutable attribute stops it too.
        if subprocess.run(["chattr", "+i", model_dir], capture_output=True).returncode:
            pytest.skip("running as root without chattr: cannot make a directory read-only")
        undo = ["chattr", "-i", model_dir]
    else:
        os.chmod(model_dir, 0o555)
        undo = ["chmod", "755", model_dir]
    try:
        start = time.time()
        out = run_cli(sft_args(data, workdir, "--config.train.steps=5"), timeout=120)
        seconds = time.time() - start
    finally:
        subprocess.run(undo, check=True)
    assert out.returncode == errors.EXIT_USER_ERROR, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr[-3000:]
    assert lines[0].startswith(f"rlhf-jax: error: {model_dir}: not writable (")
    assert lines[0].endswith("); fix its permissions or use another --workdir")
    assert seconds < 60
