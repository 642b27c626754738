//! The process's memory allocator: keeping freed tensor buffers in the process instead of handing
//! them back to the kernel ([`keep_freed_memory`]), and counting allocations for the benchmarks
//! ([`CountingAllocator`]).
//!
//! Why keep freed memory: glibc's `malloc` serves large blocks (from 128 KiB, a threshold it raises as blocks are freed,
//! up to 32 MiB) with `mmap` and returns freed memory above the heap top to the kernel. A training
//! step allocates and frees multi-megabyte activations and gradients every time, so each step
//! faulted in and zeroed fresh pages, which cost more than the arithmetic on large activations
//! (docs/bench/history.md has the measurements). With `mmap` off and trimming off, every block comes from the heap and
//! stays there for reuse; the peak memory is unchanged, only its release to the kernel is deferred.

/// Turns off glibc's `mmap` allocations (`M_MMAP_MAX` 0) and its heap trimming (`M_TRIM_THRESHOLD`
/// at its maximum). Call it once at the start of `main`, before any tensor is allocated. Does
/// nothing on other platforms and C libraries.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator parameters; it is called before other threads exist
    // and with values glibc documents. glibc still falls back to `mmap` when the heap cannot grow.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicU64, Ordering::Relaxed};

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static ALLOCATED_BYTES: AtomicU64 = AtomicU64::new(0);
// Signed: blocks allocated before counting started are freed while it runs.
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);
static PEAK_LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

/// The system allocator, able to count what goes through it: allocations, bytes allocated, and
/// the peak of live bytes. Install it with `#[global_allocator]` (as `tpeft` does); counting starts
/// with the first [`count_allocations`], which `tpeft bench` runs around one step of each variant.
///
/// Cost: one relaxed load of a flag per allocation and free until counting starts; then three
/// relaxed atomic updates per allocation and one per free (a SmolLM2 training step makes about
/// 45,000 allocations).
#[derive(Debug, Clone, Copy, Default)]
pub struct CountingAllocator;

impl CountingAllocator {
    fn record_alloc(size: usize) {
        if COUNTING.load(Relaxed) {
            ALLOCATIONS.fetch_add(1, Relaxed);
            ALLOCATED_BYTES.fetch_add(size as u64, Relaxed);
            let live = LIVE_BYTES.fetch_add(size as isize, Relaxed) + size as isize;
            PEAK_LIVE_BYTES.fetch_max(live, Relaxed);
        }
    }

    fn record_free(size: usize) {
        if COUNTING.load(Relaxed) {
            LIVE_BYTES.fetch_sub(size as isize, Relaxed);
        }
    }
}

// SAFETY: every call is forwarded to `System` unchanged; the counters do not touch the memory.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            Self::record_alloc(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            Self::record_alloc(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) };
        Self::record_free(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            // Counted as the old block freed and a new one allocated.
            Self::record_free(layout.size());
            Self::record_alloc(new_size);
        }
        new
    }
}

/// What a piece of work allocated ([`count_allocations`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocationDelta {
    /// Allocations made (a `realloc` counts as one).
    pub allocations: u64,
    /// Bytes requested by them.
    pub allocated_bytes: u64,
    /// How far the live heap rose above its size at the start, at its peak: the memory the work
    /// needed beyond what it started with (0 when it only freed).
    pub peak_extra_bytes: u64,
}

/// Runs `work` and returns its result with what it allocated, or `None` when
/// [`CountingAllocator`] is not the global allocator. Allocations of other threads in the meantime
/// count too: rayon's workers run parts of `work`, and nothing else should run during a measurement.
pub fn count_allocations<T>(work: impl FnOnce() -> T) -> (T, Option<AllocationDelta>) {
    COUNTING.store(true, Relaxed);
    // An allocation of our own tells whether the counters see allocations at all.
    let probe = ALLOCATIONS.load(Relaxed);
    drop(std::hint::black_box(Box::new(0u64)));
    let installed = ALLOCATIONS.load(Relaxed) > probe;
    let live = LIVE_BYTES.load(Relaxed);
    PEAK_LIVE_BYTES.store(live, Relaxed);
    let (allocations, bytes) = (ALLOCATIONS.load(Relaxed), ALLOCATED_BYTES.load(Relaxed));
    let out = work();
    let delta = AllocationDelta {
        allocations: ALLOCATIONS.load(Relaxed) - allocations,
        allocated_bytes: ALLOCATED_BYTES.load(Relaxed) - bytes,
        peak_extra_bytes: (PEAK_LIVE_BYTES.load(Relaxed) - live).max(0) as u64,
    };
    (out, installed.then_some(delta))
}
