"""The command line's conventions: one spelling per flag in --help (the other accepted), global
flags on either side of the command, --version, input workdirs as --from-workdir, one error line
and an exit code for each way a command ends, --tracker and --chat. Everything goes through
``rlhf_jax.cli`` in this process; nothing trains or compiles."""
from __future__ import annotations

import signal
from types import SimpleNamespace

import ml_collections
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from paths import EXPERIMENTS
from rlhf_jax import cli, errors
from rlhf_jax import compile as aot
from rlhf_jax.evaluation import prompt_token_counts

TINY_SFT = f"{EXPERIMENTS}/tiny_sft.py"
PIPELINE = f"{EXPERIMENTS}/instructgpt_tiny.py:micro"
SWEEP = f"{EXPERIMENTS}/sweep_seeds.py"


def parse(*argv: str):
    rest, overrides = cli._split_overrides(argv)
    return cli.build_parser().parse_args(rest), overrides


def _all_parsers():
    parser = cli.build_parser()
    return [parser, *parser.commands.values()]


# --- spellings ----------------------------------------------------------------------------------

def test_help_shows_every_flag_with_dashes_only():
    for parser in _all_parsers():
        options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
        assert options and not [o for o in options if "_" in o], parser.prog
        usage = parser.format_usage()
        assert all(f"{o.replace('-', '_')} " not in usage for o in options if "-" in o[2:])


@pytest.mark.parametrize("dashed, underscored", [
    (["sample", "--checkpoint", "m", "--prompt", "p", "--max-new-tokens", "5", "--top-k", "3"],
     ["sample", "--checkpoint", "m", "--prompt", "p", "--max_new_tokens", "5", "--top_k=3"]),
    (["sft", "--config", TINY_SFT, "--show-config", "--profile-steps", "1:2",
      "--allow-config-change", "--compilation-cache", "none"],
     ["sft", "--config", TINY_SFT, "--show_config", "--profile_steps=1:2",
      "--allow_config_change", "--compilation_cache", "none"]),
    (["pipeline", "--config", PIPELINE, "--workdir", "w", "--coordinator-address", "h:1",
      "--num-processes", "2", "--process-id", "0", "--distributed-timeout", "9"],
     ["pipeline", "--config", PIPELINE, "--workdir", "w", "--coordinator_address", "h:1",
      "--num_processes", "2", "--process_id", "0", "--distributed_timeout", "9"]),
    (["--log-level", "debug", "eval", "--from-workdir", "w"],
     ["--log_level", "debug", "eval", "--from_workdir", "w"]),
    (["convert", "jax-to-hf", "a", "b", "--max-shard-size", "1GB", "--dtype", "bfloat16"],
     ["convert", "jax-to-hf", "a", "b", "--max_shard_size", "1GB", "--dtype", "bfloat16"]),
])
def test_both_spellings_parse_the_same(dashed, underscored):
    assert parse(*dashed) == parse(*underscored)


def test_overrides_and_values_keep_their_underscores():
    args, overrides = parse("sft", "--config", TINY_SFT, "--config.train.batch_size=8",
                            "--config.data.train", "a_b.jsonl", "--workdir", "runs/my_run")
    assert overrides == ["train.batch_size=8", "data.train=a_b.jsonl"]
    assert args.workdir == "runs/my_run"
    args, _ = parse("sample", "--checkpoint", "m", "--prompt=--not_a_flag")
    assert args.prompt == ["--not_a_flag"]


# --- global flags, --version, --from-workdir ----------------------------------------------------

@pytest.mark.parametrize("argv, level, debug", [
    (["sft", "--config", TINY_SFT], "INFO", False),
    (["--log-level", "warning", "--debug", "sft", "--config", TINY_SFT], "WARNING", True),
    (["sft", "--config", TINY_SFT, "--log-level", "error", "--debug"], "ERROR", True),
    (["--log-level", "debug", "sft", "--config", TINY_SFT, "--log-level", "error"], "ERROR", False),
])
def test_global_flags_before_or_after_the_command(argv, level, debug):
    args, _ = parse(*argv)
    assert (args.log_level, args.debug) == (level, debug)


def test_version(capsys, monkeypatch):
    from importlib import metadata

    import rlhf_jax
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"rlhf-jax {metadata.version('rlhf_jax')}\n"

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)
    monkeypatch.setattr(metadata, "version", not_installed)
    assert cli.version() == rlhf_jax.__version__


@pytest.mark.parametrize("command", [["eval"], ["profile", "--config", PIPELINE]])
def test_input_workdirs_are_from_workdir_with_the_old_name_as_alias(command):
    assert parse(*command, "--from-workdir", "runs/a")[0].from_workdir == "runs/a"
    assert parse(*command, "--workdir", "runs/a")[0].from_workdir == "runs/a"


# --- errors and exit codes ----------------------------------------------------------------------

def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlhf-jax: error: "), err
    return lines[0]


@pytest.mark.parametrize("argv, phrase", [
    (["sft", "--config", TINY_SFT, "--bogus"], "sft: unrecognized arguments: --bogus; see "
                                               "`rlhf-jax sft --help`"),
    (["sft", "--config", TINY_SFT, "--show-config", "--tracker", "mlflow"],
     "sft: argument --tracker: invalid choice: 'mlflow'"),
    (["sft"], "sft: the following arguments are required: --config"),
    (["sample", "--checkpoint", "m", "--prompt", "p", "--max-new-tokens", "x"],
     "argument --max-new-tokens: invalid int value: 'x'"),
    (["sample", "--checkpoint", "no-such-org/no-such-model", "--prompt", "p"],
     "no-such-org/no-such-model: not a directory and not in the local Hugging Face cache"),
    (["--log-level", "loud", "sft", "--config", TINY_SFT], "argument --log-level: invalid choice"),
    (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: COMMAND"),
    (["sft", "--config", "experiments/no_such.py", "--show-config"], "does not exist"),
    (["sft", "--config", TINY_SFT, "--show-config", "--config.train.no_such=1"], "no field"),
    (["sft", "--config", TINY_SFT, "--config.train.steps"], "--config.train.steps needs a value"),
    (["sft", "--config", TINY_SFT], "sft: --workdir DIR is required"),
    (["compile", "--config", "experiments/no_such.py", "--topology", "cpu"], "does not exist"),
    (["compile", "--config", TINY_SFT, "--topology", "cpu", "--config.no_such=1"], "no field"),
    (["compile", "--config", TINY_SFT, "--topology", "v9z:2x2"], "unknown topology"),
    (["profile", "--config", TINY_SFT, "--stage", "sft", "--steps", "0"], "--steps=0: expected"),
    (["profile", "--config", TINY_SFT, "--stage", "sft", "--from-workdir", "/no/such/run"],
     "--from-workdir /no/such/run: no such directory"),
])
def test_user_errors_are_one_line_exit_2(argv, phrase, capsys):
    assert cli.main(argv) == errors.EXIT_USER_ERROR == 2
    assert phrase in _error_line(capsys)


def _fake_report(fits: bool) -> dict:
    row = {"fits": fits, "peak_bytes_per_device": 3 * 2**30,
           "largest_buffers": [{"name": "state.params", "shape": (1024, 1024), "bytes": 2**30}]}
    return {"topology": "cpu", "hbm_bytes_per_device": 2**30, "stages": {"sft": {"train": row}}}


@pytest.mark.parametrize("fits, code", [(True, 0), (False, 4)])
def test_compile_exit_code_says_whether_every_step_fits(fits, code, capsys, monkeypatch):
    """``compile_report`` stands in for XLA (its real verdicts: tests/e2e/test_compile.py)."""
    monkeypatch.setattr(aot, "compile_report", lambda cfg, topology, stage, **kw: _fake_report(fits))
    monkeypatch.setattr(aot, "format_table", lambda report: "the table")
    assert cli.main(["compile", "--config", TINY_SFT, "--topology", "cpu"]) == code
    captured = capsys.readouterr()
    assert "the table" in captured.out
    if fits:
        assert "rlhf-jax: error" not in captured.err
    else:
        assert code == errors.EXIT_DOES_NOT_FIT
        assert captured.err == ("rlhf-jax: error: sft/train does not fit on cpu: needs 3.00 GiB "
                                "per device, 1.00 GiB available; largest buffers: state.params "
                                "(1024, 1024) 1.00 GiB\n")


@pytest.mark.parametrize("raised, code", [
    (errors.NonFiniteError("sft: train/loss is nan at step 3"), 3),
    (errors.Preempted(signal.SIGINT), 130),
    (errors.Preempted(signal.SIGTERM), 143),
    (errors.ConfigError("sft.train.steps=0: expected > 0"), 2),
])
def test_how_a_run_ends_is_its_exit_code(raised, code, capsys, monkeypatch):
    def stage(args, overrides):
        raise raised
    monkeypatch.setattr(cli, "_main", stage)
    assert cli.main(["sft", "--config", TINY_SFT, "--workdir", "w"]) == code
    line = capsys.readouterr().err.strip()
    assert line.startswith("rlhf-jax: ") and "\n" not in line and str(raised) in line


def test_an_internal_error_keeps_its_traceback(monkeypatch):
    def stage(args, overrides):
        raise RuntimeError("a bug")
    monkeypatch.setattr(cli, "_main", stage)
    with pytest.raises(RuntimeError, match="a bug"):     # the interpreter exits 1
        cli.main(["sft", "--config", TINY_SFT, "--workdir", "w"])


def test_help_lists_every_exit_code(capsys):
    assert [code for code, _ in errors.EXIT_CODES] == [0, 1, 2, 3, 4, 130, 143]
    assert (errors.EXIT_SIGINT, errors.EXIT_SIGTERM) == (errors.Preempted(signal.SIGINT).exit_code,
                                                         errors.Preempted(signal.SIGTERM).exit_code)
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    epilog = capsys.readouterr().out.split("exit codes:\n")[1]
    listed = [int(line.split()[0]) for line in epilog.splitlines() if line[2:3].isdigit()]
    assert listed == [code for code, _ in errors.EXIT_CODES]


# --- --tracker ----------------------------------------------------------------------------------

def _trackers(cfg) -> list[str]:
    """The tracker of every config dict that has one, searched like set_stage_field."""
    if "tracker" in cfg:
        return [cfg.tracker]
    return [t for v in cfg.values() if isinstance(v, ml_collections.ConfigDict)
            for t in _trackers(v)]


@pytest.mark.parametrize("command, config, stages", [
    ("sft", TINY_SFT, 1), ("pipeline", PIPELINE, 5), ("sweep", SWEEP, 5)])
def test_tracker_sets_every_stage(command, config, stages):
    default = cli._train_config(*parse(command, "--config", config))
    assert set(_trackers(default)) == {"tensorboard"}
    for tracker in cli.TRACKERS:
        cfg = cli._train_config(*parse(command, "--config", config, "--tracker", tracker,
                                       "--profile-steps", "2:3"))
        trackers = _trackers(cfg if command != "sweep" else cfg.base)
        assert len(trackers) >= stages and set(trackers) == {tracker}
        assert "2:3" in str(cfg)


# --- sample --chat ------------------------------------------------------------------------------

VOCAB = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, "user": 4, "says": 5, "hello": 6,
         "assistant": 7}


def _tokenizer(template: str | None) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>",
                                        bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = template
    return tokenizer


def test_sample_chat_renders_prompts_with_the_chat_template():
    template = ("{% for m in messages %}{{ m['role'] }} says {{ m['content'] }} {% endfor %}"
                "{% if add_generation_prompt %}assistant says{% endif %}")
    tokenizer = _tokenizer(template)
    args = SimpleNamespace(prompt=["hello"], chat=True, checkpoint="m")
    rows = cli._sample_prompts(args, tokenizer)
    # "user says hello assistant says": what the sampler is given (generate_texts reads the
    # rows as prompt_token_counts does)
    assert prompt_token_counts(tokenizer, rows, 16) == [5]
    assert prompt_token_counts(tokenizer, cli._sample_prompts(
        SimpleNamespace(prompt=["hello"], chat=False, checkpoint="m"), tokenizer), 16) == [1]


def test_sample_chat_without_a_template_is_a_user_error():
    args = SimpleNamespace(prompt=["hello"], chat=True, checkpoint="runs/x/model")
    with pytest.raises(errors.UserError, match="runs/x/model has no chat template") as e:
        cli._sample_prompts(args, _tokenizer(None))
    assert "\n" not in str(e.value)


# --- convert ------------------------------------------------------------------------------------

def test_convert_passes_dtype_and_shard_size_to_jax_to_hf(monkeypatch, capsys):
    """The flags reach rlhf_jax.convert (what it writes with them: tests/unit/test_hf.py)."""
    from rlhf_jax import convert
    calls = []
    monkeypatch.setattr(convert, "orbax_to_hf", lambda src, dst, **kw: calls.append(kw) or dst)
    assert cli.main(["convert", "jax-to-hf", "runs/a/model", "out", "--dtype", "bfloat16",
                     "--max_shard_size", "500MB", "--overwrite"]) == 0
    assert cli.main(["convert", "jax-to-hf", "runs/a/model", "out"]) == 0
    assert calls == [dict(lora_dir=None, overwrite=True, dtype="bfloat16", max_shard_size="500MB"),
                     dict(lora_dir=None, overwrite=False, dtype="float32", max_shard_size="2GB")]
    assert capsys.readouterr().out == "out\nout\n"
