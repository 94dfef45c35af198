//! A swap file for saved activations: buffers written out after a layer's forward and
//! read back before its backward, by one I/O thread, so the transfers overlap compute.
//!
//! The file is opened with `O_DIRECT` where the file system allows it, so the bytes go to
//! the device rather than into the page cache (which would only move the memory from the
//! process to the kernel); each buffer starts at a 4 KiB-aligned offset and goes through a
//! 4 KiB-aligned staging buffer of [`STAGING_BYTES`]. Where `O_DIRECT` is refused (tmpfs)
//! the file is used buffered. The file is unlinked as soon as it is open: nothing is left
//! behind, even after a crash.
//!
//! A write's buffers are freed when the write is waited for (on the waiting thread, so
//! the memory a pass holds does not depend on how fast the disk is). A read allocates
//! its buffers on the caller's thread when it is requested (so the memory it will take
//! is visible and counted at once) and fills them in the background.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;

/// Bytes of the I/O thread's staging buffer (a multiple of [`BLOCK`]).
pub const STAGING_BYTES: usize = 1 << 20;
/// Direct I/O alignment of offsets, lengths and memory.
const BLOCK: usize = 4096;

enum Job {
    Write { offset: u64, bufs: Vec<Vec<f32>>, done: Sender<io::Result<Vec<Vec<f32>>>> },
    Read { offset: u64, bufs: Vec<Vec<f32>>, done: Sender<io::Result<Vec<Vec<f32>>>> },
}

/// Where one set of buffers lies in the file.
pub struct SwapTicket {
    offset: u64,
    lens: Vec<usize>,
    written: Option<Receiver<io::Result<Vec<Vec<f32>>>>>,
}

/// A read in flight.
pub struct Prefetch {
    done: Receiver<io::Result<Vec<Vec<f32>>>>,
}

/// One swap file with its I/O thread (one per forward pass that swaps).
pub struct SwapFile {
    jobs: Option<Sender<Job>>,
    worker: Option<JoinHandle<()>>,
    end: u64,
    path: PathBuf,
    /// whether the file bypasses the page cache
    pub direct: bool,
}

fn padded(bytes: usize) -> usize {
    bytes.div_ceil(BLOCK) * BLOCK
}

/// A `BLOCK`-aligned byte buffer.
struct Staging(*mut u8);

impl Staging {
    fn layout() -> Layout {
        Layout::from_size_align(STAGING_BYTES, BLOCK).expect("valid staging layout")
    }
    fn new() -> Self {
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc_zeroed(Self::layout()) };
        assert!(!p.is_null(), "out of memory allocating the swap staging buffer");
        Staging(p)
    }
    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `self.0` owns STAGING_BYTES initialised bytes.
        unsafe { std::slice::from_raw_parts_mut(self.0, STAGING_BYTES) }
    }
}

// SAFETY: the buffer is owned by exactly one `Staging`, which moves to the I/O thread
// whole; nothing else holds the pointer.
unsafe impl Send for Staging {}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with the same layout.
        unsafe { dealloc(self.0, Self::layout()) }
    }
}

fn as_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
}

fn as_bytes_mut(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above; every bit pattern is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), std::mem::size_of_val(v)) }
}

/// Writes `bufs` from `offset` on, each at an aligned offset, through `stage`.
fn write_all(file: &File, stage: &mut Staging, mut offset: u64, bufs: &[Vec<f32>]) -> io::Result<()> {
    for b in bufs {
        for chunk in as_bytes(b).chunks(STAGING_BYTES) {
            let n = padded(chunk.len());
            let s = stage.bytes();
            s[..chunk.len()].copy_from_slice(chunk);
            s[chunk.len()..n].fill(0);
            file.write_all_at(&s[..n], offset)?;
            offset += n as u64;
        }
    }
    Ok(())
}

/// Fills `bufs` (already sized) from `offset` on, the layout [`write_all`] wrote.
fn read_all(file: &File, stage: &mut Staging, mut offset: u64, bufs: &mut [Vec<f32>]) -> io::Result<()> {
    for b in bufs {
        for chunk in as_bytes_mut(b).chunks_mut(STAGING_BYTES) {
            let n = padded(chunk.len());
            let s = stage.bytes();
            file.read_exact_at(&mut s[..n], offset)?;
            chunk.copy_from_slice(&s[..chunk.len()]);
            offset += n as u64;
        }
    }
    Ok(())
}

/// A swap file's write or read failed (a full disk, an I/O error): raised as a panic
/// payload from inside a forward or backward pass and caught by the trainer.
#[derive(Clone, Debug)]
pub struct SwapError {
    /// the swap directory
    pub dir: PathBuf,
    /// what the operating system said
    pub reason: String,
}

impl std::fmt::Display for SwapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "swap file in {}: {}", self.dir.display(), self.reason)
    }
}

impl std::error::Error for SwapError {}

static FILES: AtomicUsize = AtomicUsize::new(0);

/// Whether `file` lives on tmpfs or ramfs (memory, whatever the flags).
fn in_memory(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: fstatfs fills the struct it is given for an open descriptor.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    // (f_type and the constant are c_long or narrower, depending on the target)
    #[allow(clippy::unnecessary_cast)]
    let (kind, tmpfs) = (st.f_type as i64, libc::TMPFS_MAGIC as i64);
    kind == tmpfs || kind == RAMFS_MAGIC
}

static WARNED: AtomicBool = AtomicBool::new(false);

impl SwapFile {
    /// Creates an (already unlinked) swap file in `dir` and its I/O thread.
    pub fn create(dir: &Path) -> io::Result<SwapFile> {
        let path = dir.join(format!("ultramoe-swap-{}-{}.bin", std::process::id(), FILES.fetch_add(1, Ordering::Relaxed)));
        let open = |flags| OpenOptions::new().read(true).write(true).create_new(true).custom_flags(flags).open(&path);
        let (file, direct) = match open(libc::O_DIRECT) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (open(0)?, false),
            Err(e) => return Err(e),
        };
        if (!direct || in_memory(&file)) && !WARNED.swap(true, Ordering::Relaxed) {
            eprintln!(
                "warning: swap files in {} {}: swapped activations stay in memory; choose a disk with --swap-dir",
                dir.display(),
                if direct { "are on a memory file system" } else { "refuse direct I/O" }
            );
        }
        std::fs::remove_file(&path)?;
        let (tx, rx) = channel::<Job>();
        // Allocated here, not on the I/O thread: the memory is taken when the file is
        // created, whenever that thread first runs.
        let mut stage = Staging::new();
        let worker = std::thread::Builder::new().name("ultramoe-swap".into()).spawn(move || {
            for job in rx {
                match job {
                    Job::Write { offset, bufs, done } => {
                        // The buffers go back to be freed by whoever waits for the write.
                        let r = write_all(&file, &mut stage, offset, &bufs).map(|_| bufs);
                        let _ = done.send(r);
                    }
                    Job::Read { offset, mut bufs, done } => {
                        let r = read_all(&file, &mut stage, offset, &mut bufs).map(|_| bufs);
                        let _ = done.send(r);
                    }
                }
            }
        })?;
        Ok(SwapFile { jobs: Some(tx), worker: Some(worker), end: 0, path, direct })
    }

    fn send(&self, job: Job) {
        self.jobs.as_ref().expect("swap file open").send(job).expect("the swap I/O thread stopped");
    }

    /// Queues `bufs` for writing; their memory is freed when [`SwapFile::wait_written`]
    /// returns (on the waiting thread, at a point of the pass the memory plan names, not
    /// whenever the disk finishes).
    pub fn write(&mut self, bufs: Vec<Vec<f32>>) -> SwapTicket {
        let lens: Vec<usize> = bufs.iter().map(Vec::len).collect();
        let offset = self.end;
        self.end += lens.iter().map(|&l| padded(4 * l) as u64).sum::<u64>();
        let (done, written) = channel();
        self.send(Job::Write { offset, bufs, done });
        SwapTicket { offset, lens, written: Some(written) }
    }

    /// Waits until `t` is on disk, and frees its buffers.
    pub fn wait_written(&self, t: &mut SwapTicket) {
        if let Some(w) = t.written.take() {
            let r = w.recv().expect("the swap I/O thread stopped");
            drop(self.check(r));
        }
    }

    /// A failed transfer cannot return through the layers that asked for it: it unwinds
    /// with a [`SwapError`] as payload, which the trainer turns back into an error value
    /// (as the dispatcher does with a failed all-to-all).
    fn check<T>(&self, r: io::Result<T>) -> T {
        r.unwrap_or_else(|e| std::panic::panic_any(SwapError { dir: self.path.parent().unwrap_or(Path::new(".")).to_path_buf(), reason: e.to_string() }))
    }

    /// Starts reading `t` back: its buffers are allocated now, filled in the background.
    pub fn prefetch(&self, t: &mut SwapTicket) -> Prefetch {
        self.wait_written(t);
        let bufs = t.lens.iter().map(|&l| vec![0.0f32; l]).collect();
        let (done, rx) = channel();
        self.send(Job::Read { offset: t.offset, bufs, done });
        Prefetch { done: rx }
    }

    /// Waits for a prefetch: the buffers in the order they were written.
    pub fn finish(&self, p: Prefetch) -> Vec<Vec<f32>> {
        let r = p.done.recv().expect("the swap I/O thread stopped");
        self.check(r)
    }
}

impl Drop for SwapFile {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// Checks that `dir` can hold a swap file: creates one and writes and reads a block back.
pub fn check_dir(dir: &Path) -> Result<(), String> {
    let run = || -> io::Result<()> {
        let mut f = SwapFile::create(dir)?;
        let mut t = f.write(vec![vec![1.5f32; 1000]]);
        let p = f.prefetch(&mut t);
        let back = f.finish(p);
        if back[0].iter().all(|&x| x == 1.5) {
            Ok(())
        } else {
            Err(io::Error::other("read back different bytes"))
        }
    };
    run().map_err(|e| format!("swap directory {}: {e}", dir.display()))
}

/// What moving bytes through a swap file costs on this machine.
#[derive(Clone, Copy, Debug)]
pub struct SwapRates {
    /// write bytes/s
    pub write: f64,
    /// read bytes/s
    pub read: f64,
    /// CPU seconds per byte moved (one way): the staging copies and the kernel's I/O
    /// work, which on a machine whose cores all compute is taken from the compute
    pub cpu_per_byte: f64,
}

impl SwapRates {
    /// Seconds a step loses moving `bytes` out and back in, when the write can hide
    /// behind `hidden` seconds of compute and the read behind twice that (a backward
    /// takes about twice its forward). The transfers' CPU time (staging copies, kernel
    /// I/O) is taken from the compute, and slows it half as much again through the memory
    /// bandwidth it shares (measured here: swapping 55 MB a step cost 36 ms beyond the
    /// 19 ms of exposed waits, where the transfers' CPU time was 27 ms).
    pub fn exposed_seconds(&self, bytes: f64, hidden: f64) -> f64 {
        (bytes / self.write - hidden).max(0.0) + (bytes / self.read - 2.0 * hidden).max(0.0) + 1.5 * 2.0 * bytes * self.cpu_per_byte
    }
}

/// CPU seconds (user + system) this process has used.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Measures a swap file in `dir` over `bytes` bytes in 8 MiB buffers: write and read
/// bandwidth, and the CPU time the transfers take (measured while nothing else runs).
pub fn probe(dir: &Path, bytes: usize) -> io::Result<SwapRates> {
    let mut f = SwapFile::create(dir)?;
    // A small round trip first: the I/O thread's staging buffer and the first pages.
    let mut t = f.write(vec![vec![0.0; 1 << 20]]);
    let p = f.prefetch(&mut t);
    drop(f.finish(p));
    let bufs: Vec<Vec<f32>> = (0..bytes.div_ceil(8 << 20)).map(|i| vec![i as f32; 2 << 20]).collect();
    let total = 4.0 * bufs.iter().map(Vec::len).sum::<usize>() as f64;
    let cpu0 = cpu_seconds();
    let t0 = std::time::Instant::now();
    let mut t = f.write(bufs);
    f.wait_written(&mut t);
    let w = t0.elapsed().as_secs_f64();
    let t0 = std::time::Instant::now();
    let p = f.prefetch(&mut t);
    drop(f.finish(p));
    let r = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    Ok(SwapRates { write: total / w.max(1e-9), read: total / r.max(1e-9), cpu_per_byte: cpu / (2.0 * total) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_bit_for_bit() {
        let dir = std::env::temp_dir();
        let mut f = SwapFile::create(&dir).unwrap();
        let a: Vec<f32> = (0..300_001).map(|i| (i as f32).sin()).collect();
        let b: Vec<f32> = vec![];
        let c: Vec<f32> = (0..17).map(|i| -(i as f32) / 3.0).collect();
        let mut t1 = f.write(vec![a.clone(), b.clone()]);
        let mut t2 = f.write(vec![c.clone()]);
        let p2 = f.prefetch(&mut t2);
        let p1 = f.prefetch(&mut t1);
        assert_eq!(f.finish(p2), vec![c]);
        let back = f.finish(p1);
        assert!(back[0].iter().zip(&a).all(|(x, y)| x.to_bits() == y.to_bits()) && back[0].len() == a.len());
        assert!(back[1].is_empty());
        check_dir(&dir).unwrap();
        assert!(check_dir(Path::new("/nonexistent/dir")).unwrap_err().contains("/nonexistent/dir"));
    }
}
