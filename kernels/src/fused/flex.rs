//! The fused ops on the flex backend: raw kernels on the tensors' f32 buffers, and their backward
//! registered as custom autodiff steps (Burn's "backend extension" pattern).
//!
//! The model code is generic over the backend, so each entry point checks the backend type at run
//! time (`TypeId`) and hands its inputs back untouched (`Err`) when it cannot run them: another
//! backend, another dtype, or shapes the kernel does not take.

use std::any::{Any, TypeId};
use std::sync::Arc;

use rayon::prelude::*;

use crate::attention::{AttentionShape, Mask, attention_backward, attention_forward};
use crate::dropout::{dropout as dropout_kernel, dropout_add};
use crate::gelu::{gelu_backward, gelu_forward};
use crate::loss::softmax_cross_entropy as cross_entropy_kernel;
use crate::matmul::{View, add_product, product};
use crate::norm::{layer_norm_backward, layer_norm_forward, rms_norm_backward, rms_norm_forward};
use crate::rope::{RopeShape, rope as rope_kernel};
use crate::swiglu::{swiglu_backward, swiglu_forward};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Int, Shape, Tensor, TensorData, TensorPrimitive};

use super::{AttentionMask, BlockMatrix, FrozenMatrix};
use crate::bf16_gemm::{self, Kernel, Strided, Weight};
use crate::quant::BlockFormat;
use crate::{ComputeDType, compute_dtype};

type AdFlex = Autodiff<Flex>;
type AdTensor = FloatTensor<AdFlex>;

/// Whether `B` is flex or flex under (non-checkpointing) autodiff: the backends these kernels run on.
pub(super) fn runs<B: Backend>() -> bool {
    is::<B, Flex>() || is::<B, AdFlex>()
}

fn is<B: 'static, T: 'static>() -> bool {
    TypeId::of::<B>() == TypeId::of::<T>()
}

/// `x` as a `U`, for `T` and `U` the same type (checked by the caller with [`is`]).
fn same<T: 'static, U: 'static>(x: T) -> U {
    let mut slot = Some(x);
    (&mut slot as &mut dyn Any).downcast_mut::<Option<U>>().and_then(Option::take).expect("types checked by the caller")
}

/// The backend's float primitive of `t`, as `P` (flex's or autodiff-flex's tensor type).
fn primitive<B: Backend, P: 'static, const D: usize>(t: Tensor<B, D>) -> P {
    same(t.into_primitive().tensor())
}

/// A tensor of backend `B` from the primitive `p` of the same backend.
fn tensor<B: Backend, P: 'static, const D: usize>(p: P) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(same::<P, FloatTensor<B>>(p)))
}

/// A tensor of backend `B` (flex, or autodiff-flex untracked) holding `t`.
fn untracked<B: Backend, const D: usize>(t: FlexTensor) -> Tensor<B, D> {
    if is::<B, Flex>() {
        return tensor::<B, FlexTensor, D>(t);
    }
    tensor::<B, AdTensor, D>(<AdFlex as AutodiffBackend>::from_inner(t))
}

/// The flex tensor inside `t` (which autodiff must not track).
fn inner<B: Backend, const D: usize>(t: Tensor<B, D>) -> FlexTensor {
    if is::<B, Flex>() {
        return primitive::<B, FlexTensor, D>(t);
    }
    <AdFlex as AutodiffBackend>::inner(primitive::<B, AdTensor, D>(t))
}

/// A contiguous row-major view of `t` (copied only when strided).
fn contiguous(t: &FlexTensor) -> FlexTensor {
    t.to_contiguous()
}

/// The f32 elements of a tensor made by [`contiguous`].
fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("f32 tensors are checked before any kernel runs, and made contiguous")
}

/// A flex tensor that owns `data` (no copy).
fn owned(data: Vec<f32>, shape: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape.to_vec()))
}

/// Whether every tensor is f32, the kernels' only type.
fn all_f32<B: Backend, const D: usize>(ts: &[&Tensor<B, D>]) -> bool {
    ts.iter().all(|t| t.dtype() == DType::F32)
}

/// Runs a fused op on `inputs` (`N` float tensors of one rank `D`; an input of another rank is
/// reshaped to it by the caller): `forward`, given the inputs as contiguous flex tensors and which
/// of them autodiff tracks, returns the output and the state its backward needs; under autodiff the
/// step is registered with `backward` when any input is tracked.
fn run<B: Backend, S: OpState, Op: Backward<Flex, N, State = S>, const N: usize, const D: usize, const O: usize>(
    inputs: [Tensor<B, D>; N],
    backward: Op,
    forward: impl FnOnce([&FlexTensor; N], [bool; N]) -> (FlexTensor, S),
) -> Tensor<B, O> {
    run_strided(inputs, backward, |prims, tracked| forward(prims.map(contiguous).each_ref(), tracked))
}

/// What a fused op keeps for its backward pass.
trait OpState: Clone + Send + std::fmt::Debug + 'static {}
impl<S: Clone + Send + std::fmt::Debug + 'static> OpState for S {}

/// [`run`] handing `forward` the inputs in their own layouts (strided views included).
fn run_strided<B, S, Op, const N: usize, const D: usize, const O: usize>(
    inputs: [Tensor<B, D>; N],
    backward: Op,
    forward: impl FnOnce([&FlexTensor; N], [bool; N]) -> (FlexTensor, S),
) -> Tensor<B, O>
where
    B: Backend,
    S: Clone + Send + std::fmt::Debug + 'static,
    Op: Backward<Flex, N, State = S>,
{
    if is::<B, Flex>() {
        let prims: [FlexTensor; N] = inputs.map(primitive::<B, FlexTensor, D>);
        let (out, _) = forward(prims.each_ref(), [false; N]);
        return tensor::<B, FlexTensor, O>(out);
    }
    let prims: [AdTensor; N] = inputs.map(primitive::<B, AdTensor, D>);
    let tracked = prims.each_ref().map(|p| p.is_tracked());
    let (out, state) = forward(prims.each_ref().map(|p| &p.primitive), tracked);
    let out = match backward.prepare::<NoCheckpointing>(prims.map(|p| p.node.clone())).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(state, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    tensor::<B, AdTensor, O>(out)
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

#[derive(Debug)]
struct SwiGluBackward;

impl Backward<Flex, 2> for SwiGluBackward {
    /// The gate and up projections.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_gate, node_up] = ops.parents;
        let grad = contiguous(&grads.consume::<Flex>(&ops.node));
        let (gate, up) = ops.state;
        let shape = gate.layout().shape().to_vec();
        let n = grad.layout().num_elements();
        let (mut d_gate, mut d_up) = (vec![0.0f32; n], vec![0.0f32; n]);
        swiglu_backward(values(&gate), values(&up), values(&grad), &mut d_gate, &mut d_up);
        if let Some(node) = node_gate {
            grads.register::<Flex>(node.id, owned(d_gate, &shape));
        }
        if let Some(node) = node_up {
            grads.register::<Flex>(node.id, owned(d_up, &shape));
        }
    }
}

pub(super) fn swiglu<B: Backend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
    if !runs::<B>() || !all_f32(&[&gate, &up]) || gate.dims() != up.dims() {
        return Err((gate, up));
    }
    let shape = gate.dims();
    Ok(run([gate, up], SwiGluBackward, |[gate, up], _| {
        let mut out = vec![0.0f32; gate.layout().num_elements()];
        swiglu_forward(values(gate), values(up), &mut out);
        (owned(out, &shape), (gate.clone(), up.clone()))
    }))
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

#[derive(Debug)]
struct RmsNormBackward;

impl Backward<Flex, 2> for RmsNormBackward {
    /// The input, γ as `[d]`, ε, and γ's shape as the op saw it.
    type State = (FlexTensor, FlexTensor, f32, Vec<usize>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_gamma] = ops.parents;
        let grad = contiguous(&grads.consume::<Flex>(&ops.node));
        let (x, gamma, eps, gamma_shape) = ops.state;
        let mut dx = vec![0.0f32; x.layout().num_elements()];
        let d_gamma = rms_norm_backward(values(&x), values(&gamma), values(&grad), eps, &mut dx);
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, owned(dx, &x.layout().shape().to_vec()));
        }
        if let Some(node) = node_gamma {
            grads.register::<Flex>(node.id, owned(d_gamma, &gamma_shape));
        }
    }
}

pub(super) fn rms_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    epsilon: f64,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, 1>)> {
    let d = gamma.dims()[0];
    if !runs::<B>() || x.dtype() != DType::F32 || gamma.dtype() != DType::F32 || x.dims()[D - 1] != d || d == 0 {
        return Err((x, gamma));
    }
    let shape = x.dims();
    // γ goes in as a rank-D tensor so both inputs share the op's rank; it is reshaped back below.
    let mut gamma_shape = [1; D];
    gamma_shape[D - 1] = d;
    let eps = epsilon as f32;
    let out = run([x, gamma.reshape(gamma_shape)], RmsNormBackward, |[x, gamma], _| {
        let gamma_shape = gamma.layout().shape().to_vec();
        let gamma = gamma.reshape(Shape::new([d]));
        let mut out = vec![0.0f32; x.layout().num_elements()];
        rms_norm_forward(values(x), values(&gamma), eps, &mut out);
        (owned(out, &shape), (x.clone(), gamma, eps, gamma_shape))
    });
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding

#[derive(Debug)]
struct RopeBackward;

impl Backward<Flex, 1> for RopeBackward {
    /// The tables and the shape: the rotation is linear, so its backward needs no activations.
    type State = (Arc<[f32]>, Arc<[f32]>, RopeShape);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = contiguous(&grads.consume::<Flex>(&ops.node));
        let Some(node) = node_x else { return };
        let (cos, sin, shape) = ops.state;
        let mut dx = vec![0.0f32; grad.layout().num_elements()];
        rope_kernel(values(&grad), &cos, &sin, shape, true, &mut dx);
        grads.register::<Flex>(node.id, owned(dx, &grad.layout().shape().to_vec()));
    }
}

pub(super) fn rope<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Arc<[f32]>,
    sin: &Arc<[f32]>,
    seq: usize,
    head_dim: usize,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    let [_, t, heads, d_h] = x.dims();
    if !runs::<B>() || x.dtype() != DType::F32 || t != seq || d_h != head_dim || d_h % 2 != 0 || heads == 0 {
        return Err(x);
    }
    let shape = RopeShape { seq, heads, head_dim };
    let dims = x.dims();
    let (cos, sin) = (cos.clone(), sin.clone());
    Ok(run([x], RopeBackward, |[x], _| {
        let mut out = vec![0.0f32; x.layout().num_elements()];
        rope_kernel(values(x), &cos, &sin, shape, false, &mut out);
        (owned(out, &dims), (cos, sin, shape))
    }))
}

// ---------------------------------------------------------------------------------------------
// Attention

#[derive(Debug)]
struct AttentionBackward;

/// The kernel's mask, owned so that the backward can keep it.
#[derive(Debug, Clone)]
enum KernelMask {
    Causal(usize, Option<usize>),
    KeyPadding(Arc<[bool]>),
}

impl KernelMask {
    fn new<B: Backend>(mask: &AttentionMask<B>) -> Self {
        match mask {
            AttentionMask::Causal { offset, window } => Self::Causal(*offset, *window),
            AttentionMask::KeyPadding(padding) => Self::KeyPadding(padding.padded.clone()),
        }
    }

    fn get(&self) -> Mask<'_> {
        match self {
            Self::Causal(offset, window) => Mask::Causal { offset: *offset, window: *window },
            Self::KeyPadding(padded) => Mask::KeyPadding(padded),
        }
    }
}

/// What the attention backward keeps: `q`, `k`, `v`, each query row's log-sum-exp (the
/// probabilities are recomputed from it), the sizes, the mask and the forward's product precision.
#[derive(Debug, Clone)]
struct AttentionState {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    lse: Arc<Vec<f32>>,
    shape: AttentionShape,
    mask: KernelMask,
    dtype: ComputeDType,
}

impl Backward<Flex, 3> for AttentionBackward {
    type State = AttentionState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let grad = contiguous(&grads.consume::<Flex>(&ops.node));
        let AttentionState { q, k, v, lse, shape, mask, dtype } = ops.state;
        let (mut dq, mut dk, mut dv) = (
            vec![0.0f32; q.layout().num_elements()],
            vec![0.0f32; k.layout().num_elements()],
            vec![0.0f32; v.layout().num_elements()],
        );
        let scale = 1.0 / (shape.head_dim as f32).sqrt();
        attention_backward(
            values(&q),
            values(&k),
            values(&v),
            &lse,
            values(&grad),
            shape,
            mask.get(),
            scale,
            dtype,
            &mut dq,
            &mut dk,
            &mut dv,
        );
        for (node, data, t) in [(node_q, dq, &q), (node_k, dk, &k), (node_v, dv, &v)] {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, owned(data, &t.layout().shape().to_vec()));
            }
        }
    }
}

#[allow(clippy::type_complexity)]
pub(super) fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: &AttentionMask<B>,
) -> Result<Tensor<B, 4>, (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>)> {
    let [batch, q_len, heads, head_dim] = q.dims();
    let [kb, kv_len, kv_heads, kd] = k.dims();
    let mask = KernelMask::new(mask);
    let mask_fits = match &mask {
        KernelMask::Causal(..) => true,
        KernelMask::KeyPadding(padded) => padded.len() == batch * kv_len,
    };
    let fits = kb == batch
        && kd == head_dim
        && v.dims() == k.dims()
        && kv_heads > 0
        && heads.is_multiple_of(kv_heads)
        && mask_fits;
    if !runs::<B>() || !all_f32(&[&q, &k, &v]) || !fits {
        return Err((q, k, v));
    }
    let shape = AttentionShape { batch, q_len, kv_len, heads, kv_heads, head_dim };
    let dims = q.dims();
    let scale = 1.0 / (head_dim as f32).sqrt();
    let dtype = compute_dtype();
    Ok(run([q, k, v], AttentionBackward, |[q, k, v], _| {
        let mut out = vec![0.0f32; q.layout().num_elements()];
        let mut lse = vec![0.0f32; batch * heads * q_len];
        attention_forward(values(q), values(k), values(v), shape, mask.get(), scale, dtype, &mut out, &mut lse);
        let state = AttentionState { q: q.clone(), k: k.clone(), v: v.clone(), lse: Arc::new(lse), shape, mask, dtype };
        (owned(out, &dims), state)
    }))
}

// ---------------------------------------------------------------------------------------------
// GELU

#[derive(Debug)]
struct GeluBackward;

impl Backward<Flex, 1> for GeluBackward {
    /// The input.
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = contiguous(&grads.consume::<Flex>(&ops.node));
        let Some(node) = node_x else { return };
        let x = ops.state;
        let mut dx = vec![0.0f32; x.layout().num_elements()];
        gelu_backward(values(&x), values(&grad), &mut dx);
        grads.register::<Flex>(node.id, owned(dx, &x.layout().shape().to_vec()));
    }
}

pub(super) fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Result<Tensor<B, D>, Tensor<B, D>> {
    if !runs::<B>() || x.dtype() != DType::F32 {
        return Err(x);
    }
    let dims = x.dims();
    Ok(run([x], GeluBackward, |[x], _| {
        let mut out = vec![0.0f32; x.layout().num_elements()];
        gelu_forward(values(x), &mut out);
        (owned(out, &dims), x.clone())
    }))
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

#[derive(Debug)]
struct LayerNormBackward;

impl Backward<Flex, 3> for LayerNormBackward {
    /// The input, γ as `[d]`, ε, and γ's (and β's) shape as the op saw it.
    type State = (FlexTensor, FlexTensor, f32, Vec<usize>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let grad = contiguous(&grads.consume::<Flex>(&ops.node));
        let (x, gamma, eps, param_shape) = ops.state;
        let mut dx = vec![0.0f32; x.layout().num_elements()];
        let (d_gamma, d_beta) = layer_norm_backward(values(&x), values(&gamma), values(&grad), eps, &mut dx);
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, owned(dx, &x.layout().shape().to_vec()));
        }
        if let Some(node) = node_gamma {
            grads.register::<Flex>(node.id, owned(d_gamma, &param_shape));
        }
        if let Some(node) = node_beta {
            grads.register::<Flex>(node.id, owned(d_beta, &param_shape));
        }
    }
}

#[allow(clippy::type_complexity)]
pub(super) fn layer_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    epsilon: f64,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, 1>, Tensor<B, 1>)> {
    let d = gamma.dims()[0];
    let fits = x.dims()[D - 1] == d && beta.dims()[0] == d && d > 0;
    if !runs::<B>() || x.dtype() != DType::F32 || gamma.dtype() != DType::F32 || beta.dtype() != DType::F32 || !fits {
        return Err((x, gamma, beta));
    }
    let shape = x.dims();
    // γ and β go in as rank-D tensors so all inputs share the op's rank.
    let mut param_shape = [1; D];
    param_shape[D - 1] = d;
    let eps = epsilon as f32;
    Ok(run([x, gamma.reshape(param_shape), beta.reshape(param_shape)], LayerNormBackward, |[x, gamma, beta], _| {
        let param_shape = gamma.layout().shape().to_vec();
        let (gamma, beta) = (gamma.reshape(Shape::new([d])), beta.reshape(Shape::new([d])));
        let mut out = vec![0.0f32; x.layout().num_elements()];
        layer_norm_forward(values(x), values(&gamma), values(&beta), eps, &mut out);
        (owned(out, &shape), (x.clone(), gamma, eps, param_shape))
    }))
}

// ---------------------------------------------------------------------------------------------
// Softmax cross-entropy (outside the graph)

#[allow(clippy::type_complexity)]
pub(super) fn softmax_cross_entropy<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    weights: Tensor<B, 1>,
) -> Result<(Tensor<B, 1>, Tensor<B, 2>), (Tensor<B, 2>, Tensor<B, 1, Int>, Tensor<B, 1>)> {
    let [rows, vocab] = logits.dims();
    let fits = targets.dims()[0] == rows && weights.dims()[0] == rows && vocab > 0;
    if !runs::<B>() || logits.dtype() != DType::F32 || weights.dtype() != DType::F32 || !fits {
        return Err((logits, targets, weights));
    }
    let ids = targets.to_data().convert::<i64>();
    let ids: Vec<usize> = ids.iter::<i64>().filter_map(|t| usize::try_from(t).ok().filter(|&t| t < vocab)).collect();
    if ids.len() != rows {
        // A target outside the vocabulary: the op chain's behaviour, whatever it is.
        return Err((logits, targets, weights));
    }
    let device = logits.device();
    let w: Vec<f32> = weights.into_data().convert::<f32>().iter::<f32>().collect();
    let mut z = contiguous(&inner(logits));
    let value = match z.try_storage_mut::<f32>() {
        Some(buffer) => cross_entropy_kernel(buffer, vocab, &ids, &w),
        None => {
            let mut copy = values(&z).to_vec();
            let value = cross_entropy_kernel(&mut copy, vocab, &ids, &w);
            z = owned(copy, &[rows, vocab]);
            value
        }
    };
    let value = Tensor::<B, 1>::from_data(TensorData::new(vec![value as f32], [1]), &device);
    Ok((value, untracked(z)))
}

// ---------------------------------------------------------------------------------------------
// Linear

/// A 2-D flex tensor as a [`View`] of its whole buffer (any non-negative strides).
fn view(t: &FlexTensor) -> Option<View<'_>> {
    let (rows, cols, row_stride, col_stride) = t.layout().as_2d_strides()?;
    let (row_stride, col_stride) = (usize::try_from(row_stride).ok()?, usize::try_from(col_stride).ok()?);
    let data = t.storage::<f32>();
    Some(View { data, offset: t.layout().start_offset(), rows, cols, row_stride, col_stride })
}

/// Whether the kernels take `weight`: f32, or half precision (widened a panel at a time,
/// [`Frozen::panel`]) when it takes no gradient (its gradient would have to be registered in its
/// own dtype).
fn frozen_weight_runs<B: Backend>(weight: &Tensor<B, 2>) -> bool {
    match weight.dtype() {
        DType::F32 => true,
        DType::BF16 | DType::F16 => !weight.is_require_grad(),
        _ => false,
    }
}

/// `t` back, or `Err(t)` when its flex tensor has a negative stride.
fn strides_usable<B: Backend>(t: Tensor<B, 2>) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
    if inner(t.clone()).layout().has_positive_strides() { Ok(t) } else { Err(t) }
}

/// A frozen weight as the linear kernels keep it for the backward pass: never an f32 copy of a
/// half-precision or quantized weight, only the weight as the model holds it (reference-counted).
#[derive(Debug, Clone)]
enum Frozen {
    /// `W: [d_in, d_out]`, f32 or half precision, any non-negative strides.
    Values(FlexTensor),
    /// GGML blocks of `Wᵀ: [d_out, d_in]`, row after row (U8 `[d_out, row_bytes]`).
    Blocks { bytes: FlexTensor, format: BlockFormat, d_in: usize, d_out: usize },
}

/// Elements of the f32 panel a half-precision or quantized weight is widened into per product: the
/// products run over column panels of `W`, so the transient f32 copy is at most this large (16 MB)
/// whatever the layer (a 32,000-token output head included), not a whole layer.
const PANEL_ELEMENTS: usize = 1 << 22;

/// Columns `j0..j1` of `W` (`[d_in, d_out]`) widened to f32, and the layout they were written in.
struct Panel {
    data: Vec<f32>,
    d_in: usize,
    cols: usize,
    /// `data` is `[cols, d_in]` (the panel transposed) rather than `[d_in, cols]`.
    transposed: bool,
}

impl Panel {
    fn view(&self) -> View<'_> {
        if self.transposed {
            View::rows(&self.data, 0, self.cols, self.d_in, self.d_in).t()
        } else {
            View::rows(&self.data, 0, self.d_in, self.cols, self.cols)
        }
    }
}

/// Widens `n` elements of `src` (bf16 or f16), starting at `start` with `stride`, into `out`.
fn widen_strided(src: &FlexTensor, start: usize, stride: usize, out: &mut [f32]) {
    match src.dtype() {
        DType::BF16 => {
            let s = src.storage::<burn::tensor::bf16>();
            out.iter_mut().enumerate().for_each(|(i, o)| *o = s[start + i * stride].to_f32());
        }
        DType::F16 => {
            let s = src.storage::<burn::tensor::f16>();
            out.iter_mut().enumerate().for_each(|(i, o)| *o = s[start + i * stride].to_f32());
        }
        _ => {
            let s = src.storage::<f32>();
            out.iter_mut().enumerate().for_each(|(i, o)| *o = s[start + i * stride]);
        }
    }
}

impl Frozen {
    /// `(d_in, d_out)`.
    fn dims(&self) -> (usize, usize) {
        match self {
            Frozen::Values(w) => (w.layout().shape()[0], w.layout().shape()[1]),
            Frozen::Blocks { d_in, d_out, .. } => (*d_in, *d_out),
        }
    }

    /// `W` itself when it is f32 and usable as is (no copy needed).
    fn as_f32(&self) -> Option<&FlexTensor> {
        match self {
            Frozen::Values(w) if w.dtype() == DType::F32 => Some(w),
            _ => None,
        }
    }

    /// Columns per panel.
    fn panel_cols(&self) -> usize {
        let (d_in, d_out) = self.dims();
        (PANEL_ELEMENTS / d_in.max(1)).max(256).min(d_out.max(1))
    }

    /// Columns `j0..j1` of `W` in f32.
    fn panel(&self, j0: usize, j1: usize) -> Panel {
        let (d_in, _) = self.dims();
        let cols = j1 - j0;
        match self {
            Frozen::Blocks { bytes, format, .. } => {
                // Rows `j0..j1` of the stored `Wᵀ`.
                let row_bytes = format.row_bytes(d_in);
                let mut data = vec![0.0f32; cols * d_in];
                format.dequantize_rows(&bytes.storage::<u8>()[j0 * row_bytes..j1 * row_bytes], d_in, &mut data);
                Panel { data, d_in, cols, transposed: true }
            }
            Frozen::Values(w) => {
                let (_, _, rs, cs) = w.layout().as_2d_strides().expect("a 2-D weight (checked)");
                let (rs, cs, offset) = (rs as usize, cs as usize, w.layout().start_offset());
                let mut data = vec![0.0f32; cols * d_in];
                if rs == 1 && cs != 1 {
                    // A transposed view of `[d_out, d_in]` rows: each column of `W` is contiguous.
                    data.par_chunks_mut(d_in).enumerate().for_each(|(c, out)| {
                        widen_strided(w, offset + (j0 + c) * cs, 1, out);
                    });
                    Panel { data, d_in, cols, transposed: true }
                } else {
                    data.par_chunks_mut(cols).enumerate().for_each(|(r, out)| {
                        widen_strided(w, offset + r * rs + j0 * cs, cs, out);
                    });
                    Panel { data, d_in, cols, transposed: false }
                }
            }
        }
    }

    /// `W` (`transposed`: `Wᵀ`) as the bf16 GEMM's right operand, read as it is stored.
    fn weight(&self, transposed: bool) -> Weight<'_> {
        match self {
            Frozen::Blocks { bytes, format, .. } => {
                Weight::Blocks { bytes: bytes.storage::<u8>(), format: *format, rows_are_columns: !transposed }
            }
            Frozen::Values(w) => {
                let (_, _, rs, cs) = w.layout().as_2d_strides().expect("a 2-D weight (checked)");
                let (rs, cs, offset) = (rs as usize, cs as usize, w.layout().start_offset());
                let (k_stride, n_stride) = if transposed { (cs, rs) } else { (rs, cs) };
                match w.dtype() {
                    DType::BF16 => Weight::Bf16(Strided { data: w.storage(), offset, k_stride, n_stride }),
                    DType::F16 => Weight::F16(Strided { data: w.storage(), offset, k_stride, n_stride }),
                    _ => Weight::F32(Strided { data: w.storage(), offset, k_stride, n_stride }),
                }
            }
        }
    }

    /// `lhs·W` (`transposed`: `lhs·Wᵀ`) on the bf16 GEMM, on top of `row` on every row.
    fn product_bf16(&self, lhs: View, transposed: bool, row: Option<&[f32]>) -> Vec<f32> {
        let (d_in, d_out) = self.dims();
        let n = if transposed { d_in } else { d_out };
        match row {
            Some(row) => {
                let mut out = row.repeat(lhs.rows);
                bf16_gemm::matmul(Kernel::detect(), lhs, self.weight(transposed), n, &mut out, true);
                out
            }
            None => bf16_gemm::product(Kernel::detect(), lhs, self.weight(transposed), n),
        }
    }

    /// `x·W (+ row)` into a new `[x.rows, d_out]` buffer: on the bf16 GEMM with `bf16`, else
    /// panel by panel unless `W` is f32.
    fn product(&self, x: View, row: Option<&[f32]>, bf16: bool) -> Vec<f32> {
        if bf16 {
            return self.product_bf16(x, false, row);
        }
        if let Some(w) = self.as_f32() {
            return product(x, view(w).expect("a 2-D f32 weight with non-negative strides (checked)"), row);
        }
        let (_, d_out) = self.dims();
        let step = self.panel_cols();
        let mut y = vec![0.0f32; x.rows * d_out];
        for j0 in (0..d_out).step_by(step) {
            let j1 = (j0 + step).min(d_out);
            let panel = self.panel(j0, j1);
            let part = product(x, panel.view(), row.map(|r| &r[j0..j1]));
            y.par_chunks_mut(d_out).zip(part.par_chunks(j1 - j0)).for_each(|(y, p)| y[j0..j1].copy_from_slice(p));
        }
        y
    }

    /// `dX = dY·Wᵀ` into a new `[dy.rows, d_in]` buffer: on the bf16 GEMM with `bf16`, else
    /// panel by panel unless `W` is f32.
    fn product_t(&self, dy: View, bf16: bool) -> Vec<f32> {
        if bf16 {
            return self.product_bf16(dy, true, None);
        }
        if let Some(w) = self.as_f32() {
            return product(dy, view(w).expect("a 2-D f32 weight with non-negative strides (checked)").t(), None);
        }
        let (d_in, d_out) = self.dims();
        let step = self.panel_cols();
        let mut dx = vec![0.0f32; dy.rows * d_in];
        for j0 in (0..d_out).step_by(step) {
            let j1 = (j0 + step).min(d_out);
            let panel = self.panel(j0, j1);
            let dy_cols = View { offset: dy.offset + j0 * dy.col_stride, cols: j1 - j0, ..dy };
            add_product(&mut dx, dy_cols, panel.view().t());
        }
        dx
    }
}

/// The flex tensor holding `m`'s bytes, when they are a contiguous U8 `[d_out, row_bytes]` tensor.
fn block_bytes<B: Backend>(m: &BlockMatrix<B>) -> Option<FlexTensor> {
    let bytes: FlexTensor = same(m.bytes.clone().into_primitive());
    let fits = bytes.dtype() == DType::U8
        && bytes.is_contiguous()
        && bytes.layout().shape().to_vec() == [m.d_out, m.format.row_bytes(m.d_in)];
    fits.then_some(bytes)
}

/// The linear ops' backward: which inputs the op has (the frozen weight is an input only when it
/// is a float tensor; blocks are never tracked) decides the parents' positions.
#[derive(Debug)]
struct LinearBackward {
    weight_input: bool,
}

/// What the linear backward keeps: `x` (only when the weight's gradient is needed) and `W`.
#[derive(Debug, Clone)]
struct LinearState {
    x: Option<FlexTensor>,
    weight: Frozen,
    /// Whether the forward ran the frozen product in bf16 (the backward does the same).
    bf16: bool,
}

impl<const N: usize> Backward<Flex, N> for LinearBackward {
    type State = LinearState;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = contiguous(&grads.consume::<Flex>(&ops.node));
        let LinearState { x, weight, bf16 } = ops.state;
        let Some(dy) = view(&grad) else { unreachable!("a 2-D f32 gradient") };
        let (d_in, _) = weight.dims();
        let parent = |i: usize| ops.parents.get(i).cloned().flatten();
        let w_at = usize::from(self.weight_input);
        let (node_x, node_w, node_b) = (parent(0), if self.weight_input { parent(1) } else { None }, parent(1 + w_at));
        if let Some(node) = node_x {
            // dX = dY·Wᵀ
            grads.register::<Flex>(node.id, owned(weight.product_t(dy, bf16), &[dy.rows, d_in]));
        }
        if let (Some(node), Some(x)) = (node_w, x.as_ref().and_then(view)) {
            // dW = Xᵀ·dY
            grads.register::<Flex>(node.id, owned(product(x.t(), dy, None), &[x.cols, dy.cols]));
        }
        if let Some(node) = node_b {
            grads.register::<Flex>(node.id, owned(column_sums(&grad, dy.cols), &[1, dy.cols]));
        }
    }
}

/// `x·W + b`; the state keeps `W` as `frozen` holds it.
fn linear_forward(x: &FlexTensor, frozen: Frozen, b: Option<&FlexTensor>, keep_x: bool) -> (FlexTensor, LinearState) {
    let x = contiguous(x);
    let Some(xv) = view(&x) else { unreachable!("a contiguous 2-D input") };
    let b = b.map(contiguous);
    // A weight that takes a gradient is not frozen: its products stay f32.
    let bf16 = !keep_x && compute_dtype() == ComputeDType::Bf16;
    let out = owned(frozen.product(xv, b.as_ref().map(values), bf16), &[xv.rows, frozen.dims().1]);
    (out, LinearState { x: keep_x.then(|| x.clone()), weight: frozen, bf16 })
}

#[allow(clippy::type_complexity)]
pub(super) fn linear<B: Backend>(
    x: Tensor<B, 2>,
    weight: FrozenMatrix<B>,
    bias: Option<Tensor<B, 1>>,
) -> Result<Tensor<B, 2>, (Tensor<B, 2>, FrozenMatrix<B>, Option<Tensor<B, 1>>)> {
    let [_, d_in] = x.dims();
    let (w_in, d_out) = weight.dims();
    let bias_fits = bias.as_ref().is_none_or(|b| b.dims() == [d_out] && b.dtype() == DType::F32);
    if !runs::<B>() || !all_f32(&[&x]) || w_in != d_in || !bias_fits {
        return Err((x, weight, bias));
    }
    let weight = match weight {
        FrozenMatrix::Values(w) if frozen_weight_runs(&w) => match strides_usable(w) {
            Ok(w) => w,
            // Flipped (negative-stride) weights, which no model makes, go to Burn.
            Err(w) => return Err((x, FrozenMatrix::Values(w), bias)),
        },
        FrozenMatrix::Blocks(m) => {
            let Some(bytes) = block_bytes(&m) else { return Err((x, FrozenMatrix::Blocks(m), bias)) };
            let frozen = Frozen::Blocks { bytes, format: m.format, d_in, d_out };
            let forward = move |x: &FlexTensor, b: Option<&FlexTensor>| linear_forward(x, frozen, b, false);
            let backward = LinearBackward { weight_input: false };
            return Ok(match bias {
                Some(bias) => run([x, bias.reshape([1, d_out])], backward, |[x, b], _| forward(x, Some(b))),
                None => run([x], backward, |[x], _| forward(x, None)),
            });
        }
        other => return Err((x, other, bias)),
    };
    // The weight is used as it is laid out (a transposed view stays one).
    let forward = |x: &FlexTensor, w: &FlexTensor, b: Option<&FlexTensor>, keep_x: bool| {
        linear_forward(x, Frozen::Values(w.clone()), b, keep_x)
    };
    let backward = LinearBackward { weight_input: true };
    Ok(match bias {
        Some(bias) => run_strided([x, weight, bias.reshape([1, d_out])], backward, |[x, w, b], tracked| {
            forward(x, w, Some(b), tracked[1])
        }),
        None => run_strided([x, weight], backward, |[x, w], tracked| forward(x, w, None, tracked[1])),
    })
}

// ---------------------------------------------------------------------------------------------
// Linear with a low-rank update

#[derive(Debug)]
struct LowRankLinearBackward {
    weight_input: bool,
}

/// What the backward keeps: `x` (when `W`'s gradient is needed), the update's input (`x`, or `x`
/// with the dropout mask applied; when `a`'s gradient is needed), `h`, the mask's seed and keep
/// probability, and the three matrices (reference-counted, not copied).
#[derive(Debug, Clone)]
struct LowRankLinearState {
    x: Option<FlexTensor>,
    x_update: Option<FlexTensor>,
    h: FlexTensor,
    mask: Option<(u64, f32)>,
    weight: Frozen,
    a: FlexTensor,
    b: FlexTensor,
    /// Whether the forward ran the frozen product in bf16 (the backward does the same).
    bf16: bool,
}

/// The column sums of `dy` (a bias gradient).
fn column_sums(dy: &FlexTensor, cols: usize) -> Vec<f32> {
    let mut sums = vec![0.0f32; cols];
    for row in values(dy).chunks_exact(cols) {
        sums.iter_mut().zip(row).for_each(|(d, g)| *d += g);
    }
    sums
}

impl<const N: usize> Backward<Flex, N> for LowRankLinearBackward {
    type State = LowRankLinearState;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = contiguous(&grads.consume::<Flex>(&ops.node));
        let LowRankLinearState { x, x_update, h, mask, weight, a, b, bf16 } = ops.state;
        let (Some(dy), Some(av), Some(bv), Some(hv)) = (view(&grad), view(&a), view(&b), view(&h)) else {
            unreachable!("2-D f32 tensors with non-negative strides (checked in the forward)")
        };
        let parent = |i: usize| ops.parents.get(i).cloned().flatten();
        let w_at = usize::from(self.weight_input);
        let node_x = parent(0);
        let node_w = if self.weight_input { parent(1) } else { None };
        let [node_a, node_b, node_bias] = [1, 2, 3].map(|i| parent(i + w_at));
        // dH = dY·bᵀ, the gradient at the rank-k bottleneck, for dX and da.
        let dh = (node_x.is_some() || node_a.is_some()).then(|| product(dy, bv.t(), None));
        let dh_view = dh.as_deref().map(|d| View::rows(d, 0, dy.rows, bv.rows, bv.rows));
        if let (Some(node), Some(dh)) = (node_x, dh_view) {
            // dX = dY·Wᵀ + dH·aᵀ (through the mask, when there is one), added into one buffer.
            let mut dx = weight.product_t(dy, bf16);
            match mask {
                None => add_product(&mut dx, dh, av.t()),
                Some((seed, keep)) => dropout_add(&product(dh, av.t(), None), seed, keep, &mut dx),
            }
            grads.register::<Flex>(node.id, owned(dx, &[dy.rows, weight.dims().0]));
        }
        if let (Some(node), Some(x)) = (node_w, x.as_ref().and_then(view)) {
            // dW = Xᵀ·dY
            grads.register::<Flex>(node.id, owned(product(x.t(), dy, None), &[x.cols, dy.cols]));
        }
        if let (Some(node), Some(x), Some(dh)) = (node_a, x_update.as_ref().and_then(view), dh_view) {
            // da = X_updateᵀ·dH
            grads.register::<Flex>(node.id, owned(product(x.t(), dh, None), &[x.cols, dh.cols]));
        }
        if let Some(node) = node_b {
            // db = Hᵀ·dY
            grads.register::<Flex>(node.id, owned(product(hv.t(), dy, None), &[hv.cols, dy.cols]));
        }
        if let Some(node) = node_bias {
            grads.register::<Flex>(node.id, owned(column_sums(&grad, dy.cols), &[1, dy.cols]));
        }
    }
}

/// The inputs of [`low_rank_linear`], handed back when flex cannot run them.
type LowRankLinearInputs<B> = (Tensor<B, 2>, FrozenMatrix<B>, Option<Tensor<B, 1>>, Tensor<B, 2>, Tensor<B, 2>);

/// Which of the low-rank op's inputs autodiff tracks: `x`, `W` (false for blocks), `a`, `b`.
struct LowRankTracked {
    weight: bool,
    a: bool,
}

/// The low-rank op's forward on contiguous `x`, the f32 weight view `w` and the factors.
#[allow(clippy::too_many_arguments)]
fn low_rank_forward(
    x: &FlexTensor,
    frozen: Frozen,
    a: &FlexTensor,
    b: &FlexTensor,
    bias: Option<&FlexTensor>,
    mask: Option<(u64, f32)>,
    tracked: LowRankTracked,
) -> (FlexTensor, LowRankLinearState) {
    let x = contiguous(x);
    let (Some(xv), Some(av), Some(bv)) = (view(&x), view(a), view(b)) else {
        unreachable!("a contiguous 2-D input and 2-D matrices with non-negative strides (checked)")
    };
    let (rows, d_in, rank) = (xv.rows, xv.cols, av.cols);
    let bias = bias.map(contiguous);
    // The update's input: `x`, or `x · mask / keep`.
    let x_update = mask.map(|(seed, keep)| {
        let mut masked = vec![0.0f32; rows * d_in];
        dropout_kernel(values(&x), seed, keep, &mut masked);
        owned(masked, &[rows, d_in])
    });
    let uv = x_update.as_ref().and_then(view).unwrap_or(xv);
    // H = X_update·a (rows × rank), then Y = X·W + bias, then Y += H·b in place.
    let h = product(uv, av, None);
    // A weight that takes a gradient is not frozen: its products stay f32.
    let bf16 = !tracked.weight && compute_dtype() == ComputeDType::Bf16;
    let mut y = frozen.product(xv, bias.as_ref().map(values), bf16);
    let d_out = frozen.dims().1;
    add_product(&mut y, View::rows(&h, 0, rows, rank, rank), bv);
    let state = LowRankLinearState {
        x: tracked.weight.then(|| x.clone()),
        x_update: tracked.a.then(|| x_update.unwrap_or_else(|| x.clone())),
        h: owned(h, &[rows, rank]),
        mask,
        weight: frozen,
        a: a.clone(),
        b: b.clone(),
        bf16,
    };
    (owned(y, &[rows, d_out]), state)
}

pub(super) fn low_rank_linear<B: Backend>(
    x: Tensor<B, 2>,
    weight: FrozenMatrix<B>,
    bias: Option<Tensor<B, 1>>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    dropout: f64,
) -> Result<Tensor<B, 2>, LowRankLinearInputs<B>> {
    let [rows, d_in] = x.dims();
    let (w_in, d_out) = weight.dims();
    let ([a_in, rank], [b_rank, b_out]) = (a.dims(), b.dims());
    let bias_fits = bias.as_ref().is_none_or(|b| b.dims() == [d_out] && b.dtype() == DType::F32);
    let shapes_fit = w_in == d_in && a_in == d_in && b_rank == rank && b_out == d_out;
    let usable = |t: &Tensor<B, 2>| inner(t.clone()).layout().has_positive_strides();
    let weight_runs = |weight: &FrozenMatrix<B>| match weight {
        FrozenMatrix::Values(w) => frozen_weight_runs(w) && usable(w),
        FrozenMatrix::Blocks(m) => block_bytes(m).is_some(),
    };
    if !runs::<B>()
        || !all_f32(&[&x, &a, &b])
        || !weight_runs(&weight)
        || !shapes_fit
        || !bias_fits
        || !(0.0..1.0).contains(&dropout)
        || rows * d_in > u32::MAX as usize
        || ![&a, &b].into_iter().all(usable)
    {
        return Err((x, weight, bias, a, b));
    }
    // As `fused::dropout`: a mask only under autodiff, its seed drawn from the run's generator.
    let mask =
        (B::ad_enabled(&x.device()) && dropout > 0.0).then(|| (crate::rng::dropout_seed(), (1.0 - dropout) as f32));
    let bias = bias.map(|bias| bias.reshape([1, d_out]));
    match weight {
        FrozenMatrix::Values(weight) => {
            let forward = |[x, w, a, b]: [&FlexTensor; 4], bias: Option<&FlexTensor>, tracked: [bool; 4]| {
                let tracked = LowRankTracked { weight: tracked[1], a: tracked[2] };
                low_rank_forward(x, Frozen::Values(w.clone()), a, b, bias, mask, tracked)
            };
            let backward = LowRankLinearBackward { weight_input: true };
            Ok(match bias {
                Some(bias) => run_strided([x, weight, a, b, bias], backward, |[x, w, a, b, bias], t| {
                    forward([x, w, a, b], Some(bias), [t[0], t[1], t[2], t[3]])
                }),
                None => run_strided([x, weight, a, b], backward, |inputs, t| forward(inputs, None, t)),
            })
        }
        FrozenMatrix::Blocks(m) => {
            let bytes = block_bytes(&m).expect("checked above");
            let frozen = Frozen::Blocks { bytes, format: m.format, d_in, d_out };
            let forward = move |[x, a, b]: [&FlexTensor; 3], bias: Option<&FlexTensor>, tracked: [bool; 3]| {
                let tracked = LowRankTracked { weight: false, a: tracked[1] };
                low_rank_forward(x, frozen, a, b, bias, mask, tracked)
            };
            let backward = LowRankLinearBackward { weight_input: false };
            Ok(match bias {
                Some(bias) => run_strided([x, a, b, bias], backward, |[x, a, b, bias], t| {
                    forward([x, a, b], Some(bias), [t[0], t[1], t[2]])
                }),
                None => run_strided([x, a, b], backward, |inputs, t| forward(inputs, None, t)),
            })
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dropout

#[derive(Debug)]
struct DropoutBackward;

impl Backward<Flex, 1> for DropoutBackward {
    /// The seed and the keep probability: the mask is recomputed, not stored.
    type State = (u64, f32);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = contiguous(&grads.consume::<Flex>(&ops.node));
        let Some(node) = node_x else { return };
        let (seed, keep) = ops.state;
        let mut dx = vec![0.0f32; grad.layout().num_elements()];
        dropout_kernel(values(&grad), seed, keep, &mut dx);
        grads.register::<Flex>(node.id, owned(dx, &grad.layout().shape().to_vec()));
    }
}

pub(super) fn dropout<B: Backend, const D: usize>(x: Tensor<B, D>, prob: f64) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let n = x.shape().num_elements();
    if !runs::<B>() || x.dtype() != DType::F32 || !(0.0..1.0).contains(&prob) || n > u32::MAX as usize {
        return Err(x);
    }
    let seed = crate::rng::dropout_seed();
    let keep = (1.0 - prob) as f32;
    let dims = x.dims();
    Ok(run([x], DropoutBackward, |[x], _| {
        let mut out = vec![0.0f32; x.layout().num_elements()];
        dropout_kernel(values(x), seed, keep, &mut out);
        (owned(out, &dims), (seed, keep))
    }))
}
