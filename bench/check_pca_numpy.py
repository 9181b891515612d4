#!/usr/bin/env python3
"""Checks tunelens's FFN-concepts PCA (METHODS.md §2) against numpy on the same matrices.

Reads the JSON of `tunelens concepts --json --no-cache` (argv[1]), loads the same demo model
through transformers (the Python peer's GGUF loader: the same dequantised f32 weights), and for
every layer redoes §2 in float64 numpy: centred SVD of M = W_down^T, variance ratios, unit word
vectors from averaged lm_head rows of tokenize(" " + w), and |v_r . e_w|. Prints the largest
differences and exits 1 if any exceeds its tolerance.

    python bench/check_pca_numpy.py concepts.json MODEL_DIR GGUF_FILE WORD_LIST
"""
import json
import sys

import numpy as np
import torch  # noqa: F401  (transformers needs it)
from transformers import AutoModelForCausalLM, AutoTokenizer


def load_words(path):
    """load_wiki_words of the reference code: case variants merge into the first-seen form."""
    words, index = [], {}
    for line in open(path, encoding="utf-8"):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        word = line.split("\t", 1)[0]
        variants = [word, word.lower(), word.upper(), word.capitalize()]
        if any(v in index for v in variants):
            continue
        index[word] = len(words)
        words.append(word)
    return words


def main():
    ours_path, model_dir, gguf_file, words_path = sys.argv[1:5]
    ours = json.load(open(ours_path))
    model_json = ours["models"][0]
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_file)
    # transformers' GGUF conversion builds a plain ByteLevel pre-tokenizer; SmolLM2's own
    # tokenizer.json splits digits (any char.is_numeric(), e.g. "²") first. tunelens follows the
    # model's tokenizer.json (golden-tested), so the reference does too.
    from tokenizers import pre_tokenizers
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file, dtype=torch.float32)
    words = load_words(words_path)
    unk = tok.convert_tokens_to_ids("\u2581") if "\u2581" in tok.get_vocab() else None
    U = model.lm_head.weight.detach().double().numpy()
    rows = []
    for w in words:
        ids = tok.encode(" " + w, add_special_tokens=False)
        if len(ids) > 1 and unk is not None and ids[0] == unk:
            ids = ids[1:]
        rows.append(U[ids].mean(axis=0) if ids else np.zeros(U.shape[1]))
    E = np.array(rows)
    norms = np.linalg.norm(E, axis=1, keepdims=True)
    E = np.divide(E, norms, out=np.zeros_like(E), where=norms > 1e-12)

    word_index = {w: i for i, w in enumerate(words)}
    max_ratio = max_score = max_score_separated = 0.0
    worst = None
    top1_mismatch = total_components = 0
    set_overlap = []
    for layer_json in model_json["layers"]:
        l = layer_json["layer"]
        W = model.model.layers[l].mlp.down_proj.weight.detach().double().numpy()  # (d, d_ff)
        M = W.T
        Mc = M - M.mean(axis=0, keepdims=True)
        _, S, Vt = np.linalg.svd(Mc, full_matrices=False)
        lam = S**2 / (M.shape[0] - 1)
        rho = lam / lam.sum()
        ours_rho = np.array(layer_json["variance_ratios"])
        max_ratio = max(max_ratio, float(np.abs(ours_rho - rho).max()))
        R = len(layer_json["components"])
        scores = np.abs(Vt[:R] @ E.T)
        for r, comp in enumerate(layer_json["components"]):
            ours_words = comp["words"]
            ours_scores = np.array(comp["scores"])
            ids = [word_index[w] for w in ours_words]
            diff = float(np.abs(scores[r, ids] - ours_scores).max())
            # Relative gap to the neighbouring eigenvalues: within a near-degenerate eigenspace
            # any rotation is an equally valid PCA, so vectors (and word scores) may differ.
            neighbours = [lam[i] for i in (r - 1, r + 1) if 0 <= i < len(lam)]
            gap = min(abs(lam[r] - x) for x in neighbours) / lam[r]
            if diff > max_score:
                max_score, worst = diff, {"layer": l, "rank": r + 1, "relative_eigengap": gap}
            if gap > 1e-3:
                max_score_separated = max(max_score_separated, diff)
            k = len(ours_words)
            ref = np.argsort(-scores[r], kind="stable")[:k]
            total_components += 1
            if ref[0] != ids[0]:
                top1_mismatch += 1
            set_overlap.append(len(set(ref) & set(ids)) / k)
    report = {
        "layers": len(model_json["layers"]),
        "components_checked": total_components,
        "max_abs_diff_variance_ratio": max_ratio,
        "max_abs_diff_word_score": max_score,
        "worst_component": worst,
        "max_abs_diff_word_score_eigengap_above_1e-3": max_score_separated,
        "top1_word_mismatches": top1_mismatch,
        "mean_topk_set_overlap": float(np.mean(set_overlap)),
        "min_topk_set_overlap": float(np.min(set_overlap)),
    }
    print(json.dumps(report, indent=1))
    ok = max_ratio < 1e-9 and max_score_separated < 1e-4
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
