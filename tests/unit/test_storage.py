"""``rlhf_jax.storage``: the same calls on local paths and on gs:// (a GCS emulator on loopback)."""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import storage
from rlhf_jax.checkpoint import Checkpointer, load_pytree, save_pytree


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("gcs_path")


def test_files_round_trip(root):
    target = storage.join(root, "a", "b.json")
    assert not storage.exists(target)
    storage.write_json(target, {"x": 1})
    assert storage.exists(target) and storage.isfile(target)
    assert storage.isdir(storage.join(root, "a")) and not storage.isfile(storage.join(root, "a"))
    assert json.loads(storage.read_text(target)) == {"x": 1}
    storage.write_text(target, "second")                  # replaces the whole file
    assert storage.read_text(target) == "second"
    storage.write_bytes(storage.join(root, "a", "c.bin"), b"\x00\x01")
    assert storage.listdir(storage.join(root, "a")) == ["b.json", "c.bin"]
    assert storage.read_bytes(storage.join(root, "a", "c.bin")) == b"\x00\x01"
    storage.remove(target)
    storage.remove(target)                                 # missing: not an error
    assert storage.listdir(storage.join(root, "a")) == ["c.bin"]
    storage.rmtree(root)
    assert not storage.exists(storage.join(root, "a", "c.bin"))


def test_local_write_leaves_no_temporary_behind(tmp_path):
    storage.write_text(tmp_path / "f.txt", "x")
    assert os.listdir(tmp_path) == ["f.txt"]
    assert oct(os.stat(tmp_path / "f.txt").st_mode & 0o777) != oct(0o600)   # not mkstemp's mode


def test_paths():
    assert storage.join("gs://b/run/", "sft", "model") == "gs://b/run/sft/model"
    assert storage.dirname("gs://b/run/sft/") == "gs://b/run"
    assert storage.basename("gs://b/run/sft") == "sft"
    assert storage.absolute("gs://b/x") == "gs://b/x"
    assert storage.absolute("x") == os.path.abspath("x")
    assert storage.is_url("gs://b") and not storage.is_url("/tmp/b")


def test_appending_to_an_object_is_refused(gcs_path):
    with pytest.raises(ValueError, match="cannot append"):
        storage.open(storage.join(gcs_path, "m.jsonl"), "a")


def test_local_copy_and_writable_local(root, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_JAX_CACHE", str(tmp_path / "cache"))
    with storage.writable_local(storage.join(root, "tok")) as local:
        os.makedirs(os.path.join(local, "sub"))
        with open(os.path.join(local, "sub", "v.txt"), "w") as f:
            f.write("vocab")
    assert storage.read_text(storage.join(root, "tok", "sub", "v.txt")) == "vocab"
    copy = storage.local_copy(storage.join(root, "tok"))
    with open(os.path.join(copy, "sub", "v.txt")) as f:
        assert f.read() == "vocab"
    assert storage.is_url(root) == copy.startswith(str(tmp_path / "cache"))


@pytest.mark.parametrize("to", ["local", "gcs"])
def test_copy_trees_and_files(root, to, tmp_path, request):
    destination = storage.join(str(tmp_path) if to == "local"
                               else request.getfixturevalue("gcs_path"), "copy")
    storage.write_text(storage.join(root, "m", "config.json"), "{}")
    storage.write_bytes(storage.join(root, "m", "params", "a", "0"), b"\x01")
    storage.write_text(storage.join(destination, "m", "config.json"), "old")
    storage.copy(storage.join(root, "m"), storage.join(destination, "m"))
    storage.copy(storage.join(root, "m", "config.json"), storage.join(destination, "c.json"))
    assert storage.read_text(storage.join(destination, "m", "config.json")) == "{}"
    assert storage.read_bytes(storage.join(destination, "m", "params", "a", "0")) == b"\x01"
    assert storage.read_text(storage.join(destination, "c.json")) == "{}"
    assert storage.listdir(storage.join(destination, "m")) == ["config.json", "params"]


def test_mirror_uploads_changes_and_resumes(root):
    mirror = storage.Mirror(storage.join(root, "logs"))
    with open(mirror.path("m.jsonl"), "a") as f:
        f.write("1\n")
    mirror.sync()
    assert storage.read_text(storage.join(root, "logs", "m.jsonl")) == "1\n"
    mirror.close()
    again = storage.Mirror(storage.join(root, "logs"))         # a resumed run appends
    with open(again.path("m.jsonl"), "a") as f:
        f.write("2\n")
    again.close()
    assert storage.read_text(storage.join(root, "logs", "m.jsonl")) == "1\n2\n"


def test_orbax_checkpoints_on_gcs(gcs_path):
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    with Checkpointer(storage.join(gcs_path, "ckpt"), max_to_keep=1) as ckpt:
        ckpt.save(1, tree, {"note": "one"}, force=True)
        ckpt.save(2, tree, {"note": "two"}, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [2]
        state, meta = ckpt.restore(2, tree)
    assert meta["note"] == "two"
    np.testing.assert_array_equal(state["w"], tree["w"])
    path = save_pytree(storage.join(gcs_path, "final"), tree)
    np.testing.assert_array_equal(load_pytree(path, tree)["b"], tree["b"])
