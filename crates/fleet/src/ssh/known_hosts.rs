//! Host-key verification against an OpenSSH known_hosts file.
//!
//! A key that matches is accepted. A host with no recorded key is refused with its fingerprint
//! and the way to trust it, unless the user asked to accept new keys (OpenSSH's
//! `StrictHostKeyChecking=accept-new`), in which case the key is recorded. A host whose key
//! differs from the recorded one is always refused and the file is never touched.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use russh::keys::{self, HashAlg, PublicKey};

use super::Target;

#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error(
        "{host}: host key of {endpoint} is not known. It offers {algorithm} key {fingerprint}. Nothing was run. \
         If this is the right machine (compare with `ssh-keygen -lf /etc/ssh/ssh_host_{short}_key.pub` on it), \
         run again with --accept-new-host-keys to record it in {}",
        known_hosts.display()
    )]
    Unknown {
        host: String,
        endpoint: String,
        algorithm: String,
        short: String,
        fingerprint: String,
        known_hosts: PathBuf,
    },
    #[error(
        "{host}: HOST KEY CHANGED for {endpoint}! It now offers {algorithm} key {fingerprint}, which is not the key \
         recorded in {}. Someone may be intercepting the connection, or the machine was reinstalled. Nothing was run \
         and known_hosts was not modified. If the change is expected, remove the old key with \
         `ssh-keygen -R '{endpoint}' -f {}` and connect again",
        known_hosts.display(), known_hosts.display()
    )]
    Changed {
        host: String,
        endpoint: String,
        algorithm: String,
        fingerprint: String,
        known_hosts: PathBuf,
    },
    #[error(
        "{host}: host key {fingerprint} of {endpoint} is marked @revoked in {}: it must never be trusted. Nothing was run",
        known_hosts.display()
    )]
    Revoked {
        host: String,
        endpoint: String,
        fingerprint: String,
        known_hosts: PathBuf,
    },
    #[error(
        "{host}: {endpoint} offered a host certificate; fleet checks plain host keys against known_hosts only"
    )]
    Certificate { host: String, endpoint: String },
    #[error("{host}: cannot read {}: {message}", known_hosts.display())]
    Unreadable {
        host: String,
        known_hosts: PathBuf,
        message: String,
    },
    #[error("{host}: cannot record the host key in {}: {message}", known_hosts.display())]
    Record {
        host: String,
        known_hosts: PathBuf,
        message: String,
    },
}

/// A key recorded because of `--accept-new-host-keys`.
#[derive(Clone, Debug)]
pub struct Learned {
    pub host: String,
    pub endpoint: String,
    pub fingerprint: String,
}

/// Which known_hosts file to trust, and whether new keys may be added to it.
#[derive(Debug)]
pub struct HostKeyPolicy {
    known_hosts: PathBuf,
    accept_new: bool,
    /// Keys recorded in this run; the lock also keeps concurrent appends from interleaving.
    learned: Mutex<Vec<Learned>>,
    /// New keys the user confirmed by fingerprint (`fleet init`), by endpoint.
    confirmed: std::collections::HashMap<String, String>,
}

impl HostKeyPolicy {
    pub fn new(known_hosts: PathBuf, accept_new: bool) -> Self {
        HostKeyPolicy {
            known_hosts,
            accept_new,
            learned: Mutex::new(Vec::new()),
            confirmed: Default::default(),
        }
    }

    /// Also records new keys whose fingerprint the user confirmed, by endpoint (`[addr]:port`,
    /// or `addr` for port 22); any other new key is still refused.
    pub fn with_confirmed(mut self, confirmed: std::collections::HashMap<String, String>) -> Self {
        self.confirmed = confirmed;
        self
    }

    pub fn known_hosts(&self) -> &std::path::Path {
        &self.known_hosts
    }

    /// The known_hosts files for `target`: its own (ssh_config's UserKnownHostsFile), else
    /// this policy's. New keys are recorded in the first.
    fn files<'a>(&'a self, target: &'a Target) -> &'a [PathBuf] {
        if target.known_hosts.is_empty() {
            std::slice::from_ref(&self.known_hosts)
        } else {
            &target.known_hosts
        }
    }

    /// Decides whether `key`, offered by `target` (under its own name and address), is trusted.
    //
    // The refusal carries what the message shows (fingerprint, file, endpoint); it happens once
    // per host and connection, so its size costs nothing.
    #[allow(clippy::result_large_err)]
    pub fn verify(&self, target: &Target, key: &PublicKey) -> Result<(), HostKeyError> {
        let (host, addr, port) = (target.name.as_str(), target.addr.as_str(), target.port);
        let endpoint = if port == 22 {
            addr.to_string()
        } else {
            format!("[{addr}]:{port}")
        };
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        let algorithm = key.algorithm().to_string();
        let files = self.files(target);
        if let Some(file) = files.iter().find(|f| is_revoked(f, key)) {
            return Err(HostKeyError::Revoked {
                host: host.to_string(),
                endpoint,
                fingerprint,
                known_hosts: file.clone(),
            });
        }
        for file in files {
            match keys::check_known_hosts_path(addr, port, key, file) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(keys::Error::KeyChanged { .. }) => {
                    return Err(HostKeyError::Changed {
                        host: host.to_string(),
                        endpoint,
                        algorithm,
                        fingerprint,
                        known_hosts: file.clone(),
                    });
                }
                // A UserKnownHostsFile that does not exist yet holds no keys, as in OpenSSH.
                Err(_) if !file.exists() => {}
                Err(e) => {
                    return Err(HostKeyError::Unreadable {
                        host: host.to_string(),
                        known_hosts: file.clone(),
                        message: e.to_string(),
                    });
                }
            }
        }
        let first = &files[0];
        if self.accept_new
            || target.accept_new
            || self.confirmed.get(&endpoint) == Some(&fingerprint)
        {
            let mut learned = self
                .learned
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            keys::known_hosts::learn_known_hosts_path(addr, port, key, first).map_err(|e| {
                HostKeyError::Record {
                    host: host.to_string(),
                    known_hosts: first.clone(),
                    message: e.to_string(),
                }
            })?;
            learned.push(Learned {
                host: host.to_string(),
                endpoint,
                fingerprint,
            });
            return Ok(());
        }
        Err(HostKeyError::Unknown {
            host: host.to_string(),
            short: algorithm
                .trim_start_matches("ssh-")
                .split('-')
                .next()
                .unwrap_or("ed25519")
                .to_string(),
            endpoint,
            algorithm,
            fingerprint,
            known_hosts: first.clone(),
        })
    }

    /// The host-key algorithms of the keys known for `addr:port`, to ask the host for those
    /// first: a host known only by its ECDSA or RSA key would otherwise offer its Ed25519 key,
    /// which is not known.
    pub fn known_algorithms(&self, target: &Target) -> Vec<keys::Algorithm> {
        let known = self.files(target).iter().flat_map(|file| {
            keys::known_hosts::known_host_keys_path(&target.addr, target.port, file)
                .unwrap_or_default()
        });
        let mut algorithms = Vec::new();
        for (_, key) in known {
            let offered = match key.algorithm() {
                keys::Algorithm::Rsa { .. } => vec![
                    keys::Algorithm::Rsa {
                        hash: Some(HashAlg::Sha512),
                    },
                    keys::Algorithm::Rsa {
                        hash: Some(HashAlg::Sha256),
                    },
                ],
                other => vec![other],
            };
            for algorithm in offered {
                if !algorithms.contains(&algorithm) {
                    algorithms.push(algorithm);
                }
            }
        }
        algorithms
    }

    /// The keys recorded so far in this run.
    pub fn learned(&self) -> Vec<Learned> {
        self.learned
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// Whether `key` is on a `@revoked` line of `file` (whatever hosts the line names: a revoked
/// key is never trusted).
fn is_revoked(file: &Path, key: &PublicKey) -> bool {
    let Ok(text) = std::fs::read_to_string(file) else {
        return false;
    };
    text.lines()
        .filter_map(|line| line.trim_start().strip_prefix("@revoked"))
        .filter_map(|rest| rest.split_whitespace().nth(2))
        .filter_map(|blob| keys::parse_public_key_base64(blob).ok())
        .any(|revoked| revoked.key_data() == key.key_data())
}
