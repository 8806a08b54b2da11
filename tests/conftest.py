"""Test configuration: 8 fake CPU devices (set before jax is imported anywhere), the tiers, and the
fixtures several test modules share.

Tiers are directories, and each test is marked with its directory's name:

* ``tests/unit``         pure functions, objectives, models, data, the world: no training;
* ``tests/integration``  a stage, or a few steps of one, on tiny models;
* ``tests/e2e``          pipelines, sweeps, notebooks, several processes.

``-m "unit or integration or smoke"`` is the README's ten-minute command (``smoke``: the one
small end-to-end pipeline); no ``-m`` runs everything.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import tempfile  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    """One persistent compilation cache per test run, shared by the xdist workers (they inherit
    the controller's environment): a step another test compiled is loaded, not compiled again.
    ``compile_counting`` counts a load as a compilation, so the no-recompile checks see the
    same numbers with or without it."""
    directory = os.environ.setdefault("RLHF_JAX_TEST_XLA_CACHE",
                                      tempfile.mkdtemp(prefix="rlhf_jax_xla_cache_"))
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# --- fixtures shared by several test modules, built once per test run (per xdist worker) ---------

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def base():
    """The PPO toys' tiny policy init and its RM twin (ppo_toys.build_base)."""
    from ppo_toys import build_base
    return build_base()


@pytest.fixture(scope="session")
def toy_dirs(base, tmp_path_factory):
    """The PPO toys' checkpoints, prompts and text on disk (ppo_toys.build_toy_dirs)."""
    from ppo_toys import build_toy_dirs
    return build_toy_dirs(base, tmp_path_factory.mktemp("ppo_toy"))


TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = item.path.parts
        tier = next((t for t in TIERS if t in parts[parts.index("tests") + 1:][:1]), None)
        if tier is None:
            raise pytest.UsageError(f"{item.nodeid}: a test module belongs in tests/unit, "
                                    "tests/integration or tests/e2e")
        item.add_marker(getattr(pytest.mark, tier))
