"""bench/generate_speed.py without running a model: its flags, the alternated order of the runs,
the output path, and the ratios it derives from the runs' timings."""
import importlib.util
import os
import re

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                     "bench")


@pytest.fixture(scope="module")
def bench():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(BENCH)     # the script imports its neighbours, as when run from bench/
        spec = importlib.util.spec_from_file_location("bench_generate_speed",
                                                      os.path.join(BENCH, "generate_speed.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def test_dry_run_alternates_systems_per_batch_and_names_a_new_results_file(bench, capsys):
    bench.main(["--dry-run", "--pairs", "2", "--batches", "1,16", "--systems", "rlhf_jax,tunix"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[:-1] == [f"pair {p} batch {b} {s}" for p in (0, 1) for b in (1, 16)
                          for s in ("rlhf_jax", "tunix")]
    assert re.fullmatch(r"would write .*/bench/results/generate_speed-\d{8}T\d{6}Z(-\d+)?\.json",
                        lines[-1])


def test_out_names_the_file(bench, capsys, tmp_path):
    named = str(tmp_path / "g.json")
    bench.main(["--dry-run", "--out", named, "--batches", "64"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"would write {named}"
    assert [line.split()[-1] for line in lines[:-1]] == list(bench.ALL_SYSTEMS) * 2   # default 2 pairs


@pytest.mark.parametrize("flags, message", [
    (["--systems", "rlhf_jax,vllm"], "--systems='rlhf_jax,vllm': unknown ['vllm']"),
    (["--batches", "1,0"], "--batches='1,0': expected positive integers"),
    (["--batches", "1,x"], "--batches='1,x': expected a comma-separated list of int"),
    (["--batches", "128"], "--batches='128': at most 64"),
    (["--pairs", "0"], "--pairs=0 --calls=3: expected >= 1 each"),
])
def test_bad_flags_name_the_flag_and_the_value(bench, flags, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        bench.main(["--dry-run", *flags])


def test_ratios_are_rlhf_jax_tokens_per_second_over_the_others_pair_by_pair(bench):
    runs = {"rlhf_jax": {"16": [{"warm_s": 1.0, "cold_s": 4.0, "returncode": 0},
                                {"warm_s": 2.0, "cold_s": 4.0, "returncode": 0}]},
            "transformers": {"16": [{"warm_s": 3.0, "cold_s": 2.0, "returncode": 0},
                                    {"warm_s": 3.0, "cold_s": 2.0, "returncode": 1}]}}
    summary, pairs = bench._summarize(runs, ["rlhf_jax", "transformers"], [16], 2)
    assert [p["b16_warm_ratio_rlhf_jax_over_transformers"] for p in pairs] == [3.0, 1.5]
    assert pairs[0]["b16_cold_ratio_rlhf_jax_over_transformers"] == 0.5
    assert summary["b16_warm_ratio_rlhf_jax_over_transformers"] == 2.25   # median of the pairs
    assert summary["rlhf_jax"]["16"]["warm_tokens_per_s"] == 16 * 64 / 1.5
    assert summary["rlhf_jax"]["16"]["all_ok"] and not summary["transformers"]["16"]["all_ok"]
