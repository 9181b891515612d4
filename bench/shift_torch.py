#!/usr/bin/env python3
"""The token distribution shift's forwards (METHODS.md §6) in PyTorch/transformers, on the ids
tunelens used: the peer figures of the token-shift benchmark, and a check of tunelens's lists.

Reads the ids file of `examples/bench_shift.rs --ids-out FILE` (argv[1]): per response the
aligned context (chat template), the base context (URIAL template), each side's response ids,
and tunelens's teacher-forced top 30 (ids, logits) per position. Loads the demo model as the
Python peer does (shared/bench/peers/bench_peer.py, `load()`: transformers' GGUF loader, f32,
torch.set_num_threads(2)) and, under torch.inference_mode(), times:

* the per-token loop, as AlignTDS's `get_logits` (src/logit_analysis.py) runs it: for both
  contexts of every response, for t in range(len(r)): one full forward over context + r[:t]
  (no KV cache, logits at every position as `model(input_ids)` gives them), the last row's
  softmax and top 30, and the 30 entries (id, decoded token, logit, prob) stored; AlignTDS's
  per-step `prefix` string (a debugging aid) is left out;
* a teacher-forced pass: one forward over context + r[:-1] per side, the top 30 and their
  probabilities at every response position, the entries' token strings; how much of the gap
  is the algorithm (loop vs one pass) and how much the implementation (candle vs PyTorch).

Checks the ids against the file's hash, and compares the loop's top 30 with tunelens's at every
position: the fraction of positions whose ordered id lists are equal, whose id sets are equal,
whose top-1 ids are equal, and the largest |top-1 logit difference| (the same for the
teacher-forced pass). With `--ours FILE` (bench_shift's JSON) it adds the speed ratios.

Prints a JSON record on stdout (progress on stderr).

    python bench/shift_torch.py IDS.json MODEL_DIR GGUF_FILE [--reps N] [--loop-reps N]
        [--ours OURS.json]
"""
import argparse
import json
import statistics
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

N_THREADS = 2  # as the peer (bench_peer.py, N_THREADS)
torch.set_num_threads(N_THREADS)
K_SAVE = 30


def ids_hash(lists):
    """FNV-1a (64 bit) over each list's length then its ids, u32 little endian (as bench_shift)."""
    h = 0xCBF29CE484222325
    for lst in lists:
        for v in [len(lst), *lst]:
            for b in int(v).to_bytes(4, "little"):
                h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def sides(item):
    """(context, response ids, tunelens's top ids, tunelens's top logits) of both sides."""
    return [
        (item["aligned_context"], item["aligned_ids"], item["aligned_top_ids"], item["aligned_top_logits"]),
        (item["base_context"], item["base_ids"], item["base_top_ids"], item["base_top_logits"]),
    ]


def entries(tok, logits_row, probs_row, idx):
    return [
        {"token_id": int(i), "token": tok.decode(int(i)), "logit": float(logits_row[i]), "prob": float(probs_row[i])}
        for i in idx
    ]


def token_loop(model, tok, ctx, resp):
    """AlignTDS's get_logits: one full forward per response token; the stored lists."""
    out = []
    input_ids = torch.tensor([ctx])
    for t in range(len(resp)):
        logits = model(input_ids).logits[:, -1, :]
        probs = torch.softmax(logits, dim=-1)
        top = logits.topk(k=K_SAVE).indices
        out.append(entries(tok, logits[0].numpy(), probs[0].numpy(), top[0].tolist()))
        input_ids = torch.cat((input_ids, torch.tensor([[resp[t]]])), dim=1)
    return out


def teacher_forced(model, tok, ctx, resp):
    """One forward over ctx + resp[:-1]; the top 30 at each response position."""
    ids = torch.tensor([ctx + resp[:-1]])
    logits = model(ids).logits[0, len(ctx) - 1:]
    top = logits.topk(k=K_SAVE, dim=-1)
    probs = torch.softmax(logits, dim=-1).gather(1, top.indices)
    top_ids = top.indices.tolist()
    tokens = [tok.convert_ids_to_tokens(row) for row in top_ids]
    return [
        [{"token_id": i, "token": s, "logit": l, "prob": p} for i, s, l, p in zip(ri, rs, rl, rp)]
        for ri, rs, rl, rp in zip(top_ids, tokens, top.values.tolist(), probs.tolist())
    ]


def run_all(fn, model, tok, items):
    return [[fn(model, tok, ctx, resp) for ctx, resp, _, _ in sides(item)] for item in items]


def timed(warmup, reps, f):
    for _ in range(warmup):
        f()
    secs, result = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        result = f()
        secs.append(time.perf_counter() - t0)
    return secs, result


def agreement(items, runs):
    """Compares each position's top 30 with tunelens's teacher-forced lists."""
    n = ordered = same_set = top1 = 0
    max_diff = 0.0
    for item, run in zip(items, runs):
        for (_, _, our_ids, our_logits), lists in zip(sides(item), run):
            assert len(lists) == len(our_ids)
            for entries_t, ids_t, logits_t in zip(lists, our_ids, our_logits):
                theirs = [e["token_id"] for e in entries_t]
                n += 1
                ordered += theirs == ids_t
                same_set += set(theirs) == set(ids_t)
                top1 += theirs[0] == ids_t[0]
                max_diff = max(max_diff, abs(entries_t[0]["logit"] - logits_t[0]))
    return {
        "positions": n,
        "top30_ids_equal_fraction": ordered / n,
        "top30_set_equal_fraction": same_set / n,
        "top1_equal_fraction": top1 / n,
        "max_abs_top1_logit_diff": max_diff,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ids")
    ap.add_argument("model_dir")
    ap.add_argument("gguf_file")
    ap.add_argument("--reps", type=int, default=5, help="teacher-forced runs after a warm-up")
    ap.add_argument("--loop-reps", type=int, default=1, help="loop runs after a warm-up on the first response")
    ap.add_argument("--ours", help="bench_shift's JSON, for the ratios")
    args = ap.parse_args()

    doc = json.load(open(args.ids))
    items = doc["items"]
    lists = [lst for item in items for lst in (item["aligned_context"], item["aligned_ids"], item["base_context"], item["base_ids"])]
    digest = ids_hash(lists)
    if digest != doc["ids_fnv1a64"]:
        sys.exit(f"ids hash {digest} differs from the file's {doc['ids_fnv1a64']}")

    # As bench_peer.py's load().
    transformers.logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(args.model_dir, gguf_file=args.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, gguf_file=args.gguf_file, dtype=torch.float32)
    model.eval()

    with torch.inference_mode():
        print("torch: teacher-forced passes...", file=sys.stderr)
        tf_s, tf_runs = timed(1, max(args.reps, 1), lambda: run_all(teacher_forced, model, tok, items))
        print("torch: AlignTDS's per-token loop (minutes)...", file=sys.stderr)
        first = items[0]
        token_loop(model, tok, first["aligned_context"], first["aligned_ids"])  # warm-up
        loop_s, loop_runs = timed(0, max(args.loop_reps, 1), lambda: run_all(token_loop, model, tok, items))

    positions = sum(len(resp) for item in items for _, resp, _, _ in sides(item))
    record = {
        "what": "token shift (METHODS.md §6), PyTorch/transformers on tunelens's ids: AlignTDS's per-token loop and a teacher-forced pass",
        "model": f"{args.model_dir}/{args.gguf_file}",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn_implementation": model.config._attn_implementation,
        "ids_fnv1a64": digest,
        "responses": len(items),
        "positions": positions,
        "token_loop": {
            "median_s": statistics.median(loop_s), "all_s": loop_s, "reps": len(loop_s),
            "what": "AlignTDS get_logits: one full forward per response token (no KV cache), softmax, top 30, entries",
        },
        "teacher_forced": {
            "median_s": statistics.median(tf_s), "all_s": tf_s, "reps": len(tf_s),
            "what": "one forward over context + r[:-1] per side, top 30 and probabilities at every response position",
        },
        "loop_over_teacher_forced": statistics.median(loop_s) / statistics.median(tf_s),
        "agreement_loop_vs_tunelens": agreement(items, loop_runs),
        "agreement_teacher_forced_vs_tunelens": agreement(items, tf_runs),
    }
    if args.ours:
        ours = json.load(open(args.ours))
        if ours["ids_fnv1a64"] != digest:
            sys.exit(f"bench_shift's ids hash {ours['ids_fnv1a64']} differs from the ids file's {digest}")
        o_tf = ours["teacher_forced"]["median_s"]
        record["ratios"] = {
            "torch_loop_over_ours_teacher_forced": statistics.median(loop_s) / o_tf,
            "torch_teacher_forced_over_ours_teacher_forced": statistics.median(tf_s) / o_tf,
            "torch_loop_over_ours_loop": statistics.median(loop_s) / ours["token_loop"]["median_s"],
        }
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
