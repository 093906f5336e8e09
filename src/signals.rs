//! The user's signals, caught once for the whole process: Ctrl-C (SIGINT), SIGTERM (what
//! `timeout`, systemd and `kill` send) and SIGHUP (a closed terminal) all mean "stop".
//!
//! Once tokio catches a signal its default action is gone for the life of the process, so
//! catching it only where fleet supervises a job would leave it deaf everywhere else (between
//! restarts, during a sync). Instead one task counts every signal from the start, and whoever
//! must react (the supervisor escalates: stop, kill, leave; any other command ends at once)
//! watches the count.

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
        let (sender, count) = watch::channel(0u32);
        for kind in [
            SignalKind::interrupt(),
            SignalKind::terminate(),
            SignalKind::hangup(),
        ] {
            let Ok(mut stream) = signal(kind) else {
                continue;
            };
            let sender = sender.clone();
            tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    sender.send_modify(|n| *n += 1);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_kind_of_stop_signal_is_counted() {
        let interrupts = Interrupts::install();
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
}
