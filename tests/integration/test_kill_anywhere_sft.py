"""Kill anywhere, SFT: SIGKILLed during a seeded checkpoint write and during the model write,
restarted each time, it ends bit for bit where an uninterrupted run ends, with each step logged
once (the harness: tests/kill_anywhere.py; kills at random moments too, for the other stages and
the pipeline: tests/e2e/test_kill_anywhere.py). Each restart costs a process start (~8 CPU
seconds), so the quick tier has only the two kills that matter most."""
import os
import shutil
import time

import pytest

from kill_anywhere import (Progress, Watcher, assert_same_outputs, data, kill_plan,  # noqa: F401
                           leftovers, reference_run, run_with_kills, sft_args)

RUN = ("--config.train.steps=24", "--config.train.checkpoint_every=4")


@pytest.mark.heavy     # the quick tier's kill and resume: tests/e2e/test_gcs.py
def test_sft_killed_anywhere_ends_as_if_never_killed(data, capsys):
    reference, killed = (os.path.join(data["root"], name) for name in ("ka_sft_ref", "ka_sft"))
    ref = reference_run(sft_args(data, reference, *RUN), reference)
    plan = kill_plan(ref, seed=0, moments=0, checkpoints=1, models=1)
    report = run_with_kills(sft_args(data, killed, *RUN), killed, ref, plan)
    with capsys.disabled():
        print("\n" + report.line("sft"))
    assert report.during_checkpoint >= 1 and report.during_model >= 1, \
        (report.line("sft"), report.log)
    # Both writes happen under the lock, so at least the two restarts after them take it over.
    assert report.lock_takeovers >= 2, report.line("sft")
    assert assert_same_outputs(killed, reference) == ["model"]
    assert not leftovers(killed)


def test_watcher_tells_a_dead_attempts_leftovers_from_this_attempts_writes(tmp_path):
    """The harness's own trap: a killed attempt leaves tmp and staging directories, which the
    next attempt probes for writability (their ctime changes, nothing is written) and later
    removes, and the new save's directory gets the leftover's name and, on ext4, its inode."""
    staging = tmp_path / "model.saving"
    old_checkpoint = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp"
    (staging / "params").mkdir(parents=True)
    old_checkpoint.mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    watcher = Watcher(str(tmp_path))
    watcher.begin()
    settle = lambda: time.sleep(0.05)     # file times move in clock ticks of a few ms
    settle()
    (staging / ".rlhf_jax-write-test-x").touch()
    (staging / ".rlhf_jax-write-test-x").unlink()
    assert watcher.poll() == (set(), set())          # a dead attempt's lock, rows and writes
    (tmp_path / ".lock").write_text("{}")
    assert watcher.poll() == ({("lock", ".")}, set())
    old_checkpoint.rmdir()                           # orbax's cleanup on opening
    assert watcher.poll()[1] == set()
    (tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp").mkdir()
    assert watcher.poll()[1] == {("checkpoint", ".", 8)}
    (tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp").rename(tmp_path / "checkpoints" / "8")
    settle()
    shutil.rmtree(staging)                           # recover_model_dir, then the new save
    staging.mkdir()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    assert watcher.poll() == ({("lock", "."), ("metrics", ".", 3)}, {("model", "model")})

    progress = Progress([("lock", "."), ("metrics", ".", 2), ("metrics", ".", 4), ("done", ".")])
    assert progress(set()) == progress({("metrics", ".", 1)}) == -1
    assert progress({("lock", ".")}) == 0
    assert progress({("lock", "."), ("metrics", ".", 3)}) == 1    # past row 2, not at row 4
    assert progress({("done", ".")}) == 3
