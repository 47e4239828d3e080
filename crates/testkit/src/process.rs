//! Child processes that a test starts and must stop, whatever happens to the test.

use std::process::Child;
use std::time::{Duration, Instant};

pub use rustix::process::Signal;
use rustix::process::{Pid, kill_process};

/// A child stopped when dropped: SIGTERM by its PID, then SIGKILL after a grace period.
#[derive(Debug)]
pub struct ChildGuard {
    /// The child.
    pub child: Child,
    /// How long it gets to exit after SIGTERM.
    pub grace: Duration,
}

impl ChildGuard {
    /// Guards `child` with a 2 s grace period.
    pub fn new(child: Child) -> ChildGuard {
        ChildGuard {
            child,
            grace: Duration::from_secs(2),
        }
    }

    /// The child's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the child (by PID), if it still runs.
    pub fn signal(&mut self, signal: Signal) {
        if matches!(self.child.try_wait(), Ok(None))
            && let Some(pid) = i32::try_from(self.child.id()).ok().and_then(Pid::from_raw)
        {
            let _ = kill_process(pid, signal);
        }
    }

    /// Stops the child: SIGTERM, up to `grace` to exit, then SIGKILL; reaps it.
    pub fn stop(&mut self) {
        self.signal(Signal::TERM);
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends `signal` to the process `pid` (one this test started, e.g. a daemon that detached).
pub fn signal_pid(pid: u32, signal: Signal) -> std::io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "bad PID"))?;
    kill_process(pid, signal).map_err(std::io::Error::from)
}
