"""PPO's four networks as roles: what each one trains, on which frozen base, in which dtype.

=========  ====================================  =============================================
role       trains                                params in the jitted steps
=========  ====================================  =============================================
policy     everything (``full``), or LoRA        ``merge(trainable, base)``: the trainable tree
           adapters (``lora``) on a frozen base  itself, or base + scale * A @ B with the base =
                                                 ``frozen.reference`` (no second copy)
reference  nothing (``frozen``)                  ``frozen.reference``: the initial policy, in
                                                 ``ppo.frozen_dtype`` (the policy's own dtype
                                                 when it is the LoRA base)
reward     nothing (``frozen``)                  ``frozen.reward``, in ``ppo.frozen_dtype``
value      everything (``full``), LoRA adapters  as the policy, its LoRA base being
           and its scalar head (``lora+head``),  ``frozen.reward`` (the value starts from the RM);
           or absent (``none``: grpo / rloo)     V = 0 when absent
=========  ====================================  =============================================

Every step takes a role's trainable tree and its base (``{}`` when it trains in full, so the
compiled program is the one without LoRA) and calls ``merge``: LoRA and full fine-tuning are one
code path, and this module is the only one that knows which is which. Adapters are replicated on
every device (rank x (in + out) per kernel is tiny); each A @ B is formed in its kernel's sharding.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rlhf_jax import checkpoint as ckpt_lib
from rlhf_jax import model_io, scoring, storage
from rlhf_jax.errors import ConfigError
from rlhf_jax.models.lora import LoRA, apply_lora, init_lora, lora_param_count
from rlhf_jax.models.params import abstract_params, init_params, param_shardings
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.program import abstract_key
from rlhf_jax.sharding import replicated
from rlhf_jax.stages.ppo.estimators import estimator
from rlhf_jax.train_state import TrainState, abstract_train_state, shardings_of

log = logging.getLogger(__name__)

PyTree = Any
FULL, LORA, LORA_HEAD, FROZEN, NONE = "full", "lora", "lora+head", "frozen", "none"


@flax.struct.dataclass
class Frozen:
    """The weights PPO does not train: the KL reference (the initial policy; the policy's LoRA
    base) and the RM (the value's LoRA base), with the RM's demonstration normalization as
    ``[mean, std]`` (an argument, so another RM does not recompile)."""
    reference: Any
    reward: Any
    reward_norm: jax.Array


@flax.struct.dataclass
class PPOState:
    """What the update trains: the policy's and value's trainable trees with their optimizer
    states (``value`` is ``{}`` without a value network), and the policy EMA (``{}`` when off)."""
    policy: TrainState
    value: Any
    ema_params: Any


@dataclasses.dataclass(frozen=True)
class Role:
    name: str
    model: Transformer | None
    trains: str                                   # FULL, LORA, LORA_HEAD, FROZEN or NONE
    base_from: str = ""                           # the Frozen field under the trainable part
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_targets: tuple[str, ...] = ()
    base_shardings: Any = dataclasses.field(default=None, compare=False)

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 1.0

    def base(self, frozen: Frozen) -> PyTree:
        """The frozen arrays the trainable part sits on (``{}``: none)."""
        return getattr(frozen, self.base_from) if self.base_from else {}

    def merge(self, trainable: PyTree, base: PyTree, *, constrain: bool = True) -> PyTree:
        """The network's whole parameter tree from what it trains and its frozen base."""
        if self.trains in (FULL, NONE):
            return trainable
        if self.trains == FROZEN:
            return base
        adapters = trainable if self.trains == LORA else trainable["adapters"]
        merged = apply_lora(base, LoRA(adapters, self.lora_scale),
                            shardings=self.base_shardings if constrain else None)
        if self.trains == LORA_HEAD:
            merged = {**merged, "score_head": trainable["score_head"]}
        return merged

    def whole_like(self, trainable: PyTree, base: PyTree) -> PyTree:
        """A tree shaped like the whole network's weights without computing the merge (the base
        under LoRA: what a step on the merged weights is compiled for)."""
        return trainable if self.trains in (FULL, NONE) else base

    def trainable_from(self, params: PyTree, rng: jax.Array) -> PyTree:
        """The trainable tree that starts from whole ``params`` (loaded, or ShapeDtypeStructs):
        the params themselves, or fresh adapters (B = 0: the merged network equals ``params``)
        with the scalar head kept in full for LORA_HEAD."""
        if self.trains not in (LORA, LORA_HEAD):
            return params
        adapters = init_lora(params, rng, self.lora_rank, self.lora_alpha,
                             self.lora_targets).adapters
        return adapters if self.trains == LORA else {"adapters": adapters,
                                                     "score_head": params["score_head"]}

    def abstract_state(self, opt: optax.GradientTransformation, mesh: Mesh) -> Any:
        """Abstract TrainState of the trainable part: sharded by the rules when it is the whole
        network, replicated when it is adapters (and a head)."""
        if self.trains == NONE:
            return {}
        if self.trains == FULL:
            return abstract_train_state(self.model, opt, mesh)
        rep = replicated(mesh)
        shapes = jax.eval_shape(lambda k: self.trainable_from(abstract_params(self.model, mesh), k),
                                abstract_key(rep))
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
            jax.eval_shape(lambda a: TrainState(jnp.zeros((), jnp.int32), a, opt.init(a)), shapes))

    def facts(self) -> dict[str, Any]:
        """What a trained network's extra.json records about how it was trained."""
        if self.trains == LORA:
            return {"lora_rank": self.lora_rank, "lora_alpha": float(self.lora_alpha),
                    "lora_targets": list(self.lora_targets), "lora_merged": True}
        if self.trains == LORA_HEAD:
            return {f"{self.name}_lora_rank": self.lora_rank,
                    f"{self.name}_lora_targets": list(self.lora_targets)}
        return {}


@dataclasses.dataclass(frozen=True)
class Sampler:
    """The rollout's view of the policy: its whole weights, cast to ``dtype`` and laid out by
    ``model.rules`` (``ppo.sampler``). In the decode layout every parameter rule keeps only the
    ``tensor`` axis, so each data x fsdp group of devices holds the whole policy, sharded over
    ``tensor``, and decodes its share of the batch without gathering a weight; the KV cache
    follows the activations' rules (batch over data x fsdp, heads over tensor)."""
    model: Transformer
    layout: str
    dtype: Any

    def weights(self, whole: PyTree) -> PyTree:
        """The policy's whole weights as the sampler holds them (floating leaves cast)."""
        return jax.tree.map(lambda x: x.astype(self.dtype)
                            if jnp.issubdtype(x.dtype, jnp.floating) else x, whole)

    def abstract(self, whole: PyTree, mesh: Mesh) -> PyTree:
        """ShapeDtypeStructs of the sampler's weights (from the policy's whole tree's), in the
        sampler's layout."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            jax.eval_shape(self.weights, whole), param_shardings(self.model, mesh))


def decode_rules(rules: Any) -> Any:
    """``rules`` with the parameters' logical axes mapped onto ``tensor`` only (activation and
    cache rules unchanged: the batch stays split over data x fsdp)."""
    def keep_tensor(axes):
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = tuple(a for a in axes if a == "tensor")
        return kept[0] if len(kept) == 1 else (kept or None)
    return tuple((name, axes if name.startswith(("activation_", "cache_")) else keep_tensor(axes))
                 for name, axes in rules)


def make_sampler(p: Any, policy: Transformer) -> Sampler:
    dtype = jnp.dtype(policy.config.dtype if p.sampler.dtype == "compute" else p.sampler.dtype)
    model = policy.clone(config=policy.config.replace(dtype=dtype.name),
                         rules=decode_rules(policy.rules) if p.sampler.layout == "decode"
                         else policy.rules)
    return Sampler(model, p.sampler.layout, dtype)


@dataclasses.dataclass(frozen=True)
class Roles:
    policy: Role
    reference: Role
    reward: Role
    value: Role
    sampler: Sampler

    @property
    def with_value(self) -> bool:
        return self.value.trains != NONE

    def value_trainable(self, state: PPOState) -> PyTree:
        """The value's trainable tree in ``state`` (``{}`` without a value network)."""
        return state.value.params if self.with_value else {}

    def policy_params(self, trainable: PyTree, frozen: Frozen) -> PyTree:
        return self.policy.merge(trainable, self.policy.base(frozen))

    def values(self, trainable: PyTree, frozen: Frozen, sequences: jax.Array,
               attention_mask: jax.Array, prompt_len: int, mask: jax.Array) -> jax.Array:
        """V(s_t) of each response token (0 on padding), or zeros without a value network."""
        if not self.with_value:
            return jnp.zeros_like(mask)
        params = self.value.merge(trainable, self.value.base(frozen))
        return scoring.response_values(self.value.model, params, sequences, attention_mask,
                                       prompt_len) * mask

    def facts(self, p: Any) -> dict[str, Any]:
        est = estimator(p)
        facts = {"advantage": est.name, "group_size": p.group_size} if est.grouped else {}
        return facts | self.policy.facts() | self.value.facts()


def _lora_role(name: str, model: Transformer, section: Any, trains: str, base_from: str) -> Role:
    return Role(name, model, trains, base_from, int(section.rank), float(section.alpha),
                tuple(section.targets))


def make_roles(p: Any, policy: Transformer, reward: Transformer, value: Transformer | None,
               mesh: Mesh | None = None) -> tuple[Roles, Frozen]:
    """The roles ``ppo`` configures and the abstract frozen weights they read (ShapeDtypeStructs
    with their shardings; ``mesh`` None: no shardings)."""
    policy_lora = p.lora.rank > 0
    value_lora = p.value_lora.rank > 0 and estimator(p).needs_value
    if value_lora:
        check_value_lora(value, reward)
    frozen_dtype = jnp.dtype(p.frozen_dtype)
    as_frozen = lambda tree: jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, frozen_dtype if jnp.issubdtype(a.dtype, jnp.floating)
                                       else a.dtype, sharding=a.sharding), tree)
    policy_shapes = abstract_params(policy, mesh)
    frozen = Frozen(policy_shapes if policy_lora else as_frozen(policy_shapes),
                    as_frozen(abstract_params(reward, mesh)),
                    jax.ShapeDtypeStruct((2,), jnp.float32,
                                         sharding=replicated(mesh) if mesh else None))
    # Each A @ B is formed in its kernel's sharding (none without a mesh).
    sharded = (lambda tree: shardings_of(tree)) if mesh is not None else (lambda tree: None)
    policy_role = (dataclasses.replace(_lora_role("policy", policy, p.lora, LORA, "reference"),
                                       base_shardings=sharded(frozen.reference))
                   if policy_lora else Role("policy", policy, FULL))
    if value_lora:
        value_role = dataclasses.replace(
            _lora_role("value", value, p.value_lora, LORA_HEAD, "reward"),
            base_shardings=sharded(frozen.reward))
    else:
        value_role = Role("value", value, FULL if estimator(p).needs_value else NONE)
    return Roles(policy_role, Role("reference", policy, FROZEN, "reference"),
                 Role("reward", reward, FROZEN, "reward"), value_role,
                 make_sampler(p, policy)), frozen


def check_value_lora(value: Transformer | None, reward: Transformer,
                     value_from: str = "", reward_from: str = "") -> None:
    """Value LoRA's base is the frozen RM: the value network must be the RM's architecture,
    started from the RM's checkpoint."""
    if value_from and value_from != reward_from:
        raise ConfigError(f"value_from={value_from!r}: expected empty or reward_from with "
                          "ppo.value_lora.rank > 0 (the value's frozen base is the RM)")
    if value is None or value.config != reward.config:
        raise ConfigError("ppo.value_lora.rank > 0: expected the value network to have the RM's "
                          "architecture (value_model empty): its frozen base is the RM")


# --- the networks' definitions and weights --------------------------------------------------

def network_models(cfg: Any, mesh: Mesh, given: dict[str, Transformer | None],
                   overrides: dict) -> dict[str, Transformer | None]:
    """Policy, reward and value definitions: ``given`` (loaded checkpoints') or built from
    ``cfg.policy_model`` / ``reward_model`` / ``value_model`` or the configs stored in
    ``policy_from`` / ``reward_from`` / ``value_from``. No value network for grpo / rloo."""
    scalar = dict(overrides, head="scalar")
    out = {"policy": model_io.stage_model(given.get("policy"), cfg.policy_model, cfg.policy_from,
                                          mesh, overrides),
           "reward": model_io.stage_model(given.get("reward"), cfg.reward_model, cfg.reward_from,
                                          mesh, scalar),
           "value": None}
    if estimator(cfg.ppo).needs_value:
        out["value"] = model_io.stage_model(given.get("value"), cfg.value_model or cfg.reward_model,
                                            cfg.value_from or cfg.reward_from, mesh, scalar)
        if cfg.ppo.value_lora.rank > 0:
            check_value_lora(out["value"], out["reward"], cfg.value_from, cfg.reward_from)
    return out


@dataclasses.dataclass
class Loaded:
    models: dict[str, Transformer | None]
    policy: PyTree                 # whole policy weights (the reference's too)
    reward: PyTree
    value: PyTree | None           # whole value weights, normalization folded in (None: no value)
    reward_norm: dict
    tokenizer: Any


def load_networks(cfg: Any, mesh: Mesh) -> Loaded:
    """Policy, RM and value weights from ``policy_from`` / ``reward_from`` / ``value_from``.

    With value LoRA the value's weights ARE the RM's (no second load). The value head starts
    with the RM's normalization folded in (``value_init_normalized``): returns are built from
    the normalized score, and a raw head would start off by the demonstrations' mean, a bias GAE
    turns into length-dependent advantage errors."""
    overrides = model_io.runtime_overrides(cfg)
    p = cfg.ppo
    policy, policy_params, tokenizer, _ = model_io.load_model(cfg.policy_from, mesh, **overrides)
    reward, reward_params, _, reward_extra = model_io.load_model(cfg.reward_from, mesh, **overrides)
    value, value_params, value_extra = None, None, {}
    if p.value_lora.rank > 0 and estimator(p).needs_value:
        check_value_lora(reward, reward, cfg.value_from, cfg.reward_from)
        value, value_params, value_extra = reward, reward_params, reward_extra
    elif estimator(p).needs_value:
        value, value_params, _, value_extra = model_io.load_model(
            cfg.value_from or cfg.reward_from, mesh, **overrides)
    if reward.config.head != "scalar" or (value is not None and value.config.head != "scalar"):
        raise ConfigError(f"reward_from={cfg.reward_from!r}: expected a reward model (scalar head)")
    if tokenizer is None:
        raise FileNotFoundError(f"policy_from={cfg.policy_from!r}: no tokenizer saved beside it")
    reward_norm = reward_extra.get("reward_norm") or {}
    log.info("reward normalization: %s", reward_norm or "none")
    if cfg.value_init_normalized and value_extra.get("reward_norm"):
        value_params = scoring.fold_normalization(value_params, value_extra["reward_norm"])
    model_io.log_params(policy_params)
    return Loaded({"policy": policy, "reward": reward, "value": value}, policy_params,
                  reward_params, value_params, reward_norm, tokenizer)


# --- state -------------------------------------------------------------------------------------

def lora_rng(seed: int) -> jax.Array:
    """The adapters' init key (apart from every iteration's ``runtime.step_rng``)."""
    return jax.random.fold_in(jax.random.key(seed), 0x10_4A)


def trainables(roles: Roles, policy_params: PyTree, value_params: PyTree | None,
               rng: jax.Array) -> tuple[PyTree, PyTree | None]:
    """The policy's and value's trainable trees from their whole weights (the policy's adapters
    from ``rng``, the value's from ``fold_in(rng, 1)``)."""
    policy = roles.policy.trainable_from(policy_params, rng)
    value = (roles.value.trainable_from(value_params, jax.random.fold_in(rng, 1))
             if roles.with_value else None)
    for role, tree in ((roles.policy, policy), (roles.value, value)):
        if role.trains in (LORA, LORA_HEAD):
            log.info("%s LoRA rank %d on %s: %d trainable parameters", role.name, role.lora_rank,
                     role.lora_targets, sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
    return policy, value


def initial_state(program: Any, loaded: Loaded, seed: int) -> tuple[PPOState, Frozen]:
    """PPO's first state from loaded weights: the frozen reference and RM cast and placed, the
    trainable trees (adapters from ``lora_rng(seed)`` under LoRA) with fresh optimizer states."""
    plan = program.plan
    frozen = make_frozen(program.frozen, loaded.policy, loaded.reward, loaded.reward_norm)
    policy, value = trainables(plan.roles, loaded.policy, loaded.value, lora_rng(seed))
    return init_ppo_state(program.state, plan.policy_opt, plan.value_opt, policy, value), frozen


def init_ppo_state(state: PPOState, policy_opt, value_opt, policy_params, value_params) -> PPOState:
    """Fresh optimizer states (and EMA) around the trainable trees, in ``state``'s shardings.
    ``value_params`` None: no value network (grpo / rloo), ``state.value`` is ``{}``."""
    ema = bool(jax.tree.leaves(state.ema_params))
    fresh = lambda params, opt: TrainState(jnp.zeros((), jnp.int32), params, opt.init(params))
    return jax.jit(lambda pp, vp: PPOState(
        fresh(pp, policy_opt), {} if vp is None else fresh(vp, value_opt),
        jax.tree.map(jnp.copy, pp) if ema else {}),
        out_shardings=shardings_of(state))(policy_params, value_params)


def make_frozen(frozen: Frozen, reference_params, reward_params, reward_norm: dict) -> Frozen:
    """Copies of the reference and RM weights cast to the frozen dtype, in their shardings."""
    sh = shardings_of(frozen)
    cast = lambda tree, like: jax.tree.map(lambda x, a: x.astype(a.dtype), tree, like)
    return jax.jit(lambda r, w, n: Frozen(cast(r, frozen.reference), cast(w, frozen.reward), n),
                   out_shardings=sh)(reference_params, reward_params, scoring.norm_array(reward_norm))


def random_state(roles: Roles, abstract: PPOState, frozen: Frozen, policy_opt, value_opt,
                 rng: jax.Array, mesh: Mesh) -> tuple[PPOState, Frozen]:
    """Random policy and value weights (the reference is the policy, as at the start of PPO)."""
    k_policy, k_value = jax.random.split(rng)
    policy_params = init_params(roles.policy.model, k_policy, mesh)
    value_params = init_params(roles.value.model, k_value, mesh) if roles.with_value else None
    reward_params = init_params(roles.reward.model, jax.random.fold_in(rng, 2), mesh)
    policy = roles.policy.trainable_from(policy_params, jax.random.fold_in(rng, 3))
    if roles.with_value:
        value_params = roles.value.trainable_from(value_params, jax.random.fold_in(rng, 4))
    return (init_ppo_state(abstract, policy_opt, value_opt, policy, value_params),
            make_frozen(frozen, policy_params, reward_params, {}))


# --- export --------------------------------------------------------------------------------------

def exported_policy(roles: Roles, trainable: PyTree, frozen: Frozen) -> PyTree:
    """The policy's whole weights for ``model/``: merged base + adapters under LoRA."""
    if roles.policy.trains == FULL:
        return trainable
    base = roles.policy.base(frozen)
    return jax.jit(lambda b, t: roles.policy.merge(t, b, constrain=False),
                   out_shardings=shardings_of(base))(base, trainable)


def save_adapters(lora_dir: str, role: Role, adapters: PyTree, policy_from: str) -> None:
    """``lora_dir``: ``adapters/`` (orbax pytree of A and B) and ``lora.json`` (LoRA only),
    replacing an earlier run's whole (``model_io.write_directory``), so that a kill during a
    rerun's save never leaves a lora.json beside other adapters, or none."""
    if role.trains != LORA:
        return
    layout = model_io.LORA_LAYOUT

    def write(directory: str) -> None:
        ckpt_lib.save_pytree(storage.join(directory, layout.first), adapters, overwrite=True)
        if jax.process_index() == 0:
            storage.write_json(storage.join(directory, layout.marker), {
                "rank": role.lora_rank, "alpha": float(role.lora_alpha),
                "scale": float(role.lora_scale), "targets": list(role.lora_targets),
                "base": policy_from, "n_params": lora_param_count(LoRA(adapters, role.lora_scale))},
                indent=1)

    model_io.write_directory(lora_dir, write, layout, overwrite=True)
