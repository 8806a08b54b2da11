"""Hostile inputs, one table: what `rlhf-jax` does with each bad config, file, checkpoint or signal.

Every case runs the real CLI entry point (``rlhf_jax.cli.main``) in this process and checks
the exit code, a phrase the one-line message must contain (never a traceback), and what must
still be intact afterwards (an earlier config file, a model, a finite checkpoint...).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from typing import Callable

import pytest

from rlhf_jax.cli import main

from paths import REPO
EXP = lambda name: os.path.join(REPO, "experiments", name)
WORDS = [f"w{i}" for i in range(20)]
VOCAB = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", "instruction", ":", "response"]
                                     + WORDS)}


def _jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _save_model(path: str, tokenizer, head: str, vocab_size: int, max_position: int = 32) -> str:
    """A random tiny model directory in our layout (what a stage writes)."""
    import jax
    from rlhf_jax.model_io import save_our_checkpoint
    from rlhf_jax.models.config import tiny_config
    from rlhf_jax.models.params import init_params
    from rlhf_jax.models.transformer import Transformer
    cfg = tiny_config("gpt2", vocab_size=vocab_size, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                      max_position=max_position, head=head, pad_token_id=0, eos_token_id=1)
    model = Transformer(cfg)
    save_our_checkpoint(path, model, init_params(model, jax.random.key(0)), tokenizer)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("hostile")
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                        eos_token="<eos>", unk_token="<unk>")
    tokenizer.save_pretrained(str(root / "tok"))
    r = random.Random(0)
    words = lambda k: " ".join(r.choices(WORDS, k=k))
    prompt = lambda: f"instruction : {words(3)} response :"
    e = {"root": str(root), "tok": str(root / "tok"),
         "demos": _jsonl(root / "demos.jsonl", [{"prompt": prompt(), "completion": words(3)}
                                                for _ in range(64)]),
         "cmp": _jsonl(root / "cmp.jsonl", [{"prompt": prompt(), "chosen": words(3),
                                             "rejected": words(2)} for _ in range(64)]),
         "prompts": _jsonl(root / "prompts.jsonl", [{"prompt": prompt()} for _ in range(32)]),
         "text": _jsonl(root / "text.jsonl", [{"text": words(12)} for _ in range(32)])}
    e["policy"] = _save_model(str(root / "policy"), tokenizer, "lm", len(VOCAB))
    e["rm"] = _save_model(str(root / "rm"), tokenizer, "scalar", len(VOCAB))
    e["rm_big_vocab"] = _save_model(str(root / "rm_big"), tokenizer, "scalar", len(VOCAB) + 8)
    # A data file whose third line is not JSON.
    lines = open(e["demos"]).read().splitlines()
    lines[2] = lines[2][:-5]
    e["bad_demos"] = str(root / "bad_demos.jsonl")
    open(e["bad_demos"], "w").write("\n".join(lines) + "\n")
    e["hh_mismatch"] = _jsonl(root / "hh.jsonl", [
        {"chosen": "\n\nHuman: hi\n\nAssistant: ok", "rejected": "\n\nHuman: yo\n\nAssistant: no"}])
    broken = root / "broken_model"
    shutil.copytree(e["policy"], broken)
    (broken / "model_config.json").write_text('{"arch": "gpt2", ')
    e["broken_model"] = str(broken)
    (root / "syntax_error.py").write_text("def get_config(:\n    pass\n")
    (root / "no_get_config.py").write_text("X = 1\n")
    e["syntax_error"], e["no_get_config"] = str(root / "syntax_error.py"), str(root / "no_get_config.py")
    return e


def sft(e, *overrides: str) -> list[str]:
    return ["sft", "--config", EXP("tiny_sft.py"), f"--config.tokenizer={e['tok']}",
            f"--config.data.train={e['demos']}", "--config.train.steps=2",
            "--config.train.batch_size=8", "--config.mesh.shape=(1,1,1)", *overrides]


def rm(e, *overrides: str) -> list[str]:
    return ["rm", "--config", EXP("tiny_rm.py"), f"--config.init_from={e['rm']}",
            f"--config.data.train={e['cmp']}", "--config.train.steps=2",
            "--config.train.batch_size=8", "--config.mesh.shape=(1,1,1)",
            "--config.data.max_prompt_len=8", "--config.data.max_response_len=8", *overrides]


def ppo(e, *overrides: str) -> list[str]:
    return ["ppo", "--config", EXP("tiny_ppo.py"), f"--config.policy_from={e['policy']}",
            f"--config.reward_from={e['rm']}", f"--config.data.prompts={e['prompts']}",
            "--config.ppo.iterations=1", "--config.ppo.rollout_batch_size=8",
            "--config.ppo.minibatch_size=4", "--config.mesh.shape=(1,1,1)",
            "--config.data.max_prompt_len=8", "--config.data.max_response_len=8", *overrides]


def pipeline(e, *overrides: str) -> list[str]:
    return ["pipeline", "--config", EXP("instructgpt_tiny.py") + ":micro", *overrides]


@dataclasses.dataclass
class Case:
    id: str
    argv: Callable[[dict], list[str]]
    code: int
    phrase: str
    workdir: bool = True                      # pass --workdir <fresh dir>
    prepare: Callable[[dict, str], None] | None = None
    intact: Callable[[dict, str], bool] | None = None


def _nothing_written(e, workdir) -> bool:
    return not os.path.exists(workdir) or not any(
        n.startswith("config_") or n in ("checkpoints", "model") for n in os.listdir(workdir))


def _old_config_kept(e, workdir) -> bool:
    return open(os.path.join(workdir, "config_sft.json")).read() == '{"earlier": "run"}'


def _write_old_config(e, workdir) -> None:
    os.makedirs(workdir, exist_ok=True)
    open(os.path.join(workdir, "config_sft.json"), "w").write('{"earlier": "run"}')


def _inputs_intact(e, workdir) -> bool:
    return os.path.exists(os.path.join(e["policy"], "params")) and \
        os.path.exists(os.path.join(e["rm"], "params"))


def _finished_sft(e, workdir) -> None:
    """An SFT run whose checkpoint (step 2 of 4) a later command resumes from."""
    assert main(sft(e, "--config.train.steps=4", "--config.train.checkpoint_every=2",
                    "--workdir", workdir)) == 0


def _live_lock(e, workdir) -> None:
    """Another run (this test process: alive, on this host) holds the workdir."""
    import socket
    import time
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, ".lock"), "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "token": "other",
                   "started": time.time(), "heartbeat": time.time(), "lease_s": 120.0}, f)


def _lock_kept(e, workdir) -> bool:
    return json.load(open(os.path.join(workdir, ".lock")))["token"] == "other" and \
        not os.path.exists(os.path.join(workdir, "checkpoints"))


def _truncated_marker(e, workdir) -> None:
    os.makedirs(os.path.join(workdir, "world"), exist_ok=True)
    open(os.path.join(workdir, "world", "DONE"), "w").write('{"seconds": 1.0, "res')


def _marker_kept(e, workdir) -> bool:
    return open(os.path.join(workdir, "world", "DONE")).read() == '{"seconds": 1.0, "res'


def _finite_checkpoint_no_model(e, workdir) -> bool:
    import numpy as np
    from rlhf_jax.checkpoint import load_pytree
    steps = [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()]
    if not steps or os.path.exists(os.path.join(workdir, "model", "params")):
        return False
    state = load_pytree(os.path.join(workdir, "checkpoints", max(steps, key=int), "state"))
    import jax
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state)
               if np.issubdtype(np.asarray(x).dtype, np.floating))


def _model_written(e, workdir) -> bool:
    return os.path.exists(os.path.join(workdir, "model", "params"))


CASES = [
    # --- config fields: checked before any model loads ---------------------------------------
    Case("sft-batch-zero", lambda e: sft(e, "--config.train.batch_size=0"), 2,
         "train.batch_size=0: expected a positive integer", intact=_nothing_written),
    Case("sft-negative-length", lambda e: sft(e, "--config.data.max_prompt_len=-1"), 2,
         "data.max_prompt_len=-1", intact=_nothing_written),
    Case("sft-lengths-past-max-position", lambda e: sft(e, "--config.model.max_position=32"), 2,
         "max_position=32", intact=_nothing_written),
    Case("sft-decay-typo", lambda e: sft(e, "--config.optim.decay=cosin"), 2,
         "optim.decay='cosin': expected one of", intact=_nothing_written),
    Case("sft-dropout-one", lambda e: sft(e, "--config.train.dropout=1.0"), 2,
         "train.dropout=1.0", intact=_nothing_written),
    Case("sft-mesh-wrong-size", lambda e: sft(e, "--config.mesh.shape=(16,1,1)"), 2,
         "mesh.shape=(16, 1, 1)", intact=_nothing_written),
    Case("sft-batch-not-divisible-by-mesh", lambda e: sft(e, "--config.mesh.shape=(-1,1,1)",
                                                         "--config.train.batch_size=12"), 2,
         "batch parallelism", intact=_nothing_written),
    Case("sft-missing-data-file", lambda e: sft(e, "--config.data.train=/nonexistent/d.jsonl"), 2,
         "data.train='/nonexistent/d.jsonl': expected an existing JSONL file",
         intact=_nothing_written),
    Case("sft-old-config-kept-on-bad-field", lambda e: sft(e, "--config.train.batch_size=-3"), 2,
         "train.batch_size=-3", prepare=_write_old_config, intact=_old_config_kept),
    Case("ppo-minibatch-zero", lambda e: ppo(e, "--config.ppo.minibatch_size=0"), 2,
         "ppo.minibatch_size=0: expected a positive integer", intact=_nothing_written),
    Case("ppo-kl-controller-typo", lambda e: ppo(e, "--config.ppo.kl_controller=adaptve"), 2,
         "ppo.kl_controller='adaptve': expected one of 'fixed', 'adaptive'",
         intact=_nothing_written),
    Case("ppo-rollout-not-multiple", lambda e: ppo(e, "--config.ppo.minibatch_size=3"), 2,
         "a multiple of ppo.minibatch_size=3", intact=_nothing_written),
    Case("ppo-vocab-mismatch", lambda e: ppo(e, f"--config.reward_from={e['rm_big_vocab']}"), 2,
         "the same vocabulary for policy, reference, reward and value", intact=_inputs_intact),
    Case("ppo-lengths-past-max-position", lambda e: ppo(e, "--config.data.max_prompt_len=30"), 2,
         "max_position=32", intact=_inputs_intact),
    Case("ppo-top-p-zero", lambda e: ppo(e, "--config.ppo.top_p=0.0"), 2,
         "ppo.top_p=0.0: expected a number in (0, 1]", intact=_nothing_written),
    Case("ppo-gamma-above-one", lambda e: ppo(e, "--config.ppo.gamma=2.0"), 2,
         "ppo.gamma=2.0", intact=_nothing_written),
    Case("ppo-ptx-without-text", lambda e: ppo(e, "--config.ppo.ptx_coef=1.0"), 2,
         "data.pretrain=''", intact=_nothing_written),
    Case("ppo-missing-policy-dir", lambda e: ppo(e, "--config.policy_from=/nonexistent/policy"), 2,
         "policy_from='/nonexistent/policy'", intact=_nothing_written),
    Case("rm-mode-typo", lambda e: rm(e, "--config.mode=pairs"), 2,
         "mode='pairs': expected one of 'kway', 'shuffled_pairs'", intact=_nothing_written),
    Case("rm-max-k-one", lambda e: rm(e, "--config.data.max_k=1"), 2, "data.max_k=1",
         intact=_nothing_written),
    Case("pipeline-negative-lr", lambda e: pipeline(e, "--config.ppo.ppo.lr=-1.0"), 2,
         "ppo.ppo.lr=-1.0: expected a finite number >= 0", intact=_nothing_written),
    # --- the command line itself ---------------------------------------------------------------
    Case("override-unknown-field", lambda e: sft(e, "--config.train.bogus=1"), 2,
         "no field 'train.bogus'", intact=_nothing_written),
    Case("override-wrong-type", lambda e: sft(e, "--config.train.steps=abc"), 2,
         "--config.train.steps='abc': expected a int", intact=_nothing_written),
    Case("multihost-partial-flags", lambda e: sft(e, "--num_processes", "2"), 2,
         "multi-host flags go together", intact=_nothing_written),
    Case("multihost-process-id-out-of-range",
         lambda e: sft(e, "--coordinator_address", "127.0.0.1:1", "--num_processes", "2",
                       "--process_id", "5"), 2, "--process_id", intact=_nothing_written),
    Case("config-file-missing", lambda e: ["sft", "--config", "/nonexistent/cfg.py"], 2,
         "does not exist", intact=_nothing_written),
    Case("config-file-syntax-error", lambda e: ["sft", "--config", e["syntax_error"]], 2,
         "syntax_error.py:1: invalid Python", intact=_nothing_written),
    Case("config-file-without-get-config", lambda e: ["sft", "--config", e["no_get_config"]], 2,
         "defines no get_config()", intact=_nothing_written),
    # --- data and checkpoints ------------------------------------------------------------------
    Case("sft-malformed-jsonl-line", lambda e: sft(e, f"--config.data.train={e['bad_demos']}"), 2,
         "bad_demos.jsonl, line 3"),
    Case("rm-hh-prompts-differ", lambda e: rm(e, f"--config.data.train={e['hh_mismatch']}"), 2,
         "field 'rejected'"),
    Case("sft-init-from-broken-model-config",
         lambda e: sft(e, f"--config.init_from={e['broken_model']}"), 2,
         "model_config.json:1: invalid JSON", intact=_inputs_intact),
    Case("pipeline-truncated-done-marker", lambda e: pipeline(e), 2, "damaged stage marker",
         prepare=_truncated_marker, intact=_marker_kept),
    Case("sft-nan-loss", lambda e: sft(e, "--config.optim.lr=1e9", "--config.train.steps=6",
                                       "--config.train.checkpoint_every=1",
                                       "--config.train.log_every=1"), 3,
         "non-finite", intact=_finite_checkpoint_no_model),
    Case("resume-with-changed-lr", lambda e: sft(e, "--config.train.steps=4",
                                                 "--config.train.checkpoint_every=2",
                                                 "--config.optim.lr=0.01"), 2,
         "optim.lr (checkpoint 0.001, now 0.01)", prepare=_finished_sft, intact=_model_written),
    Case("resume-with-changed-lr-allowed", lambda e: sft(e, "--config.train.steps=4",
                                                         "--config.train.checkpoint_every=2",
                                                         "--config.optim.lr=0.01",
                                                         "--allow_config_change"), 0,
         "", prepare=_finished_sft, intact=_model_written),
    Case("workdir-locked-by-a-live-run", lambda e: sft(e), 2,
         f"another run is using this workdir (host {__import__('socket').gethostname()} pid "
         f"{os.getpid()}", prepare=_live_lock, intact=_lock_kept),
    Case("pipeline-workdir-locked", lambda e: pipeline(e), 2, "another run is using this workdir",
         prepare=_live_lock, intact=_lock_kept),
    Case("workdir-is-a-file", lambda e: sft(e, "--workdir", os.path.join(e["root"], "demos.jsonl")),
         2, "demos.jsonl", workdir=False),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, env, tmp_path, capsys):
    workdir = str(tmp_path / "work")
    if case.prepare:
        case.prepare(env, workdir)
    argv = case.argv(env) + (["--workdir", workdir] if case.workdir else [])
    code = main(argv)
    check_outcome(case, code, capsys.readouterr().err, env, workdir)


def check_outcome(case, code: int, err: str, env, workdir: str) -> None:
    """What every row of every hostile-input table asserts: the exit code; no traceback, nor
    the echoes of background writers; the phrase in the last one-line message (anywhere in the
    log for a success); what must still be intact."""
    assert code == case.code, err[-2000:]
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-2000:]
    if case.code:
        message = [line for line in err.splitlines() if line.startswith("rlhf-jax:")]
        assert message, err[-2000:]
        assert case.phrase in message[-1], message[-1]
    else:
        assert case.phrase in err, err[-2000:]
    if case.intact:
        assert case.intact(env, workdir), f"{case.id}: not intact after the error"
