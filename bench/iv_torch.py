#!/usr/bin/env python3
"""Checks tunelens's causal mediation (METHODS.md §4) against PyTorch/transformers, and times
Todd et al.'s loop on the same trials.

Reads the JSON of `tunelens iv --record-trials --json` (argv[1]): every mean-activation and
indirect-effect trial's token ids, its target, tunelens's p(y*) and per-head effects, and the
mean head outputs. Loads the same demo model through transformers (the peer's GGUF loader, f32)
and, with a forward pre-hook on every layer's o_proj (HOOK A):

* recomputes the mean last-token head outputs over the mean trials and compares them;
* recomputes p(y*) of every trial (clean and corrupted prompts) and compares;
* runs Todd's loop exactly as function_vectors/src/compute_indirect_effect.py does: for every
  trial, one full forward (batch 1) per (layer, head) with z[T-1, head] replaced by the mean
  (tunelens's means, so that the comparison isolates the patched forward), and compares the
  AIE grid; the loop's wall time is the peer figure of the benchmark.

Prints a JSON record on stdout (differences, timings); exits 1 when a difference exceeds 1e-5.

    python bench/iv_torch.py iv.json MODEL_DIR GGUF_FILE
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM

torch.set_num_threads(2)


def main():
    ours_path, model_dir, gguf_file = sys.argv[1:4]
    ours = json.load(open(ours_path))
    result = ours["results"][0]
    run = result["run"]
    task = run["tasks"][0]
    L, H, dh = run["layers"], run["heads"], run["head_dim"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file, dtype=torch.float32)
    model.eval()
    layers = model.model.layers

    state = {"patch": None, "record": None}

    def make_hook(l):
        def hook(module, args):
            (z,) = args
            if state["record"] is not None:
                state["record"][l] = z[0, -1].detach().clone()
            patch = state["patch"]
            if patch is not None and patch[0] == l:
                _, k, value = patch
                z = z.clone()
                z[0, -1, k * dh:(k + 1) * dh] = value
                return (z,)
            return None
        return hook

    handles = [layer.self_attn.o_proj.register_forward_pre_hook(make_hook(l)) for l, layer in enumerate(layers)]

    def p_target(ids, target):
        with torch.no_grad():
            logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1].float()
        return torch.softmax(logits, dim=-1)[target].item()

    # Mean head outputs over the recorded mean trials.
    sums = torch.zeros(L, H * dh, dtype=torch.float64)
    max_p_clean = 0.0
    for trial in task["mean_trials"]:
        state["record"] = {}
        p = p_target(trial["ids"], trial["target"][0])
        max_p_clean = max(max_p_clean, abs(p - trial["p"]))
        for l in range(L):
            sums[l] += state["record"][l].double()
        state["record"] = None
    means_torch = (sums / max(len(task["mean_trials"]), 1)).float()
    means_ours = torch.tensor(task["means"], dtype=torch.float32).reshape(L, H * dh)
    max_means = (means_torch - means_ours).abs().max().item()

    # Todd's loop on the recorded corrupted prompts, patching tunelens's means.
    max_p_corr = 0.0
    max_ie = 0.0
    aie = torch.zeros(L * H, dtype=torch.float64)
    started = time.perf_counter()
    for trial in task["ie_trials"]:
        ids, y = trial["ids"], trial["target"][0]
        p0 = p_target(ids, y)
        max_p_corr = max(max_p_corr, abs(p0 - trial["p"]))
        for l in range(L):
            for k in range(H):
                state["patch"] = (l, k, means_ours[l, k * dh:(k + 1) * dh])
                ie = p_target(ids, y) - p0
                state["patch"] = None
                aie[l * H + k] += ie
                max_ie = max(max_ie, abs(ie - trial["ie"][l * H + k]))
    loop_secs = time.perf_counter() - started
    n = max(len(task["ie_trials"]), 1)
    aie /= n
    max_aie = (aie - torch.tensor(task["aie"], dtype=torch.float64)).abs().max().item()
    for h in handles:
        h.remove()
    record = {
        "model": result["model"],
        "task": task["task"],
        "layers": L,
        "heads": H,
        "mean_trials": len(task["mean_trials"]),
        "ie_trials": len(task["ie_trials"]),
        "prompt_tokens": [len(t["ids"]) for t in task["ie_trials"]],
        "max_abs_diff": {
            "mean_head_outputs": max_means,
            "p_clean": max_p_clean,
            "p_corrupted": max_p_corr,
            "indirect_effect": max_ie,
            "aie": max_aie,
        },
        "torch_todd_loop_secs": loop_secs,
        "torch_forwards": n * (L * H + 1),
        "tunelens_ie_secs": task["timings"]["ie_secs"],
        "speedup": loop_secs / max(task["timings"]["ie_secs"], 1e-9),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(record, indent=1))
    worst = max(max_p_clean, max_p_corr, max_ie, max_aie)
    if worst > 1e-5:
        print(f"error: a difference of {worst:.2e} exceeds 1e-5", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
