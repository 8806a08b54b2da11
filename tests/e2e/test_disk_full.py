"""A disk that really fills up: SFT on a tiny tmpfs mounted in a private mount namespace (gone
when the test ends). TensorStore fails a checkpoint in orbax's background threads, which echo
it dozens of times; `rlhf-jax` must still end with one line (exit 2) naming what is intact, and
a rerun with space again must resume. tests/integration/test_hostile_commands.py injects the
same failures without a mount."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from paths import REPO

WORDS = [f"w{i}" for i in range(20)]

_FILL_A_TMPFS = textwrap.dedent("""\
    set -u
    mount -t tmpfs -o size=1500k tmpfs "$MNT" || exit 99
    cd "$REPO"
    "$PY" -m rlhf_jax.cli "$@" --workdir "$MNT/work" 2>"$OUT/full.err"
    echo $? > "$OUT/full.rc"
    ls "$MNT/work/checkpoints" > "$OUT/checkpoints"
    mount -o remount,size=64m "$MNT" || exit 98
    "$PY" -m rlhf_jax.cli "$@" --workdir "$MNT/work" >/dev/null 2>"$OUT/resumed.err"
    echo $? > "$OUT/resumed.rc"
    test -d "$MNT/work/model/params" && touch "$OUT/model"
""")


def test_a_really_full_disk(tmp_path):
    from rlhf_jax.world.export import build_word_tokenizer
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1) to mount a private tmpfs")
    build_word_tokenizer([" ".join(WORDS + ["instruction", ":", "response"])], tmp_path / "tok")
    rows = [{"prompt": f"instruction : {WORDS[i % 20]} {WORDS[(3 * i) % 20]} response :",
             "completion": f"{WORDS[(7 * i) % 20]} {WORDS[(i + 5) % 20]}"} for i in range(64)]
    (tmp_path / "demos.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir(), out.mkdir()
    argv = ["sft", "--config", os.path.join(REPO, "experiments", "tiny_sft.py"),
            f"--config.tokenizer={tmp_path / 'tok'}", f"--config.data.train={tmp_path / 'demos.jsonl'}",
            "--config.train.steps=6", "--config.train.checkpoint_every=2",
            "--config.train.batch_size=8", "--config.mesh.shape=(1,1,1)",
            # the second run loads the steps the first compiled
            "--compilation-cache", os.environ.get("RLHF_JAX_TEST_XLA_CACHE", str(tmp_path / "xla"))]
    userns = [] if os.geteuid() == 0 else ["--map-root-user"]
    done = subprocess.run([unshare, "--mount", *userns, "sh", "-c", _FILL_A_TMPFS, "sh", *argv],
                          env={**os.environ, "MNT": str(mnt), "OUT": str(out), "REPO": REPO,
                               "PY": sys.executable},
                          capture_output=True, text=True, timeout=600)
    if not (out / "full.rc").exists():
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stderr[-2000:]

    err = (out / "full.err").read_text()
    assert (out / "full.rc").read_text().strip() == "2", err[-3000:]
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("rlhf-jax:")]
    assert len(lines) == 1, err[-3000:]
    line = lines[0]
    assert line.startswith(f"rlhf-jax: error: no space left on device writing {mnt}/work/"), line
    committed = sorted(int(n) for n in (out / "checkpoints").read_text().split() if n.isdigit())
    intact = (f"checkpoints up to step {committed[-1]} in {mnt}/work/checkpoints are intact"
              if committed else f"no checkpoint in {mnt}/work/checkpoints was committed yet")
    assert line.endswith(f"; {intact}; free space and rerun the same command to resume"), line
    assert not re.search(r"orbax-checkpoint-tmp/.", line), line

    resumed = (out / "resumed.err").read_text()
    assert (out / "resumed.rc").read_text().strip() == "0", resumed[-2000:]
    if committed:
        assert f"at step {committed[-1]}" in resumed, resumed[-2000:]
    assert (out / "model").exists()
