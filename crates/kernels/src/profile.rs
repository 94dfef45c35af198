//! A minimal phase profiler: named wall-clock totals, off unless `ULTRAMOE_PROFILE` is set.
//! Scopes nest; each reports its own inclusive time.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static STATE: AtomicU8 = AtomicU8::new(0); // 0 unknown, 1 off, 2 on
static TOTALS: Mutex<BTreeMap<&'static str, (f64, u64)>> = Mutex::new(BTreeMap::new());

/// True when `ULTRAMOE_PROFILE` is set (checked once).
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var_os("ULTRAMOE_PROFILE").is_some();
            STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
        s => s == 2,
    }
}

/// Times until dropped.
pub struct Scope {
    name: &'static str,
    start: Option<Instant>,
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some(s) = self.start {
            let mut t = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
            let e = t.entry(self.name).or_insert((0.0, 0));
            e.0 += s.elapsed().as_secs_f64();
            e.1 += 1;
        }
    }
}

/// Starts timing `name` (a no-op when profiling is off).
pub fn scope(name: &'static str) -> Scope {
    Scope { name, start: enabled().then(Instant::now) }
}

/// Totals so far as `(name, seconds, calls)`, largest first; clears them.
pub fn take() -> Vec<(&'static str, f64, u64)> {
    let mut t = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<_> = t.iter().map(|(k, (s, n))| (*k, *s, *n)).collect();
    t.clear();
    v.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
    v
}
