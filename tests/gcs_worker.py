"""One process of the GCS end-to-end test (tests/e2e/test_gcs.py).

    python tests/gcs_worker.py --data gs://B/x/data --workdir gs://B/x/run \
        --coordinator_address 127.0.0.1:PORT --num_processes 2 --process_id I [--kill_after 1]

The tiny SFT -> RM -> PPO-ptx run of tests/multihost_worker.py with every input and output in the
(emulated) bucket, each stage behind the pipeline's DONE marker. ``--kill_after N``: once PPO
checkpoint N is committed, both processes SIGKILL themselves (a preemption with no warning).
Without it, the run resumes, then trains the same PPO stage again from scratch in
``WORKDIR/reference`` and writes what the test compares to ``WORKDIR/results_<process>.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys

PPO_ITERATIONS = 2


def _configs(data: str, workdir: str):
    import multihost_worker as mw

    sft, rm, ppo = mw._configs(data, workdir)
    sft.train.update(steps=2)
    sft.data.valid_fraction = 0.0     # no eval step to compile: nothing here checks it
    for cfg in (sft, rm, ppo):
        # TensorBoard on a gs:// workdir, resumed, is tests/unit/test_metrics.py's; here importing
        # tensorboardX and mirroring its events cost process 0 seconds of every launch.
        cfg.tracker = "none"
    ppo.ppo.update(iterations=PPO_ITERATIONS, epochs=1, checkpoint_every=1, sample_every=1)
    return sft, rm, ppo


def _digest(tree) -> str:
    import jax
    import numpy as np
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()


def _kill_after(step: int) -> None:
    """SIGKILL this process once PPO checkpoint ``step`` is committed on every process."""
    from rlhf_jax import checkpoint

    save = checkpoint.Checkpointer.save

    def save_then_die(self, at, *args, **kwargs):
        started = save(self, at, *args, **kwargs)
        if int(at) == step and "/ppo/" in self.directory:
            self.wait()
            import jax
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("gcs_worker: checkpoint committed everywhere")
            print(f"process {jax.process_index()}: killed after checkpoint {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return started
    checkpoint.Checkpointer.save = save_then_die


def main(argv: list[str]) -> None:
    import time
    t0 = time.time()
    mark = lambda what: print(f"[{time.time() - t0:6.1f} s, cpu {time.process_time():5.1f} s] {what}",
                              flush=True)
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--coordinator_address", required=True)
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--kill_after", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=4").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"

    from rlhf_jax import distributed
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)

    mark("joined")
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    if os.environ.get("RLHF_JAX_TEST_XLA_CACHE"):    # the test run's cache (tests/conftest.py)
        jax.config.update("jax_compilation_cache_dir", os.environ["RLHF_JAX_TEST_XLA_CACHE"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

    from rlhf_jax import model_io, runtime, storage
    from rlhf_jax.metrics import read_jsonl_metrics
    from rlhf_jax.pipeline import run_stage
    from rlhf_jax.stages import ppo, reward, sft

    runtime.configure_logging()
    if args.kill_after:
        _kill_after(args.kill_after)
    workdir = args.workdir
    sft_cfg, rm_cfg, ppo_cfg = _configs(args.data, workdir)
    timings: dict = {}
    # JAX's tracing allocates containers by the million, and each time CPython's collector also
    # walks the whole heap the imports left (perf: ~10% of the test's CPU in gc_collect_main).
    # Frozen, that heap is no longer walked; the young generations are collected less often.
    import gc
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    mark("imported")
    run_stage(workdir, "sft", lambda: sft.train(sft_cfg, storage.join(workdir, "sft")), timings)
    mark("sft")
    run_stage(workdir, "rm", lambda: reward.train(rm_cfg, storage.join(workdir, "rm")), timings)
    mark("rm")
    run_stage(workdir, "ppo", lambda: ppo.train(ppo_cfg, storage.join(workdir, "ppo")), timings)
    mark("ppo")

    # The same PPO stage uninterrupted, from the same SFT and RM, in the same process.
    reference = storage.join(workdir, "reference")
    reference_cfg = ppo_cfg.copy_and_resolve_references()
    reference_cfg.ppo.checkpoint_every = 0       # uninterrupted: it never reads a checkpoint
    ppo.train(reference_cfg, storage.join(reference, "ppo"))
    mark("reference ppo")

    mesh = runtime.setup_mesh(ppo_cfg)
    out = {"timings": timings}
    for name, root in (("resumed", workdir), ("reference", reference)):
        _, params, _, _ = model_io.load_model(storage.join(root, "ppo", "model"), mesh)
        out[f"{name}/digest"] = _digest(distributed.fetch(params))
        if distributed.is_main():
            rows = read_jsonl_metrics(storage.join(root, "ppo", "metrics.jsonl"))
            out[f"{name}/metrics"] = [{k: v for k, v in row.items()
                                       if k != "time" and not k.startswith("time/")
                                       and "per_s" not in k and k != "tokens/s"} for row in rows]
    storage.write_json(storage.join(workdir, f"results_{jax.process_index()}.json"), out,
                       sort_keys=True)
    print(f"process {jax.process_index()}: done", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main(sys.argv[1:])
