//! Allocator settings for training on the CPU.
//!
//! Every op output is a fresh buffer of up to hundreds of MB. glibc's malloc serves anything
//! above 128 KiB–32 MiB with a new `mmap` and returns it with `munmap` on free, so each step
//! page-faults every activation in again and pays a TLB shoot-down on every free: on a 2-core
//! machine that was about 35% of an IResNet-18 training step (kernel time in a `perf` profile).
//! Keeping large blocks in the heap lets freed activations be reused by the next step.

/// Makes glibc's malloc keep large blocks in the heap instead of `mmap`/`munmap`-ing each one
/// (`mallopt(M_MMAP_THRESHOLD, 1 GiB)` and `mallopt(M_TRIM_THRESHOLD, 1 GiB)`; the same as
/// `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824`).
/// Process-wide: call it once at the start of `main`, before the first large allocation.
/// Returns whether the settings were applied (false on other platforms and allocators, where
/// it does nothing).
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const ONE_GIB: libc::c_int = 1 << 30;
        // SAFETY: mallopt only changes malloc's parameters; it is safe to call at any time.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, ONE_GIB) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, ONE_GIB) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
