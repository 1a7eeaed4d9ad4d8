//! The dynamic head of the Universal Model as a tensor operation: for each class, an
//! 8→8→8→1 network (ReLU after the first two layers) whose 153 weights and biases come from
//! the controller, applied at every voxel of the 8-channel features.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use crate::cpu::head::{head_backward, head_batch};
use crate::error::{Error, Result};
use crate::ops::{ExecPath, storage_f32, with_f32_slices};

/// Channels of the features the dynamic head reads.
pub const HEAD_CHANNELS: usize = 8;
/// Parameters per class: 8·8 + 8·8 + 8·1 weights, then 8 + 8 + 1 biases.
pub const HEAD_PARAMS: usize = 153;

/// The per-class 8→8→8→1 head (ReLU after the first two layers, none after the last).
///
/// # Shapes
/// `features`: `(B, 8, D, H, W)`, `params`: `(B, K, 153)` → `(B, K, D, H, W)`.
///
/// # Errors
/// Shape mismatches.
pub fn dynamic_head(features: &Tensor, params: &Tensor) -> Result<Tensor> {
    let (b, c, _, _, _) = features.dims5()?;
    let (pb, _, np) = params.dims3()?;
    if c != HEAD_CHANNELS || pb != b || np != HEAD_PARAMS {
        return Err(Error::shape(
            "dynamic head",
            format!(
                "features {:?} with params {:?}",
                features.dims(),
                params.dims()
            ),
        ));
    }
    match ExecPath::of_all(&[features, params]) {
        ExecPath::CpuInference => {
            let (_, _, d, h, w) = features.dims5()?;
            let (_, k, _) = params.dims3()?;
            let out = with_f32_slices(&[features, params], |s| {
                head_batch(s[0], s[1], b, k, d * h * w)
            })?;
            Ok(Tensor::from_vec(out, (b, k, d, h, w), features.device())?)
        }
        // Training on the CPU: the backward pass recomputes the hidden layers.
        ExecPath::CpuTraining => Ok(features
            .contiguous()?
            .apply_op2(&params.contiguous()?, HeadOp)?),
        ExecPath::Composed => dynamic_head_composed(features, params),
    }
}

/// [`dynamic_head`] with candle operations only (any device; keeps the hidden layers for
/// autograd).
///
/// # Errors
/// Shape mismatches.
pub fn dynamic_head_composed(features: &Tensor, params: &Tensor) -> Result<Tensor> {
    let (b, _, d, h, w) = features.dims5()?;
    let (_, k, _) = params.dims3()?;
    let v = d * h * w;
    let mut outs = Vec::with_capacity(b);
    for i in 0..b {
        let p = params.get(i)?; // (K, 153)
        let w1 = p.narrow(1, 0, 64)?.reshape((k, 8, 8))?;
        let w2 = p.narrow(1, 64, 64)?.reshape((k, 8, 8))?;
        let w3 = p.narrow(1, 128, 8)?.reshape((k, 1, 8))?;
        let b1 = p.narrow(1, 136, 8)?.reshape((k, 8, 1))?;
        let b2 = p.narrow(1, 144, 8)?.reshape((k, 8, 1))?;
        let b3 = p.narrow(1, 152, 1)?.reshape((k, 1, 1))?;
        let f = features.get(i)?.reshape((1, HEAD_CHANNELS, v))?;
        let h1 = w1.broadcast_matmul(&f)?.broadcast_add(&b1)?.relu()?; // (K, 8, V)
        let h2 = w2.matmul(&h1)?.broadcast_add(&b2)?.relu()?;
        let out = w3.matmul(&h2)?.broadcast_add(&b3)?; // (K, 1, V)
        outs.push(out.reshape((k, d, h, w))?);
    }
    Ok(Tensor::stack(&outs, 0)?)
}

/// The dynamic head with a recomputing backward pass.
#[derive(Debug, Clone, Copy)]
struct HeadOp;

impl CustomOp2 for HeadOp {
    fn name(&self) -> &'static str {
        "dynamic-head"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let f = storage_f32(s1, l1, "dynamic head features")?;
        let p = storage_f32(s2, l2, "dynamic head params")?;
        let d = l1.dims();
        let (b, v) = (d[0], d[2] * d[3] * d[4]);
        let k = l2.dims()[1];
        let out = head_batch(f, p, b, k, v);
        Ok((
            CpuStorage::F32(out),
            Shape::from(vec![b, k, d[2], d[3], d[4]]),
        ))
    }

    fn bwd(
        &self,
        features: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dims = features.dims().to_vec();
        let (b, v) = (dims[0], dims[2] * dims[3] * dims[4]);
        let k = params.dims()[1];
        let (df, dp) = with_f32_slices(&[features, params, grad], |s| {
            head_backward(s[0], s[1], s[2], b, k, v)
        })?;
        let dev = features.device();
        Ok((
            Some(Tensor::from_vec(df, dims, dev)?),
            Some(Tensor::from_vec(
                dp.iter().map(|v| *v as f32).collect::<Vec<_>>(),
                params.shape(),
                dev,
            )?),
        ))
    }
}
