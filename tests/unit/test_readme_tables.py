"""The README's generated tables equal what bench/readme_tables.py prints from committed data, its
test command is the one .ci/run runs, and bench scripts write a new results file unless --out
names one (bench/out_path.py)."""
import importlib.util
import os
from datetime import datetime, timedelta, timezone

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                     "bench")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def readme_tables():
    return _load("readme_tables")


@pytest.fixture(scope="module")
def tables(readme_tables):
    return readme_tables.all_tables()


def test_readme_and_docs_blocks_equal_the_script(readme_tables, tables):
    names = []
    for path in readme_tables.documents():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        names += readme_tables.block_names(text)
        assert readme_tables.render(text, tables) == text, (
            f"{os.path.basename(path)}: its tables differ from the committed data's; "
            "run python bench/readme_tables.py --write")
    # The README's headline tables are blocks, and every table the script makes is shown.
    with open(readme_tables.documents()[0], encoding="utf-8") as f:
        assert {"findings", "policies"} <= set(readme_tables.block_names(f.read()))
    assert set(names) == set(tables)


def test_findings_table_rows_come_from_the_seeds_sweep(tables):
    lines = tables["findings"].splitlines()
    assert lines[0] == "| finding | seed=0 | seed=1 | seed=2 | mean +- sd | holds |"
    # The alignment tax: per-seed values, mean +- sample sd over the seeds, and 3 of 3 holding.
    tax = next(line for line in lines if line.startswith("| PPO pays an alignment tax"))
    assert tax.endswith("| 0.085 | 0.258 | 0.320 | 0.221 +- 0.122 | 3/3 |")


def test_render_replaces_only_block_bodies(readme_tables):
    text = ("intro\n<!-- table:a -->\nold a\nmore old\n<!-- /table -->\nmiddle\n"
            "<!-- table:b -->\n<!-- /table -->\nend\n")
    new = readme_tables.render(text, {"a": "| A |", "b": "| B |\n| B2 |"})
    assert new == ("intro\n<!-- table:a -->\n| A |\n<!-- /table -->\nmiddle\n"
                   "<!-- table:b -->\n| B |\n| B2 |\n<!-- /table -->\nend\n")
    assert readme_tables.render(new, {"a": "| A |", "b": "| B |\n| B2 |"}) == new
    assert readme_tables.block_names(new) == ["a", "b"]
    with pytest.raises(SystemExit, match="unknown table 'c'"):
        readme_tables.render("<!-- table:c -->\n<!-- /table -->", {"a": ""})


def test_check_and_write_modes(readme_tables, tables, tmp_path, monkeypatch, capsys):
    doc = tmp_path / "README.md"
    doc.write_text("x\n<!-- table:pod -->\nstale\n<!-- /table -->\n")
    monkeypatch.setattr(readme_tables, "documents", lambda: [str(doc)])
    assert readme_tables.main(["--check"]) == 1
    assert "stale" in doc.read_text()
    assert readme_tables.main(["--write"]) == 0
    assert doc.read_text() == f"x\n<!-- table:pod -->\n{tables['pod']}\n<!-- /table -->\n"
    assert readme_tables.main(["--check"]) == 0
    capsys.readouterr()


def test_bench_out_default_is_a_new_timestamped_file(tmp_path):
    out_path = _load("out_path")
    now = datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone.utc)
    (tmp_path / "ppo_speed.json").write_text("{}")   # the committed result
    first = out_path.out_path(None, "ppo_speed", now=now, results=str(tmp_path))
    assert first == str(tmp_path / "ppo_speed-20260304T050607Z.json")
    open(first, "w").close()
    # A second run in the same second gets its own file; the committed one is never chosen.
    second = out_path.out_path("", "ppo_speed", now=now, results=str(tmp_path))
    assert second == str(tmp_path / "ppo_speed-20260304T050607Z-1.json")
    # Local times are written as UTC.
    other_zone = datetime(2026, 3, 4, 7, 6, 7, tzinfo=timezone(timedelta(hours=2)))
    assert out_path.out_path(None, "x", now=other_zone, results="r") == os.path.join(
        "r", "x-20260304T050607Z.json")
    # --out given: exactly that path, even the committed file.
    named = str(tmp_path / "ppo_speed.json")
    assert out_path.out_path(named, "ppo_speed", now=now, results=str(tmp_path)) == named


def test_readme_test_command_is_the_one_ci_runs():
    repo = os.path.dirname(BENCH)
    with open(os.path.join(repo, ".ci", "run"), encoding="utf-8") as f:
        ci = [line.strip() for line in f if line.startswith("pip install")]
    with open(os.path.join(repo, "README.md"), encoding="utf-8") as f:
        readme = f.read().splitlines()
    assert len(ci) == 1 and "pytest" in ci[0]
    # On the README's first screen, verbatim.
    assert ci[0] in readme[:50]
