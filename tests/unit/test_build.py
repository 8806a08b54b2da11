"""Every stage's build(): the steps exist without weights or data, on meshes as users make them."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rlhf_jax.config import load_config, stage_configs
from rlhf_jax.stages import ppo, reward, sft

ARCH = dict(arch="llama", vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
            d_ff=64, max_position=64)
RM_ARCH = dict(arch="gpt2", vocab_size=128, d_model=16, n_layers=1, n_heads=2, d_ff=32,
               max_position=64)


def pipeline_config() -> ml_collections.ConfigDict:
    """A pipeline-style config naming architectures only: no checkpoint, no data file exists."""
    cfg = load_config("experiments/instructgpt_tiny.py:micro")
    cfg.world.enabled = False
    cfg.vocab_size = 128
    cfg.pretrain.model = ml_collections.ConfigDict(ARCH)
    cfg.rm_model = ml_collections.ConfigDict(RM_ARCH)
    cfg.rm.data.max_k = 3
    cfg.ppo.ppo.ptx_coef = 1.0
    cfg.ppo.ppo.frozen_dtype = "bfloat16"
    cfg.ppo.ppo.logprob_chunk = 4
    return cfg


def test_stage_configs_chain_the_pipeline_architectures():
    stages = stage_configs(pipeline_config())
    assert set(stages) == {"sft", "rm", "ppo"}
    assert dict(stages["sft"].model) == ARCH and stages["sft"].init_from == ""
    assert dict(stages["rm"].model) == RM_ARCH          # an RM unlike the policy (paper: 6B RM)
    assert dict(stages["ppo"].policy_model) == ARCH
    assert dict(stages["ppo"].reward_model) == dict(stages["ppo"].value_model) == RM_ARCH


def test_world_vocab_size_matches_the_written_tokenizer(tmp_path):
    from rlhf_jax.models.hf import load_tokenizer
    from rlhf_jax.world import write_world
    from rlhf_jax.world.export import world_vocab_size
    sizes = dict(entities=6, pretrain=10, sft=4, rm=4, ppo=4, eval=4, capability_mc=2,
                 capability_qa=2)
    paths = write_world(tmp_path, 3, sizes)
    assert world_vocab_size(3, 6) == len(load_tokenizer(paths["tokenizer"]))


@pytest.mark.parametrize("make_mesh", ["jax_default", "ours"])
def test_every_stage_builds_and_lowers_without_data(make_mesh):
    """Abstract state with shardings, every step lowered; meshes from jax.make_mesh (Explicit
    axes by default) are accepted as they are."""
    if make_mesh == "jax_default":
        mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    else:
        from rlhf_jax.sharding import make_mesh as ours
        mesh = ours((2, 2, 2))
    stages = stage_configs(pipeline_config())
    programs = {"sft": sft.build(stages["sft"], mesh), "rm": reward.build(stages["rm"], mesh),
                "ppo": ppo.build(stages["ppo"], mesh)}
    assert set(programs["sft"].steps) == set(programs["rm"].steps) == {"train", "eval"}
    assert set(programs["ppo"].steps) == {"sync", "rollout", "experience", "update", "value_update",
                                                        "ptx"}
    for name, program in programs.items():
        leaves = jax.tree.leaves(program.state)
        assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None
                              for x in leaves), name
        for step in program.steps.values():
            text = step.lower().as_text()
            # every step but PPO's sync (a weight copy) processes tokens
            assert "func" in text and (step.tokens > 0) == (step.name != "sync"), (name, step.name)
    # Parameters follow the rules table: the embedding is split over (vocab -> tensor, embed -> fsdp).
    embed = programs["sft"].state.params["embed"]["embedding"]
    assert tuple(embed.sharding.spec) == ("tensor", "fsdp")
    # Frozen reference and RM in bfloat16; the trained policy stays float32.
    frozen = programs["ppo"].frozen
    assert {x.dtype for x in jax.tree.leaves(frozen.reference)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(programs["ppo"].state.policy.params)} == {
        jnp.dtype(jnp.float32)}
    rollout = programs["ppo"].steps["rollout"]
    assert rollout.loop_trips == stages["ppo"].data.max_response_len
    assert rollout.loop_body is not None and "func" in rollout.loop_body.lower().as_text()


@pytest.mark.slow     # every quick-tier PPO test runs the built steps; this compiles them all again
def test_built_ppo_steps_run_on_random_weights():
    """init_state + random_args feed every PPO step: one rollout -> experience -> update chain."""
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    program = ppo.build(stage_configs(pipeline_config())["ppo"], mesh)
    state, frozen = program.init_state(jax.random.key(0))
    rollout = program.steps["rollout"].fn(*program.random_args("rollout", state, frozen,
                                                               jax.random.key(1)))
    assert rollout.sequences.shape[0] == program.steps["rollout"].args[1].shape[0]
    experience = program.steps["experience"].fn(state.policy.params, state.value.params, frozen,
                                                rollout, jnp.float32(0.02))
    assert np.isfinite(np.asarray(experience.advantages)).all()
    args = program.random_args("update", state, frozen, jax.random.key(2))
    policy, _, stats = program.steps["update"].fn(state.policy, state.ema_params, experience,
                                                  *args[3:])
    assert int(policy.step) == 1 and np.isfinite(float(stats["ptx_loss"]))
    args = program.random_args("value_update", state, frozen, jax.random.key(3))
    value, stats = program.steps["value_update"].fn(state.value, experience, *args[2:])
    assert int(value.step) == 1 and np.isfinite(float(stats["value_loss"]))
