"""rlhf_jax: InstructGPT's pipeline (SFT -> K-way reward model -> PPO-ptx) in JAX/Flax."""

__version__ = "0.1.0"
