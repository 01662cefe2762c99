//! Atomic read-modify-write on map values that every CPU changes (live
//! connections, failure streaks, consumer counts), as C programs do with
//! `__sync_fetch_and_add`. core's atomic types lack read-modify-write
//! methods on the BPF target, so the BPF build uses the compiler's atomic
//! intrinsics (LLVM emits BPF atomic instructions); a host build (clippy,
//! unit tests) uses core's atomic types, which it has.

/// Adds `v` to `*p`.
///
/// # Safety
/// `p` must point at a live, 8-byte aligned `u64` (a map value field).
#[inline(always)]
pub unsafe fn add_u64(p: *mut u64, v: u64) {
    #[cfg(target_arch = "bpf")]
    // SAFETY: the caller's contract.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            p, v,
        );
    }
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: the caller's contract.
    unsafe {
        core::sync::atomic::AtomicU64::from_ptr(p)
            .fetch_add(v, core::sync::atomic::Ordering::Relaxed);
    }
}

/// Adds `v` to `*p`.
///
/// # Safety
/// `p` must point at a live, 4-byte aligned `u32` (a map value field).
#[inline(always)]
pub unsafe fn add_u32(p: *mut u32, v: u32) {
    #[cfg(target_arch = "bpf")]
    // SAFETY: the caller's contract.
    unsafe {
        core::intrinsics::atomic_xadd::<u32, u32, { core::intrinsics::AtomicOrdering::Relaxed }>(
            p, v,
        );
    }
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: the caller's contract.
    unsafe {
        core::sync::atomic::AtomicU32::from_ptr(p)
            .fetch_add(v, core::sync::atomic::Ordering::Relaxed);
    }
}

/// Stores `v` in `*p` (a plain aligned store is atomic on BPF).
///
/// # Safety
/// As for [`add_u32`].
#[inline(always)]
pub unsafe fn store_u32(p: *mut u32, v: u32) {
    // SAFETY: the caller's contract; volatile so it is one store.
    unsafe { core::ptr::write_volatile(p, v) };
}

/// Replaces `*p` with `new` if it is `old`; returns whether it did. The
/// BPF target's compare-and-swap is 64-bit only.
///
/// # Safety
/// `p` must point at a live, 8-byte aligned `u64` (a map value field).
#[inline(always)]
pub unsafe fn cas_u64(p: *mut u64, old: u64, new: u64) -> bool {
    #[cfg(target_arch = "bpf")]
    // SAFETY: the caller's contract.
    unsafe {
        use core::intrinsics::AtomicOrdering as O;
        core::intrinsics::atomic_cxchg::<u64, { O::Relaxed }, { O::Relaxed }>(p, old, new).1
    }
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: the caller's contract.
    unsafe {
        use core::sync::atomic::Ordering::Relaxed;
        core::sync::atomic::AtomicU64::from_ptr(p)
            .compare_exchange(old, new, Relaxed, Relaxed)
            .is_ok()
    }
}
