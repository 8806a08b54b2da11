"""Experiment configs: ml_collections ConfigDicts from ``experiments/*.py`` plus dotted overrides.

An experiment file defines ``get_config(arg: str | None = None) -> ConfigDict``; the CLI takes
``--config experiments/file.py[:arg]`` and any number of ``--config.a.b=value`` overrides, the
convention of JAX research codebases (big_vision, Flax examples).
"""
from __future__ import annotations

import ast
import contextlib
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from rlhf_jax.errors import ConfigError, UnknownFieldError
from rlhf_jax.models.config import TransformerConfig, gpt2_config, llama_config, qwen2_config
from rlhf_jax.registry import DEFAULT_ENGINES, GROUP_ADVANTAGES


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Load ``path.py`` or ``path.py:arg`` and call its ``get_config``."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(
        f"rlhf_jax_experiment_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid Python in the config file ({e.msg})") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config(); an experiment file returns its "
                          "ConfigDict from get_config(arg=None)")
    return module.get_config(arg) if arg else module.get_config()


def _parse_value(text: str, current: Any, key: str) -> Any:
    """Interpret ``text`` with the type of the value it replaces (as ml_collections does)."""
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0"):
            raise ConfigError(f"--config.{key}={text!r}: expected a boolean (true/false)")
        return lowered in ("true", "1")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ConfigError(f"--config.{key}={text!r}: expected a {type(current).__name__} "
                         f"(current value {current!r})") from None
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if current is not None and not isinstance(value, type(current)) and not (
            isinstance(current, (tuple, list)) and isinstance(value, (tuple, list))):
        raise ConfigError(f"--config.{key}={text!r}: expected a {type(current).__name__} "
                         f"(current value {current!r})")
    if isinstance(current, tuple):
        value = tuple(value)
    return value


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Apply ``a.b=value`` strings (without the ``--config.`` prefix) in order."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected --config.key=value")
        *parents, leaf = key.split(".")
        node = cfg
        for i, name in enumerate(parents):
            if name not in node:
                raise UnknownFieldError(f"--config.{key}: no field {'.'.join(parents[:i + 1])!r} in the config")
            node = node[name]
        if leaf not in node:
            raise UnknownFieldError(f"--config.{key}: no field {key!r} in the config "
                           f"(fields here: {sorted(node.keys())})")
        with node.unlocked() if hasattr(node, "unlocked") else contextlib.nullcontext():
            node[leaf] = _parse_value(text, node[leaf], key)
    return cfg


def model_config_from(model_cfg: ml_collections.ConfigDict | dict, tokenizer: Any = None,
                      **overrides: Any) -> TransformerConfig:
    """A TransformerConfig from a config section (``arch`` plus sizes), filling token ids and
    the vocabulary size from the tokenizer when given."""
    fields = dict(model_cfg)
    arch = fields.pop("arch", "gpt2")
    if tokenizer is not None:
        fields.setdefault("vocab_size", len(tokenizer))
        fields.setdefault("pad_token_id", tokenizer.pad_token_id)
        fields.setdefault("eos_token_id", tokenizer.eos_token_id)
        fields.setdefault("bos_token_id", tokenizer.bos_token_id)
    fields.update(overrides)
    maker = {"gpt2": gpt2_config, "llama": llama_config, "qwen2": qwen2_config}.get(arch)
    if maker is None:
        raise ConfigError(f"model.arch={arch!r}: expected 'gpt2', 'llama' or 'qwen2'")
    return maker(**fields)


# --- stage defaults (experiments/ files start from these) ------------------------------------

def sft_config() -> ml_collections.ConfigDict:
    """Defaults of `rlhf-jax sft` (also LM pretraining with data.format="pretrain")."""
    c = ml_collections.ConfigDict()
    c.name = "sft"
    c.profile_steps = ""               # "A:B": an XProf trace of steps A..B-1 in <workdir>/profile
    c.tracker = "tensorboard"          # or "wandb" (offline unless a key is set) or "none"
    c.seed = 0
    c.init_from = ""                 # a model dir (stage output) or a transformers checkpoint dir
    c.tokenizer = ""                 # used when init_from is empty (random init of c.model)
    c.model = ml_collections.ConfigDict(dict(
        arch="gpt2", d_model=64, n_layers=2, n_heads=4, d_ff=256, max_position=128))
    c.model_runtime = ml_collections.ConfigDict(dict(dtype="float32", remat=False, scan_layers=False))
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))

    c.data = ml_collections.ConfigDict()
    c.data.format = "demonstrations"  # or "pretrain": plain-text LM training
    c.data.train = ""                 # JSONL path or tfds:<name>:<split>
    c.data.valid = ""                 # empty: hold out valid_fraction of train
    c.data.valid_fraction = 0.1
    c.data.tfds_data_dir = ""
    c.data.field_map = ml_collections.ConfigDict()
    c.data.assistant_marker = "\n\nAssistant:"   # where a Human/Assistant transcript's reply starts
    c.data.max_prompt_len = 24
    c.data.max_response_len = 24
    c.data.overlong = "truncate"      # or "drop"
    c.data.pretrain_mix = 0.0         # fraction of each batch from pretraining text (paper: 0.1)
    c.data.pretrain_path = ""
    c.data.pack = False               # plain text (pretrain format, the mix) packed into full rows

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 16
    c.train.epochs = 2.0
    c.train.steps = 0                 # >0 overrides epochs
    c.train.dropout = 0.0             # residual dropout (paper: 0.2)
    c.train.logprob_chunk = 0         # LM head + log-softmax over this many positions at a time
    c.train.log_every = 10
    c.train.eval_every = 50
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 2

    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, warmup_steps=0,
        decay="cosine", final_fraction=0.1, warmup_start_fraction=0.0, grad_clip_norm=1.0))
    return c


def rm_config() -> ml_collections.ConfigDict:
    """Defaults of `rlhf-jax rm`."""
    c = ml_collections.ConfigDict()
    c.name = "rm"
    c.profile_steps = ""               # "A:B": an XProf trace of steps A..B-1 in <workdir>/profile
    c.tracker = "tensorboard"          # or "wandb" (offline unless a key is set) or "none"
    c.seed = 0
    c.mode = "kway"                    # "kway" (InstructGPT Eq. 1) or "shuffled_pairs" (baseline)
    c.init_from = ""                   # the SFT model dir (or a transformers checkpoint dir)
    c.tokenizer = ""                   # only for random init from c.model (tests)
    c.model = ml_collections.ConfigDict(dict(
        arch="gpt2", d_model=64, n_layers=2, n_heads=4, d_ff=256, max_position=128))
    c.model_runtime = ml_collections.ConfigDict(dict(dtype="float32", remat=False, scan_layers=False))
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))

    c.data = ml_collections.ConfigDict()
    c.data.train = ""                  # comparisons JSONL ({"prompt","completions","ranking"} or
    c.data.valid = ""                  #   TRL pairs) or tfds:<name>:<split>
    c.data.valid_fraction = 0.1
    c.data.tfds_data_dir = ""
    c.data.field_map = ml_collections.ConfigDict()
    c.data.assistant_marker = "\n\nAssistant:"   # where a Human/Assistant transcript's reply starts
    c.data.max_k = 9
    c.data.max_prompt_len = 24
    c.data.max_response_len = 24
    c.data.overlong = "truncate"

    c.normalize = ml_collections.ConfigDict()
    c.normalize.demonstrations = ""    # demonstrations JSONL: bias so they score mean 0
    c.normalize.unit_std = False       # also scale to std 1 (Ziegler et al.)

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 16            # prompts per batch (paper: 64, i.e. up to 2,304 pairs)
    c.train.epochs = 1.0               # paper: 1 epoch (more overfits)
    c.train.steps = 0
    c.train.dropout = 0.0
    c.train.log_every = 10
    c.train.eval_every = 50
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 2

    c.optim = ml_collections.ConfigDict(dict(
        lr=3e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, warmup_steps=0,
        decay="cosine", final_fraction=0.1, warmup_start_fraction=0.0, grad_clip_norm=1.0))
    return c


def dpo_config() -> ml_collections.ConfigDict:
    """Defaults of `rlhf-jax dpo`: the policy trained directly on the RM's comparisons.

    The policy starts from the SFT model and the frozen reference is that same model (or
    ``reference_from``); the data sections are the RM's, train/optim are SFT's.
    """
    c = ml_collections.ConfigDict()
    c.name = "dpo"
    c.profile_steps = ""               # "A:B": an XProf trace of steps A..B-1 in <workdir>/profile
    c.tracker = "tensorboard"          # or "wandb" (offline unless a key is set) or "none"
    c.seed = 0
    c.init_from = ""                   # the SFT model dir (or a transformers checkpoint dir)
    c.reference_from = ""              # the frozen reference; empty: init_from (DPO's usual)
    c.tokenizer = ""                   # only for random init from c.model (tests, compile)
    c.model = ml_collections.ConfigDict(dict(
        arch="gpt2", d_model=64, n_layers=2, n_heads=4, d_ff=256, max_position=128))
    c.model_runtime = ml_collections.ConfigDict(dict(dtype="float32", remat=False, scan_layers=False))
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
    c.beta = 0.1                       # implicit-KL strength (Rafailov et al.: 0.1 .. 0.5)

    c.data = ml_collections.ConfigDict()
    c.data.train = ""                  # comparisons JSONL ({"prompt","completions","ranking"} or
    c.data.valid = ""                  #   TRL chosen/rejected pairs) or tfds:<name>:<split>
    c.data.valid_fraction = 0.1
    c.data.tfds_data_dir = ""
    c.data.field_map = ml_collections.ConfigDict()
    c.data.assistant_marker = "\n\nAssistant:"   # where a Human/Assistant transcript's reply starts
    c.data.max_k = 9                   # a K-way row gives its C(K, 2) pairs in one batch element
    c.data.max_prompt_len = 24
    c.data.max_response_len = 24
    c.data.overlong = "truncate"

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 16            # prompts per batch (each with its K completions)
    c.train.epochs = 1.0
    c.train.steps = 0                  # >0 overrides epochs
    c.train.dropout = 0.0              # on the policy only; the reference is deterministic
    c.train.logprob_chunk = 0          # LM head + log-softmax over this many positions at a time
    c.train.log_every = 10
    c.train.eval_every = 50
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 2

    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, warmup_steps=0,
        decay="cosine", final_fraction=0.1, warmup_start_fraction=0.0, grad_clip_norm=1.0))
    return c


def ppo_config() -> ml_collections.ConfigDict:
    """Defaults of `rlhf-jax ppo`: InstructGPT values in comments, CPU-sized numbers."""
    c = ml_collections.ConfigDict()
    c.name = "ppo"
    c.profile_steps = ""               # "A:B": an XProf trace of steps A..B-1 in <workdir>/profile
    c.tracker = "tensorboard"          # or "wandb" (offline unless a key is set) or "none"
    c.seed = 0
    c.policy_from = ""                 # PPO-init SFT model dir: the policy and the KL reference
    c.reward_from = ""                 # reward model dir (scalar head + demo normalization)
    c.value_from = ""                  # empty: initialize the value network from the RM (paper)
    c.value_init_normalized = True     # fold the RM's demo normalization into the value head, so
                                       #   first values are on the scale of the (normalized) returns
    # Architectures (arch + sizes, as sft's `model`): empty = read from the *_from directory.
    # `rlhf-jax compile/profile` build the steps from these alone, without any checkpoint.
    c.policy_model = ml_collections.ConfigDict()
    c.reward_model = ml_collections.ConfigDict()
    c.value_model = ml_collections.ConfigDict()      # empty: the reward model's architecture
    c.model_runtime = ml_collections.ConfigDict(dict(dtype="float32", remat=False, scan_layers=False))
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))

    c.data = ml_collections.ConfigDict()
    c.data.prompts = ""                # prompts JSONL ({"prompt"}) or tfds:<name>:<split>
    c.data.pretrain = ""               # pretraining text for the ptx term ({"text"})
    c.data.tfds_data_dir = ""
    c.data.field_map = ml_collections.ConfigDict()
    c.data.assistant_marker = "\n\nAssistant:"   # where a Human/Assistant transcript's reply starts
    c.data.max_prompt_len = 24
    c.data.max_response_len = 24       # = max new tokens per episode
    c.data.ptx_seq_len = 48
    c.data.overlong = "truncate"

    c.ppo = ml_collections.ConfigDict()
    c.ppo.iterations = 0               # >0 overrides total_episodes / rollout_batch_size
    c.ppo.total_episodes = 2048        # paper: 256k
    c.ppo.rollout_batch_size = 64      # paper: 512 episodes per iteration
    c.ppo.minibatch_size = 16          # paper: 64 (8 minibatches)
    c.ppo.epochs = 1                   # paper: a single inner epoch
    c.ppo.advantage = "gae"            # "gae" (paper: value network + GAE); "grpo" / "rloo": each
                                       #   sample's baseline is its prompt's other samples, no
                                       #   value network (grpo: KL as a k3 loss term with kl_coef;
                                       #   rloo: per-token KL folded into the sequence reward)
    c.ppo.group_size = 1               # G samples per prompt (grpo / rloo: >= 2): a rollout is
                                       #   rollout_batch_size / G prompts, each repeated G times
    c.ppo.lr = 1e-4                    # paper: ~1e-5 scale for 1.3B; tiny models need more
    c.ppo.value_lr = 1e-4              # paper: 9e-6
    c.ppo.warmup_iterations = 10       # paper: 10 iterations from 0.1x
    c.ppo.b1 = 0.9
    c.ppo.b2 = 0.95
    c.ppo.grad_clip_norm = 1.0         # not stated by the paper
    c.ppo.clip_eps = 0.2               # paper: 0.2
    c.ppo.value_clip = 0.2             # not stated; <= 0 disables value clipping
    c.ppo.entropy_coef = 0.0           # not stated
    c.ppo.gamma = 1.0                  # paper: no discount
    c.ppo.lam = 0.95                   # Stiennon et al.
    c.ppo.whiten_advantages = True     # not stated
    c.ppo.whiten_rewards = False       # not stated
    c.ppo.kl_coef = 0.02               # paper: beta = 0.02 fixed
    c.ppo.kl_controller = "fixed"      # or "adaptive" (Ziegler et al.)
    c.ppo.kl_target = 6.0
    c.ppo.kl_horizon = 10000
    c.ppo.ptx_coef = 0.0               # gamma; paper's PPO-ptx: 27.8
    c.ppo.ptx_per_episode = 1          # paper: 8 pretraining sequences per RL episode
    c.ppo.ema_decay = 0.0              # paper: 0.992
    c.ppo.missing_eos_penalty = ml_collections.FieldReference(None, field_type=float)
    c.ppo.temperature = 1.0            # paper: 1
    c.ppo.top_k = 0
    c.ppo.top_p = 1.0
    c.ppo.sample_every = 10            # iterations between sample tables
    c.ppo.n_samples_logged = 8
    c.ppo.checkpoint_every = 20
    # Memory plan (pod scale): the frozen reference and RM may be held in bfloat16; log-probs and
    # entropy are computed over `logprob_chunk` response positions at a time (0 = all at once),
    # so no float32 [B, N, V] exists; the LM head only ever runs on response positions.
    c.ppo.frozen_dtype = "float32"     # or "bfloat16"
    c.ppo.logprob_chunk = 0
    # LoRA on the policy (rank 0 = off: full fine-tune). With rank > 0 only the adapters (and
    # their optimizer state / EMA) train; the base weights are frozen and are also the KL
    # reference (no second copy); model/ is the merged policy, lora/ the adapters alone.
    c.ppo.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets=("attn",)))
    # LoRA on the value network (GAE only; rank 0 = off). Its frozen base is the frozen RM
    # itself (the value starts from the RM: value_from empty), so it needs no weights of its
    # own; adapters and the scalar score head train, and the checkpoints hold only those.
    c.ppo.value_lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets=("attn",)))
    # The rollout's copy of the policy. "decode": before each rollout the policy is resharded
    # once into a decode layout (weights replicated over data and fsdp, sharded over tensor: the
    # batch's data x fsdp groups each sample with tensor parallelism inside) and the decode
    # loop reads only that copy, so no weight is all-gathered per token; "train" decodes from
    # the training (FSDP) layout itself. dtype "compute" = the model's compute dtype
    # (model_runtime.dtype: bfloat16 on pods; a float32 run samples exactly what it trains).
    c.ppo.sampler = ml_collections.ConfigDict(dict(layout="decode", dtype="compute"))
    return c


def paper_pod_config(policy: dict, *, mesh: tuple[int, int, int], runtime: dict,
                     logprob_chunk: int, rm_model: dict | None = None,
                     sft_lr: float = 1e-5) -> ml_collections.ConfigDict:
    """A pipeline config at InstructGPT's batch geometry (arXiv:2203.02155 App. C) for a pod:
    prompt 512 + response 256; SFT batch 32, 16 epochs, dropout 0.2; RM 64 prompts x K = 9,
    1 epoch, lr 9e-6; PPO-ptx 256k episodes, rollouts of 512, minibatch 64, 1 epoch, value lr
    9e-6, EMA 0.992, gamma 27.8 with 8 pretraining sequences per episode; frozen networks in
    bfloat16. ``rm_model``: the RM's (and value's) own architecture (else the policy's). The
    experiment files (``experiments/llama3_8b.py`` ...) name the networks, mesh and runtime."""
    prompt_len, response_len = 512, 256
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.vocab_size = policy["vocab_size"]
    c.base_model = ""                      # a transformers directory of the policy for real runs
    c.world = ml_collections.ConfigDict(dict(enabled=False, seed=0, sizes={}))
    if rm_model is not None:
        c.rm_model = ml_collections.ConfigDict(rm_model)
    c.sft = sft_config()
    c.sft.model = ml_collections.ConfigDict(policy)
    c.rm, c.ppo = rm_config(), ppo_config()
    for stage in (c.sft, c.rm, c.ppo):
        stage.model_runtime = ml_collections.ConfigDict(runtime)
        stage.mesh.shape = mesh
        stage.data.max_prompt_len = prompt_len
        stage.data.max_response_len = response_len
    c.sft.train.batch_size = 32            # paper
    c.sft.train.epochs = 16.0              # paper
    c.sft.train.dropout = 0.2              # paper
    c.sft.train.logprob_chunk = logprob_chunk
    c.sft.optim.lr = sft_lr
    c.rm.data.max_k = 9                    # paper: K = 4..9
    c.rm.train.batch_size = 64             # paper: 64 prompts
    c.rm.train.epochs = 1.0                # paper
    c.rm.optim.lr = 9e-6                   # paper
    c.ppo.data.ptx_seq_len = prompt_len + response_len
    p = c.ppo.ppo
    p.total_episodes = 256_000             # paper
    p.rollout_batch_size = 512             # paper
    p.minibatch_size = 64                  # paper
    p.epochs = 1                           # paper
    p.lr = 5e-6
    p.value_lr = 9e-6                      # paper
    p.ema_decay = 0.992                    # paper
    p.ptx_coef = 27.8                      # paper's PPO-ptx gamma
    p.ptx_per_episode = 8                  # paper
    p.frozen_dtype = "bfloat16"
    p.logprob_chunk = logprob_chunk
    return c


# --- per-stage configs from an experiment file (compile / profile) ---------------------------

def sweep_config(base: ml_collections.ConfigDict, *, name: str, shared: Sequence[str],
                 stages: Sequence[str], models: Sequence[str] | None, x: str = "",
                 points: Sequence[dict] = ()) -> ml_collections.ConfigDict:
    """A ``rlhf-jax sweep`` config (rlhf_jax/sweep.py): a pipeline config ``base`` and the
    points that vary it. ``models=None`` evaluates every model a point has."""
    c = ml_collections.ConfigDict()
    c.name = name
    c.base = base
    c.shared_from = ""         # another pipeline workdir whose finished stages the points share
    c.shared = tuple(shared)
    c.stages = tuple(stages)
    c.models = models if models is None else tuple(models)
    c.x = x
    c.points = [dict(p) for p in points]
    return c


def stage_configs(cfg: ml_collections.ConfigDict, *,
                  methods: bool = False) -> dict[str, ml_collections.ConfigDict]:
    """Each stage's config with its networks' architectures filled in, from a loaded config.

    A pipeline-style config (``sft``/``rm``/``ppo`` sections) chains its stages the way the
    pipeline does: SFT trains the base (``pretrain.model`` when the pipeline pretrains), the RM
    starts from SFT (or from ``rm_model`` when the RM is a different network, as the paper's 6B
    RM is for every policy size), PPO's policy is the SFT model and its value the RM; with a
    ``base_model`` checkpoint the architectures are read from it (``*_from``). A single
    stage's config is returned under its ``name``. ``vocab_size`` missing from an architecture
    comes from ``cfg.vocab_size`` or, for the built-in world, the world's tokenizer.

    ``methods`` adds what a pipeline config's optional method stages run (``rlhf-jax compile``
    / ``profile``, ``rlhf_jax.pipeline.check``): its ``dpo`` section as the ``dpo`` stage
    (:func:`dpo_stage`), and a ``ppo`` section whose ``ppo.advantage`` is grpo / rloo with no
    ``ppo.group_size`` of its own (< 2) gets the pipeline's ``group_size``, so
    ``--config.ppo.ppo.advantage=grpo`` is the stage the pipeline's grpo runs. Without it, only
    the default pipeline's stages: ``validate.check`` checks those, and the pipeline checks a
    method stage only when it will run.
    """
    if "policy_from" in cfg or not any(s in cfg for s in DEFAULT_ENGINES):   # one stage's config
        # (a PPO stage config has a `ppo` section of its own: policy_from tells it apart)
        name = cfg.get("name", "")
        kind = "ppo" if "ppo" in name or "policy_from" in cfg else (
            "dpo" if "reference_from" in cfg else "rm" if "normalize" in cfg else "sft")
        return {kind: cfg}
    vocab = _pipeline_vocab_size(cfg)
    with_vocab = lambda m: _with_vocab(m, vocab)
    # A base checkpoint (no pretrain stage) fixes the architecture: read it from there.
    base_dir = cfg.get("base_model") or ""
    arch = {} if base_dir else with_vocab(cfg.pretrain.model if "pretrain" in cfg else cfg.sft.model)
    rm_arch = with_vocab(cfg.get("rm_model") or arch)
    rm_dir = "" if cfg.get("rm_model") else base_dir
    out: dict[str, ml_collections.ConfigDict] = {}
    if "sft" in cfg:
        out["sft"] = _copy(cfg.sft, model=arch, init_from=base_dir)
    if "rm" in cfg:
        out["rm"] = _copy(cfg.rm, model=rm_arch, init_from=rm_dir)
    if "ppo" in cfg:
        ppo = cfg.ppo
        policy = with_vocab(ppo.get("policy_model") or arch)
        reward = with_vocab(ppo.get("reward_model") or rm_arch)
        value = with_vocab(ppo.get("value_model") or reward)
        out["ppo"] = _copy(ppo, policy_model=policy, reward_model=reward, value_model=value,
                           policy_from="" if ppo.get("policy_model") else base_dir,
                           reward_from="" if ppo.get("reward_model") else rm_dir,
                           value_from="" if ppo.get("value_model") else rm_dir)
    if not methods:
        return out
    if "dpo" in cfg and "sft" in out:
        # SFT's architecture and start stand for the SFT model, which the pipeline trains later.
        out["dpo"] = dpo_stage(cfg, base_dir, model=arch)
    knobs = out["ppo"].get("ppo") if "ppo" in out else None
    if knobs is not None and knobs.get("advantage") in GROUP_ADVANTAGES \
            and int(knobs.group_size) < 2:
        knobs.group_size = pipeline_group_size(cfg)
    return out


def pipeline_group_size(cfg: ml_collections.ConfigDict) -> int:
    """Samples per prompt of a pipeline config's grpo / rloo stages."""
    return int(cfg.get("group_size", 4))


def dpo_stage(cfg: ml_collections.ConfigDict, sft_model: str,
              **fields: Any) -> ml_collections.ConfigDict:
    """The pipeline's dpo stage from its ``dpo`` section: the policy starts from the SFT model
    (``sft_model``: its directory, or before SFT has trained the checkpoint SFT starts from)
    and that model is also the frozen reference, whatever ``dpo.reference_from`` says;
    ``fields`` set more top-level fields (``model``: SFT's architecture)."""
    return _copy(cfg.dpo, name="dpo", init_from=sft_model, reference_from="", **fields)


def group_method_stage(ppo: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict,
                       advantage: str) -> ml_collections.ConfigDict:
    """The pipeline's grpo / rloo stage from a PPO stage config of pipeline config ``cfg``: the
    ``advantage`` estimator over ``group_size`` samples per prompt, without ptx (PPO's episodes,
    no value network)."""
    out = ml_collections.ConfigDict(ppo.to_dict())
    out.name = advantage
    out.ppo.advantage = advantage
    out.ppo.group_size = pipeline_group_size(cfg)
    out.ppo.ptx_coef = 0.0
    return out


def _copy(section: ml_collections.ConfigDict, **fields: Any) -> ml_collections.ConfigDict:
    out = ml_collections.ConfigDict(section.to_dict())
    for key, value in fields.items():
        out[key] = ml_collections.ConfigDict(dict(value)) if isinstance(value, dict) else value
    return out


def _with_vocab(model: Any, vocab_size: int | None) -> dict:
    model = dict(model)
    if "vocab_size" not in model and vocab_size:
        model["vocab_size"] = vocab_size
    return model


def _pipeline_vocab_size(cfg: ml_collections.ConfigDict) -> int | None:
    if cfg.get("vocab_size"):
        return int(cfg.vocab_size)
    world = cfg.get("world")
    if world is not None and world.get("enabled"):
        from rlhf_jax.world.export import world_vocab_size   # generated, so computed here
        return world_vocab_size(world.seed, dict(world.sizes).get("entities"))
    return None

