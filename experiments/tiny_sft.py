"""SFT on a tiny model (a smoke-test scale; the pipeline config composes real runs).

    rlhf-jax sft --config experiments/tiny_sft.py --workdir runs/sft \
        --config.tokenizer=DIR --config.data.train=demos.jsonl
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "sft"
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
    c.data.max_prompt_len = 24
    c.data.max_response_len = 24
    c.data.overlong = "truncate"      # or "drop"
    c.data.pretrain_mix = 0.0         # fraction of each batch from pretraining text (paper: 0.1)
    c.data.pretrain_path = ""

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 16
    c.train.epochs = 2.0
    c.train.steps = 0                 # >0 overrides epochs
    c.train.dropout = 0.0             # residual dropout (paper: 0.2)
    c.train.log_every = 10
    c.train.eval_every = 50
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 2

    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, warmup_steps=0,
        decay="cosine", final_fraction=0.1, warmup_start_fraction=0.0, grad_clip_norm=1.0))
    return c
