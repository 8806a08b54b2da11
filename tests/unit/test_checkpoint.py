"""Tests for rlhf_jax.checkpoint: sharded save/restore, meta, retention, resharding, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax.checkpoint import Checkpointer, abstract_like, load_pytree, save_pytree


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))


def make_state(mesh: Mesh, seed: int = 0) -> dict:
    """A small training-state-like pytree with sharded, replicated, numpy and scalar leaves."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((8, 6)).astype(np.float32)
    bias = rng.standard_normal((6,)).astype(np.float32)
    return {
        "params": {
            "w": jax.device_put(weight, NamedSharding(mesh, P("data", "fsdp"))),
            "b": jax.device_put(bias, NamedSharding(mesh, P())),
            "emb": jax.device_put(jnp.asarray(weight, jnp.bfloat16), NamedSharding(mesh, P(None, "fsdp"))),
        },
        "opt_count": np.asarray(seed, np.int32),
        "rng": jax.random.key(seed),
        "step": seed,
    }


def assert_same_leaves(actual, expected) -> None:
    """Same structure; every array leaf bit-identical (compared as raw bytes)."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        if isinstance(want, jax.Array) and jnp.issubdtype(want.dtype, jax.dtypes.prng_key):
            got, want = jax.random.key_data(got), jax.random.key_data(want)
        got, want = np.asarray(got), np.asarray(want)
        assert got.dtype == want.dtype
        assert got.tobytes() == want.tobytes()


def test_sharded_roundtrip_keeps_values_shardings_and_meta(tmp_path, mesh):
    state = make_state(mesh, seed=5)
    meta = {"data_position": 1234, "kl_coef": 0.02, "config": {"lr": 1e-5, "names": ["a", "b"]}}
    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        assert checkpointer.save(5, state, meta)
        checkpointer.wait()
        restored, restored_meta = checkpointer.restore(None, abstract_like(state))
    assert_same_leaves(restored, state)
    assert restored_meta == meta
    for name in ("w", "b", "emb"):
        assert restored["params"][name].sharding == state["params"][name].sharding
    assert jnp.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
    assert isinstance(restored["opt_count"], np.ndarray)
    assert restored["step"] == 5


def test_restore_onto_different_sharding(tmp_path, mesh):
    state = make_state(mesh)
    new_sharding = NamedSharding(mesh, P("fsdp", None))
    target = abstract_like(state)
    target["params"]["w"] = jax.ShapeDtypeStruct((8, 6), jnp.float32, sharding=new_sharding)
    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        checkpointer.save(0, state)
        restored, meta = checkpointer.restore(0, target)
    assert restored["params"]["w"].sharding == new_sharding
    assert_same_leaves(restored, state)
    assert meta == {}


def test_concrete_target_and_specific_step(tmp_path, mesh):
    with Checkpointer(tmp_path / "ckpt", max_to_keep=5) as checkpointer:
        for step in (1, 2):
            checkpointer.save(step, make_state(mesh, seed=step), {"step": step})
        restored, meta = checkpointer.restore(1, make_state(mesh, seed=99))
    assert_same_leaves(restored, make_state(mesh, seed=1))
    assert meta == {"step": 1}


def test_max_to_keep_and_save_interval(tmp_path, mesh):
    state = make_state(mesh)
    with Checkpointer(tmp_path / "ckpt", max_to_keep=2, save_interval_steps=2) as checkpointer:
        started = [checkpointer.save(step, state) for step in range(6)]
        assert checkpointer.save(5, state, force=True)
        # Saving a step that already exists (e.g. right after a resume) is skipped.
        assert not checkpointer.save(5, state, force=True)
        checkpointer.wait()
        assert started == [True, False, True, False, True, False]
        assert checkpointer.all_steps() == [4, 5]
        assert checkpointer.latest_step() == 5


def test_reopening_directory_sees_previous_checkpoints(tmp_path, mesh):
    state = make_state(mesh, seed=3)
    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        checkpointer.save(3, state, {"resumed": False})
    with Checkpointer(tmp_path / "ckpt") as reopened:
        assert reopened.latest_step() == 3
        restored, meta = reopened.restore(None, abstract_like(state))
    assert_same_leaves(restored, state)
    assert meta == {"resumed": False}


def test_empty_directory_has_no_latest_step_and_restore_fails_clearly(tmp_path, mesh):
    directory = tmp_path / "empty"
    with Checkpointer(directory) as checkpointer:
        assert checkpointer.latest_step() is None
        assert checkpointer.all_steps() == []
        with pytest.raises(FileNotFoundError, match=str(directory)):
            checkpointer.restore(None, make_state(mesh))
        checkpointer.save(0, make_state(mesh))
        with pytest.raises(FileNotFoundError, match="step 7"):
            checkpointer.restore(7, make_state(mesh))


def test_meta_must_be_json(tmp_path, mesh):
    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        with pytest.raises(TypeError, match="JSON"):
            checkpointer.save(0, make_state(mesh), {"bad": object()})
        assert checkpointer.all_steps() == []


def test_save_and_load_pytree(tmp_path, mesh, monkeypatch):
    params = make_state(mesh, seed=7)["params"]
    monkeypatch.chdir(tmp_path)  # a relative path must work: it is made absolute
    path = save_pytree("out/sft_params", params)
    assert path == str(tmp_path / "out" / "sft_params")

    replicated = NamedSharding(mesh, P())
    target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated), params)
    restored = load_pytree(path, target)
    assert_same_leaves(restored, params)
    assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(restored))
    assert_same_leaves(load_pytree(path), params)

    with pytest.raises(ValueError, match="exists"):
        save_pytree(path, params)
    save_pytree(path, jax.tree.map(lambda leaf: leaf + 1, params), overwrite=True)
    assert_same_leaves(load_pytree(path, params), jax.tree.map(lambda leaf: leaf + 1, params))
    with pytest.raises(FileNotFoundError, match="missing"):
        load_pytree(tmp_path / "missing")


def test_load_pytree_of_a_missing_url_is_file_not_found(gcs_path):
    # Locally and on gs:// alike, rather than whatever error orbax raises for a missing object.
    with pytest.raises(FileNotFoundError, match="no saved pytree"):
        load_pytree(gcs_path + "/missing")
