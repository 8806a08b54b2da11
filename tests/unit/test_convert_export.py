"""Models as people have them: Hub ids resolved from the local Hugging Face cache (never
downloaded), and `convert jax-to-hf`'s export: sharded safetensors with an index, float32 or
bfloat16, generation_config.json and a model card, read back by our loader and by
transformers."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from parity_models import (EOS_ID, PAD_ID, PARITY_ATOL, hf_model, left_padded_batch,
                           make_tokenizer, max_diff_at_real_positions, torch_logits)
from rlhf_jax import model_io
from rlhf_jax.convert import orbax_to_hf
from rlhf_jax.errors import ConfigError, UserError
from rlhf_jax.models.hf import (INDEX_FILE, ModelNotFoundError, from_pretrained, load_tokenizer,
                                resolve_model_path)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def cached_repo(tmp_path_factory):
    """A Hugging Face hub cache holding 'tester/tiny-llama' as `hf download` leaves it:
    models--tester--tiny-llama/{refs/main, snapshots/<commit>/...}."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--tester--tiny-llama"
    snapshot = repo / "snapshots" / COMMIT
    hf_model("llama").save_pretrained(snapshot)
    make_tokenizer().save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache, str(snapshot)


@pytest.fixture
def hub_cache(cached_repo, monkeypatch):
    """``cached_repo`` as this process's hub cache (HF_HOME / HF_HUB_CACHE are read once, at
    huggingface_hub's import)."""
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cached_repo[0]))
    return cached_repo


def test_model_ids_resolve_to_the_cached_snapshot(hub_cache, tmp_path, monkeypatch):
    cache, snapshot = hub_cache
    assert resolve_model_path("tester/tiny-llama") == snapshot
    # Every loader takes the id: the config check validation runs, tokenizer, weights.
    assert model_io.check_model_dir("tester/tiny-llama").arch == "llama"
    assert load_tokenizer("tester/tiny-llama")("dog ran")["input_ids"] == [9, 10]
    model, params, _, extra = model_io.load_model("tester/tiny-llama", None)
    _, expected, _ = from_pretrained(snapshot, with_tokenizer=False)
    assert extra == {} and model.config == model_io.check_model_dir(snapshot).replace(
        dtype="float32", param_dtype="float32")
    assert all(np.array_equal(a, b) for a, b in zip(jax_leaves(params), jax_leaves(expected)))
    # A directory of that name wins over the cache; what cannot be an id is left to the loaders.
    monkeypatch.chdir(tmp_path)
    os.makedirs("tester/tiny-llama")
    assert resolve_model_path("tester/tiny-llama") == "tester/tiny-llama"
    assert resolve_model_path("/no/such/dir") == "/no/such/dir"
    assert resolve_model_path("gs://bucket/model") == "gs://bucket/model"


def jax_leaves(tree):
    import jax
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def test_model_id_not_cached_says_how_to_download(hub_cache):
    cache, _ = hub_cache
    with pytest.raises(ModelNotFoundError) as error:
        model_io.load_model("tester/absent", None)
    message = str(error.value)
    assert isinstance(error.value, UserError) and isinstance(error.value, FileNotFoundError)
    assert message == (
        f"tester/absent: not a directory and not in the local Hugging Face cache ({cache}); "
        "nothing is downloaded at run time: run `hf download tester/absent` (or "
        "`huggingface-cli download tester/absent`) on a machine with network and the same "
        "HF_HOME, or give a model directory")


def test_validation_accepts_cached_ids_and_names_missing_ones(hub_cache):
    from rlhf_jax import validate
    from rlhf_jax.config import sft_config
    cfg = sft_config()
    cfg.init_from = "tester/tiny-llama"
    cfg.data.max_prompt_len = cfg.data.max_response_len = 16
    validate.check(cfg)
    cfg.init_from = "gpt2"
    with pytest.raises(ConfigError, match=r"^config: init_from: gpt2: not a directory and not in "
                                          r"the local Hugging Face cache .*hf download gpt2"):
        validate.check(cfg)


# --- export ------------------------------------------------------------------------------------

def test_export_options_are_checked_before_anything_loads(tmp_path):
    never = str(tmp_path / "no_model")     # loading it would fail differently
    with pytest.raises(UserError, match=r"dtype='float16': expected one of float32, bfloat16"):
        orbax_to_hf(never, str(tmp_path / "out"), dtype="float16")
    with pytest.raises(UserError, match=r"max_shard_size='2 parsecs': expected a positive size"):
        orbax_to_hf(never, str(tmp_path / "out"), max_shard_size="2 parsecs")


@pytest.fixture(scope="module")
def our_llama(tmp_path_factory):
    """A tiny Llama in our layout, with the stage facts and config an SFT run leaves, and the
    torch model it came from."""
    root = tmp_path_factory.mktemp("export")
    torch_model = hf_model("llama")
    torch_model.save_pretrained(root / "hf")
    make_tokenizer().save_pretrained(root / "hf")
    model, params, tokenizer = from_pretrained(str(root / "hf"))
    our_dir = str(root / "sft" / "model")
    model_io.save_our_checkpoint(our_dir, model, params, tokenizer,
                                 extra={"stage": "sft", "steps": 3})
    (root / "sft" / "config_sft.json").write_text(json.dumps({"init_from": "tester/tiny-llama"}))
    return our_dir, params, torch_model


def test_sharded_export_round_trips_through_our_loader_and_transformers(our_llama, tmp_path):
    our_dir, params, torch_model = our_llama
    ids, mask = left_padded_batch()
    reference = torch_logits(torch_model, ids, mask)
    # The embedding alone is 97 x 32 float32 = 12.4 kB: 20 kB shards make several files.
    dst = orbax_to_hf(our_dir, str(tmp_path / "hf"), max_shard_size="20KB")
    names = sorted(os.listdir(dst))
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert {"config.json", "generation_config.json", "README.md", INDEX_FILE,
            "tokenizer.json"} <= set(names)
    index = json.loads(open(os.path.join(dst, INDEX_FILE)).read())
    assert sorted(set(index["weight_map"].values())) == shards
    sizes = [os.path.getsize(os.path.join(dst, n)) for n in shards]
    assert index["metadata"]["total_size"] < sum(sizes) and max(sizes) < 21_000
    generation = json.loads(open(os.path.join(dst, "generation_config.json")).read())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (EOS_ID, PAD_ID)
    assert generation["max_length"] == 64
    card = open(os.path.join(dst, "README.md")).read()
    assert "rlhf_jax's `sft` stage" in card and "started from: `tester/tiny-llama`" in card
    assert f'AutoModelForCausalLM.from_pretrained("{dst}")' in card

    _, reloaded, _ = from_pretrained(dst)
    assert all(np.array_equal(a, b) for a, b in zip(jax_leaves(reloaded), jax_leaves(params)))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(dst).eval()
    assert max_diff_at_real_positions(torch_logits(theirs, ids, mask), reference,
                                      mask) <= PARITY_ATOL


def test_bfloat16_export_is_one_file_of_rounded_weights(our_llama, tmp_path):
    import ml_dtypes
    our_dir, params, torch_model = our_llama
    dst = orbax_to_hf(our_dir, str(tmp_path / "hf"), dtype="bfloat16")
    assert INDEX_FILE not in os.listdir(dst)     # 2GB: one file
    with safe_open(os.path.join(dst, "model.safetensors"), framework="numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    _, reloaded, _ = from_pretrained(dst)
    rounded = [a.astype(ml_dtypes.bfloat16).astype(np.float32) for a in jax_leaves(params)]
    assert all(np.array_equal(a, b) for a, b in zip(jax_leaves(reloaded), rounded))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    ids, mask = left_padded_batch()
    diff = max_diff_at_real_positions(torch_logits(theirs, ids, mask),
                                      torch_logits(torch_model, ids, mask), mask)
    assert 0 < diff < 0.05      # bfloat16's rounding, and no more
