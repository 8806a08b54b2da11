"""Every config checked before any model loads or any step compiles.

``check(cfg)`` takes a stage config (``rlhf-jax sft|rm|dpo|ppo``) or a pipeline-style one and
raises one :class:`~rlhf_jax.errors.ConfigError` listing every problem found, each as
``<field>=<value>: expected <what>``:

* sizes: batch sizes, lengths, epochs, K, iteration counts positive (or >= 0 where 0 means
  "off" / "from the other field"); probabilities, rates and coefficients in range;
* enums: ``kl_controller``, ``rm.mode``, ``data.overlong``, ``optim.decay``, dtypes, ``arch``;
* divisibility: PPO's rollout batch by its minibatch, every batch by the mesh's batch
  parallelism (data x fsdp), the mesh by the number of devices;
* shapes the networks must hold: prompt + response (and ptx, eval) lengths against each
  network's ``max_position``: past it, position lookups read out of range and train to NaN;
* one vocabulary: policy, reference, reward and value networks (and the tokenizers saved beside
  them) must agree, since a token id means the same thing to all of them;
* data files that exist;
* a model to start from: ``init_from`` (or a tokenizer to size a random start), PPO's
  ``policy_from`` and ``reward_from``; LoRA ranks within the network's width.

Then, once the config holds together, the data: every row of every file the stage will read
is validated as the stage reads it (``rlhf_jax.data.formats``; a bad row raises its
:class:`~rlhf_jax.data.formats.DataError` naming the file and line), and there must be a
batch's worth of rows to train on after the validation split (PPO: a rollout's prompts).
Only the tokenizer-dependent checks (rows dropped by ``data.overlong='drop'``) come later.

Architectures are read from the config's model sections or from ``config.json`` /
``model_config.json`` of the directories it names: no weights are read.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import ml_collections

from rlhf_jax import storage
from rlhf_jax.config import stage_configs
from rlhf_jax.data.formats import DEFAULT_MAX_K, DataError
from rlhf_jax.errors import ConfigError
from rlhf_jax.registry import ADVANTAGES, DEFAULT_ENGINES, DEFAULT_SECTIONS, GROUP_ADVANTAGES

ENUMS = {
    "ppo.kl_controller": ("fixed", "adaptive"),
    "mode": ("kway", "shuffled_pairs"),
    "data.overlong": ("truncate", "drop"),
    "optim.decay": ("cosine", "constant"),
    "model_runtime.dtype": ("float32", "bfloat16"),
    "ppo.frozen_dtype": ("float32", "bfloat16"),
    "ppo.advantage": ADVANTAGES,
    "ppo.sampler.layout": ("decode", "train"),
    "ppo.sampler.dtype": ("compute", "float32", "bfloat16"),
    "data.format": ("demonstrations", "pretrain"),
    "model.arch": ("gpt2", "llama", "qwen2"),
}
PRETRAIN_OVERLONG = ("truncate", "chunk", "drop")


class _Problems:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.items: list[str] = []

    def add(self, field: str, value: Any, expected: str) -> None:
        self.items.append(f"{self.prefix}{field}={value!r}: expected {expected}")


def _get(cfg: Any, dotted: str, default: Any = None) -> Any:
    node = cfg
    for part in dotted.split("."):
        if node is None or not hasattr(node, "get") or part not in node:
            return default
        node = node[part]
    return node


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(p: _Problems, cfg: Any, field: str, ok: Callable[[Any], bool], expected: str) -> None:
    value = _get(cfg, field, _MISSING)
    if value is _MISSING or value is None:
        return
    try:
        good = ok(value)
    except TypeError:
        good = False
    if not good:
        p.add(field, value, expected)


_MISSING = object()
POSITIVE_INT = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                "a positive integer")
NON_NEGATIVE_INT = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                    "an integer >= 0")
NON_NEGATIVE = (lambda v: _number(v) and v >= 0, "a finite number >= 0")
POSITIVE = (lambda v: _number(v) and v > 0, "a finite number > 0")
UNIT_OPEN = (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)")
UNIT_CLOSED = (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]")


def _tracker(p: _Problems, cfg: Any) -> None:
    tracker = _get(cfg, "tracker", _MISSING)
    if tracker is not _MISSING:
        from rlhf_jax import tracking
        try:
            tracking.check(tracker)
        except ConfigError as error:
            p.items.append(p.prefix + str(error))


def _common(p: _Problems, cfg: Any) -> None:
    _tracker(p, cfg)
    spec = _get(cfg, "profile_steps", "")
    if spec:
        from rlhf_jax.metrics import parse_steps
        try:
            parse_steps(spec)
        except ConfigError:
            p.add("profile_steps", spec, "'A:B' with 0 <= A < B (steps A .. B-1)")
    for field, choices in ENUMS.items():
        value = _get(cfg, field, _MISSING)
        if value is _MISSING:
            continue
        if field == "data.overlong" and _get(cfg, "data.format") == "pretrain":
            choices = PRETRAIN_OVERLONG
        if value not in choices:
            p.add(field, value, "one of " + ", ".join(repr(c) for c in choices))
    for field in ("optim.lr", "ppo.lr", "ppo.value_lr"):
        _check(p, cfg, field, *NON_NEGATIVE)
    for field in ("optim.warmup_steps", "train.steps", "ppo.iterations", "ppo.warmup_iterations",
                  "train.logprob_chunk", "ppo.logprob_chunk", "ppo.top_k", "train.eval_every",
                  "ppo.sample_every", "ppo.checkpoint_every", "seed", "ppo.lora.rank", "ppo.value_lora.rank"):
        _check(p, cfg, field, *NON_NEGATIVE_INT)
    for field in ("train.batch_size", "data.max_prompt_len", "data.max_response_len",
                  "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                  "ppo.rollout_batch_size", "ppo.minibatch_size", "ppo.epochs",
                  "data.ptx_seq_len", "ppo.group_size"):
        _check(p, cfg, field, *POSITIVE_INT)
    _check(p, cfg, "train.epochs", *NON_NEGATIVE)
    for field in ("train.dropout", "data.valid_fraction", "data.pretrain_mix", "ppo.ema_decay"):
        _check(p, cfg, field, *UNIT_OPEN)
    for field in ("optim.final_fraction", "optim.warmup_start_fraction", "ppo.gamma", "ppo.lam"):
        _check(p, cfg, field, *UNIT_CLOSED)
    _check(p, cfg, "ppo.top_p", lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]")
    for field in ("ppo.temperature", "ppo.clip_eps", "ppo.kl_target", "ppo.kl_horizon"):
        _check(p, cfg, field, *POSITIVE)
    for field in ("ppo.kl_coef", "ppo.ptx_coef", "ppo.entropy_coef", "optim.grad_clip_norm",
                  "ppo.grad_clip_norm", "optim.weight_decay"):
        _check(p, cfg, field, *NON_NEGATIVE)
    _check(p, cfg, "data.pack", lambda v: isinstance(v, bool), "True or False")
    _check(p, cfg, "data.max_k", lambda v: isinstance(v, int) and v >= 2,
           "an integer >= 2 (a comparison ranks at least two completions)")
    if _get(cfg, "ppo.ptx_coef", 0) and _number(_get(cfg, "ppo.ptx_coef")):
        _check(p, cfg, "ppo.ptx_per_episode", *POSITIVE_INT)
    if "ppo" in cfg and not _get(cfg, "ppo.iterations"):
        _check(p, cfg, "ppo.total_episodes", *POSITIVE_INT)
    for section in ("ppo.lora", "ppo.value_lora"):
        if _get(cfg, f"{section}.rank", 0):
            _check(p, cfg, f"{section}.alpha", *POSITIVE)
            _check(p, cfg, f"{section}.targets", _lora_targets_ok,
                   "LoRA targets (q, k, v, o, fc_in, fc_out, gate, up, down, or attn / mlp / all)")
    if _get(cfg, "ppo.value_lora.rank", 0) and isinstance(_get(cfg, "ppo.value_lora.rank"), int):
        if _get(cfg, "ppo.advantage", "gae") != "gae":
            p.add("ppo.value_lora.rank", _get(cfg, "ppo.value_lora.rank"),
                  f"0 with ppo.advantage={_get(cfg, 'ppo.advantage')!r} (no value network)")
        elif _get(cfg, "value_from", "") not in ("", _get(cfg, "reward_from", "")):
            p.add("value_from", _get(cfg, "value_from"), "empty or reward_from with "
                  "ppo.value_lora.rank > 0 (the value's frozen base is the RM)")


def _lora_targets_ok(value: Any) -> bool:
    from rlhf_jax.models.lora import expand_targets
    try:
        return bool(expand_targets(value))
    except (ValueError, TypeError):
        return False


def _mesh_parallelism(p: _Problems, cfg: Any) -> int | None:
    """Batch parallelism (data x fsdp) of the stage's mesh on this run's devices."""
    from rlhf_jax.sharding import resolve_mesh_shape
    shape = _get(cfg, "mesh.shape")
    if shape is None:
        return None
    try:
        shape = tuple(int(s) for s in shape)
        n = jax.device_count()
        wanted = math.prod(shape)
        if -1 not in shape and 0 < wanted < n and jax.process_count() == 1:
            n = wanted      # make_mesh takes a sub-mesh on one host
        resolved = resolve_mesh_shape(shape, n)
    except (TypeError, ValueError):
        p.add("mesh.shape", shape, f"(data, fsdp, tensor) sizes whose product is this run's "
                                   f"{jax.device_count()} devices (-1: the rest)")
        return None
    if len(resolved) != 3:
        p.add("mesh.shape", shape, "three sizes (data, fsdp, tensor)")
        return None
    return resolved[0] * resolved[1]


def _divisible(p: _Problems, cfg: Any, par: int | None) -> None:
    rollout, minibatch = _get(cfg, "ppo.rollout_batch_size"), _get(cfg, "ppo.minibatch_size")
    if isinstance(rollout, int) and isinstance(minibatch, int) and minibatch > 0 and rollout % minibatch:
        p.add("ppo.rollout_batch_size", rollout,
              f"a multiple of ppo.minibatch_size={minibatch} (whole minibatches per epoch)")
    group, advantage = _get(cfg, "ppo.group_size"), _get(cfg, "ppo.advantage")
    if isinstance(rollout, int) and isinstance(group, int) and group > 0 and rollout % group:
        p.add("ppo.group_size", group, f"a divisor of ppo.rollout_batch_size={rollout} (whole "
                                       "groups of samples per prompt in a rollout)")
    if advantage in GROUP_ADVANTAGES and isinstance(group, int) and group == 1:
        p.add("ppo.group_size", group, f">= 2 with ppo.advantage={advantage!r} (the other "
                                       "samples of a prompt are each sample's baseline)")
    if advantage == "grpo" and _get(cfg, "ppo.kl_controller") == "adaptive":
        p.add("ppo.kl_controller", "adaptive", "'fixed' with ppo.advantage='grpo' (its KL is a "
                                                "loss term weighted by ppo.kl_coef)")
    if not par or par == 1:
        return
    sizes = {"train.batch_size": _get(cfg, "train.batch_size"),
             "ppo.rollout_batch_size": rollout, "ppo.minibatch_size": minibatch}
    if _get(cfg, "ppo.ptx_coef"):
        per = _get(cfg, "ppo.ptx_per_episode")
        if isinstance(per, int) and isinstance(minibatch, int):
            sizes["ppo.ptx_per_episode x ppo.minibatch_size"] = per * minibatch
    for field, value in sizes.items():
        if isinstance(value, int) and value > 0 and value % par:
            p.add(field, value, f"a multiple of the mesh's batch parallelism data x fsdp = {par}")


def _arch(source: str, section: Any, tokenizer_vocab: int | None = None):
    """(TransformerConfig or None, where it came from) without reading weights."""
    from rlhf_jax.model_io import model_config_for_build
    fields = dict(section or {})
    if not source and "vocab_size" not in fields and tokenizer_vocab:
        fields["vocab_size"] = tokenizer_vocab
    if not source and "vocab_size" not in fields:   # sized by a tokenizer we cannot see yet
        return None, ""
    return model_config_for_build(fields, source), source or "model section"


def _dir_problem(p: _Problems, field: str, path: str) -> bool:
    if not path:
        return False
    from rlhf_jax.models.hf import ModelNotFoundError, resolve_model_path
    try:
        if storage.isdir(resolve_model_path(path)):
            return False
    except ModelNotFoundError as e:      # a Hub id the local cache does not hold
        p.items.append(f"{p.prefix}{field}: {e}")
        return True
    p.add(field, path, "a model directory (ours, or a transformers checkpoint with config.json)")
    return True


def _tokenizer(path: str):
    from rlhf_jax.models.hf import ModelNotFoundError, has_tokenizer, load_tokenizer, \
        resolve_model_path
    try:
        path = resolve_model_path(path) if path else ""
    except ModelNotFoundError:           # _dir_problem reports it
        return None
    if not path or not storage.isdir(path) or not has_tokenizer(path):
        return None
    return load_tokenizer(path)


def _lengths(p: _Problems, cfg: Any, name: str, max_position: int) -> None:
    prompt, response = _get(cfg, "data.max_prompt_len"), _get(cfg, "data.max_response_len")
    if isinstance(prompt, int) and isinstance(response, int) and prompt + response > max_position:
        p.add("data.max_prompt_len + max_response_len", prompt + response,
              f"at most {name}'s max_position={max_position}")
    ptx = _get(cfg, "data.ptx_seq_len")
    if _get(cfg, "ppo.ptx_coef") and isinstance(ptx, int) and ptx > max_position:
        p.add("data.ptx_seq_len", ptx, f"at most {name}'s max_position={max_position}")


def _data_paths(p: _Problems, cfg: Any, fields: tuple[str, ...]) -> None:
    from rlhf_jax.data.sources import DATASET_SPECS, source_kind
    for field in fields:
        path = _get(cfg, field)
        if not isinstance(path, str) or not path:
            continue
        try:
            kind = source_kind(path)
        except ConfigError as e:
            p.items.append(f"{p.prefix}{field}: {e}")
            continue
        if kind in ("jsonl", "parquet") and not storage.isfile(path):
            p.add(field, path, f"an existing JSONL file or .parquet file (or {DATASET_SPECS})")


def _networks(p: _Problems, cfg: Any, kind: str) -> None:
    """Lengths against max_position and one vocabulary across the stage's networks."""
    if kind in ("sft", "rm", "dpo"):
        source = _get(cfg, "init_from") or ""
        if _dir_problem(p, "init_from", source):
            return
        tok = _tokenizer(source) or _tokenizer(_get(cfg, "tokenizer") or "")
        arch, where = _arch(source, _get(cfg, "model"), len(tok) if tok is not None else None)
        if arch is None and not _get(cfg, "tokenizer"):
            p.add("init_from", source, "a model directory (or tokenizer + model for a random "
                                       "start)")
            return
        nets = {"model": (arch, where, tok)}
        reference = _get(cfg, "reference_from") or ""
        if kind == "dpo" and reference and reference != source:
            if _dir_problem(p, "reference_from", reference):
                return
            nets["reference"] = (*_arch(reference, None), _tokenizer(reference))
    else:
        nets = {}
        sources = {"policy": _get(cfg, "policy_from") or "", "reward": _get(cfg, "reward_from") or ""}
        sources["value"] = _get(cfg, "value_from") or sources["reward"]
        sections = {"policy": _get(cfg, "policy_model"), "reward": _get(cfg, "reward_model")}
        sections["value"] = _get(cfg, "value_model") or sections["reward"]
        missing: set[str] = set()      # each field once: the value falls back to reward_from
        for name, source in sources.items():
            field = f"{name}_from" if name != "value" or _get(cfg, "value_from") else "reward_from"
            if field in missing:
                continue
            arch, where = (None, "") if _dir_problem(p, field, source) else \
                _arch(source, None if source else sections[name])
            if arch is None:
                if not source:
                    p.add(field, source, "a model directory (a stage's model/ or a transformers "
                                         "checkpoint)")
                missing.add(field)
                continue
            nets[name] = (arch, where, _tokenizer(source))
        if missing:
            return
        for section, name in (("ppo.lora", "policy"), ("ppo.value_lora", "value")):
            rank, (arch, where, _) = _get(cfg, f"{section}.rank"), nets[name]
            if isinstance(rank, int) and arch is not None and rank > arch.d_model:
                p.add(f"{section}.rank", rank, f"at most the {name} network's width "
                      f"d_model={arch.d_model} ({where}); a rank above it adds parameters, not "
                      "expressiveness")
    policy_tok = next((t for _, _, t in nets.values() if t is not None), None)
    known = {n: v for n, v in nets.items() if v[0] is not None}
    if known:   # the tightest network bounds the lengths
        name = min(known, key=lambda n: known[n][0].max_position)
        _lengths(p, cfg, f"the {name} network ({known[name][1]})", known[name][0].max_position)
    vocab = {}
    for name, (arch, where, tok) in known.items():
        vocab[name] = (arch.vocab_size, where)
        if tok is not None and len(tok) > arch.vocab_size:
            p.add(f"{name} tokenizer size", len(tok),
                  f"at most the {name} network's vocab_size={arch.vocab_size} ({where}); larger "
                  "ids index past the embedding")
    if len({v for v, _ in vocab.values()}) > 1:
        listed = ", ".join(f"{n} {v} ({w})" for n, (v, w) in vocab.items())
        p.add("vocab_size", listed, "the same vocabulary for policy, reference, reward and value")
    toks = [(n, t) for n, (_, _, t) in nets.items() if t is not None]
    if policy_tok is not None:
        ref = policy_tok.get_vocab()
        for name, tok in toks[1:]:
            if tok is not policy_tok and tok.get_vocab() != ref:
                p.add(f"{name} tokenizer", "differs", f"the {toks[0][0]} tokenizer's vocabulary "
                      "(the same token ids for every network)")


# (source, format, how it is read, its version) -> each row's strictly ordered pairs: a sweep's
# points and a pipeline's checks see the same files again and again; each is read here once.
_PAIRS_PER_ROW: dict[tuple, list[int]] = {}


def _pairs_per_row(spec: str, fmt: str, data: Any, *, mapped: bool = True,
                   max_k: int = DEFAULT_MAX_K) -> list[int]:
    """One entry per row of a data source (its strictly ordered pairs), every row validated
    with the arguments the stage reads it with (``mapped``: with ``data.field_map``)."""
    from rlhf_jax.data.sources import read_source, source_kind, source_options
    options = source_options(data, mapped=mapped)
    version = storage.mtime(spec) if source_kind(spec) in ("jsonl", "parquet") else None
    key = (spec, fmt, options["data_dir"], tuple(sorted((options["field_map"] or {}).items())),
           options["assistant_marker"], max_k, version)
    if key not in _PAIRS_PER_ROW:
        rows = read_source(spec, fmt, max_k=max_k, **options)
        _PAIRS_PER_ROW[key] = [
            sum(a != b for i, a in enumerate(ranks) for b in ranks[i + 1:])
            for ranks in (row.get("ranking", ()) for row in rows)]
    return _PAIRS_PER_ROW[key]


def _sources(cfg: Any, kind: str) -> list[tuple[str, str, dict]]:
    """``(field, format, read options)`` of every data file the stage reads."""
    data = cfg.data
    if kind == "sft":
        out = [("data.train", data.format, {}), ("data.valid", data.format, {})]
        if _get(cfg, "data.pretrain_mix", 0) > 0:
            out.append(("data.pretrain_path", "pretrain", {"mapped": False}))
    elif kind in ("rm", "dpo"):
        out = [(f"data.{split}", "comparisons", {"max_k": data.max_k})
               for split in ("train", "valid")]
        if kind == "rm":
            out.append(("normalize.demonstrations", "demonstrations", {"mapped": False}))
    else:
        out = [("data.prompts", "prompts", {})]
        if _get(cfg, "ppo.ptx_coef", 0) > 0:
            out.append(("data.pretrain", "pretrain", {"mapped": False}))
    return [(field, fmt, options) for field, fmt, options in out if _get(cfg, field)]


def _data(p: _Problems, cfg: Any, kind: str) -> None:
    """Every row of the stage's data files, and a batch's worth of them to train on."""
    per_row = {}
    for field, fmt, options in _sources(cfg, kind):
        try:
            per_row[field] = _pairs_per_row(_get(cfg, field), fmt, cfg.data, **options)
        except DataError:
            raise
        except ValueError as e:      # a TFDS source that is not prepared, a bad spec
            p.items.append(f"{p.prefix}{field}={_get(cfg, field)!r}: {e}")
    main = "data.prompts" if kind == "ppo" else "data.train"
    if main in per_row:
        _enough_rows(p, cfg, kind, main, per_row[main], has_valid="data.valid" in per_row)


def _enough_rows(p: _Problems, cfg: Any, kind: str, main: str, per_row: list[int],
                 has_valid: bool) -> None:
    """What the stage's batch iterator will need, on rows alone (tokenization only drops)."""
    if kind == "ppo":
        b, g = cfg.ppo.rollout_batch_size, _get(cfg, "ppo.group_size", 1)
        if len(per_row) < b // g:
            p.add(main, _get(cfg, main), f"at least {b // g} prompts (ppo.rollout_batch_size={b} "
                                          f"/ ppo.group_size={g}) for one rollout; it has "
                                          f"{len(per_row)}")
        return
    from rlhf_jax.stages.sft import mix_sizes
    from rlhf_jax.stages.supervised import split_rows
    data, batch = cfg.data, cfg.train.batch_size
    train = per_row if has_valid else split_rows(per_row, data.valid_fraction, cfg.seed)[0]
    have, need, what = len(train), batch, f"train.batch_size={batch} rows"
    if kind == "rm" and cfg.mode == "shuffled_pairs":
        have, what = sum(train), f"train.batch_size={batch} pairs (mode='shuffled_pairs')"
    elif kind == "sft" and data.format == "pretrain":    # chunking may make more rows
        need, what = 1, "1 document"
    elif kind == "sft" and _get(cfg, "data.pretrain_mix", 0) > 0:
        need = mix_sizes(batch, data.pretrain_mix)[0]
        what = f"{need} rows (train.batch_size={batch} less data.pretrain_mix's {batch - need})"
    if have >= need:
        return
    has = str(have) if len(train) == len(per_row) else (
        f"{len(per_row)} row(s), of which data.valid_fraction={data.valid_fraction} holds out "
        f"{len(per_row) - len(train)} for validation, leaving {have}")
    p.add(main, _get(cfg, main), f"at least {what} to train on; it has {has}")


def _stage(p: _Problems, cfg: Any, kind: str) -> None:
    _common(p, cfg)
    par = _mesh_parallelism(p, cfg)
    _divisible(p, cfg, par)
    fields = {"sft": ("data.train", "data.valid", "data.pretrain_path"),
              "rm": ("data.train", "data.valid", "normalize.demonstrations"),
              "dpo": ("data.train", "data.valid"),
              "ppo": ("data.prompts", "data.pretrain")}[kind]
    _data_paths(p, cfg, fields)
    if kind == "dpo":
        _check(p, cfg, "beta", *POSITIVE)
    if kind == "ppo" and _get(cfg, "ppo.ptx_coef") and not _get(cfg, "data.pretrain") \
            and _get(cfg, "policy_from"):
        p.add("data.pretrain", "", "a pretraining text file when ppo.ptx_coef > 0")
    if kind == "sft" and _get(cfg, "data.pretrain_mix") and not _get(cfg, "data.pretrain_path") \
            and _get(cfg, "data.train"):
        p.add("data.pretrain_path", "", "a pretraining text file when data.pretrain_mix > 0")
    _networks(p, cfg, kind)


def check(cfg: ml_collections.ConfigDict) -> None:
    """Raise ConfigError naming every bad field of a stage or pipeline config."""
    problems: list[str] = []
    pipeline = "policy_from" not in cfg and any(s in cfg for s in DEFAULT_ENGINES)
    try:
        stages = stage_configs(cfg)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise ConfigError(f"config: {e}") from None
    for kind, stage in stages.items():
        p = _Problems(f"{kind}." if pipeline else "")
        try:
            _stage(p, stage, kind)
        except (ValueError, FileNotFoundError) as e:
            p.items.append(f"{p.prefix.rstrip('.') or kind}: {e}")
        problems += p.items
    if pipeline:
        p = _Problems("")
        _check(p, cfg, "ppo_ptx_coef", *NON_NEGATIVE)
        # the default stages' sections no stage_configs entry covers (pretrain, sft_ptx)
        for stage in (s for s in DEFAULT_SECTIONS if s not in DEFAULT_ENGINES):
            if stage in cfg:
                sub = _Problems(f"{stage}.")
                _common(sub, cfg[stage])
                p.items += sub.items
        if "eval" in cfg:
            _check(p, cfg, "eval.n_prompts", *POSITIVE_INT)
            _check(p, cfg, "eval.temperature", *POSITIVE)
        if not _get(cfg, "world.enabled", True):
            _data_paths(p, cfg, tuple(f"data.{k}" for k in (_get(cfg, "data") or {})))
        problems += p.items
    if problems:
        raise ConfigError("config: " + "; ".join(problems))
    # The data once the config holds together (its fields say how to read it): a bad row
    # raises its own DataError naming the file and line.
    for kind, stage in stages.items():
        p = _Problems(f"{kind}." if pipeline else "")
        _data(p, stage, kind)
        problems += p.items
    if problems:
        raise ConfigError("config: " + "; ".join(problems))
