"""One process of the multi-host equivalence test (tests/e2e/test_multihost.py).

    python tests/multihost_worker.py --data DIR --workdir DIR --devices 4 \
        [--coordinator_address 127.0.0.1:PORT --num_processes 2 --process_id I]

Runs SFT and RM (from the initial models ``write_data`` drew), PPO-ptx (one iteration, from their
outputs) and eval, on a mesh over every device of the job, through the stages' real ``train``
functions, and saves what it saw to ``WORKDIR/results_<process>.npz``. Started once with 8 devices (the reference) and as two
processes with 4 devices each; the test compares the two runs.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

WORDS = [f"w{i}" for i in range(16)]
SPECIAL = ["<pad>", "<eos>", "<unk>", "instruction", ":", "repeat", "reverse", "response", "say"]
VOCAB = {t: i for i, t in enumerate(SPECIAL + WORDS)}

PROMPT_LEN, RESPONSE_LEN = 10, 6
EVAL_PROMPTS = 20            # not a multiple of the eval batch: the last batch is padded
EVAL_BATCH = 8


# --- data (plain Python: the test writes it before any worker starts) ---------------------------

def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_data(root: str) -> None:
    """Tokenizer, demonstrations, K-way comparisons, PPO prompts and pretraining text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    os.makedirs(root, exist_ok=True)
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(os.path.join(root, "tok"))
    r = random.Random(0)
    demos = []
    for _ in range(120):
        xs = r.choices(WORDS, k=r.randint(1, 4))
        op = r.choice(["repeat", "reverse"])
        demos.append({"prompt": f"instruction : {op} {' '.join(xs)} response :",
                      "completion": " ".join(xs if op == "repeat" else xs[::-1])})
    _write_jsonl(os.path.join(root, "demos.jsonl"), demos)
    comparisons = []
    for _ in range(48):
        k = r.randint(2, 3)
        completions = [" ".join(r.choices(WORDS, k=r.randint(1, 4))) for _ in range(k)]
        quality = [c.count("w7") + 0.1 * i for i, c in enumerate(completions)]
        order = sorted(range(k), key=lambda i: -quality[i])
        comparisons.append({"prompt": "instruction : repeat w1 response :",
                            "completions": completions,
                            "ranking": [order.index(i) for i in range(k)]})
    _write_jsonl(os.path.join(root, "cmp.jsonl"), comparisons)
    _write_jsonl(os.path.join(root, "prompts.jsonl"),
                 [{"prompt": f"say {' '.join(r.choices(WORDS, k=r.randint(1, 4)))} :"}
                  for _ in range(48)])
    _write_jsonl(os.path.join(root, "pretrain.jsonl"),
                 [{"text": " ".join(r.choices(WORDS, k=12))} for _ in range(48)])
    _write_initial_models(root)


def _write_initial_models(root: str) -> None:
    """The starting LM and RM, drawn on the host: compiling a random init would cost each
    worker seconds, and both runs must start from the same weights anyway."""
    import jax
    import numpy as np
    from transformers import PreTrainedTokenizerFast

    from rlhf_jax.config import model_config_from
    from rlhf_jax.model_io import save_our_checkpoint
    from rlhf_jax.models.params import abstract_params
    from rlhf_jax.models.transformer import Transformer

    tokenizer = PreTrainedTokenizerFast.from_pretrained(os.path.join(root, "tok"))
    for name, head, seed in (("init_lm", "lm", 0), ("init_rm", "scalar", 1)):
        model = Transformer(model_config_from(MODEL, tokenizer, head=head))
        gen = np.random.default_rng(seed)

        def fill(path, a):
            scale = "scale" in jax.tree_util.keystr(path)
            return ((1.0 if scale else 0.0) + gen.normal(0.0, 0.1, a.shape)).astype(a.dtype)
        params = jax.tree_util.tree_map_with_path(fill, abstract_params(model))
        save_our_checkpoint(os.path.join(root, name), model, params, tokenizer,
                            extra={"stage": name})


# --- the run -----------------------------------------------------------------------------------

MODEL = dict(arch="gpt2", d_model=32, n_layers=1, n_heads=4, d_ff=64, max_position=32)
# FSDP over 4 devices that span both processes (parameters and batches split across hosts),
# tensor parallelism over 2 devices within each process.
MESH = (1, 4, 2)


def _configs(data: str, workdir: str):
    from rlhf_jax.config import ppo_config, rm_config, sft_config

    sft = sft_config()
    sft.init_from = os.path.join(data, "init_lm")
    sft.mesh.shape = MESH
    sft.data.train = os.path.join(data, "demos.jsonl")
    sft.data.max_prompt_len, sft.data.max_response_len = PROMPT_LEN, RESPONSE_LEN
    sft.train.update(batch_size=16, steps=3, log_every=1, eval_every=0, checkpoint_every=1000)

    rm = rm_config()
    rm.init_from = os.path.join(data, "init_rm")
    rm.mesh.shape = MESH
    rm.data.train = os.path.join(data, "cmp.jsonl")
    rm.data.max_k = 3
    rm.data.max_prompt_len, rm.data.max_response_len = PROMPT_LEN, RESPONSE_LEN
    rm.normalize.demonstrations = os.path.join(data, "demos.jsonl")
    rm.data.valid_fraction = 0.0
    rm.train.update(batch_size=8, steps=2, log_every=1, eval_every=0, checkpoint_every=1000)

    ppo = ppo_config()
    ppo.policy_from = os.path.join(workdir, "sft", "model")
    ppo.reward_from = os.path.join(workdir, "rm", "model")
    ppo.mesh.shape = MESH
    ppo.data.prompts = os.path.join(data, "prompts.jsonl")
    ppo.data.pretrain = os.path.join(data, "pretrain.jsonl")
    ppo.data.max_prompt_len, ppo.data.max_response_len = PROMPT_LEN, RESPONSE_LEN
    ppo.data.ptx_seq_len = 12
    ppo.ppo.update(iterations=1, rollout_batch_size=16, minibatch_size=8, epochs=2, ptx_coef=1.0,
                   lr=3e-3, value_lr=3e-3, warmup_iterations=0, checkpoint_every=0,
                   sample_every=1, n_samples_logged=4)
    return sft, rm, ppo


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--devices", type=int, required=True, help="CPU devices of this process")
    parser.add_argument("--coordinator_address")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    args = parser.parse_args(argv)
    # Before jax is imported: the fake CPU devices of this process.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"

    from rlhf_jax import distributed
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)

    import jax
    import numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")

    from rlhf_jax import evaluation as ev
    from rlhf_jax.metrics import read_jsonl_metrics
    from rlhf_jax import model_io, runtime
    from rlhf_jax.stages import ppo, reward, sft

    assert jax.device_count() == 8, jax.devices()
    assert jax.local_device_count() == args.devices
    workdir = args.workdir
    sft_cfg, rm_cfg, ppo_cfg = _configs(args.data, workdir)
    mesh = runtime.setup_mesh(sft_cfg)
    out: dict[str, np.ndarray] = {}

    def params_of(stage: str, name: str):
        model, params, tokenizer, extra = model_io.load_model(os.path.join(workdir, stage, "model"),
                                                              mesh)
        host = distributed.fetch(params)
        for path, leaf in jax.tree_util.tree_leaves_with_path(host):
            out[f"{name}/params{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
        return model, params, tokenizer, extra

    def metrics_of(stage: str, name: str) -> None:
        # Written by process 0 alone; the other processes record what they returned instead.
        if not distributed.is_main():
            return
        by_step: dict[int, dict] = {}
        for row in read_jsonl_metrics(os.path.join(workdir, stage, "metrics.jsonl")):
            by_step.setdefault(row["step"], {}).update(row)   # train and valid rows of a step
        rows = [by_step[step] for step in sorted(by_step)]
        for key in sorted({k for row in rows for k in row}):
            if key in ("step", "time") or key.startswith("time/") or "per_s" in key \
                    or key == "tokens/s":
                continue
            out[f"{name}/metrics/{key}"] = np.array([row.get(key, np.nan) for row in rows],
                                                    np.float64)

    final = sft.train(sft_cfg, os.path.join(workdir, "sft"))
    out.update({f"sft/final/{k}": np.float64(v) for k, v in final.items()})
    metrics_of("sft", "sft")
    _, sft_params, tokenizer, _ = params_of("sft", "sft")

    final = reward.train(rm_cfg, os.path.join(workdir, "rm"))
    norm = final.pop("reward_norm")
    out.update({f"rm/final/{k}": np.float64(v) for k, v in final.items()})
    out.update({f"rm/norm/{k}": np.float64(v) for k, v in norm.items()})
    metrics_of("rm", "rm")
    rm_model, rm_params, _, rm_extra = params_of("rm", "rm")

    final = ppo.train(ppo_cfg, os.path.join(workdir, "ppo"))
    out.update({f"ppo/final/{k}": np.float64(v) for k, v in final.items()
                if not k.startswith("time/") and k != "tokens/s"})
    metrics_of("ppo", "ppo")
    policy, policy_params, _, _ = params_of("ppo", "policy")

    # Eval as the pipeline runs it: every process calls the same functions on the same prompts.
    prompts = [json.loads(line) for line in open(ppo_cfg.data.prompts, encoding="utf-8")]
    prompts = prompts[:EVAL_PROMPTS]
    samples = ev.generate_texts(policy, policy_params, tokenizer, prompts,
                                max_prompt_len=PROMPT_LEN, max_new_tokens=RESPONSE_LEN,
                                greedy=True, mesh=mesh, batch_size=EVAL_BATCH)
    out["eval/sequences"] = samples["sequences"]
    out["eval/response_mask"] = samples["response_mask"]
    out["eval/texts"] = np.array(samples["texts"], dtype=str)
    out["eval/rm_scores"] = ev.score_texts(rm_model, rm_params, rm_extra.get("reward_norm"),
                                           tokenizer, prompts, samples["texts"],
                                           max_prompt_len=PROMPT_LEN,
                                           max_response_len=RESPONSE_LEN, mesh=mesh)
    out["eval/logprobs"] = ev.response_logprobs(policy, policy_params, samples, mesh)
    out["eval/kl_to_sft"] = np.float64(ev.kl_to_reference(policy, policy_params, sft_params,
                                                          samples, mesh))
    if jax.process_count() > 1:
        # A mesh whose batch axes do not span the processes must be refused, not mis-fed.
        from rlhf_jax.sharding import check_process_rows, make_mesh
        check_process_rows(mesh, 4)
        try:
            check_process_rows(make_mesh((1, 1, 8)), 4)
        except ValueError:
            out["checks/tensor_across_hosts_refused"] = np.bool_(True)
    np.savez(os.path.join(workdir, f"results_{jax.process_index()}.npz"), **out)
    print(f"process {jax.process_index()}/{jax.process_count()}: {len(out)} results", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
