//! Hook points of the transformer forward, and ready-made hooks to read ("cache"), replace
//! ("patch") or add to activations at chosen positions and heads.
//!
//! The model calls [`Hook::on`] at every [`HookPoint`] in order; a hook returns `Some(t)` to replace
//! the activation and `None` to keep it. The model knows nothing about any analysis.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// Where in the forward a hook is called. Shapes use `b` = batch, `T` = tokens in this call,
/// `T_kv` = tokens attended to (cache included), `d` = hidden size, `h` = query heads.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum HookPoint {
    /// Token embeddings `h^(0)`, `(b, T, d)`.
    Embed,
    /// Residual stream entering layer `l` (= `h^(l)`), `(b, T, d)`.
    ResidPre(usize),
    /// Attention probabilities of layer `l`, `(b, h, T, T_kv)`.
    AttnPattern(usize),
    /// Per-head attention outputs before `o_proj` (METHODS.md HOOK A), `(b, T, h, d_h)`.
    HeadOut(usize),
    /// `o_proj` output of layer `l` (HOOK B), `(b, T, d)`.
    AttnOut(usize),
    /// Residual stream after the attention sub-layer of layer `l`, `(b, T, d)`.
    ResidMid(usize),
    /// MLP output of layer `l` (HOOK C), `(b, T, d)`.
    MlpOut(usize),
    /// Output of layer `l` (= `h^(l+1)`, HOOK D), `(b, T, d)`.
    ResidPost(usize),
    /// Final RMSNorm output, `(b, T, d)` (only the positions whose logits are computed).
    FinalNorm,
    /// Logits, `(b, T, V)` (only the positions whose logits are computed).
    Logits,
}

impl HookPoint {
    /// The axis that indexes token positions in this point's activation.
    pub fn position_axis(self) -> usize {
        match self {
            Self::AttnPattern(_) => 2,
            _ => 1,
        }
    }

    /// The axis that indexes heads, for points that have one.
    pub fn head_axis(self) -> Option<usize> {
        match self {
            Self::HeadOut(_) => Some(2),
            Self::AttnPattern(_) => Some(1),
            _ => None,
        }
    }
}

/// Called by the model at every hook point.
pub trait Hook {
    /// Return `Some(t)` to replace the activation (patching), `None` to keep it (caching).
    /// A replacement must have the activation's shape.
    fn on(&mut self, point: HookPoint, xs: &Tensor) -> Result<Option<Tensor>>;

    /// Told before each forward the absolute position of its first token (non-zero when a
    /// KV cache holds earlier tokens), so hooks can address absolute positions.
    fn set_position_offset(&mut self, _offset: usize) {}

    /// Whether this hook looks at `point` at all. The forward may skip materialising an
    /// activation no hook wants: the attention pattern is not formed on the fast inference
    /// path unless a hook wants [`HookPoint::AttnPattern`]. The default says yes to every point.
    fn wants(&self, _point: HookPoint) -> bool {
        true
    }
}

/// A hook that does nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoHook;

impl Hook for NoHook {
    fn on(&mut self, _point: HookPoint, _xs: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    fn wants(&self, _point: HookPoint) -> bool {
        false
    }
}

/// Records the activations at the chosen points. Recording keeps the autograd graph, so a
/// recorded tensor can be differentiated through when the forward was run differentiably.
#[derive(Debug, Default)]
pub struct Recorder {
    wanted: Vec<HookPoint>,
    record_all: bool,
    /// The recorded activations, keyed by point (sorted).
    pub acts: BTreeMap<HookPoint, Tensor>,
}

impl Recorder {
    /// Records only these points.
    pub fn new(points: impl IntoIterator<Item = HookPoint>) -> Self {
        Self {
            wanted: points.into_iter().collect(),
            ..Self::default()
        }
    }

    /// Records every point.
    pub fn all() -> Self {
        Self {
            record_all: true,
            ..Self::default()
        }
    }

    /// The activation recorded at `point`.
    pub fn get(&self, point: HookPoint) -> Result<&Tensor> {
        self.acts.get(&point).ok_or_else(|| {
            Error::invalid(
                "hook point",
                format!("{point:?} was not recorded by this forward"),
            )
        })
    }
}

impl Hook for Recorder {
    fn on(&mut self, point: HookPoint, xs: &Tensor) -> Result<Option<Tensor>> {
        if self.record_all || self.wanted.contains(&point) {
            self.acts.insert(point, xs.clone());
        }
        Ok(None)
    }

    fn wants(&self, point: HookPoint) -> bool {
        self.record_all || self.wanted.contains(&point)
    }
}

/// Which token positions an [`Edit`] touches. Positions are absolute (a KV cache offset is
/// subtracted); negative list entries count from the end of the current call (`-1` = last token).
#[derive(Clone, Debug, PartialEq)]
pub enum Positions {
    /// Every position of the call.
    All,
    /// The listed positions.
    List(Vec<isize>),
}

/// What an [`Edit`] does at its sites.
#[derive(Clone, Debug)]
pub enum EditOp {
    /// Set the activation to this value.
    Replace(Tensor),
    /// Add this value to the activation.
    Add(Tensor),
}

/// One intervention: at `point`, for `positions` (and `heads`, at head-indexed points), replace
/// or add a value. The value is broadcast to the selected slice, whose shape is the activation's
/// with the position axis (and head axis) shrunk to the number selected, so a `(d,)` vector adds
/// the same direction at every selected position.
#[derive(Clone, Debug)]
pub struct Edit {
    /// The hook point.
    pub point: HookPoint,
    /// The positions to change.
    pub positions: Positions,
    /// Heads to change (`None` = all); only at [`HookPoint::HeadOut`] and [`HookPoint::AttnPattern`].
    pub heads: Option<Vec<usize>>,
    /// Replace or add.
    pub op: EditOp,
}

/// Applies a list of [`Edit`]s during a forward, optionally recording too.
#[derive(Debug, Default)]
pub struct Editor {
    /// The edits, applied in order.
    pub edits: Vec<Edit>,
    offset: usize,
}

impl Editor {
    /// An editor applying `edits`.
    pub fn new(edits: Vec<Edit>) -> Self {
        Self { edits, offset: 0 }
    }
}

impl Hook for Editor {
    fn on(&mut self, point: HookPoint, xs: &Tensor) -> Result<Option<Tensor>> {
        let mut current: Option<Tensor> = None;
        for edit in self.edits.iter().filter(|e| e.point == point) {
            let base = current.as_ref().unwrap_or(xs);
            if let Some(edited) = apply_edit(base, edit, self.offset)? {
                current = Some(edited);
            }
        }
        Ok(current)
    }

    fn set_position_offset(&mut self, offset: usize) {
        self.offset = offset;
    }

    fn wants(&self, point: HookPoint) -> bool {
        self.edits.iter().any(|e| e.point == point)
    }
}

/// Runs several hooks in sequence; each sees the previous one's replacement.
pub struct Chain<'a>(pub Vec<&'a mut dyn Hook>);

impl Hook for Chain<'_> {
    fn on(&mut self, point: HookPoint, xs: &Tensor) -> Result<Option<Tensor>> {
        let mut current: Option<Tensor> = None;
        for hook in &mut self.0 {
            let input = current.clone().unwrap_or_else(|| xs.clone());
            if let Some(t) = hook.on(point, &input)? {
                current = Some(t);
            }
        }
        Ok(current)
    }

    fn set_position_offset(&mut self, offset: usize) {
        for hook in &mut self.0 {
            hook.set_position_offset(offset);
        }
    }

    fn wants(&self, point: HookPoint) -> bool {
        self.0.iter().any(|hook| hook.wants(point))
    }
}

/// A 0/1 mask over `len` entries with ones at `selected`, shaped to broadcast along `axis` of a
/// tensor of rank `rank`.
fn axis_mask(
    selected: &[usize],
    len: usize,
    axis: usize,
    rank: usize,
    xs: &Tensor,
) -> Result<Tensor> {
    let mut values = vec![0f32; len];
    for &i in selected {
        values[i] = 1.0;
    }
    let mut shape = vec![1usize; rank];
    shape[axis] = len;
    Ok(Tensor::from_vec(values, shape, xs.device())?.to_dtype(xs.dtype())?)
}

/// For each of `len` entries, the index of its slot among `selected` (0 when not selected), so that
/// `index_select` spreads a value given per selected entry over the full axis.
fn spread_index(selected: &[usize], len: usize, xs: &Tensor) -> Result<Tensor> {
    let mut index = vec![0u32; len];
    for (slot, &i) in selected.iter().enumerate() {
        index[i] = slot as u32;
    }
    Ok(Tensor::from_vec(index, len, xs.device())?)
}

fn resolve_positions(positions: &Positions, len: usize, offset: usize) -> Vec<usize> {
    match positions {
        Positions::All => (0..len).collect(),
        Positions::List(list) => {
            let mut out = Vec::with_capacity(list.len());
            for &p in list {
                let rel = if p < 0 {
                    len as isize + p
                } else {
                    p - offset as isize
                };
                // Absolute positions outside this call (e.g. prompt positions during cached
                // decoding) are simply not present in this forward.
                if (0..len as isize).contains(&rel) {
                    let rel = rel as usize;
                    if !out.contains(&rel) {
                        out.push(rel);
                    }
                }
            }
            out.sort_unstable();
            out
        }
    }
}

/// Expands `value`, given for the selected entries of `axis`, to the full axis length.
fn spread(
    value: &Tensor,
    selected: &[usize],
    len: usize,
    axis: usize,
    xs: &Tensor,
) -> Result<Tensor> {
    if value.rank() == xs.rank() && value.dim(axis)? == selected.len() && selected.len() != len {
        let index = spread_index(selected, len, xs)?;
        Ok(value.contiguous()?.index_select(&index, axis)?)
    } else {
        Ok(value.clone())
    }
}

fn apply_edit(xs: &Tensor, edit: &Edit, offset: usize) -> Result<Option<Tensor>> {
    let rank = xs.rank();
    let pos_axis = edit.point.position_axis();
    let seq_len = xs.dim(pos_axis)?;
    let positions = resolve_positions(&edit.positions, seq_len, offset);
    if positions.is_empty() {
        return Ok(None);
    }
    let mut mask = axis_mask(&positions, seq_len, pos_axis, rank, xs)?;
    let value = match &edit.op {
        EditOp::Replace(v) | EditOp::Add(v) => v.to_dtype(xs.dtype())?.to_device(xs.device())?,
    };
    let mut value = spread(&value, &positions, seq_len, pos_axis, xs)?;
    if let Some(heads) = &edit.heads {
        let Some(head_axis) = edit.point.head_axis() else {
            return Err(Error::invalid(
                "edit",
                format!("{:?} has no head axis; remove `heads`", edit.point),
            ));
        };
        let n_heads = xs.dim(head_axis)?;
        if let Some(&bad) = heads.iter().find(|&&h| h >= n_heads) {
            return Err(Error::invalid(
                "head",
                format!("head {bad} out of range (the model has {n_heads} heads)"),
            ));
        }
        let mut heads = heads.clone();
        heads.sort_unstable();
        heads.dedup();
        mask = mask.broadcast_mul(&axis_mask(&heads, n_heads, head_axis, rank, xs)?)?;
        value = spread(&value, &heads, n_heads, head_axis, xs)?;
    }
    let edited = match edit.op {
        EditOp::Add(_) => xs.broadcast_add(&value.broadcast_mul(&mask)?)?,
        EditOp::Replace(_) => {
            let keep = mask.affine(-1.0, 1.0)?;
            xs.broadcast_mul(&keep)?
                .broadcast_add(&value.broadcast_mul(&mask)?)?
        }
    };
    if edited.dims() != xs.dims() {
        return Err(Error::invalid(
            "edit value",
            format!(
                "value of shape {:?} does not fit {:?} of shape {:?}",
                value.dims(),
                edit.point,
                xs.dims()
            ),
        ));
    }
    debug_assert!(edited.dtype() == xs.dtype() || xs.dtype() == DType::F32);
    Ok(Some(edited))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn replace_at_positions_and_heads() -> anyhow::Result<()> {
        // (b=1, T=3, h=2, d_h=2) filled with 0..12.
        let xs = Tensor::arange(0f32, 12.0, &Device::Cpu)?.reshape((1, 3, 2, 2))?;
        let edit = Edit {
            point: HookPoint::HeadOut(0),
            positions: Positions::List(vec![-1]),
            heads: Some(vec![1]),
            op: EditOp::Replace(Tensor::new(&[100f32, 200.0], &Device::Cpu)?),
        };
        let mut editor = Editor::new(vec![edit]);
        let out = editor.on(HookPoint::HeadOut(0), &xs)?.unwrap();
        let flat: Vec<f32> = out.flatten_all()?.to_vec1()?;
        assert_eq!(
            flat,
            vec![0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 100., 200.]
        );
        // Other points are untouched.
        assert!(editor.on(HookPoint::HeadOut(1), &xs)?.is_none());
        Ok(())
    }

    #[test]
    fn add_per_position_values_with_offset() -> anyhow::Result<()> {
        let xs = Tensor::zeros((1, 3, 2), DType::F32, &Device::Cpu)?;
        let value = Tensor::new(&[[[1f32, 1.0], [2.0, 2.0]]], &Device::Cpu)?; // (1, 2, 2)
        let mut editor = Editor::new(vec![Edit {
            point: HookPoint::ResidPost(0),
            positions: Positions::List(vec![10, 12]),
            heads: None,
            op: EditOp::Add(value),
        }]);
        editor.set_position_offset(10);
        let out = editor.on(HookPoint::ResidPost(0), &xs)?.unwrap();
        let rows: Vec<Vec<f32>> = out.squeeze(0)?.to_vec2()?;
        assert_eq!(rows, vec![vec![1., 1.], vec![0., 0.], vec![2., 2.]]);
        Ok(())
    }
}
