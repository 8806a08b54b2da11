"""PPO speed: the same PPO workload on rlhf_jax, TRL 1.12 and Tunix 0.1.7, alternated.

A benchmark, not a test. Run it from the repository root::

    python bench/ppo_speed.py --out bench/results/ppo_speed.json --pairs 3 [--size tiny|gpt2_124m] \
        [--systems rlhf_jax,trl,tunix] [--iterations 32] [--threads N] [--log-dir DIR] [--keep-tmp]

(bench/results/ppo_speed.json was written by that command with ``--pairs 3``, about 10 minutes on
2 shared cores; bench/results/ppo_speed_gpt2_124m*.json by ``--size gpt2_124m --pairs 1
--iterations 2``, about 15 minutes a round on 2 quiet cores, see each file's ``command``.)

``--size`` (default ``tiny``, the workload below) picks the network and sequence lengths;
``gpt2_124m`` is GPT-2 small's shape: 12 layers, d_model 768, 12 heads, d_ff 3072, 1024 positions,
vocabulary 50,257 (the byte-level tokens below padded with unused ``v<id>`` tokens, so embedding
and LM head are full size), 64 prompts of exactly 64 tokens drawn from the whole vocabulary, 64 new
tokens per rollout, 3 iterations by default (one takes minutes per system on 2 cores); everything
else is as listed below.

(``pip install -e .[bench]`` brings TRL, torch and Tunix; Tunix 0.1.7 is installed with
``--no-deps`` so it does not move jax/flax/transformers, see the report in the JSON.)

Workload (identical across systems as far as each API allows; the differences that remain are
listed under ``workload.differences`` in the JSON):

* four random-init GPT-2 networks, 2 layers, d_model 64, 4 heads, d_ff 256, 64 positions,
  vocabulary 260 (a byte-level-ish tokenizer: ``<pad>``=0, ``<eos>``=1, ``<unk>``=2, ``<sep>``=3
  and 256 byte tokens ``b00``..``bff``): the policy, its frozen reference (a copy of the
  policy), the reward model (scalar head) and the value model (a copy of the reward model, as in
  InstructGPT / TRL's examples). Each system initializes its own weights with its own seed-0 RNG.
* 64 fixed random prompts of 8-16 byte tokens (seed 0), left-padded to 16.
* 32 iterations x 16 rollouts = 512 episodes; 24 new tokens per rollout sampled at temperature
  0.7 (top-k/top-p off), stopping an episode at ``<eos>``; 4 PPO epochs x 2 minibatches of 8;
  fixed KL coefficient 0.05 (k1 estimator, in the reward); GAE gamma 1, lambda 0.95; clip 0.2,
  value clip 0.2; Adam at a constant 1e-4; float32 everywhere; no evaluation, no checkpoints,
  no sample generations, no external logging.

How it runs: each (system, run) is its own subprocess (``--child``), started in the order
A B C A B C ... so that slow drift of the machine's load hits every system alike. Every child
gets the same thread settings: CPU affinity to the first ``--threads`` CPUs, ``OMP_NUM_THREADS``
= ``MKL_NUM_THREADS`` = threads, ``OMP_WAIT_POLICY=PASSIVE``, ``torch.set_num_threads(threads)``,
``JAX_PLATFORMS=cpu``. (PASSIVE matters on a shared machine: with the default spin-waiting, torch's
OpenMP pool with 2 threads on 2 cores loaded by other work ran a GPT-2 forward+backward 30-50x
slower than with 1 thread, 0.9-1.6 s instead of 30 ms; PASSIVE brings it back to ~30 ms. XLA's
CPU runtime does not use OpenMP, so the setting only touches torch.)
A fp32 matmul peak (2048x2048 @ 2048x2048, best of 10, in JAX and in torch) is measured in a
subprocess with the same settings before and after the runs, and the load average is sampled
before and after every run, since the machine may be shared.

Numbers, per system and run (``runs.<system>[i]``):

* ``steady_eps``: steady-state episodes/s = (iterations - 1) * 16 / (t_last - t_first), where
  t_k is the wall time at which iteration k finished (rlhf_jax: the ``time`` field of its
  metrics.jsonl line; TRL: ``on_step_end`` callback; Tunix: return of the learner's
  ``_run_global_step``). The first iteration (compilation) is excluded.
* ``median_iteration_s`` / ``median_eps``: the median of t_k - t_{k-1} over k >= 2, and 16 / it.
* ``first_iteration_s``: t_first - t_start, where t_start is the start of the training call
  (below): setup + every compilation the first iteration triggers + the first iteration.
* ``wall_train_s``: t_end - t_start. The training call is, for rlhf_jax,
  ``rlhf_jax.stages.ppo.train(cfg, workdir)`` (reads the models and prompts from disk, builds
  and compiles the steps, runs all iterations, writes metrics/TensorBoard and the final model);
  for TRL, ``PPOTrainer(...)`` construction + ``trainer.train()``; for Tunix, ``RLCluster(...)``
  + ``PPOLearner(...)`` + ``learner.train(...)`` (+ a final block_until_ready). Not included:
  Python imports and the random initialization of the networks (and, for rlhf_jax, writing
  them to disk), which are in ``wall_process_s``.
* ``wall_process_s``: measured by this (parent) process from starting the child to its exit:
  interpreter start, imports, model init, the training call and teardown.
* ``import_s``, ``setup_s`` (model init before the training call), ``episodes`` (counted),
  ``optimizer_steps``, ``final`` (last iteration's losses / KL / score, to show it trained) and,
  for rlhf_jax, ``phase_median_s`` (median of time/rollout_s, time/experience_s, time/update_s
  over iterations >= 2) and ``phase_first_s``.

``pairs[i]`` holds the ratios of the i-th A B C round: ``steady_eps_ratio_rlhf_jax_over_trl`` =
rlhf_jax steady_eps / TRL steady_eps (> 1: rlhf_jax is faster), ``wall_train_ratio_rlhf_jax_over_trl``
= rlhf_jax wall_train_s / TRL wall_train_s (< 1: rlhf_jax finishes sooner), the same for
``wall_process`` and for Tunix; ``summary`` has the medians over runs and pairs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from out_path import add_out_argument, out_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --- the workload ---------------------------------------------------------------------------------

SPECIALS = ["<pad>", "<eos>", "<unk>", "<sep>"]
PAD_ID, EOS_ID = 0, 1
BYTE_VOCAB = len(SPECIALS) + 256
N_PROMPTS = 64
ROLLOUTS, TEMPERATURE = 16, 0.7
# What --size changes: the network and the sequence lengths (and the default iteration count, so
# that one A B C round stays within tens of minutes on 2 cores). Everything else is shared.
SIZES = {
    "tiny": dict(VOCAB_SIZE=BYTE_VOCAB, N_LAYERS=2, D_MODEL=64, N_HEADS=4, D_FF=256, MAX_POSITION=64,
                 PROMPT_MIN=8, PROMPT_MAX=16, NEW_TOKENS=24, ITERATIONS=32),
    # GPT-2 small's shapes. The 50,257-entry vocabulary is the byte-level one padded with unused
    # tokens, so the embedding and the LM head (a fifth of the FLOPs per token) are full size.
    "gpt2_124m": dict(VOCAB_SIZE=50257, N_LAYERS=12, D_MODEL=768, N_HEADS=12, D_FF=3072,
                      MAX_POSITION=1024, PROMPT_MIN=64, PROMPT_MAX=64, NEW_TOKENS=64, ITERATIONS=3),
}
EPOCHS, MINIBATCHES, MINIBATCH = 4, 2, 8
KL_COEF, LR, SEED = 0.05, 1e-4, 0
ALL_SYSTEMS = ("rlhf_jax", "trl", "tunix")


def use_size(name: str) -> None:
    """Make ``name`` the workload of this process. The children, the Tunix model port and the
    report read these module-level names; a process runs one size, so rebinding them once, before
    any of that runs, keeps every function's signature as it was for importers."""
    globals().update({k: v for k, v in SIZES[name].items() if k != "ITERATIONS"})


use_size("tiny")


def differences() -> list[str]:
    return [
        "Weights: each system initializes its own random weights (its own init scheme, seed 0); "
        "the architecture and sizes are the same (TRL: transformers GPT2LMHeadModel / "
        "GPT2ForSequenceClassification; Tunix: a GPT-2 written for this benchmark in flax.nnx with "
        "Tunix's model protocol, since Tunix 0.1.7 ships no GPT-2).",
        (f"Prompt padding: rlhf_jax and Tunix left-pad every prompt to {PROMPT_MAX}; TRL pads each batch "
         f"to its longest prompt (almost always {PROMPT_MAX} with 16 prompts of {PROMPT_MIN}-{PROMPT_MAX} "
         "tokens)." if PROMPT_MIN < PROMPT_MAX else
         f"Prompt padding: none, every prompt is {PROMPT_MAX} tokens in all three systems."),
        "Optimizer steps: rlhf_jax and TRL take 4 epochs x 2 minibatches of 8 = 8 optimizer steps "
        "per iteration. Tunix ties an optimizer step to a rollout 'mini batch': to roll out 16 at "
        "once it runs mini_batch_size=16 with train_micro_batch_size=8 (gradient accumulation over "
        "2 micro-batches of 8), i.e. the same 4 x 16 forward/backward sequences per iteration but "
        "4 optimizer steps of 16 (the alternative, mini_batch_size=8, would roll out 8 at a time).",
        "Minibatch shuffling: rlhf_jax and TRL draw a new random permutation of the 16 episodes per "
        "epoch; Tunix keeps its 2 fixed micro-batches (their order is shuffled per epoch).",
        "Optimizers: rlhf_jax has separate policy and value Adam (b2 0.95, grad-norm clip 1.0); "
        "Tunix likewise (built here with the same optax chain); TRL has one AdamW (b2 0.999, no "
        "clipping: its PPO loop never clips) over policy+value with loss = pg + 0.1 * vf.",
        "Temperature in the losses: rlhf_jax and TRL compute log-probs (old, reference, new) at "
        "the sampling temperature 0.7; Tunix 0.1.7's PPO computes them at temperature 1.",
        "KL: k1 (log pi - log pi_ref) per token subtracted from the reward in rlhf_jax and TRL; "
        "Tunix uses kl_method='kl' (the same k1) in the reward.",
        "Stop token: all three stop an episode at <eos> (TRL: stop_token='eos'; responses are "
        "truncated after it and the score is read there). TRL and Tunix still run all "
        f"{NEW_TOKENS} decoding steps unless every sequence has stopped.",
        "Tunix 0.1.7's PPO builds its per-token reward tensor as zeros_like(completion_ids), an "
        "int32 array, so the reward-model score added at the last token is truncated to an integer "
        "before the (float) KL penalty is subtracted (JAX warns about the unsafe cast); this changes "
        "what is learned, not the amount of computation.",
        "Tunix vanilla rollout reuses one sampling seed (RolloutConfig.seed) on every call; the "
        "policy changes between calls, so samples still differ.",
        "rlhf_jax's training call also writes metrics.jsonl, TensorBoard events and the final "
        "model (its train() always does); TRL and Tunix write nothing (report_to none, no saving).",
    ]


def byte_tokens() -> list[str]:
    """The token names by id: the specials, 256 bytes, then (at sizes with a bigger vocabulary)
    fillers ``v<id>`` that prompts and samples may use like any other token."""
    return SPECIALS + [f"b{i:02x}" for i in range(256)] + [f"v{i}" for i in range(BYTE_VOCAB, VOCAB_SIZE)]


def make_prompts(seed: int = SEED) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(len(SPECIALS), VOCAB_SIZE) for _ in range(rng.randint(PROMPT_MIN, PROMPT_MAX))]
            for _ in range(N_PROMPTS)]


def ids_to_text(ids: list[int]) -> str:
    names = byte_tokens()
    return " ".join(names[i] for i in ids)


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(byte_tokens())}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                  unk_token="<unk>", sep_token="<sep>")
    out.padding_side = "left"
    assert len(out) == VOCAB_SIZE and out.pad_token_id == PAD_ID and out.eos_token_id == EOS_ID
    return out


def iteration_stats(t_start: float, stamps: list[float], t_end: float, per_iter: int) -> dict:
    """The timing numbers from the end-of-iteration wall times ``stamps``."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    out = {"iterations_timed": len(stamps), "first_iteration_s": stamps[0] - t_start,
           "wall_train_s": t_end - t_start}
    if gaps:
        median = statistics.median(gaps)
        out.update(steady_eps=(len(stamps) - 1) * per_iter / (stamps[-1] - stamps[0]),
                   median_iteration_s=median, median_eps=per_iter / median,
                   min_iteration_s=min(gaps), max_iteration_s=max(gaps))
    return out


def finite(x) -> bool:
    return isinstance(x, (int, float)) and x == x and abs(x) != float("inf")


# --- children: one training run each ----------------------------------------------------------------

def child_rlhf_jax(args) -> dict:
    t_import = time.time()
    import jax
    from rlhf_jax.config import ppo_config
    from rlhf_jax.model_io import save_our_checkpoint
    from rlhf_jax.metrics import read_jsonl_metrics
    from rlhf_jax.models import Transformer, init_params, tiny_config
    from rlhf_jax.stages import ppo
    import_s = time.time() - t_import

    t_setup = time.time()
    root = tempfile.mkdtemp(prefix="ppo_speed_rlhf_jax_", dir=args.tmp)
    tokenizer = make_tokenizer()
    for name, head in (("policy", "lm"), ("rm", "scalar")):
        model = Transformer(tiny_config("gpt2", vocab_size=VOCAB_SIZE, d_model=D_MODEL, n_layers=N_LAYERS,
                                        n_heads=N_HEADS, d_ff=D_FF, max_position=MAX_POSITION, head=head,
                                        pad_token_id=PAD_ID, eos_token_id=EOS_ID))
        save_our_checkpoint(os.path.join(root, name), model, init_params(model, jax.random.key(SEED)),
                            tokenizer)
    prompts_path = os.path.join(root, "prompts.jsonl")
    with open(prompts_path, "w", encoding="utf-8") as f:
        for ids in json.load(open(args.prompts)):
            f.write(json.dumps({"prompt": ids_to_text(ids)}) + "\n")

    cfg = ppo_config()
    cfg.seed = SEED
    cfg.policy_from, cfg.reward_from = os.path.join(root, "policy"), os.path.join(root, "rm")
    cfg.mesh.shape = (1, 1, 1)
    cfg.data.prompts = prompts_path
    cfg.data.max_prompt_len, cfg.data.max_response_len = PROMPT_MAX, NEW_TOKENS
    p = cfg.ppo
    p.iterations = args.iterations
    p.total_episodes = args.iterations * ROLLOUTS
    p.rollout_batch_size, p.minibatch_size, p.epochs = ROLLOUTS, MINIBATCH, EPOCHS
    p.lr = p.value_lr = LR
    p.warmup_iterations = 0
    p.kl_coef, p.kl_controller = KL_COEF, "fixed"
    p.temperature, p.top_k, p.top_p = TEMPERATURE, 0, 1.0
    p.sample_every = p.checkpoint_every = 0
    setup_s = time.time() - t_setup

    workdir = os.path.join(root, "run")
    cache = os.environ.get("RLHF_JAX_BENCH_CACHE")
    warm = bool(cache and os.path.isdir(cache) and os.listdir(cache))
    t_start = time.time()
    if cache:   # what `rlhf-jax ... --compilation-cache DIR` does; inside the timed call
        from rlhf_jax.runtime import enable_compilation_cache
        enable_compilation_cache(cache)
    ppo.train(cfg, workdir)
    t_end = time.time()

    rows = [r for r in read_jsonl_metrics(os.path.join(workdir, "metrics.jsonl")) if "episodes" in r]
    out = iteration_stats(t_start, [r["time"] for r in rows], t_end, ROLLOUTS)
    phases = ("time/rollout_s", "time/experience_s", "time/update_s")
    out["phase_median_s"] = {k: statistics.median(r[k] for r in rows[1:]) for k in phases if k in rows[0]}
    out["phase_first_s"] = {k: rows[0][k] for k in phases if k in rows[0]}
    last = rows[-1]
    out.update(compilation_cache=("warm" if warm else "cold") if cache else "off")
    out.update(import_s=import_s, setup_s=setup_s, episodes=int(last["episodes"]),
               optimizer_steps=len(rows) * EPOCHS * MINIBATCHES,
               final={k: last.get(k) for k in ("loss/policy_avg", "loss/value_avg", "objective/kl",
                                               "objective/scores", "policy/approxkl_avg",
                                               "response/length_mean")})
    out["trained"] = (out["episodes"] == args.iterations * ROLLOUTS
                      and all(finite(last.get(k)) for k in ("loss/policy_avg", "loss/value_avg")))
    return out


def child_trl(args) -> dict:
    t_import = time.time()
    import copy
    import torch
    from datasets import Dataset
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    import_s = time.time() - t_import
    torch.set_num_threads(args.threads)

    t_setup = time.time()
    tokenizer = make_tokenizer()
    gcfg = dict(vocab_size=VOCAB_SIZE, n_positions=MAX_POSITION, n_embd=D_MODEL, n_layer=N_LAYERS,
                n_head=N_HEADS, n_inner=D_FF, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    torch.manual_seed(SEED)
    policy = GPT2LMHeadModel(GPT2Config(**gcfg))
    ref_policy = copy.deepcopy(policy)
    torch.manual_seed(SEED)
    reward = GPT2ForSequenceClassification(GPT2Config(num_labels=1, **gcfg))
    value = copy.deepcopy(reward)
    train_ds = Dataset.from_dict({"input_ids": json.load(open(args.prompts))})
    out_dir = tempfile.mkdtemp(prefix="ppo_speed_trl_", dir=args.tmp)
    config = PPOConfig(
        output_dir=out_dir, report_to="none", save_strategy="no", eval_strategy="no", logging_steps=1,
        disable_tqdm=True, bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
        seed=SEED, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        per_device_train_batch_size=ROLLOUTS, gradient_accumulation_steps=1,
        num_mini_batches=MINIBATCHES, num_ppo_epochs=EPOCHS, local_rollout_forward_batch_size=ROLLOUTS,
        total_episodes=args.iterations * ROLLOUTS, response_length=NEW_TOKENS, temperature=TEMPERATURE,
        kl_coef=KL_COEF, kl_estimator="k1", stop_token="eos", missing_eos_penalty=None,
        whiten_rewards=False, cliprange=0.2, cliprange_value=0.2, gamma=1.0, lam=0.95,
        num_sample_generations=0, dataloader_num_workers=0)
    setup_s = time.time() - t_setup

    stamps: list[float] = []
    logs: list[dict] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            stamps.append(time.time())

        def on_log(self, a, state, control, logs=None, **kw):
            if logs:
                history.append(dict(logs))

    history = logs
    t_start = time.time()
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                         reward_model=reward, value_model=value, train_dataset=train_ds,
                         callbacks=[Stamp()])
    assert config.local_mini_batch_size == MINIBATCH and config.batch_size == ROLLOUTS
    trainer.train()
    t_end = time.time()

    out = iteration_stats(t_start, stamps, t_end, ROLLOUTS)
    last = [l for l in logs if "loss/policy_avg" in l][-1]
    out.update(import_s=import_s, setup_s=setup_s, episodes=int(last["episode"]),
               optimizer_steps=len(stamps) * EPOCHS * MINIBATCHES,
               final={k: last.get(k) for k in ("loss/policy_avg", "loss/value_avg", "objective/kl",
                                               "objective/scores", "policy/approxkl_avg",
                                               "val/num_eos_tokens")})
    out["trained"] = (out["episodes"] == args.iterations * ROLLOUTS
                      and all(finite(last.get(k)) for k in ("loss/policy_avg", "loss/value_avg")))
    return out


def _tunix_gpt2():
    """A GPT-2 (learned positions, pre-LayerNorm, tanh-GELU, tied LM head) in flax.nnx that speaks
    Tunix's model protocol: ``model(tokens, positions, cache, attention_mask) -> (out, cache)``
    with a ``{layer_i: {k, v, end_index}}`` KV cache and ``config.num_layers / num_kv_heads /
    head_dim``; ``head='scalar'`` returns one score per position ([B, T, 1]) for RM / critic."""
    import dataclasses
    import jax
    import jax.numpy as jnp
    from flax import nnx

    @dataclasses.dataclass(frozen=True)
    class Config:
        vocab_size: int = VOCAB_SIZE
        d_model: int = D_MODEL
        num_layers: int = N_LAYERS
        num_heads: int = N_HEADS
        d_ff: int = D_FF
        max_position: int = MAX_POSITION
        dtype: object = jnp.float32

        @property
        def num_kv_heads(self) -> int:
            return self.num_heads

        @property
        def head_dim(self) -> int:
            return self.d_model // self.num_heads

    class Block(nnx.Module):
        def __init__(self, c: Config, rngs: nnx.Rngs):
            init = nnx.initializers.normal(0.02)
            self.c = c
            self.ln1 = nnx.LayerNorm(c.d_model, epsilon=1e-5, rngs=rngs)
            self.qkv = nnx.Linear(c.d_model, 3 * c.d_model, kernel_init=init, rngs=rngs)
            self.proj = nnx.Linear(c.d_model, c.d_model, kernel_init=init, rngs=rngs)
            self.ln2 = nnx.LayerNorm(c.d_model, epsilon=1e-5, rngs=rngs)
            self.fc = nnx.Linear(c.d_model, c.d_ff, kernel_init=init, rngs=rngs)
            self.fc_out = nnx.Linear(c.d_ff, c.d_model, kernel_init=init, rngs=rngs)

        def __call__(self, x, cache, mask):
            b, t, _ = x.shape
            h, hd = self.c.num_heads, self.c.head_dim
            q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
            q, k, v = (a.reshape(b, t, h, hd) for a in (q, k, v))
            new_cache = None
            if cache is not None:
                start = (0, cache["end_index"][0], 0, 0)
                k = jax.lax.dynamic_update_slice(cache["k"], k, start)
                v = jax.lax.dynamic_update_slice(cache["v"], v, start)
                new_cache = {"k": k, "v": v, "end_index": cache["end_index"] + t}
            scores = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(jnp.float32(hd))
            if mask is not None:
                scores = jnp.where(mask[:, None, :, :], scores, jnp.finfo(scores.dtype).min)
            attn = jax.nn.softmax(scores, axis=-1)
            y = jnp.einsum("bhts,bshd->bthd", attn, v).reshape(b, t, h * hd)
            x = x + self.proj(y)
            x = x + self.fc_out(jax.nn.gelu(self.fc(self.ln2(x)), approximate=True))
            return x, new_cache

    class GPT2(nnx.Module):
        def __init__(self, c: Config, head: str, rngs: nnx.Rngs):
            self.config, self.head = c, head
            self.wte = nnx.Embed(c.vocab_size, c.d_model, embedding_init=nnx.initializers.normal(0.02),
                                 rngs=rngs)
            self.wpe = nnx.Embed(c.max_position, c.d_model, embedding_init=nnx.initializers.normal(0.01),
                                 rngs=rngs)
            self.blocks = nnx.List([Block(c, rngs) for _ in range(c.num_layers)])
            self.ln_f = nnx.LayerNorm(c.d_model, epsilon=1e-5, rngs=rngs)
            if head == "scalar":
                self.score = nnx.Linear(c.d_model, 1, use_bias=False,
                                        kernel_init=nnx.initializers.normal(0.02), rngs=rngs)

        @property
        def num_embed(self) -> int:
            return self.config.vocab_size

        def init_cache(self, batch_size: int, cache_size: int, dtype):
            shape = (batch_size, cache_size, self.config.num_kv_heads, self.config.head_dim)
            return {f"layer_{i}": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
                                   "end_index": jnp.zeros((batch_size,), jnp.int32)}
                    for i in range(self.config.num_layers)}

        def __call__(self, input_tokens, positions, cache=None, attention_mask=None, segment_ids=None):
            del segment_ids   # the attention mask already hides the padding
            x = self.wte(input_tokens) + self.wpe(positions)
            new_cache = None if cache is None else {}
            for i, block in enumerate(self.blocks):
                x, layer_cache = block(x, None if cache is None else cache[f"layer_{i}"], attention_mask)
                if cache is not None:
                    new_cache[f"layer_{i}"] = layer_cache
            x = self.ln_f(x)
            if self.head == "scalar":
                return self.score(x), new_cache
            return self.wte.attend(x), new_cache

    return Config, GPT2


def child_tunix(args) -> dict:
    t_import = time.time()
    import jax
    import optax
    from flax import nnx
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.ppo import ppo_learner
    from tunix.rl.rollout import base_rollout
    import_s = time.time() - t_import

    t_setup = time.time()
    Config, GPT2 = _tunix_gpt2()
    c = Config()
    policy = GPT2(c, "lm", nnx.Rngs(SEED))
    reference = GPT2(c, "lm", nnx.Rngs(SEED))
    reward = GPT2(c, "scalar", nnx.Rngs(SEED))
    critic = GPT2(c, "scalar", nnx.Rngs(SEED))
    tokenizer = make_tokenizer()
    prompts = [ids_to_text(ids) for ids in json.load(open(args.prompts))]
    rng = random.Random(SEED)
    batches, order = [], []
    for _ in range(args.iterations):          # epochs over the 64 prompts, reshuffled each time
        if len(order) < ROLLOUTS:
            order += rng.sample(range(len(prompts)), len(prompts))
        batches.append({"prompts": [prompts[i] for i in order[:ROLLOUTS]]})
        order = order[ROLLOUTS:]
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    optimizer = lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(LR, b1=0.9, b2=0.95))
    Role = rl_cluster_lib.Role
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={r: mesh for r in (Role.ACTOR, Role.CRITIC, Role.REFERENCE, Role.REWARD, Role.ROLLOUT)},
        rollout_engine="vanilla", offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optimizer(), critic_optimizer=optimizer(), eval_every_n_steps=10**9,
            max_steps=10**9, mini_batch_size=ROLLOUTS, train_micro_batch_size=MINIBATCH,
            rollout_micro_batch_size=ROLLOUTS, compute_logps_micro_batch_size=ROLLOUTS,
            metrics_logging_options=None, checkpoint_root_directory=None, pbar_description=None),
        rollout_config=base_rollout.RolloutConfig(
            max_tokens_to_generate=NEW_TOKENS, max_prompt_length=PROMPT_MAX,
            kv_cache_size=PROMPT_MAX + NEW_TOKENS, temperature=TEMPERATURE, top_p=1.0, top_k=None,
            eos_tokens=[EOS_ID], seed=SEED))
    algo_config = ppo_learner.PPOConfig(
        num_iterations=EPOCHS, gamma=1.0, gae_lambda=0.95, beta=KL_COEF, kl_method="kl",
        epsilon=0.2, clip_range_value=0.2, entropy_coef=None)
    setup_s = time.time() - t_setup

    scalars: dict[str, list[float]] = {}
    jax.monitoring.register_scalar_listener(
        lambda name, value, **kw: scalars.setdefault(name, []).append(float(value)))
    stamps: list[float] = []
    consumed = [0]

    def counted():
        for batch in batches:
            consumed[0] += len(batch["prompts"])
            yield batch

    t_start = time.time()
    cluster = rl_cluster_lib.RLCluster(actor=policy, critic=critic, reference=reference, reward=reward,
                                       tokenizer=tokenizer, cluster_config=cluster_config)
    learner = ppo_learner.PPOLearner(rl_cluster=cluster, ppo_config=algo_config, data_shuffle_seed=SEED)
    run_global_step = learner._run_global_step

    def stamped(*a, **kw):
        result = run_global_step(*a, **kw)
        stamps.append(time.time())
        return result

    learner._run_global_step = stamped
    learner.train(counted())
    jax.block_until_ready(nnx.state(cluster.actor_trainer.model))
    t_end = time.time()

    out = iteration_stats(t_start, stamps, t_end, ROLLOUTS)
    last = lambda suffix: next((v[-1] for k, v in scalars.items() if k.endswith(suffix)), None)
    actor_loss = last("actor/train/loss")
    critic_loss = last("critic/train/loss")
    out.update(import_s=import_s, setup_s=setup_s, episodes=consumed[0],
               optimizer_steps=int(cluster.actor_trainer.train_steps),
               final={"actor/train/loss": actor_loss, "critic/train/loss": critic_loss,
                      "rewards/train/reward_kl_penalty": last("rewards/train/reward_kl_penalty"),
                      "rewards/train/score/mean": last("rewards/train/score/mean"),
                      "generation/train/completions/mean_length":
                          last("generation/train/completions/mean_length")},
               compile_events=len(scalars.get("/jax/core/compile/backend_compile_duration", [])))
    out["trained"] = (consumed[0] == args.iterations * ROLLOUTS and len(stamps) == args.iterations
                      and finite(actor_loss) and finite(critic_loss))
    return out


def child_peak(args) -> dict:
    """fp32 matmul peak, GFLOP/s: best (and median) of 10 timed 2048^3 products."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    n, reps = 2048, 10
    flop = 2 * n ** 3
    out = {}
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        dot(a, a).block_until_ready()
        times.append(time.perf_counter() - t)
    out["jax_gflops_best"] = flop / min(times) / 1e9
    out["jax_gflops_median"] = flop / statistics.median(times) / 1e9
    ta = torch.randn(n, n)
    torch.mm(ta, ta)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(ta, ta)
        times.append(time.perf_counter() - t)
    out["torch_gflops_best"] = flop / min(times) / 1e9
    out["torch_gflops_median"] = flop / statistics.median(times) / 1e9
    return out


CHILDREN = {"rlhf_jax": child_rlhf_jax, "trl": child_trl, "tunix": child_tunix, "peak": child_peak}


# --- the parent -----------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict:
    from importlib import metadata
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "trl",
                 "accelerate", "datasets", "google-tunix", "rlhf_jax"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state() -> dict:
    """The code measured: other work may sit uncommitted in the same checkout during a run."""
    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True).stdout
    return {"commit": git("rev-parse", "HEAD").strip(),
            "uncommitted": [l[3:] for l in git("status", "--porcelain", "--untracked-files=no").splitlines()]}


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               OMP_WAIT_POLICY="PASSIVE", TRL_EXPERIMENTAL_SILENCE="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_child(kind: str, args, tmp: str, prompts_path: str, log_dir: str, tag: str) -> dict:
    result_path = os.path.join(tmp, f"{tag}.json")
    log_path = os.path.join(log_dir, f"{tag}.log")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--result", result_path,
           "--prompts", prompts_path, "--iterations", str(args.iterations), "--threads", str(args.threads),
           "--size", args.size,
           "--tmp", tmp]
    cpus = sorted(os.sched_getaffinity(0))[:args.threads]
    code = git_state()   # per run: other work may commit while a long comparison runs
    load_before = os.getloadavg()
    t0 = time.time()
    env = child_env(args.threads)
    if kind == "rlhf_jax" and args.compilation_cache:
        env["RLHF_JAX_BENCH_CACHE"] = os.path.abspath(args.compilation_cache)
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            returncode = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        preexec_fn=lambda: os.sched_setaffinity(0, cpus), cwd=REPO,
                                        timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:   # recorded as a failed run; the other runs go on
            returncode = f"killed after --timeout {args.timeout} s"
    wall = time.time() - t0
    out = {"returncode": returncode, "wall_process_s": wall, "git": code,
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "log": log_path}
    if returncode == 0 and os.path.exists(result_path):
        out.update(json.load(open(result_path)))
    else:
        out["error_tail"] = open(log_path, encoding="utf-8", errors="replace").read()[-3000:]
    print(f"[{tag}] rc={returncode} wall_process={wall:.1f}s steady_eps={out.get('steady_eps')} "
          f"wall_train={out.get('wall_train_s')} trained={out.get('trained')} load={load_before}",
          flush=True)
    return out


def ratio(a, b):
    return a / b if a and b else None


def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def nth(items, i):
    return items[i] if items is not None and i < len(items) else None


def build_report(args, runs: dict, started: str, peak_before: dict, peak_after: dict | None,
                 loadavg_start, loadavg_end) -> dict:
    pairs = []
    for i in range(args.pairs):
        row = {}
        ours = nth(runs.get("rlhf_jax"), i) or {}
        for other in ("trl", "tunix"):
            theirs = nth(runs.get(other), i)
            if not ours or not theirs:
                continue
            row[f"steady_eps_ratio_rlhf_jax_over_{other}"] = ratio(ours.get("steady_eps"), theirs.get("steady_eps"))
            row[f"median_eps_ratio_rlhf_jax_over_{other}"] = ratio(ours.get("median_eps"), theirs.get("median_eps"))
            row[f"wall_train_ratio_rlhf_jax_over_{other}"] = ratio(ours.get("wall_train_s"), theirs.get("wall_train_s"))
            row[f"wall_process_ratio_rlhf_jax_over_{other}"] = ratio(ours.get("wall_process_s"),
                                                                     theirs.get("wall_process_s"))
        pairs.append(row)
    summary = {}
    for system, rs in runs.items():
        summary[system] = {k: median_or_none([r.get(k) for r in rs]) for k in
                           ("steady_eps", "median_eps", "first_iteration_s", "wall_train_s", "wall_process_s")}
        summary[system]["all_trained"] = all(r.get("trained") for r in rs)
    for key in sorted({k for row in pairs for k in row}):
        summary[key] = median_or_none([row.get(key) for row in pairs])
    if "rlhf_jax" in runs:
        phases = {}
        for r in runs["rlhf_jax"]:
            for k, v in (r.get("phase_median_s") or {}).items():
                phases.setdefault(k, []).append(v)
        summary["rlhf_jax"]["phase_median_s"] = {k: statistics.median(v) for k, v in phases.items()}

    return {
        "command": "python bench/ppo_speed.py " + " ".join(sys.argv[1:]),
        # False in the copy written after every run: a run cut short still leaves its numbers
        "complete": peak_after is not None,
        "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
                    "cpus_used": sorted(os.sched_getaffinity(0))[:args.threads], "threads": args.threads,
                    "platform": platform.platform(),
                    "matmul_fp32_2048_before": {k: v for k, v in peak_before.items() if "gflops" in k},
                    "matmul_fp32_2048_after": {k: v for k, v in (peak_after or {}).items() if "gflops" in k},
                    "loadavg_start": loadavg_start, "loadavg_end": loadavg_end},
        "versions": versions(),
        "git": git_state(),
        "workload": {"size": args.size,
                     "model": {"arch": "gpt2", "n_layers": N_LAYERS, "d_model": D_MODEL, "n_heads": N_HEADS,
                               "d_ff": D_FF, "max_position": MAX_POSITION, "vocab_size": VOCAB_SIZE},
                     "prompts": {"n": N_PROMPTS, "min_len": PROMPT_MIN, "max_len": PROMPT_MAX, "seed": SEED},
                     "iterations": args.iterations, "rollouts_per_iteration": ROLLOUTS,
                     "episodes": args.iterations * ROLLOUTS, "new_tokens": NEW_TOKENS,
                     "temperature": TEMPERATURE, "ppo_epochs": EPOCHS, "minibatches": MINIBATCHES,
                     "minibatch_size": MINIBATCH, "kl_coef": KL_COEF, "lr": LR,
                     "thread_settings": "sched_setaffinity(first N CPUs), OMP/MKL/OPENBLAS_NUM_THREADS=N, "
                                        "OMP_WAIT_POLICY=PASSIVE, torch.set_num_threads(N), JAX_PLATFORMS=cpu",
                     "differences": differences()},
        "definitions": {
            "steady_eps": "(iterations-1)*16 / (end of last iteration - end of first iteration)",
            "median_eps": "16 / median iteration time over iterations >= 2",
            "first_iteration_s": "start of the training call -> end of iteration 1 (setup + compile + it. 1)",
            "wall_train_s": "start of the training call -> end (see docstring for what each call covers)",
            "wall_process_s": "parent: child start -> exit (imports, model init, training call, teardown)",
            "ratios": "rlhf_jax value / other value: eps ratios > 1 and wall ratios < 1 favour rlhf_jax",
        },
        "summary": summary,
        "pairs": pairs,
        "runs": runs,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_out_argument(ap, "ppo_speed")
    ap.add_argument("--pairs", type=int, default=2, help="A B C rounds")
    ap.add_argument("--systems", default=",".join(ALL_SYSTEMS))
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny",
                    help="tiny: 2 layers, d_model 64, 16+24-token sequences; gpt2_124m: GPT-2 small "
                         "(12 layers, d_model 768, vocabulary 50,257), 64+64-token sequences")
    ap.add_argument("--iterations", type=int, default=None,
                    help="PPO iterations per run (default: 32 tiny, 3 gpt2_124m)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per child run")
    ap.add_argument("--log-dir", default="", help="keep the child logs here (default: a temp dir, removed)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (models, run dirs)")
    ap.add_argument("--compilation-cache", default="", metavar="DIR",
                    help="rlhf_jax runs use JAX's persistent compilation cache in DIR, as a user "
                         "re-running a command does: the first run fills it (cold), later runs "
                         "load the compiled steps (warm); each run records which it was")
    # child mode
    ap.add_argument("--child", choices=sorted(CHILDREN))
    ap.add_argument("--result")
    ap.add_argument("--prompts")
    ap.add_argument("--tmp")
    args = ap.parse_args(argv)
    use_size(args.size)
    if args.iterations is None:
        args.iterations = SIZES[args.size]["ITERATIONS"]

    if args.child:
        result = CHILDREN[args.child](args)
        with open(args.result, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        return

    out = out_path(args.out, "ppo_speed")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(ALL_SYSTEMS)
    if unknown:
        raise SystemExit(f"--systems: unknown {sorted(unknown)}; choose from {ALL_SYSTEMS}")
    tmp = tempfile.mkdtemp(prefix="ppo_speed_")
    log_dir = args.log_dir or os.path.join(tmp, "logs")
    os.makedirs(log_dir, exist_ok=True)
    prompts_path = os.path.join(tmp, "prompts.json")
    with open(prompts_path, "w", encoding="utf-8") as f:
        json.dump(make_prompts(), f)

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    loadavg_start = os.getloadavg()
    peak_before = run_child("peak", args, tmp, prompts_path, log_dir, "peak_before")
    runs = {s: [] for s in systems}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for pair in range(args.pairs):
        for system in systems:
            runs[system].append(run_child(system, args, tmp, prompts_path, log_dir, f"{system}_{pair}"))
            with open(out, "w", encoding="utf-8") as f:
                json.dump(build_report(args, runs, started, peak_before, None, loadavg_start,
                                       os.getloadavg()), f, indent=1)
    peak_after = run_child("peak", args, tmp, prompts_path, log_dir, "peak_after")
    loadavg_end = os.getloadavg()

    report = build_report(args, runs, started, peak_before, peak_after, loadavg_start, loadavg_end)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    if not args.keep_tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(report["summary"], indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
