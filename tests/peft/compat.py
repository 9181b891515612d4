"""PEFT side of the adapter compatibility test (tests/peft.rs).

Loads the demo model with transformers' GGUF loader (f32), then
1. applies the tunelens-written adapter in OURS with PeftModel.from_pretrained, and
2. creates a PEFT adapter with random B (init_lora_weights=False) and saves it in THEIRS,
and writes the logits of IDS for the base, (1) and (2) to OUT as JSON.
"""
import argparse
import json
import os

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--gguf", required=True)
ap.add_argument("--ours", required=True)
ap.add_argument("--theirs", required=True)
ap.add_argument("--ids", required=True)
ap.add_argument("--out", required=True)
args = ap.parse_args()

torch.manual_seed(0)
ids = torch.tensor([[int(x) for x in args.ids.split(",")]])


def load():
    folder, name = os.path.split(os.path.abspath(args.gguf))
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=ids).logits[0].tolist()


base = load()
result = {"base": logits(base)}
ours = PeftModel.from_pretrained(base, args.ours).eval()
result["ours_in_peft"] = logits(ours)

fresh = load()
cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                 init_lora_weights=False, task_type="CAUSAL_LM")
theirs = get_peft_model(fresh, cfg).eval()
with torch.no_grad():
    for name, p in theirs.named_parameters():
        if "lora_B" in name:
            p.normal_(0.0, 0.02)
result["theirs_in_peft"] = logits(theirs)
theirs.save_pretrained(args.theirs)
with open(args.out, "w") as f:
    json.dump(result, f)
