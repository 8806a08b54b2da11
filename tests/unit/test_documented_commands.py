"""Every ``rlhf-jax`` command that README.md, docs/*.md and the experiments' docstrings show
pastes into bash and parses.

Commands are read from the shell blocks of the Markdown files (fenced, no language or a shell
one) and the indented blocks of the docstrings, plus inline code that starts with a command and
its arguments (``rlhf-jax eval`` alone names a command; it is not one to run). Backslash
continuations are joined as bash joins them (a backslash that is not the line's last character
continues nothing), ``NAME=value`` lines of a block define variables for its later lines, and
``JAX_PLATFORMS=cpu``-style prefixes are skipped. What would not paste is a failure: unquoted
parentheses (``mesh.shape=(D,F,T)``), a continuation line orphaned by a comment or a space
after its backslash, a variable the block never sets.

Training commands are dry-run through ``cli.main`` with ``--show-config`` (the config file
loads and every override applies; nothing trains); the others are parsed by ``build_parser``,
and their ``--config`` overrides applied, without running.
"""
from __future__ import annotations

import ast
import glob
import os
import re
import shlex
from dataclasses import dataclass

import pytest

from paths import REPO
from rlhf_jax import cli
from rlhf_jax.config import apply_overrides, load_config
from rlhf_jax.errors import UserError

SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console", "zsh"}
PREFIX_WORDS = {"time", "nohup", "env", "exec"}
SEPARATORS = {"&&", "||", ";", "|", "&", ";;"}
REDIRECTIONS = {"<", ">", ">>", ">&", "&>", "<&", "<<", "<<<", "&>>", ">|"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


@dataclass
class Found:
    where: str                  # file:line
    argv: list[str] | None      # after `rlhf-jax`
    problem: str = ""           # why it would not paste


def logical_lines(block: str) -> list[tuple[int, str]]:
    """(offset of the first line, text) of each line as bash reads it: a line whose very last
    character is a backslash continues on the next."""
    out, pending, start = [], "", None
    for number, line in enumerate(block.split("\n")):
        line = re.sub(r"^\s*\$ ", "", line) if pending == "" else line   # console prompts
        start = number if start is None else start
        if line.endswith("\\") and not line.endswith("\\\\"):
            pending += line[:-1]
            continue
        out.append((start, pending + line))
        pending, start = "", None
    if pending:
        out.append((start, pending))
    return out


def _expand(text: str, variables: dict[str, str]) -> tuple[str, str]:
    """``$NAME`` / ``${NAME}`` outside single quotes replaced (unquoted: split into words, as
    bash does); the problem when the block never set one."""
    missing = []

    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            missing.append(name)
            return ""
        return variables[name]

    parts = re.split(r"('[^']*')", text)
    expanded = "".join(p if p.startswith("'") else VARIABLE.sub(value, p) for p in parts)
    return expanded, (f"${missing[0]} is not set in this block" if missing else "")


def _words(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def commands_in(text: str, variables: dict[str, str]) -> list[tuple[list[str] | None, str]]:
    """The ``rlhf-jax`` invocations of one logical line as ``(argv, problem)``; a line of only
    assignments adds them to ``variables``."""
    expanded, problem = _expand(text, variables)
    try:
        words = _words(expanded)
    except ValueError as e:       # an unclosed quote: a problem where a command starts
        starts = re.match(r"^\s*([A-Za-z_][A-Za-z0-9_]*=\S* +)*rlhf-jax\b", expanded)
        return [(None, f"does not parse as shell: {e}")] if starts else []
    if words and all(ASSIGNMENT.match(w) for w in words):
        variables.update(w.split("=", 1) for w in words)
        return []
    found, command = [], []
    for word in words + [";"]:
        if word in SEPARATORS:
            head = command
            while head and (ASSIGNMENT.match(head[0]) or head[0] in PREFIX_WORDS):
                head = head[1:]
            if head and head[0] == "rlhf-jax":
                rest = head[1:]
                if any(w in ("(", ")") for w in rest):
                    found.append((None, "unquoted parentheses: a bash syntax error (quote the "
                                        "value, e.g. --config.mesh.shape='(1,4,2)')"))
                else:
                    redirect = next((i for i, w in enumerate(rest) if w in REDIRECTIONS),
                                    len(rest))
                    found.append((rest[:redirect], problem))
            command = []
        else:
            command.append(word)
    return found


def _block_commands(where: str, first_line: int, block: str) -> list[Found]:
    found, variables, orphans = [], {}, []
    for offset, line in logical_lines(block):
        here = f"{where}:{first_line + offset}"
        found += [Found(here, argv, problem) for argv, problem in commands_in(line, variables)]
        if line.strip().startswith("-"):
            orphans.append(Found(here, None, "a line of flags that continues no command (a "
                                             "comment, or a space after the backslash, ended "
                                             "the command above)"))
    return found + orphans if found else []


def _inline_commands(where: str, line: int, span: str) -> list[Found]:
    """Inline code that starts with ``rlhf-jax <command>`` and has arguments."""
    text = " ".join(span.split())
    if not re.match(r"^([A-Za-z_][A-Za-z0-9_]*=\S* )*rlhf-jax ", text):
        return []
    commands = commands_in(text, {})
    return [Found(f"{where}:{line}", argv, problem) for argv, problem in commands
            if argv is None or (len(argv) > 1 and argv[0] in _COMMANDS)]


_COMMANDS = set(cli.build_parser().commands)


def markdown_commands(path: str) -> list[Found]:
    text = open(path, encoding="utf-8").read()
    where = os.path.relpath(path, REPO)
    line_of = lambda offset: text.count("\n", 0, offset) + 1
    found = []
    fence = re.compile(r"^(```+|~~~+)[ \t]*([\w+-]*)[^\n]*\n(.*?)^\1[ \t]*$", re.M | re.S)
    for match in fence.finditer(text):
        if match.group(2).lower() in SHELL_LANGUAGES:
            found += _block_commands(where, line_of(match.start(3)), match.group(3))
    prose = fence.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for match in re.finditer(r"(`+)(?!`)(.+?)(?<!`)\1(?!`)", prose, re.S):
        found += _inline_commands(where, line_of(match.start()), match.group(2))
    return found


def docstring_commands(path: str) -> list[Found]:
    """The module docstring's indented blocks (reST literal blocks) and its inline ``code``."""
    module = ast.parse(open(path, encoding="utf-8").read())
    doc = ast.get_docstring(module, clean=False) or ""
    first = module.body[0].lineno        # the docstring's first line in the file
    where = os.path.relpath(path, REPO)
    found, block, start = [], [], 0
    lines = doc.split("\n") + [""]
    for number, line in enumerate(lines, first):
        if line.startswith("    "):
            start = start or number
            block.append(line)
            continue
        if block:
            found += _block_commands(where, start, "\n".join(block))
        block, start = [], 0
    prose = "\n".join(line if not line.startswith("    ") else "" for line in lines)
    for match in re.finditer(r"``(.+?)``", prose, re.S):
        found += _inline_commands(where, first + prose.count("\n", 0, match.start()),
                                  match.group(1))
    return found


def documented_commands() -> list[Found]:
    found = []
    for path in [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]:
        if os.path.exists(path):
            found += markdown_commands(path)
    for path in sorted(glob.glob(os.path.join(REPO, "experiments", "*.py"))):
        found += docstring_commands(path)
    return found


def dry_run(argv: list[str], capsys) -> None:
    """Parse ``argv`` as ``rlhf-jax`` would; a training command also resolves its config."""
    rest, overrides = cli._split_overrides(argv)
    try:
        args = cli.build_parser().parse_args(rest)
    except SystemExit as e:      # --help, --version
        capsys.readouterr()
        assert e.code == 0, argv
        return
    if args.command in cli.TRAIN_COMMANDS:
        code = cli.main(argv + ["--show-config"])
        err = capsys.readouterr().err
        assert code == 0, err
    elif getattr(args, "config", None):
        apply_overrides(load_config(args.config), overrides)


FOUND = documented_commands()


def test_the_documents_show_commands():
    """The extraction finds the documented commands (a regex gone wrong would pass vacuously)."""
    assert len(FOUND) >= 20
    assert any(f.where.startswith("README.md") for f in FOUND)
    assert any(f.where.startswith("experiments/") for f in FOUND)


@pytest.mark.parametrize("found", FOUND, ids=[f"{f.where}:{' '.join(f.argv or [])[:60]}"
                                               for f in FOUND])
def test_documented_command_pastes_and_parses(found: Found, capsys, monkeypatch):
    monkeypatch.chdir(REPO)      # documented paths are relative to the repository
    assert not found.problem, f"{found.where}: {found.problem}"
    try:
        dry_run(found.argv, capsys)
    except UserError as e:
        pytest.fail(f"{found.where}: rlhf-jax {shlex.join(found.argv)}: {e}")


# --- the extraction itself ----------------------------------------------------------------------

def _block(text: str) -> list[Found]:
    return _block_commands("x", 1, text)


def test_unquoted_parentheses_and_orphaned_continuations_fail():
    bad = _block("rlhf-jax pipeline --config c.py --config.sft.mesh.shape=(1,4,2) --show-config")
    assert bad[0].argv is None and "parentheses" in bad[0].problem
    quoted = _block("rlhf-jax pipeline --config c.py --config.sft.mesh.shape='(1,4,2)'")
    assert quoted[0].argv == ["pipeline", "--config", "c.py", "--config.sft.mesh.shape=(1,4,2)"]
    commented = _block("rlhf-jax sft --config c.py \\\n    --workdir w   # the output\n"
                       "    --config.seed=1\n")
    assert commented[0].argv == ["sft", "--config", "c.py", "--workdir", "w"]
    assert "continues no command" in commented[1].problem
    spaced = _block("rlhf-jax sft --config c.py \\ \n    --workdir w\n")
    assert spaced[0].argv == ["sft", "--config", "c.py", " "] and "continues" in spaced[1].problem


def test_variables_prefixes_and_separators():
    found = _block('S="--config.shared_from=runs/x --config.seed=1"\n'
                   "pip install -e . && JAX_PLATFORMS=cpu rlhf-jax sweep --config s.py $S\n"
                   "rlhf-jax eval --from-workdir ${W} > out.txt 2>&1\n")
    assert found[0].argv == ["sweep", "--config", "s.py", "--config.shared_from=runs/x",
                             "--config.seed=1"] and not found[0].problem
    assert found[1].argv == ["eval", "--from-workdir"] and "$W is not set" in found[1].problem
    assert _block("echo no commands here\n--not-a-continuation\n") == []


def test_inline_code_names_or_runs_a_command():
    assert _inline_commands("x", 1, "rlhf-jax eval") == []          # a name
    assert _inline_commands("x", 1, "rlhf-jax <command> --help") == []
    found = _inline_commands("x", 1, "rlhf-jax sweep --config\n  experiments/sweep_seeds.py")
    assert found[0].argv == ["sweep", "--config", "experiments/sweep_seeds.py"]


def test_a_command_that_does_not_parse_fails_the_dry_run(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(UserError, match="unrecognized arguments: runs/x"):
        dry_run(["eval", "--from-workdir", "runs/tiny", "runs/x"], capsys)
    with pytest.raises(AssertionError, match="no field"):
        dry_run(["sft", "--config", "experiments/tiny_sft.py", "--config.no_such=1"], capsys)
    with pytest.raises(UserError, match="no field"):
        dry_run(["compile", "--config", "experiments/tiny_sft.py", "--topology", "cpu",
                 "--config.no_such=1"], capsys)
