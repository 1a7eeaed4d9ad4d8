//! Process-wide settings for speed and memory: rayon's pool (threads flushing subnormal floats
//! to zero), the precision of the CPU convolutions (f32 or bf16, and which bf16 kernel), how
//! much padded input a CPU convolution builds at once, and the process's peak memory.
//!
//! Training produces tiny gradients (the BCE gradient of well-classified voxels, divided by
//! the voxel count, shrinks layer after layer). Once they fall below f32's normal range
//! (1.2e-38) x86 cores handle every operation on them with a microcode assist that is tens of
//! times slower, and whole matrix products slow down. With flush-to-zero (FTZ) and
//! denormals-are-zero (DAZ) such values become 0, a change far below any tolerance we test.

/// Sets FTZ and DAZ on the calling thread (x86-64; a no-op elsewhere).
pub fn flush_denormals() {
    #[cfg(target_arch = "x86_64")]
    {
        #[allow(deprecated)]
        // SAFETY: only the FTZ (bit 15) and DAZ (bit 6) flags of MXCSR change; SSE is
        // always present on x86-64.
        unsafe {
            use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
            _mm_setcsr(_mm_getcsr() | 0x8040);
        }
    }
}

/// Builds rayon's global pool with `threads` workers (default: all cores), each flushing
/// denormals, and flushes them on the calling thread too. Call it once, early; later calls
/// only affect the calling thread.
pub fn init_threads(threads: Option<usize>) {
    flush_denormals();
    let mut b = rayon::ThreadPoolBuilder::new().start_handler(|_| flush_denormals());
    if let Some(n) = threads {
        b = b.num_threads(n.max(1));
    }
    let _ = b.build_global();
}

/// The peak resident memory of this process so far, in bytes (`VmHWM` of `/proc/self/status`;
/// `None` where that is not available, as off Linux).
pub fn peak_resident_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets the peak resident memory that [`peak_resident_bytes`] reports to the memory resident
/// now (Linux: `5` written to `/proc/self/clear_refs`), so that the peak of one piece of work
/// (a case of a cohort) can be measured in a process that did other work before. `false` where
/// the system does not allow it; the peak then stays the process's.
pub fn reset_peak_resident() -> bool {
    std::fs::write("/proc/self/clear_refs", b"5").is_ok()
}

/// Memory of a GPU ([`gpu_memory`]), in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuMemory {
    /// The high-water mark of the device's stream-ordered memory pool since the last
    /// [`reset_gpu_peak`] (candle's tensors, cuDNN workspaces; not cuBLAS's own workspace or
    /// the CUDA context).
    pub pool_peak_bytes: u64,
    /// What the pool holds now.
    pub pool_in_use_bytes: u64,
    /// The device's used memory now, every process and the contexts included.
    pub device_used_bytes: u64,
    /// The device's memory.
    pub device_total_bytes: u64,
}

/// The memory figures of a CUDA device, after its queued work has finished; `None` on the
/// CPU, without the `cuda` feature, or when the driver does not report them.
pub fn gpu_memory(device: &candle_core::Device) -> Option<GpuMemory> {
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(d) => crate::cuda::memory::memory(d),
        _ => None,
    }
}

/// Resets the high-water mark that [`GpuMemory::pool_peak_bytes`] reports to the pool's
/// current use; `false` where there is none (see [`gpu_memory`]).
pub fn reset_gpu_peak(device: &candle_core::Device) -> bool {
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(d) => crate::cuda::memory::reset_peak(d),
        _ => false,
    }
}

pub use crate::cpu::bf16::{
    Bf16Kernel, Precision, active_bf16_kernel, avx512bf16_speedup, best_bf16_kernel,
    bf16_fallback_reason, set_bf16_kernel, set_precision,
};
pub use crate::cpu::correlate::{DEFAULT_SLAB_BYTES, set_slab_bytes};

/// The dtype of convolution operands on a GPU: 0 f32, 1 bf16, 2 f16.
static GPU_CONV_DTYPE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Sets the dtype in which convolutions on a CUDA device take their operands (process-wide),
/// autocast-style: the tensors stay in their own dtype (f32 weights and activations) and each
/// convolution casts its input and weight, runs in `dtype` with f32 accumulation, and casts
/// its result back. `F32` (the default) keeps true f32 products (no TF32).
///
/// # Errors
/// A dtype other than f32, bf16 or f16.
pub fn set_gpu_conv_dtype(dtype: candle_core::DType) -> crate::Result<()> {
    use candle_core::DType;
    let code = match dtype {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
        other => {
            return Err(crate::Error::Config(format!(
                "GPU convolutions run in f32, bf16 or f16, not {other:?}"
            )));
        }
    };
    GPU_CONV_DTYPE.store(code, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// The dtype set by [`set_gpu_conv_dtype`].
pub fn gpu_conv_dtype() -> candle_core::DType {
    match GPU_CONV_DTYPE.load(std::sync::atomic::Ordering::Relaxed) {
        1 => candle_core::DType::BF16,
        2 => candle_core::DType::F16,
        _ => candle_core::DType::F32,
    }
}
pub use crate::cpu::winograd::{set_winograd, winograd_enabled};

/// mimalloc, the allocator the univ binaries and benchmarks install as the global allocator
/// (`#[global_allocator] static A: MiMalloc = MiMalloc;`), with [`keep_freed_memory`].
#[cfg(feature = "mimalloc")]
pub use mimalloc::MiMalloc;

/// Tells mimalloc to keep freed memory mapped (its `purge_delay` option set to −1): every
/// window allocates and frees the same large buffers, and returning them to the operating
/// system would make each new window fault in (and zero) fresh pages. Call it first thing in
/// `main` of a program whose global allocator is [`MiMalloc`].
#[cfg(feature = "mimalloc")]
pub fn keep_freed_memory() {
    /// mimalloc's option number for `purge_delay` (see mimalloc.h).
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: setting an option is thread-safe and valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

static PROFILING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

type Totals = std::collections::BTreeMap<&'static str, (f64, u64)>;

fn profile_totals() -> &'static std::sync::Mutex<Totals> {
    static TOTALS: std::sync::OnceLock<std::sync::Mutex<Totals>> = std::sync::OnceLock::new();
    TOTALS.get_or_init(Default::default)
}

/// Turns the stage profile on or off (off by default; process-wide). While on, the stages of
/// the networks that are timed (see [`profile`]) add their wall-clock time to named totals.
pub fn set_profiling(on: bool) {
    PROFILING.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// The stage profile so far: `(stage, seconds, calls)` sorted by name. Stages nest (their names
/// say how: `swin/block/attention/qkv` is inside `swin/block/attention`), so a stage's time
/// includes its children's. Timed: the U-Net's convolutions, norms, pooling and up-sampling,
/// the Swin UNETR's transformer and residual blocks, the CPU convolutions' padding and
/// products, the norms' two passes, and the text-driven head.
pub fn profile() -> Vec<(&'static str, f64, u64)> {
    let totals = profile_totals().lock().unwrap_or_else(|e| e.into_inner());
    totals.iter().map(|(k, (s, n))| (*k, *s, *n)).collect()
}

/// Clears the stage profile.
pub fn reset_profile() {
    profile_totals()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
}

/// Times a stage until dropped (nothing when profiling is off).
pub(crate) struct Stage {
    name: &'static str,
    start: std::time::Instant,
}

/// Starts timing `name` when profiling is on.
pub(crate) fn stage(name: &'static str) -> Option<Stage> {
    PROFILING
        .load(std::sync::atomic::Ordering::Relaxed)
        .then(|| Stage {
            name,
            start: std::time::Instant::now(),
        })
}

impl Drop for Stage {
    fn drop(&mut self) {
        let s = self.start.elapsed().as_secs_f64();
        let mut totals = profile_totals().lock().unwrap_or_else(|e| e.into_inner());
        let e = totals.entry(self.name).or_insert((0.0, 0));
        e.0 += s;
        e.1 += 1;
    }
}
