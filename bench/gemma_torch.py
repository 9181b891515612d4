#!/usr/bin/env python3
"""The PyTorch/transformers peer of `examples/bench --model <Gemma-3 270M GGUF>`: the same three
phases on the same inputs, for a speed ratio on a Gemma model (the shared peer benchmark,
shared/bench/peers/bench_peer.py, starts with a chat-template sanity phase a base model cannot
run).

Loads the GGUF with transformers' own reader (de-quantised to f32), torch.set_num_threads(2),
torch.inference_mode() except for the attribution, and times, medians after warm-up:

* (a) forward latency, full logits at every position, on bench/prompts.json's `short`, `medium`
  and `long` id lists (16 / 64 / 128 tokens; the demo model's ids, valid Gemma ids too: only
  the lengths matter for speed), as `examples/bench` runs them;
* (b) greedy generation of 32 new tokens from the same ids with EOS suppressed
  (`min_new_tokens=32`), HF `generate` with its KV cache;
* (c) the §1 attribution of `medium`'s text with `attribution_response`'s text (the tokens
  tunelens attributes: S = prompt + " " + response, ids = [BOS] + S's ids, one forward, then one
  backward of each response token's probability, gradient x input summed over the hidden size),
  as the peer's fastest PyTorch variant (`torch_single_forward`).

Prints one JSON object on stdout; with `--ours FILE` (examples/bench's JSON) it adds the ratios
peer time / tunelens time (above 1: tunelens is faster).

    python bench/gemma_torch.py MODEL_DIR GGUF_FILE [--reps 5] [--ours OURS.json]
"""
import argparse
import json
import os
import statistics
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def timed(fn, reps, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("gguf_file")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ours")
    args = ap.parse_args()
    torch.set_num_threads(2)
    prompts = json.load(open(os.path.join(os.path.dirname(__file__), "prompts.json")))
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model_dir, gguf_file=args.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, gguf_file=args.gguf_file, dtype=torch.float32
    ).eval()
    load_s = time.perf_counter() - t0
    out = {"tool": "pytorch", "torch": torch.__version__, "transformers": transformers.__version__,
           "threads": 2, "load_s": load_s, "a_forward_latency": {}, "b_generation": {}}
    for name in ["short", "medium", "long"]:
        ids = torch.tensor([prompts[name]["ids"]])
        with torch.inference_mode():
            med, all_s = timed(lambda: model(ids).logits, args.reps, 3)
        out["a_forward_latency"][name] = {"tokens": ids.shape[1], "median_s": med, "all_s": all_s}
        print(f"forward {name}: {med:.3f} s", file=sys.stderr)
        with torch.inference_mode():
            gen = lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                                         min_new_tokens=32, do_sample=False,
                                         pad_token_id=tok.pad_token_id)
            med, all_s = timed(gen, args.reps, 2)
        out["b_generation"][name] = {"prompt_tokens": ids.shape[1], "new_tokens": 32,
                                     "median_s": med, "all_s": all_s}
        print(f"generate {name}: {med:.3f} s", file=sys.stderr)
    prompt = prompts["medium"]["text"].strip()
    response = prompts["attribution_response"]["text"].strip()
    tp = tok(prompt, add_special_tokens=False).input_ids
    ts = tok(prompt + " " + response, add_special_tokens=False).input_ids
    n_in, n_out = len(tp), len(ts) - len(tp)
    ids = torch.tensor([[tok.bos_token_id] + ts])
    emb_layer = model.get_input_embeddings()
    for p in model.parameters():
        p.requires_grad_(False)

    def attribution():
        emb = emb_layer(ids).detach().requires_grad_(True)
        probs = torch.softmax(model(inputs_embeds=emb).logits[0], -1)
        raw = torch.zeros(n_in, n_out)
        for j in range(n_out):
            (g,) = torch.autograd.grad(probs[n_in + j, ts[n_in + j]], emb, retain_graph=j < n_out - 1)
            raw[:, j] = (g[0, 1:1 + n_in] * emb[0, 1:1 + n_in]).sum(-1).detach()
        return raw

    med, all_s = timed(attribution, min(args.reps, 3), 1)
    out["c_attribution"] = {"prompt_tokens": n_in, "response_tokens": n_out, "median_s": med,
                            "all_s": all_s}
    print(f"attribution {n_in}x{n_out}: {med:.3f} s", file=sys.stderr)
    if args.ours:
        ours = json.load(open(args.ours))
        ratios = {}
        for name in ["short", "medium", "long"]:
            ratios[f"forward_{name}"] = (out["a_forward_latency"][name]["median_s"]
                                         / ours["a_forward_latency"][name]["median_s"])
            ratios[f"generate_{name}"] = (out["b_generation"][name]["median_s"]
                                          / ours["b_generation"][name]["median_s"])
        ratios["attribution"] = out["c_attribution"]["median_s"] / ours["c_attribution"]["median_s"]
        ratios["load"] = out["load_s"] / ours["load_s"]
        out["ratio_peer_over_tunelens"] = ratios
        out["tunelens"] = ours
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
