//! One authenticated connection to one host, and the commands run over it.

use std::sync::Arc;
use std::time::Duration;

use russh::client::{self, Handle};
use russh::keys::PublicKeyOrCertificate;
use russh::{ChannelMsg, Disconnect};

use super::known_hosts::HostKeyError;
use super::{HostKeyPolicy, Keyring, SshError, Target};
use crate::output::Stream;

/// How every connection of this run is made.
#[derive(Debug)]
pub struct ConnectOptions {
    /// Deadline for TCP connect, key exchange and authentication together.
    pub timeout: Duration,
    /// A host that misses this many keepalives in a row, one per `keepalive`, is lost.
    pub keepalive: Duration,
    pub keepalive_max: usize,
    pub host_keys: Arc<HostKeyPolicy>,
    pub keyring: Arc<Keyring>,
}

/// How a remote command ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    Code(u32),
    /// Killed by a signal (its name, without `SIG`).
    Signal(String),
}

impl ExitStatus {
    pub fn success(&self) -> bool {
        *self == ExitStatus::Code(0)
    }
}

/// What russh calls back into during the handshake: the host-key check.
struct Verifier {
    target: Target,
    policy: Arc<HostKeyPolicy>,
}

#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error(transparent)]
    Ssh(#[from] russh::Error),
    #[error(transparent)]
    HostKey(#[from] HostKeyError),
}

impl client::Handler for Verifier {
    type Error = HandshakeError;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            return Err(HostKeyError::Certificate { host: self.target.name.clone(), endpoint: self.target.endpoint() }.into());
        };
        self.policy.verify(&self.target.name, &self.target.addr, self.target.port, key)?;
        Ok(true)
    }
}

/// An open, authenticated connection. Channels are multiplexed over it.
pub struct Session {
    target: Target,
    handle: Handle<Verifier>,
}

impl Session {
    /// Dials, verifies the host key and authenticates, all within `options.timeout`.
    pub async fn connect(target: &Target, options: &ConnectOptions) -> Result<Session, SshError> {
        match tokio::time::timeout(options.timeout, Self::handshake(target, options)).await {
            Ok(result) => result,
            Err(_) => Err(SshError::Timeout {
                host: target.name.clone(),
                addr: target.endpoint(),
                port: target.port,
                after: options.timeout,
            }),
        }
    }

    async fn handshake(target: &Target, options: &ConnectOptions) -> Result<Session, SshError> {
        let config = Arc::new(client::Config {
            keepalive_interval: Some(options.keepalive),
            keepalive_max: options.keepalive_max,
            nodelay: true,
            ..Default::default()
        });
        let verifier = Verifier { target: target.clone(), policy: options.host_keys.clone() };
        let mut handle = client::connect(config, (target.addr.as_str(), target.port), verifier)
            .await
            .map_err(|e| match e {
                HandshakeError::HostKey(e) => SshError::HostKey(e),
                HandshakeError::Ssh(russh::Error::IO(source)) => {
                    SshError::Connect { host: target.name.clone(), addr: target.endpoint(), source }
                }
                HandshakeError::Ssh(source) => SshError::Protocol { host: target.name.clone(), source },
            })?;
        options.keyring.authenticate(&mut handle, target).await?;
        Ok(Session { target: target.clone(), handle })
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    fn protocol(&self, source: russh::Error) -> SshError {
        SshError::Protocol { host: self.target.name.clone(), source }
    }

    /// Runs `command` (a shell command line) and hands each chunk of its output to `output` as it
    /// arrives. Reads until the channel closes: the exit status can come before the last data.
    pub async fn exec(&self, command: &str, mut output: impl FnMut(Stream, &[u8])) -> Result<ExitStatus, SshError> {
        let mut channel = self.handle.channel_open_session().await.map_err(|e| self.protocol(e))?;
        channel.exec(true, command).await.map_err(|e| self.protocol(e))?;
        let mut status = None;
        while let Some(message) = channel.wait().await {
            match message {
                ChannelMsg::Data { data } => output(Stream::Stdout, &data),
                ChannelMsg::ExtendedData { data, ext: 1 } => output(Stream::Stderr, &data),
                ChannelMsg::ExitStatus { exit_status } => status = Some(ExitStatus::Code(exit_status)),
                ChannelMsg::ExitSignal { signal_name, .. } => status = Some(ExitStatus::Signal(signal_text(&signal_name))),
                ChannelMsg::Failure => {
                    return Err(SshError::Lost { host: self.target.name.clone(), reason: "the host refused to run the command".into() });
                }
                _ => {}
            }
        }
        status.ok_or_else(|| SshError::Lost {
            host: self.target.name.clone(),
            reason: if self.handle.is_closed() { "no keepalive answer or the host closed the connection".into() } else { "the command ended without an exit status".into() },
        })
    }

    /// Runs `command` and returns its exit status with everything it printed.
    pub async fn capture(&self, command: &str) -> Result<(ExitStatus, Vec<u8>, Vec<u8>), SshError> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let status = self
            .exec(command, |stream, data| match stream {
                Stream::Stdout => stdout.extend_from_slice(data),
                Stream::Stderr => stderr.extend_from_slice(data),
            })
            .await?;
        Ok((status, stdout, stderr))
    }

    /// Says goodbye to the host; errors are irrelevant at this point.
    pub async fn close(self) {
        let _ = self.handle.disconnect(Disconnect::ByApplication, "", "en").await;
    }
}

fn signal_text(signal: &russh::Sig) -> String {
    match signal {
        russh::Sig::Custom(name) => name.clone(),
        other => format!("{other:?}"),
    }
}
