//! Process settings for training on the CPU: the allocator and candle's thread pool.
//!
//! Every op output is a fresh buffer of up to hundreds of MB. glibc's malloc serves anything
//! above 128 KiB–32 MiB with a new `mmap` and returns it with `munmap` on free, so each step
//! page-faults every activation in again and pays a TLB shoot-down on every free: on a 2-core
//! machine that was about 35% of an IResNet-18 training step (kernel time in a `perf` profile).
//! Keeping large blocks in the heap lets freed activations be reused by the next step.
//!
//! candle's element-wise ops run on its own "barrier pool", whose workers spin 25 000 times
//! after every op before they sleep. The kernels of this crate run on rayon's pool, so on a
//! 2-core machine that spinning worker takes a core from them: the narrow default IResNet
//! trained 1.27x faster (median of 5 runs) with the spinning off.

/// Environment variable read by candle 0.11 when it starts its barrier pool.
const CANDLE_SPIN: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// [`tune_allocator`], and candle's barrier-pool workers sleep right after each op instead of
/// spinning (`CANDLE_BARRIER_POOL_SPIN_LIMIT=0`, unless that variable is already set).
/// Process-wide: call it first thing in `main`, before any thread or tensor exists (it sets an
/// environment variable). Returns what [`tune_allocator`] returns.
pub fn tune_cpu_runtime() -> bool {
    if std::env::var_os(CANDLE_SPIN).is_none() {
        std::env::set_var(CANDLE_SPIN, "0");
    }
    tune_allocator()
}

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
