//! Times each segment of the 128-token (or `--tokens N`) forward of the demo model (between consecutive hook
//! points; candle's CPU ops are synchronous), or loops it for `perf record` with `--loop N`.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::Tensor;
use tunelens::model::hooks::{Hook, HookPoint};
use tunelens::model::{load, LoadOptions, ModelSpec};

#[derive(Default)]
struct Timer {
    last: Option<(Instant, &'static str)>,
    totals: BTreeMap<String, f64>,
}

fn kind(point: HookPoint) -> &'static str {
    match point {
        HookPoint::Embed => "embed",
        HookPoint::ResidPre(_) => "resid_pre",
        HookPoint::AttnPattern(_) => "attn_pattern",
        HookPoint::HeadOut(_) => "head_out",
        HookPoint::AttnOut(_) => "attn_out",
        HookPoint::ResidMid(_) => "resid_mid",
        HookPoint::MlpOut(_) => "mlp_out",
        HookPoint::ResidPost(_) => "resid_post",
        HookPoint::FinalNorm => "final_norm",
        HookPoint::Logits => "logits",
    }
}

impl Hook for Timer {
    fn on(&mut self, point: HookPoint, _xs: &Tensor) -> tunelens::Result<Option<Tensor>> {
        let now = Instant::now();
        let name = kind(point);
        if let Some((then, prev)) = self.last {
            *self.totals.entry(format!("{prev} -> {name}")).or_default() +=
                (now - then).as_secs_f64();
        }
        self.last = Some((now, name));
        Ok(None)
    }

    fn wants(&self, point: HookPoint) -> bool {
        // Timing every point but the pattern keeps the fused attention kernel in use.
        !matches!(point, HookPoint::AttnPattern(_))
    }
}

fn main() -> anyhow::Result<()> {
    tunelens::model::configure_cpu_threads();
    let path = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
    let loaded = load(&ModelSpec::parse(path), &LoadOptions::default())?;
    let tokens: u32 = match std::env::args().skip_while(|a| a != "--tokens").nth(1) {
        Some(n) => n.parse()?,
        None => 128,
    };
    let ids: Vec<u32> = (0..tokens).map(|i| 100 + i * 37 % 40000).collect();
    let input = Tensor::new(ids.as_slice(), loaded.model.device())?.unsqueeze(0)?;
    if let Some(n) = std::env::args().skip_while(|a| a != "--loop").nth(1) {
        for _ in 0..n.parse::<usize>()? {
            loaded.model.forward(&input)?;
        }
        return Ok(());
    }
    for _ in 0..3 {
        loaded.model.forward(&input)?;
    }
    let reps = 10u32;
    let mut timer = Timer::default();
    let started = Instant::now();
    for _ in 0..reps {
        timer.last = None;
        loaded.model.forward_hooked(&input, &mut timer)?;
    }
    let total = started.elapsed().as_secs_f64() / f64::from(reps);
    println!("forward: {:.1} ms", total * 1e3);
    for (segment, secs) in &timer.totals {
        println!("{segment:28} {:7.2} ms", secs / f64::from(reps) * 1e3);
    }
    Ok(())
}
