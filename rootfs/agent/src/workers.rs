//! A pool of request threads: a request runs on an idle pooled thread when
//! there is one, else on a new thread that joins the pool afterwards. Idle
//! threads leave after [`IDLE_WORKER_EXIT_AFTER`], so the pool costs nothing
//! when the agent is quiet and saves a thread spawn per request when it is busy.
//!
//! It never bounds concurrency (every request gets a thread at once: a slow
//! request must never delay a `Cancel` or a quick one) and never runs jobs
//! on the caller's thread.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::lock::lock;

/// How long an idle pooled thread waits for work before it exits.
pub const IDLE_WORKER_EXIT_AFTER: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    idle: usize,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    work: Condvar,
}

/// The pool (cheap to clone; clones share the threads).
#[derive(Clone, Default)]
pub struct WorkerPool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool").field("idle", &lock(&self.shared.state).idle).finish()
    }
}

impl WorkerPool {
    /// An empty pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `job` on an idle pooled thread, or on a new one.
    pub fn execute(&self, job: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let job: Job = Box::new(job);
        {
            let mut state = lock(&self.shared.state);
            if state.idle > state.jobs.len() {
                state.jobs.push_back(job);
                self.shared.work.notify_one();
                return Ok(());
            }
        }
        let shared = Arc::clone(&self.shared);
        std::thread::Builder::new().name("agent-request".into()).spawn(move || {
            job();
            worker_loop(&shared);
        })?;
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
        let pool = WorkerPool::new();
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
}
