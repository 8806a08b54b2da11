"""Reward model on K-way rankings, tiny scale.

    rlhf-jax rm --config experiments/tiny_rm.py --workdir runs/rm \
        --config.init_from=runs/sft/model --config.data.train=comparisons.jsonl
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "rm"
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
