"""Hostile model directories, one table: damaged, inconsistent or mixed-up model and LoRA
directories given to ``sft`` / ``ppo`` / ``sample`` / ``convert``, each through the real CLI.

Like ``test_hostile_inputs``: the exit code, a phrase of the last ``rlhf-jax:`` line, never a
traceback, and what must be intact. Below the table, the whole-directory writes: an export over
an earlier one leaves none of its files, and a LoRA save that dies leaves the previous adapters.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from rlhf_jax import model_io, storage
from rlhf_jax.cli import main

from test_hostile_inputs import Case, check_outcome, env, ppo, sft  # noqa: F401


def sft_from(e, source: str, *overrides: str) -> list[str]:
    """SFT from model directory ``source``, with lengths that fit its 32 positions."""
    return sft(e, f"--config.init_from={source}", "--config.data.max_prompt_len=8",
               "--config.data.max_response_len=8", *overrides)


def sample(e, checkpoint: str) -> list[str]:
    return ["sample", "--checkpoint", checkpoint, "--prompt", "instruction : w1 response :",
            "--max-prompt-len", "8", "--max-new-tokens", "4", "--greedy"]


def _digest(path: str) -> dict[str, str]:
    """Every file under ``path`` (relative name -> sha256): what "unchanged" means."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def models(env):  # noqa: F811 (the fixture imported above)
    """``env`` plus damaged copies of its policy (ours) and of its transformers export."""
    from rlhf_jax.convert import orbax_to_hf
    root = os.path.join(env["root"], "models")
    os.makedirs(root)
    e = dict(env)

    def copy(source: str, name: str) -> str:
        e[name] = os.path.join(root, name)
        shutil.copytree(source, e[name])
        return e[name]

    e["hf"] = orbax_to_hf(env["policy"], os.path.join(root, "hf"))

    def edit_json(path: str, **changes) -> None:
        with open(path) as f:
            data = json.load(f)
        data.update(changes)
        for key, value in changes.items():
            if value is None:
                data.pop(key)
        with open(path, "w") as f:
            json.dump(data, f)

    os.truncate(os.path.join(copy(e["hf"], "hf_truncated"), "model.safetensors"),
                os.path.getsize(os.path.join(e["hf"], "model.safetensors")) - 100)
    edit_json(os.path.join(copy(e["hf"], "hf_no_n_embd"), "config.json"), n_embd=None)
    edit_json(os.path.join(copy(e["hf"], "hf_n_head_0"), "config.json"), n_head=0)
    # An index naming a shard, beside the single file of another save.
    mixed = copy(e["hf"], "hf_index_disagrees")
    tensors = load_file(os.path.join(mixed, "model.safetensors"))
    save_file(tensors, os.path.join(mixed, "model-00001-of-00001.safetensors"))
    with open(os.path.join(mixed, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors"
                                                  for k in tensors}}, f)
    # Two un-indexed files holding the same tensors: an earlier save's weights beside these.
    overlap = copy(e["hf"], "hf_overlap")
    save_file({k: np.zeros_like(v) for k, v in tensors.items()},
              os.path.join(overlap, "model-old.safetensors"))

    data_dir = os.path.join(copy(env["policy"], "ours_truncated"), "params", "ocdbt.process_0", "d")
    for name in os.listdir(data_dir):
        file = os.path.join(data_dir, name)
        os.truncate(file, os.path.getsize(file) // 2)
    os.truncate(os.path.join(copy(env["policy"], "ours_metadata_truncated"), "params", "_METADATA"),
                100)
    edit_json(os.path.join(copy(env["policy"], "ours_wider_config"), "model_config.json"),
              d_model=32, d_ff=64)
    edit_json(os.path.join(copy(env["policy"], "ours_n_heads_0"), "model_config.json"), n_heads=0)
    edit_json(os.path.join(copy(env["policy"], "ours_no_vocab"), "model_config.json"),
              vocab_size=None)
    no_tok = copy(env["policy"], "ours_no_tokenizer")
    for name in os.listdir(no_tok):
        if name not in ("params", "model_config.json", "extra.json"):
            os.remove(os.path.join(no_tok, name))
    e["digests"] = {name: _digest(e[name]) for name in e if name.startswith(("hf", "ours"))}
    return e


def _source_unchanged(name: str):
    """The damaged directory ``name`` is as it was (nothing repaired or deleted it) and the run
    wrote no checkpoint or model."""
    def check(e, workdir) -> bool:
        return _digest(e[name]) == e["digests"][name] and not any(
            os.path.exists(os.path.join(workdir, out)) for out in ("checkpoints", "model"))
    return check


def _earlier_export(e, workdir) -> None:
    """``workdir/dst``: an earlier export whose weights are another model's."""
    shutil.copytree(e["hf_overlap"], os.path.join(workdir, "dst"))


def _earlier_export_kept(e, workdir) -> bool:
    return _digest(os.path.join(workdir, "dst")) == e["digests"]["hf_overlap"]


def _unrelated_files(e, workdir) -> None:
    os.makedirs(os.path.join(workdir, "dst"))
    with open(os.path.join(workdir, "dst", "notes.txt"), "w") as f:
        f.write("mine")


def _unrelated_files_kept(e, workdir) -> bool:
    return os.listdir(os.path.join(workdir, "dst")) == ["notes.txt"]


def _no_output(e, workdir) -> bool:
    return not os.path.exists(os.path.join(workdir, "out"))


def on_sft(case_id: str, name: str, phrase: str, *overrides: str) -> Case:
    """SFT starting from the damaged directory ``name``."""
    return Case(case_id, lambda e: sft_from(e, e[name], *overrides), 2, phrase,
                intact=_source_unchanged(name))


def on_sample(case_id: str, name: str, phrase: str) -> Case:
    return Case(case_id, lambda e: sample(e, e[name]), 2, phrase, workdir=False,
                intact=_source_unchanged(name))


def on_convert(case_id: str, direction: str, name: str, phrase: str) -> Case:
    """``convert`` from the damaged directory ``name`` to a new one, which must not appear."""
    return Case(case_id, lambda e: ["convert", direction, e[name],
                                    os.path.join(e["work"], "out")],
                2, phrase, workdir=False, intact=_no_output)


def into_dst(case_id: str, direction: str, source: str, phrase: str, prepare, intact) -> Case:
    """``convert`` into ``<work>/dst``, which ``prepare`` filled."""
    return Case(case_id, lambda e: ["convert", direction, e[source],
                                    os.path.join(e["work"], "dst")],
                2, phrase, workdir=False, prepare=prepare, intact=intact)


MIXED = "model.safetensors.index.json and the *.safetensors files disagree"
TRUNCATED = "model.safetensors: truncated"
DAMAGED = "damaged, its arrays cannot be read"
DIFFERENT = "the config and the params are of different models"

CASES = [
    # --- #2: exports into a directory that holds something; files of two saves --------------
    into_dst("convert-jax-to-hf-over-an-earlier-export", "jax-to-hf", "policy",
             "already holds a transformers checkpoint", _earlier_export, _earlier_export_kept),
    into_dst("convert-jax-to-hf-into-a-folder-of-other-files", "jax-to-hf", "policy",
             "not empty (holds notes.txt)", _unrelated_files, _unrelated_files_kept),
    into_dst("convert-hf-to-jax-into-a-folder-of-other-files", "hf-to-jax", "hf",
             "not empty (holds notes.txt)", _unrelated_files, _unrelated_files_kept),
    on_convert("convert-hf-to-jax-index-and-files-disagree", "hf-to-jax", "hf_index_disagrees",
               MIXED),
    on_sample("sample-index-and-files-disagree", "hf_index_disagrees", MIXED),
    on_sft("sft-init-from-overlapping-safetensors", "hf_overlap",
           "is in both model-old.safetensors and model.safetensors"),
    # --- #5: damaged or inconsistent model directories ----------------------------------------
    on_sft("sft-init-from-truncated-safetensors", "hf_truncated", TRUNCATED),
    on_convert("convert-truncated-safetensors", "hf-to-jax", "hf_truncated", TRUNCATED),
    on_sample("sample-truncated-safetensors", "hf_truncated", TRUNCATED),
    on_sft("sft-init-from-config-json-without-a-size", "hf_no_n_embd",
           "config.json: missing 'n_embd'"),
    on_sample("sample-config-json-without-a-size", "hf_no_n_embd", "config.json: missing 'n_embd'"),
    Case("ppo-policy-config-json-n-head-zero",
         lambda e: ppo(e, f"--config.policy_from={e['hf_n_head_0']}"), 2,
         "n_head=0: expected a positive integer", intact=_source_unchanged("hf_n_head_0")),
    on_convert("convert-config-json-n-head-zero", "hf-to-jax", "hf_n_head_0",
               "n_head=0: expected a positive integer"),
    on_sample("sample-model-config-n-heads-zero", "ours_n_heads_0",
              "n_heads=0: expected a positive integer"),
    on_sample("sample-model-config-without-vocab-size", "ours_no_vocab",
              "missing fields ['vocab_size']"),
    on_sample("sample-truncated-orbax-params", "ours_truncated", DAMAGED),
    on_sft("sft-init-from-truncated-orbax-params", "ours_truncated", DAMAGED),
    on_convert("convert-truncated-orbax-params", "jax-to-hf", "ours_truncated", DAMAGED),
    Case("ppo-reward-truncated-orbax-metadata",
         lambda e: ppo(e, f"--config.reward_from={e['ours_metadata_truncated']}"), 2,
         "params: no orbax checkpoint metadata",
         intact=_source_unchanged("ours_metadata_truncated")),
    on_sft("sft-init-from-model-config-disagreeing-with-params", "ours_wider_config",
           "embed/embedding has shape (26, 16), but"),
    on_sample("sample-model-config-disagreeing-with-params", "ours_wider_config", DIFFERENT),
    on_convert("convert-model-config-disagreeing-with-params", "jax-to-hf", "ours_wider_config",
               DIFFERENT),
    on_sft("sft-init-from-model-without-tokenizer", "ours_no_tokenizer", "no tokenizer files",
           "--config.tokenizer="),
    on_sample("sample-model-without-tokenizer", "ours_no_tokenizer", "no tokenizer"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_model(case: Case, models, tmp_path, capsys):
    workdir = str(tmp_path / "work")
    os.makedirs(workdir)
    if case.prepare:
        case.prepare(models, workdir)
    argv = case.argv(dict(models, work=workdir)) + (["--workdir", workdir] if case.workdir else [])
    check_outcome(case, main(argv), capsys.readouterr().err, models, workdir)


# --- whole-directory writes -------------------------------------------------------------------

def test_export_over_an_earlier_one_replaces_it_whole(models, tmp_path):
    """#2: with --overwrite, the stale files of an earlier export are gone (they used to stay,
    and the loader, merging every file, read their weights), and the export reads back as the
    model exported."""
    from rlhf_jax.cli import main
    from rlhf_jax.convert import hf_to_orbax
    dst = str(tmp_path / "dst")
    shutil.copytree(models["hf_overlap"], dst)
    assert main(["convert", "jax-to-hf", models["policy"], dst, "--overwrite"]) == 0
    assert sorted(os.listdir(dst)) == sorted(os.listdir(models["hf"]))
    assert not [n for n in os.listdir(tmp_path) if n != "dst"]     # no staging copy left
    back = hf_to_orbax(dst, str(tmp_path / "back"))
    _, expected, _ = model_io.load_our_checkpoint(models["policy"], with_tokenizer=False)
    _, got, _ = model_io.load_our_checkpoint(back, with_tokenizer=False)
    jax.tree.map(np.testing.assert_array_equal, got, expected)


def _lora_role():
    from rlhf_jax.stages.ppo.roles import LORA, Role
    return Role("policy", None, LORA, "reference", lora_rank=2, lora_alpha=4.0,
                lora_targets=("q",))


def test_lora_save_killed_during_a_rerun_keeps_the_previous_adapters(tmp_path, monkeypatch):
    """#4: a kill while a rerun saves its adapters leaves the previous complete lora/ (it used
    to leave the old lora.json beside the new run's adapters, or beside none)."""
    from rlhf_jax import checkpoint as ckpt_lib
    from rlhf_jax.convert import read_lora_meta
    from rlhf_jax.stages.ppo.roles import save_adapters
    lora_dir = str(tmp_path / "lora")
    old = {"layer_0": {"attn": {"q": {"a": np.ones((4, 2), np.float32),
                                      "b": np.ones((2, 4), np.float32)}}}}
    save_adapters(lora_dir, _lora_role(), old, "/base/one")

    class Killed(Exception):
        pass

    real_write = storage.write_json

    def dying_write(path, obj, **kwargs):    # the new adapters are written, lora.json is not
        if path.endswith("lora.json"):
            raise Killed()
        real_write(path, obj, **kwargs)

    monkeypatch.setattr(storage, "write_json", dying_write)
    new = jax.tree.map(lambda x: 2 * x, old)
    with pytest.raises(Killed):
        save_adapters(lora_dir, _lora_role(), new, "/base/two")
    monkeypatch.undo()
    assert read_lora_meta(lora_dir)["base"] == "/base/one"
    jax.tree.map(np.testing.assert_array_equal,
                 ckpt_lib.load_pytree(os.path.join(lora_dir, "adapters")), old)
    assert sorted(os.listdir(tmp_path)) == ["lora"]
    save_adapters(lora_dir, _lora_role(), new, "/base/two")       # the rerun replaces it whole
    assert read_lora_meta(lora_dir)["base"] == "/base/two"
    jax.tree.map(np.testing.assert_array_equal,
                 ckpt_lib.load_pytree(os.path.join(lora_dir, "adapters")), new)
