//! One authenticated connection to one host, and the commands run over it.

use std::sync::Arc;
use std::time::Duration;

use russh::client::Msg;
use russh::client::{self, Handle};
use russh::keys::PublicKeyOrCertificate;
use russh::{Channel, ChannelMsg, ChannelOpenFailure, ChannelStream, Disconnect};
use russh_sftp::client::RawSftpSession;

use super::known_hosts::HostKeyError;
use super::socket::QuickAckStream;
use super::{HostKeyPolicy, Keyring, SshError, Target};
use crate::output::Stream;
use crate::remote::Script;

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
    /// Jump-host connections, opened as the first host behind each needs them.
    pub jumps: Jumps,
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

/// russh offers ChaCha20-Poly1305 first. Where the CPU has AES instructions, AES-GCM costs a
/// fraction of it on both ends, which decides sync throughput on a busy host.
fn preferred_algorithms() -> russh::Preferred {
    #[cfg(target_arch = "x86_64")]
    let aes = std::arch::is_x86_feature_detected!("aes")
        && std::arch::is_x86_feature_detected!("pclmulqdq");
    #[cfg(target_arch = "aarch64")]
    let aes = std::arch::is_aarch64_feature_detected!("aes");
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let aes = false;
    let mut preferred = russh::Preferred::default();
    if aes {
        preferred.cipher = std::borrow::Cow::Borrowed(&[
            russh::cipher::AES_128_GCM,
            russh::cipher::AES_256_GCM,
            russh::cipher::CHACHA20_POLY1305,
            russh::cipher::AES_256_CTR,
            russh::cipher::AES_128_CTR,
        ]);
    }
    preferred
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

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            return Err(HostKeyError::Certificate {
                host: self.target.name.clone(),
                endpoint: self.target.endpoint(),
            }
            .into());
        };
        self.policy.verify(&self.target, key)?;
        Ok(true)
    }
}

/// An open, authenticated connection. Channels are multiplexed over it.
pub struct Session {
    target: Target,
    handle: Handle<Verifier>,
    /// The last jump host this connection goes through, kept open while it lives.
    _via: Option<Arc<Hop>>,
}

/// A connection to a jump host, and the one before it in the chain.
pub struct Hop {
    /// The jump host's name, as written.
    name: String,
    handle: Handle<Verifier>,
    _before: Option<Arc<Hop>>,
}

/// Why a jump host could not be used, kept to tell every host behind it.
#[derive(Clone, Debug)]
struct HopFailure {
    hop: String,
    endpoint: String,
    kind: &'static str,
    reason: String,
}

impl HopFailure {
    fn new(hop: &Target, error: &SshError) -> HopFailure {
        let text = error.to_string();
        let prefix = format!("{}: ", hop.name);
        HopFailure {
            hop: hop.name.clone(),
            endpoint: hop.endpoint(),
            kind: error.kind(),
            reason: text.strip_prefix(&prefix).unwrap_or(&text).to_string(),
        }
    }

    fn for_host(&self, host: &str) -> SshError {
        SshError::Via {
            host: host.to_string(),
            hop: self.hop.clone(),
            endpoint: self.endpoint.clone(),
            kind: self.kind,
            reason: self.reason.clone(),
        }
    }
}

type HopCell = Arc<tokio::sync::OnceCell<Result<Arc<Hop>, HopFailure>>>;

/// The jump connections of this run, one per chain: every host behind a hop shares it.
#[derive(Default)]
pub struct Jumps {
    open: tokio::sync::Mutex<std::collections::HashMap<String, HopCell>>,
}

impl std::fmt::Debug for Jumps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Jumps")
    }
}

impl Jumps {
    /// The connection to the last hop of `via`, opening the chain where it is not open yet.
    async fn through(
        &self,
        host: &str,
        via: &[Target],
        options: &ConnectOptions,
    ) -> Result<Arc<Hop>, SshError> {
        let mut before: Option<Arc<Hop>> = None;
        let mut chain = String::new();
        for hop in via {
            chain.push_str(&format!("{}@{},", hop.user, hop.endpoint()));
            let cell = self
                .open
                .lock()
                .await
                .entry(chain.clone())
                .or_default()
                .clone();
            let opened = cell
                .get_or_init(|| Hop::open(hop, before.clone(), options))
                .await;
            before = Some(opened.clone().map_err(|failure| failure.for_host(host))?);
        }
        before.ok_or_else(|| SshError::Lost {
            host: host.to_string(),
            reason: "an empty jump chain".into(),
        })
    }
}

impl Hop {
    async fn open(
        hop: &Target,
        before: Option<Arc<Hop>>,
        options: &ConnectOptions,
    ) -> Result<Arc<Hop>, HopFailure> {
        let deadline = hop.connect_timeout.unwrap_or(options.timeout);
        let handle = within(hop, deadline, async {
            match &before {
                None => handshake(hop, dial(hop).await?, options).await,
                Some(previous) => handshake(hop, previous.tunnel(hop).await?, options).await,
            }
        })
        .await
        .map_err(|e| HopFailure::new(hop, &e))?;
        Ok(Arc::new(Hop {
            name: hop.name.clone(),
            handle,
            _before: before,
        }))
    }

    /// A `direct-tcpip` channel from this jump host to `target`'s SSH port.
    async fn tunnel(&self, target: &Target) -> Result<ChannelStream<Msg>, SshError> {
        let channel = self
            .handle
            .channel_open_direct_tcpip(target.addr.clone(), u32::from(target.port), "127.0.0.1", 0)
            .await
            .map_err(|e| {
                let why = match e {
                    russh::Error::ChannelOpenFailure(ChannelOpenFailure::ConnectFailed) => {
                        "the jump host could not connect to it".to_string()
                    }
                    russh::Error::ChannelOpenFailure(ChannelOpenFailure::AdministrativelyProhibited) => {
                        "the jump host does not forward connections (its sshd has AllowTcpForwarding no)".to_string()
                    }
                    other => other.to_string(),
                };
                SshError::Connect {
                    host: target.name.clone(),
                    addr: format!("{} via {}", target.endpoint(), self.name),
                    source: std::io::Error::other(why),
                }
            })?;
        Ok(channel.into_stream())
    }
}

/// `work` within `deadline`, or the host's timeout error.
#[allow(clippy::result_large_err)] // SshError carries what its message shows; made once per host
async fn within<T>(
    target: &Target,
    deadline: Duration,
    work: impl std::future::Future<Output = Result<T, SshError>>,
) -> Result<T, SshError> {
    tokio::time::timeout(deadline, work)
        .await
        .unwrap_or_else(|_| {
            Err(SshError::Timeout {
                host: target.name.clone(),
                addr: target.endpoint(),
                port: target.port,
                after: deadline,
            })
        })
}

async fn dial(target: &Target) -> Result<QuickAckStream, SshError> {
    QuickAckStream::connect(&target.addr, target.port)
        .await
        .map_err(|source| SshError::Connect {
            host: target.name.clone(),
            addr: target.endpoint(),
            source,
        })
}

/// Key exchange, the host-key check and authentication over `stream`.
async fn handshake<S>(
    target: &Target,
    stream: S,
    options: &ConnectOptions,
) -> Result<Handle<Verifier>, SshError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut preferred = preferred_algorithms();
    let known = options.host_keys.known_algorithms(target);
    if !known.is_empty() {
        let rest = preferred.key.iter().filter(|a| !known.contains(a)).cloned();
        let order: Vec<russh::keys::Algorithm> = known.iter().cloned().chain(rest).collect();
        preferred.key = std::borrow::Cow::Owned(order);
    }
    let config = Arc::new(client::Config {
        keepalive_interval: Some(target.keepalive.unwrap_or(options.keepalive)),
        keepalive_max: target.keepalive_max.unwrap_or(options.keepalive_max),
        nodelay: true,
        preferred,
        ..Default::default()
    });
    let verifier = Verifier {
        target: target.clone(),
        policy: options.host_keys.clone(),
    };
    let mut handle = client::connect_stream(config, stream, verifier)
        .await
        .map_err(|e| match e {
            HandshakeError::HostKey(e) => SshError::HostKey(e),
            HandshakeError::Ssh(russh::Error::IO(source)) => SshError::Connect {
                host: target.name.clone(),
                addr: target.endpoint(),
                source,
            },
            HandshakeError::Ssh(source) => SshError::Protocol {
                host: target.name.clone(),
                source,
            },
        })?;
    options.keyring.authenticate(&mut handle, target).await?;
    Ok(handle)
}

impl Session {
    /// Dials (through its jump hosts, if any), verifies the host key and authenticates, within
    /// the host's connect timeout (each jump host within its own).
    pub async fn connect(target: &Target, options: &ConnectOptions) -> Result<Session, SshError> {
        let via = match target.via.is_empty() {
            true => None,
            false => Some(
                options
                    .jumps
                    .through(&target.name, &target.via, options)
                    .await?,
            ),
        };
        let deadline = target.connect_timeout.unwrap_or(options.timeout);
        let handle = within(target, deadline, async {
            match &via {
                None => handshake(target, dial(target).await?, options).await,
                Some(hop) => {
                    let stream = hop.tunnel(target).await?;
                    handshake(target, stream, options).await
                }
            }
        })
        .await?;
        Ok(Session {
            target: target.clone(),
            handle,
            _via: via,
        })
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Whether the connection is gone (the host crashed, the link was cut for good).
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    fn protocol(&self, source: russh::Error) -> SshError {
        SshError::Protocol {
            host: self.target.name.clone(),
            source,
        }
    }

    /// Runs `script` under the host's `sh` and hands each chunk of its output to `output` as it
    /// arrives. Reads until the channel closes: the exit status can come before the last data.
    pub async fn exec(
        &self,
        script: &Script,
        output: impl FnMut(Stream, &[u8]),
    ) -> Result<ExitStatus, SshError> {
        self.exec_with_input(script, &[], output).await
    }

    /// Like [`Session::exec`], with `input` as the script's stdin (then end of file). Input is
    /// sent while output is read, so neither side can stall the other.
    pub async fn exec_with_input(
        &self,
        script: &Script,
        input: &[u8],
        output: impl FnMut(Stream, &[u8]),
    ) -> Result<ExitStatus, SshError> {
        self.exec_inner(script, input, true, output).await
    }

    /// Like [`Session::exec`], with the script's stdin held open until it ends: a script that
    /// reads end of file there knows fleet is gone (see `remote/exec.sh`).
    pub async fn exec_attended(
        &self,
        script: &Script,
        output: impl FnMut(Stream, &[u8]),
    ) -> Result<ExitStatus, SshError> {
        self.exec_inner(script, &[], false, output).await
    }

    async fn exec_inner(
        &self,
        script: &Script,
        input: &[u8],
        end_input: bool,
        mut output: impl FnMut(Stream, &[u8]),
    ) -> Result<ExitStatus, SshError> {
        let text = script.stdin();
        let channel = self.open_exec(&Script::command(text.len())).await?;
        let (mut reader, writer) = channel.split();
        // A command that exits without reading its input makes sending fail; its status tells.
        let send = async {
            if writer.data(text.as_slice()).await.is_ok() && !input.is_empty() {
                let _ = writer.data(input).await;
            }
            if end_input {
                let _ = writer.eof().await;
            }
            writer
        };
        let receive = async {
            let mut status = None;
            while let Some(message) = reader.wait().await {
                match message {
                    ChannelMsg::Data { data } => output(Stream::Stdout, &data),
                    ChannelMsg::ExtendedData { data, ext: 1 } => output(Stream::Stderr, &data),
                    ChannelMsg::ExitStatus { exit_status } => {
                        status = Some(ExitStatus::Code(exit_status))
                    }
                    ChannelMsg::ExitSignal { signal_name, .. } => {
                        status = Some(ExitStatus::Signal(signal_text(&signal_name)))
                    }
                    ChannelMsg::Failure => {
                        return Err(SshError::Lost {
                            host: self.target.name.clone(),
                            reason: "the host refused to run the command".into(),
                        });
                    }
                    _ => {}
                }
            }
            status.ok_or_else(|| SshError::Lost {
                host: self.target.name.clone(),
                reason: if self.handle.is_closed() {
                    "no keepalive answer or the host closed the connection".into()
                } else {
                    "the command ended without an exit status".into()
                },
            })
        };
        let (_writer, status) = tokio::join!(send, receive);
        status
    }

    async fn open_channel(&self) -> Result<Channel<Msg>, SshError> {
        self.handle
            .channel_open_session()
            .await
            .map_err(|e| self.protocol(e))
    }

    /// A new channel running `command` (always a [`Script::command`]).
    async fn open_exec(&self, command: &str) -> Result<Channel<Msg>, SshError> {
        let channel = self.open_channel().await?;
        channel
            .exec(true, command)
            .await
            .map_err(|e| self.protocol(e))?;
        Ok(channel)
    }

    /// Starts `script` and returns it running, for scripts that live as long as fleet needs
    /// them (a lock held while its stdin stays open).
    pub async fn start(&self, script: &Script) -> Result<RemoteProcess, SshError> {
        let text = script.stdin();
        let channel = self.open_exec(&Script::command(text.len())).await?;
        channel
            .data(text.as_slice())
            .await
            .map_err(|e| self.protocol(e))?;
        Ok(RemoteProcess {
            host: self.target.name.clone(),
            channel,
            stdout: Vec::new(),
            stderr: Vec::new(),
        })
    }

    /// An SFTP session on its own channel.
    pub async fn sftp(&self) -> Result<RawSftpSession, SshError> {
        let channel = self.open_channel().await?;
        channel
            .request_subsystem(true, "sftp")
            .await
            .map_err(|e| self.protocol(e))?;
        let config = russh_sftp::client::Config {
            // The default 16 writes in flight are bound by latency on a real network.
            max_concurrent_writes: 64,
            request_timeout_secs: 120,
            ..Default::default()
        };
        let sftp = RawSftpSession::new_with_config(channel.into_stream(), config);
        sftp.init().await.map_err(|e| SshError::Lost {
            host: self.target.name.clone(),
            reason: format!("SFTP did not start: {e}"),
        })?;
        Ok(sftp)
    }

    /// Runs `script` and returns its exit status with everything it printed.
    pub async fn capture(
        &self,
        script: &Script,
    ) -> Result<(ExitStatus, Vec<u8>, Vec<u8>), SshError> {
        self.capture_with_input(script, &[]).await
    }

    /// Runs `script` with `input` on its stdin and returns its exit status and output.
    pub async fn capture_with_input(
        &self,
        script: &Script,
        input: &[u8],
    ) -> Result<(ExitStatus, Vec<u8>, Vec<u8>), SshError> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let status = self
            .exec_with_input(script, input, |stream, data| match stream {
                Stream::Stdout => stdout.extend_from_slice(data),
                Stream::Stderr => stderr.extend_from_slice(data),
            })
            .await?;
        Ok((status, stdout, stderr))
    }

    /// Says goodbye to the host; errors are irrelevant at this point.
    pub async fn close(self) {
        let _ = self
            .handle
            .disconnect(Disconnect::ByApplication, "", "en")
            .await;
    }
}

fn signal_text(signal: &russh::Sig) -> String {
    match signal {
        russh::Sig::Custom(name) => name.clone(),
        other => format!("{other:?}"),
    }
}

/// A command still running on a host, started by [`Session::start`].
pub struct RemoteProcess {
    host: String,
    channel: Channel<Msg>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl RemoteProcess {
    /// The next line the command printed on stdout; `Ok(None)` once it ended (its stderr and
    /// exit status are then in the error it returns from [`RemoteProcess::finish`]).
    pub async fn next_line(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.stdout.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.stdout.drain(..=i).collect();
                return Some(String::from_utf8_lossy(&line[..i]).into_owned());
            }
            match self.channel.wait().await? {
                ChannelMsg::Data { data } => self.stdout.extend_from_slice(&data),
                ChannelMsg::ExtendedData { data, .. } => self.stderr.extend_from_slice(&data),
                ChannelMsg::Eof | ChannelMsg::Close => return None,
                _ => {}
            }
        }
    }

    /// The next `length` bytes of its stdout; `None` if it ends first.
    pub async fn next_bytes(&mut self, length: usize) -> Option<Vec<u8>> {
        while self.stdout.len() < length {
            match self.channel.wait().await? {
                ChannelMsg::Data { data } => self.stdout.extend_from_slice(&data),
                ChannelMsg::ExtendedData { data, .. } => self.stderr.extend_from_slice(&data),
                ChannelMsg::Eof | ChannelMsg::Close => return None,
                _ => {}
            }
        }
        Some(self.stdout.drain(..length).collect())
    }

    /// What the command printed on stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).trim().to_string()
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// Closes its stdin and waits for it to end.
    pub async fn finish(mut self) {
        let _ = self.channel.eof().await;
        while self.channel.wait().await.is_some() {}
    }
}
