//! A tiny slab-parallel loop on scoped threads (no thread pool dependency).

/// Number of worker threads: `UNIV_NUM_THREADS` if set to a positive integer, else the
/// machine's available parallelism.
pub fn num_threads() -> usize {
    std::env::var("UNIV_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Splits `out` into consecutive slabs of `slab_len` elements and calls `f(slab_index, slab)`
/// for each, spreading contiguous runs of slabs over the worker threads.
pub(crate) fn for_each_slab<T: Send>(
    out: &mut [T],
    slab_len: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    if out.is_empty() || slab_len == 0 {
        return;
    }
    let nslabs = out.len().div_ceil(slab_len);
    let threads = num_threads().min(nslabs).max(1);
    if threads == 1 {
        for (i, s) in out.chunks_mut(slab_len).enumerate() {
            f(i, s);
        }
        return;
    }
    let per = nslabs.div_ceil(threads);
    std::thread::scope(|scope| {
        for (t, chunk) in out.chunks_mut(per * slab_len).enumerate() {
            let f = &f;
            scope.spawn(move || {
                for (k, s) in chunk.chunks_mut(slab_len).enumerate() {
                    f(t * per + k, s);
                }
            });
        }
    });
}
