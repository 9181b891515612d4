//! AdamW (Loshchilov & Hutter, 2019; PyTorch's `torch.optim.AdamW` update and defaults) on the
//! adapter parameters: decoupled weight decay, bias-corrected moments.

use candle_core::{Tensor, Var};

use crate::error::Result;

/// AdamW moments of one tensor.
#[derive(Clone, Debug)]
pub struct Moments {
    /// First moment.
    pub m: Tensor,
    /// Second moment.
    pub v: Tensor,
}

/// AdamW hyper-parameters (PyTorch's defaults).
pub const BETA1: f64 = 0.9;
pub const BETA2: f64 = 0.999;
pub const EPS: f64 = 1e-8;

/// One AdamW update of `var` with gradient `g` (already clipped) at step `t` (1-based): the
/// moments are updated in place; weight decay `wd` is applied to the parameter, not the
/// gradient. Only plain values are stored: nothing extends an autograd graph across steps.
pub fn adamw_update(
    var: &Var,
    g: &Tensor,
    moments: &mut Moments,
    lr: f64,
    wd: f64,
    t: i32,
) -> Result<()> {
    let bc1 = 1.0 - BETA1.powi(t);
    let bc2 = 1.0 - BETA2.powi(t);
    let g = g.detach();
    moments.m = ((&moments.m * BETA1)? + (&g * (1.0 - BETA1))?)?.detach();
    moments.v = ((&moments.v * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?.detach();
    let mut p = var.as_tensor().detach();
    if wd > 0.0 {
        p = (p * (1.0 - lr * wd))?;
    }
    let denom = ((moments.v.sqrt()? / bc2.sqrt())? + EPS)?;
    let update = ((&moments.m / denom)? * (lr / bc1))?;
    var.set(&(p - update)?)?;
    Ok(())
}
