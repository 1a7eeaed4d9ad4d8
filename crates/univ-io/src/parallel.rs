//! The slab-parallel loop of the transforms, on rayon's global pool (the one the rest of univ
//! uses; its size is set once by the program, `univ --threads` for the command line).

use rayon::prelude::*;

/// Splits `out` into consecutive slabs of `slab_len` elements and calls `f(slab_index, slab)`
/// for each, in parallel.
pub(crate) fn for_each_slab<T: Send>(
    out: &mut [T],
    slab_len: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    if out.is_empty() || slab_len == 0 {
        return;
    }
    out.par_chunks_mut(slab_len)
        .enumerate()
        .for_each(|(i, s)| f(i, s));
}
