"""Generation speed: rlhf_jax's rollout sampler, transformers' ``generate`` and Tunix's sampler.

A benchmark, not a test. Run it from the repository root::

    python bench/generate_speed.py [--out F] [--pairs N] [--systems rlhf_jax,transformers,tunix]
        [--batches 1,16,64] [--size gpt2_124m|tiny] [--calls 3] [--early-stop-workdir DIR]

(``pip install -e .[bench]`` brings torch, transformers and TRL; Tunix 0.1.7 is installed with
``--no-deps`` as setup.py says. ``--dry-run`` prints the order of the runs and the output path.)

Workload, the same for every system:

* One random GPT-2 (``--size gpt2_124m``: 12 layers, d_model 768, 12 heads, d_ff 3072, vocabulary
  50,257, 1024 positions; ``tiny``: 2 layers, d 64, vocabulary 512, for trying the script),
  initialized once by rlhf_jax (``init_params``, seed 0) and saved in its layout; transformers
  reads the export of ``rlhf_jax.convert.orbax_to_hf`` (torch, float32, its default attention);
  Tunix runs the same export loaded into the flax.nnx GPT-2 of bench/ppo_speed.py (Tunix 0.1.7
  ships no GPT-2). Each child compares its next-token logits for prompt 0 with rlhf_jax's
  (``logits_max_abs_diff_vs_rlhf_jax``), so all three run the same network.
* 64 prompts of 64 random token ids (seed 0, ids 1..V-1, no padding); a batch of B takes the
  first B. 64 new tokens per prompt, temperature 0.7, top-k and top-p off, float32.
* No EOS stop, so every system decodes exactly 64 tokens: the end-of-sequence id passed to each
  sampler is V (= vocab_size), an id outside the vocabulary that no sampler can draw; every
  system still runs its per-step EOS check. Each run checks it got B x 64 new tokens.

What is timed: one call of the system's sampling API, from token ids (Tunix: prompt strings,
its API's input; its tokenization and decoding are inside the call) to the new tokens on the
host: rlhf_jax ``sampling.make_generate_fn`` compiled as PPO compiles its rollout step
(``runtime.cpu_compiler_options()``), ``model.generate(..., do_sample=True)`` under
``torch.inference_mode()``, Tunix ``Sampler.__call__``. ``cold_s`` is the first call of the
process at that batch size, compilation included (rlhf_jax: lower + compile + call; Tunix: its
jits compile inside the call; no persistent compilation cache for either); ``warm_s`` the median
of ``--calls`` calls after it (a new seed each call). New tokens/s = B x 64 / seconds.

Protocol (as bench/ppo_speed.py): each (system, batch) run is its own subprocess, started in the
order A B C for batch 1, A B C for batch 16, ... and the whole round ``--pairs`` times, so a slow
drift of the machine's load hits every system alike; every child has the same thread settings
(ppo_speed.child_env: affinity to the first ``--threads`` CPUs, OMP_WAIT_POLICY=PASSIVE,
OMP/MKL threads, ``torch.set_num_threads``, JAX_PLATFORMS=cpu); the fp32 matmul peak is measured
before and after, and the load average before and after every run.

Early stop (``--early-stop-workdir DIR``, a finished ``rlhf-jax pipeline`` workdir of the tiny
config): rlhf_jax's sampler on that run's PPO init (``sft_ptx/model``) and final PPO policy
(``ppo/model``), on its PPO prompts, at its rollout batch, response length and sampling settings,
with the policy's EOS (the loop stops when every sequence has ended) and with
``eos_token_id=None`` (all ``max_response_len`` steps), alternated batch by batch: decode steps
run and seconds per call, in ``early_stop``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from out_path import add_out_argument, out_path
from ppo_speed import (REPO, child_env, child_peak, cpu_model, git_state, median_or_none, ratio,
                       versions)

ALL_SYSTEMS = ("rlhf_jax", "transformers", "tunix")
SIZES = {
    "gpt2_124m": dict(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
                      max_position=1024),
    "tiny": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, d_ff=256, max_position=256),
}
PROMPT_LEN, NEW_TOKENS, N_PROMPTS, TEMPERATURE, SEED = 64, 64, 64, 0.7, 0
PAD_ID = 0   # the tokenizer's pad (Tunix masks it); prompts never contain it

DIFFERENCES = [
    "Decode forward passes per call: rlhf_jax prefills the first 63 prompt tokens and runs 64 "
    "one-token steps (the last prompt token is fed by the first step); transformers prefills 64 "
    "and runs 63 steps (the prefill's last logits give the first token); Tunix prefills 64 and "
    "its loop runs 64 steps, the last one sampling a token past its buffer that it drops.",
    "Attention span per decode step: rlhf_jax and Tunix attend over a static cache of 128 slots "
    "(masked); transformers' dynamic cache grows from 65 to 127 keys.",
    "Prefill logits: rlhf_jax computes none for the prompt (the LM head drops out of its "
    "prefill); transformers computes the last position's only (logits_to_keep=1); the nnx "
    "GPT-2 driven by Tunix returns [B, 64, V] (Tunix 0.1.7's sampler asks a model for the last "
    "position only where it accepts decode_only_last_token, which only its gemma4 does).",
    "Tunix's call takes strings: it tokenizes the prompts and detokenizes the 64 new tokens of "
    "each row with the benchmark's word-level tokenizer inside the timed call.",
    "Sampling draws differ (each system's RNG); the distribution is the same: softmax(logits / "
    "0.7) over the whole vocabulary.",
]


def size_config(size: str) -> dict:
    return dict(SIZES[size])


def make_prompts(vocab_size: int, seed: int = SEED) -> list[list[int]]:
    import numpy as np
    rng = np.random.default_rng(seed)
    return rng.integers(1, vocab_size, (N_PROMPTS, PROMPT_LEN)).astype(int).tolist()


def make_tokenizer(vocab_size: int):
    """A word-level tokenizer of ``vocab_size`` names (``<pad>``, t1, t2, ...): what Tunix's
    string-in sampler needs to turn the prompt ids into text and back."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    names = ["<pad>"] + [f"t{i}" for i in range(1, vocab_size)]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(names)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
    out.padding_side = "left"
    return out


def ids_to_text(ids: list[int]) -> str:
    return " ".join(f"t{i}" for i in ids)


def tokens_per_s(batch: int, seconds: float | None) -> float | None:
    return batch * NEW_TOKENS / seconds if seconds else None


# --- children ------------------------------------------------------------------------------------

def child_setup(args) -> dict:
    """The one set of weights: rlhf_jax's random init (seed 0), saved in our layout and exported
    with ``convert.orbax_to_hf``."""
    import jax
    from rlhf_jax.convert import orbax_to_hf
    from rlhf_jax.model_io import save_our_checkpoint
    from rlhf_jax.models import Transformer, init_params, tiny_config
    t = time.time()
    model = Transformer(tiny_config("gpt2", **size_config(args.size), pad_token_id=PAD_ID))
    params = init_params(model, jax.random.key(SEED))
    save_our_checkpoint(os.path.join(args.tmp, "rlhf_jax"), model, params)
    orbax_to_hf(os.path.join(args.tmp, "rlhf_jax"), os.path.join(args.tmp, "hf"))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    return {"setup_s": time.time() - t, "n_params": int(n_params)}


def _timed_calls(call, n_calls: int) -> dict:
    """``call(i)`` once (cold) then ``n_calls`` more; each returns the new-token count it got."""
    t = time.perf_counter()
    counts = [call(0)]
    cold = time.perf_counter() - t
    warm = []
    for i in range(1, n_calls + 1):
        t = time.perf_counter()
        counts.append(call(i))
        warm.append(time.perf_counter() - t)
    return {"cold_s": cold, "warm_calls_s": warm, "warm_s": statistics.median(warm),
            "new_tokens_per_call": counts}


def child_rlhf_jax(args) -> dict:
    t_import = time.time()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from rlhf_jax.model_io import load_our_checkpoint
    from rlhf_jax.runtime import cpu_compiler_options
    from rlhf_jax.sampling import SamplingConfig, make_generate_fn
    import_s = time.time() - t_import

    t_load = time.time()
    model, params, _ = load_our_checkpoint(os.path.join(args.tmp, "rlhf_jax"), with_tokenizer=False)
    jax.block_until_ready(params)
    load_s = time.time() - t_load
    ids = jnp.asarray(json.load(open(args.prompts))[:args.batch], jnp.int32)
    mask = jnp.ones_like(ids)
    np.save(args.logits, np.asarray(model.apply({"params": params}, ids[:1])[0, -1], np.float32))
    cfg = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=TEMPERATURE, top_k=0, top_p=1.0,
                         eos_token_id=model.config.vocab_size, pad_token_id=PAD_ID)
    fn = make_generate_fn(model, cfg)
    compiled = []

    def call(i):
        rng = jax.random.key(i)
        if not compiled:
            compiled.append(fn.lower(params, ids, mask, rng).compile(
                compiler_options=cpu_compiler_options()))
        out = jax.device_get(compiled[0](params, ids, mask, rng))
        assert int(out["n_steps"]) == NEW_TOKENS
        return int(out["response_mask"].sum())

    out = _timed_calls(call, args.calls)
    out.update(import_s=import_s, load_s=load_s, compiler_options=cpu_compiler_options())
    return out


def child_transformers(args) -> dict:
    t_import = time.time()
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM
    import_s = time.time() - t_import
    torch.set_num_threads(args.threads)

    t_load = time.time()
    model = AutoModelForCausalLM.from_pretrained(os.path.join(args.tmp, "hf"), dtype=torch.float32)
    model.eval()
    load_s = time.time() - t_load
    ids = torch.tensor(json.load(open(args.prompts))[:args.batch], dtype=torch.long)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        np.save(args.logits, model(ids[:1]).logits[0, -1].float().numpy())

    def call(i):
        torch.manual_seed(i)
        with torch.inference_mode():
            seqs = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                  temperature=TEMPERATURE, top_k=0, top_p=1.0,
                                  max_new_tokens=NEW_TOKENS, eos_token_id=model.config.vocab_size,
                                  pad_token_id=PAD_ID)
        assert seqs.shape == (args.batch, PROMPT_LEN + NEW_TOKENS)
        return int(seqs[:, PROMPT_LEN:].numel())

    out = _timed_calls(call, args.calls)
    out.update(import_s=import_s, load_s=load_s, torch_threads=torch.get_num_threads(),
               attn_implementation=model.config._attn_implementation)
    return out


def load_hf_into_nnx(model, hf_dir: str) -> None:
    """Copy a GPT-2 transformers export (Conv1D weights are [in, out], like nnx kernels) into the
    nnx GPT-2 of bench/ppo_speed.py; the fused c_attn splits into q, k, v as its qkv does."""
    import jax.numpy as jnp
    from safetensors.numpy import load_file
    weights = {}
    for name in sorted(os.listdir(hf_dir)):
        if name.endswith(".safetensors"):
            weights.update({k.removeprefix("transformer."): v
                            for k, v in load_file(os.path.join(hf_dir, name)).items()})
    pairs = [(model.wte.embedding, "wte.weight"), (model.wpe.embedding, "wpe.weight"),
             (model.ln_f.scale, "ln_f.weight"), (model.ln_f.bias, "ln_f.bias")]
    for i, block in enumerate(model.blocks):
        for module, hf_name in ((block.ln1, "ln_1"), (block.ln2, "ln_2")):
            pairs += [(module.scale, f"h.{i}.{hf_name}.weight"), (module.bias, f"h.{i}.{hf_name}.bias")]
        for module, hf_name in ((block.qkv, "attn.c_attn"), (block.proj, "attn.c_proj"),
                                (block.fc, "mlp.c_fc"), (block.fc_out, "mlp.c_proj")):
            pairs += [(module.kernel, f"h.{i}.{hf_name}.weight"), (module.bias, f"h.{i}.{hf_name}.bias")]
    for variable, hf_name in pairs:
        value = weights.pop(hf_name)
        assert value.shape == variable.get_value().shape, (hf_name, value.shape)
        variable.set_value(jnp.asarray(value, jnp.float32))
    leftover = [k for k in weights if k != "lm_head.weight"]   # tied to wte
    assert not leftover, leftover


def child_tunix(args) -> dict:
    t_import = time.time()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from tunix.generate import sampler as sampler_lib
    from ppo_speed import _tunix_gpt2
    import_s = time.time() - t_import

    t_load = time.time()
    size = size_config(args.size)
    Config, GPT2 = _tunix_gpt2()
    c = Config(vocab_size=size["vocab_size"], d_model=size["d_model"], num_layers=size["n_layers"],
               num_heads=size["n_heads"], d_ff=size["d_ff"], max_position=size["max_position"])
    model = GPT2(c, "lm", nnx.Rngs(SEED))
    load_hf_into_nnx(model, os.path.join(args.tmp, "hf"))
    load_s = time.time() - t_load
    prompts = json.load(open(args.prompts))[:args.batch]
    first = jnp.asarray(prompts[:1], jnp.int32)
    causal = jnp.tril(jnp.ones((1, PROMPT_LEN, PROMPT_LEN), bool))
    np.save(args.logits, np.asarray(model(first, jnp.arange(PROMPT_LEN)[None], None, causal)[0][0, -1],
                                    np.float32))
    sampler = sampler_lib.Sampler(
        transformer=model, tokenizer=make_tokenizer(c.vocab_size),
        cache_config=sampler_lib.CacheConfig(cache_size=PROMPT_LEN + NEW_TOKENS,
                                             num_layers=c.num_layers, num_kv_heads=c.num_kv_heads,
                                             head_dim=c.head_dim))
    texts = [ids_to_text(p) for p in prompts]

    def call(i):
        out = sampler(input_strings=texts, max_generation_steps=NEW_TOKENS,
                      max_prompt_length=PROMPT_LEN, echo=False, temperature=TEMPERATURE,
                      top_p=1.0, top_k=None, eos_tokens=[c.vocab_size], seed=i, pad_output=True)
        assert np.array_equal(out.padded_prompt_tokens, prompts)
        assert all(len(t) == NEW_TOKENS for t in out.tokens)
        return int(sum(len(t) for t in out.tokens))

    out = _timed_calls(call, args.calls)
    out.update(import_s=import_s, load_s=load_s)
    return out


def child_early_stop(args) -> dict:
    """Decode steps and time of rlhf_jax's sampler with and without EOS on a trained tiny
    policy (``args.policy``) and its pipeline's PPO prompts and settings."""
    import jax
    import numpy as np
    from rlhf_jax.data.tokenize import tokenize_prompts
    from rlhf_jax.model_io import load_our_checkpoint
    from rlhf_jax.runtime import cpu_compiler_options
    from rlhf_jax.sampling import SamplingConfig, make_generate_fn

    workdir = args.early_stop_workdir
    saved = json.load(open(os.path.join(workdir, "config_pipeline.json")))["ppo"]
    p, data = saved["ppo"], saved["data"]
    batch, n_new = p["rollout_batch_size"], data["max_response_len"]
    model, params, tokenizer = load_our_checkpoint(os.path.join(workdir, args.policy))
    rows = [json.loads(line) for line in open(os.path.join(workdir, "world", "ppo_prompts.jsonl"))]
    arrays, _ = tokenize_prompts(rows[:batch * args.early_stop_batches], tokenizer,
                                 data["max_prompt_len"])
    eos = model.config.eos_token_id
    fns = {}
    for name, eos_id in (("eos", eos), ("no_eos", None)):
        cfg = SamplingConfig(max_new_tokens=n_new, temperature=p["temperature"], top_k=p["top_k"],
                             top_p=p["top_p"], eos_token_id=eos_id,
                             pad_token_id=model.config.pad_token_id)
        args_0 = (params, arrays["input_ids"][:batch], arrays["attention_mask"][:batch],
                  jax.random.key(0))
        fns[name] = make_generate_fn(model, cfg).lower(*args_0).compile(
            compiler_options=cpu_compiler_options())
        jax.block_until_ready(fns[name](*args_0))      # warm-up
    runs = {name: {"s": [], "steps": [], "ended": [], "length": []} for name in fns}
    n_batches = len(arrays["input_ids"]) // batch
    for k in range(n_batches):
        rows_k = slice(k * batch, (k + 1) * batch)
        for name, fn in fns.items():   # alternated batch by batch
            t = time.perf_counter()
            out = jax.device_get(fn(params, arrays["input_ids"][rows_k],
                                    arrays["attention_mask"][rows_k], jax.random.key(k + 1)))
            runs[name]["s"].append(time.perf_counter() - t)
            runs[name]["steps"].append(int(out["n_steps"]))
            mask = np.asarray(out["response_mask"])
            ids = np.asarray(out["response_ids"])
            runs[name]["ended"].append(float(np.mean(np.any((ids == eos) & (mask > 0), axis=1))))
            runs[name]["length"].append(float(mask.sum(axis=1).mean()))
    summary = {name: {"median_call_s": statistics.median(r["s"]), "total_s": sum(r["s"]),
                      "mean_decode_steps": statistics.mean(r["steps"]),
                      "min_decode_steps": min(r["steps"]), "max_decode_steps": max(r["steps"]),
                      "share_ended_with_eos": statistics.mean(r["ended"]),
                      "mean_response_length": statistics.mean(r["length"]), "per_batch": r}
               for name, r in runs.items()}
    on, off = summary["eos"], summary["no_eos"]
    return {"policy": os.path.join(workdir, args.policy), "batches": n_batches,
            "rollout_batch_size": batch, "max_prompt_len": data["max_prompt_len"],
            "max_new_tokens": n_new, "temperature": p["temperature"], "top_k": p["top_k"],
            "top_p": p["top_p"], "eos_token_id": eos, **summary,
            "decode_steps_saved_share": 1 - on["mean_decode_steps"] / n_new,
            "time_saved_share": 1 - on["total_s"] / off["total_s"]}


CHILDREN = {"setup": child_setup, "rlhf_jax": child_rlhf_jax, "transformers": child_transformers,
            "tunix": child_tunix, "early_stop": child_early_stop, "peak": child_peak}


# --- the parent -----------------------------------------------------------------------------------

def plan(systems: list[str], batches: list[int], pairs: int) -> list[tuple[int, int, str]]:
    """(pair, batch, system) in the order the runs start: A B C per batch, batches in turn."""
    return [(pair, batch, system) for pair in range(pairs) for batch in batches for system in systems]


def parse_list(flag: str, value: str, allowed=None, convert=str) -> list:
    items = [v.strip() for v in value.split(",") if v.strip()]
    try:
        items = [convert(v) for v in items]
    except ValueError:
        raise SystemExit(f"{flag}={value!r}: expected a comma-separated list of {convert.__name__}")
    bad = [v for v in items if (allowed is not None and v not in allowed)
           or (convert is int and v < 1)]
    if not items or bad:
        raise SystemExit(f"{flag}={value!r}: " + (f"unknown {bad}; choose from {list(allowed)}"
                                                  if allowed else "expected positive integers"))
    return items


def run_child(kind: str, args, tmp: str, tag: str, **extra) -> dict:
    result_path = os.path.join(tmp, f"{tag}.json")
    log_path = os.path.join(args.log_dir, f"{tag}.log")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--result", result_path,
           "--tmp", tmp, "--size", args.size, "--threads", str(args.threads),
           "--calls", str(args.calls), "--prompts", os.path.join(tmp, "prompts.json")]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    cpus = sorted(os.sched_getaffinity(0))[:args.threads]
    load_before = os.getloadavg()
    t0 = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            returncode = subprocess.run(cmd, env=child_env(args.threads), stdout=log,
                                        stderr=subprocess.STDOUT, cwd=REPO, timeout=args.timeout,
                                        preexec_fn=lambda: os.sched_setaffinity(0, cpus)).returncode
        except subprocess.TimeoutExpired:   # recorded as a failed run; the other runs go on
            returncode = f"killed after --timeout {args.timeout} s"
    out = {"returncode": returncode, "wall_process_s": time.time() - t0,
           "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    if returncode == 0 and os.path.exists(result_path):
        out.update(json.load(open(result_path)))
    else:
        out["error_tail"] = open(log_path, encoding="utf-8", errors="replace").read()[-3000:]
    print(f"[{tag}] rc={returncode} wall={out['wall_process_s']:.1f}s cold={out.get('cold_s')} "
          f"warm={out.get('warm_s')} load={load_before}", flush=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_out_argument(ap, "generate_speed")
    ap.add_argument("--pairs", type=int, default=2, help="rounds of alternated runs")
    ap.add_argument("--systems", default=",".join(ALL_SYSTEMS))
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--size", default="gpt2_124m", choices=sorted(SIZES))
    ap.add_argument("--calls", type=int, default=3, help="warm calls timed after the cold one")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per child run")
    ap.add_argument("--early-stop-workdir", default="", metavar="DIR",
                    help="a finished tiny `rlhf-jax pipeline` workdir: measure what stopping at "
                         "EOS saves on its sft_ptx and ppo policies (default: not measured)")
    ap.add_argument("--early-stop-batches", type=int, default=8,
                    help="rollout batches of its PPO prompts per policy")
    ap.add_argument("--log-dir", default="", help="keep the child logs here (default: a temp dir)")
    ap.add_argument("--dry-run", action="store_true", help="print the runs in order and the "
                                                           "output path; run nothing")
    # child mode
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    for name in ("--result", "--tmp", "--prompts", "--logits", "--policy"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        result = CHILDREN[args.child](args)
        with open(args.result, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        return

    systems = parse_list("--systems", args.systems, ALL_SYSTEMS)
    batches = parse_list("--batches", args.batches, convert=int)
    if max(batches) > N_PROMPTS:
        raise SystemExit(f"--batches={args.batches!r}: at most {N_PROMPTS} (the prompts there are)")
    if args.pairs < 1 or args.calls < 1:
        raise SystemExit(f"--pairs={args.pairs} --calls={args.calls}: expected >= 1 each")
    if args.early_stop_workdir and not os.path.isfile(
            os.path.join(args.early_stop_workdir, "config_pipeline.json")):
        raise SystemExit(f"--early-stop-workdir={args.early_stop_workdir!r}: no "
                         "config_pipeline.json there; expected a finished `rlhf-jax pipeline` workdir")
    out = out_path(args.out, "generate_speed")
    order = plan(systems, batches, args.pairs)
    if args.dry_run:
        for pair, batch, system in order:
            print(f"pair {pair} batch {batch} {system}")
        print(f"would write {out}")
        return

    tmp = tempfile.mkdtemp(prefix="generate_speed_")
    args.log_dir = args.log_dir or os.path.join(tmp, "logs")
    os.makedirs(args.log_dir, exist_ok=True)
    with open(os.path.join(tmp, "prompts.json"), "w", encoding="utf-8") as f:
        json.dump(make_prompts(SIZES[args.size]["vocab_size"]), f)
    print(f"models, prompts and logs in {tmp}", flush=True)

    state = {"command": "python bench/generate_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "loadavg_start": os.getloadavg(),
             "git": git_state(), "runs": {s: {str(b): [] for b in batches} for s in systems},
             "early_stop": {}, "logits": {}}

    def record(key, value):
        """Keep ``value`` and rewrite the JSON, so a run cut short keeps what it measured."""
        state[key] = value
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            json.dump(build_report(args, systems, batches, state), f, indent=1)

    setup = run_child("setup", args, tmp, "setup")
    record("setup", setup)
    if setup["returncode"]:
        raise SystemExit(f"setup failed:\n{setup['error_tail']}")
    record("peak_before", run_child("peak", args, tmp, "peak_before"))
    if args.early_stop_workdir:   # quick (a tiny model): first, so a run cut short keeps it
        for policy in ("sft_ptx/model", "ppo/model"):
            state["early_stop"][policy] = run_child(
                "early_stop", args, tmp, f"early_stop_{policy.split('/')[0]}", policy=policy,
                early_stop_workdir=os.path.abspath(args.early_stop_workdir),
                early_stop_batches=args.early_stop_batches)
            record("early_stop", state["early_stop"])
    for pair, batch, system in order:
        tag = f"{system}_b{batch}_{pair}"
        state["logits"][pair, batch, system] = os.path.join(tmp, f"{tag}_logits.npy")
        state["runs"][system][str(batch)].append(
            run_child(system, args, tmp, tag, batch=batch, logits=state["logits"][pair, batch, system]))
        _compare_logits(state["runs"], state["logits"], order[:order.index((pair, batch, system)) + 1])
        record("runs", state["runs"])
    record("peak_after", run_child("peak", args, tmp, "peak_after"))
    record("finished", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    print(json.dumps(build_report(args, systems, batches, state)["summary"], indent=1))
    print(f"wrote {out} (child logs in {args.log_dir})")


def build_report(args, systems: list[str], batches: list[int], state: dict) -> dict:
    summary, pairs = _summarize(state["runs"], systems, batches, args.pairs)
    peak = lambda key: {k: v for k, v in (state.get(key) or {}).items() if "gflops" in k}
    vocab = SIZES[args.size]["vocab_size"]
    return {
        "command": state["command"], "started": state["started"],
        "finished": state.get("finished", "not yet: the run was cut short or is going on"),
        "git": state["git"],
        "machine": {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
                    "cpus_used": sorted(os.sched_getaffinity(0))[:args.threads], "threads": args.threads,
                    "matmul_fp32_2048_before": peak("peak_before"),
                    "matmul_fp32_2048_after": peak("peak_after"),
                    "loadavg_start": state["loadavg_start"], "loadavg_now": os.getloadavg()},
        "versions": versions(),
        "workload": {"size": args.size, "model": SIZES[args.size],
                     "n_params": (state.get("setup") or {}).get("n_params"),
                     "prompts": N_PROMPTS, "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS,
                     "temperature": TEMPERATURE, "top_k": "off", "top_p": "off", "dtype": "float32",
                     "eos": f"id {vocab} (= vocab_size, outside the vocabulary): never sampled, so "
                            f"every call decodes {NEW_TOKENS} tokens",
                     "calls": f"1 cold + {args.calls} warm per run", "differences": DIFFERENCES},
        "definitions": {
            "cold_s": "first sampling call of the process at this batch (compilation included)",
            "warm_s": "median of the calls after it",
            "tokens_per_s": "batch x 64 new tokens / seconds",
            "ratios": "rlhf_jax tokens/s / other's tokens/s in the same pair (> 1: rlhf_jax is faster)",
        },
        "setup": state.get("setup"),
        "summary": summary,
        "pairs": pairs,
        "early_stop": state["early_stop"] or "not measured (no --early-stop-workdir)",
        "runs": state["runs"],
    }


def _compare_logits(runs: dict, logits: dict, order: list) -> None:
    """Each run's next-token logits for prompt 0 against rlhf_jax's of the same pair and batch."""
    import numpy as np
    for pair, batch, system in order:
        ours, theirs = logits.get((pair, batch, "rlhf_jax")), logits[pair, batch, system]
        if system != "rlhf_jax" and ours and os.path.exists(ours) and os.path.exists(theirs):
            runs[system][str(batch)][pair]["logits_max_abs_diff_vs_rlhf_jax"] = float(
                np.max(np.abs(np.load(theirs) - np.load(ours))))


def _summarize(runs: dict, systems: list[str], batches: list[int], n_pairs: int):
    summary = {}
    for system in systems:
        summary[system] = {}
        for b in batches:
            rs = runs[system][str(b)]
            cold, warm = median_or_none([r.get("cold_s") for r in rs]), median_or_none([r.get("warm_s") for r in rs])
            summary[system][str(b)] = {"cold_s": cold, "warm_s": warm,
                                       "cold_tokens_per_s": tokens_per_s(b, cold),
                                       "warm_tokens_per_s": tokens_per_s(b, warm),
                                       "all_ok": all(r.get("returncode") == 0 for r in rs)}
    pairs = []
    for i in range(n_pairs):
        row = {}
        for b in batches:
            ours = runs.get("rlhf_jax", {}).get(str(b), [])
            for other in systems:
                theirs = runs[other][str(b)]
                if other == "rlhf_jax" or len(ours) <= i or len(theirs) <= i:
                    continue   # a system not compared, or a run cut short
                a, o = ours[i], theirs[i]
                for kind in ("warm", "cold"):
                    row[f"b{b}_{kind}_ratio_rlhf_jax_over_{other}"] = ratio(
                        tokens_per_s(b, a.get(f"{kind}_s")), tokens_per_s(b, o.get(f"{kind}_s")))
        pairs.append(row)
    for key in sorted({k for row in pairs for k in row}):
        summary[key] = median_or_none([row.get(key) for row in pairs])
    return summary, pairs


if __name__ == "__main__":
    main()
