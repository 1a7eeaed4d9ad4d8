//! Packed bf16 convolution weights kept from one call to the next while a [`PackScope`] is
//! open (a sliding window runs the same layers on every window, and packing a U-Net's weights
//! for the bf16 kernels took 6–8 % of each window).
//!
//! Entries are found by the weights' content (a 128-bit fingerprint of every value, the
//! shapes and the layout asked for), not by address or tensor identity: weights that change
//! between calls (a training step) or a temporary buffer that reuses a freed address find
//! nothing and are packed afresh. Everything is dropped when the last scope closes, so the
//! memory is held only while a sliding window runs. Without an open scope nothing is kept.

use std::any::Any;
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

/// What identifies one packing: the fingerprint of the source values, what they are (layout
/// tag, kernel, variant) and the shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PackKey {
    fingerprint: u128,
    what: [usize; 8],
}

impl PackKey {
    /// The key of packing `values` into the variant described by `what` (tags and shapes:
    /// anything that changes the packed result besides the values).
    pub(crate) fn new(values: &[f32], what: [usize; 7]) -> Self {
        let mut all = [0; 8];
        all[..7].copy_from_slice(&what);
        all[7] = values.len();
        PackKey {
            fingerprint: fingerprint(values),
            what: all,
        }
    }
}

type Entry = (PackKey, Arc<dyn Any + Send + Sync>);

struct State {
    scopes: usize,
    entries: Vec<Entry>,
}

static STATE: Mutex<State> = Mutex::new(State {
    scopes: 0,
    entries: Vec::new(),
});

fn state() -> std::sync::MutexGuard<'static, State> {
    // The state stays consistent whatever a panicking holder did (a push or a clear).
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// While alive, packed weights are kept for later calls (scopes nest; the entries go when the
/// last one closes). Made by [`crate::runtime::keep_packed_weights`].
#[must_use = "the packed weights are kept only while the scope is alive"]
pub struct PackScope(());

impl PackScope {
    pub(crate) fn open() -> Self {
        state().scopes += 1;
        PackScope(())
    }
}

impl Drop for PackScope {
    fn drop(&mut self) {
        let dropped = {
            let mut s = state();
            s.scopes -= 1;
            if s.scopes == 0 {
                std::mem::take(&mut s.entries)
            } else {
                Vec::new()
            }
        };
        drop(dropped);
    }
}

/// The packing `key()` names: from the cache while a scope is open (made by `make` and kept
/// on a miss), else made afresh.
pub(crate) fn get_or_make<T: Send + Sync + 'static>(
    key: impl FnOnce() -> PackKey,
    make: impl FnOnce() -> T,
) -> Arc<T> {
    if state().scopes == 0 {
        return Arc::new(make());
    }
    let key = key();
    let found = state()
        .entries
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| Arc::clone(v));
    if let Some(v) = found.and_then(|v| v.downcast::<T>().ok()) {
        return v;
    }
    let made = Arc::new(make());
    let mut s = state();
    if s.scopes > 0 && !s.entries.iter().any(|(k, _)| *k == key) {
        s.entries.push((key, made.clone()));
    }
    made
}

/// How many packings are kept now.
#[cfg(test)]
pub(crate) fn len() -> usize {
    state().entries.len()
}

/// A 128-bit fingerprint of `values`' bits: chunks hashed in parallel (four independent
/// multiply-rotate lanes each, two 64-bit finishes), combined in order. Not cryptographic: it
/// only has to tell different weights apart, which it does unless two layers' weights collide
/// by chance (about 2⁻¹²⁸).
fn fingerprint(values: &[f32]) -> u128 {
    const CHUNK: usize = 1 << 16;
    values
        .par_chunks(CHUNK)
        .map(hash_chunk)
        .collect::<Vec<_>>()
        .into_iter()
        .fold(0x9e37_79b9_7f4a_7c15_u128, |acc, h| {
            let (a, b) = ((acc >> 64) as u64, acc as u64);
            let a = fmix(a ^ (h >> 64) as u64).wrapping_add(b.rotate_left(17));
            let b = fmix(b ^ h as u64 ^ 0xc2b2_ae3d_27d4_eb4f).wrapping_add(a);
            ((a as u128) << 64) | b as u128
        })
}

fn hash_chunk(values: &[f32]) -> u128 {
    const K: [u64; 4] = [
        0x9e37_79b9_7f4a_7c15,
        0xc2b2_ae3d_27d4_eb4f,
        0x1656_67b1_9e37_79f9,
        0x27d4_eb2f_1656_67c5,
    ];
    let mut lanes = [1u64, 2, 3, 4];
    let mut words = values.chunks_exact(4);
    for w in &mut words {
        for i in 0..4 {
            let v = w[i].to_bits() as u64 | ((i as u64) << 32);
            lanes[i] = (lanes[i] ^ v).wrapping_mul(K[i]).rotate_left(29);
        }
    }
    for (i, v) in words.remainder().iter().enumerate() {
        lanes[i] = (lanes[i] ^ (v.to_bits() as u64 | 1 << 40))
            .wrapping_mul(K[i])
            .rotate_left(29);
    }
    let n = values.len() as u64;
    let a = fmix(lanes[0] ^ fmix(lanes[1]) ^ n);
    let b = fmix(lanes[2].wrapping_add(fmix(lanes[3])) ^ n.rotate_left(32));
    ((a as u128) << 64) | b as u128
}

/// MurmurHash3's 64-bit finaliser.
fn fmix(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_tell_values_order_and_length_apart() {
        let a: Vec<f32> = (0..200_001).map(|i| (i as f32 * 0.37).sin()).collect();
        let fa = fingerprint(&a);
        assert_eq!(fa, fingerprint(&a.clone()));
        let mut b = a.clone();
        b[123_456] = f32::from_bits(b[123_456].to_bits() ^ 1);
        assert_ne!(fa, fingerprint(&b), "one bit");
        let mut c = a.clone();
        c.swap(10, 11);
        assert_ne!(fa, fingerprint(&c), "order");
        assert_ne!(fa, fingerprint(&a[..200_000]), "length");
        assert_ne!(fingerprint(&[0.0]), fingerprint(&[-0.0]), "signed zeros");
    }

    #[test]
    fn a_scope_keeps_one_packing_per_key() {
        let v: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        let mut w = v.clone();
        w[999] = 0.5;
        let scope = PackScope::open();
        let a = get_or_make(|| PackKey::new(&v, [1; 7]), || vec![1u8]);
        let again = get_or_make(
            || PackKey::new(&v, [1; 7]),
            || -> Vec<u8> { panic!("kept") },
        );
        assert!(Arc::ptr_eq(&a, &again));
        let other = get_or_make(|| PackKey::new(&w, [1; 7]), || vec![2u8]);
        let variant = get_or_make(|| PackKey::new(&v, [2; 7]), || vec![3u8]);
        assert_eq!((other[0], variant[0]), (2, 3));
        assert!(len() >= 3);
        drop(scope);
    }
}
