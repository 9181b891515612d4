#!/usr/bin/env python3
"""Checks tunelens's IV-guided loss (METHODS.md §5.2, code version) against a transformers + PEFT
re-implementation of FvForgetting's `CustomSeq2SeqTrainer.training_step`.

Reads what `examples/guided_reference.rs` wrote (argv[1]): the examples (ids, label mask, t_b),
the instruction vector and its heads, the adapter before the step (a PEFT folder), tunelens's
loss terms and its adapter gradients. Loads the demo model through transformers (GGUF, f32),
attaches the adapter with PEFT and computes, per example, unpadded (tunelens leaves padding
rows out of kl2; see the note on kl2 in src/train/guidance.rs):

* the reference pass: adapters disabled, the IV added to layer 9's o_proj output at t_b;
* the head-reference pass: adapters disabled, z of each listed head at t_b (o_proj's input);
* the trainable pass: CE over the label tokens of the batch, kl1 over the t_b rows and kl2 over
  every row with F.kl_div(log_softmax(ref/τ), softmax(cur/τ), reduction="sum") / B (FvForgetting's
  'batchmean' over a batch of B), L_pr = Σ α_pr · MSE(z_cur, z_ref) over B × d_h;

then backpropagates the total and compares every term (absolute, 1e-4) and every adapter
gradient (relative to the largest entry of its tensor, 1e-3). Prints a JSON record; exits 1
on a failed comparison.

    python bench/guided_torch.py WORK_DIR MODEL_DIR GGUF_FILE
"""
import json
import sys

import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

torch.set_num_threads(2)


def main():
    work, model_dir, gguf_file = sys.argv[1:4]
    step = json.load(open(f"{work}/step.json"))
    ours = load_file(f"{work}/grads.safetensors")
    base = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, f"{work}/adapter", is_trainable=True)
    model.train()
    layers = model.base_model.model.model.layers
    cfg = base.config
    dh = cfg.hidden_size // cfg.num_attention_heads
    tau, layer = step["tau"], step["layer"]
    a1, a2, apr = step["alpha1"], step["alpha2"], step["alpha_pr"]
    iv = torch.tensor(step["iv"], dtype=torch.float32)
    heads = [tuple(h) for h in step["heads"]]
    state = {"add_at": None, "record": None}

    def add_iv(module, args, output):
        if state["add_at"] is None:
            return None
        out = output.clone()
        out[0, state["add_at"]] += iv
        return out

    def record(l):
        def hook(module, args):
            if state["record"] is not None:
                state["record"][l] = args[0]
            return None
        return hook

    layers[layer].self_attn.o_proj.register_forward_hook(add_iv)
    for l in {h[0] for h in heads}:
        layers[l].self_attn.o_proj.register_forward_pre_hook(record(l))

    B = len(step["examples"])
    n_labels = sum(sum(1 for t in range(1, len(e["ids"])) if e["labels"][t]) for e in step["examples"])
    ce = kl1 = kl2 = 0.0
    ce_t, kl1_t, kl2_t = [], [], []
    sq = {h: [] for h in heads}
    for e in step["examples"]:
        ids = torch.tensor([e["ids"]])
        t_b = e["t_b"]
        with torch.no_grad(), model.disable_adapter():
            state["add_at"] = t_b
            ref = model(input_ids=ids).logits[0].float()
            state["add_at"] = None
            state["record"] = {}
            model(input_ids=ids)
            z_ref = {h: state["record"][h[0]][0, t_b, h[1] * dh:(h[1] + 1) * dh].clone() for h in heads}
            state["record"] = None
        state["record"] = {}
        cur = model(input_ids=ids).logits[0].float()
        z_cur = {h: state["record"][h[0]][0, t_b, h[1] * dh:(h[1] + 1) * dh] for h in heads}
        state["record"] = None
        rows = [t - 1 for t in range(1, len(e["ids"])) if e["labels"][t]]
        targets = torch.tensor([e["ids"][t + 1] for t in rows])
        ce_t.append(F.cross_entropy(cur[rows], targets, reduction="sum"))
        kd = lambda new, old: F.kl_div(F.log_softmax(old / tau, -1), F.softmax(new / tau, -1), reduction="sum")
        kl1_t.append(kd(cur[t_b:t_b + 1], ref[t_b:t_b + 1]))
        kl2_t.append(kd(cur, ref))
        for h in heads:
            sq[h].append(((z_cur[h] - z_ref[h]) ** 2).sum())
    ce = sum(ce_t) / n_labels
    kl1 = sum(kl1_t) / B
    kl2 = sum(kl2_t) / B
    pr = sum(apr * sum(sq[h]) / (B * dh) for h in heads)
    total = ce + a1 * kl1 + a2 * kl2 + pr
    total.backward()
    torch_terms = {"ce": ce.item(), "kl1": a1 * kl1.item(), "kl2": a2 * kl2.item(), "pr": pr.item()}
    ours_terms = dict(step["terms"])
    term_diff = {k: abs(torch_terms[k] - ours_terms[k]) for k in torch_terms}
    worst = 0.0
    compared = 0
    for name, p in model.named_parameters():
        if "lora_" not in name:
            continue
        key = name.replace(".default", "")
        g = p.grad
        o = ours[key]
        scale = max(g.abs().max().item(), 1e-12)
        worst = max(worst, (g - o).abs().max().item() / scale)
        compared += 1
    record = {
        "what": "IV-guided step (METHODS.md §5.2 code version): tunelens vs transformers + PEFT",
        "examples": B,
        "label_tokens": n_labels,
        "terms_torch": torch_terms,
        "terms_tunelens": ours_terms,
        "max_abs_term_diff": max(term_diff.values()),
        "term_diff": term_diff,
        "adapter_tensors_compared": compared,
        "max_relative_grad_diff": worst,
    }
    print(json.dumps(record, indent=1))
    ok = max(term_diff.values()) <= 1e-4 and worst <= 1e-3 and compared > 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
