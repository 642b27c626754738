//! A bf16 × bf16 → f32-accumulate GEMM for the frozen base's products under
//! `--compute-dtype bf16` ([`crate::ComputeDType::Bf16`]): `C = A·B` (or `C += A·B`) with the
//! activations `A` rounded to bf16 and the weight `B` read from its stored form (f32, bf16, f16,
//! GGML blocks) straight into the micro-kernel's packed bf16 layout, a block at a time. The
//! attention's per-head products use its single-threaded forms ([`matmul_single`], and
//! [`matmul_packed`] over a head's keys or values packed once as a [`PackedB`]).
//!
//! Layout and blocking:
//! - `A` (`m × k`, small: a batch's activations) is rounded once (round-to-nearest-even, as
//!   `half::bf16::from_f32`) into tiles of [`MR`] rows, `KC/2` groups of `MR` bf16 pairs per
//!   [`KC`] slice of `k` (zeros pad `k` and the last tile's missing rows); a slice of all tiles is
//!   contiguous.
//! - `B` (`k × n`, the weight) is packed per task: [`NB`] output columns × [`KC`] reductions at a
//!   time into strips of [`NR`] columns, each `⌈KC/2⌉` rows of `NR` 32-bit words, each word the pair
//!   `(B[2p, j], B[2p+1, j])` (the low half the even `k`), which is what `vdpbf16ps` multiplies
//!   against a broadcast pair of `A`. The weight is never widened into an f32 panel: a source is
//!   read (dequantized) one row chunk of at most `max(KC, NB)` values into a small scratch and
//!   rounded into the packed block; columns that are contiguous along `k` (the rows of `Wᵀ` for
//!   `x·W`) go 16 at a time through a 16 × 16 register transpose.
//! - The micro-kernel holds an `MR × 32` tile of `C` in `2·MR` zmm accumulators (MR ≤ [`MR`]),
//!   streams the packed `B` strip (in L1) and broadcasts `A`'s pairs; the tile's old values
//!   (when accumulating or after the first `KC` block) are added after the products, and it is
//!   stored with masks at the right edge.
//! - The `NB`-column blocks are rayon tasks: each thread packs only its own columns of the weight,
//!   so at `m = 128` (where the weight's traffic dominates) both threads share the packing work.
//!
//! [`Kernel::Amx`] runs AMX tiles (`tdpbf16ps`) where the CPU has them and Linux grants their
//! state, for depths `k` that are multiples of 32: `A` is then packed as 16-row tiles (each 16
//! pairs of `k` of its 16 rows one 1 KiB run), a micro-kernel call covers 32 × 32 of `C` in four
//! tile registers, loaded from and stored to `C` where it lies, and the slices of `k` are twice
//! as long (`KC_AMX`), taken a panel of rows at a time; the strips of `B` are the same (already
//! AMX's pair layout). A Q8_0 weight is packed a strip ahead, between the tile steps of the strip
//! before it, so that its conversion overlaps the tile unit's products.
//! [`Kernel::Avx512Bf16`] runs `_mm512_dpbf16_ps` (checked at run time); [`Kernel::Portable`]
//! computes the same thing in plain Rust (each product of two bf16 values is exact in f32; the
//! pair is added odd element first, as `vdpbf16ps` does), so results agree across machines up to
//! the accumulation order inside the hardware instruction and its flushing of subnormals.

use burn::tensor::{bf16, f16};
use rayon::prelude::*;

use crate::quant::BlockFormat;

/// Rows of the largest micro-kernel tile (a tile of `C` is at most `MR × 32`).
pub const MR: usize = 8;
/// Columns of a micro-kernel tile: two zmm registers of f32.
pub const NR: usize = 32;
/// Reduction elements per packed block of `B` (a multiple of GGML's 256-weight super-blocks, so a
/// quantized row is read in whole blocks).
pub const KC: usize = 512;
/// Reduction elements per packed block of `B` for the AMX kernel: twice [`KC`], so that each
/// 32 × 32 block of `C` drains out of the tile registers half as often (+2–25 % per product on
/// the 7B shapes, measured; the AVX-512 kernel keeps [`KC`], tuned on Zen 4's 32 KiB L1).
const KC_AMX: usize = 1024;
/// The largest slice of `k`, which the scratch buffers are sized for.
const KC_MAX: usize = KC_AMX;
/// Rows of `C` per pass over a packed block of `B` for the AMX kernel: the panel's slice of `A`
/// (256 KiB) and block of `C` (128 KiB) stay in L2 with the block of `B` (512 KiB).
const ROW_PANEL: usize = 128;
/// Output columns per packed block of `B` and per parallel task (a multiple of 256, as [`KC`]).
pub const NB: usize = 256;

/// Prefetch into every cache level (`_MM_HINT_T0`): data the packing reads next.
#[cfg(target_arch = "x86_64")]
const L1: i32 = std::arch::x86_64::_MM_HINT_T0;
/// Prefetch into L2 and beyond (`_MM_HINT_T1`): the next block's weights, read while the
/// micro-kernel works on this one (into L1 they would evict its operands).
#[cfg(target_arch = "x86_64")]
const L2: i32 = std::arch::x86_64::_MM_HINT_T1;
#[cfg(not(target_arch = "x86_64"))]
const L1: i32 = 0;
#[cfg(not(target_arch = "x86_64"))]
const L2: i32 = 0;

/// Which micro-kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AMX tiles, `tdpbf16ps` (Intel Xeon from Sapphire Rapids on, where Linux grants the tile
    /// state), with AVX-512 for the packing: for products whose depth `k` is a multiple of 32;
    /// the others run [`Kernel::Avx512Bf16`].
    Amx,
    /// `_mm512_dpbf16_ps` (x86-64 CPUs with AVX512-BF16, e.g. Zen 4, Sapphire Rapids).
    Avx512Bf16,
    /// Plain Rust, any CPU: the same bf16-rounded operands and f32 accumulation.
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU runs (checked at run time, once).
    pub fn detect() -> Kernel {
        static DETECTED: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            if !avx512_bf16() {
                Kernel::Portable
            } else if amx::ready() {
                Kernel::Amx
            } else {
                Kernel::Avx512Bf16
            }
        })
    }

    /// Whether this CPU can run the kernel.
    pub fn available(self) -> bool {
        match self {
            Kernel::Portable => true,
            Kernel::Avx512Bf16 => avx512_bf16(),
            Kernel::Amx => avx512_bf16() && amx::ready(),
        }
    }

    /// The kernel that runs a product of depth `k`: AMX tiles take 32 bf16 of `k` at a time.
    fn for_depth(self, k: usize) -> Kernel {
        if self == Kernel::Amx && !k.is_multiple_of(2 * amx::PAIRS) { Kernel::Avx512Bf16 } else { self }
    }

    /// Whether the packing may use AVX-512.
    fn simd(self) -> bool {
        self != Kernel::Portable
    }

    /// Rows of `A` per packed tile.
    fn a_rows(self) -> usize {
        if self == Kernel::Amx { amx::ROWS } else { MR }
    }

    /// Reduction elements per slice of `k` (per packed block of `B`).
    fn kc(self) -> usize {
        if self == Kernel::Amx { KC_AMX } else { KC }
    }

    /// Words of one packed tile of `A` for one slice of `kc` reductions.
    fn a_tile_words(self, kc: usize) -> usize {
        self.a_rows() * (kc / 2)
    }

    /// Rows of `C` per micro-kernel call.
    fn c_rows(self) -> usize {
        if self == Kernel::Amx { 2 * amx::ROWS } else { MR }
    }
}

/// Whether the CPU has AVX512-BF16 (with AVX512F/BW).
fn avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512bf16")
        && std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
    {
        return true;
    }
    false
}

/// The bits of `x` rounded to bf16, round-to-nearest-even (NaN stays a quiet NaN): the same bits
/// as `half::bf16::from_f32`.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    // Both computed and one selected, so that loops over this vectorise.
    let nan = ((b >> 16) | 0x0040) as u16;
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    if b & 0x7FFF_FFFF > 0x7F80_0000 { nan } else { rounded }
}

/// The pair `(lo, hi)` rounded to bf16 in one 32-bit word, `lo` in the low half.
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    u32::from(bf16_bits(lo)) | (u32::from(bf16_bits(hi)) << 16)
}

/// The word of two stored bf16 values, `lo` in the low half (as [`pair`] of their f32 values).
#[inline(always)]
fn stored_pair(lo: bf16, hi: bf16) -> u32 {
    u32::from(lo.to_bits()) | u32::from(hi.to_bits()) << 16
}

/// The left operand: an `rows × cols` f32 matrix inside `data`, element `(i, c)` at
/// `offset + i·row_stride + c·col_stride` (also the strided view of the crate's f32 products).
#[derive(Debug, Clone, Copy)]
pub struct Lhs<'a> {
    /// The elements.
    pub data: &'a [f32],
    /// Index of element `(0, 0)`.
    pub offset: usize,
    /// `m`.
    pub rows: usize,
    /// `k`.
    pub cols: usize,
    /// Distance between rows.
    pub row_stride: usize,
    /// Distance between columns.
    pub col_stride: usize,
}

/// A `k × n` matrix of values of type `T` inside `data`: element `(r, j)` at
/// `offset + r·k_stride + j·n_stride`.
#[derive(Debug, Clone, Copy)]
pub struct Strided<'a, T> {
    /// The elements.
    pub data: &'a [T],
    /// Index of element `(0, 0)`.
    pub offset: usize,
    /// Distance between reduction indices (rows of `B`).
    pub k_stride: usize,
    /// Distance between output columns (columns of `B`).
    pub n_stride: usize,
}

/// The right operand `B` (`k × n`): the frozen weight as it is stored.
#[derive(Debug, Clone, Copy)]
pub enum Weight<'a> {
    /// f32 values.
    F32(Strided<'a, f32>),
    /// bf16 values.
    Bf16(Strided<'a, bf16>),
    /// f16 values.
    F16(Strided<'a, f16>),
    /// GGML blocks, stored row after row. With `rows_are_columns` each stored row is a column of
    /// `B` (`n` rows of `k` weights: `Wᵀ` for `x·W`); otherwise each is a row of `B` (`k` rows of
    /// `n` weights: `Wᵀ` read for `dY·Wᵀ`).
    Blocks {
        /// The blocks.
        bytes: &'a [u8],
        /// Their format.
        format: BlockFormat,
        /// Whether a stored row is a column of `B`.
        rows_are_columns: bool,
    },
}

/// The bytes of a slice of plain numbers (for prefetching).
#[cfg(target_arch = "x86_64")]
fn as_bytes<T: Copy>(data: &[T]) -> &[u8] {
    // SAFETY: `T` is a plain number type (f32, bf16, f16): every byte is initialised, and `u8` has
    // no alignment; the length covers the same memory.
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data)) }
}

/// The index of the first element a `column` (or `row`) read of `s` at `(j, r0)` touches, when
/// that read is a contiguous run.
#[cfg(target_arch = "x86_64")]
fn strided_run<T>(s: &Strided<T>, column: bool, j: usize, r0: usize) -> Option<usize> {
    let (along, across) = if column { (s.k_stride, s.n_stride) } else { (s.n_stride, s.k_stride) };
    (along == 1).then(|| s.offset + r0 + j * across)
}

/// Widens `out.len()` values of `data` starting at `start`, `stride` apart.
#[inline(always)]
fn widen<T: Copy>(data: &[T], start: usize, stride: usize, out: &mut [f32], f: impl Fn(T) -> f32) {
    if stride == 1 {
        let len = out.len();
        out.iter_mut().zip(&data[start..start + len]).for_each(|(o, &v)| *o = f(v));
    } else {
        out.iter_mut().enumerate().for_each(|(i, o)| *o = f(data[start + i * stride]));
    }
}

impl Weight<'_> {
    /// Whether a column of `B` is contiguous along `k` in memory (then it is packed by columns).
    #[inline(always)]
    fn by_columns(&self) -> bool {
        let strided = |k_stride: usize, n_stride: usize| k_stride == 1 && n_stride != 1;
        match self {
            Weight::F32(s) => strided(s.k_stride, s.n_stride),
            Weight::Bf16(s) => strided(s.k_stride, s.n_stride),
            Weight::F16(s) => strided(s.k_stride, s.n_stride),
            Weight::Blocks { rows_are_columns, .. } => *rows_are_columns,
        }
    }

    /// `B[r0 + i, j]` into `out[i]`; `r0` a multiple of [`KC`] for blocks.
    #[inline(always)]
    fn column(&self, j: usize, r0: usize, k: usize, out: &mut [f32]) {
        match *self {
            Weight::F32(s) => widen(s.data, s.offset + r0 * s.k_stride + j * s.n_stride, s.k_stride, out, |v| v),
            Weight::Bf16(s) => {
                widen(s.data, s.offset + r0 * s.k_stride + j * s.n_stride, s.k_stride, out, bf16::to_f32)
            }
            Weight::F16(s) => widen(s.data, s.offset + r0 * s.k_stride + j * s.n_stride, s.k_stride, out, f16::to_f32),
            Weight::Blocks { bytes, format, .. } => {
                let row = &bytes[j * format.row_bytes(k)..];
                let at = format.row_bytes(r0);
                format.dequantize(&row[at..at + format.row_bytes(out.len())], out);
            }
        }
    }

    /// Column `j` of `B` from row `r0` as `⌈kc/2⌉` words of bf16 pairs (`(B[r0 + 2p, j],
    /// B[r0 + 2p + 1, j])`, the low half the even row; zero past `kc`), through `scratch` (at
    /// least `2·⌈kc/2⌉` values) unless the weight already stores contiguous bf16.
    #[inline(always)]
    fn column_words(&self, j: usize, r0: usize, k: usize, kc: usize, scratch: &mut [f32], words: &mut [u32]) {
        if let Weight::Bf16(s) = *self
            && s.k_stride == 1
        {
            // Stored bf16 along `k`: the pairs are the stored bits, no rounding.
            let run = &s.data[s.offset + r0 + j * s.n_stride..][..kc];
            words
                .iter_mut()
                .zip(run.chunks(2))
                .for_each(|(w, v)| *w = stored_pair(v[0], v.get(1).copied().unwrap_or(bf16::ZERO)));
            return;
        }
        let col = &mut scratch[..words.len() * 2];
        col[kc..].fill(0.0);
        self.column(j, r0, k, &mut col[..kc]);
        // Rounded in one vectorised pass.
        words.iter_mut().zip(col.chunks_exact(2)).for_each(|(w, v)| *w = pair(v[0], v[1]));
    }

    /// `B[r, j0 + i]` into `out[i]`; `j0` a multiple of [`NB`] for blocks.
    #[inline(always)]
    fn row(&self, r: usize, j0: usize, n: usize, out: &mut [f32]) {
        match *self {
            Weight::F32(s) => widen(s.data, s.offset + r * s.k_stride + j0 * s.n_stride, s.n_stride, out, |v| v),
            Weight::Bf16(s) => {
                widen(s.data, s.offset + r * s.k_stride + j0 * s.n_stride, s.n_stride, out, bf16::to_f32)
            }
            Weight::F16(s) => widen(s.data, s.offset + r * s.k_stride + j0 * s.n_stride, s.n_stride, out, f16::to_f32),
            Weight::Blocks { bytes, format, .. } => {
                let row = &bytes[r * format.row_bytes(n)..];
                let at = format.row_bytes(j0);
                format.dequantize(&row[at..at + format.row_bytes(out.len())], out);
            }
        }
    }

    /// Asks the CPU to start loading the memory of [`Self::column`]`(j, r0, k, len)` (`column`)
    /// or [`Self::row`]`(j, r0, n, len)` into the cache level `HINT` names (an `_MM_HINT_*`): the
    /// packing jumps from stored row to stored row, a stride the hardware prefetchers follow
    /// late. Out-of-range requests are skipped.
    #[inline(always)]
    fn prefetch<const HINT: i32>(&self, column: bool, j: usize, r0: usize, width: usize, len: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let (bytes, start, count): (&[u8], usize, usize) = match *self {
                Weight::Blocks { bytes, format, .. } => {
                    (bytes, j * format.row_bytes(width) + format.row_bytes(r0), format.row_bytes(len))
                }
                Weight::F32(s) => match strided_run(&s, column, j, r0) {
                    Some(first) => (as_bytes(s.data), first * 4, len * 4),
                    None => return,
                },
                Weight::Bf16(s) => match strided_run(&s, column, j, r0) {
                    Some(first) => (as_bytes(s.data), first * 2, len * 2),
                    None => return,
                },
                Weight::F16(s) => match strided_run(&s, column, j, r0) {
                    Some(first) => (as_bytes(s.data), first * 2, len * 2),
                    None => return,
                },
            };
            let end = (start + count).min(bytes.len());
            for at in (start..end).step_by(64) {
                // SAFETY: `at` is inside `bytes`; a prefetch has no other effect.
                unsafe { std::arch::x86_64::_mm_prefetch::<HINT>(bytes.as_ptr().add(at).cast()) };
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (column, j, r0, width, len);
    }

    /// Panics unless every element of a `k × n` matrix lies inside the data.
    fn check(&self, k: usize, n: usize) {
        if k == 0 || n == 0 {
            return;
        }
        let last = |offset: usize, ks: usize, ns: usize| offset + (k - 1) * ks + (n - 1) * ns;
        let (last, len) = match self {
            Weight::F32(s) => (last(s.offset, s.k_stride, s.n_stride), s.data.len()),
            Weight::Bf16(s) => (last(s.offset, s.k_stride, s.n_stride), s.data.len()),
            Weight::F16(s) => (last(s.offset, s.k_stride, s.n_stride), s.data.len()),
            Weight::Blocks { bytes, format, rows_are_columns } => {
                let (rows, len) = if *rows_are_columns { (n, k) } else { (k, n) };
                format.check_row(len).unwrap_or_else(|e| panic!("bf16 matmul: {e}"));
                assert!(
                    bytes.len() >= rows * format.row_bytes(len),
                    "bf16 matmul: {} bytes of blocks for {rows} rows of {len}",
                    bytes.len()
                );
                return;
            }
        };
        assert!(last < len, "bf16 matmul: the weight reaches element {last} of {len}");
    }
}

/// `out = A·B`, or `out += A·B` with `accumulate`, `out` a row-major `m × n` matrix (`m`, `k`
/// from `a`), on `kernel` (which must be [`Kernel::available`]) and rayon's threads. `A` and `B` are
/// rounded to bf16; the products are accumulated in f32.
pub fn matmul(kernel: Kernel, a: Lhs, b: Weight, n: usize, out: &mut [f32], accumulate: bool) {
    assert!(out.len() == a.rows * n, "bf16 matmul: the output holds {} of {} elements", out.len(), a.rows * n);
    // SAFETY: `out` is borrowed mutably (no operand aliases it), initialised, and holds `m·n`
    // elements (asserted).
    unsafe { matmul_into(kernel, a, b, n, out.as_mut_ptr(), accumulate) }
}

/// `A·B` (as [`matmul`]) into a new row-major `m × n` buffer, with no zero fill: every element is
/// written once before it is read.
pub fn product(kernel: Kernel, a: Lhs, b: Weight, n: usize) -> Vec<f32> {
    let len = a.rows * n;
    let mut out = Vec::with_capacity(len);
    // SAFETY: the allocation holds `m·n` elements, which no operand aliases; without `accumulate`
    // `matmul_into` writes each before it reads it, so all are initialised when the length is set.
    unsafe {
        matmul_into(kernel, a, b, n, out.as_mut_ptr(), false);
        out.set_len(len);
    }
    out
}

/// [`matmul`] into `out`.
///
/// # Safety
/// `out` must be valid for writes of `m·n` elements that no operand aliases, and, with
/// `accumulate`, hold them initialised; without it they may be uninitialised.
unsafe fn matmul_into(kernel: Kernel, a: Lhs, b: Weight, n: usize, out: *mut f32, accumulate: bool) {
    let (m, k) = (a.rows, a.cols);
    assert!(kernel.available(), "bf16 matmul: this CPU cannot run {kernel:?}");
    if m > 0 && k > 0 {
        let last = a.offset + (m - 1) * a.row_stride + (k - 1) * a.col_stride;
        assert!(last < a.data.len(), "bf16 matmul: the left operand reaches element {last} of {}", a.data.len());
    }
    b.check(k, n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            // SAFETY: the caller's contract: `out` holds `m·n` elements.
            unsafe { std::ptr::write_bytes(out, 0, m * n) };
        }
        return;
    }
    // A as tiles of `MR` rows (zeros past `m`), each `KC/2` groups of `MR` bf16 pairs per `KC`
    // slice of `k` (zeros past `k`): a tile's broadcasts read consecutive words (rows of A `k` apart
    // would share L1 sets), and one slice of every tile is one contiguous run that stays in L2
    // while the slice's strips of `B` go by (tiles `k` apart would share L2 sets).
    let kernel = kernel.for_depth(k);
    let (tiles, kc) = (m.div_ceil(kernel.a_rows()), kernel.kc());
    let words = k.div_ceil(kc) * tiles * kernel.a_tile_words(kc);
    // The packed `A` and each thread's scratch are kept from one product to the next: allocating
    // (and zeroing) megabytes per product cost more than some products' packing.
    let mut lines = PACKED_A.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).pop().unwrap_or_default();
    lines.reserve(words);
    let packed_a = &mut lines.words()[..words];
    let chunks = packed_a.par_chunks_mut(kernel.a_tile_words(kc));
    chunks.enumerate().for_each(|(chunk, tile)| pack_a(kernel, kc, a, 1.0, chunk, tile));
    let dst = SendPtr(out);
    let blocks = n.div_ceil(NB);
    (0..blocks).into_par_iter().for_each(|block| {
        let task = Task { kernel, kc, a: packed_a, tiles, b: &b, m, n, k, accumulate, dst: &dst, ldc: n };
        SCRATCH.with_borrow_mut(|scratch| run_block(&task, block, scratch.get_or_insert_with(Scratch::new)));
    });
    PACKED_A.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(lines);
}

/// Packed left operands of [`matmul`] kept for the next products (one per product running at
/// once).
static PACKED_A: std::sync::Mutex<Vec<Lines>> = std::sync::Mutex::new(Vec::new());

thread_local! {
    /// This thread's scratch for [`matmul`]'s column blocks (none is ever running twice on a
    /// thread: a block makes no nested parallel calls).
    static SCRATCH: std::cell::RefCell<Option<Scratch>> = const { std::cell::RefCell::new(None) };
}

/// Buffers of [`matmul_single`], kept by the caller across its calls on one thread.
pub struct Buffers {
    packed_a: Lines,
    scratch: Scratch,
}

impl Buffers {
    /// Empty buffers (the packed block of `B` is allocated here, `A`'s tiles on first use).
    pub fn new() -> Buffers {
        Buffers { packed_a: Lines(Vec::new()), scratch: Scratch::new() }
    }

    /// `β·A` rounded into `kernel`'s tiles for slices of `kc` (as [`matmul`] packs `A`), in the
    /// buffer's first words.
    fn pack_a(&mut self, kernel: Kernel, kc: usize, a: Lhs, beta: f32) -> &[u32] {
        let words = a.cols.div_ceil(kc) * a.rows.div_ceil(kernel.a_rows()) * kernel.a_tile_words(kc);
        self.packed_a.reserve(words);
        let packed_a = &mut self.packed_a.words()[..words];
        let chunks = packed_a.chunks_mut(kernel.a_tile_words(kc));
        chunks.enumerate().for_each(|(chunk, tile)| pack_a(kernel, kc, a, beta, chunk, tile));
        packed_a
    }
}

impl Default for Buffers {
    fn default() -> Self {
        Self::new()
    }
}

/// `C = β·A·B`, or `C += β·A·B` with `accumulate` (β·A rounded to bf16, as [`matmul`] rounds A),
/// on the calling thread only, through `buffers`: `C` is an `m × n` row-major matrix at the start
/// of `out` whose rows are `ldc ≥ n` apart (the elements between them are not touched). For many
/// small products that the caller already runs in parallel (the attention kernel's per-head
/// products), where threads and fresh buffers per call would cost more than they save.
#[allow(clippy::too_many_arguments)]
pub fn matmul_single(
    kernel: Kernel,
    a: Lhs,
    beta: f32,
    b: Weight,
    n: usize,
    out: &mut [f32],
    ldc: usize,
    accumulate: bool,
    buffers: &mut Buffers,
) {
    let (m, k) = (a.rows, a.cols);
    b.check(k, n);
    if !single_product_left(kernel, a, n, out, ldc, accumulate) {
        return;
    }
    let kernel = kernel.for_depth(k);
    let (tiles, kc) = (m.div_ceil(kernel.a_rows()), kernel.kc());
    buffers.pack_a(kernel, kc, a, beta);
    let Buffers { packed_a, scratch } = buffers;
    let packed_a = packed_a.words();
    let dst = SendPtr(out.as_mut_ptr());
    let task = Task { kernel, kc, a: packed_a, tiles, b: &b, m, n, k, accumulate, dst: &dst, ldc };
    for block in 0..n.div_ceil(NB) {
        run_block(&task, block, scratch);
    }
}

/// The checks of [`matmul_single`] and [`matmul_packed`] (`C`: `a.rows × n`, rows `ldc` apart at
/// the start of `out`), and their empty cases: whether a product is left to compute (`m`, `n`
/// and `k` positive). With `k = 0`, `C` is zeroed here unless accumulating.
fn single_product_left(kernel: Kernel, a: Lhs, n: usize, out: &mut [f32], ldc: usize, accumulate: bool) -> bool {
    let (m, k) = (a.rows, a.cols);
    assert!(kernel.available(), "bf16 matmul: this CPU cannot run {kernel:?}");
    assert!(ldc >= n, "bf16 matmul: output rows {ldc} apart hold {n} columns");
    if m > 0 && k > 0 {
        let last = a.offset + (m - 1) * a.row_stride + (k - 1) * a.col_stride;
        assert!(last < a.data.len(), "bf16 matmul: the left operand reaches element {last} of {}", a.data.len());
    }
    if m == 0 || n == 0 {
        return false;
    }
    let extent = (m - 1) * ldc + n;
    assert!(out.len() >= extent, "bf16 matmul: the output holds {} of {extent} elements", out.len());
    if k == 0 && !accumulate {
        out[..extent].chunks_mut(ldc).for_each(|row| row[..n].fill(0.0));
    }
    k > 0
}

/// A right operand `B` (`k × n`) packed once for several products that each multiply a leading
/// part of it, `B[..k', ..n']` (the attention's keys and values, of which each block of queries
/// sees a prefix): the packing is then paid once rather than per product.
pub struct PackedB {
    words: Lines,
    k: usize,
    n: usize,
}

impl Default for PackedB {
    fn default() -> Self {
        PackedB { words: Lines(Vec::new()), k: 0, n: 0 }
    }
}

impl PackedB {
    /// Packs `b` (`k × n`, rounded to bf16 as [`matmul`] rounds it) in place of what was held,
    /// reusing the allocation, through `buffers`' scratch.
    pub fn pack(&mut self, kernel: Kernel, b: Weight, k: usize, n: usize, buffers: &mut Buffers) {
        assert!(kernel.available(), "bf16 matmul: this CPU cannot run {kernel:?}");
        b.check(k, n);
        let blocks = n.div_ceil(NB);
        let len =
            if k == 0 { 0 } else { ((k.div_ceil(KC) - 1) * (KC / 2) + Self::slice_pairs(k, k - 1)) * NB * blocks };
        self.words.reserve(len);
        (self.k, self.n) = (k, n);
        let Scratch { column, odd, pairs, .. } = &mut buffers.scratch;
        for r0 in (0..k).step_by(KC) {
            let kc = KC.min(k - r0);
            for block in 0..blocks {
                let (j0, at) = (block * NB, self.block_at(r0, block));
                let nb = NB.min(n - j0);
                let packed = &mut self.words.words()[at..][..kc.div_ceil(2) * NB];
                match kernel {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the kernel is available (asserted), so the CPU has AVX512-BF16/F/BW.
                    Kernel::Avx512Bf16 | Kernel::Amx => unsafe {
                        pack_b_avx512(&b, k, n, r0, kc, j0, nb, packed, column, odd, pairs.words())
                    },
                    _ => pack_b(&b, k, n, r0, kc, j0, nb, packed, column, odd, pairs.words(), false),
                }
            }
        }
    }

    /// Rows (`k`) of the packed operand.
    pub fn rows(&self) -> usize {
        self.k
    }

    /// Pairs of the packed slice holding reduction index `r`, for a `B` of `k` rows.
    fn slice_pairs(k: usize, r: usize) -> usize {
        let r0 = r / KC * KC;
        KC.min(k - r0).div_ceil(2)
    }

    /// Where the packed block (slice `r0`, column block `block`) starts: the slices before it are
    /// full ([`KC`] rows), each `KC/2 · NB` words per column block.
    fn block_at(&self, r0: usize, block: usize) -> usize {
        let blocks = self.n.div_ceil(NB);
        (r0 / KC * (KC / 2) * blocks + block * Self::slice_pairs(self.k, r0)) * NB
    }
}

/// `C = β·A·B[..k', ..n']` (or `+=` with `accumulate`) as [`matmul_single`], `k' = a.cols` and
/// `n'` at most the packed operand's `k` and `n`. A prefix `k'` that ends inside a pair of rows
/// (odd, and short of `k`) would pair `A`'s zero padding with a row of `B` outside the product,
/// which is exact only when that row is finite: such products must use [`matmul_single`].
#[allow(clippy::too_many_arguments)]
pub fn matmul_packed(
    kernel: Kernel,
    a: Lhs,
    beta: f32,
    b: &PackedB,
    n: usize,
    out: &mut [f32],
    ldc: usize,
    accumulate: bool,
    buffers: &mut Buffers,
) {
    let (m, k) = (a.rows, a.cols);
    assert!(k <= b.k && n <= b.n, "bf16 matmul: {k} × {n} of a packed {} × {}", b.k, b.n);
    assert!(k.is_multiple_of(2) || k == b.k, "bf16 matmul: an odd prefix {k} of {} packed rows", b.k);
    if !single_product_left(kernel, a, n, out, ldc, accumulate) {
        return;
    }
    let kernel = kernel.for_depth(k);
    let tiles = m.div_ceil(kernel.a_rows());
    // A packed operand is sliced at [`KC`] whatever the kernel.
    let packed_a = buffers.pack_a(kernel, KC, a, beta);
    for block in 0..n.div_ceil(NB) {
        let (j0, nb) = (block * NB, NB.min(n - block * NB));
        for r0 in (0..k).step_by(KC) {
            // The strips were packed with the slice's full height; this product reads their top.
            let (kp, height) = (KC.min(k - r0).div_ceil(2), PackedB::slice_pairs(b.k, r0));
            let packed = &b.words.as_words()[b.block_at(r0, block)..][..height * NB];
            let load = accumulate || r0 > 0;
            let slice = Slice { kernel, kc: KC, packed_a, tiles, m, r0, kp, height, nb, ldc, load };
            // SAFETY: columns `j0..j0 + nb` of the `m × n` output (rows `ldc` apart, extent
            // asserted) are borrowed mutably with `out`.
            unsafe { slice.multiply(packed.as_ptr(), out.as_mut_ptr().add(j0), &mut ()) };
        }
    }
}

/// Packs chunk `chunk` of `A`'s tiles for `kernel` (slice `chunk / tiles` of `k`, tile
/// `chunk % tiles`) as `β·A` rounded to bf16 pairs into `tile` (whatever it held): row `r`'s pair
/// `p` at `p·MR + r` (groups of a pair of every row, which the AVX-512 kernel broadcasts), or for
/// AMX at [`amx::a_word`]`(p, r)` (runs of 16 pairs of every row, as a tile register loads them).
fn pack_a(kernel: Kernel, kc: usize, a: Lhs, beta: f32, chunk: usize, tile: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if kernel.simd() {
        // SAFETY: `simd` kernels run only where the CPU has AVX512-BF16/F/BW.
        unsafe { pack_a_avx512(kernel, kc, a, beta, chunk, tile) };
        return;
    }
    pack_a_with(kernel, kc, a, beta, chunk, tile)
}

/// [`pack_a`] compiled for AVX-512 (its rounding vectorises).
///
/// # Safety
/// The CPU must have AVX512-BF16, AVX512F and AVX512BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn pack_a_avx512(kernel: Kernel, kc: usize, a: Lhs, beta: f32, chunk: usize, tile: &mut [u32]) {
    pack_a_with(kernel, kc, a, beta, chunk, tile)
}

/// The body of [`pack_a`], for the target it is compiled into.
#[inline(always)]
fn pack_a_with(kernel: Kernel, kc: usize, a: Lhs, beta: f32, chunk: usize, tile: &mut [u32]) {
    let (m, k, tile_rows) = (a.rows, a.cols, kernel.a_rows());
    let tiles = m.div_ceil(tile_rows);
    let (slice, t) = (chunk / tiles, chunk % tiles);
    let c0 = slice * kc;
    let len = kc.min(k - c0);
    let rows = tile_rows.min(m - t * tile_rows);
    // A whole tile is written below; a partial one's padding (rows past `m`, pairs past `k`)
    // must be zeros, whatever the buffer held before.
    if rows < tile_rows || len < kc {
        tile.fill(0);
    }
    let at = |p: usize, r: usize| if kernel == Kernel::Amx { amx::a_word(p, r) } else { p * MR + r };
    if a.row_stride == 1 && a.col_stride != 1 {
        // Column-major A (a transposed view, as the attention's `Pᵀ`): the tile's rows are
        // adjacent at each column, read a pair of columns at a time.
        let mut words = [0u32; amx::ROWS];
        for p in 0..len.div_ceil(2) {
            let column = |c: usize| &a.data[a.offset + t * tile_rows + (c0 + c) * a.col_stride..][..rows];
            let (even, odd) = (column(2 * p), (2 * p + 1 < len).then(|| column(2 * p + 1)));
            let words = &mut words[..rows];
            match odd {
                Some(odd) => {
                    words.iter_mut().zip(even.iter().zip(odd)).for_each(|(w, (&e, &o))| *w = pair(beta * e, beta * o))
                }
                None => words.iter_mut().zip(even).for_each(|(w, &e)| *w = pair(beta * e, 0.0)),
            }
            for (r, &w) in words.iter().enumerate() {
                tile[at(p, r)] = w;
            }
        }
        return;
    }
    let mut words = [0u32; KC_MAX / 2];
    for r in 0..rows {
        let i = t * tile_rows + r;
        let start = a.offset + i * a.row_stride + c0 * a.col_stride;
        if a.col_stride == 1 {
            // A contiguous run (the usual activations): rounded in one vectorised pass.
            let row = &a.data[start..start + len];
            words.iter_mut().zip(row.chunks_exact(2)).for_each(|(w, v)| *w = pair(beta * v[0], beta * v[1]));
            if len % 2 == 1 {
                words[len / 2] = pair(beta * row[len - 1], 0.0);
            }
        } else {
            let at = |c: usize| if c < len { beta * a.data[start + c * a.col_stride] } else { 0.0 };
            words.iter_mut().take(len.div_ceil(2)).enumerate().for_each(|(p, w)| *w = pair(at(2 * p), at(2 * p + 1)));
        }
        if kernel == Kernel::Amx {
            // `k` is a multiple of 32 for AMX: whole chunks of 16 pairs.
            for (q, chunk) in words[..len / 2].chunks_exact(amx::PAIRS).enumerate() {
                tile[amx::a_word(q * amx::PAIRS, r)..][..amx::PAIRS].copy_from_slice(chunk);
            }
        } else {
            for (p, &w) in words[..len.div_ceil(2)].iter().enumerate() {
                tile[p * MR + r] = w;
            }
        }
    }
}

/// Output columns `block·NB..` of `task` on the fastest code the kernel allows.
fn run_block(task: &Task, block: usize, scratch: &mut Scratch) {
    match task.kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the callers checked that the CPU runs the kernel, so it has AVX512-BF16/F/BW.
        Kernel::Avx512Bf16 | Kernel::Amx => unsafe { block_avx512(task, block, scratch) },
        _ => block_task(task, block, scratch),
    }
}

/// A thread's buffers: the packed block of `B` and the scratch rows it is read through.
struct Scratch {
    packed_b: Lines,
    column: Vec<f32>,
    odd: Vec<f32>,
    pairs: Lines,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            packed_b: Lines::zeroed(KC_MAX / 2 * NB),
            column: vec![0.0f32; KC_MAX.max(NB)],
            odd: vec![0.0f32; NB],
            pairs: Lines::zeroed(16 * (KC_MAX / 2)),
        }
    }
}

/// One cache line of words.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u32; 16]);

/// Zeroed words that start on a cache line: the packed strips' 64-byte rows (loaded twice per
/// step of the micro-kernel, stored once by the packing) never straddle two lines, nor do the
/// rows of AMX's tile loads (a tile whose rows straddle lines loads at a third of the speed).
#[derive(Default)]
struct Lines(Vec<Line>);

impl Lines {
    /// At least `words` zeroed words.
    fn zeroed(words: usize) -> Lines {
        Lines(vec![Line([0; 16]); words.div_ceil(16)])
    }

    /// At least `words` words (zeroed where new; the old ones kept).
    fn reserve(&mut self, words: usize) {
        if self.0.len() * 16 < words {
            self.0.resize(words.div_ceil(16), Line([0; 16]));
        }
    }

    /// The words, read-only.
    fn as_words(&self) -> &[u32] {
        // SAFETY: as `words`, borrowed shared.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u32>(), self.0.len() * 16) }
    }

    /// The words.
    fn words(&mut self) -> &mut [u32] {
        // SAFETY: `Line` is 16 `u32`s with no padding (`repr(C)`, size 64), so the lines are
        // `16·len` initialised, suitably aligned words, borrowed mutably with `self`.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u32>(), self.0.len() * 16) }
    }
}

/// What every column block of one product shares.
struct Task<'a> {
    kernel: Kernel,
    /// Reduction elements per slice of `k`.
    kc: usize,
    a: &'a [u32],
    tiles: usize,
    b: &'a Weight<'a>,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
    dst: &'a SendPtr,
    /// Elements between the output's rows.
    ldc: usize,
}

/// [`block_task`] compiled for AVX-512 (the packing's conversions and dequantization vectorise).
///
/// # Safety
/// The CPU must have AVX512-BF16, AVX512F and AVX512BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn block_avx512(task: &Task, block: usize, scratch: &mut Scratch) {
    block_task(task, block, scratch)
}

/// [`pack_b`] compiled for AVX-512, for [`PackedB`].
///
/// # Safety
/// The CPU must have AVX512-BF16, AVX512F and AVX512BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_b_avx512(
    b: &Weight,
    k: usize,
    n: usize,
    r0: usize,
    kc: usize,
    j0: usize,
    nb: usize,
    packed: &mut [u32],
    scratch: &mut [f32],
    scratch2: &mut [f32],
    pairs: &mut [u32],
) {
    pack_b(b, k, n, r0, kc, j0, nb, packed, scratch, scratch2, pairs, true)
}

/// Output columns `block·NB..` of the product: the weight's block packed a `KC` slice at a
/// time, each slice multiplied into every row tile.
#[inline(always)]
fn block_task(task: &Task, block: usize, scratch: &mut Scratch) {
    let Task { kernel, kc: slice_len, a: packed_a, tiles, b, m, n, k, accumulate, dst, ldc } = *task;
    let Scratch { packed_b, column: scratch, odd: scratch2, pairs } = scratch;
    let (packed_b, pairs) = (packed_b.words(), pairs.words());
    let j0 = block * NB;
    let nb = NB.min(n - j0);
    let calls = nb.div_ceil(NR) * m.div_ceil(kernel.c_rows());
    if Ahead::applies(kernel, b) {
        let packed = packed_b.as_mut_ptr();
        let mut ahead = Ahead {
            b,
            k,
            n,
            j0,
            nb,
            slice_len,
            m,
            packed,
            scratch,
            odd: scratch2,
            pairs,
            r0: 0,
            target: None,
            done: 0,
            units: 0,
            steps: 0,
            total: 1,
        };
        ahead.pack_strip(0, 0);
        for r0 in (0..k).step_by(slice_len) {
            let kp = slice_len.min(k - r0) / 2;
            ahead.slice(r0);
            let load = accumulate || r0 > 0;
            let slice = Slice { kernel, kc: slice_len, packed_a, tiles, m, r0, kp, height: kp, nb, ldc, load };
            // SAFETY: columns `j0..j0 + nb` of the `m × n` output (rows `ldc` apart) are this
            // task's alone (its block of columns); `ahead` writes only strips not being read.
            unsafe { slice.multiply(packed, dst.0.add(j0), &mut ahead) };
        }
        return;
    }
    for r0 in (0..k).step_by(slice_len) {
        let kc = slice_len.min(k - r0);
        let kp = kc.div_ceil(2);
        pack_b(b, k, n, r0, kc, j0, nb, packed_b, scratch, scratch2, pairs, kernel.simd());
        // For a weight packed by rows, the rows the next packing reads (the next slice of `k`,
        // or after the last one the next block's first, usually this thread's next task) are
        // fetched into L2 a few per tile while this slice is multiplied ([`NextPack`]). Not
        // under AMX: there these prefetches compete with the tiles' loads (measured slower).
        let after = r0 + slice_len;
        let next_block = if after < k { block } else { block + 1 };
        let mut next = match kernel {
            Kernel::Amx => NextPack::NONE,
            _ => NextPack::after(b, k, n, after, slice_len, next_block, calls),
        };
        let load = accumulate || r0 > 0;
        let slice = Slice { kernel, kc: slice_len, packed_a, tiles, m, r0, kp, height: kp, nb, ldc, load };
        // SAFETY: columns `j0..j0 + nb` of the `m × n` output (rows `ldc` apart) are this task's
        // alone (its block of columns).
        unsafe { slice.multiply(packed_b.as_ptr(), dst.0.add(j0), &mut (&mut next, b)) };
    }
}

/// One packed slice of `B` (`kp` pairs of `k` from `r0`, over `nb` columns) to multiply into
/// every row tile of `C`.
struct Slice<'a> {
    kernel: Kernel,
    /// Reduction elements per slice of `k` (of `A`'s packing).
    kc: usize,
    packed_a: &'a [u32],
    /// Packed tiles of `A` per slice of `k`.
    tiles: usize,
    m: usize,
    r0: usize,
    kp: usize,
    /// Pair rows of each packed strip (at least `kp`; the top `kp` are read).
    height: usize,
    nb: usize,
    ldc: usize,
    /// Whether `C`'s old values are added (accumulating, or after the first slice).
    load: bool,
}

impl Slice<'_> {
    /// `C[.., ..nb] (+)= A[.., r0..r0 + 2·kp]·B_slice`, strip by strip, each strip over every
    /// row tile (for AMX, over the row tiles of one panel of rows at a time), with `alongside`'s
    /// hooks run around the calls.
    ///
    /// # Safety
    /// `c` must be valid for reads and writes of `m` rows of `nb` elements, `ldc` apart, which no
    /// other thread touches; `packed` must hold the slice's strips (`height·NR` words apart),
    /// which nothing writes during a strip's calls (`alongside` may write the other strips).
    unsafe fn multiply(&self, packed: *const u32, c: *mut f32, alongside: &mut impl Alongside) {
        let Slice { kernel, kc, packed_a, tiles, m, r0, kp, height, nb, ldc, load } = *self;
        let (c_rows, a_rows, a_words) = (kernel.c_rows(), kernel.a_rows(), kernel.a_tile_words(kc));
        // Rows in panels (for AMX) whose slice of `A` and block of `C` stay in L2 with the block
        // of `B` while its strips go by.
        let panel = if kernel == Kernel::Amx { ROW_PANEL } else { m };
        let mut calls = 0;
        for p0 in (0..m).step_by(panel) {
            let rows = p0..m.min(p0 + panel);
            for s in (0..nb).step_by(NR) {
                let nr = NR.min(nb - s);
                // SAFETY: the caller's contract: the strip is inside `packed` and not written
                // during its calls.
                let b_strip = unsafe { std::slice::from_raw_parts(packed.add(s / NR * (height * NR)), kp * NR) };
                alongside.strip_start(p0, s, rows.len().div_ceil(c_rows) * kp.div_ceil(amx::PAIRS));
                for i0 in rows.clone().step_by(c_rows) {
                    let mr = c_rows.min(m - i0);
                    let a_tile = &packed_a[(r0 / kc * tiles + i0 / a_rows) * a_words..];
                    // The call after this one: the next row tile, else the panel's first in the
                    // next strip, else the next panel's first.
                    let (s_next, i_next) = if i0 + c_rows < rows.end {
                        (s, i0 + c_rows)
                    } else if s + NR < nb {
                        (s + NR, p0)
                    } else {
                        (0, rows.end)
                    };
                    let next = if i_next < m {
                        NextC { c: c.wrapping_add(i_next * ldc + s_next), rows: c_rows.min(m - i_next) }
                    } else {
                        NextC::NONE
                    };
                    let mut step = || alongside.step();
                    // SAFETY: the tile's rows `i0..i0 + mr` and columns `s..s + nr` lie inside the
                    // caller's block of `C`; the operands' lengths are checked in `tile`.
                    unsafe {
                        tile(kernel, kc, mr, kp, a_tile, b_strip, c.add(i0 * ldc + s), ldc, nr, load, next, &mut step)
                    };
                    calls += 1;
                    alongside.after_call(calls);
                }
                alongside.strip_end();
            }
        }
    }
}

/// Work run alongside [`Slice::multiply`]'s micro-kernel calls (by default, none).
trait Alongside {
    /// Before the calls of strip `s` (its first column) over the panel of rows from `p0`, which
    /// take `steps` steps of 32 of `k` in all (AMX).
    fn strip_start(&mut self, _p0: usize, _s: usize, _steps: usize) {}
    /// After each step of an AMX call (the tiles still multiplying).
    fn step(&mut self) {}
    /// After each call: `calls` made so far in the slice.
    fn after_call(&mut self, _calls: usize) {}
    /// After the strip's calls.
    fn strip_end(&mut self) {}
}

/// Nothing alongside.
impl Alongside for () {}

/// The packing of the next strip of a Q8_0 `B` (or of the next slice's first strip), spread over
/// the steps of the current strip's AMX calls: the tile unit multiplies while the core's vector
/// units convert the weights, which packed up front would each wait for the other. Each strip
/// is packed in units of 32 of `k` (one block of every stored row).
struct Ahead<'a> {
    b: &'a Weight<'a>,
    k: usize,
    n: usize,
    /// The block's first column and its width.
    j0: usize,
    nb: usize,
    /// `k` per slice; rows of `C`.
    slice_len: usize,
    m: usize,
    /// Start of the block's packed strips.
    packed: *mut u32,
    scratch: &'a mut [f32],
    odd: &'a mut [f32],
    pairs: &'a mut [u32],
    /// The slice being multiplied (its first index of `k`).
    r0: usize,
    /// The strip being packed (slice, first column within the block), if any.
    target: Option<(usize, usize)>,
    /// Units of it packed, and in all; steps seen, and in all.
    done: usize,
    units: usize,
    steps: usize,
    total: usize,
}

impl Ahead<'_> {
    /// Whether `b` is packed ahead under `kernel`: Q8_0 weights, either way round (stored rows
    /// that are rows of `B`, read a short run from each of the strip's rows, are prefetched far
    /// enough ahead by the row packing to overlap too).
    fn applies(kernel: Kernel, b: &Weight) -> bool {
        kernel == Kernel::Amx && matches!(b, Weight::Blocks { format: BlockFormat::Q8_0, .. })
    }

    /// Packs units `from..to` of strip `s` of slice `r0`.
    fn pack(&mut self, (r0, s): (usize, usize), from: usize, to: usize) {
        let kp = self.slice_len.min(self.k - r0) / 2;
        let (nr, words) = (NR.min(self.nb - s), (to - from) * amx::PAIRS * NR);
        // SAFETY: the units' pair rows of the strip lie inside the block's packed strips, which
        // only this thread touches, and which the strips being multiplied do not overlap
        // (`Slice::multiply`'s contract, kept by the order of `strip_start`'s targets).
        let dst = unsafe {
            std::slice::from_raw_parts_mut(self.packed.add(s / NR * (kp * NR) + from * amx::PAIRS * NR), words)
        };
        let (b, (k, n), r) = (self.b, (self.k, self.n), r0 + from * 2 * amx::PAIRS);
        let len = (to - from) * 2 * amx::PAIRS;
        // SAFETY: AMX runs only where the CPU has AVX512-BF16/F/BW (`Kernel::available`).
        unsafe { pack_b_avx512(b, k, n, r, len, self.j0 + s, nr, dst, self.scratch, self.odd, self.pairs) };
    }

    /// Units (32 of `k`) of a strip of slice `r0`.
    fn units_of(&self, r0: usize) -> usize {
        self.slice_len.min(self.k - r0) / (2 * amx::PAIRS)
    }

    /// Packs all of strip `s` of slice `r0` now.
    fn pack_strip(&mut self, r0: usize, s: usize) {
        self.pack((r0, s), 0, self.units_of(r0));
    }

    /// Starts slice `r0`.
    fn slice(&mut self, r0: usize) {
        self.r0 = r0;
    }
}

impl Alongside for Ahead<'_> {
    fn strip_start(&mut self, p0: usize, s: usize, steps: usize) {
        let last_panel = (self.m - 1) / ROW_PANEL * ROW_PANEL;
        let next_slice = self.r0 + self.slice_len;
        // During the first panel, each strip packs the next one; during the last panel's last
        // strip (when the first panel's strips are all packed and the slice's first strip is no
        // longer read), the next slice's first strip.
        self.target = if p0 == 0 && s + NR < self.nb {
            Some((self.r0, s + NR))
        } else if p0 == last_panel && s + NR >= self.nb && next_slice < self.k {
            Some((next_slice, 0))
        } else {
            None
        };
        if let Some((r0, _)) = self.target {
            self.units = self.units_of(r0);
        }
        (self.done, self.steps, self.total) = (0, 0, steps.max(1));
    }

    #[inline(always)]
    fn step(&mut self) {
        if let Some(target) = self.target {
            self.steps += 1;
            let due = (self.units * self.steps).div_ceil(self.total).min(self.units);
            if self.done < due {
                self.pack(target, self.done, due);
                self.done = due;
            }
        }
    }

    fn strip_end(&mut self) {
        if let Some(target) = self.target.take()
            && self.done < self.units
        {
            self.pack(target, self.done, self.units);
        }
    }
}

/// The rows of `B` that the packing of one (slice, block) reads, issued as L2 prefetches spread
/// evenly over `calls` tile calls. Only for weights packed by rows (`dY·Wᵀ` over stored rows):
/// their runs are short and a stored row apart, and the packing otherwise waits on memory a
/// row at a time; weights packed by columns prefetch well enough inside the packing (measured:
/// no gain from this there).
struct NextPack {
    /// First reduction index (row of `B`) and first column of the block.
    r0: usize,
    j0: usize,
    /// Its columns; `n` of `B`.
    nb: usize,
    n: usize,
    /// Rows issued so far, of `rows`.
    issued: usize,
    rows: usize,
    /// Tile calls over which the rows are spread.
    calls: usize,
}

impl NextPack {
    /// Nothing to fetch.
    const NONE: NextPack = NextPack { r0: 0, j0: 0, nb: 0, n: 0, issued: 0, rows: 0, calls: 1 };

    /// The packing of slice `r0` of column block `block` (nothing when it is past `k` or `n`, or
    /// when `b` is packed by columns).
    fn after(b: &Weight, k: usize, n: usize, r0: usize, kc: usize, block: usize, calls: usize) -> NextPack {
        let (r0, j0) = (if r0 < k { r0 } else { 0 }, block * NB);
        let (rows, nb) = if j0 < n && !b.by_columns() { (kc.min(k - r0), NB.min(n - j0)) } else { (0, 0) };
        NextPack { r0, j0, nb, n, issued: 0, rows, calls: calls.max(1) }
    }

    /// Issues the rows due after `call` tile calls.
    #[inline(always)]
    fn issue(&mut self, b: &Weight, call: usize) {
        let due = (self.rows * call / self.calls).min(self.rows);
        while self.issued < due {
            b.prefetch::<L2>(false, self.r0 + self.issued, self.j0, self.n, self.nb);
            self.issued += 1;
        }
    }
}

/// The block of `C` that the next micro-kernel call reads, fetched into L1 while this one
/// multiplies (AMX loads it into the tile registers at the call's start).
#[derive(Clone, Copy)]
struct NextC {
    /// Its first element (any address: it is only prefetched).
    c: *const f32,
    /// Its rows (`ldc` apart); 0 for none.
    rows: usize,
}

impl NextC {
    const NONE: NextC = NextC { c: std::ptr::null(), rows: 0 };
}

/// The rows of the next packing fetched after each call.
impl Alongside for (&mut NextPack, &Weight<'_>) {
    fn after_call(&mut self, calls: usize) {
        self.0.issue(self.1, calls);
    }
}

/// A pointer to the output handed to the column-block tasks, each writing its own columns.
struct SendPtr(*mut f32);
// SAFETY: the tasks write disjoint elements (see `matmul`).
unsafe impl Sync for SendPtr {}

/// Packs `B[r0..r0 + kc, j0..j0 + nb]` into `packed` as strips of [`NR`] columns, each `⌈kc/2⌉`
/// rows of `NR` pairs, contiguous (zeros past `kc` and `nb`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pack_b(
    b: &Weight,
    k: usize,
    n: usize,
    r0: usize,
    kc: usize,
    j0: usize,
    nb: usize,
    packed: &mut [u32],
    scratch: &mut [f32],
    scratch2: &mut [f32],
    pairs: &mut [u32],
    simd: bool,
) {
    let kp = kc.div_ceil(2);
    let packed = &mut packed[..kp * nb.div_ceil(NR) * NR];
    if !nb.is_multiple_of(NR) {
        packed.fill(0);
    }
    // Word `(p, c)`'s place.
    let at = |p: usize, c: usize| c / NR * (kp * NR) + p * NR + c % NR;
    #[cfg(target_arch = "x86_64")]
    if simd && let Weight::Blocks { bytes, format: BlockFormat::Q8_0, rows_are_columns } = *b {
        // Q8_0 (the common `--base-dtype`): each 32-weight block converted in registers straight
        // to bf16 words, without the f32 scratch. `check` made the stored rows whole blocks: `k`
        // (so `kc`) a multiple of 32 for columns, `n` (so `nb`) for rows.
        let row_bytes = BlockFormat::Q8_0.row_bytes(if rows_are_columns { k } else { n });
        let (first_row, along, rows) = if rows_are_columns { (j0, r0, nb) } else { (r0, j0, kc) };
        let (first, len) = (first_row * row_bytes + along / 32 * 34, if rows_are_columns { kc } else { nb });
        assert!(len.is_multiple_of(32) && rows > 0);
        assert!(bytes.len() >= first + (rows - 1) * row_bytes + len / 32 * 34);
        assert!(packed.len() >= kp * nb.div_ceil(NR) * NR);
        // SAFETY: `simd` is set only for the AVX512-BF16 kernel (AVX512-BF16/F/BW checked at
        // run time); the blocks read (`rows` stored rows `row_bytes` apart from `first`, `len`
        // weights each) are inside `bytes` and the writes inside `packed` (asserted).
        unsafe {
            // The stored blocks past this slice (the rows' further blocks, or further rows) are
            // the packing's to prefetch.
            if rows_are_columns {
                let row_blocks = (k - r0) / 32;
                avx512::pack_q8_0_columns(bytes.as_ptr().add(first), row_bytes, kc, row_blocks, nb, packed.as_mut_ptr())
            } else {
                avx512::pack_q8_0_rows(bytes.as_ptr().add(first), row_bytes, kc, k - r0, nb, packed.as_mut_ptr())
            }
        }
        return;
    }
    if b.by_columns() {
        // Column `j` of `B` is a run of `kc` values: read it, then scatter its pairs down the
        // column of words (the `NB`-word rows stay in L1 over the block).
        let col = &mut scratch[..kp * 2];
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut first = 0;
        #[cfg(not(target_arch = "x86_64"))]
        let _ = simd;
        #[cfg(target_arch = "x86_64")]
        if simd {
            // Sixteen columns at a time: rounded into sixteen rows of words, then transposed
            // 16 × 16 in registers into whole 64-byte rows of the strip.
            const ROW: usize = KC_MAX / 2;
            while first + 16 <= nb {
                for ci in 0..16 {
                    let c = first + ci;
                    if c + 4 < nb {
                        b.prefetch::<L1>(true, j0 + c + 4, r0, k, kc);
                    }
                    b.column_words(j0 + c, r0, k, kc, col, &mut pairs[ci * ROW..][..kp]);
                }
                let base = at(0, first);
                for p0 in (0..kp).step_by(16) {
                    let rows = 16.min(kp - p0);
                    assert!(pairs.len() >= 15 * ROW + p0 + 16 && packed.len() >= base + (p0 + rows - 1) * NR + 16);
                    // SAFETY: the CPU has AVX-512F (`simd` is set only for the AVX512-BF16
                    // kernel); the reads (16 rows of 16 words, `ROW` apart, from `p0`) and the
                    // writes (`rows` rows of 16 words, `NR` apart) are inside the slices (asserted).
                    unsafe {
                        avx512::transpose16(
                            pairs.as_ptr().add(p0),
                            ROW,
                            packed.as_mut_ptr().add(base + p0 * NR),
                            NR,
                            rows,
                        )
                    };
                }
                first += 16;
            }
        }
        for c in first..nb {
            if c + 4 < nb {
                b.prefetch::<L1>(true, j0 + c + 4, r0, k, kc);
            }
            let words = &mut pairs[..kp];
            b.column_words(j0 + c, r0, k, kc, col, words);
            let strip = &mut packed[at(0, c)..];
            for (p, &w) in words.iter().enumerate() {
                strip[p * NR] = w;
            }
        }
    } else {
        // Rows `2p` and `2p + 1` of `B` interleaved into row `p` of words.
        let (even, odd) = (&mut scratch[..nb], &mut scratch2[..nb]);
        for p in 0..kp {
            let r = r0 + 2 * p;
            for ahead in [r + 4, r + 5] {
                if ahead < r0 + kc {
                    b.prefetch::<L1>(false, ahead, j0, n, nb);
                }
            }
            let has_odd = r + 1 < r0 + kc;
            if let Weight::Bf16(w) = b
                && w.n_stride == 1
            {
                // Stored bf16: the pairs are the stored bits, no rounding.
                let row = |r: usize| &w.data[w.offset + r * w.k_stride + j0..][..nb];
                // A missing odd row pairs with zeros (the even row itself, masked off).
                let (even, odd) = (row(r), row(if has_odd { r + 1 } else { r }));
                for (s, (even, odd)) in even.chunks(NR).zip(odd.chunks(NR)).enumerate() {
                    let words = &mut packed[at(p, s * NR)..][..even.len()];
                    let high = |o: bf16| if has_odd { o } else { bf16::ZERO };
                    words.iter_mut().zip(even.iter().zip(odd)).for_each(|(w, (&e, &o))| *w = stored_pair(e, high(o)));
                }
                continue;
            }
            b.row(r, j0, n, even);
            if has_odd {
                b.row(r + 1, j0, n, odd);
            } else {
                odd.fill(0.0);
            }
            for (s, (even, odd)) in even.chunks(NR).zip(odd.chunks(NR)).enumerate() {
                let words = &mut packed[at(p, s * NR)..][..even.len()];
                words.iter_mut().zip(even.iter().zip(odd)).for_each(|(w, (&e, &o))| *w = pair(e, o));
            }
        }
    }
}

/// One `mr × nr` tile of `C` (`c`, rows `ldc` apart): `C (+)= A_tile·B_strip` over `kp` pairs,
/// `a` holding `kp` groups of [`MR`] words (row `r`'s pair `p` at `p·MR + r`; for AMX, up to two
/// packed tiles of 16 rows, [`amx::a_word`], and `kp` a multiple of 16), `b` `kp` rows of [`NR`] words;
/// without `load` the tile's old values are not read.
///
/// # Safety
/// `c` must be valid for reads and writes of `mr` rows of `nr` elements, `ldc` apart, which no
/// other thread touches.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    kernel: Kernel,
    kc: usize,
    mr: usize,
    kp: usize,
    a: &[u32],
    b: &[u32],
    c: *mut f32,
    ldc: usize,
    nr: usize,
    load: bool,
    next: NextC,
    step: &mut impl FnMut(),
) {
    assert!((1..=kernel.c_rows()).contains(&mr) && (1..=NR).contains(&nr) && kp >= 1);
    let a_len = if kernel == Kernel::Amx {
        (mr.div_ceil(amx::ROWS) - 1) * kernel.a_tile_words(kc) + kp * amx::ROWS
    } else {
        kp * MR
    };
    assert!(a.len() >= a_len && b.len() >= kp * NR, "bf16 tile: {} and {} words", a.len(), b.len());
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Amx => {
            assert!(kp.is_multiple_of(amx::PAIRS), "AMX tile: {kp} pairs");
            // SAFETY: `matmul` checked that the process may use AMX (and the CPU has AVX-512);
            // the operands' extents were asserted above; `c` is the caller's contract.
            unsafe { amx::tile(kp, a.as_ptr(), kernel.a_tile_words(kc), b.as_ptr(), c, ldc, mr, nr, load, next, step) }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Bf16 => {
            let _ = (next, step);
            macro_rules! run {
                ($($rows:literal)*) => {
                    match mr {
                        $(
                            // SAFETY: `matmul` checked that the CPU has AVX512-BF16/F/BW; the
                            // operands' extents were asserted above; `c` is the caller's contract.
                            $rows => unsafe { avx512::tile::<$rows>(kp, a.as_ptr(), b.as_ptr(), c, ldc, nr, load) },
                        )*
                        _ => unreachable!(),
                    }
                };
            }
            run!(1 2 3 4 5 6 7 8)
        }
        #[cfg(not(target_arch = "x86_64"))]
        Kernel::Avx512Bf16 | Kernel::Amx => unreachable!("checked by `matmul`"),
        Kernel::Portable => {
            let _ = (next, step);
            // From zero, the old tile added at the end, as the AVX-512 kernel does.
            let mut acc = [[0.0f32; NR]; MR];
            let widen = |w: u32| (f32::from_bits(w << 16), f32::from_bits(w & 0xFFFF_0000));
            for p in 0..kp {
                let strip = &b[p * NR..p * NR + NR];
                for (r, acc) in acc.iter_mut().enumerate().take(mr) {
                    let (a_lo, a_hi) = widen(a[p * MR + r]);
                    for (acc, &w) in acc.iter_mut().zip(strip) {
                        let (b_lo, b_hi) = widen(w);
                        // Exact products; the odd element first, as `vdpbf16ps`.
                        *acc += a_hi * b_hi;
                        *acc += a_lo * b_lo;
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate().take(mr) {
                // SAFETY: the caller's contract.
                let row = unsafe { std::slice::from_raw_parts_mut(c.add(r * ldc), nr) };
                for (c, &sum) in row.iter_mut().zip(acc) {
                    *c = if load { *c + sum } else { sum };
                }
            }
        }
    }
}

/// The AMX micro-kernel: a `32 × 32` block of `C` in four tile registers, `tdpbf16ps` over 32
/// bf16 of `k` at a time. The packed strips of `B` are already AMX's pair layout (a tile is 16
/// rows of a strip's 16 columns, the strip's 128-byte rows apart); `A` is packed as rows of pairs.
mod amx {
    /// Rows of a tile of `A` (and of `C`).
    pub(super) const ROWS: usize = 16;
    /// Pairs of `k` per `tdpbf16ps` (a tile of `A` is 16 rows of 64 bytes).
    pub(super) const PAIRS: usize = 16;

    /// Where pair `p` of row `r` of a packed tile of `A` lies: the tile is chunks of 16 pairs,
    /// each its 16 rows of 16 words in one 1 KiB run (a register's load reads consecutive lines;
    /// rows a whole slice apart would share a few L1 sets).
    pub(super) fn a_word(p: usize, r: usize) -> usize {
        p / PAIRS * (ROWS * PAIRS) + r * PAIRS + p % PAIRS
    }

    /// Whether this process may use AMX-BF16: the CPU has it and Linux granted the tile data
    /// state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, once per process).
    pub(super) fn ready() -> bool {
        static READY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *READY.get_or_init(|| {
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            {
                // `cpuid` leaf 7 exists on every x86-64 CPU that has AVX-512 (asked first).
                let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
                let (amx_bf16, amx_tile) = (edx & (1 << 22) != 0, edx & (1 << 24) != 0);
                if !(amx_bf16 && amx_tile) {
                    return false;
                }
                let status: i64;
                // SAFETY: the `arch_prctl` system call (158) with ARCH_REQ_XCOMP_PERM (0x1023)
                // and XFEATURE_XTILEDATA (18) only changes the process's permissions; `syscall`
                // clobbers rcx and r11.
                unsafe {
                    std::arch::asm!(
                        "syscall",
                        inlateout("rax") 158i64 => status,
                        in("rdi") 0x1023i64,
                        in("rsi") 18i64,
                        lateout("rcx") _,
                        lateout("r11") _,
                        options(nostack),
                    );
                }
                status == 0
            }
            #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
            false
        })
    }

    /// The tile configuration (palette 1): `tmm0`–`tmm3` the `C` tiles, `tmm4`–`tmm5` the `A`
    /// tiles, `tmm6`–`tmm7` the `B` tiles, each 16 rows of 64 bytes.
    #[cfg(target_arch = "x86_64")]
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        bytes_per_row: [u16; 16],
        rows: [u8; 16],
    }

    #[cfg(target_arch = "x86_64")]
    thread_local! {
        static CONFIGURED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Loads (`load`) or stores (`store`) the block of `C` at `$c` (an `*mut f32`, rows `$ld`
    /// floats apart) in `tmm0`/`tmm1` (rows 0..16, columns 0..16 and 16..32), and, when `$two`,
    /// `tmm2`/`tmm3` (rows 16..32). For use inside an `unsafe` block: `$c` must be valid for the
    /// rows and columns moved.
    #[cfg(target_arch = "x86_64")]
    macro_rules! c_tiles {
        (load $c:expr, $ld:expr, $two:expr) => {
            c_tiles!(@ $c, $ld, $two,
                "tileloadd tmm0, [{x} + {s} * 1]", "tileloadd tmm1, [{y} + {s} * 1]",
                "tileloadd tmm2, [{x} + {s} * 1]", "tileloadd tmm3, [{y} + {s} * 1]")
        };
        (store $c:expr, $ld:expr, $two:expr) => {
            c_tiles!(@ $c, $ld, $two,
                "tilestored [{x} + {s} * 1], tmm0", "tilestored [{y} + {s} * 1], tmm1",
                "tilestored [{x} + {s} * 1], tmm2", "tilestored [{y} + {s} * 1], tmm3")
        };
        (@ $c:expr, $ld:expr, $two:expr, $t0:literal, $t1:literal, $t2:literal, $t3:literal) => {{
            let (c, ld): (*mut f32, usize) = ($c, $ld);
            asm!($t0, $t1, x = in(reg) c, y = in(reg) c.add(16), s = in(reg) ld * 4, options(nostack));
            if $two {
                let lower = c.add(16 * ld);
                asm!($t2, $t3, x = in(reg) lower, y = in(reg) lower.add(16), s = in(reg) ld * 4, options(nostack));
            }
        }};
    }

    /// The `32 × 32` f32 block the tiles are stored into.
    #[cfg(target_arch = "x86_64")]
    #[repr(C, align(64))]
    struct Block([[f32; 32]; 32]);

    /// `C[..mr, ..nr] (+)= A·B` over `kp` pairs of `k`: `a` one (`mr ≤ 16`) or two packed tiles
    /// of 16 rows ([`a_word`]), the second `tile_words` words after the first; `b` a strip of `kp`
    /// rows of 32 words. `next` is fetched while the tiles multiply.
    ///
    /// # Safety
    /// The process must have AMX permission ([`ready`]) and the CPU AVX-512F; `kp` a multiple of
    /// [`PAIRS`]; `a` and `b` must hold what they are said to; `c` must be valid for reads and
    /// writes of `mr` rows of `nr` elements, `ldc` apart.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile(
        kp: usize,
        a: *const u32,
        tile_words: usize,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        mr: usize,
        nr: usize,
        load: bool,
        next: super::NextC,
        step: &mut impl FnMut(),
    ) {
        use std::arch::asm;
        use std::arch::x86_64::{_MM_HINT_ET0, _MM_HINT_T0, _mm_prefetch};
        if !CONFIGURED.get() {
            // Palette 1 has eight tile registers; the other entries must be zero.
            let (mut bytes_per_row, mut rows) = ([0; 16], [0; 16]);
            bytes_per_row[..8].fill(64);
            rows[..8].fill(16);
            let config = Config { palette: 1, start_row: 0, reserved: [0; 14], bytes_per_row, rows };
            // SAFETY: a valid palette-1 configuration of every tile register.
            unsafe { asm!("ldtilecfg [{0}]", in(reg) &config, options(nostack)) };
            CONFIGURED.set(true);
        }
        let (a_stride, b_stride) = (PAIRS * 4, super::NR * 4);
        // Whole tiles of `C` are loaded into and stored from the tile registers where they lie
        // (rows `ldc` apart); a block with a partial tile goes through a 4 KiB buffer instead.
        let direct = nr == 32 && (mr == ROWS || mr == 2 * ROWS);
        // SAFETY (every block below): the loads read 16 rows of 64 bytes inside `a` and `b` (the
        // caller's contract), or inside `C`'s block; the stores write `C`'s block or `out`.
        unsafe {
            if direct && load {
                c_tiles!(load c, ldc, mr > ROWS);
            } else {
                if !direct {
                    // Read and written only after the products: fetched now, for writing, its
                    // lines arrive while the tiles multiply.
                    for r in 0..mr {
                        let row = c.add(r * ldc).cast::<i8>();
                        _mm_prefetch::<_MM_HINT_ET0>(row);
                        _mm_prefetch::<_MM_HINT_ET0>(row.add(4 * nr - 4));
                    }
                }
                asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack));
            }
            // The next call's block of `C` (its tiles are loaded at its start), two rows per step
            // of `k`; rows left over when the call is short are fetched after the loop.
            let fetch = |r: usize| {
                let row = next.c.wrapping_add(r * ldc).cast::<i8>();
                _mm_prefetch::<_MM_HINT_T0>(row);
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(64));
            };
            let mut fetched = 0;
            for p0 in (0..kp).step_by(PAIRS) {
                let (a0, b0) = (a.add(a_word(p0, 0)), b.add(p0 * super::NR));
                // Rows 0..16 of the block, then (in a second asm block: the tile registers keep
                // their values between blocks) rows 16..32 against the same `B` tiles.
                asm!(
                    "tileloadd tmm6, [{b0} + {bs} * 1]",
                    "tileloadd tmm7, [{b1} + {bs} * 1]",
                    "tileloadd tmm4, [{a0} + {as_} * 1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    b0 = in(reg) b0,
                    b1 = in(reg) b0.add(16),
                    a0 = in(reg) a0,
                    bs = in(reg) b_stride,
                    as_ = in(reg) a_stride,
                    options(nostack),
                );
                if mr > ROWS {
                    asm!(
                        "tileloadd tmm5, [{a1} + {as_} * 1]",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a1 = in(reg) a0.add(tile_words),
                        as_ = in(reg) a_stride,
                        options(nostack),
                    );
                }
                step();
                if fetched + 2 <= next.rows {
                    (fetched..fetched + 2).for_each(fetch);
                    fetched += 2;
                }
            }
            (fetched..next.rows).for_each(fetch);
            if direct {
                c_tiles!(store c, ldc, mr > ROWS);
                return;
            }
            let mut out = std::mem::MaybeUninit::<Block>::uninit();
            let o = out.as_mut_ptr().cast::<f32>();
            c_tiles!(store o, 32, mr > ROWS);
            for r in 0..mr {
                let (row, block) = (std::slice::from_raw_parts_mut(c.add(r * ldc), nr), o.add(r * 32));
                for (j, c) in row.iter_mut().enumerate() {
                    let v = *block.add(j);
                    *c = if load { *c + v } else { v };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Writes the transpose of the 16 × 16 words at `src` (rows `src_stride` apart): its first
    /// `rows` rows, `dst_stride` apart.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `src` must be valid for reading 16 rows of 16 words and `dst`
    /// for writing `rows` rows of 16 words.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose16(
        src: *const u32,
        src_stride: usize,
        dst: *mut u32,
        dst_stride: usize,
        rows: usize,
    ) {
        let mut r = [_mm512_setzero_si512(); 16];
        for (i, r) in r.iter_mut().enumerate() {
            // SAFETY: the caller's contract.
            *r = unsafe { _mm512_loadu_si512(src.add(i * src_stride).cast()) };
        }
        let out = transposed(&r);
        for (p, o) in out.iter().enumerate().take(rows) {
            // SAFETY: the caller's contract.
            unsafe { _mm512_storeu_si512(dst.add(p * dst_stride).cast(), *o) };
        }
    }

    /// The transpose of sixteen vectors of sixteen words: word `j` of vector `i` becomes word `i`
    /// of vector `j`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn transposed(r: &[__m512i; 16]) -> [__m512i; 16] {
        let mut t = [_mm512_setzero_si512(); 16];
        for j in 0..8 {
            t[2 * j] = _mm512_unpacklo_epi32(r[2 * j], r[2 * j + 1]);
            t[2 * j + 1] = _mm512_unpackhi_epi32(r[2 * j], r[2 * j + 1]);
        }
        // u[4g + q]: 128-bit lane L holds element 4L + q of rows 4g..4g + 3.
        let mut u = [_mm512_setzero_si512(); 16];
        for g in 0..4 {
            u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
            u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
            u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
            u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
        }
        let mut out = [_mm512_setzero_si512(); 16];
        for q in 0..4 {
            let v0 = _mm512_shuffle_i32x4::<0x88>(u[q], u[4 + q]);
            let v1 = _mm512_shuffle_i32x4::<0xDD>(u[q], u[4 + q]);
            let w0 = _mm512_shuffle_i32x4::<0x88>(u[8 + q], u[12 + q]);
            let w1 = _mm512_shuffle_i32x4::<0xDD>(u[8 + q], u[12 + q]);
            out[q] = _mm512_shuffle_i32x4::<0x88>(v0, w0);
            out[8 + q] = _mm512_shuffle_i32x4::<0xDD>(v0, w0);
            out[4 + q] = _mm512_shuffle_i32x4::<0x88>(v1, w1);
            out[12 + q] = _mm512_shuffle_i32x4::<0xDD>(v1, w1);
        }
        out
    }

    /// The 32 weights of the Q8_0 block at `block` (f16 scale, 32 int8 codes), dequantized as
    /// [`crate::quant::BlockFormat::dequantize`] does (`code as f32 · scale`): two vectors of 16.
    ///
    /// # Safety
    /// The CPU must have AVX-512F, AVX2 and F16C; `block` must be valid for reading 34 bytes.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,f16c")]
    unsafe fn q8_0_block(block: *const u8) -> (__m512, __m512) {
        // SAFETY: the caller's contract (two bytes of scale, then 32 codes).
        unsafe {
            let scale = u16::from_le_bytes([*block, *block.add(1)]);
            let d = _mm512_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(scale)))));
            let codes = _mm256_loadu_si256(block.add(2).cast());
            let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(codes)));
            let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256::<1>(codes)));
            (_mm512_mul_ps(lo, d), _mm512_mul_ps(hi, d))
        }
    }

    /// `vcvtne2ps2bf16` (round to nearest even, as `half::bf16::from_f32`; it reads a subnormal
    /// f32 as zero, which a dequantized Q8_0 weight never is: a nonzero one is at least the
    /// smallest f16, 2⁻²⁴): `lo`'s 16 values in the low 16 bf16 lanes, `hi`'s in the high ones.
    #[inline]
    #[target_feature(enable = "avx512bf16,avx512f")]
    fn bf16x32(lo: __m512, hi: __m512) -> __m512i {
        // SAFETY: a 64-byte vector reinterpreted as another.
        unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo)) }
    }

    /// [`super::pack_b`] for Q8_0 stored rows that are columns of `B` (`x·W`): sixteen stored
    /// rows (of `nb`, `row_bytes` apart from `src`) read in step, a block of each converted into
    /// a vector of sixteen words (bf16 pairs along `k`), the sixteen vectors transposed in
    /// registers into sixteen rows of a strip of `packed`.
    ///
    /// # Safety
    /// The CPU must have AVX512-BF16, AVX512F and AVX512BW; `kc ≤ KC` a multiple of 32,
    /// `nb ≤ NB`; `src` valid for reading the `kc/32` blocks of `nb` rows (each row has
    /// `row_blocks ≥ kc/32` from `src`, the rest only prefetched), `packed` for
    /// `kc/2 · ⌈nb/NR⌉·NR` words.
    #[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl,avx2,f16c")]
    pub(super) unsafe fn pack_q8_0_columns(
        src: *const u8,
        row_bytes: usize,
        kc: usize,
        row_blocks: usize,
        nb: usize,
        packed: *mut u32,
    ) {
        // Blocks ahead of the conversion that each row's prefetch reaches (about one line).
        const AHEAD: usize = 4;
        let kp = kc / 2;
        let blocks = kc / 32;
        for first in (0..nb).step_by(16) {
            let columns = 16.min(nb - first);
            let base = first / super::NR * (kp * super::NR) + first % super::NR;
            for blk in 0..blocks {
                let mut r = [_mm512_setzero_si512(); 16];
                for (ci, r) in r.iter_mut().enumerate().take(columns) {
                    // SAFETY: the caller's contract: block `blk` of row `first + ci < nb` is
                    // inside `src`; a prefetch (inside the row's blocks) has no other effect.
                    unsafe {
                        let row = src.add((first + ci) * row_bytes);
                        if blk + AHEAD < row_blocks {
                            _mm_prefetch::<_MM_HINT_T0>(row.add((blk + AHEAD) * 34).cast());
                        }
                        let (lo, hi) = q8_0_block(row.add(blk * 34));
                        *r = bf16x32(lo, hi);
                    }
                }
                let out = transposed(&r);
                for (i, o) in out.iter().enumerate() {
                    // SAFETY: row `16·blk + i < kp` of this strip, sixteen words from column
                    // `first % NR`, inside `packed` (the caller's contract).
                    unsafe { _mm512_storeu_si512(packed.add(base + (blk * 16 + i) * super::NR).cast(), *o) };
                }
            }
        }
    }

    /// [`super::pack_b`] for Q8_0 stored rows that are rows of `B` (`dY·Wᵀ`): rows `2p` and
    /// `2p + 1` (of `kc`, `row_bytes` apart from `src`) interleaved, 32 columns (one block of
    /// each) into one row of a strip of `packed`.
    ///
    /// # Safety
    /// The CPU must have AVX512-BF16, AVX512F and AVX512BW; `kc ≤ KC` (an odd `kc`'s last
    /// pair takes zeros for its odd row), `nb ≤ NB` a multiple of 32; `src` valid for reading
    /// the blocks of `kc` rows (of `rows ≥ kc` from `src`, the rest only prefetched) and `packed`
    /// for `⌈kc/2⌉ · nb` words.
    #[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl,avx2,f16c")]
    pub(super) unsafe fn pack_q8_0_rows(
        src: *const u8,
        row_bytes: usize,
        kc: usize,
        rows: usize,
        nb: usize,
        packed: *mut u32,
    ) {
        // Rows ahead of the pair being converted that are prefetched.
        const AHEAD: usize = 32;
        let kp = kc.div_ceil(2);
        let blocks = nb / 32;
        // bf16 lane 2i takes lane i (the even row's column i), lane 2i + 1 lane 16 + i (the odd's).
        let mut order = [0i16; 32];
        for (i, o) in order.iter_mut().enumerate() {
            *o = (i / 2 + (i % 2) * 16) as i16;
        }
        // SAFETY: 64 bytes read from a 64-byte array.
        let order = unsafe { _mm512_loadu_si512(order.as_ptr().cast()) };
        for p in 0..kp {
            let has_odd = 2 * p + 1 < kc;
            // SAFETY: the caller's contract: rows `2p` and (when `has_odd`) `2p + 1`, both
            // below `kc`, and their `blocks` blocks are inside `src`; word `(p, 32·blk + i)`
            // of `packed` is inside it.
            unsafe {
                let even = src.add(2 * p * row_bytes);
                if 2 * p + AHEAD + 1 < rows {
                    for ahead in [even.add(AHEAD * row_bytes), even.add((AHEAD + 1) * row_bytes)] {
                        for at in (0..blocks * 34).step_by(64).chain([blocks * 34 - 1]) {
                            _mm_prefetch::<_MM_HINT_T0>(ahead.add(at).cast());
                        }
                    }
                }
                for blk in 0..blocks {
                    let (e_lo, e_hi) = q8_0_block(even.add(blk * 34));
                    let (o_lo, o_hi) = if has_odd {
                        q8_0_block(even.add(row_bytes + blk * 34))
                    } else {
                        (_mm512_setzero_ps(), _mm512_setzero_ps())
                    };
                    let w_lo = _mm512_permutexvar_epi16(order, bf16x32(e_lo, o_lo));
                    let w_hi = _mm512_permutexvar_epi16(order, bf16x32(e_hi, o_hi));
                    let dst = packed.add(blk * (kp * super::NR) + p * super::NR);
                    _mm512_storeu_si512(dst.cast(), w_lo);
                    _mm512_storeu_si512(dst.add(16).cast(), w_hi);
                }
            }
        }
    }

    /// The AVX512-BF16 micro-kernel: `MR` rows × 32 columns of `C` in `2·MR` accumulators.
    ///
    /// # Safety
    /// The CPU must have AVX512-BF16, AVX512F and AVX512BW. `a` must hold `kp` groups of
    /// [`super::MR`] words, `b` `kp` rows of 32 words; `c` must be valid for reads (when `load`)
    /// and writes of `ROWS` rows of `nr ≤ 32` elements, `ldc` apart.
    #[target_feature(enable = "avx512bf16,avx512f,avx512bw")]
    pub(super) unsafe fn tile<const ROWS: usize>(
        kp: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        nr: usize,
        load: bool,
    ) {
        let lo: __mmask16 = if nr >= 16 { 0xFFFF } else { (1u16 << nr) - 1 };
        let hi: __mmask16 = if nr >= 32 {
            0xFFFF
        } else if nr > 16 {
            (1u16 << (nr - 16)) - 1
        } else {
            0
        };
        // The accumulators start at zero and the old tile is added at the end: its rows (often
        // out of L1: rows `ldc` apart) are fetched meanwhile instead of stalling the first products.
        let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
        if load {
            for r in 0..ROWS {
                // SAFETY: a prefetch has no other effect; the addresses are the tile's own.
                unsafe {
                    _mm_prefetch::<_MM_HINT_T0>(c.add(r * ldc).cast());
                    _mm_prefetch::<_MM_HINT_T0>(c.add(r * ldc + 16).cast());
                }
            }
        }
        for p in 0..kp {
            // SAFETY: row `p` of `b` holds 32 words and group `p` of `a` `MR ≥ ROWS` words (the
            // caller's contract).
            unsafe {
                let row = b.add(p * 32);
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(row.cast()));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(row.add(16).cast()));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(p * super::MR + r) as i32));
                    acc[0] = _mm512_dpbf16_ps(acc[0], x, b0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], x, b1);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            // SAFETY: the caller's contract; masked-off lanes are neither read nor written.
            unsafe {
                let (mut lo_sum, mut hi_sum) = (acc[0], acc[1]);
                if load {
                    lo_sum = _mm512_add_ps(_mm512_maskz_loadu_ps(lo, c.add(r * ldc)), lo_sum);
                    hi_sum = _mm512_add_ps(_mm512_maskz_loadu_ps(hi, c.add(r * ldc + 16)), hi_sum);
                }
                _mm512_mask_storeu_ps(c.add(r * ldc), lo, lo_sum);
                _mm512_mask_storeu_ps(c.add(r * ldc + 16), hi, hi_sum);
            }
        }
    }
}
