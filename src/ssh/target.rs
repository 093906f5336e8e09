//! Where and as whom to connect for one inventory host.
//!
//! Precedence, most specific first: the `[[host]]` entry itself, then `~/.ssh/config` for its
//! address (so an alias's HostName, Port, User and IdentityFile work as they do with `ssh`),
//! then the inventory's `[fleet]` defaults, then OpenSSH's own defaults (port 22, the local user).

use std::path::{Path, PathBuf};

use ssh2_config::{ParseRule, SshConfig as ParsedConfig};

use crate::inventory::{Host, Inventory, expand_tilde};

/// The user's `~/.ssh/config`, or nothing when there is none.
#[derive(Debug, Default)]
pub struct SshConfig {
    parsed: Option<ParsedConfig>,
}

impl SshConfig {
    /// Reads `$HOME/.ssh/config` when it exists.
    pub fn load_user() -> anyhow::Result<SshConfig> {
        let path = expand_tilde("~/.ssh/config");
        if !path.is_file() {
            return Ok(SshConfig::default());
        }
        Self::load(&path)
    }

    pub fn load(path: &Path) -> anyhow::Result<SshConfig> {
        let file = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let mut reader = std::io::BufReader::new(file);
        let parsed = ParsedConfig::default()
            .parse(&mut reader, ParseRule::ALLOW_UNKNOWN_FIELDS)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(SshConfig { parsed: Some(parsed) })
    }
}

/// A host ready to be dialled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The inventory name, used in every message.
    pub name: String,
    /// What is dialled and looked up in known_hosts.
    pub addr: String,
    pub port: u16,
    pub user: String,
    /// Key files to offer; empty means ssh-agent, then the default key files.
    pub identities: Vec<PathBuf>,
}

impl Target {
    pub fn resolve(inventory: &Inventory, host: &Host, config: &SshConfig) -> Target {
        let params = config.parsed.as_ref().map(|c| c.query(&host.address));
        let params = params.as_ref();
        let addr = params
            .and_then(|p| p.host_name.as_deref())
            .map(|h| h.replace("%h", &host.address).replace("%%", "%"))
            .unwrap_or_else(|| host.address.clone());
        let port = host.ssh.port.or(params.and_then(|p| p.port)).or(inventory.defaults.port).unwrap_or(22);
        let user = host
            .ssh
            .user
            .clone()
            .or_else(|| params.and_then(|p| p.user.clone()))
            .or_else(|| inventory.defaults.user.clone())
            .unwrap_or_else(local_user);
        let from_config = || -> Option<Vec<PathBuf>> {
            let files = params?.identity_file.as_ref()?;
            Some(files.iter().map(|f| expand_tilde(&f.to_string_lossy())).collect())
        };
        let identities = match (&host.ssh.identity, from_config(), &inventory.defaults.identity) {
            (Some(own), _, _) => vec![own.clone()],
            (None, Some(files), _) if !files.is_empty() => files,
            (None, _, Some(default)) => vec![default.clone()],
            _ => Vec::new(),
        };
        Target { name: host.name.clone(), addr, port, user, identities }
    }

    /// `addr:port` as people write it (IPv6 in brackets).
    pub fn endpoint(&self) -> String {
        if self.addr.contains(':') {
            format!("[{}]:{}", self.addr, self.port)
        } else {
            format!("{}:{}", self.addr, self.port)
        }
    }
}

fn local_user() -> String {
    ["USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "root".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> SshConfig {
        let parsed = ParsedConfig::default().parse(&mut text.as_bytes(), ParseRule::ALLOW_UNKNOWN_FIELDS).unwrap();
        SshConfig { parsed: Some(parsed) }
    }

    fn inventory(text: &str) -> Inventory {
        Inventory::from_toml(Path::new("fleet.toml"), text).unwrap()
    }

    #[test]
    fn alias_supplies_what_the_host_entry_leaves_out() {
        let inv = inventory("[fleet]\nuser = \"trainer\"\n[[host]]\nname = \"a\"\naddress = \"gpu1\"\n[[host]]\nname = \"b\"\naddress = \"gpu2\"\nuser = \"bob\"\nport = 23\n");
        let cfg = config("Host gpu*\n  HostName %h.lab\n  Port 2222\n  User alice\n  IdentityFile /keys/lab\n");
        let a = Target::resolve(&inv, &inv.hosts[0], &cfg);
        assert_eq!((a.addr.as_str(), a.port, a.user.as_str()), ("gpu1.lab", 2222, "alice"));
        assert_eq!(a.identities, [PathBuf::from("/keys/lab")]);
        let b = Target::resolve(&inv, &inv.hosts[1], &cfg);
        assert_eq!((b.addr.as_str(), b.port, b.user.as_str()), ("gpu2.lab", 23, "bob"));
    }

    #[test]
    fn fleet_defaults_fill_in_without_a_config() {
        let inv = inventory("[fleet]\nuser = \"trainer\"\nidentity = \"/k\"\nport = 2200\n[[host]]\naddress = \"10.0.0.1\"\n");
        let t = Target::resolve(&inv, &inv.hosts[0], &SshConfig::default());
        assert_eq!(t, Target { name: "10.0.0.1".into(), addr: "10.0.0.1".into(), port: 2200, user: "trainer".into(), identities: vec!["/k".into()] });
        assert_eq!(t.endpoint(), "10.0.0.1:2200");
    }
}
