"""Hostile data, one table: damaged, degenerate or contradictory data files and configs that
name impossible sizes, each through the real CLI (``rlhf_jax.cli.main``).

Like ``test_hostile_inputs``: the exit code, a phrase of the last ``rlhf-jax:`` line, never a
traceback, and what must be intact. A case marked ``before_model`` must fail before any model
loads (the README's promise for a bad data row or config field): loading one fails the test.
"""
from __future__ import annotations

import dataclasses
import json
import os

import pytest

from rlhf_jax import model_io
from rlhf_jax.cli import main

import test_hostile_inputs as hostile
from test_hostile_inputs import (EXP, Case, _jsonl, _nothing_written, env, ppo,  # noqa: F401
                                 rm, sft)


@dataclasses.dataclass
class DataCase(Case):
    before_model: bool = True


def dpo(e, *overrides: str) -> list[str]:
    return ["dpo", "--config", EXP("tiny_dpo.py"), f"--config.init_from={e['policy']}",
            f"--config.data.train={e['cmp']}", "--config.train.steps=2",
            "--config.train.batch_size=8", "--config.mesh.shape=(1,1,1)",
            "--config.data.max_prompt_len=8", "--config.data.max_response_len=8", *overrides]


def _write(path, text: bytes) -> str:
    with open(path, "wb") as f:
        f.write(text)
    return str(path)


@pytest.fixture(scope="module")
def files(env):
    root = env["root"]
    demo = {"prompt": "instruction : w1 w2 response :", "completion": "w3 w4 w5"}
    long_demo = {"prompt": demo["prompt"], "completion": " ".join(["w6"] * 12)}
    nested = "[" * 100_000 + "]" * 100_000
    return {
        "one_demo": _jsonl(os.path.join(root, "one_demo.jsonl"), [demo]),
        "few_short": _jsonl(os.path.join(root, "few_short.jsonl"),
                            [demo] * 5 + [long_demo] * 59),
        "three_cmp": _jsonl(os.path.join(root, "three_cmp.jsonl"), [
            {"prompt": "instruction : w1 response :", "chosen": "w2", "rejected": "w3"}] * 3),
        "two_prompts": _jsonl(os.path.join(root, "two_prompts.jsonl"),
                              [{"prompt": "instruction : w1 response :"}] * 2),
        "nested": _write(os.path.join(root, "nested.jsonl"), (
            json.dumps(demo) + "\n" + '{"prompt": "a", "completion": "b", "meta": '
            + nested + "}\n").encode()),
        "same": _jsonl(os.path.join(root, "same.jsonl"), [
            {"prompt": "instruction : w1 response :", "completions": ["w2 w3"] * 4,
             "ranking": [0, 1, 2, 3]}] * 16),
        "dup_key": _write(os.path.join(root, "dup_key.jsonl"), (
            json.dumps(demo) + "\n"
            + '{"prompt": "instruction : w1 response :", "completion": "w2", '
              '"prompt": "instruction : w9 response :"}\n').encode()),
        "bad_prompt": _jsonl(os.path.join(root, "bad_prompt.jsonl"),
                             [{"prompt": "instruction : w1 response :"}] * 3 + [{"prompt": 7}]),
    }


def _no_outputs(e, workdir) -> bool:
    """Stopped after the model loaded (rows dropped by the tokenizer), before any step."""
    return not any(os.path.exists(os.path.join(workdir, name))
                   for name in ("checkpoints", "model", "metrics.jsonl"))


def _resumed_over_bad_metrics(e, workdir) -> None:
    """A finished 4-step SFT run whose metrics.jsonl then got a line of invalid UTF-8."""
    assert main(sft(e, "--config.train.steps=4", "--config.train.checkpoint_every=2",
                    "--config.train.log_every=1", "--workdir", workdir)) == 0
    path = os.path.join(workdir, "metrics.jsonl")
    os.replace(path, path + ".clean")
    with open(path + ".clean", "rb") as clean, open(path, "wb") as f:
        f.write(clean.read() + b'{"step": 3, "loss": "\xff\xfe"}\n')


def _metrics_clean(e, workdir) -> bool:
    """The undecodable line is gone; the replayed steps are logged once each, as before."""
    path = os.path.join(workdir, "metrics.jsonl")
    lines = lambda p: [json.loads(line) for line in open(p, "rb").read().decode().splitlines()]
    shape = lambda records: [(r["step"], sorted(r)) for r in records]
    return shape(lines(path)) == shape(lines(path + ".clean"))


CASES = [
    # --- #9: degenerate data gives one line, exit 2 -------------------------------------------
    DataCase("sft-one-row-file",
             lambda e: sft(e, f"--config.data.train={e['files']['one_demo']}"), 2,
             "expected at least train.batch_size=8 rows to train on; it has 1 row(s), of which "
             "data.valid_fraction=0.1 holds out 1 for validation, leaving 0",
             intact=_nothing_written),
    DataCase("rm-fewer-rows-than-a-batch",
             lambda e: rm(e, f"--config.data.train={e['files']['three_cmp']}",
                          f"--config.data.valid={e['cmp']}"), 2,
             "expected at least train.batch_size=8 rows to train on; it has 3",
             intact=_nothing_written),
    DataCase("ppo-fewer-prompts-than-a-rollout",
             lambda e: ppo(e, f"--config.data.prompts={e['files']['two_prompts']}"), 2,
             "expected at least 8 prompts (ppo.rollout_batch_size=8 / ppo.group_size=1)",
             intact=_nothing_written),
    DataCase("sft-every-row-dropped-by-overlong-drop",
             lambda e: sft(e, "--config.data.overlong=drop", "--config.data.max_response_len=2"),
             2, "no demonstrations left after tokenization", intact=_no_outputs,
             before_model=False),
    DataCase("ppo-every-prompt-dropped-by-overlong-drop",
             lambda e: ppo(e, "--config.data.overlong=drop", "--config.data.max_prompt_len=2"),
             2, "no prompts left after tokenization", intact=_no_outputs, before_model=False),
    DataCase("sft-fewer-rows-than-a-batch-after-overlong-drop",
             lambda e: sft(e, f"--config.data.train={e['files']['few_short']}",
                           f"--config.data.valid={e['demos']}",
                           "--config.data.overlong=drop", "--config.data.max_response_len=6"),
             2, "5 examples, fewer than one global batch of 8", intact=_no_outputs,
             before_model=False),
    DataCase("sft-deeply-nested-json-line",
             lambda e: sft(e, f"--config.data.train={e['files']['nested']}"), 2,
             "nested.jsonl, line 2: expected JSON nested at most about",
             intact=_nothing_written),
    DataCase("rm-empty-init-from", lambda e: rm(e, "--config.init_from="), 2,
             "init_from='': expected a model directory (or tokenizer + model for a random "
             "start)", intact=_nothing_written),
    DataCase("ppo-empty-policy-from", lambda e: ppo(e, "--config.policy_from="), 2,
             "policy_from='': expected a model directory", intact=_nothing_written),
    DataCase("sft-resume-over-undecodable-metrics-line",
             lambda e: sft(e, "--config.train.steps=4", "--config.train.checkpoint_every=2",
                           "--config.train.log_every=1"), 0, "",
             prepare=_resumed_over_bad_metrics, intact=_metrics_clean, before_model=False),
    # --- #10: contradictory data and impossible sizes, refused before any model loads --------
    DataCase("rm-identical-completions-ranked-apart",
             lambda e: rm(e, f"--config.data.train={e['files']['same']}"), 2,
             "same.jsonl, line 1: field 'ranking': got [0, 1, 2, 3] -- expected equal ranks for "
             "identical completions (completions[0] and completions[1] are the same text)",
             intact=_nothing_written),
    DataCase("sft-duplicate-json-key",
             lambda e: sft(e, f"--config.data.train={e['files']['dup_key']}"), 2,
             "dup_key.jsonl, line 2: field 'prompt': got a second 'prompt' in one object -- "
                "expected each key once", intact=_nothing_written),
    DataCase("ppo-lora-rank-above-width", lambda e: ppo(e, "--config.ppo.lora.rank=64"), 2,
             "ppo.lora.rank=64: expected at most the policy network's width d_model=16",
             intact=_nothing_written),
    DataCase("ppo-value-lora-rank-above-width",
             lambda e: ppo(e, "--config.ppo.value_lora.rank=17"), 2,
             "ppo.value_lora.rank=17: expected at most the value network's width d_model=16",
             intact=_nothing_written),
    DataCase("sft-bad-row-before-model", lambda e: sft(e, f"--config.data.train={e['bad_demos']}"),
             2, "bad_demos.jsonl, line 3", intact=_nothing_written),
    DataCase("rm-bad-row-before-model", lambda e: rm(e, f"--config.data.train={e['hh_mismatch']}"),
             2, "hh.jsonl, line 1: field 'rejected'", intact=_nothing_written),
    DataCase("dpo-bad-row-before-model",
             lambda e: dpo(e, f"--config.data.train={e['hh_mismatch']}"), 2,
             "hh.jsonl, line 1: field 'rejected'", intact=_nothing_written),
    DataCase("ppo-bad-prompt-row-before-model",
             lambda e: ppo(e, f"--config.data.prompts={e['files']['bad_prompt']}"), 2,
             "bad_prompt.jsonl, line 4: field 'prompt': got 7", intact=_nothing_written),
]


def _no_model_loads(*args, **kwargs):
    raise AssertionError("a model loaded before the data and config were checked")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_data(case: DataCase, env, files, tmp_path, capsys, monkeypatch):
    if case.before_model:
        assert case.prepare is None, "a preparing run loads models"
        monkeypatch.setattr(model_io, "load_model", _no_model_loads)
        monkeypatch.setattr(model_io, "init_or_load_model", _no_model_loads)
    hostile.test_hostile_input(case, {**env, "files": files}, tmp_path, capsys)
