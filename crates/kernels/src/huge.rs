//! Large buffers filled in parallel and advised onto transparent huge pages where the
//! kernel offers them on request (`/sys/kernel/mm/transparent_hugepage/enabled` =
//! `madvise`): decoding streams every weight once per token, and with 4 KiB pages each
//! 2 MiB of weights costs 512 TLB misses, with huge pages one. (Measured on the Xeon of
//! the README: the f32 weights copied onto advised pages decoded no faster than where
//! they were loaded, within the run-to-run spread; the quantised weights are made here
//! anyway, so they get the advice for free.)

use rayon::prelude::*;

/// A vector of `len` elements, `f(i)` at `i`, whose memory was advised onto huge pages
/// before it was first written (so the first touch already maps huge pages).
pub fn filled<T: Copy + Send + Sync>(len: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(len);
    advise_huge(v.as_mut_ptr() as *mut u8, len * std::mem::size_of::<T>());
    let chunk = (1 << 20) / std::mem::size_of::<T>().max(1);
    v.spare_capacity_mut()[..len].par_chunks_mut(chunk.max(1)).enumerate().for_each(|(c, part)| {
        for (k, slot) in part.iter_mut().enumerate() {
            slot.write(f(c * chunk + k));
        }
    });
    // SAFETY: every element below len was written just above.
    unsafe { v.set_len(len) };
    v
}

/// `madvise(MADV_HUGEPAGE)` on the whole 2 MiB pages inside `[ptr, ptr + bytes)`; a
/// kernel without transparent huge pages ignores it.
fn advise_huge(ptr: *mut u8, bytes: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (ptr as usize).next_multiple_of(HUGE);
        let end = (ptr as usize + bytes) / HUGE * HUGE;
        if end > start {
            // SAFETY: the range lies inside the allocation; madvise only changes how its
            // pages are backed.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    let _ = (ptr, bytes);
}

/// Gives the whole pages inside `buf` back to the operating system
/// (`madvise(MADV_DONTNEED)`) and returns how many bytes that was: for weights whose
/// values live on in another form (quantised copies) and are never read again. The
/// pages stay mapped; on Linux they read as zeros if touched (anonymous private
/// memory), so `buf` keeps valid — if meaningless — `f32` values. Elsewhere nothing is
/// released (0).
pub fn release_pages(buf: &mut [f32]) -> usize {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let ptr = buf.as_mut_ptr() as usize;
        let start = ptr.next_multiple_of(page);
        let end = (ptr + std::mem::size_of_val(buf)) / page * page;
        if end > start {
            // SAFETY: [start, end) lies inside `buf`, which we borrow mutably; DONTNEED on
            // private anonymous pages only replaces their contents with zeros.
            let rc = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
            if rc == 0 {
                return end - start;
            }
        }
    }
    let _ = buf;
    0
}

#[cfg(test)]
mod tests {
    #[test]
    fn released_pages_read_as_zeros_around_untouched_edges() {
        let mut v: Vec<f32> = (0..1 << 20).map(|i| i as f32 + 1.0).collect();
        let released = super::release_pages(&mut v[1000..900_000]);
        if cfg!(target_os = "linux") {
            assert!(released >= 4 * (899_000 - 2 * 4096), "{released}");
        }
        // Whole pages inside the range are zeros (on Linux) or untouched; nothing outside
        // the range changes.
        assert!(v[..1000].iter().enumerate().all(|(i, &x)| x == i as f32 + 1.0));
        assert!(v[900_000..].iter().enumerate().all(|(i, &x)| x == (i + 900_000) as f32 + 1.0));
        assert!(v[1000..900_000].iter().enumerate().all(|(i, &x)| x == 0.0 || x == (i + 1000) as f32 + 1.0));
        assert_eq!(released, 4 * v[1000..900_000].iter().filter(|&&x| x == 0.0).count());
    }

    #[test]
    fn fills_every_element() {
        let v = super::filled(5_000_003, |i| (i % 251) as u32);
        assert_eq!(v.len(), 5_000_003);
        assert!(v.iter().enumerate().all(|(i, &x)| x == (i % 251) as u32));
    }
}
