//! A communication stream: one background thread per rank that runs communication jobs
//! in submission order while the rank's compute threads keep working — the CPU
//! counterpart of a CUDA communication stream. Overlap comes from submitting an
//! exchange, computing something else, and only then waiting for its result.
//!
//! Collectives must reach every rank in the same order; a stream keeps its jobs in
//! submission order, so ranks that submit the same sequence stay matched. Code that
//! uses a stream for a group must not also call that group directly while jobs are
//! pending.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

type Job = Box<dyn FnOnce() + Send>;

/// The background thread and its queue.
pub struct CommStream {
    queue: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A result that will arrive; [`Pending::wait`] blocks for it.
pub struct Pending<T> {
    rx: mpsc::Receiver<(T, f64)>,
}

/// What a finished job reports.
pub struct Done<T> {
    /// the job's result
    pub value: T,
    /// seconds the job ran on the stream
    pub busy_s: f64,
    /// seconds the caller was blocked in [`Pending::wait`] (communication not hidden)
    pub exposed_s: f64,
}

impl<T> Pending<T> {
    /// Blocks until the job has run.
    pub fn wait(self) -> Done<T> {
        let start = Instant::now();
        let (value, busy_s) = self.rx.recv().expect("the communication stream ended with a job pending");
        Done { value, busy_s, exposed_s: start.elapsed().as_secs_f64() }
    }
}

impl CommStream {
    /// Starts the stream's thread.
    pub fn new(name: &str) -> Arc<CommStream> {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .expect("spawn communication stream");
        Arc::new(CommStream { queue: Some(tx), thread: Some(thread) })
    }

    /// Queues `f`; its result comes back through the returned [`Pending`].
    pub fn submit<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Pending<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let start = Instant::now();
            let v = f();
            // The receiver may be gone if the caller unwound; nothing to report then.
            let _ = tx.send((v, start.elapsed().as_secs_f64()));
        });
        self.queue.as_ref().expect("stream is open").send(job).expect("the communication stream thread is gone");
        Pending { rx }
    }
}

impl Drop for CommStream {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for CommStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CommStream")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn jobs_run_in_order_while_the_caller_works() {
        let s = CommStream::new("test-stream");
        let a = s.submit(|| {
            std::thread::sleep(Duration::from_millis(50));
            1
        });
        let b = s.submit(|| 2);
        // Work on this thread overlaps the first job.
        std::thread::sleep(Duration::from_millis(60));
        let (a, b) = (a.wait(), b.wait());
        assert_eq!((a.value, b.value), (1, 2));
        assert!(a.busy_s >= 0.045, "{}", a.busy_s);
        assert!(a.exposed_s < 0.03, "the job finished while the caller worked: {}", a.exposed_s);
    }
}
