//! The run's random numbers, drawn on the CPU whatever the backend.
//!
//! Every backend has its own generator: the CPU backends (ndarray, flex) draw from a seeded
//! `StdRng`, wgpu and CUDA from a generator of their own inside a kernel. The same seed therefore
//! trained a different adapter on each GPU backend. Everything random in a run (adapter and head
//! initialisation, dropout masks) goes through this module instead: one process-wide `StdRng`
//! seeded by [`seed`], values drawn on the host with the same sampling code as Burn's CPU backends
//! ([`TensorData::random`]) and then moved to the device. On ndarray and flex the values are the
//! ones the backend's own generator gave before this module existed (same generator, same seed,
//! same order of draws), and on every other backend they are the same values.

use std::hash::{BuildHasher, Hasher};
use std::sync::{Mutex, MutexGuard};

use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, FloatDType, Tensor, TensorData, bf16, f16, get_device_settings};
use rand::SeedableRng;
use rand::rngs::StdRng;

/// The generator; `None` until the first draw or [`seed`].
static RNG: Mutex<Option<StdRng>> = Mutex::new(None);

fn generator() -> MutexGuard<'static, Option<StdRng>> {
    // A panic while drawing leaves a valid generator: poisoning carries no meaning here.
    RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

std::thread_local! {
    /// This thread's own generator while a [`ThreadDraws`] is alive.
    static THREAD_RNG: std::cell::RefCell<Option<StdRng>> = const { std::cell::RefCell::new(None) };
}

/// While alive, the draws of the current thread come from a generator of its own, seeded with
/// the given seed, instead of the process-wide one: data-parallel training runs one worker thread
/// per device at the same time, and a shared generator would hand out its draws (dropout masks)
/// in whatever order the threads reach it.
pub struct ThreadDraws(());

impl ThreadDraws {
    /// Draws on this thread come from `StdRng::seed_from_u64(seed)` until the value is dropped.
    pub fn seeded(seed: u64) -> Self {
        THREAD_RNG.with(|rng| *rng.borrow_mut() = Some(StdRng::seed_from_u64(seed)));
        ThreadDraws(())
    }
}

impl Drop for ThreadDraws {
    fn drop(&mut self) {
        THREAD_RNG.with(|rng| *rng.borrow_mut() = None);
    }
}

/// Runs `draw` on this thread's generator ([`ThreadDraws`]) or else the process-wide one, seeding
/// the latter from the system's entropy if [`seed`] was never called (as Burn's CPU backends do).
fn with_rng<T>(draw: impl FnOnce(&mut StdRng) -> T) -> T {
    let mut draw = Some(draw);
    let local = THREAD_RNG.with(|rng| rng.borrow_mut().as_mut().map(|rng| (draw.take().expect("once"))(rng)));
    if let Some(value) = local {
        return value;
    }
    let draw = draw.expect("not used by the thread's generator");
    let mut guard = generator();
    let rng = guard.get_or_insert_with(|| {
        let entropy = std::collections::hash_map::RandomState::new().build_hasher().finish();
        StdRng::seed_from_u64(entropy)
    });
    draw(rng)
}

/// Seeds this module's generator and the backend's own (for whatever Burn itself still draws).
/// Both start from `StdRng::seed_from_u64(seed)`, as Burn's CPU backends do in `B::seed`.
pub fn seed<B: Backend>(device: &B::Device, seed: u64) {
    B::seed(device, seed);
    *generator() = Some(StdRng::seed_from_u64(seed));
}

/// A float tensor of `shape` with values from `distribution`, drawn on the host and moved to
/// `device`: `Tensor::random` with this module's generator. The values are sampled in the device's
/// default float type, as the CPU backends sample them.
pub fn random<B: Backend, const D: usize>(
    shape: [usize; D],
    distribution: Distribution,
    device: &B::Device,
) -> Tensor<B, D> {
    let dtype = get_device_settings::<B>(device).float_dtype;
    let data = with_rng(|rng| match dtype {
        FloatDType::F64 => TensorData::random::<f64, _, _>(shape, distribution, rng),
        FloatDType::F16 => TensorData::random::<f16, _, _>(shape, distribution, rng),
        FloatDType::BF16 => TensorData::random::<bf16, _, _>(shape, distribution, rng),
        FloatDType::F32 | FloatDType::Flex32 => TensorData::random::<f32, _, _>(shape, distribution, rng),
    });
    Tensor::from_data(data, device)
}

/// A 64-bit seed for a dropout mask: two uniform `f32` draws' bits, as the flex kernels took them
/// from the backend's generator before this module existed.
pub fn dropout_seed() -> u64 {
    let draw = with_rng(|rng| TensorData::random::<f32, _, _>([2], Distribution::Uniform(0.0, 1.0), rng));
    let bits: Vec<u64> = draw.iter::<f32>().map(|v| v.to_bits() as u64).collect();
    bits[0] | (bits[1] << 32)
}
