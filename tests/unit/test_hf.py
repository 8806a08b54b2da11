"""Hugging Face interop: logit parity with transformers (PyTorch), export, meshes, bad input,
and the HF <-> our-checkpoint conversion used by ``rlhf-jax convert``."""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import NamedSharding
from safetensors.numpy import load_file, save_file

from parity_models import (ARCHS, EOS_ID, PAD_ID, PARITY_ATOL, VOCAB, hf_model, left_padded_batch,
                           make_tokenizer, max_diff_at_real_positions, our_logits, torch_logits)
from rlhf_jax import model_io, storage
from rlhf_jax.models.hf import load_tokenizer
from rlhf_jax.convert import hf_to_orbax, orbax_to_hf
from rlhf_jax.errors import UserError
from rlhf_jax.model_io import load_our_checkpoint, save_our_checkpoint
from rlhf_jax.models import (CheckpointFormatError, Transformer, from_pretrained,
                             save_pretrained)
from rlhf_jax.sharding import make_mesh



@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """arch -> (checkpoint dir with tokenizer, torch model, reference logits on the batch)."""
    ids, mask = left_padded_batch()
    out = {}
    for arch in ARCHS:
        model = hf_model(arch)
        path = tmp_path_factory.mktemp(f"hf_{arch}")
        model.save_pretrained(path)
        make_tokenizer().save_pretrained(path)
        out[arch] = (str(path), model, torch_logits(model, ids, mask))
    return out


# --- parity ----------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, {"scan_layers": True}, {"remat": True},
                                       {"scan_layers": True, "remat": True}],
                         ids=["plain", "scan", "remat", "scan+remat"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers_on_left_padded_batch(checkpoints, arch, overrides):
    path, _, reference = checkpoints[arch]
    ids, mask = left_padded_batch()
    model, params, _ = from_pretrained(path, **overrides)
    assert model.config.arch == arch
    if arch != "gpt2":
        assert model.config.kv_heads == 2 < model.config.n_heads
    if overrides.get("scan_layers"):
        assert "layers" in params and "layer_0" not in params
    logits = our_logits(model, params, ids, mask)
    assert logits.shape == reference.shape
    diff = max_diff_at_real_positions(logits, reference, mask)
    print(f"\n[parity] {arch} {overrides or 'plain'}: max |logit diff| = {diff:.3e}")
    assert diff <= PARITY_ATOL


@pytest.mark.parametrize("arch", ARCHS)
def test_export_round_trip_through_transformers_and_our_loader(checkpoints, arch, tmp_path):
    path, _, reference = checkpoints[arch]
    ids, mask = left_padded_batch()
    model, params, tokenizer = from_pretrained(path, scan_layers=(arch == "llama"))
    ours = our_logits(model, params, ids, mask)

    export = save_pretrained(str(tmp_path / "export"), model, params, tokenizer)
    assert os.path.exists(os.path.join(export, "config.json"))
    assert os.path.exists(os.path.join(export, "model.safetensors"))
    reloaded_torch = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    assert type(reloaded_torch).__name__ == type(checkpoints[arch][1]).__name__
    exported = torch_logits(reloaded_torch, ids, mask)
    # Same fp32 weights as the original torch model, so the same logits up to rounding.
    assert max_diff_at_real_positions(exported, reference, mask) <= 1e-6

    model2, params2, tokenizer2 = from_pretrained(export)
    reread = our_logits(model2, params2, ids, mask)
    assert max_diff_at_real_positions(reread, ours, mask) <= 1e-6
    # The tokenizer written beside the export encodes like the one passed in.
    exported_tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(export)
    text = "the dog ran to the park"
    assert exported_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert tokenizer2 is not None


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_tokenizer_saved_beside_checkpoint_is_returned(checkpoints, arch):
    _, _, tokenizer = from_pretrained(checkpoints[arch][0])
    assert tokenizer is not None
    assert tokenizer("the cat sat on the mat")["input_ids"] == [3, 4, 5, 6, 3, 7]
    assert tokenizer.pad_token_id == PAD_ID and tokenizer.eos_token_id == EOS_ID


def test_checkpoint_without_tokenizer_returns_none(checkpoints, tmp_path):
    path = tmp_path / "no_tokenizer"
    path.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(checkpoints["gpt2"][0], name), path / name)
    _, params, tokenizer = from_pretrained(str(path))
    assert tokenizer is None
    assert "embed" in params


@pytest.mark.parametrize("arch", ARCHS)
def test_loading_onto_a_mesh_gives_same_logits_and_sharded_params(checkpoints, arch):
    path, _, reference = checkpoints[arch]
    ids, mask = left_padded_batch()
    mesh = make_mesh((2, 2, 2))
    model, params, _ = from_pretrained(path, mesh=mesh)
    assert model.mesh is mesh
    leaves = jax.tree.leaves(params)
    assert all(isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh
               for leaf in leaves)
    # The embedding table is split (vocab over tensor is 97 % 2 != 0, so only embed over fsdp).
    embedding = params["embed"]["embedding"]
    assert not embedding.sharding.is_fully_replicated
    assert embedding.sharding.spec[1] == "fsdp"
    q_kernel = params["layer_0"]["attn"]["q"]["kernel"]
    assert tuple(q_kernel.sharding.spec)[:2] == ("fsdp", "tensor")
    logits = our_logits(model, params, ids, mask)
    diff = max_diff_at_real_positions(logits, reference, mask)
    print(f"\n[parity on mesh (2,2,2)] {arch}: max |logit diff| = {diff:.3e}")
    assert diff <= PARITY_ATOL


def test_loading_onto_a_mesh_with_scanned_layers(checkpoints):
    path, _, reference = checkpoints["llama"]
    ids, mask = left_padded_batch()
    mesh = make_mesh((1, 2, 4))
    model, params, _ = from_pretrained(path, mesh=mesh, scan_layers=True)
    k_kernel = params["layers"]["attn"]["k"]["kernel"]     # [L, D, KV=2, Dh]
    assert k_kernel.shape == (2, 32, 2, 8)
    # kv_heads=2 is not divisible by tensor=4: stays replicated on that dim, D still on fsdp.
    assert tuple(k_kernel.sharding.spec)[:3] == (None, "fsdp", None)
    logits = our_logits(model, params, ids, mask)
    assert max_diff_at_real_positions(logits, reference, mask) <= PARITY_ATOL


# --- bad input -------------------------------------------------------------------------------

def copy_checkpoint(source: str, dest) -> str:
    shutil.copytree(source, dest)
    return str(dest)


def test_directory_without_config_json(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints["gpt2"][0], tmp_path / "ckpt")
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(FileNotFoundError, match=r"config\.json: missing"):
        from_pretrained(path)


def test_path_that_is_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        from_pretrained(str(tmp_path / "does_not_exist"))


def test_directory_without_safetensors(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints["gpt2"][0], tmp_path / "ckpt")
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors files"):
        from_pretrained(path)


class _CreatesFileWhenUnpickled:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_pytorch_checkpoint_is_refused_and_never_unpickled(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints["gpt2"][0], tmp_path / "ckpt")
    os.remove(os.path.join(path, "model.safetensors"))
    marker = tmp_path / "unpickled.marker"
    with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
        pickle.dump(_CreatesFileWhenUnpickled(str(marker)), f)
    with pytest.raises(FileNotFoundError,
                       match=r"no \*\.safetensors.*pytorch_model\.bin.*never loaded"):
        from_pretrained(path)
    assert not marker.exists()


def test_unsupported_architecture(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints["gpt2"][0], tmp_path / "ckpt")
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["architectures"] = ["BertModel"]
    with open(config_path, "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointFormatError,
                       match=r"config\.json: unsupported architecture \['BertModel'\]"):
        from_pretrained(path)


def test_invalid_config_json(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints["gpt2"][0], tmp_path / "ckpt")
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write("{\n  \"n_embd\": 32,\n  oops\n}")
    with pytest.raises(CheckpointFormatError, match=r"config\.json:3: invalid JSON"):
        from_pretrained(path)


def rewrite_tensors(path: str, edit) -> None:
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_tensor_with_wrong_shape(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints["llama"][0], tmp_path / "ckpt")
    name = "model.layers.0.self_attn.k_proj.weight"      # [kv_heads * head_dim, d] = [16, 32]

    def widen(tensors):
        tensors[name] = np.zeros((32, 32), np.float32)
    rewrite_tensors(path, widen)
    with pytest.raises(CheckpointFormatError,
                       match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\."
                             r"weight' has shape \(32, 32\), but config\.json implies \(16, 32\)"):
        from_pretrained(path)


def test_gpt2_fused_attention_with_wrong_shape(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints["gpt2"][0], tmp_path / "ckpt")
    name = next(k for k in load_file(os.path.join(path, "model.safetensors"))
                if k.endswith("h.1.attn.c_attn.weight"))

    def transpose(tensors):
        tensors[name] = np.ascontiguousarray(tensors[name].T)     # [96, 32] instead of [32, 96]
    rewrite_tensors(path, transpose)
    with pytest.raises(CheckpointFormatError, match=r"h\.1\.attn\.c_attn\.weight' has shape "
                                                    r"\(96, 32\), but config\.json implies \(32, 96\)"):
        from_pretrained(path)


def test_missing_tensor(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints["qwen2"][0], tmp_path / "ckpt")
    rewrite_tensors(path, lambda tensors: tensors.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(CheckpointFormatError,
                       match=r"tensor 'model\.layers\.1\.mlp\.down_proj\.weight' \(for "
                             r"layer_1/mlp/down/kernel\) is missing from model\.safetensors"):
        from_pretrained(path)


def _shard(path: str, index: dict | None, **files: list[str]) -> None:
    """Replace model.safetensors by ``files`` (name -> the tensors it holds), with ``index``
    as model.safetensors.index.json's weight_map (None: no index)."""
    tensors = load_file(os.path.join(path, "model.safetensors"))
    os.remove(os.path.join(path, "model.safetensors"))
    for name, keys in files.items():
        save_file({k: tensors[k] for k in keys}, os.path.join(path, name))
    if index is not None:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"weight_map": index}, f)


@pytest.mark.parametrize("layout,message", [
    ("index-names-a-missing-file", r"index\.json and the \*\.safetensors files disagree: it "
                                   r"names \['a\.safetensors', 'gone\.safetensors'\]"),
    ("file-holds-an-unindexed-tensor", r"index\.json and a\.safetensors disagree: tensor "
                                       r"'.*' is in a\.safetensors but the index says 'b\."),
    ("unindexed-files-overlap", r"tensor '.*' is in both a\.safetensors and b\.safetensors"),
])
def test_safetensors_of_two_saves_are_never_mixed(checkpoints, tmp_path, layout, message):
    path = copy_checkpoint(checkpoints["llama"][0], tmp_path / "ckpt")
    keys = sorted(load_file(os.path.join(path, "model.safetensors")))
    half = len(keys) // 2
    if layout == "index-names-a-missing-file":
        _shard(path, {**{k: "a.safetensors" for k in keys[:half]},
                      **{k: "gone.safetensors" for k in keys[half:]}}, **{"a.safetensors": keys})
    elif layout == "file-holds-an-unindexed-tensor":
        _shard(path, {**{k: "a.safetensors" for k in keys[:half]},
                      **{k: "b.safetensors" for k in keys[half:]}},
               **{"a.safetensors": keys[:half + 1], "b.safetensors": keys[half:]})
    else:
        _shard(path, None, **{"a.safetensors": keys[:half + 1], "b.safetensors": keys[half:]})
    with pytest.raises(CheckpointFormatError, match=message):
        model_io.check_model_dir(path)
    with pytest.raises(CheckpointFormatError, match=message):
        from_pretrained(path)


def test_sharded_checkpoint_whose_index_agrees_loads(checkpoints, tmp_path):
    path, _, reference = checkpoints["llama"]
    path = copy_checkpoint(path, tmp_path / "ckpt")
    keys = sorted(load_file(os.path.join(path, "model.safetensors")))
    half = len(keys) // 2
    _shard(path, {**{k: "a.safetensors" for k in keys[:half]},
                  **{k: "b.safetensors" for k in keys[half:]}},
           **{"a.safetensors": keys[:half], "b.safetensors": keys[half:]})
    ids, mask = left_padded_batch()
    model, params, _ = from_pretrained(path)
    assert max_diff_at_real_positions(our_logits(model, params, ids, mask), reference,
                                      mask) <= PARITY_ATOL


@pytest.mark.parametrize("cut", [100, 4, -100], ids=["inside-header", "inside-length",
                                                     "inside-data"])
def test_truncated_safetensors_is_named_before_any_tensor_is_read(checkpoints, tmp_path, cut):
    path = copy_checkpoint(checkpoints["gpt2"][0], tmp_path / "ckpt")
    file = os.path.join(path, "model.safetensors")
    os.truncate(file, cut if cut > 0 else os.path.getsize(file) + cut)
    with pytest.raises(CheckpointFormatError, match=rf"{re.escape(file)}: .*truncated"):
        model_io.check_model_dir(path)


@pytest.mark.parametrize("edit,message", [
    ({"n_embd": None}, r"config\.json: missing 'n_embd'; expected a positive integer"),
    ({"n_head": 0}, r"config\.json: n_head=0: expected a positive integer"),
    ({"n_layer": -1}, r"config\.json: n_layer=-1: expected a positive integer"),
    ({"n_head": 3}, r"config\.json: invalid TransformerConfig: d_model=32 is not divisible by "
                    r"n_heads=3"),
])
def test_config_json_with_impossible_sizes(checkpoints, tmp_path, edit, message):
    path = copy_checkpoint(checkpoints["gpt2"][0], tmp_path / "ckpt")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.update(edit)
    config = {k: v for k, v in config.items() if v is not None}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointFormatError, match=message):
        from_pretrained(path)


# --- conversion (rlhf-jax convert) -----------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_hf_to_ours_to_hf_gives_identical_logits_in_transformers(checkpoints, arch, tmp_path):
    path, _, reference = checkpoints[arch]
    ids, mask = left_padded_batch()
    ours_dir = hf_to_orbax(path, str(tmp_path / "ours"))
    assert os.path.isdir(os.path.join(ours_dir, "params"))
    with open(os.path.join(ours_dir, "model_config.json")) as f:
        assert json.load(f)["arch"] == arch

    model, params, tokenizer = load_our_checkpoint(ours_dir)
    assert tokenizer is not None and tokenizer("dog ran")["input_ids"] == [9, 10]
    ours = our_logits(model, params, ids, mask)
    assert max_diff_at_real_positions(ours, reference, mask) <= PARITY_ATOL

    hf_dir = orbax_to_hf(ours_dir, str(tmp_path / "back_to_hf"))
    back = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    np.testing.assert_array_equal(torch_logits(back, ids, mask), reference)
    for name, tensor in checkpoints[arch][1].state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, rtol=0, atol=0)
    # The tokenizer survives both directions unchanged (also for qwen2, see load_tokenizer).
    assert load_tokenizer(hf_dir)("the park")["input_ids"] == [3, 12]
    if arch != "qwen2":   # AutoTokenizer rebuilds any qwen2 tokenizer as Qwen2Tokenizer
        assert transformers.AutoTokenizer.from_pretrained(hf_dir)("the park")["input_ids"] == [3, 12]


def test_load_our_checkpoint_onto_mesh_with_overrides(checkpoints, tmp_path):
    path, _, reference = checkpoints["qwen2"]
    ids, mask = left_padded_batch()
    ours_dir = hf_to_orbax(path, str(tmp_path / "ours"))
    mesh = make_mesh((1, 2, 4))
    model, params, _ = load_our_checkpoint(ours_dir, mesh=mesh, scan_layers=True, remat=True)
    assert model.config.scan_layers and model.config.remat
    q_kernel = params["layers"]["attn"]["q"]["kernel"]
    assert q_kernel.sharding.mesh == mesh and tuple(q_kernel.sharding.spec)[:3] == (None, "fsdp", "tensor")
    logits = our_logits(model, params, ids, mask)
    assert max_diff_at_real_positions(logits, reference, mask) <= PARITY_ATOL
    with pytest.raises(ValueError, match=r"overrides \['head'\] change the parameter tree"):
        load_our_checkpoint(ours_dir, head="scalar")


def test_hf_to_ours_in_bfloat16(checkpoints, tmp_path):
    path, _, reference = checkpoints["llama"]
    ids, mask = left_padded_batch()
    ours_dir = hf_to_orbax(path, str(tmp_path / "ours"), dtype="bfloat16")
    model, params, _ = load_our_checkpoint(ours_dir, with_tokenizer=False)
    assert model.config.param_dtype == "bfloat16" and model.config.dtype == "bfloat16"
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    logits = our_logits(model, params, ids, mask)
    scale = np.abs(reference).max()
    assert max_diff_at_real_positions(logits, reference, mask) <= 0.05 * scale + 0.02


def test_scalar_head_model_round_trips_through_our_format(checkpoints, tmp_path):
    model, params, tokenizer = from_pretrained(checkpoints["gpt2"][0])
    reward_model = Transformer(model.config.replace(head="scalar"))
    rng = np.random.RandomState(0)
    params = dict(params, score_head={
        "kernel": jnp.asarray(rng.normal(0, 0.2, (model.config.d_model, 1)), jnp.float32),
        "bias": jnp.asarray([0.5], jnp.float32)})
    ours_dir = save_our_checkpoint(str(tmp_path / "rm"), reward_model, params, tokenizer)
    loaded_model, loaded_params, loaded_tokenizer = load_our_checkpoint(ours_dir)
    assert loaded_model.config == reward_model.config
    ids, mask = left_padded_batch()
    expected = our_logits(reward_model, params, ids, mask)
    assert expected.shape == ids.shape
    np.testing.assert_array_equal(our_logits(loaded_model, loaded_params, ids, mask), expected)
    assert loaded_tokenizer("cat")["input_ids"] == [4]
    # Scalar-head models now export as GPT2ForSequenceClassification (tests/integration/test_hf_reward.py).
    export = orbax_to_hf(ours_dir, str(tmp_path / "hf"))
    with open(os.path.join(export, "config.json")) as f:
        assert json.load(f)["architectures"] == ["GPT2ForSequenceClassification"]


def test_load_our_checkpoint_without_model_config(tmp_path):
    (tmp_path / "params").mkdir()
    with pytest.raises(FileNotFoundError, match=r"model_config\.json: missing"):
        load_our_checkpoint(str(tmp_path))


def test_convert_cli_both_directions(tmp_path, capsys):
    from rlhf_jax import cli
    hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    assert cli.main(["convert", "hf-to-jax", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert cli.main(["convert", "jax-to-hf", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    ids = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        np.testing.assert_array_equal(hf_model(ids).logits.numpy(), back(ids).logits.numpy())
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", "--help"])
    assert exit_info.value.code == 0
    assert "safetensors" in capsys.readouterr().out


# --- model directories on gs:// (a GCS emulator) ---------------------------------------------

def test_our_checkpoint_round_trips_through_gcs(checkpoints, gcs_path, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_JAX_CACHE", str(tmp_path / "cache"))
    model, params, tokenizer = from_pretrained(checkpoints["gpt2"][0])
    our_dir = storage.join(gcs_path, "sft", "model")
    assert save_our_checkpoint(our_dir, model, params, tokenizer, extra={"stage": "sft"}) == our_dir
    assert model_io.is_our_checkpoint(our_dir)
    loaded, loaded_params, loaded_tokenizer, extra = model_io.load_model(our_dir, None)
    assert loaded.config == model.config and extra == {"stage": "sft"}
    jax.tree.map(np.testing.assert_array_equal, loaded_params, params)
    assert loaded_tokenizer("the cat")["input_ids"] == [3, 4]
    # The tokenizer came from a local copy of the small files only, not of the params.
    copies = os.listdir(tmp_path / "cache" / "downloads")
    assert len(copies) == 1 and "params" not in os.listdir(tmp_path / "cache" / "downloads" /
                                                           copies[0])

    with pytest.raises(UserError, match="already holds a model"):
        save_our_checkpoint(our_dir, model, params, tokenizer)
    # Overwriting replaces the previous model whole (its tokenizer files too).
    save_our_checkpoint(our_dir, model, params, None, overwrite=True)
    assert "tokenizer.json" not in storage.listdir(our_dir)
    assert model_io.read_extra(our_dir) == {}


def test_gcs_save_killed_before_the_end_leaves_no_model(checkpoints, gcs_path, monkeypatch):
    # In place on an object store: model_config.json, which makes the directory a model, is
    # removed first and written last.
    model, params, _ = from_pretrained(checkpoints["gpt2"][0], with_tokenizer=False)
    our_dir = storage.join(gcs_path, "model")
    save_our_checkpoint(our_dir, model, params)

    class Killed(Exception):
        pass

    class DyingTokenizer:
        def save_pretrained(self, path):
            raise Killed

    with pytest.raises(Killed):
        save_our_checkpoint(our_dir, model, params, DyingTokenizer(), overwrite=True)
    assert storage.exists(storage.join(our_dir, "params"))
    assert not model_io.is_our_checkpoint(our_dir)
    save_our_checkpoint(our_dir, model, params)          # a rerun writes it again
    assert model_io.is_our_checkpoint(our_dir)


def test_transformers_checkpoint_on_gcs_loads(checkpoints, gcs_path, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_JAX_CACHE", str(tmp_path / "cache"))
    path, _, reference = checkpoints["llama"]
    ids, mask = left_padded_batch()
    hf_dir = storage.join(gcs_path, "llama")
    storage.upload(path, hf_dir)
    model, params, tokenizer, extra = model_io.load_model(hf_dir, None)
    assert model.config.arch == "llama" and extra == {}
    assert tokenizer("dog ran")["input_ids"] == [9, 10]
    assert max_diff_at_real_positions(our_logits(model, params, ids, mask), reference,
                                      mask) <= PARITY_ATOL
    assert model_io.model_config_for_build(None, hf_dir) == model.config
    with pytest.raises(FileNotFoundError, match="not a directory"):
        from_pretrained(storage.join(gcs_path, "missing"))


def test_convert_between_local_and_gcs(checkpoints, gcs_path, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_JAX_CACHE", str(tmp_path / "cache"))
    path, torch_model, reference = checkpoints["gpt2"]
    ids, mask = left_padded_batch()
    ours_dir = hf_to_orbax(path, storage.join(gcs_path, "ours"))
    assert ours_dir.startswith("gs://") and model_io.is_our_checkpoint(ours_dir)
    hf_dir = orbax_to_hf(ours_dir, storage.join(gcs_path, "hf"))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(storage.listdir(hf_dir))
    back = transformers.AutoModelForCausalLM.from_pretrained(storage.local_copy(hf_dir)).eval()
    np.testing.assert_array_equal(torch_logits(back, ids, mask), reference)
    # and back to a local directory
    local = hf_to_orbax(hf_dir, str(tmp_path / "ours"))
    model, params, tokenizer = load_our_checkpoint(local)
    assert tokenizer("the park")["input_ids"] == [3, 12]
    assert max_diff_at_real_positions(our_logits(model, params, ids, mask), reference,
                                      mask) <= PARITY_ATOL


def test_export_to_gcs_over_an_earlier_one_leaves_none_of_its_files(checkpoints, gcs_path,
                                                                     tmp_path, monkeypatch):
    # An object store has no rename: the earlier export is refused without overwrite, and with
    # it removed whole (config.json first) before the new files, config.json last.
    monkeypatch.setenv("RLHF_JAX_CACHE", str(tmp_path / "cache"))
    path, _, reference = checkpoints["gpt2"]
    ours = hf_to_orbax(path, str(tmp_path / "ours"))
    hf_dir = storage.join(gcs_path, "hf")
    storage.upload(path, hf_dir)
    storage.write_bytes(storage.join(hf_dir, "model-stale.safetensors"),
                        storage.read_bytes(storage.join(hf_dir, "model.safetensors")))
    with pytest.raises(UserError, match="already holds a transformers checkpoint"):
        orbax_to_hf(ours, hf_dir)
    with pytest.raises(CheckpointFormatError, match=r"is in both model-stale\.safetensors and "
                                                    r"model\.safetensors"):
        model_io.check_model_dir(hf_dir)
    orbax_to_hf(ours, hf_dir, overwrite=True)
    assert "model-stale.safetensors" not in storage.listdir(hf_dir)
    ids, mask = left_padded_batch()
    model, params, _ = from_pretrained(hf_dir)
    assert max_diff_at_real_positions(our_logits(model, params, ids, mask), reference,
                                      mask) <= PARITY_ATOL


def test_gcs_export_cut_short_leaves_no_config_and_is_rewritten(checkpoints, gcs_path,
                                                                  monkeypatch):
    model, params, _ = from_pretrained(checkpoints["gpt2"][0], with_tokenizer=False)
    hf_dir = storage.join(gcs_path, "hf")

    class Killed(Exception):
        pass

    real_write = storage.write_text

    def dying_write(target, text):      # the weights are up; config.json, last, is not
        if target.endswith("/config.json"):
            raise Killed
        real_write(target, text)

    monkeypatch.setattr(storage, "write_text", dying_write)
    with pytest.raises(Killed):
        model_io.save_hf_checkpoint(hf_dir, model, params)
    monkeypatch.undo()
    assert storage.listdir(hf_dir) == ["generation_config.json", "model.safetensors"]
    model_io.save_hf_checkpoint(hf_dir, model, params)     # the rerun, without overwrite
    assert sorted(storage.listdir(hf_dir)) == ["config.json", "generation_config.json",
                                               "model.safetensors"]


# --- meshes as users make them ---------------------------------------------------------------

def test_from_pretrained_accepts_a_jax_make_mesh_mesh(checkpoints):
    # jax.make_mesh gives Explicit axes by default; from_pretrained uses the Auto twin.
    path, _, reference = checkpoints["llama"]
    ids, mask = left_padded_batch()
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    assert all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    model, params, _ = from_pretrained(path, mesh=mesh)
    assert all(t == jax.sharding.AxisType.Auto for t in model.mesh.axis_types)
    assert model.mesh.devices.tolist() == mesh.devices.tolist()
    q_kernel = params["layer_0"]["attn"]["q"]["kernel"]
    assert q_kernel.sharding.mesh == model.mesh
    assert tuple(q_kernel.sharding.spec)[:2] == ("fsdp", "tensor")
    diff = max_diff_at_real_positions(our_logits(model, params, ids, mask), reference, mask)
    print(f"\n[parity on jax.make_mesh (2,2,2)] llama: max |logit diff| = {diff:.3e}")
    assert diff <= PARITY_ATOL


# --- Llama-3 RoPE scaling ----------------------------------------------------------------------
# head_dim 16 with original_max_position_embeddings 32 puts the RoPE wavelengths in all three
# llama3 bands (kept, interpolated, stretched by `factor`); sequences are longer than 32.

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}


def llama3_hf_model() -> transformers.LlamaForCausalLM:
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        rope_parameters=dict(LLAMA3_ROPE), pad_token_id=PAD_ID, bos_token_id=EOS_ID,
        eos_token_id=EOS_ID, initializer_range=0.2)   # logits of a few units, sharp attention
    return transformers.LlamaForCausalLM(cfg).eval()


def long_left_padded_batch() -> tuple[np.ndarray, np.ndarray]:
    """4 rows of length 48 (positions up to 47 > 32) with 0, 5, 13 and 2 left-padding tokens."""
    return left_padded_batch(48, (0, 5, 13, 2), seed=1)


def legacy_rope_config(path: str) -> None:
    """Rewrite config.json the way Llama-3.1 checkpoints ship it: top-level rope_theta and
    ``rope_scaling`` (transformers 4.x), instead of transformers 5's ``rope_parameters``."""
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    with open(config_path, "w") as f:
        json.dump(config, f)


@pytest.fixture(scope="module")
def llama3_checkpoint(tmp_path_factory):
    """(checkpoint dir, torch model, reference logits on the long batch)."""
    model = llama3_hf_model()
    inv_freq = model.model.rotary_emb.inv_freq.numpy()
    default_inv_freq = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    assert np.sum(~np.isclose(inv_freq, default_inv_freq)) >= 6     # the scaling really bites
    path = tmp_path_factory.mktemp("hf_llama3")
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path), model, torch_logits(model, *long_left_padded_batch())


@pytest.mark.parametrize("config_format", ["rope_parameters", "rope_scaling"])
def test_llama3_rope_scaling_matches_transformers(llama3_checkpoint, config_format, tmp_path):
    path, torch_model, reference = llama3_checkpoint
    if config_format == "rope_scaling":
        path = copy_checkpoint(path, tmp_path / "legacy")
        legacy_rope_config(path)
    ids, mask = long_left_padded_batch()
    model, params, _ = from_pretrained(path)
    cfg = model.config
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
            cfg.rope_original_max_position, cfg.rope_theta) == ("llama3", 4.0, 1.0, 4.0, 32, 1e4)
    from rlhf_jax.models.transformer import rope_inv_freq
    np.testing.assert_allclose(
        np.asarray(rope_inv_freq(cfg.dims_per_head, cfg.rope_theta, **cfg.rope_scaling_params)),
        torch_model.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
    diff = max_diff_at_real_positions(our_logits(model, params, ids, mask), reference, mask)
    print(f"\n[parity] llama3 rope ({config_format}): max |logit diff| = {diff:.3e}")
    assert diff <= PARITY_ATOL
    # Without the scaling the logits are far off (about 4.8): the test exercises it.
    plain, plain_params, _ = from_pretrained(path, rope_scaling="default", with_tokenizer=False)
    assert max_diff_at_real_positions(our_logits(plain, plain_params, ids, mask),
                                      reference, mask) > 1.0


def test_llama3_rope_scaling_export_reloads_in_transformers(llama3_checkpoint, tmp_path):
    path, _, reference = llama3_checkpoint
    ids, mask = long_left_padded_batch()
    model, params, tokenizer = from_pretrained(path, scan_layers=True)
    ours = our_logits(model, params, ids, mask)

    export = save_pretrained(str(tmp_path / "export"), model, params, tokenizer)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    assert reloaded.config.rope_parameters == LLAMA3_ROPE
    exported = torch_logits(reloaded, ids, mask)
    diff = max_diff_at_real_positions(exported, reference, mask)
    print(f"\n[export] llama3 rope reloaded by transformers: max |logit diff| = {diff:.3e}")
    assert diff <= 1e-6
    assert max_diff_at_real_positions(exported, ours, mask) <= PARITY_ATOL

    # Through our own checkpoint format (model_config.json keeps the scaling) and back.
    ours_dir = hf_to_orbax(export, str(tmp_path / "ours"))
    model2, params2, _ = load_our_checkpoint(ours_dir, with_tokenizer=False)
    assert model2.config.rope_scaling_params == model.config.rope_scaling_params
    assert max_diff_at_real_positions(our_logits(model2, params2, ids, mask), ours, mask) <= 1e-6
    back = transformers.AutoModelForCausalLM.from_pretrained(
        orbax_to_hf(ours_dir, str(tmp_path / "back"))).eval()
    np.testing.assert_array_equal(torch_logits(back, ids, mask), exported)


@pytest.mark.parametrize("key, rope, message", [
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                         "original_max_position_embeddings": 32},
     r"config\.json: rope_type 'yarn' is not supported \(supported: 'default', 'llama3'\)"),
    ("rope_scaling", {"type": "linear", "factor": 2.0},
     r"config\.json: rope_type 'linear' is not supported"),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                         "low_freq_factor": 1.0},
     r"config\.json: rope_type 'llama3' needs high_freq_factor, original_max_position_embeddings"),
], ids=["yarn", "legacy-linear", "llama3-incomplete"])
def test_unsupported_rope_scaling_is_a_clear_error(checkpoints, tmp_path, key, rope, message):
    path = copy_checkpoint(checkpoints["llama"][0], tmp_path / "ckpt")
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.pop("rope_parameters", None)
    config[key] = rope
    with open(config_path, "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointFormatError, match=message) as error:
        from_pretrained(path)
    assert "\n" not in str(error.value) and path in str(error.value)
