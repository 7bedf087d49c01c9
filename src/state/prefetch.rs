//! Asking the CPU to start loading memory into its cache without waiting for it.
//!
//! A changelog checkpoint encodes customers changed up to a commit interval earlier, long
//! gone from the cache: encoding a state cold takes about a microsecond, warm about a fifth
//! of that (`restore/encode_100k_customers_cold` against `restore/encode_100k_customers` in
//! `benches/engine.rs`), and most of the difference is waiting for memory, one pointer
//! after another (the map's slot, the state, its vectors). Asking for the next customers'
//! memory while one is encoded overlaps those waits: the checkpoints someone waits for do
//! (`CustomerStore::with_prefetch`).

/// The cache line size of the machines this runs on (x86-64 and most ARM cores).
const LINE: usize = 64;

/// Starts loading the cache lines of `value` (its own bytes, not what it points to).
pub fn value<T>(value: &T) {
    bytes(std::ptr::from_ref(value).cast(), size_of::<T>());
}

/// Starts loading the cache lines of the elements of `items` (not what they point to).
pub fn slice<T>(items: &[T]) {
    bytes(items.as_ptr().cast(), size_of_val(items));
}

/// Starts loading the cache lines from `start` for `len` bytes (at most a few lines are
/// asked for: enough for a state or a vector's first elements).
fn bytes(start: *const u8, len: usize) {
    const MOST: usize = 8 * LINE;
    let mut offset = 0;
    while offset < len.min(MOST) {
        line(start.wrapping_add(offset));
        offset += LINE;
    }
}

#[cfg(target_arch = "x86_64")]
fn line(address: *const u8) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    // SAFETY: a prefetch is a hint: it never faults and reads nothing into the program,
    // whatever the address. SSE, which it needs, is part of every x86-64 CPU.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(address.cast()) }
}

#[cfg(not(target_arch = "x86_64"))]
fn line(_address: *const u8) {}
