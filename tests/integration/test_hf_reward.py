"""Reward / value models as transformers ``*ForSequenceClassification`` checkpoints: score parity
with PyTorch on right- and left-padded batches, export with the reward normalization folded in,
bad num_labels, and the convert paths."""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from rlhf_jax import cli, model_io
from rlhf_jax.convert import orbax_to_hf
from rlhf_jax.model_io import load_our_checkpoint, save_our_checkpoint
from rlhf_jax.models import (CheckpointFormatError, Transformer, abstract_params,
                             from_pretrained, gpt2_config, llama_config, qwen2_config,
                             save_pretrained)
from rlhf_jax.models.hf import SCORE_OFFSET_KEY, config_from_hf, read_hf_config
from rlhf_jax.scoring import normalize, raw_rewards
from rlhf_jax.sharding import make_mesh

ATOL = 1e-4
VOCAB = 97
PAD_ID, EOS_ID = 0, 2
ARCHS = ("gpt2", "llama", "qwen2")
NORM = {"mean": 0.7, "std": 2.0}


def hf_reward_model(arch: str, num_labels: int = 1) -> transformers.PreTrainedModel:
    """A tiny random sequence classifier; Llama and Qwen2 use grouped-query attention."""
    torch.manual_seed({"gpt2": 10, "llama": 11, "qwen2": 12}[arch])
    ids = dict(pad_token_id=PAD_ID, bos_token_id=EOS_ID, eos_token_id=EOS_ID, num_labels=num_labels)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2,
                                      n_head=4, **ids)
        model = transformers.GPT2ForSequenceClassification(cfg)
    else:
        common_fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64, **ids)
        if arch == "llama":
            model = transformers.LlamaForSequenceClassification(
                transformers.LlamaConfig(**common_fields))
        else:
            model = transformers.Qwen2ForSequenceClassification(
                transformers.Qwen2Config(**common_fields))
    # The default 0.02 init makes every score ~0, which would hide a wrong or missing head.
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.5)
    return model.eval()


def padded_batch(side: str, pad_id: int = PAD_ID) -> tuple[np.ndarray, np.ndarray]:
    """4 rows of length 10 with 10, 7, 4 and 9 real tokens, padded on ``side``."""
    ids = np.random.RandomState(1).randint(3, VOCAB, (4, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    for row, n_real in enumerate((10, 7, 4, 9)):
        pads = slice(None, 10 - n_real) if side == "left" else slice(n_real, None)
        mask[row, pads] = 0
        ids[row, pads] = pad_id
    return ids, mask


def torch_scores(model: transformers.PreTrainedModel, ids: np.ndarray,
                 mask: np.ndarray) -> np.ndarray:
    # Our default positions (rlhf_jax.models.default_position_ids): 0 at each row's first real
    # token, whichever side the padding is on; transformers' default would count the left pads.
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(positions, dtype=torch.long))
    assert out.logits.shape == (ids.shape[0], 1)
    return out.logits[:, 0].float().numpy()


@functools.lru_cache(maxsize=None)
def _scorer(model: Transformer):
    return jax.jit(functools.partial(raw_rewards, model))


def our_scores(model: Transformer, params, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.asarray(_scorer(model)(params, jnp.asarray(ids), jnp.asarray(mask)), np.float32)


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """arch -> (seq-cls checkpoint dir, torch model)."""
    out = {}
    for arch in ARCHS:
        model = hf_reward_model(arch)
        path = tmp_path_factory.mktemp(f"hf_rm_{arch}")
        model.save_pretrained(path, safe_serialization=True)
        out[arch] = (str(path), model)
    return out


def random_params(model: Transformer, seed: int) -> dict:
    """Every weight random, norm biases and qkv biases included (numpy: jax.random's CPU
    compile would dominate the test's run time)."""
    rng = np.random.RandomState(seed)

    def draw(path, leaf):
        noise = rng.normal(0.0, 0.1, leaf.shape)
        is_scale = getattr(path[-1], "key", None) == "scale"
        return jnp.asarray(noise + 1.0 if is_scale else noise, leaf.dtype)
    return jax.tree_util.tree_map_with_path(draw, abstract_params(model))


# --- import -------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch", ARCHS)
def test_scores_match_transformers(checkpoints, arch, side):
    path, torch_model = checkpoints[arch]
    model, params, _ = from_pretrained(path, with_tokenizer=False)
    assert model.config.head == "scalar" and model.config.arch == arch
    assert set(params) >= {"score_head"} and "lm_head" not in params
    np.testing.assert_array_equal(np.asarray(params["score_head"]["bias"]), [0.0])
    ids, mask = padded_batch(side)
    reference = torch_scores(torch_model, ids, mask)
    diff = max_diff(our_scores(model, params, ids, mask), reference)
    print(f"\n[rm parity] {arch} {side}-padded: max |score diff| = {diff:.3e}")
    assert diff <= ATOL


def test_scores_match_on_a_mesh_with_scanned_layers(checkpoints):
    path, torch_model = checkpoints["qwen2"]
    mesh = make_mesh((2, 2, 2))
    model, params, _ = from_pretrained(path, mesh=mesh, scan_layers=True, with_tokenizer=False)
    assert params["score_head"]["bias"].sharding.mesh == mesh
    ids, mask = padded_batch("left")
    reference = torch_scores(torch_model, ids, mask)
    assert max_diff(our_scores(model, params, ids, mask), reference) <= ATOL


def test_config_from_hf_reads_a_sequence_classifier_as_scalar_head(checkpoints):
    hf = read_hf_config(checkpoints["llama"][0])
    assert config_from_hf(hf).head == "scalar"
    assert config_from_hf(hf, head="lm").head == "lm"


@pytest.mark.parametrize("num_labels", [2, 3])
def test_num_labels_other_than_one_is_refused(tmp_path, num_labels):
    path = str(tmp_path / "multi")
    hf_reward_model("gpt2", num_labels=num_labels).save_pretrained(path, safe_serialization=True)
    if num_labels == 2:
        # transformers leaves its default label count out of config.json; 2 must still be seen.
        assert "id2label" not in read_hf_config(path)
    with pytest.raises(CheckpointFormatError,
                       match=rf"config\.json: num_labels={num_labels}; expected num_labels == 1 "
                             r"\(a scalar reward head\)$"):
        from_pretrained(path, with_tokenizer=False)


def test_stage_load_model_takes_a_sequence_classifier(checkpoints):
    path, torch_model = checkpoints["llama"]
    ids, mask = padded_batch("right")
    reference = torch_scores(torch_model, ids, mask)
    # As RM init_from (no head override) and as PPO reward_from / value_from (head="scalar").
    for overrides in ({}, {"head": "scalar"}):
        model, params, tokenizer, extra = model_io.load_model(path, None, **overrides)
        assert model.config.head == "scalar"
        assert extra == {} and tokenizer is None
        assert max_diff(our_scores(model, params, ids, mask), reference) <= ATOL


def test_causal_lm_directory_keeps_its_behaviour(tmp_path):
    path = str(tmp_path / "lm")
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2)).save_pretrained(path)
    model, params, _ = from_pretrained(path, with_tokenizer=False)
    assert model.config.head == "lm"
    # Asked for as a scalar model, a causal LM gives its trunk; the score head is the caller's.
    model, params, _ = from_pretrained(path, head="scalar", with_tokenizer=False)
    assert model.config.head == "scalar" and "score_head" not in params


# --- export -------------------------------------------------------------------------------------

def random_reward_model(arch: str) -> tuple[Transformer, dict]:
    sizes = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_position=64,
                 head="scalar", eos_token_id=EOS_ID, dtype="float32", param_dtype="float32")
    if arch == "gpt2":
        # No pad id: the export must fall back to eos for transformers' pooling.
        cfg = gpt2_config(**sizes)
    else:
        make = llama_config if arch == "llama" else qwen2_config
        cfg = make(n_kv_heads=2, pad_token_id=PAD_ID, **sizes)
    model = Transformer(cfg)
    params = random_params(model, seed=3)
    params["score_head"]["bias"] = jnp.asarray([0.3], jnp.float32)
    return model, params


@pytest.mark.parametrize("arch", ARCHS)
def test_export_scores_normalized_in_transformers_and_round_trips(arch, tmp_path, caplog):
    model, params = random_reward_model(arch)
    with caplog.at_level(logging.WARNING, logger="rlhf_jax.models.hf"):
        export = save_pretrained(str(tmp_path / "export"), model, params, reward_norm=NORM)
    hf = read_hf_config(export)
    assert hf["architectures"] == [{"gpt2": "GPT2", "llama": "Llama", "qwen2": "Qwen2"}[arch]
                                   + "ForSequenceClassification"]
    expected_offset = (0.3 - NORM["mean"]) / NORM["std"]
    if arch == "gpt2":
        assert SCORE_OFFSET_KEY not in hf and not caplog.records
        assert hf["pad_token_id"] == EOS_ID
    else:
        assert hf[SCORE_OFFSET_KEY] == pytest.approx(expected_offset)
        assert hf["pad_token_id"] == PAD_ID
        assert [r.message for r in caplog.records if SCORE_OFFSET_KEY in r.message]

    torch_model = transformers.AutoModelForSequenceClassification.from_pretrained(export).eval()
    offset = getattr(torch_model.config, SCORE_OFFSET_KEY, 0.0)
    reloaded, reloaded_params, _ = from_pretrained(export, with_tokenizer=False)
    assert reloaded.config.head == "scalar"
    for side in ("right", "left"):
        ids, mask = padded_batch(side, pad_id=hf["pad_token_id"])
        expected = np.asarray(normalize(our_scores(model, params, ids, mask), NORM))
        theirs = torch_scores(torch_model, ids, mask) + offset
        diff = max_diff(theirs, expected)
        reread = max_diff(our_scores(reloaded, reloaded_params, ids, mask), expected)
        print(f"\n[rm export] {arch} {side}-padded: max |HF + offset - normalized| = {diff:.3e}, "
              f"reloaded here: {reread:.3e}")
        assert diff <= ATOL and reread <= ATOL


def test_export_of_an_lm_refuses_a_reward_norm(tmp_path):
    model = Transformer(gpt2_config(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                    max_position=16))
    params = random_params(model, seed=0)
    with pytest.raises(ValueError, match="reward_norm applies to scalar-head"):
        save_pretrained(str(tmp_path / "x"), model, params, reward_norm=NORM)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_convert_jax_to_hf_exports_a_reward_model_with_its_normalization(checkpoints, arch,
                                                                         tmp_path):
    path, _ = checkpoints[arch]
    model, params, _ = from_pretrained(path, with_tokenizer=False)
    params = dict(params, score_head=dict(params["score_head"],
                                          bias=jnp.asarray([0.3], jnp.float32)))
    ours = save_our_checkpoint(str(tmp_path / "ours"), model, params,
                               extra={"reward_norm": NORM, "other": 1})
    if arch == "gpt2":
        export = orbax_to_hf(ours, str(tmp_path / "hf"))
    else:
        assert cli.main(["convert", "jax-to-hf", ours, str(tmp_path / "hf")]) == 0
        export = str(tmp_path / "hf")
    torch_model = transformers.AutoModelForSequenceClassification.from_pretrained(export).eval()
    offset = getattr(torch_model.config, SCORE_OFFSET_KEY, 0.0)
    ids, mask = padded_batch("left")
    expected = np.asarray(normalize(our_scores(model, params, ids, mask), NORM))
    assert max_diff(torch_scores(torch_model, ids, mask) + offset, expected) <= ATOL


def test_convert_hf_to_jax_and_back_keeps_transformers_scores(checkpoints, tmp_path):
    path, torch_model = checkpoints["llama"]
    assert cli.main(["convert", "hf-to-jax", path, str(tmp_path / "ours")]) == 0
    model, params, _ = load_our_checkpoint(str(tmp_path / "ours"), with_tokenizer=False)
    assert model.config.head == "scalar"
    assert cli.main(["convert", "jax-to-hf", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    # No reward_norm and a zero bias: nothing to fold, so no offset and identical weights.
    assert SCORE_OFFSET_KEY not in read_hf_config(str(tmp_path / "back"))
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "back").eval()
    ids, mask = padded_batch("right")
    np.testing.assert_array_equal(torch_scores(back, ids, mask),
                                  torch_scores(torch_model, ids, mask))
