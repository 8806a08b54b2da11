"""``--profile_steps A:B``: an XProf trace of a training run's steps, its phases named."""
from __future__ import annotations

import glob
import gzip
import os

import jax.numpy as jnp
import pytest
from ppo_toys import ppo_config, run_train, toy_overrides

from rlhf_jax import cli, storage, validate
from rlhf_jax.errors import ConfigError
from rlhf_jax.metrics import TraceWindow, parse_steps


@pytest.mark.heavy     # the quick tier traces through test_trace_window_to_gcs_uploads_on_close
def test_ppo_traces_the_asked_iterations_with_named_phases(toy_dirs, tmp_path):
    cfg = ppo_config(*toy_overrides(toy_dirs, "ppo.iterations=3", "ppo.rollout_batch_size=8",
                                    "ppo.minibatch_size=4"))
    cli.set_stage_field(cfg, "profile_steps", "1:2")
    assert cfg.profile_steps == "1:2"
    run_train(cfg, tmp_path / "run")
    xplanes = glob.glob(str(tmp_path / "run" / "profile" / "**" / "*.xplane.pb"), recursive=True)
    perfetto = glob.glob(str(tmp_path / "run" / "profile" / "**" / "*.trace.json.gz"),
                         recursive=True)
    assert len(xplanes) == 1 and len(perfetto) == 1 and os.path.getsize(xplanes[0]) > 0
    text = gzip.open(perfetto[0], "rt").read()
    for phase in ("rollout", "experience", "update"):
        assert f'"{phase}"' in text, phase


def test_profile_steps_errors_name_the_field():
    assert parse_steps("") is None and parse_steps("2:5") == (2, 5)
    for bad in ("5", "3:3", "a:b", "-1:2"):
        with pytest.raises(ConfigError, match=r"profile_steps="):
            parse_steps(bad)
    cfg = ppo_config("profile_steps=4:2")
    with pytest.raises(ConfigError, match=r"profile_steps='4:2': expected 'A:B'"):
        validate.check(cfg)


def test_trace_window_to_gcs_uploads_on_close(gcs_path, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_JAX_CACHE", str(tmp_path / "cache"))
    directory = storage.join(gcs_path, "profile")
    window = TraceWindow("1:2", directory)
    for i in range(3):
        window.step(i)
        jnp.arange(8.0).sum().block_until_ready()
    window.close()
    local = storage.local_copy(directory)
    xplanes = glob.glob(os.path.join(local, "**", "*.xplane.pb"), recursive=True)
    assert len(xplanes) == 1 and os.path.getsize(xplanes[0]) > 0
