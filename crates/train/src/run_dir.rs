//! A run directory, opened for one training at a time: `RUN/lock` is held (an advisory
//! `flock`, released when the process ends however it ends) and names the holder's pid,
//! so a second training on the same directory is refused instead of interleaving its
//! metrics and checkpoints with the first's. Opening also says what happens to an
//! earlier run found there: it is continued (`Resume`), removed (`Overwrite`), or its
//! presence is an error (`Fresh`) — never silently reused.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use ultramoe_model::{Error, Result};

/// What to do with an earlier run in the directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// a new run: an earlier run's checkpoints, model or metrics are an error
    Fresh,
    /// a new run: an earlier run's checkpoints, model and metrics are removed first
    Overwrite,
    /// continue from the latest checkpoint (a new run when there is none)
    Resume,
}

/// An open run directory.
#[derive(Debug)]
pub struct RunDir {
    /// the directory
    pub path: PathBuf,
    /// the checkpoint to resume from (`Start::Resume` with a checkpoint present)
    pub latest: Option<PathBuf>,
    lock: Option<File>,
    /// the directory did not exist before: removed again if the run leaves nothing in it
    created: bool,
}

impl Drop for RunDir {
    /// A run that failed before writing anything (a bad flag, a config error) leaves no
    /// directory behind that it created, only to hold its lock.
    fn drop(&mut self) {
        if self.created && self.lock.take().is_some() {
            let only_lock = std::fs::read_dir(&self.path).map(|rd| rd.filter_map(|e| e.ok()).all(|e| e.file_name() == "lock")).unwrap_or(false);
            if only_lock {
                let _ = std::fs::remove_file(self.path.join("lock"));
                let _ = std::fs::remove_dir(&self.path);
            }
        }
    }
}

/// What an earlier run leaves behind, by name under the run directory.
const RUN_OUTPUTS: [&str; 3] = ["checkpoints", "model", "metrics.jsonl"];

impl RunDir {
    /// Opens `path` (created if missing). `lock`: take the run's lock — the process that
    /// writes run-wide files does; the other ranks of an MPI job only read.
    pub fn open(path: &Path, start: Start, lock: bool) -> Result<RunDir> {
        let created = !path.exists();
        std::fs::create_dir_all(path).map_err(|e| Error::msg(format!("cannot create run directory: {e}")).in_file(path))?;
        let held = if lock { Some(acquire(path)?) } else { None };
        let root = path.join("checkpoints");
        let steps = checkpoint_dirs(&root);
        let latest = match start {
            Start::Resume => latest_checkpoint(path)?,
            Start::Fresh => {
                // Only the lock holder judges: the other ranks may look after it started.
                let found = RUN_OUTPUTS.iter().find(|n| held.is_some() && path.join(n).exists());
                if let Some(found) = found {
                    let what = match steps.last() {
                        Some(s) => format!("checkpoints of an earlier run (newest {s})"),
                        None => format!("an earlier run's `{found}`"),
                    };
                    return Err(Error::msg(format!("holds {what}; continue it with --resume or start over with --overwrite")).in_file(path));
                }
                None
            }
            Start::Overwrite => {
                // Only the lock holder removes anything (other ranks may still be reading).
                if held.is_some() {
                    for name in RUN_OUTPUTS {
                        let p = path.join(name);
                        let gone = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
                        if let Err(e) = gone.filter_not_found() {
                            return Err(Error::msg(format!("cannot remove the earlier run's output: {e}")).in_file(&p));
                        }
                    }
                }
                None
            }
        };
        Ok(RunDir { path: path.to_path_buf(), latest, lock: held, created })
    }
}

trait NotFoundIsFine {
    fn filter_not_found(self) -> std::io::Result<()>;
}

impl NotFoundIsFine for std::io::Result<()> {
    fn filter_not_found(self) -> std::io::Result<()> {
        match self {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

/// Takes `RUN/lock` (non-blocking) and writes this process's pid into it.
fn acquire(path: &Path) -> Result<File> {
    use std::os::fd::AsRawFd;
    let lock_path = path.join("lock");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(|e| Error::msg(format!("cannot open the run lock: {e}")).in_file(&lock_path))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() { "another process".to_string() } else { format!("another training (pid {holder})") };
            return Err(Error::msg(format!("{who} is using this run directory; wait for it or choose another --run-dir")).in_file(path));
        }
        return Err(Error::msg(format!("cannot lock: {err}")).in_file(&lock_path));
    }
    let pid = std::process::id().to_string();
    f.set_len(0)
        .and_then(|_| f.rewind())
        .and_then(|_| f.write_all(pid.as_bytes()))
        .map_err(|e| Error::msg(format!("cannot write the run lock: {e}")).in_file(&lock_path))?;
    Ok(f)
}

/// `step-*` directories under `root`, sorted (oldest first).
fn checkpoint_dirs(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("step-")).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// The checkpoint `RUN/checkpoints/latest` names, checked complete; `None` when the run
/// has none yet; an error when `latest` is broken or lost (see [`Start::Resume`]).
pub fn latest_checkpoint(run: &Path) -> Result<Option<PathBuf>> {
    let root = run.join("checkpoints");
    let steps = checkpoint_dirs(&root);
    let latest = root.join("latest");
    let name = match std::fs::read_to_string(&latest) {
        Ok(n) => n.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // `latest` is written last, so one checkpoint directory without it is a first
            // save that never finished (nothing was committed: start fresh). Several mean
            // `latest` was lost, and the older checkpoints must not be trained over.
            if steps.len() > 1 {
                let newest = &steps[steps.len() - 1];
                return Err(Error::msg(format!("missing, though checkpoints exist (newest {newest}); write the name of the one to continue from into it")).in_file(&latest));
            }
            return Ok(None);
        }
        Err(e) => return Err(Error::msg(format!("cannot read: {e}")).in_file(&latest)),
    };
    let dir = root.join(&name);
    let plain = !name.is_empty() && Path::new(&name).components().all(|c| matches!(c, std::path::Component::Normal(_)));
    if !plain || !dir.join("trainer_state.json").is_file() {
        return Err(Error::msg(format!("names `{name}`, which is not a complete checkpoint in {}", root.display())).in_file(&latest));
    }
    Ok(Some(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ultramoe-rundir-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn one_holder_at_a_time_and_earlier_runs_are_never_reused_silently() {
        let d = scratch("lock");
        // A run that leaves nothing removes the directory it made for its lock.
        drop(RunDir::open(&d, Start::Fresh, true).unwrap());
        assert!(!d.exists());
        let first = RunDir::open(&d, Start::Fresh, true).unwrap();
        std::fs::write(d.join("metrics.jsonl"), "").unwrap();
        // flock locks belong to open file descriptions: a second open in this process
        // conflicts as another process's would.
        let e = RunDir::open(&d, Start::Fresh, true).unwrap_err().to_string();
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(first);
        assert!(d.join("lock").exists(), "a directory the run wrote into stays");
        std::fs::remove_file(d.join("metrics.jsonl")).unwrap();
        // An earlier run's checkpoints: refused, resumed, or removed.
        let ck = d.join("checkpoints/step-0000002");
        std::fs::create_dir_all(&ck).unwrap();
        std::fs::write(ck.join("trainer_state.json"), "{}").unwrap();
        std::fs::write(d.join("checkpoints/latest"), "step-0000002").unwrap();
        let e = RunDir::open(&d, Start::Fresh, true).unwrap_err().to_string();
        assert!(e.contains("step-0000002") && e.contains("--resume") && e.contains("--overwrite"), "{e}");
        assert_eq!(RunDir::open(&d, Start::Resume, true).unwrap().latest, Some(ck.clone()));
        // A broken `latest` is an error, never "starting fresh".
        std::fs::write(d.join("checkpoints/latest"), "step-0000009").unwrap();
        let e = RunDir::open(&d, Start::Resume, true).unwrap_err().to_string();
        assert!(e.contains("latest") && e.contains("step-0000009"), "{e}");
        std::fs::write(d.join("checkpoints/latest"), "../../etc").unwrap();
        assert!(RunDir::open(&d, Start::Resume, true).is_err());
        std::fs::remove_file(d.join("checkpoints/latest")).unwrap();
        // One directory without `latest`: a first save cut short, so a fresh start.
        assert!(RunDir::open(&d, Start::Resume, true).unwrap().latest.is_none());
        std::fs::create_dir_all(d.join("checkpoints/step-0000004")).unwrap();
        let e = RunDir::open(&d, Start::Resume, true).unwrap_err().to_string();
        assert!(e.contains("missing") && e.contains("step-0000004"), "{e}");
        let o = RunDir::open(&d, Start::Overwrite, true).unwrap();
        assert!(!d.join("checkpoints").exists() && o.latest.is_none());
        drop(o);
        assert!(RunDir::open(&d, Start::Resume, true).unwrap().latest.is_none(), "an empty run resumes as a new one");
        let _ = std::fs::remove_dir_all(&d);
    }
}
