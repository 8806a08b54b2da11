"""The whole pipeline at micro scale (every stage), and the real-data config on tiny stand-ins."""
import json
import math
import os

import numpy as np

from rlhf_jax.config import apply_overrides, load_config
from rlhf_jax.pipeline import STAGES, run

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")


def _finite(tree) -> bool:
    if isinstance(tree, dict):
        return all(_finite(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(_finite(v) for v in tree)
    if isinstance(tree, (int, float)):
        return math.isfinite(tree)
    return True


def test_micro_pipeline_every_stage_and_artifact(tmp_path):
    cfg = load_config(os.path.join(EXPERIMENTS, "instructgpt_tiny.py") + ":micro")
    results = run(cfg, str(tmp_path))
    for stage in STAGES:
        assert os.path.exists(tmp_path / stage / "DONE"), stage
    for stage in ("pretrain", "sft", "sft_ptx", "rm", "ppo", "ppo_ptx"):
        assert (tmp_path / stage / "model" / "model_config.json").exists(), stage
        assert (tmp_path / stage / "metrics.jsonl").exists(), stage
    for name in ("results.json", "results.md", "win_rates_heldout_labelers.png", "curves_ppo.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["wall_seconds"] > 0
    for key in ("train_labelers", "heldout_labelers"):
        assert 0.0 <= saved["rm_accuracy"][key] <= 1.0
    for model in ("base", "base_prompted", "sft", "ppo", "ppo_ptx"):
        win = saved["win_rate_vs_sft"][model]
        assert 0.0 <= win["train_labelers"] <= 1.0 and 0.0 <= win["heldout_labelers"] <= 1.0
        lo, hi = win["ci95"]["heldout_labelers"]
        assert lo <= win["heldout_labelers"] <= hi
        for table in ("capability", "kl_to_sft", "gold_score", "proxy_score"):
            assert model in saved[table], (table, model)
    assert saved["win_rate_vs_sft"]["sft"]["heldout_labelers"] == 0.5  # SFT against itself ties
    assert _finite({k: v for k, v in saved.items() if k != "samples"})
    ppo_metrics = [json.loads(line) for line in open(tmp_path / "ppo_ptx" / "metrics.jsonl")]
    assert "ptx/loss" in ppo_metrics[-1] and np.isfinite(ppo_metrics[-1]["ptx/loss"])

    # The figure notebook runs on these results.
    import matplotlib
    matplotlib.use("Agg")
    notebook = json.load(open(os.path.join(EXPERIMENTS, "..", "notebooks", "fig1_win_rates.ipynb")))
    os.environ["RLHF_JAX_WORKDIR"] = str(tmp_path)
    namespace: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec("".join(cell["source"]), namespace)
    assert set(namespace["cap"]) >= {"base", "sft", "ppo", "ppo_ptx"}

    # A second invocation skips every finished stage and reproduces the report.
    again = run(cfg, str(tmp_path))
    assert again["this_invocation_seconds"] < results["wall_seconds"]


def _tiny_hf_standins(root):
    """A tiny GPT-2 checkpoint + tokenizer, and HH-style JSONL files, all made here."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["human", "assistant", ":", "hello", "thanks", "sure", "no", "help", "please", "ok",
             "good", "bad", "rude", "kind", "answer", "question", "."]
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                     eos_token="<eos>", unk_token="<unk>")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=1, n_head=2,
        bos_token_id=1, eos_token_id=1))
    base = root / "gpt2_tiny"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)

    rng = np.random.default_rng(0)
    prompt = lambda: "human : " + " ".join(rng.choice(["hello", "help", "please", "question"], 3)) + " assistant :"
    files = {}
    def write(name, rows):
        files[name] = str(root / f"{name}.jsonl")
        with open(files[name], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    write("pretrain", [{"text": " ".join(rng.choice(words, 12))} for _ in range(64)])
    write("sft", [{"prompt": prompt(), "completion": "sure kind answer ."} for _ in range(48)])
    write("comparisons", [{"prompt": prompt(), "chosen": "sure kind answer .", "rejected": "no rude ."}
                          for _ in range(48)])
    write("comparisons_test", [{"prompt": prompt(), "chosen": "ok good .", "rejected": "bad rude ."}
                               for _ in range(16)])
    write("ppo_prompts", [{"prompt": prompt()} for _ in range(32)])
    write("eval_prompts", [{"prompt": prompt()} for _ in range(16)])
    return str(base), files


def test_gpt2_hh_config_runs_on_tiny_standins(tmp_path):
    base, files = _tiny_hf_standins(tmp_path)
    cfg = load_config(os.path.join(EXPERIMENTS, "gpt2_hh.py"))
    overrides = [f"base_model={base}"] + [f"data.{k}={v}" for k, v in files.items()]
    for stage in ("sft", "sft_ptx", "rm", "ppo"):
        overrides += [f"{stage}.mesh.shape=(1,1,1)", f"{stage}.data.max_prompt_len=8",
                      f"{stage}.data.max_response_len=8"]
    for stage in ("sft", "sft_ptx", "rm"):
        overrides += [f"{stage}.train.steps=2", f"{stage}.train.batch_size=8",
                      f"{stage}.optim.warmup_steps=0"]
    overrides += ["sft.train.eval_every=0", "sft_ptx.train.eval_every=0", "ppo.data.ptx_seq_len=16",
                  "ppo.ppo.iterations=1", "ppo.ppo.rollout_batch_size=8", "ppo.ppo.minibatch_size=4",
                  "ppo.ppo.warmup_iterations=0", "ppo.ppo.ptx_per_episode=1",
                  "eval.n_prompts=8", "eval.prompted_max_prompt_len=40"]
    apply_overrides(cfg, overrides)
    results = run(cfg, str(tmp_path / "run"))
    assert 0.0 <= results["rm_accuracy"]["test"] <= 1.0
    for model in ("base", "sft", "ppo", "ppo_ptx"):
        assert np.isfinite(results["proxy_score"][model]) and np.isfinite(results["kl_to_sft"][model])
    assert (tmp_path / "run" / "ppo_ptx" / "model_ema" / "model_config.json").exists()
    assert (tmp_path / "run" / "results.md").exists()
