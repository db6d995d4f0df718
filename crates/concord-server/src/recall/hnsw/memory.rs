//! Memory that a graph walk reads at random.

/// Reserves room for `additional` more items, growing `v` (at least by
/// doubling) into a fresh allocation advised for transparent huge pages.
///
/// Why: at 100,000 384-d vectors the graph is 150 MB, read in random 1.5 KB
/// pieces. With 4 KiB pages nearly every piece was a TLB miss on top of its
/// cache misses, and the CPU's prefetches stalled on the page walks. On huge
/// pages insertion ran 10–18% faster in process (measured with the system's
/// THP switched to `always`).
///
/// Why a fresh allocation rather than `Vec::reserve`: the advice must precede
/// the first touch of the pages, and a reallocation copies into them at once.
/// The advice is only a hint: where the kernel has no transparent huge pages,
/// or the process has them switched off, nothing changes.
pub(super) fn reserve_huge<T: Copy>(v: &mut Vec<T>, additional: usize) {
    let need = v.len().saturating_add(additional);
    if need <= v.capacity() {
        return;
    }
    let cap = need.max(v.capacity().saturating_mul(2));
    let mut grown: Vec<T> = Vec::with_capacity(cap);
    advise_huge_pages(grown.as_ptr().cast(), cap * std::mem::size_of::<T>());
    grown.extend_from_slice(v);
    *v = grown;
}

/// Below this, a huge page would be mostly empty: the advice is skipped.
const HUGE_PAGE: usize = 2 << 20;

#[cfg(target_os = "linux")]
fn advise_huge_pages(start: *const u8, len: usize) {
    if len < HUGE_PAGE {
        return;
    }
    // madvise wants a page-aligned start; the kernel uses huge pages for the
    // aligned 2 MiB stretches inside the range.
    const PAGE: usize = 4096;
    let addr = start as usize;
    let aligned = addr.next_multiple_of(PAGE);
    let len = (addr + len).saturating_sub(aligned) / PAGE * PAGE;
    // SAFETY: the range lies inside an allocation this process owns, and
    // MADV_HUGEPAGE changes no contents; a failure only means no huge pages.
    unsafe {
        libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_start: *const u8, _len: usize) {}

/// Asks the CPU to start loading every cache line of `data`.
///
/// Why every line: the hardware prefetcher notices a sequential read only
/// after a few lines, too late for a 1.5 KB vector that is read once.
#[inline]
pub(super) fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let start = data.as_ptr().cast::<i8>();
        let bytes = std::mem::size_of_val(data);
        for offset in (0..bytes).step_by(64) {
            // SAFETY: the address is inside `data`, and a prefetch is a hint
            // that cannot fault in any case.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.add(offset)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}
