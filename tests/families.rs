//! The newer model families against transformers: tiny random checkpoints written by
//! transformers itself (`scripts/gen-family-goldens`, committed under `tests/families/`), their
//! logits at every position, with and without a PEFT adapter on the fused modules, and the
//! input-embedding gradient of one log-probability through the hand-written backward pass.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var, D};
use tunelens::model::config::Architecture;
use tunelens::model::hooks::{HookPoint, Recorder};
use tunelens::model::lora::LinearMode;
use tunelens::model::tiny::{tiny_family_config, tiny_model_with, tiny_options};
use tunelens::model::transformer::{KvCache, LogitsAt};
use tunelens::model::{load, ForwardOptions, Input, LoadOptions, LoadedModel, ModelSpec, NoHook};

fn family(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/families")
        .join(name)
}

fn golden(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(family(name).join("golden.json")).expect("golden");
    serde_json::from_str(&text).expect("golden JSON")
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    match v {
        serde_json::Value::Array(items) => items.iter().flat_map(floats).collect(),
        other => vec![other.as_f64().expect("number")],
    }
}

fn open(spec: &str) -> LoadedModel {
    load(&ModelSpec::parse(spec), &LoadOptions::default()).expect("family checkpoint loads")
}

/// Logits at every position of each golden sequence within 1e-4; the input gradient of the
/// golden log-probability within 1e-4 relative to its largest entry.
fn check(m: &LoadedModel, golden: &serde_json::Value, what: &str) {
    let ids: Vec<Vec<u32>> = serde_json::from_value(golden["ids"].clone()).expect("ids");
    for (s, seq) in ids.iter().enumerate() {
        let input = crate::common::ids_tensor(seq);
        let ours: Vec<f64> = m
            .model
            .forward(&input)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let theirs = floats(&golden[what]["logits"][s]);
        assert_eq!(ours.len(), theirs.len(), "{what} sequence {s}");
        let worst = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            worst < 1e-4,
            "{what} sequence {s}: logits differ by {worst:e}"
        );
    }
    // d log p(target | x) / d x at the last position, through the taped (hand-written) backward.
    let input = crate::common::ids_tensor(&ids[0]);
    let x = m.model.embed(&input).unwrap();
    let (hidden, tape) = m.model.run_taped(Input::Embeds(&x), true).unwrap();
    let t = ids[0].len() - 1;
    let last = hidden.narrow(1, t, 1).unwrap();
    let opts = ForwardOptions::default();
    let logits = m
        .model
        .lm_logits(&last, &opts)
        .unwrap()
        .flatten_all()
        .unwrap();
    let probs = candle_nn::ops::softmax(&logits, D::Minus1).unwrap();
    let target = golden[what]["grad_target"].as_u64().expect("target") as usize;
    let vocab = probs.dim(0).unwrap();
    let mut onehot = vec![0f32; vocab];
    onehot[target] = 1.0;
    let delta = (Tensor::new(onehot, &Device::Cpu).unwrap() - probs).unwrap();
    // Through Gemma 2's final soft-cap (the identity elsewhere).
    let delta = m.model.logit_softcap_vjp(&logits, &delta).unwrap();
    // The cotangent on the final-norm state: (e_target - p) W_U, with any lm_head adapter.
    let w_u = m.model.lm_head.effective_weight().unwrap();
    let cot_last = delta.unsqueeze(0).unwrap().matmul(&w_u).unwrap();
    let d = cot_last.dim(1).unwrap();
    let mut cot = Tensor::zeros((1, t + 1, d), DType::F32, &Device::Cpu).unwrap();
    cot = cot
        .slice_assign(&[0..1, t..t + 1, 0..d], &cot_last.unsqueeze(0).unwrap())
        .unwrap();
    let grad: Vec<f64> = m
        .model
        .input_vjp(&tape, &cot)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let theirs = floats(&golden[what]["grad"]);
    let scale = theirs.iter().fold(0f64, |a, b| a.max(b.abs()));
    let worst = grad
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(scale > 1e-6, "{what}: a gradient that is not zero");
    assert!(
        worst < 1e-4 * scale,
        "{what}: input gradient differs by {worst:e} (largest entry {scale:e})"
    );
}

/// [`check`] on `m` (loaded from `dir`), then on `m`'s folder with its PEFT adapter; returns
/// the adapted model.
fn check_with_and_without_adapter(
    m: &LoadedModel,
    dir: &std::path::Path,
    golden: &serde_json::Value,
) -> LoadedModel {
    check(m, golden, "base");
    let adapted = open(&format!(
        "{}+{}",
        dir.display(),
        dir.join("adapter").display()
    ));
    check(&adapted, golden, "adapter");
    adapted
}

/// Saved as a Hugging Face folder and loaded again, `m` gives the same logits.
fn assert_saves_and_loads_the_same(m: &LoadedModel) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("saved");
    tunelens::model::save::save_hf_folder(m, &out).unwrap();
    let again = open(&out.display().to_string());
    let ids = crate::common::ids_tensor(&[1, 5, 17, 33, 8]);
    let a = m.model.forward(&ids).unwrap();
    let b = again.model.forward(&ids).unwrap();
    assert_eq!(crate::common::max_abs_diff(&a, &b), 0.0);
}

/// Phi-3: fused `qkv_proj` and `gate_up_proj` split at load, a sliding window of 5 (the golden
/// sequence is 12 tokens), RoPE base 5000 from transformers 5's `rope_parameters`; then a PEFT
/// adapter on the fused modules and `o_proj`.
#[test]
fn phi3_matches_transformers_with_and_without_an_adapter() {
    let dir = family("phi3");
    let golden = golden("phi3");
    let m = open(&dir.display().to_string());
    assert_eq!(m.model.config().architecture.name(), "phi3");
    assert_eq!(m.model.config().sliding_window, Some(5));
    assert_eq!(m.model.config().rope_theta, 5000.0);
    let adapted = check_with_and_without_adapter(&m, &dir, &golden);
    let info = adapted.info.adapter.as_ref().expect("adapter attached");
    assert_eq!(info.target_modules, ["gate_up_proj", "o_proj", "qkv_proj"]);
}

/// Saving a Phi-3 writes transformers' fused names again, and the saved folder loads to the
/// same logits.
#[test]
fn phi3_round_trips_through_its_own_tensor_names() {
    let m = open(&family("phi3").display().to_string());
    let tensors = tunelens::model::save::hf_tensors(&m.model).unwrap();
    assert!(tensors.contains_key("model.layers.1.self_attn.qkv_proj.weight"));
    assert!(tensors.contains_key("model.layers.0.mlp.gate_up_proj.weight"));
    assert!(!tensors.contains_key("model.layers.0.self_attn.q_proj.weight"));
    assert_saves_and_loads_the_same(&m);
}

/// The CLI opens a Phi-3 folder, and refuses LoRA training on its fused modules by name.
#[test]
fn phi3_from_the_cli() {
    let model = family("phi3").display().to_string();
    let run = crate::common::run_cli(&["forward", "--model", &model, "--text", "w5 w17 w33"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let dir = tempfile::tempdir().unwrap();
    let data = crate::cli::tiny_instructions(dir.path());
    let out = dir.path().join("run").display().to_string();
    let run = crate::common::run_cli(&[
        "train",
        "--model",
        &model,
        "--data",
        &data,
        "--steps",
        "1",
        "--template",
        "definition",
        "--out",
        &out,
    ]);
    // The data notes come first; the error is the last line.
    assert_ne!(run.code, 0);
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error:") && last.contains("qkv_proj"),
        "{}",
        run.stderr
    );
}

/// Qwen3: per-head q/k RMSNorm before RoPE (forward and hand-written backward), head_dim 16 on a
/// hidden size of 32, tied embeddings, RoPE base 1e6 from `rope_parameters`; then a PEFT adapter
/// on every projection.
#[test]
fn qwen3_matches_transformers_with_and_without_an_adapter() {
    let dir = family("qwen3");
    let golden = golden("qwen3");
    let m = open(&dir.display().to_string());
    assert_eq!(m.model.config().architecture.name(), "qwen3");
    assert_eq!(m.model.config().head_dim, 16);
    assert!(m.model.config().tie_word_embeddings);
    assert!(m.model.layers[0].self_attn.q_norm.is_some());
    check_with_and_without_adapter(&m, &dir, &golden);
    // Saved and loaded again: the same logits (the head norms are written under their names).
    assert_saves_and_loads_the_same(&m);
}

/// Gemma 3: `√d` embedding scale, `(1 + w)` norms before and after both sub-layers, GeGLU,
/// per-head q/k norms, sliding (window 4, local RoPE base) and full layers (global base), logits
/// scaled by `query_pre_attn_scalar`; then a PEFT adapter on every projection.
#[test]
fn gemma3_matches_transformers_with_and_without_an_adapter() {
    let dir = family("gemma3");
    let golden = golden("gemma3");
    let m = open(&dir.display().to_string());
    let cfg = m.model.config();
    assert_eq!(cfg.architecture.name(), "gemma3");
    assert_eq!((cfg.window(0), cfg.window(1)), (Some(4), None));
    assert_eq!(cfg.query_pre_attn_scalar, Some(20.0));
    assert!(m.model.layers[0].attn_out_norm.is_some());
    check_with_and_without_adapter(&m, &dir, &golden);
    // Saved and loaded again: the same logits (gains written back as `w`, not `1 + w`).
    assert_saves_and_loads_the_same(&m);
    let tensors = tunelens::model::save::hf_tensors(&m.model).unwrap();
    assert!(tensors.contains_key("model.layers.2.pre_feedforward_layernorm.weight"));
    assert!(tensors.contains_key("model.layers.2.post_feedforward_layernorm.weight"));
}

/// OLMo-2: no pre-norms, norms on the sub-layer outputs, q/k norms over the whole projections;
/// then a PEFT adapter on every projection.
#[test]
fn olmo2_matches_transformers_with_and_without_an_adapter() {
    let dir = family("olmo2");
    let golden = golden("olmo2");
    let m = open(&dir.display().to_string());
    assert_eq!(m.model.config().architecture.name(), "olmo2");
    let layer = &m.model.layers[0];
    assert!(layer.input_layernorm.is_none() && layer.mlp_out_norm.is_some());
    assert_eq!(
        layer.self_attn.q_norm.as_ref().unwrap().weight.dims(),
        &[32]
    );
    check_with_and_without_adapter(&m, &dir, &golden);
    assert_saves_and_loads_the_same(&m);
}

/// LoRA training on Qwen3 (through the per-head norms, on q/k/v), Gemma 3, Gemma 2 and OLMo-2
/// (through the post-norms, GeGLU, q/k norms and soft-caps; default targets) writes a PEFT adapter,
/// under PEFT's tensor names, that changes the model when opened on the base again.
#[test]
fn lora_training_round_trips_on_the_new_families() {
    for (name, targets, module) in [
        ("qwen3", Some("q_proj,k_proj,v_proj"), "k_proj"),
        ("gemma3", None, "q_proj"),
        ("gemma2", None, "q_proj"),
        ("olmo2", None, "q_proj"),
    ] {
        let model = family(name).display().to_string();
        let dir = tempfile::tempdir().unwrap();
        // Words of the tiny word-level vocabulary (English words would all be `<unk>`).
        let data = dir.path().join("train.jsonl");
        let lines: Vec<String> = (0..4)
            .map(|i| {
                format!(
                    "{{\"instruction\": \"w{} w{}\", \"output\": \"w{} w{}\"}}",
                    10 + i,
                    20 + i,
                    30 + i,
                    40 + i
                )
            })
            .collect();
        std::fs::write(&data, lines.join("\n")).unwrap();
        let out = dir.path().join("run");
        let (data, out_arg) = (data.display().to_string(), out.display().to_string());
        let mut args = vec![
            "train",
            "--model",
            &model,
            "--data",
            &data,
            "--steps",
            "2",
            "--template",
            "definition",
            "--lr",
            "0.01",
            "--out",
            &out_arg,
        ];
        if let Some(targets) = targets {
            args.extend(["--targets", targets]);
        }
        let run = crate::common::run_cli(&args);
        assert_eq!(run.code, 0, "{name}: {}", run.stderr);
        let weights = std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
        let header = String::from_utf8_lossy(&weights[..4096.min(weights.len())]).into_owned();
        let peft_name = format!("base_model.model.model.layers.1.self_attn.{module}.lora_A.weight");
        assert!(header.contains(&peft_name), "{name}: {header}");
        let base = open(&model);
        let adapted = open(&format!("{model}+{}", out.join("adapter").display()));
        let ids = crate::common::ids_tensor(&[1, 5, 17, 33, 8]);
        let diff = crate::common::max_abs_diff(
            &base.model.forward(&ids).unwrap(),
            &adapted.model.forward(&ids).unwrap(),
        );
        assert!(diff > 1e-6, "{name}: training changes the model ({diff})");
    }
}

fn tiny_family(arch: Architecture, seed: u64, dtype: DType) -> LoadedModel {
    tiny_model_with(&tiny_family_config(arch), seed, &tiny_options(dtype)).expect("tiny family")
}

const TINY_IDS: [u32; 8] = [1, 9, 20, 33, 40, 12, 50, 7];

const NEW_FAMILIES: [Architecture; 5] = [
    Architecture::Phi3,
    Architecture::Qwen3,
    Architecture::Gemma3,
    Architecture::Gemma2,
    Architecture::Olmo2,
];

/// Every new family on tiny seeded models: `h[l+1] = h[l] + attn[l] + mlp[l]`. In Gemma 2/3 and
/// OLMo-2 it holds because the `AttnOut`/`MlpOut` hooks see the sub-layer outputs *after* their
/// norms, and `attn[l]` is the post-norm of `o_proj` applied to the heads' outputs (not their
/// sum of `W_O` slices); in Phi-3 and Qwen3 `attn[l]` is `o_proj`'s output. Gemma's sliding
/// layers attend to the last 3 positions and its full layer to all.
#[test]
fn new_families_decompose_the_residual_stream() {
    for arch in NEW_FAMILIES {
        let m = tiny_family(arch, 3, DType::F64);
        let mut rec = Recorder::all();
        m.model
            .forward_hooked(&crate::common::ids_tensor(&TINY_IDS), &mut rec)
            .unwrap();
        let t = TINY_IDS.len();
        for (l, layer) in m.model.layers.iter().enumerate() {
            let get = |p| rec.get(p).unwrap();
            let mid = (get(HookPoint::ResidPre(l)) + get(HookPoint::AttnOut(l))).unwrap();
            assert!(crate::common::max_abs_diff(&mid, get(HookPoint::ResidMid(l))) < 1e-12);
            let post = (&mid + get(HookPoint::MlpOut(l))).unwrap();
            assert!(crate::common::max_abs_diff(&post, get(HookPoint::ResidPost(l))) < 1e-12);
            // attn[l] = N_ao(o_proj(z)), with N_ao computed here from its definition.
            let z = get(HookPoint::HeadOut(l)).reshape((1, t, 16)).unwrap();
            let o = layer
                .self_attn
                .o_proj
                .forward(
                    &z,
                    LinearMode {
                        differentiable: false,
                        use_lora: true,
                    },
                )
                .unwrap();
            assert_eq!(layer.attn_out_norm.is_some(), arch.has_post_norms());
            let expected = match layer.attn_out_norm.as_ref() {
                // LLaMA layout (Phi-3, Qwen3): attn[l] is o_proj's output itself.
                None => o.clone(),
                Some(norm) => {
                    let inv_rms = (o.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + norm.eps)
                        .unwrap()
                        .sqrt()
                        .unwrap()
                        .recip()
                        .unwrap();
                    assert!(crate::common::max_abs_diff(&o, get(HookPoint::AttnOut(l))) > 1e-3);
                    o.broadcast_mul(&inv_rms)
                        .unwrap()
                        .broadcast_mul(&norm.weight)
                        .unwrap()
                }
            };
            assert!(
                crate::common::max_abs_diff(&expected, get(HookPoint::AttnOut(l))) < 1e-12,
                "{arch:?} layer {l}"
            );
        }
        if arch.is_gemma() {
            let last_row = |l: usize| -> Vec<f64> {
                let p = rec.get(HookPoint::AttnPattern(l)).unwrap();
                p.squeeze(0)
                    .unwrap()
                    .get(0)
                    .unwrap()
                    .get(t - 1)
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            // Sliding (window 3): keys t-3..t only; full: every key.
            assert!(last_row(0)[..t - 3].iter().all(|&p| p == 0.0));
            assert!(last_row(0)[t - 3..].iter().all(|&p| p > 0.0));
            assert!(last_row(1).iter().all(|&p| p > 0.0));
        }
    }
}

/// Finite differences, candle's autograd on the differentiable path and the hand-written
/// backward agree on the input gradient of Phi-3, Qwen3, Gemma 3, Gemma 2 (both soft-caps) and
/// OLMo-2 (f64, tiny seeded models).
#[test]
fn new_families_input_gradients_match_finite_differences() {
    for arch in NEW_FAMILIES {
        let m = tiny_family(arch, 5, DType::F64);
        let x0 = m
            .model
            .embed(&crate::common::ids_tensor(&TINY_IDS))
            .unwrap();
        let t = TINY_IDS.len();
        // A fixed cotangent on the final-norm hidden states: f(x) = Σ r ⊙ h(x).
        let r: Vec<f64> = (0..t * 16)
            .map(|i| ((i * 37 % 11) as f64 - 5.0) / 7.0)
            .collect();
        let r = Tensor::from_vec(r, (1, t, 16), &Device::Cpu).unwrap();
        let opts = ForwardOptions {
            differentiable: true,
            logits: LogitsAt::None,
            use_lora: true,
        };
        let f = |x: &Tensor| -> Tensor {
            let h = m
                .model
                .run(Input::Embeds(x), &opts, None, &mut NoHook)
                .unwrap();
            (h * &r).unwrap().sum_all().unwrap()
        };
        let var = Var::from_tensor(&x0).unwrap();
        let grads = f(var.as_tensor()).backward().unwrap();
        let autograd = grads.get(&var).expect("gradient").clone();
        let (_, tape) = m.model.run_taped(Input::Embeds(&x0), true).unwrap();
        let ours = m.model.input_vjp(&tape, &r).unwrap();
        let scale = autograd
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(scale > 1e-3);
        // candle's GELU backward uses constants rounded to 6 digits (0.797885, 0.0535161, ...),
        // so autograd is the looser reference for Gemma; finite differences check ours tightly.
        let diff = crate::common::max_abs_diff(&ours, &autograd);
        let tol = if arch.is_gemma() { 1e-6 } else { 1e-10 };
        assert!(
            diff < tol * scale,
            "{arch:?}: hand-written vs autograd {diff:e} (largest {scale:e})"
        );
        let base: Vec<f64> = x0.flatten_all().unwrap().to_vec1().unwrap();
        let ours: Vec<f64> = ours.flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-5;
        let mut worst: f64 = 0.0;
        for idx in [0usize, 17, 40, 63, 77, 100, 127] {
            let shifted = |delta: f64| -> f64 {
                let mut v = base.clone();
                v[idx] += delta;
                let x = Tensor::from_vec(v, x0.dims(), &Device::Cpu).unwrap();
                f(&x).to_scalar::<f64>().unwrap()
            };
            let numeric = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
            worst = worst.max((numeric - ours[idx]).abs());
        }
        assert!(
            worst < 1e-7 * scale.max(1.0),
            "{arch:?}: finite differences off by {worst:e}"
        );
    }
}

/// Decoding Gemma 3 token by token with a KV cache gives the logits of one full pass, with
/// sliding layers (window 3) longer than their window and the full layer between them.
#[test]
fn gemma3_cached_decoding_equals_the_full_pass() {
    let m = tiny_family(Architecture::Gemma3, 7, DType::F32);
    let ids = crate::common::ids_tensor(&TINY_IDS);
    let full = m.model.forward(&ids).unwrap();
    let mut cache = KvCache::new();
    let opts = ForwardOptions::default();
    let first = m
        .model
        .run(
            Input::Ids(&ids.narrow(1, 0, 2).unwrap()),
            &opts,
            Some(&mut cache),
            &mut NoHook,
        )
        .unwrap();
    let mut rows = vec![first];
    for pos in 2..TINY_IDS.len() {
        let one = ids.narrow(1, pos, 1).unwrap();
        rows.push(
            m.model
                .run(Input::Ids(&one), &opts, Some(&mut cache), &mut NoHook)
                .unwrap(),
        );
    }
    let stepped = Tensor::cat(&rows, 1).unwrap();
    assert!(crate::common::max_abs_diff(&full, &stepped) < 1e-5);
}

/// A padded batch (`run_rows`) gives every row the logits of its own unpadded forward: rows of
/// different lengths behind a shared dense prefix, continued by padded rows again, then one
/// token at a time through the plain `run` on the padded cache after `select_rows`. LLaMA (the
/// fused attention kernel), Gemma 3 (sliding windows shorter than the rows, local RoPE) and
/// Gemma 2 (soft-capped scores: the unfused path with the additive mask).
#[test]
fn padded_rows_equal_their_own_forwards() {
    let seqs: [&[u32]; 3] = [
        &[1, 9, 20, 33, 40, 12, 50, 7, 3],
        &[1, 9, 5, 6],
        &[1, 9, 44, 2, 17, 8, 30, 21],
    ];
    // Shared prefix 2 tokens; then first parts of 3, 1 and 4 tokens; then 2, 0 and 1.
    let first = [3usize, 1, 4];
    let second = [2usize, 0, 1];
    for arch in [
        Architecture::Llama,
        Architecture::Gemma3,
        Architecture::Gemma2,
    ] {
        let m = tiny_family(arch, 11, DType::F32);
        let own: Vec<Tensor> = seqs
            .iter()
            .map(|s| m.model.forward(&crate::common::ids_tensor(s)).unwrap())
            .collect();
        // Logits of row `r` at its position `p` in its own forward, `(1, V)`.
        let at = |r: usize, p: usize| own[r].get(0).unwrap().narrow(0, p, 1).unwrap();
        let last = ForwardOptions {
            logits: LogitsAt::Last,
            ..ForwardOptions::default()
        };
        let mut cache = KvCache::new();
        m.model
            .run(
                Input::Ids(&crate::common::ids_tensor(&[1, 9])),
                &last,
                Some(&mut cache),
                &mut NoHook,
            )
            .unwrap();
        let mut cache = cache.repeat_batch(3).unwrap();
        let padded = |from: &[usize], lens: &[usize]| -> Tensor {
            let width = lens.iter().copied().max().unwrap();
            let ids: Vec<u32> = (0..3)
                .flat_map(|r| {
                    (0..width).map(move |t| if t < lens[r] { seqs[r][from[r] + t] } else { 0 })
                })
                .collect();
            Tensor::from_vec(ids, (3, width), &Device::Cpu).unwrap()
        };
        let out = m
            .model
            .run_rows(&padded(&[2, 2, 2], &first), &first, &last, &mut cache)
            .unwrap();
        for (r, n) in first.iter().enumerate() {
            let got = out.get(r).unwrap();
            let diff = crate::common::max_abs_diff(&got, &at(r, 1 + n));
            assert!(diff < 1e-5, "{arch:?} row {r} first part: {diff:e}");
        }
        let from: Vec<usize> = first.iter().map(|f| 2 + f).collect();
        let out = m
            .model
            .run_rows(&padded(&from, &second), &second, &last, &mut cache)
            .unwrap();
        for r in [0, 2] {
            let got = out.get(r).unwrap();
            let diff = crate::common::max_abs_diff(&got, &at(r, 1 + first[r] + second[r]));
            assert!(diff < 1e-5, "{arch:?} row {r} second part: {diff:e}");
        }
        // Rows 2 and 0 (then 0 twice) continue by one token each through the plain forward.
        let mut cache = cache.select_rows(&[2, 0]).unwrap();
        let next = [2 + first[2] + second[2], 2 + first[0] + second[0]];
        let ids = Tensor::from_vec(
            vec![seqs[2][next[0]], seqs[0][next[1]]],
            (2, 1),
            &Device::Cpu,
        )
        .unwrap();
        let out = m
            .model
            .run(Input::Ids(&ids), &last, Some(&mut cache), &mut NoHook)
            .unwrap();
        for (i, r) in [2usize, 0].into_iter().enumerate() {
            let diff = crate::common::max_abs_diff(&out.get(i).unwrap(), &at(r, next[i]));
            assert!(diff < 1e-5, "{arch:?} row {r} after select_rows: {diff:e}");
        }
    }
}

/// Caches of different lengths joined (`KvCache::concat`: a dense one-row cache and a padded
/// two-row one) continue each row as its own forward would, and so do rows taken from it
/// (`select_rows`) and compacted (`KvCache::compact`: padding moved out of the middle).
#[test]
fn joined_caches_continue_each_row() {
    let seqs: [&[u32]; 3] = [&[1, 9, 20, 33, 40], &[1, 5, 6, 7, 8, 2], &[1, 44, 2, 17, 3]];
    for arch in [Architecture::Llama, Architecture::Gemma3] {
        let m = tiny_family(arch, 5, DType::F32);
        let last = ForwardOptions {
            logits: LogitsAt::Last,
            ..ForwardOptions::default()
        };
        let own = |r: usize, len: usize| {
            let full = m
                .model
                .forward(&crate::common::ids_tensor(seqs[r]))
                .unwrap();
            full.get(0).unwrap().narrow(0, len - 1, 1).unwrap()
        };
        let mut a = KvCache::new();
        m.model
            .run(
                Input::Ids(&crate::common::ids_tensor(&seqs[0][..3])),
                &last,
                Some(&mut a),
                &mut NoHook,
            )
            .unwrap();
        let mut b = KvCache::new();
        let ids =
            Tensor::from_vec(vec![1u32, 5, 6, 7, 8, 1, 44, 2, 1, 1], (2, 5), &Device::Cpu).unwrap();
        m.model.run_rows(&ids, &[5, 3], &last, &mut b).unwrap();
        let mut joined = KvCache::concat(&[&a, &b]).unwrap();
        assert_eq!((joined.len(), joined.rows()), (5, 3));
        let next = Tensor::from_vec(vec![33u32, 2, 17], (3, 1), &Device::Cpu).unwrap();
        let out = m
            .model
            .run(Input::Ids(&next), &last, Some(&mut joined), &mut NoHook)
            .unwrap();
        for (r, len) in [(0, 4), (1, 6), (2, 4)] {
            let diff = crate::common::max_abs_diff(&out.get(r).unwrap(), &own(r, len));
            assert!(diff < 1e-5, "{arch:?} row {r}: {diff:e}");
        }
        let mut short = joined.select_rows(&[0, 2]).unwrap().compact().unwrap();
        assert_eq!((short.len(), short.rows()), (4, 2), "padding dropped");
        let next = Tensor::from_vec(vec![40u32, 3], (2, 1), &Device::Cpu).unwrap();
        let out = m
            .model
            .run(Input::Ids(&next), &last, Some(&mut short), &mut NoHook)
            .unwrap();
        for (i, r) in [0, 2].into_iter().enumerate() {
            let diff = crate::common::max_abs_diff(&out.get(i).unwrap(), &own(r, 5));
            assert!(diff < 1e-5, "{arch:?} row {r} after compact: {diff:e}");
        }
    }
}

/// Padded batches refuse differentiable passes and lengths that do not fit the ids.
#[test]
fn padded_rows_refuse_bad_requests() {
    let m = tiny_family(Architecture::Llama, 3, DType::F32);
    let ids = Tensor::from_vec(vec![1u32, 9, 20, 1, 9, 0], (2, 3), &Device::Cpu).unwrap();
    let mut cache = KvCache::new();
    let opts = ForwardOptions::default();
    assert!(m.model.run_rows(&ids, &[3, 4], &opts, &mut cache).is_err());
    assert!(m.model.run_rows(&ids, &[3], &opts, &mut cache).is_err());
    let grad = ForwardOptions {
        differentiable: true,
        ..opts
    };
    assert!(m.model.run_rows(&ids, &[3, 2], &grad, &mut cache).is_err());
    assert!(m.model.run_rows(&ids, &[3, 2], &opts, &mut cache).is_ok());
}

/// The GGUF copies of the tiny Phi-3 (fused `attn_qkv`, gate and up fused in `ffn_up`, sliding
/// window from the metadata), Qwen3 (`attn_q_norm`/`attn_k_norm`, `key_length` 16 on a hidden
/// size of 32) and Gemma 2 (gains stored as `1 + w`, `post_attention_norm` / `ffn_norm` /
/// `post_ffw_norm`, soft-caps and window from the metadata) and OLMo-2 (no pre-norms, q/k norms
/// over the projections, no permutation), written with llama.cpp's tensor names by
/// `scripts/gen-family-goldens`: the transformers logits of the folders they came from.
#[test]
fn gguf_copies_match_transformers() {
    for name in ["phi3", "qwen3", "gemma2", "olmo2"] {
        let m = open(&family(name).join("model.gguf").display().to_string());
        assert_eq!(m.info.format, "gguf");
        assert_eq!(m.model.config().architecture.name(), name);
        check(&m, &golden(name), "base");
    }
}

/// Gemma 2: Gemma 3's layout without q/k norms, alternating sliding (window 4) and full layers,
/// attention scores and final logits soft-capped (caps 1.5 and 3, small enough to bend): logits
/// and the input gradient through both soft-caps match transformers, with and without an
/// adapter; saved and loaded again, the same logits.
#[test]
fn gemma2_matches_transformers_with_and_without_an_adapter() {
    let dir = family("gemma2");
    let golden = golden("gemma2");
    let m = open(&dir.display().to_string());
    let cfg = m.model.config();
    assert_eq!(cfg.architecture.name(), "gemma2");
    assert_eq!((cfg.window(0), cfg.window(1)), (Some(4), None));
    assert_eq!(cfg.attn_logit_softcapping, Some(1.5));
    assert_eq!(cfg.final_logit_softcapping, Some(3.0));
    assert!(m.model.layers[0].self_attn.q_norm.is_none());
    check_with_and_without_adapter(&m, &dir, &golden);
    assert_saves_and_loads_the_same(&m);
}

/// A cache cut back to its first tokens (`KvCache::truncate`) continues as if the later ones
/// had never run; a padded cache, or more tokens than it holds, is refused.
#[test]
fn truncated_caches_continue_from_their_cut() {
    let seq: &[u32] = &[1, 9, 20, 33, 40, 12];
    for arch in [Architecture::Llama, Architecture::Gemma3] {
        let m = tiny_family(arch, 6, DType::F32);
        let all = ForwardOptions::default();
        let full = m.model.forward(&crate::common::ids_tensor(seq)).unwrap();
        let mut cache = KvCache::new();
        m.model
            .run(
                Input::Ids(&crate::common::ids_tensor(seq)),
                &all,
                Some(&mut cache),
                &mut NoHook,
            )
            .unwrap();
        let mut cut = cache.truncate(2).unwrap();
        assert_eq!(cut.len(), 2);
        let rest = m
            .model
            .run(
                Input::Ids(&crate::common::ids_tensor(&seq[2..])),
                &all,
                Some(&mut cut),
                &mut NoHook,
            )
            .unwrap();
        let diff = crate::common::max_abs_diff(&rest, &full.narrow(1, 2, 4).unwrap());
        assert!(diff < 1e-5, "{arch:?}: {diff:e}");
        assert!(cache.truncate(7).is_err());
        let mut padded = KvCache::new();
        let ids = Tensor::from_vec(vec![1u32, 5, 6, 1, 44, 1], (2, 3), &Device::Cpu).unwrap();
        m.model.run_rows(&ids, &[3, 2], &all, &mut padded).unwrap();
        assert!(padded.truncate(1).is_err());
    }
}
