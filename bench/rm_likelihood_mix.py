"""Does adding SFT's own likelihood to the reward model order the labelers' pairs better?

    JAX_PLATFORMS=cpu python bench/rm_likelihood_mix.py runs/tiny     # a finished pipeline workdir

Scores every completion of the test comparisons (training labelers) and of the first 1,500
training rankings with the RM (raw) and with SFT's summed and mean response log-probs, fits
score = rm + a * sum + b * mean on the training pairs by grid search, and prints the pair
accuracy of each scorer on the test pairs (seed 0, default config, 2-core AMD EPYC: RM 0.676,
SFT likelihood 0.709, fitted mix 0.720 against a noise-free ceiling of 0.894).
"""
import sys

import jax
import numpy as np
from rlhf_jax import evaluation as ev
from rlhf_jax.data import read_jsonl, tokenize_demonstrations
from rlhf_jax.model_io import load_model
from rlhf_jax.scoring import raw_rewards

wd = sys.argv[1]
sft, sp, tok, _ = load_model(f"{wd}/sft/model", None)
rm, rp, _, _ = load_model(f"{wd}/rm/model", None)
rmf = jax.jit(lambda p, i, m: raw_rewards(rm, p, i, m))
def feats(rows):
    flat = [{"prompt": r["prompt"], "completion": c} for r in rows for c in r["completions"]]
    arr, _ = tokenize_demonstrations(flat, tok, 24, 24, "truncate")
    out = {"sum": [], "mean": [], "rm": []}
    for s in range(0, len(flat), 512):
        sl = slice(s, s + 512)
        samples = {"sequences": arr["input_ids"][sl], "attention_mask": arr["attention_mask"][sl],
                   "response_mask": arr["loss_mask"][sl, 24:], "prompt_len": 24}
        lp = np.asarray(ev.response_logprobs(sft, sp, samples))
        n = np.maximum(arr["loss_mask"][sl, 24:].sum(-1), 1)
        out["sum"].append(lp); out["mean"].append(lp / n)
        out["rm"].append(np.asarray(rmf(rp, arr["input_ids"][sl], arr["attention_mask"][sl])))
    return {k: np.concatenate(v) for k, v in out.items()}
def pairs(rows, f):
    W, L = [], []; off = 0
    for r in rows:
        k = len(r["completions"])
        for a in range(k):
            for b in range(k):
                if r["ranking"][a] < r["ranking"][b]:
                    W.append(off + a); L.append(off + b)
        off += k
    return np.array(W), np.array(L)
train = read_jsonl(f"{wd}/comparisons/train.jsonl", "comparisons")[:1500]
test = read_jsonl(f"{wd}/comparisons/test_train_labelers.jsonl", "comparisons")
ftr, fte = feats(train), feats(test)
wtr, ltr = pairs(train, ftr); wte, lte = pairs(test, fte)
def acc(f, W, L, a, b, c=1.0):
    s = c * f["rm"] + a * f["sum"] + b * f["mean"]
    return float(np.mean(s[W] > s[L]))
print("rm alone train", acc(ftr, wtr, ltr, 0, 0), "test", acc(fte, wte, lte, 0, 0))
print("sum alone test", acc(fte, wte, lte, 1, 0, 0), "mean alone test", acc(fte, wte, lte, 0, 1, 0))
best = max(((acc(ftr, wtr, ltr, a, b), a, b) for a in np.linspace(0, 2, 21) for b in np.linspace(0, 4, 21)))
print("best on train", best, "-> test", acc(fte, wte, lte, best[1], best[2]))
best2 = max(((acc(ftr, wtr, ltr, a, b, 0), a, b) for a in np.linspace(0, 1, 11) for b in np.linspace(0, 4, 21) if a or b))
print("lik only best train", best2, "-> test", acc(fte, wte, lte, best2[1], best2[2], 0))
