//! Where configuration work runs: on tokio's blocking threads at a lower
//! CPU priority than the event loops that serve requests.
//!
//! Staging, validating and compiling a large revision (10,000 routes take
//! tens of milliseconds), dropping the runtime it replaces and encoding the
//! last-good snapshot are all proportional to the whole policy. On an event
//! loop they would stall every request on it; on a blocking thread of normal
//! priority they would still take turns with a proxy pinned to one core. At
//! a lower priority the kernel runs them in the time the event loops leave,
//! and preempts them as soon as a request arrives.

use std::cell::Cell;
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

thread_local! {
    static LOWERED: Cell<bool> = const { Cell::new(false) };
}

/// Lowers the calling thread's priority to [`NICE`], once per thread. Only
/// blocking threads call it; a failure (a platform without per-thread
/// priorities) is logged and the work runs at normal priority.
pub(crate) fn lower_priority() {
    if LOWERED.replace(true) {
        return;
    }
    // On Linux `setpriority(PRIO_PROCESS, 0)` sets the calling thread's nice
    // value, not the whole process's.
    if let Err(error) = rustix::process::setpriority_process(None, NICE) {
        debug!(%error, "Cannot lower the priority of configuration work.");
    }
}

/// Drops `garbage` on a blocking thread of lower priority after
/// [`RETIRE_AFTER`], so that freeing a large runtime or snapshot never runs
/// on an event loop.
pub(crate) fn retire<T: Send + 'static>(garbage: T) {
    tokio::spawn(async move {
        tokio::time::sleep(RETIRE_AFTER).await;
        let dropped = tokio::task::spawn_blocking(move || {
            lower_priority();
            drop(garbage);
        });
        // A panic in a destructor is the destructor's to report.
        let _ = dropped.await;
    });
}

#[cfg(test)]
mod tests {
    use std::thread::{self, ThreadId};

    use tokio::sync::oneshot;

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

    /// Says on which thread it was dropped.
    struct Tell(Option<oneshot::Sender<ThreadId>>);

    impl Drop for Tell {
        fn drop(&mut self) {
            if let Some(tell) = self.0.take() {
                let _ = tell.send(thread::current().id());
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retired_garbage_is_dropped_later_and_off_the_event_loop() {
        let (tell, mut dropped) = oneshot::channel();
        retire(Tell(Some(tell)));
        tokio::time::sleep(RETIRE_AFTER / 2).await;
        assert!(dropped.try_recv().is_err(), "dropped before RETIRE_AFTER");
        let on = tokio::time::timeout(RETIRE_AFTER * 10, dropped)
            .await
            .expect("dropped in time")
            .expect("dropped, not leaked");
        assert_ne!(on, thread::current().id(), "dropped on the event loop");
    }
}
