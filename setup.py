"""Install rlhf_jax: `pip install -e .` (add `[test]`, `[torch]`, `[tpu]` as needed)."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10,<0.11",
    "jaxlib>=0.10,<0.11",
    "flax>=0.12,<0.13",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.12,<0.13",
    "chex>=0.1.90",
    "numpy>=1.26",
    "transformers>=5.0,<6",
    "tokenizers>=0.21",
    "safetensors>=0.4",
    "tensorflow-datasets>=4.9.8,<5",
    "array_record>=0.5",
    "ml_collections>=1.0",
    "absl-py>=2.0",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    # gs:// workdirs and data: etils.epath (orbax's path library) reaches GCS through gcsfs.
    "gcsfs>=2024.2",
]

setup(
    name="rlhf_jax",
    version="0.1.0",
    description="InstructGPT (SFT -> K-way reward model -> PPO-ptx) in JAX/Flax, sharded for TPU pods.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["rlhf_jax", "rlhf_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # The emulator is pinned: tests/gcs_emulator.py patches its request handlers.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29",
                 "gcp-storage-emulator==2026.7.19", "wandb>=0.19", "tensorboard>=2.16",
                 "datasets>=3.0"],
        # --tracker wandb, and `tensorboard --logdir WORKDIR` to view the curves.
        "tracking": ["wandb>=0.19", "tensorboard>=2.16"],
        # data.train=hf:<dataset>: read from the local Hugging Face datasets cache.
        "hub": ["datasets>=3.0"],
        "torch": ["torch==2.13.0"],
        "tpu": ["jax[tpu]>=0.10,<0.11"],
        # bench/ppo_speed.py. Tunix 0.1.7 (the third system) pins transformers/safetensors older
        # than ours, so it is not listed: `pip install --no-deps google-tunix==0.1.7 && pip
        # install google-metrax clu jaxtyping sentencepiece perfetto` (what its PPO imports).
        "bench": ["trl==1.12.0", "torch==2.13.0"],
    },
    entry_points={"console_scripts": ["rlhf-jax=rlhf_jax.cli:main"]},
)
