//! Client keys: read once before any host is dialled (so an encrypted key asks for its
//! passphrase once, not once per host), then offered to each host in turn.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use russh::client::{Handle, Handler};
use russh::keys::agent::AgentIdentity;
use russh::keys::agent::client::AgentClient;
use russh::keys::{self, PrivateKey, PrivateKeyWithHashAlg};

use super::{SshError, Target};
use crate::inventory::expand_tilde;

/// OpenSSH's default identities, tried when the inventory and ~/.ssh/config name none.
const DEFAULT_KEYS: [&str; 3] = ["~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa"];

/// The keys this run may offer.
#[derive(Debug, Default)]
pub struct Keyring {
    /// Identity files named for some host, or why each could not be read.
    named: HashMap<PathBuf, Result<Arc<PrivateKey>, String>>,
    /// Default key files that exist and could be read.
    defaults: Vec<(PathBuf, Arc<PrivateKey>)>,
    /// `SSH_AUTH_SOCK` is set.
    agent: bool,
}

impl Keyring {
    /// Reads every identity the targets need. With `interactive`, an encrypted key asks for its
    /// passphrase on the terminal unless ssh-agent holds it already (then the agent signs).
    pub async fn load(targets: &[&Target], interactive: bool) -> Keyring {
        let agent = std::env::var_os("SSH_AUTH_SOCK").is_some_and(|s| !s.is_empty());
        let held = if agent && interactive {
            agent_keys().await
        } else {
            Vec::new()
        };
        let ask = |path: &Path| {
            interactive
                && !public_key_of(path)
                    .is_some_and(|key| held.iter().any(|h| h.key_data() == key.key_data()))
        };
        let mut named = HashMap::new();
        for path in targets.iter().flat_map(|t| &t.identities) {
            if !named.contains_key(path) {
                named.insert(path.clone(), read_key(path, ask(path)).map(Arc::new));
            }
        }
        let defaults = if targets.iter().any(|t| t.identities.is_empty()) {
            DEFAULT_KEYS
                .iter()
                .map(|p| expand_tilde(p))
                .filter(|p| p.is_file())
                .filter_map(|p| read_key(&p, ask(&p)).ok().map(|k| (p, Arc::new(k))))
                .collect()
        } else {
            Vec::new()
        };
        Keyring {
            named,
            defaults,
            agent,
        }
    }

    /// Offers this run's keys to the host until one is accepted.
    pub async fn authenticate<H: Handler>(
        &self,
        handle: &mut Handle<H>,
        target: &Target,
    ) -> Result<(), SshError> {
        let mut tried = Vec::new();
        let protocol = |source| SshError::Protocol {
            host: target.name.clone(),
            source,
        };
        let hash = handle
            .best_supported_rsa_hash()
            .await
            .map_err(protocol)?
            .flatten();
        for path in &target.identities {
            match self.named.get(path) {
                Some(Ok(key)) => {
                    let offer = PrivateKeyWithHashAlg::new(key.clone(), hash);
                    if handle
                        .authenticate_publickey(&target.user, offer)
                        .await
                        .map_err(protocol)?
                        .success()
                    {
                        return Ok(());
                    }
                    tried.push(path.display().to_string());
                }
                Some(Err(why)) => tried.push(format!("{} ({why})", path.display())),
                None => tried.push(format!("{} (not loaded)", path.display())),
            }
        }
        if self.agent && !target.identities_only {
            match try_agent(handle, target, hash, &mut tried).await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => tried.push(format!("ssh-agent ({e})")),
            }
        }
        if target.identities.is_empty() {
            for (path, key) in &self.defaults {
                let offer = PrivateKeyWithHashAlg::new(key.clone(), hash);
                if handle
                    .authenticate_publickey(&target.user, offer)
                    .await
                    .map_err(protocol)?
                    .success()
                {
                    return Ok(());
                }
                tried.push(path.display().to_string());
            }
        }
        let hint = if tried.is_empty() {
            "no key at all: set `identity` in the inventory, or start ssh-agent and add a key"
                .to_string()
        } else {
            format!(
                ". Is the public key in ~{}/.ssh/authorized_keys on the host? (ssh-copy-id -i KEY.pub {}@{})",
                target.user, target.user, target.addr
            )
        };
        if tried.is_empty() {
            tried.push("nothing".to_string());
        }
        Err(SshError::Auth {
            host: target.name.clone(),
            user: target.user.clone(),
            tried,
            hint,
        })
    }
}

async fn try_agent<H: Handler>(
    handle: &mut Handle<H>,
    target: &Target,
    hash: Option<keys::HashAlg>,
    tried: &mut Vec<String>,
) -> Result<bool, String> {
    let mut agent = AgentClient::connect_env()
        .await
        .map_err(|e| e.to_string())?;
    let identities = agent
        .request_identities()
        .await
        .map_err(|e| e.to_string())?;
    for identity in identities {
        let AgentIdentity::PublicKey { key, comment } = identity else {
            continue;
        };
        let hash = if key.algorithm().is_rsa() { hash } else { None };
        if handle
            .authenticate_publickey_with(&target.user, key, hash, &mut agent)
            .await
            .map_err(|e| e.to_string())?
            .success()
        {
            return Ok(true);
        }
        tried.push(format!(
            "ssh-agent key {}",
            if comment.is_empty() {
                "(no comment)"
            } else {
                &comment
            }
        ));
    }
    Ok(false)
}

/// The public keys ssh-agent holds (none when it cannot be asked).
async fn agent_keys() -> Vec<keys::PublicKey> {
    let Ok(mut agent) = AgentClient::connect_env().await else {
        return Vec::new();
    };
    agent
        .request_identities()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter_map(|identity| match identity {
            AgentIdentity::PublicKey { key, .. } => Some(key),
            _ => None,
        })
        .collect()
}

/// The public half of a key file, without its passphrase: an OpenSSH key stores it in clear,
/// and `KEY.pub` beside it has it too.
fn public_key_of(path: &Path) -> Option<keys::PublicKey> {
    let text = std::fs::read_to_string(path).ok()?;
    PrivateKey::from_openssh(&text)
        .ok()
        .map(|key| key.public_key().clone())
        .or_else(|| keys::load_public_key(format!("{}.pub", path.display())).ok())
}

/// Reads a private key, asking for its passphrase when `ask` and it is encrypted.
fn read_key(path: &Path, ask: bool) -> Result<PrivateKey, String> {
    match keys::load_secret_key(path, None) {
        Ok(key) => Ok(key),
        Err(keys::Error::KeyIsEncrypted) if ask => {
            let term = console::Term::stderr();
            for _ in 0..3 {
                let _ = term.write_str(&format!("Enter passphrase for key {}: ", path.display()));
                let passphrase = term
                    .read_secure_line()
                    .map_err(|e| format!("cannot read the passphrase: {e}"))?;
                match keys::load_secret_key(path, Some(&passphrase)) {
                    Ok(key) => return Ok(key),
                    Err(_) => {
                        let _ = term.write_line("Wrong passphrase.");
                    }
                }
            }
            Err("wrong passphrase".to_string())
        }
        Err(keys::Error::KeyIsEncrypted) => Err(format!(
            "encrypted; add it to ssh-agent with `ssh-add {}`, or run fleet in a terminal to be asked for its passphrase",
            path.display()
        )),
        Err(keys::Error::IO(e)) => Err(e.to_string()),
        Err(e) => Err(format!("not a usable private key: {e}")),
    }
}
