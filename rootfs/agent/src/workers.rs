//! A pool of request threads: a request runs on an idle pooled thread when
//! there is one, else on a new thread that joins the pool afterwards. Idle
//! threads leave after [`IDLE_WORKER_EXIT_AFTER`], so the pool costs nothing
//! when the agent is quiet and saves a thread spawn per request when it is busy.
//!
//! Concurrency is bounded only by the pool's thread cap
//! ([`crate::budget::MAX_REQUEST_WORKERS`] in the agent): below it every
//! request gets a thread at once (a slow request must never delay a `Cancel`
//! or a quick one); at it, [`WorkerPool::execute`] refuses with
//! [`PoolError::Full`] rather than queue or spawn without bound. It never runs
//! jobs on the caller's thread.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::lock::lock;

/// How long an idle pooled thread waits for work before it exits.
pub const IDLE_WORKER_EXIT_AFTER: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send>;

/// Why a job was not run.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Every one of the pool's threads is busy.
    #[error("all {max} request threads are busy")]
    Full {
        /// The cap.
        max: usize,
    },
    /// A new thread could not be started.
    #[error("cannot start a worker thread")]
    Spawn(#[source] io::Error),
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    idle: usize,
    /// Threads alive (busy or idle).
    threads: usize,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    work: Condvar,
    max_threads: usize,
}

/// The pool (cheap to clone; clones share the threads).
#[derive(Clone)]
pub struct WorkerPool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool").field("idle", &lock(&self.shared.state).idle).finish()
    }
}

impl WorkerPool {
    /// An empty pool of at most `max_threads` threads.
    pub fn new(max_threads: usize) -> Self {
        Self { shared: Arc::new(Shared { max_threads, ..Shared::default() }) }
    }

    /// Runs `job` on an idle pooled thread, or on a new one below the cap.
    pub fn execute(&self, job: impl FnOnce() + Send + 'static) -> Result<(), PoolError> {
        let job: Job = Box::new(job);
        {
            let mut state = lock(&self.shared.state);
            if state.idle > state.jobs.len() {
                state.jobs.push_back(job);
                self.shared.work.notify_one();
                return Ok(());
            }
            if state.threads >= self.shared.max_threads {
                return Err(PoolError::Full { max: self.shared.max_threads });
            }
            state.threads += 1;
        }
        let shared = Arc::clone(&self.shared);
        let spawned = std::thread::Builder::new().name("agent-request".into()).spawn(move || {
            job();
            worker_loop(&shared);
        });
        if let Err(e) = spawned {
            lock(&self.shared.state).threads -= 1;
            return Err(PoolError::Spawn(e));
        }
        Ok(())
    }
}

/// Takes jobs until none comes for [`IDLE_WORKER_EXIT_AFTER`].
fn worker_loop(shared: &Shared) {
    loop {
        let job = {
            let mut state = lock(&shared.state);
            state.idle += 1;
            loop {
                if let Some(job) = state.jobs.pop_front() {
                    state.idle -= 1;
                    break job;
                }
                let (next, wait) =
                    shared.work.wait_timeout(state, IDLE_WORKER_EXIT_AFTER).unwrap_or_else(|e| e.into_inner());
                state = next;
                if wait.timed_out() && state.jobs.is_empty() {
                    state.idle -= 1;
                    state.threads -= 1;
                    return;
                }
            }
        };
        job();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn jobs_run_concurrently_and_threads_are_reused() {
        let pool = WorkerPool::new(8);
        let (tx, rx) = mpsc::channel();
        // Two jobs that wait for each other: they must run at the same time.
        let barrier = Arc::new(std::sync::Barrier::new(2));
        for _ in 0..2 {
            let (tx, barrier) = (tx.clone(), Arc::clone(&barrier));
            pool.execute(move || {
                barrier.wait();
                tx.send(std::thread::current().id()).unwrap();
            })
            .unwrap();
        }
        let first: Vec<_> = (0..2).map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap()).collect();
        // Wait until both threads are idle, then a new job reuses one of them.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while lock(&pool.shared.state).idle < 2 {
            assert!(std::time::Instant::now() < deadline, "workers never became idle");
            std::thread::sleep(Duration::from_millis(1));
        }
        let tx2 = tx.clone();
        pool.execute(move || tx2.send(std::thread::current().id()).unwrap()).unwrap();
        let reused = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(first.contains(&reused), "an idle pooled thread ran the job");
    }

    #[test]
    fn a_full_pool_refuses_instead_of_spawning_more() {
        let pool = WorkerPool::new(2);
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        for _ in 0..2 {
            let rx = Arc::clone(&release_rx);
            pool.execute(move || {
                let _ = lock(&rx).recv();
            })
            .unwrap();
        }
        assert!(matches!(pool.execute(|| {}), Err(PoolError::Full { max: 2 })));
        drop(release_tx);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while lock(&pool.shared.state).idle < 2 {
            assert!(std::time::Instant::now() < deadline, "workers never became idle");
            std::thread::sleep(Duration::from_millis(1));
        }
        let (tx, rx) = mpsc::channel();
        pool.execute(move || tx.send(()).unwrap()).unwrap();
        rx.recv_timeout(Duration::from_secs(5)).expect("an idle thread runs it");
    }
}
