//! Progress of a long command on stderr, drawn the way `train` draws its bar: only when
//! asked for (no `--no-progress`), when stderr is a terminal and on MPI rank 0, so logs
//! and pipes stay clean.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

/// A progress bar, or nothing.
pub struct Progress(Option<ProgressBar>);

impl Progress {
    /// A bar of `total` items labelled `what`, shown when `wanted` and stderr is a
    /// terminal (of MPI rank 0).
    pub fn new(what: &str, total: u64, wanted: bool) -> Progress {
        let shown = wanted && std::io::stderr().is_terminal() && crate::launch::mpi_world_rank().is_none_or(|r| r == 0);
        Progress(shown.then(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template("{spinner} {prefix} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.set_prefix(what.to_string());
            b.enable_steady_tick(std::time::Duration::from_millis(200));
            b
        }))
    }

    /// Whether a bar is drawn.
    pub fn shown(&self) -> bool {
        self.0.is_some()
    }

    /// Says what is being done now.
    pub fn doing(&self, msg: impl Into<String>) {
        if let Some(b) = &self.0 {
            b.set_message(msg.into());
        }
    }

    /// One item done.
    pub fn done_one(&self) {
        if let Some(b) = &self.0 {
            b.inc(1);
        }
    }

    /// Prints a line on stderr above the bar (or plainly when there is none).
    pub fn log(&self, line: impl AsRef<str>) {
        match &self.0 {
            Some(b) => b.println(line.as_ref()),
            None => eprintln!("{}", line.as_ref()),
        }
    }

    /// Removes the bar (what the command prints next stands alone).
    pub fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
