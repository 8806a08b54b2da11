"""``rlhf-jax <command>``: parse flags, load an experiments/ config, call a stage.

Training commands take ``--config experiments/<file>.py[:arg]``, ``--workdir DIR`` (their output)
and any number of ``--config.a.b=value`` overrides (typed like the value they replace); ``eval``
and ``profile`` read a finished run with ``--from-workdir DIR``. Run
``rlhf-jax <command> --help`` for the options of one command, and
``rlhf-jax <command> --config FILE --show-config`` to print the resolved config.

Flags are spelled with dashes (``--max-new-tokens``); the underscore spelling
(``--max_new_tokens``) is accepted too. ``--log-level`` and ``--debug`` go before or after the
command. Overrides keep the config's field names: ``--config.train.batch_size=8``.

Multi-host: run the same command on every host. On a Cloud TPU pod nothing else is needed;
elsewhere add ``--coordinator-address HOST:PORT --num-processes N --process-id I``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence

from rlhf_jax import registry, storage

TRAIN_COMMANDS: dict[str, tuple[str, str]] = {
    # command: (module:function, one-line help); a stage's from rlhf_jax.registry.ENGINES
    **{name: (registry.ENGINES[name].train, registry.ENGINES[name].help)
       for name in registry.COMMANDS},
    "pipeline": ("rlhf_jax.pipeline:run",
                 "the whole method: world, pretrain, SFT, comparisons, RM, PPO, PPO-ptx, eval "
                 "(finished stages are skipped, so a killed run continues)"),
    "sweep": ("rlhf_jax.sweep:run",
              "many pipeline points from one config (ptx or KL coefficient, episodes, seeds, "
              "sizes, RM batching, labeler groups); shared stages train once, points reuse them"),
}

EPILOG = """\
config overrides:
  --config.a.b=value    set field a.b of the loaded config (type-checked against the current
                        value; tuples as '(1,2,4)', quoted for the shell; booleans as true/false)
examples:
  rlhf-jax sft --config experiments/tiny_sft.py --workdir runs/sft --config.train.steps=100
  rlhf-jax rm --config experiments/tiny_rm.py --workdir runs/rm --config.init_from=runs/sft/model
"""

TRACKERS = ("tensorboard", "wandb", "none")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _exit_codes_text() -> str:
    import textwrap
    from rlhf_jax import errors
    return "exit codes:\n" + "\n".join(
        textwrap.fill(meaning, 96, initial_indent=f"  {code:<4}", subsequent_indent=" " * 6)
        for code, meaning in errors.EXIT_CODES)


def _dashed(option: str) -> str:
    return "--" + option[2:].replace("_", "-") if option.startswith("--") else option


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's conventions: every long flag shown with dashes and accepted with
    underscores as well, and a usage mistake reported as a UserError (one line, exit 2) instead
    of argparse's usage text."""

    def canonicalize(self) -> None:
        """Spell every flag with dashes, those other modules define (distributed's) included."""
        for action in self._actions:
            action.option_strings = list(dict.fromkeys(map(_dashed, action.option_strings)))
        # Shared with the parser's argument groups: refilled in place.
        self._option_string_actions.clear()
        self._option_string_actions.update(
            {option: action for action in self._actions for option in action.option_strings})

    def _respelled(self, args: Sequence[str]) -> list[str]:
        """``--a_b[=v]`` as ``--a-b[=v]`` where that spells (or abbreviates) one of this parser's
        flags; overrides and whatever follows ``--`` are left as they are."""
        out = list(args)
        for i, arg in enumerate(out):
            if arg == "--":
                break
            if not arg.startswith("--") or "_" not in arg or arg.startswith("--config."):
                continue
            name, eq, value = arg.partition("=")
            dashed = _dashed(name)
            if any(option.startswith(dashed) for option in self._option_string_actions):
                out[i] = dashed + eq + value
        return out

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else args
        return super().parse_known_args(self._respelled(args), namespace)

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            # Unknown flags after a command are the command's: name its --help, not ours.
            commands = getattr(self, "commands", {})
            commands.get(getattr(parsed, "command", None), self).error(
                f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def error(self, message: str):
        from rlhf_jax.errors import UserError
        command = self.prog.partition(" ")[2]
        raise UserError(f"{command + ': ' if command else ''}{message}; see `{self.prog} --help`")


def _call(target: str) -> Callable:
    return registry.load(target)


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``--config.x=y`` (or ``--config.x y``) from the ordinary flags."""
    rest, overrides = [], []
    i = 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        if arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" not in body:
                if i + 1 >= len(argv):
                    from rlhf_jax.errors import UserError
                    raise UserError(f"{arg} needs a value (--config.key=value)")
                body = f"{body}={argv[i + 1]}"
                i += 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


# command -> its default config's function in rlhf_jax/config.py
DEFAULT_CONFIGS = {name: registry.ENGINES[name].config.partition(":")[2]
                   for name in registry.COMMANDS}


def _config_fields(command: str) -> str:
    """Every field of a stage's default config with its default value (for --help)."""
    if command == "sweep":
        return ("sweep config fields: base (a pipeline config), shared, stages, models, points, "
                "x; see rlhf_jax/sweep.py and experiments/sweep_*.py. Override the pipeline with "
                "--config.base.<field>=value\n")
    if command not in DEFAULT_CONFIGS:
        return ("config fields: see experiments/instructgpt_tiny.py (every stage section is a "
                "full stage config; `rlhf-jax sft|rm|ppo --help` lists their fields)\n")
    from rlhf_jax import config
    cfg = getattr(config, DEFAULT_CONFIGS[command])()
    lines = [f"config fields and defaults (rlhf_jax/config.py:{DEFAULT_CONFIGS[command]} "
             "explains each; set with --config.<field>=value):"]
    for key, value in sorted(cfg.to_dict().items()):
        if isinstance(value, dict):
            lines += [f"  {key}.{k} = {v!r}" for k, v in sorted(_flatten(value).items())]
        else:
            lines.append(f"  {key} = {value!r}")
    return "\n".join(lines) + "\n"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _add_global_flags(parser: argparse.ArgumentParser, default: bool) -> None:
    """``--log-level`` and ``--debug``, before the command (``default``: their defaults) and
    after it (no defaults, so that an absent flag keeps the value given before the command)."""
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, metavar="LEVEL",
                        default="INFO" if default else argparse.SUPPRESS,
                        help=f"python logging level: {', '.join(LOG_LEVELS)} (default INFO)")
    parser.add_argument("--debug", action="store_true",
                        default=False if default else argparse.SUPPRESS,
                        help="show the traceback of an input error instead of one line")


def _run_flags() -> argparse.ArgumentParser:
    """Flags every command takes: the multi-host runtime, logging and error reporting."""
    from rlhf_jax import distributed
    common = argparse.ArgumentParser(add_help=False)
    _add_global_flags(common, default=False)
    distributed.add_arguments(common)
    return common


def _add_train_parser(sub, name: str, help_text: str, parents: list) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text, parents=parents,
                       epilog=EPILOG + "\n" + _config_fields(name),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True,
                   help="experiment config file defining get_config(), optionally FILE.py:ARG")
    p.add_argument("--workdir", required=False,
                   help="output directory: metrics.jsonl, tb/, checkpoints/, model/ (required "
                        "unless --show-config)")
    p.add_argument("--show-config", action="store_true",
                   help="print the resolved config (after overrides and these flags) and exit, "
                        "training nothing")
    p.add_argument("--tracker", choices=TRACKERS, default=None,
                   help="where metrics go besides <workdir>/metrics.jsonl: tensorboard "
                        "(<workdir>/tb), wandb (offline unless a W&B key is set) or none; sets "
                        "the config's `tracker` (a pipeline or sweep: every stage's; default: "
                        "the config's, tensorboard)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume from checkpoints made with other hyperparameters (otherwise an "
                        "error names the fields that differ)")
    p.add_argument("--profile-steps", default="", metavar="A:B",
                   help="write an XProf trace of steps (PPO: iterations) A .. B-1 to "
                        "<workdir>/profile (a pipeline or sweep: every stage's, in its own "
                        "directory), with each phase named; open it with TensorBoard's profile "
                        "plugin or xprof")
    p.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help="persist compiled steps in DIR and reuse them in any later run of the "
                        "same shapes (default: $RLHF_JAX_CACHE, else "
                        "$XDG_CACHE_HOME/rlhf_jax/jax_cache or ~/.cache/rlhf_jax/jax_cache; "
                        "'none' disables)")


def set_stage_field(cfg, field: str, value) -> None:
    """Set ``field`` on a stage's config, on every stage section of a pipeline's, or on those
    of a sweep's base pipeline: every config dict that has the field, searched from the top."""
    import ml_collections
    if field in cfg:
        setattr(cfg, field, value)
        return
    for section in cfg.values():
        if isinstance(section, ml_collections.ConfigDict):
            set_stage_field(section, field, value)


def default_compilation_cache() -> str:
    """Where compiled steps persist by default: one cache per user, so a re-run in a new
    workdir, a sweep's points and the pipeline's twin stages (SFT / SFT-ptx, PPO / PPO-ptx)
    load executables instead of compiling them again."""
    if os.environ.get("RLHF_JAX_CACHE"):
        return os.environ["RLHF_JAX_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rlhf_jax", "jax_cache")


def version() -> str:
    """The installed distribution's version; the package's own where it is not installed."""
    from importlib import metadata
    try:
        return metadata.version("rlhf_jax")
    except metadata.PackageNotFoundError:
        from rlhf_jax import __version__
        return __version__


def build_parser() -> _Parser:
    parser = _Parser(prog="rlhf-jax", description=__doc__, epilog=_exit_codes_text(),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"rlhf-jax {version()}")
    _add_global_flags(parser, default=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parents = [_run_flags()]
    for name, (_, help_text) in TRAIN_COMMANDS.items():
        _add_train_parser(sub, name, help_text, parents)

    ev = sub.add_parser(
        "eval", parents=parents, help="evaluate every model of a pipeline workdir (win rates, scores, KL, capability)",
        description="Re-run the evaluation of a finished (or partly finished) pipeline workdir: "
                    "win rate against SFT judged by training and by held-out labelers with 95%% "
                    "CIs, gold and RM scores, KL to SFT, capability evals, RM pair accuracy. "
                    "Writes results.json, results.md and plots into the workdir.")
    ev.add_argument("--from-workdir", "--workdir", dest="from_workdir", required=True,
                    metavar="DIR", help="the pipeline workdir to evaluate (its report is "
                                        "written there; --workdir is the old name)")
    ev.add_argument("--config", default=None,
                    help="pipeline config (default: the config_pipeline.json the run saved)")

    sample = sub.add_parser(
        "sample", parents=parents, help="sample responses from a model directory",
        description="Sample from a model directory (a stage output such as runs/tiny/ppo/model, "
                    "or a transformers checkpoint directory) with the jitted KV-cache sampler.")
    sample.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="model directory (a stage's <workdir>/model, a transformers "
                             "checkpoint), or a Hub id (gpt2, org/name) in the local Hugging Face "
                             "cache")
    sample.add_argument("--prompt", action="append", required=True,
                        help="prompt text (repeat the flag for several prompts)")
    sample.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (32)")
    sample.add_argument("--max-prompt-len", type=int, default=64,
                        help="prompt tokens kept (left-truncated; 64)")
    sample.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (1.0)")
    sample.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    sample.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    sample.add_argument("--greedy", action="store_true", help="argmax decoding")
    sample.add_argument("--num-samples", type=int, default=1, help="samples per prompt (1)")
    sample.add_argument("--seed", type=int, default=0, help="PRNG seed (0)")
    sample.add_argument("--chat", action="store_true",
                        help="send each prompt as a user message through the tokenizer's chat "
                             "template (a chat model's own format; the tokenizer must have one)")

    comp = sub.add_parser(
        "compile", parents=parents, help="compile every step of a stage ahead of time for a TPU topology (fits?)",
        description="Lower and compile each jitted step of the chosen stage(s) for a TPU topology "
                    "on this machine (no TPU needed: `pip install -e \".[tpu]\"`, "
                    "JAX_PLATFORMS=cpu), from abstract shapes only: no weights, no data. Reports "
                    "per step the peak bytes per device against the chip's HBM, FLOPs per step "
                    "(loop trip counts included), compile seconds, and an analytic step time and "
                    "MFU at the chip's peak. Exits 4 naming the step and its largest buffers when "
                    "a step does not fit (2 for a bad config or topology).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  JAX_PLATFORMS=cpu rlhf-jax compile --config experiments/llama3_8b.py "
               "--topology v5p:4x4x4 --stage all --out r.json")
    comp.add_argument("--config", required=True,
                      help="experiment config: a pipeline-style file with sft/rm/ppo sections, "
                           "or one stage's config")
    comp.add_argument("--topology", required=True,
                      help="TPU topology name, e.g. v5e:2x2, v5e:4x4, v5p:4x4x4, v6e:8x8; "
                           "'cpu' compiles for this machine's devices instead")
    comp.add_argument("--stage", default="all", choices=[*registry.ENGINE_ORDER, "all"],
                      help="which stage's steps to compile (default all: sft, rm, ppo, and dpo "
                           "when the config's methods name it or it is a DPO config); GRPO / "
                           "RLOO are ppo with --config.ppo.ppo.advantage=grpo|rloo")
    comp.add_argument("--out", default=None, help="write the JSON report here")

    prof = sub.add_parser(
        "profile", parents=parents, help="time a stage's compiled steps on this machine (FLOPs, memory, MFU, trace)",
        description="Build a stage's steps from its config, fill them with random weights of the "
                    "config's shapes (no data needed) or a workdir's checkpoints, and report "
                    "compile time, FLOPs and bytes, per-device memory, median step time after "
                    "warm-up, achieved FLOP/s, MFU against a matmul peak measured in the same "
                    "run, and tokens/s; PPO is broken down into rollout, experience, update "
                    "(policy), value_update and ptx (no value_update with ppo.advantage grpo / "
                    "rloo), DPO into ref_logps, update and eval. --trace writes a jax.profiler trace (TensorBoard profile plugin, "
                    "Perfetto) with the phases named.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  rlhf-jax profile --config experiments/instructgpt_tiny.py --stage ppo "
               "--out p.json --trace runs/trace")
    prof.add_argument("--config", required=True, help="experiment config (pipeline-style or one stage's)")
    prof.add_argument("--stage", default="ppo", choices=list(registry.ENGINE_ORDER),
                      help="which stage to profile (default ppo)")
    prof.add_argument("--steps", type=int, default=5, help="timed calls per step after warm-up (5)")
    prof.add_argument("--warmup", type=int, default=1, help="untimed calls per step first (1)")
    prof.add_argument("--phases", default=None, metavar="A,B",
                      help="profile only these steps, e.g. update,value_update (default: all)")
    prof.add_argument("--from-workdir", "--workdir", dest="from_workdir", default=None,
                      metavar="DIR", help="a pipeline workdir: profile with its trained models "
                                          "instead of random weights (--workdir is the old name)")
    prof.add_argument("--trace", default=None, metavar="DIR", help="write a jax.profiler trace to DIR")
    prof.add_argument("--out", default=None, help="write the JSON report here")

    conv = sub.add_parser(
        "convert", parents=parents, help="convert checkpoints between transformers (safetensors) and rlhf_jax",
        description="Convert a local transformers checkpoint directory (config.json + "
                    "*.safetensors + tokenizer) to an rlhf_jax model directory (orbax params + "
                    "model_config.json + tokenizer), or back. Reward / value models (scalar "
                    "head) travel as *ForSequenceClassification (num_labels=1); jax-to-hf folds "
                    "the stored reward normalization into the exported score. A LoRA run's "
                    "adapters (--lora) are merged into their base model: jax-to-hf exports "
                    "the merged model, merge-lora stores it as an rlhf_jax dir. Nothing is "
                    "downloaded and no pickled file is ever read. Example: rlhf-jax convert "
                    "jax-to-hf runs/sft/model hf_out --lora runs/ppo/lora")
    conv.add_argument("direction", choices=["hf-to-jax", "jax-to-hf", "merge-lora"],
                      help="hf-to-jax: transformers dir -> rlhf_jax dir; jax-to-hf: the reverse; "
                           "merge-lora: base model + --lora adapters -> rlhf_jax dir")
    conv.add_argument("src", help="source directory (with --lora: the base model the LoRA run "
                                  "started from, rlhf_jax or transformers)")
    conv.add_argument("dst", help="destination directory (created; a non-empty one is refused "
                                  "unless --overwrite)")
    conv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="parameter dtype of what is written: the rlhf_jax copy (hf-to-jax) or "
                           "the safetensors files (jax-to-hf); default float32")
    conv.add_argument("--max-shard-size", default="2GB", metavar="SIZE",
                      help="jax-to-hf: largest safetensors file, e.g. 500MB, 2GB (default 2GB); "
                           "larger models are split into shards with an index")
    conv.add_argument("--lora", default=None, metavar="DIR",
                      help="a LoRA run's adapters (<ppo workdir>/lora: adapters/ + lora.json) "
                           "to merge into src, with lora.json's scale (jax-to-hf, merge-lora)")
    conv.add_argument("--overwrite", action="store_true",
                      help="replace dst whole if it already holds anything (written beside it, "
                           "then swapped in: a kill leaves the old or the new, never a mix)")
    parser.commands = sub.choices
    for each in (parser, *sub.choices.values()):
        each.canonicalize()
    return parser


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


# What a user can fix, reported in one line (exit 2); anything else keeps its traceback.
_INPUT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                 FileExistsError)


class _FailedWriteEchoes(logging.Filter):
    """Quiets what background writers print after a write fails: each of orbax's pending array
    writes logs its disk-full error with a traceback (absl, asyncio: dozens of them), each late
    TensorStore callback into orbax's closed event loop prints an unraisable "Event loop is
    closed" (more at interpreter exit), and a writer thread (TensorBoard's) dies with its
    traceback. The failure itself still reaches ``main``, which says it in one line; ``hidden``
    counts the disk-full reports dropped, so a run that ends without that line says so."""

    LOGGERS = ("absl", "asyncio")

    def __init__(self) -> None:
        super().__init__()
        self.hidden = 0
        self._previous_hook = sys.unraisablehook
        self._previous_thread_hook = threading.excepthook

    def filter(self, record: logging.LogRecord) -> bool:
        from rlhf_jax import errors
        try:
            message = record.getMessage()
        except Exception:       # a malformed record is the logging module's to report
            return True
        if errors.disk_full(record.exc_info[1] if record.exc_info else None) or \
                errors.disk_full(Exception(message)):
            self.hidden += 1
            return False
        return True

    def _unraisable(self, unraisable) -> None:
        error = unraisable.exc_value
        if (isinstance(error, RuntimeError) and str(error) == "Event loop is closed") or (
                isinstance(error, ImportError) and "Python is likely shutting down" in str(error)):
            return
        self._previous_hook(unraisable)

    def _thread_died(self, args) -> None:
        from rlhf_jax import errors
        if errors.disk_full(args.exc_value):
            self.hidden += 1
            return
        self._previous_thread_hook(args)

    def say_hidden(self) -> None:
        """For a run that did not end on the full disk: what was hidden, in one line."""
        if self.hidden:
            print(f"rlhf-jax: warning: {self.hidden} reports of background writes that failed "
                  "on a full disk were hidden; some output may be missing (--debug shows them)",
                  file=sys.stderr)

    def install(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)
        sys.unraisablehook = self._unraisable
        threading.excepthook = self._thread_died

    def remove(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)
        if sys.unraisablehook == self._unraisable:
            sys.unraisablehook = self._previous_hook
        if threading.excepthook == self._thread_died:
            threading.excepthook = self._previous_thread_hook


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; maps the errors of rlhf_jax.errors to one line and an exit code."""
    from rlhf_jax import errors
    # Called as the program (the console script): the process ends with this command, and the
    # writers' echoes of a failed write go on until interpreter exit.
    whole_process = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    echoes = _FailedWriteEchoes()
    if not debug:
        echoes.install()
    args = None
    try:
        rest, overrides = _split_overrides(argv)
        args = build_parser().parse_args(rest)
        code = _main(args, overrides)
    except errors.Preempted as e:
        echoes.say_hidden()
        print(f"rlhf-jax: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except Exception as e:
        disk_full = errors.disk_full(e)
        if debug:
            raise
        if disk_full is not None:
            print(f"rlhf-jax: error: {_disk_full_message(args, *disk_full, e)}", file=sys.stderr)
            return errors.EXIT_USER_ERROR
        echoes.say_hidden()
        if not isinstance(e, (errors.UserError, *_INPUT_ERRORS)):
            raise
        print(f"rlhf-jax: error: {_one_line(e)}", file=sys.stderr)
        return getattr(e, "exit_code", errors.EXIT_USER_ERROR)
    finally:
        if not whole_process:
            echoes.remove()
    echoes.say_hidden()
    return code


def _disk_full_message(args: argparse.Namespace | None, error: BaseException,
                       path: str | None, raised: BaseException | None = None) -> str:
    """``no space left on device writing <path>; <what is intact>; <what to do>``: ``error``
    says the disk is full, ``raised`` (what reached ``main``) what was being done where the
    path is unknown."""
    import errno
    quota = (getattr(error, "errno", None) == errno.EDQUOT
             or os.strerror(errno.EDQUOT) in str(error))
    what = "no space left on device" + (" (disk quota exceeded)" if quota else "")
    if path:
        # orbax writes a step into "<step>.orbax-checkpoint-tmp/..."; its inner names say nothing.
        parts = path.split("/")
        tmp = next((i for i, part in enumerate(parts) if part.endswith(".orbax-checkpoint-tmp")),
                   None)
        what += " writing " + ("/".join(parts[:tmp + 1]) if tmp is not None else path)
    elif raised is not None:
        what += f" ({_one_line(raised)})"
    return f"{what}; {_intact(args, path)}"


def _intact(args: argparse.Namespace | None, path: str | None) -> str:
    """What a full disk left intact, read from the workdir: the finished stages of a pipeline
    and the committed checkpoints of the stage that was writing."""
    command = getattr(args, "command", None)
    workdir = getattr(args, "workdir", None)
    if command == "eval":
        return ("the previous report, if any, is intact (each file is replaced whole); free "
                "space and rerun `rlhf-jax eval`")
    if command not in TRAIN_COMMANDS or not workdir:
        return "free space and rerun the same command"
    resume = "free space and rerun the same command to resume"
    try:
        workdir = storage.absolute(workdir)
        parts = []
        if command == "pipeline":
            done = [stage for stage in registry.ALL_STAGES
                    if storage.exists(storage.join(workdir, stage, "DONE"))]
            parts.append(f"finished stages ({', '.join(done)}) are intact" if done
                         else "no stage had finished")
        checkpoints = _checkpoint_dir(command, workdir, path)
        if checkpoints is not None:
            steps = sorted(int(name) for name in storage.listdir(checkpoints) if name.isdigit()) \
                if storage.isdir(checkpoints) else []
            parts.append(f"checkpoints up to step {steps[-1]} in {checkpoints} are intact"
                         if steps else f"no checkpoint in {checkpoints} was committed yet")
    except OSError:     # the full disk may fail these reads as well
        parts = []
    return "; ".join((parts or ["committed checkpoints and finished stages are intact"])
                     + [resume])


def _checkpoint_dir(command: str, workdir: str, path: str | None) -> str | None:
    """The checkpoints directory of the stage that was writing ``path``: the one ``path`` is in,
    else a stage command's own, else (a pipeline) that of the stage directory ``path`` is in."""
    if path and "checkpoints" in path.split("/"):
        parts = path.split("/")
        return "/".join(parts[:parts.index("checkpoints") + 1])
    if command in registry.COMMANDS:
        return storage.join(workdir, "checkpoints")
    prefix = workdir.rstrip("/") + "/"
    if command == "pipeline" and path and path.startswith(prefix):
        stage = path[len(prefix):].split("/")[0]
        if stage in registry.ALL_STAGES:
            return storage.join(workdir, stage, "checkpoints")
    return None


def _main(args: argparse.Namespace, overrides: list[str]) -> int:
    from rlhf_jax import distributed, errors, runtime
    if args.command in TRAIN_COMMANDS:
        # Printing a config needs no device and no other host: it never joins the job.
        if args.show_config:
            print(_train_config(args, overrides))
            return 0
        if not args.workdir:
            raise errors.UserError(f"{args.command}: --workdir DIR is required (the run's "
                                   "output directory; only --show-config runs without one)")
    runtime.configure_logging(args.log_level)      # so that joining the job is logged
    # Before anything touches a device: every host joins the same runtime.
    distributed.initialize_from_args(args)
    runtime.configure_logging(args.log_level)      # now with the process index known

    if args.command == "convert":
        return _convert(args)

    if args.command == "sample":
        return _sample(args)
    if args.command in ("compile", "profile"):
        module = __import__(f"rlhf_jax.{args.command}", fromlist=["run"])
        return module.run(args, overrides)
    from rlhf_jax.config import apply_overrides, load_config
    if args.command == "eval":
        from rlhf_jax.pipeline import evaluate_workdir
        saved = storage.join(args.from_workdir, "config_pipeline.json")
        if args.config:
            cfg = apply_overrides(load_config(args.config), overrides)
        elif storage.exists(saved):
            import ml_collections
            cfg = apply_overrides(ml_collections.ConfigDict(json.loads(storage.read_text(saved))),
                                  overrides)
        else:
            raise errors.UserError(
                f"{saved}: not found; `rlhf-jax eval` reads the config the pipeline saved there "
                "(is --from-workdir a pipeline workdir?); pass the pipeline's config with "
                "--config FILE")
        evaluate_workdir(cfg, args.from_workdir)
        return 0
    cfg = _train_config(args, overrides)
    from rlhf_jax import validate
    if args.command == "sweep":
        from rlhf_jax import sweep
        sweep.check(cfg)     # the base and every point's pipeline config
    else:
        validate.check(cfg)
    if args.allow_config_change:
        _allow_config_change(cfg.base if args.command == "sweep" else cfg)
    storage.makedirs(args.workdir)
    cache = args.compilation_cache or default_compilation_cache()
    if cache and cache.lower() != "none":
        from rlhf_jax.runtime import enable_compilation_cache
        enable_compilation_cache(cache)
    import jax
    if jax.process_index() == 0:
        storage.write_text(storage.join(args.workdir, f"config_{args.command}.json"),
                           json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str))
    result = _call(TRAIN_COMMANDS[args.command][0])(cfg, args.workdir)
    if args.command not in ("pipeline", "sweep"):   # those print their own tables
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0


def _train_config(args: argparse.Namespace, overrides: list[str]):
    """A training command's config: the file, its overrides, then the flags that set fields."""
    from rlhf_jax.config import apply_overrides, load_config
    cfg = apply_overrides(load_config(args.config), overrides)
    if args.profile_steps:
        set_stage_field(cfg, "profile_steps", args.profile_steps)
    if args.tracker:
        set_stage_field(cfg, "tracker", args.tracker)
    return cfg


def _convert(args: argparse.Namespace) -> int:
    from rlhf_jax import convert
    from rlhf_jax.errors import UserError
    if args.direction == "hf-to-jax":
        if args.lora:
            raise UserError("convert hf-to-jax: --lora applies to jax-to-hf and merge-lora "
                            "(whose SRC may be a transformers directory)")
        print(convert.hf_to_orbax(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite))
    elif args.direction == "jax-to-hf":
        print(convert.orbax_to_hf(args.src, args.dst, lora_dir=args.lora,
                                  overwrite=args.overwrite, dtype=args.dtype,
                                  max_shard_size=args.max_shard_size))
    else:
        if not args.lora:
            raise UserError("convert merge-lora: --lora DIR is required (a LoRA run's "
                            "adapters/ + lora.json, e.g. runs/ppo/lora)")
        print(convert.merge_lora(args.src, args.lora, args.dst, overwrite=args.overwrite))
    return 0


def _allow_config_change(cfg) -> None:
    """Set ``allow_config_change`` on the config and, for a pipeline, on every stage section."""
    sections = [cfg] + [cfg[k] for k in registry.DEFAULT_SECTIONS
                        if k in cfg and "policy_from" not in cfg]
    for section in sections:
        with section.unlocked():
            section.allow_config_change = True


def _check_sample_flags(args: argparse.Namespace) -> None:
    """The flags of `sample` that need no model to judge."""
    import math
    from rlhf_jax.errors import UserError
    for flag, value in (("--max-new-tokens", args.max_new_tokens),
                        ("--max-prompt-len", args.max_prompt_len),
                        ("--num-samples", args.num_samples)):
        if value < 1:
            raise UserError(f"sample: {flag}={value}: expected a positive integer")
    if args.top_k < 0:
        raise UserError(f"sample: --top-k={args.top_k}: expected an integer >= 0 (0 = off)")
    if not 0.0 < args.top_p <= 1.0:
        raise UserError(f"sample: --top-p={args.top_p}: expected a number in (0, 1] (1 = off)")
    if not args.greedy and not (math.isfinite(args.temperature) and args.temperature > 0):
        raise UserError(f"sample: --temperature={args.temperature}: expected a finite number > 0 "
                        "(--greedy for argmax decoding)")


def _check_sample_model(args: argparse.Namespace, model_cfg, counts: list[int]) -> None:
    """`sample`'s flags and prompts against the model's config (read without its weights)."""
    from rlhf_jax.errors import UserError
    where = f"--checkpoint {args.checkpoint}"
    if model_cfg.head != "lm":
        raise UserError(f"{where}: a model with a {model_cfg.head!r} head (a reward or value "
                        "model) scores text and cannot sample; expected a policy's model "
                        "directory (head 'lm'), e.g. <workdir>/sft/model")
    if args.top_k > model_cfg.vocab_size:
        raise UserError(f"sample: --top-k={args.top_k}: expected at most the model's vocab_size "
                        f"{model_cfg.vocab_size} ({where})")
    for number, (prompt, count) in enumerate(zip(args.prompt, counts), 1):
        if not count:
            raise UserError(f"sample: --prompt #{number} {prompt!r}: no tokens; expected text")
    longest, new = max(counts), args.max_new_tokens
    limit = model_cfg.max_position
    if longest + new > limit:
        fixes = [f"--max-new-tokens <= {limit - longest}"] if limit > longest else []
        fixes += [f"--max-prompt-len <= {limit - new}"] if limit > new else []
        raise UserError(
            f"sample: the longest prompt keeps {longest} tokens (--max-prompt-len="
            f"{args.max_prompt_len}) and --max-new-tokens={new}: {longest + new} positions, past "
            f"the model's max_position={limit} ({where}); "
            + (f"expected {' or '.join(fixes)}" if fixes else "expected a model with more positions"))


def _sample_prompts(args: argparse.Namespace, tokenizer) -> list:
    """``--prompt`` texts as the sampler reads them: plain text, or (``--chat``) one user
    message each, which the data layer renders with the tokenizer's chat template."""
    from rlhf_jax.errors import UserError
    if not args.chat:
        return list(args.prompt)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"sample --chat: the tokenizer of --checkpoint {args.checkpoint} has no "
                        "chat template; expected a chat model's directory (tokenizer_config.json "
                        "with a chat_template), or drop --chat to send the prompts as plain text")
    return [{"prompt": p, "prompt_messages": [{"role": "user", "content": p}]}
            for p in args.prompt]


def _sample(args: argparse.Namespace) -> int:
    from rlhf_jax.errors import UserError
    _check_sample_flags(args)
    from rlhf_jax.evaluation import generate_texts, prompt_token_counts
    from rlhf_jax.model_io import load_model, model_config_for_build
    from rlhf_jax.models.hf import load_tokenizer, resolve_model_path
    # A Hub id not in the local cache raises here, saying how to download it.
    if not storage.isdir(resolve_model_path(args.checkpoint)):
        raise UserError(f"--checkpoint {args.checkpoint}: no such directory; expected a model "
                        "directory (a stage's <workdir>/model, or a transformers checkpoint)")
    model_cfg = model_config_for_build(None, args.checkpoint)
    tokenizer = load_tokenizer(args.checkpoint)
    if tokenizer is None:
        raise UserError(f"--checkpoint {args.checkpoint}: no tokenizer saved beside the model")
    rows = _sample_prompts(args, tokenizer)
    _check_sample_model(args, model_cfg,
                        prompt_token_counts(tokenizer, rows, args.max_prompt_len))
    model, params, _, _ = load_model(args.checkpoint, None)
    prompts = [p for p in args.prompt for _ in range(args.num_samples)]
    rows = [row for row in rows for _ in range(args.num_samples)]
    out = generate_texts(model, params, tokenizer, rows, max_prompt_len=args.max_prompt_len,
                         max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, greedy=args.greedy, seed=args.seed,
                         batch_size=max(1, min(len(prompts), 64)))
    for prompt, text in zip(prompts, out["texts"]):
        print(json.dumps({"prompt": prompt, "response": text}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
