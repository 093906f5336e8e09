//! SSH to the hosts with russh: one connection per host, host keys checked against
//! known_hosts, key-file or agent authentication, and commands whose output streams back.

mod auth;
mod config;
mod error;
mod known_hosts;
mod session;
mod socket;
mod target;

pub use auth::Keyring;
pub use config::{HostParams, SshConfig};
pub use error::SshError;
pub use known_hosts::{HostKeyError, HostKeyPolicy, Learned};
pub use session::{ConnectOptions, ExitStatus, Jumps, RemoteProcess, Session};
pub use target::{Target, TargetError};
