"""LoRA merge-and-export (``rlhf_jax.convert.merge_lora``, ``orbax_to_hf(lora_dir=)``,
``rlhf-jax convert jax-to-hf|merge-lora --lora``): the transformers export of base + adapters
gives the logits of the adapted model as trained, ``apply_lora`` applied on the fly, and
adapters that do not fit the base are refused in one line."""
from __future__ import annotations

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file
from parity_models import (PARITY_ATOL, hf_model, left_padded_batch, make_tokenizer,
                     max_diff_at_real_positions, torch_logits)

from rlhf_jax import cli, storage
from rlhf_jax.convert import hf_to_orbax, merge_lora, orbax_to_hf, read_lora_meta
from rlhf_jax.errors import UserError
from rlhf_jax.model_io import (load_our_checkpoint, read_extra, read_model_config,
                               save_our_checkpoint)
from rlhf_jax.models.hf import load_tokenizer
from rlhf_jax.models.lora import LoRA, apply_lora, init_lora
from rlhf_jax.stages.ppo.roles import LORA, Role, save_adapters

RANK, ALPHA = 4, 8.0
TARGETS = ("attn", "mlp")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """arch -> (transformers dir, our dir) of the same tiny random model, with tokenizer."""
    out = {}
    for arch in ("gpt2", "llama"):
        root = tmp_path_factory.mktemp(f"base_{arch}")
        hf_model(arch).save_pretrained(root / "hf")
        make_tokenizer().save_pretrained(root / "hf")
        out[arch] = (str(root / "hf"), hf_to_orbax(str(root / "hf"), str(root / "ours")))
    return out


def trained_lora(params, seed: int = 0) -> LoRA:
    """Adapters on every attn and mlp projection, laid out by ``init_lora`` and filled at random
    in NumPy (a fresh B = 0 would make the merge the identity and the test vacuous; NumPy spares
    compiling init_lora's draw). scale * A @ B is then near the 0.02-std kernels, so the adapters
    move the logits by O(1e-1)."""
    layout = jax.eval_shape(lambda key: init_lora(params, key, RANK, ALPHA, TARGETS),
                            jax.random.key(seed))
    rng = np.random.default_rng(seed)
    adapters = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(rng.normal(size=x.shape) * (0.1 if path[-1].key == "a"
                                                                  else 0.05), x.dtype),
        layout.adapters)
    return LoRA(adapters, layout.scale)


@functools.cache
def adapted_forward(model):
    """Logits of the adapted model as PPO trains it: ``apply_lora`` inside the jitted step."""
    return jax.jit(lambda params, lora, ids, mask: model.apply(
        {"params": apply_lora(params, lora)}, ids, mask))


def write_lora(lora_dir: str, lora: LoRA, base_dir: str) -> str:
    """``lora_dir`` exactly as a PPO run writes ``<workdir>/lora`` (the stage's own writer)."""
    role = Role("policy", None, LORA, "reference", RANK, ALPHA, TARGETS)
    assert role.lora_scale == lora.scale
    save_adapters(lora_dir, role, lora.adapters, base_dir)
    return lora_dir


def hf_logits(hf_dir: str, ids, mask) -> np.ndarray:
    return torch_logits(transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval(),
                        ids, mask)


def adapted_run(bases, arch: str, scan_layers: bool, tmp_path):
    """(base dir, lora dir, logits of apply_lora(base, adapters)): the adapted model unmerged
    on disk, its logits from the in-memory apply_lora that training runs."""
    _, base_dir = bases[arch]
    model, params, _ = load_our_checkpoint(base_dir, scan_layers=scan_layers,
                                           with_tokenizer=False)
    lora = trained_lora(params)
    assert ("layers" in lora.adapters) == scan_layers
    ids, mask = left_padded_batch()
    adapted = np.asarray(adapted_forward(model)(params, lora, ids, mask), np.float32)
    lora_dir = write_lora(str(tmp_path / "lora"), lora, base_dir)
    return base_dir, lora_dir, adapted


# --- parity ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,scan_layers", [("gpt2", False), ("llama", True)],
                         ids=["gpt2-unrolled", "llama-scan"])
def test_merged_export_gives_the_adapted_models_logits_in_transformers(bases, arch, scan_layers,
                                                                       tmp_path):
    # llama-scan: stacked adapters onto a base saved unstacked (hf_to_orbax's layout).
    base_dir, lora_dir, adapted = adapted_run(bases, arch, scan_layers, tmp_path)
    ids, mask = left_padded_batch()

    merged_dir = merge_lora(base_dir, lora_dir, str(tmp_path / "merged"))
    extra = read_extra(merged_dir)
    assert extra["lora_merged"] and extra["lora_rank"] == RANK
    assert extra["lora_scale"] == ALPHA / RANK and extra["lora_targets"] == list(TARGETS)
    # Layout and tokenizer as the run's; the merged weights themselves are checked through
    # their export below.
    assert read_model_config(merged_dir).scan_layers == scan_layers
    assert load_tokenizer(merged_dir)("cat")["input_ids"] == [4]

    exported = hf_logits(orbax_to_hf(merged_dir, str(tmp_path / "hf")), ids, mask)
    diff_hf = max_diff_at_real_positions(exported, adapted, mask)
    base = hf_logits(orbax_to_hf(base_dir, str(tmp_path / "base_hf")), ids, mask)
    moved = max_diff_at_real_positions(base, adapted, mask)
    print(f"\n[lora export] {arch} scan={scan_layers}: |transformers(merged) - adapted| = "
          f"{diff_hf:.2e}; the adapters move the logits by {moved:.2e}")
    assert diff_hf <= PARITY_ATOL
    assert moved > 100 * PARITY_ATOL


def test_convert_cli_merges_lora_before_export(bases, tmp_path, capsys):
    base_dir, lora_dir, adapted = adapted_run(bases, "llama", True, tmp_path)
    ids, mask = left_padded_batch()
    assert cli.main(["convert", "jax-to-hf", base_dir, str(tmp_path / "hf"),
                     "--lora", lora_dir]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "hf")
    assert max_diff_at_real_positions(hf_logits(str(tmp_path / "hf"), ids, mask), adapted,
                                      mask) <= PARITY_ATOL
    # merge-lora then a plain export writes the same tensors as the one-step export.
    assert cli.main(["convert", "merge-lora", base_dir, str(tmp_path / "merged"),
                     "--lora", lora_dir]) == 0
    assert cli.main(["convert", "jax-to-hf", str(tmp_path / "merged"),
                     str(tmp_path / "hf2")]) == 0
    one_step = load_file(str(tmp_path / "hf" / "model.safetensors"))
    two_step = load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert one_step.keys() == two_step.keys()
    for name in one_step:
        np.testing.assert_array_equal(one_step[name], two_step[name], err_msg=name)
    # The run's base may be the transformers directory PPO started from.
    assert cli.main(["convert", "jax-to-hf", bases["llama"][0], str(tmp_path / "hf3"),
                     "--lora", lora_dir]) == 0
    assert max_diff_at_real_positions(hf_logits(str(tmp_path / "hf3"), ids, mask), adapted,
                                      mask) <= PARITY_ATOL


def test_lora_run_on_gcs_merges_and_exports(bases, gcs_path, tmp_path, monkeypatch):
    # Base, adapters, merged model and export all under gs:// (a GCS emulator).
    monkeypatch.setenv("RLHF_JAX_CACHE", str(tmp_path / "cache"))
    model, params, tokenizer = load_our_checkpoint(bases["gpt2"][1])
    base_dir = save_our_checkpoint(storage.join(gcs_path, "sft", "model"), model, params,
                                   tokenizer)
    lora = trained_lora(params)
    ids, mask = left_padded_batch()
    adapted = np.asarray(adapted_forward(model)(params, lora, ids, mask), np.float32)
    lora_dir = write_lora(storage.join(gcs_path, "ppo", "lora"), lora, base_dir)
    assert read_lora_meta(lora_dir)["base"] == base_dir

    merged_dir = merge_lora(base_dir, lora_dir, storage.join(gcs_path, "merged"))
    assert read_extra(merged_dir)["lora_dir"] == lora_dir
    hf_dir = orbax_to_hf(merged_dir, storage.join(gcs_path, "hf"))
    exported = hf_logits(storage.local_copy(hf_dir), ids, mask)
    assert max_diff_at_real_positions(exported, adapted, mask) <= PARITY_ATOL


# --- bad input -------------------------------------------------------------------------------

def test_lora_dir_without_lora_json_is_one_line_naming_it(bases, tmp_path, capsys):
    _, base_dir = bases["gpt2"]
    (tmp_path / "lora" / "adapters").mkdir(parents=True)
    meta = tmp_path / "lora" / "lora.json"
    with pytest.raises(UserError, match=rf"^{re.escape(str(meta))}: missing; a LoRA directory holds lora\.json"):
        merge_lora(base_dir, str(tmp_path / "lora"), str(tmp_path / "out"))
    assert cli.main(["convert", "jax-to-hf", base_dir, str(tmp_path / "hf"),
                     "--lora", str(tmp_path / "lora")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rlhf-jax: error: {meta}: missing") and "\n" not in err
    meta.write_text(json.dumps({"rank": RANK, "alpha": ALPHA}))
    with pytest.raises(UserError, match=r"'scale' must be a number \(alpha / rank\); got None"):
        merge_lora(base_dir, str(tmp_path / "lora"), str(tmp_path / "out"))
    meta.write_text(json.dumps({"rank": RANK, "alpha": ALPHA, "scale": ALPHA / RANK}))
    with pytest.raises(UserError, match=r"adapters: no orbax checkpoint metadata; expected the "
                                        r"orbax pytree of A and B"):
        merge_lora(base_dir, str(tmp_path / "lora"), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "hf")


def test_adapter_that_does_not_fit_the_base_is_refused(bases, tmp_path, capsys):
    _, base_dir = bases["gpt2"]
    _, params, _ = load_our_checkpoint(base_dir, with_tokenizer=False)
    lora = trained_lora(params)
    adapters = jax.tree.map(lambda x: x, lora.adapters)
    fc_out = adapters["layer_1"]["mlp"]["fc_out"]
    fc_out["b"] = jnp.zeros((RANK, fc_out["b"].shape[1] + 1))    # one output column too many
    lora_dir = write_lora(str(tmp_path / "lora"), LoRA(adapters, lora.scale), base_dir)
    message = (rf"^{re.escape(lora_dir)}/adapters: adapter layer_1/mlp/fc_out has A "
               rf"\(128, 4\) and B \(4, 33\), but the base model {re.escape(base_dir)} needs "
               r"A \(128, 4\) and B \(4, 32\)")
    with pytest.raises(UserError, match=message):
        merge_lora(base_dir, lora_dir, str(tmp_path / "out"))
    assert cli.main(["convert", "merge-lora", base_dir, str(tmp_path / "out"),
                     "--lora", lora_dir]) == 2
    assert "adapter layer_1/mlp/fc_out has A (128, 4) and B (4, 33)" in capsys.readouterr().err
    # Adapters of another architecture (llama's gate/up/down) have nothing to adapt in GPT-2.
    _, llama_params, _ = load_our_checkpoint(bases["llama"][1], with_tokenizer=False)
    llama_dir = write_lora(str(tmp_path / "llama_lora"), trained_lora(llama_params), base_dir)
    with pytest.raises(UserError, match=r"adapter layer_0/attn/k has A \(32, 4\) and B "
                                        r"\(4, 2, 8\), but the base model .* needs A \(32, 4\) "
                                        r"and B \(4, 4, 8\)"):
        merge_lora(base_dir, llama_dir, str(tmp_path / "out"))
