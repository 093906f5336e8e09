//! What can go wrong between the laptop and one host. Every variant names the host.

use std::time::Duration;

use super::known_hosts::HostKeyError;

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("{host}: cannot connect to {addr}: {source}")]
    Connect {
        host: String,
        addr: String,
        source: std::io::Error,
    },
    #[error("{host}: no answer from {addr} within {}s (host down, wrong address, or a firewall dropping port {port})", after.as_secs())]
    Timeout {
        host: String,
        addr: String,
        port: u16,
        after: Duration,
    },
    #[error(transparent)]
    HostKey(#[from] HostKeyError),
    #[error("{host}: authentication as {user:?} failed; tried {}{hint}", tried.join(", "))]
    Auth {
        host: String,
        user: String,
        tried: Vec<String>,
        hint: String,
    },
    #[error("{host}: SSH error: {source}")]
    Protocol { host: String, source: russh::Error },
    #[error("{host}: connection lost ({reason})")]
    Lost { host: String, reason: String },
    /// A jump host on the way failed; `kind` and `reason` are its own failure's.
    #[error("{host}: via {hop} ({endpoint}): {reason}")]
    Via {
        host: String,
        hop: String,
        endpoint: String,
        kind: &'static str,
        reason: String,
    },
}

impl SshError {
    /// A short word for `--json` summaries and per-host tables.
    pub fn kind(&self) -> &'static str {
        match self {
            SshError::Connect { .. } | SshError::Timeout { .. } => "unreachable",
            SshError::HostKey(_) => "host_key",
            SshError::Auth { .. } => "auth",
            SshError::Protocol { .. } => "ssh",
            SshError::Lost { .. } => "lost",
            SshError::Via { kind, .. } => kind,
        }
    }
}
