"""Stage 3: PPO and PPO-ptx (InstructGPT Eq. 2), and GRPO / RLOO on the same engine.

Networks (``roles.py``): the policy starts from the (PPO-init) SFT model; a frozen copy of it is
the KL reference; the reward model is frozen and scores with its demonstration normalization;
the value network is a separate copy of the reward model, trained. Each is a role that knows what
it trains (everything, LoRA adapters, adapters and a head, or nothing), so LoRA and full
fine-tuning are one code path.

One iteration, as the loop (``loop.py``) reads top to bottom:
  1. rollout     sample responses for a batch of prompts (jitted KV-cache sampler)
  2. experience  one jitted, gradient-free pass, float32 throughout: policy and reference
                 log-probs, values, RM scores, then the advantage estimator (``estimators.py``,
                 ``ppo.advantage``): per-token rewards -beta*(log pi - log pi_ref) plus the
                 score at the last token and GAE (paper), or GRPO / RLOO group baselines
  3. update      ppo_epochs x minibatches jitted steps over that frozen experience; each policy
                 step sums the clipped-PPO gradient and gamma_ptx x the pretraining-NLL gradient
                 into ONE optimizer update (one backward pass over the summed objective); the
                 value network takes its own steps (a second program, on a second core on CPU)
  4. log / KL controller / checkpoint

``experience.py`` holds those pure steps; ``program.py``'s ``build(cfg, mesh)`` jits them with
named shardings from shapes alone, so ``rlhf-jax compile`` and ``rlhf-jax profile`` use exactly
what ``train`` runs.

    rlhf-jax ppo --config experiments/tiny_ppo.py --workdir runs/ppo
"""
from rlhf_jax.stages.ppo.estimators import ESTIMATORS, POLICY_LOSSES, estimator, sequence_rewards
from rlhf_jax.stages.ppo.roles import (Frozen, PPOState, Role, Roles, init_ppo_state, make_frozen,
                                       make_roles)
from rlhf_jax.stages.ppo.experience import (Experience, Rollout, make_experience,
                                            policy_gradient, policy_objective, policy_update_step,
                                            ptx_objective, value_objective, value_update_step)
from rlhf_jax.stages.ppo.program import PPOPlan, build
from rlhf_jax.stages.ppo.loop import next_kl_coef, train

__all__ = ["ESTIMATORS", "POLICY_LOSSES", "estimator", "sequence_rewards", "Frozen", "PPOState",
           "Role", "Roles", "init_ppo_state", "make_frozen", "make_roles", "Experience", "Rollout",
           "make_experience", "policy_gradient", "policy_objective", "policy_update_step",
           "ptx_objective", "value_objective", "value_update_step", "PPOPlan", "build",
           "next_kl_coef", "train"]
