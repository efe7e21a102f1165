//! Where configuration work runs: on one long-lived thread of its own, at a
//! lower CPU priority than the event loops that serve requests, fed by a
//! queue.
//!
//! Staging, validating and compiling a revision, encoding the last-good
//! snapshot and dropping what a revision replaced are configuration work.
//! Most of it costs what a revision changes, but a fresh 10,000-route policy
//! still takes tens of milliseconds. On an event loop that would stall every
//! request on it; on a thread of normal priority it would still take turns
//! with a proxy pinned to one core. At a lower priority the kernel runs it in
//! the time the event loops leave, and preempts it as soon as a request
//! arrives. One thread, not one per job: starting a thread for every
//! discovery response is work of its own, and jobs run one at a time anyway.

use std::panic::AssertUnwindSafe;
use std::sync::{Mutex, mpsc};
use std::time::Duration;

use tracing::debug;

/// Nice value of configuration work (0 is normal, 19 the lowest). At 10 a
/// busy event loop still leaves it about a tenth of its core, so a large
/// revision applies within a second even under full load.
const NICE: i32 = 10;

/// How long a replaced runtime or snapshot is kept before it is dropped:
/// long enough for requests that loaded it to have let go, so the last
/// reference (and the work of freeing it) is ours, not theirs.
pub(crate) const RETIRE_AFTER: Duration = Duration::from_secs(1);

/// One piece of configuration work.
type Job = Box<dyn FnOnce() + Send>;

/// The queue of the configuration thread, started by the first job.
static QUEUE: Mutex<Option<mpsc::Sender<Job>>> = Mutex::new(None);

/// Why [`run`]'s work gave no result.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failed {
    #[error("cannot start the configuration thread")]
    Spawn(#[source] std::io::Error),
    #[error("configuration work ended without a result")]
    Lost,
}

/// Runs `work` on the configuration thread, inside the calling Tokio
/// runtime, and resolves to its result; a panic in `work` resumes here.
/// Jobs run one at a time, in the order they were queued.
///
/// A thread of its own, not one of tokio's blocking threads: those are
/// pooled and reused for other blocking work (the resolver's
/// `getaddrinfo`, file reads), which must not inherit a lowered priority.
pub(crate) async fn run<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Failed> {
    let (done, result) = tokio::sync::oneshot::channel();
    // The work may start tasks (a compiled backend's health checker): on
    // this runtime, as if it ran here.
    let runtime = tokio::runtime::Handle::current();
    submit(Box::new(move || {
        let _entered = runtime.enter();
        // Nobody waiting any more (shutdown) is fine.
        let _ = done.send(std::panic::catch_unwind(AssertUnwindSafe(work)));
    }))?;
    match result.await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => Err(Failed::Lost),
    }
}

/// Queues `job` for the configuration thread, starting it if there is none.
fn submit(job: Job) -> Result<(), Failed> {
    // A poisoned lock only means a panic while holding it, which nothing
    // here can do; the sender inside is still good.
    let mut queue = QUEUE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let job = match queue.as_ref() {
        Some(sender) => match sender.send(job) {
            Ok(()) => return Ok(()),
            // The thread is gone (it never is: each job's panic is caught).
            Err(mpsc::SendError(job)) => job,
        },
        None => job,
    };
    let (sender, jobs) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("prism-config".into())
        .spawn(move || {
            lower_priority();
            for job in jobs {
                job();
            }
        })
        .map_err(Failed::Spawn)?;
    // The thread just started holds the receiver, so this cannot fail; if
    // it did, the job is dropped and its caller sees `Failed::Lost`.
    let _ = sender.send(job);
    *queue = Some(sender);
    Ok(())
}

/// Lowers the calling thread's priority to [`NICE`]. A failure (a platform
/// without per-thread priorities) is logged and the work runs at normal
/// priority.
fn lower_priority() {
    // On Linux `setpriority(PRIO_PROCESS, 0)` sets the calling thread's nice
    // value, not the whole process's.
    if let Err(error) = rustix::process::setpriority_process(None, NICE) {
        debug!(%error, "Cannot lower the priority of configuration work.");
    }
}

/// Drops `garbage` on the configuration thread after [`RETIRE_AFTER`], so
/// that freeing a large runtime or snapshot never runs on an event loop.
pub(crate) fn retire<T: Send + 'static>(garbage: T) {
    tokio::spawn(async move {
        tokio::time::sleep(RETIRE_AFTER).await;
        if let Err(error) = run(move || drop(garbage)).await {
            debug!(%error, "Dropping a replaced configuration where it was.");
        }
    });
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::thread::{self, ThreadId};

    use super::*;

    #[test]
    fn configuration_work_runs_at_a_lower_priority() {
        let nice = thread::spawn(|| {
            let before = rustix::process::getpriority_process(None).expect("nice");
            lower_priority();
            let after = rustix::process::getpriority_process(None).expect("nice");
            (before, after)
        })
        .join()
        .expect("thread");
        assert_eq!(nice, (0, NICE));
        // Only the thread that asked: this one is as it was.
        assert_eq!(rustix::process::getpriority_process(None).expect("nice"), 0);
    }

    #[tokio::test]
    async fn work_runs_lowered_and_leaves_tokios_blocking_threads_alone() {
        let (nice, spawned) = run(|| {
            let nice = rustix::process::getpriority_process(None).expect("nice");
            (nice, tokio::spawn(async { "on the caller's runtime" }))
        })
        .await
        .expect("ran");
        assert_eq!(nice, NICE);
        assert_eq!(spawned.await.expect("task"), "on the caller's runtime");
        let pooled = tokio::task::spawn_blocking(|| {
            rustix::process::getpriority_process(None).expect("nice")
        })
        .await
        .expect("ran");
        assert_eq!(pooled, 0, "a blocking thread of tokio's pool");
        let panicked = tokio::spawn(run(|| panic!("in configuration work")));
        assert!(panicked.await.expect_err("resumed").is_panic());
    }

    #[tokio::test]
    async fn every_job_runs_on_the_one_configuration_thread() {
        let here = || {
            (
                thread::current().id(),
                thread::current().name().map(str::to_owned),
            )
        };
        let first = run(here).await.expect("ran");
        let second = run(here).await.expect("ran");
        assert_eq!(first, second, "a thread per job");
        assert_ne!(first.0, thread::current().id());
        assert_eq!(first.1.as_deref(), Some("prism-config"));
    }

    /// Says on which thread it was dropped.
    struct Tell(mpsc::Sender<ThreadId>);

    impl Drop for Tell {
        fn drop(&mut self) {
            let _ = self.0.send(thread::current().id());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retired_garbage_is_dropped_later_and_off_the_event_loop() {
        let (tell, dropped) = mpsc::channel();
        retire(Tell(tell));
        tokio::time::sleep(RETIRE_AFTER / 2).await;
        assert!(dropped.try_recv().is_err(), "dropped before RETIRE_AFTER");
        tokio::time::sleep(RETIRE_AFTER).await;
        // Past RETIRE_AFTER the dropping thread is on its way; wait for it
        // on a blocking thread, which keeps paused time where it is.
        let on = tokio::task::spawn_blocking(move || dropped.recv_timeout(Duration::from_secs(10)))
            .await
            .expect("task")
            .expect("dropped, not leaked");
        assert_ne!(on, thread::current().id(), "dropped on the event loop");
    }
}
