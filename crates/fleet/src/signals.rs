//! The user's signals, caught once for the whole process: Ctrl-C (SIGINT), SIGTERM (what
//! `timeout`, systemd and `kill` send) and SIGHUP (a closed terminal) all mean "stop".
//!
//! Once tokio catches a signal its default action is gone for the life of the process, so
//! catching it only where fleet supervises a job would leave it deaf everywhere else (between
//! restarts, during a sync). Instead one task counts every signal from the start, and whoever
//! must react (the supervisor escalates: stop, kill, leave; any other command ends at once)
//! watches the count.
//!
//! One request often arrives as two signals: `timeout` sends SIGTERM to fleet and then to its
//! whole process group, and a terminal's Ctrl-C reaches every process of the foreground group.
//! A signal within [`SAME_REQUEST`] of the last one counted is taken as the same request, so
//! only a second, deliberate Ctrl-C escalates.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// How many stop signals the process has received, to wait on.
#[derive(Clone, Debug)]
pub struct Interrupts {
    count: watch::Receiver<u32>,
}

impl Interrupts {
    /// Starts counting SIGINT, SIGTERM and SIGHUP (inside the runtime). A signal that cannot be
    /// caught keeps its default action, which ends fleet.
    pub fn install() -> Interrupts {
        Interrupts::counting_apart(SAME_REQUEST)
    }

    /// As [`Interrupts::install`], counting a signal only when `window` has passed since the last
    /// one counted.
    fn counting_apart(window: Duration) -> Interrupts {
        let (sender, count) = watch::channel(0u32);
        let last: Arc<Mutex<Option<Instant>>> = Arc::default();
        for kind in [
            SignalKind::interrupt(),
            SignalKind::terminate(),
            SignalKind::hangup(),
        ] {
            let Ok(mut stream) = signal(kind) else {
                continue;
            };
            let sender = sender.clone();
            let last = Arc::clone(&last);
            tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    if a_new_request(&last, window) {
                        sender.send_modify(|n| *n += 1);
                    }
                }
            });
        }
        Interrupts { count }
    }

    /// A handle whose [`Interrupts::next`] waits for signals after those received so far.
    pub fn from_now(&self) -> Interrupts {
        let mut count = self.count.clone();
        count.borrow_and_update();
        Interrupts { count }
    }

    /// Signals received so far.
    pub fn count(&self) -> u32 {
        *self.count.borrow()
    }

    /// Waits for the next signal after those this handle has already seen.
    pub async fn next(&mut self) {
        if self.count.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Waits until at least one signal has arrived (at once if one already has).
    pub async fn any(&self) {
        let mut count = self.count.clone();
        if count.wait_for(|n| *n > 0).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Signals closer together than this are one request (see the module's notes). A person's
/// second Ctrl-C comes later than this; a signal sent to a process and then to its group, sooner.
const SAME_REQUEST: Duration = Duration::from_millis(300);

/// Whether a signal arriving now is a new request, given when the last counted one came; if so,
/// it becomes the last.
fn a_new_request(last: &Mutex<Option<Instant>>, window: Duration) -> bool {
    let now = Instant::now();
    let mut last = last.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if last.is_some_and(|at| now.duration_since(at) < window) {
        return false;
    }
    *last = Some(now);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_kind_of_stop_signal_is_counted() {
        let interrupts = Interrupts::counting_apart(Duration::ZERO);
        let mut seen = interrupts.from_now();
        for (n, signal) in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT]
            .into_iter()
            .enumerate()
        {
            // SAFETY: raise only delivers a signal to this process, whose handlers are tokio's.
            unsafe { libc::raise(signal) };
            tokio::time::timeout(std::time::Duration::from_secs(10), seen.next())
                .await
                .expect("the signal was not seen");
            while interrupts.count() < n as u32 + 1 {
                seen.next().await;
            }
        }
        assert_eq!(interrupts.count(), 3);
        interrupts.any().await;
    }

    #[test]
    fn a_signal_close_behind_another_is_the_same_request() {
        let last = Mutex::new(None);
        let hour = Duration::from_secs(3600);
        assert!(a_new_request(&last, hour));
        assert!(!a_new_request(&last, hour), "a second signal at once");
        assert!(
            a_new_request(&last, Duration::ZERO),
            "once the window has passed"
        );
    }
}
