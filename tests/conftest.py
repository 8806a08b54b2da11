"""Test configuration: 8 fake CPU devices (set before jax is imported anywhere), the tiers, and the
fixtures several test modules share.

Tiers are directories, and each test is marked with its directory's name:

* ``tests/unit``         pure functions, objectives, models, data, the world: no training;
* ``tests/integration``  a stage, or a few steps of one, on tiny models;
* ``tests/e2e``          pipelines, sweeps, notebooks, several processes.

``-m "(unit or integration) and not (slow or heavy)"`` and then ``-m smoke`` on its own are the
README's ten-minute command (``smoke``: the one small end-to-end run, SFT -> RM -> PPO-ptx on 2
processes with the workdir on an emulated GCS, killed and resumed; alone because it starts its
own processes; ``heavy``: unit or integration checks that the full tier, ``-m "not slow"``, runs
instead); no ``-m`` runs everything, the micro pipeline of every stage included.
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


@pytest.fixture(scope="session")
def gcs_emulator():
    """A GCS emulator on loopback (``gcp-storage-emulator``, in memory) for the whole test run,
    with ``STORAGE_EMULATOR_HOST`` pointing at it as Google's client libraries expect; yields the
    environment a subprocess needs to reach it. Tests use ``gcs_path`` for a fresh prefix."""
    import subprocess
    import sys
    import time
    import urllib.request

    from paths import free_port
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, os.path.join(os.path.dirname(__file__), "gcs_emulator.py"), "start",
         "--host=127.0.0.1", "--quiet",
         f"--port={port}", "--in-memory", f"--default-bucket={GCS_BUCKET}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    host = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{host}/storage/v1/b/{GCS_BUCKET}", timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the GCS emulator did not start on {host}")
            time.sleep(0.1)
    env = {"STORAGE_EMULATOR_HOST": host, "TENSORSTORE_GCS_HTTP_URL": host,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
           "CLOUD_STORAGE_EMULATOR_ENDPOINT": host}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        proc.wait(timeout=10)


GCS_BUCKET = "rlhf-jax-test"


@pytest.fixture
def gcs_path(gcs_emulator, request):
    """A fresh ``gs://`` prefix in the emulated bucket, named after the test."""
    import re
    import uuid
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:60]
    return f"gs://{GCS_BUCKET}/{name}-{uuid.uuid4().hex[:8]}"
