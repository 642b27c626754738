//! Keeps freed tensor buffers in the process instead of handing them back to the kernel.
//!
//! glibc's `malloc` serves large blocks (from 128 KiB, a threshold it raises as blocks are freed)
//! with `mmap` and returns freed memory above the heap top to the kernel. A training step allocates
//! and frees multi-megabyte activations and gradients every time, so each step faulted in and zeroed
//! fresh pages: one adapted 1024×1024 layer on 2,048 rows took 150–162 ms instead of 94 ms
//! (BENCHMARKS.md §1). Fixing the thresholds makes blocks up to 32 MiB come from the heap and stay
//! there for reuse; the peak memory is unchanged, only its release to the kernel is deferred.

/// Sets glibc's `M_MMAP_THRESHOLD` to 32 MiB and turns off heap trimming. Call it once at the start
/// of `main`, before any tensor is allocated. Does nothing on other platforms and C libraries.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator parameters; it is called before other threads exist
    // and with values glibc documents (the mmap threshold's maximum on 64-bit is 32 MiB).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
