//! Where and as whom to connect for one inventory host.
//!
//! Precedence, most specific first: the `[[host]]` entry itself, then `~/.ssh/config` for its
//! address (so an alias's HostName, Port, User and IdentityFile work as they do with `ssh`),
//! then the inventory's `[fleet]` defaults, then OpenSSH's own defaults (port 22, the local user).

use std::path::PathBuf;

use super::config::SshConfig;
use crate::inventory::{Host, Inventory};

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
        let params = config.query(&host.address);
        let addr = params.host_name.unwrap_or_else(|| host.address.clone());
        let port = host
            .ssh
            .port
            .or(params.port)
            .or(inventory.defaults.port)
            .unwrap_or(22);
        let user = host
            .ssh
            .user
            .clone()
            .or(params.user)
            .or_else(|| inventory.defaults.user.clone())
            .unwrap_or_else(local_user);
        let identities = match (
            &host.ssh.identity,
            params.identity_files,
            &inventory.defaults.identity,
        ) {
            (Some(own), _, _) => vec![own.clone()],
            (None, files, _) if !files.is_empty() => files,
            (None, _, Some(default)) => vec![default.clone()],
            _ => Vec::new(),
        };
        Target {
            name: host.name.clone(),
            addr,
            port,
            user,
            identities,
        }
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

    use std::path::Path;

    fn config(text: &str) -> SshConfig {
        SshConfig::parse(text).unwrap()
    }

    fn inventory(text: &str) -> Inventory {
        Inventory::from_toml(Path::new("fleet.toml"), text).unwrap()
    }

    #[test]
    fn alias_supplies_what_the_host_entry_leaves_out() {
        let inv = inventory(
            "[fleet]\nuser = \"trainer\"\n[[host]]\nname = \"a\"\naddress = \"gpu1\"\n[[host]]\nname = \"b\"\naddress = \"gpu2\"\nuser = \"bob\"\nport = 23\n",
        );
        let cfg = config(
            "Host gpu*\n  HostName %h.lab\n  Port 2222\n  User alice\n  IdentityFile /keys/lab\n",
        );
        let a = Target::resolve(&inv, &inv.hosts[0], &cfg);
        assert_eq!(
            (a.addr.as_str(), a.port, a.user.as_str()),
            ("gpu1.lab", 2222, "alice")
        );
        assert_eq!(a.identities, [PathBuf::from("/keys/lab")]);
        let b = Target::resolve(&inv, &inv.hosts[1], &cfg);
        assert_eq!(
            (b.addr.as_str(), b.port, b.user.as_str()),
            ("gpu2.lab", 23, "bob")
        );
    }

    #[test]
    fn fleet_defaults_fill_in_without_a_config() {
        let inv = inventory(
            "[fleet]\nuser = \"trainer\"\nidentity = \"/k\"\nport = 2200\n[[host]]\naddress = \"10.0.0.1\"\n",
        );
        let t = Target::resolve(&inv, &inv.hosts[0], &SshConfig::default());
        assert_eq!(
            t,
            Target {
                name: "10.0.0.1".into(),
                addr: "10.0.0.1".into(),
                port: 2200,
                user: "trainer".into(),
                identities: vec!["/k".into()]
            }
        );
        assert_eq!(t.endpoint(), "10.0.0.1:2200");
    }
}
