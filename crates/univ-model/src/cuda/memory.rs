//! Device memory of a CUDA GPU as the driver reports it: the high-water mark of the device's
//! stream-ordered memory pool (where candle's tensors and our cuDNN workspaces are allocated)
//! and the device-wide use.

use candle_core::CudaDevice;
use candle_core::cuda::cudarc::driver::{result, sys};

use crate::runtime::GpuMemory;

fn pool(dev: &CudaDevice) -> Result<sys::CUmemoryPool, result::DriverError> {
    let ctx = dev.cuda_stream().context().clone();
    ctx.bind_to_thread()?;
    // SAFETY: the device handle comes from a live context.
    unsafe { result::device::get_default_mem_pool(ctx.cu_device()) }
}

/// The pool's high-water mark and current use, and the device's used and total memory, after
/// the device's queued work has finished.
pub(crate) fn memory(dev: &CudaDevice) -> Option<GpuMemory> {
    dev.cuda_stream().synchronize().ok()?;
    let pool = pool(dev).ok()?;
    let attr = |a: sys::CUmemPool_attribute| -> Option<u64> {
        let mut v: u64 = 0;
        // SAFETY: both attributes are 64-bit counters; `v` outlives the call.
        unsafe { result::mem_pool::get_attribute(pool, a, (&mut v as *mut u64).cast()) }.ok()?;
        Some(v)
    };
    let peak = attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?;
    let current = attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?;
    let (free, total) = result::mem_get_info().ok()?;
    Some(GpuMemory {
        pool_peak_bytes: peak,
        pool_in_use_bytes: current,
        device_used_bytes: (total - free) as u64,
        device_total_bytes: total as u64,
    })
}

/// Resets the pool's high-water mark to its current use.
pub(crate) fn reset_peak(dev: &CudaDevice) -> bool {
    let Ok(pool) = pool(dev) else { return false };
    let mut zero: u64 = 0;
    // SAFETY: setting USED_MEM_HIGH takes a 64-bit zero, which resets the mark.
    unsafe {
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut zero as *mut u64).cast(),
        )
    }
    .is_ok()
}
