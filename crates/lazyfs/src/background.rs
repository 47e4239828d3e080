//! The background work of one mount (readahead, prefetch, background verification): every task
//! is tracked and cancelled when the mount ends, so nothing keeps downloading after `unmount`.

use std::future::Future;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The mount's background tasks. Clones share them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Background {
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Background {
    /// Runs `task` on the runtime until it ends or the mount ends, whichever comes first.
    /// After [`Background::shutdown`] nothing new starts.
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        if self.cancel.is_cancelled() {
            return;
        }
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            let _ = cancel.run_until_cancelled(task).await;
        });
    }

    /// Cancels every task and waits until each has stopped (a cancelled task stops at its next
    /// await point: no request is sent after this returns).
    pub(crate) async fn shutdown(&self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Tasks still running.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.tracker.len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn shutdown_stops_running_tasks_and_refuses_new_ones() {
        let background = Background::default();
        let finished = Arc::new(AtomicBool::new(false));
        let flag = finished.clone();
        background.spawn(async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            flag.store(true, Ordering::SeqCst);
        });
        assert_eq!(background.len(), 1);
        tokio::time::timeout(Duration::from_secs(5), background.shutdown())
            .await
            .expect("shutdown returns at once");
        assert_eq!(background.len(), 0);
        assert!(!finished.load(Ordering::SeqCst));
        let late = Arc::new(AtomicBool::new(false));
        let flag = late.clone();
        background.spawn(async move { flag.store(true, Ordering::SeqCst) });
        tokio::task::yield_now().await;
        assert!(
            !late.load(Ordering::SeqCst),
            "a task started after shutdown"
        );
    }
}
