//! The vector paths the kernels choose between at run time, and — in this crate's tests —
//! a cap on that choice, so that a machine with AVX-512 also runs and checks its AVX2 and
//! portable paths (every path is compiled into every binary; without the cap only the
//! widest ever ran where the tests run).

/// A vector path, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// no target features beyond the baseline (SSE2 on x86-64)
    Portable,
    /// AVX2 with FMA
    Avx2,
    /// AVX-512 F, VL and DQ
    Avx512,
}

impl Isa {
    /// The widest path this CPU runs in this build (AVX-512 only with the `avx512`
    /// feature).
    pub fn detected() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if avx512_built() && has!("avx512f") && has!("avx512vl") && has!("avx512dq") && has!("avx2") && has!("fma") {
                return Isa::Avx512;
            }
            if has!("avx2") && has!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Every path this CPU runs, narrowest first.
    pub fn runnable() -> Vec<Isa> {
        let best = Isa::detected();
        [Isa::Portable, Isa::Avx2, Isa::Avx512].into_iter().filter(|&i| i <= best).collect()
    }
}

/// Whether this build has the AVX-512 paths (the `avx512` feature, on by default).
#[inline(always)]
pub const fn avx512_built() -> bool {
    cfg!(feature = "avx512")
}

#[cfg(test)]
thread_local! {
    static CAP: std::cell::Cell<Isa> = const { std::cell::Cell::new(Isa::Avx512) };
}

/// The widest path dispatch takes on this thread: the CPU's in this build, within the
/// tests' cap.
#[inline(always)]
pub(crate) fn usable() -> Isa {
    Isa::detected().min(cap())
}

/// The widest path dispatch may take on this thread: any, outside this crate's tests.
#[inline(always)]
fn cap() -> Isa {
    #[cfg(test)]
    {
        CAP.with(|c| c.get())
    }
    #[cfg(not(test))]
    {
        Isa::Avx512
    }
}

/// Runs `f` with this thread's dispatch capped at `cap` (kernels `f` hands to other
/// threads keep their own choice).
#[cfg(test)]
pub(crate) fn with_cap<R>(cap: Isa, f: impl FnOnce() -> R) -> R {
    struct Restore(Isa);
    impl Drop for Restore {
        fn drop(&mut self) {
            CAP.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(CAP.with(|c| c.replace(cap)));
    f()
}

/// `f` on every path this CPU runs, the results in [`Isa::runnable`]'s order.
#[cfg(test)]
pub(crate) fn on_every_path<R>(mut f: impl FnMut() -> R) -> Vec<(Isa, R)> {
    Isa::runnable().into_iter().map(|isa| (isa, with_cap(isa, &mut f))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_limits_the_path_on_this_thread_only() {
        assert_eq!(cap(), Isa::Avx512);
        assert!(avx512_built() || Isa::detected() < Isa::Avx512, "a build without AVX-512 never chooses it");
        with_cap(Isa::Portable, || {
            assert_eq!(cap(), Isa::Portable);
            assert_eq!(std::thread::spawn(cap).join().unwrap(), Isa::Avx512);
        });
        assert_eq!(cap(), Isa::Avx512);
        assert_eq!(Isa::runnable().first(), Some(&Isa::Portable));
        assert_eq!(Isa::runnable().last(), Some(&Isa::detected()));
    }
}
