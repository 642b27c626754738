//! Keeps freed tensor buffers in the process instead of handing them back to the kernel.
//!
//! glibc's `malloc` serves large blocks (from 128 KiB, a threshold it raises as blocks are freed,
//! up to 32 MiB) with `mmap` and returns freed memory above the heap top to the kernel. A training
//! step allocates and frees multi-megabyte activations and gradients every time, so each step
//! faulted in and zeroed fresh pages: one adapted 1024×1024 layer on 2,048 rows took 150–162 ms
//! instead of 94 ms, and an element-wise op on SmolLM2's 50 MB logits took 18 ms instead of 4.5 ms
//! (BENCHMARKS.md §1, §5). With `mmap` off and trimming off, every block comes from the heap and
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
