//! Where, as whom and through which hosts to connect for one inventory host.
//!
//! Precedence, most specific first: the `[[host]]` entry itself, then `~/.ssh/config` for its
//! address (so an alias's HostName, Port, User, IdentityFile and ProxyJump work as they do with
//! `ssh`), then the inventory's `[fleet]` defaults, then OpenSSH's own defaults (port 22, the
//! local user). A jump host is resolved the same way from what its `jump`/`ProxyJump` item
//! says; the first hop also follows its own ProxyJump, as `ssh -J` does.

use std::path::PathBuf;
use std::time::Duration;

use super::config::{Asker, HostParams, SshConfig, Strict};
use crate::inventory::{Hop, Host, Inventory, SshSettings};

/// How long a jump chain may be, counting the hops a first hop brings with it.
const MAX_HOPS: usize = 8;

/// A host ready to be dialled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The inventory name (a hop: its name as written), used in every message.
    pub name: String,
    /// What is dialled and looked up in known_hosts.
    pub addr: String,
    pub port: u16,
    pub user: String,
    /// Key files to offer; empty means ssh-agent, then the default key files.
    pub identities: Vec<PathBuf>,
    /// `IdentitiesOnly yes`: the listed key files alone, not the agent's keys.
    pub identities_only: bool,
    /// ~/.ssh/config's UserKnownHostsFile; empty: the inventory's (or ~/.ssh/known_hosts).
    pub known_hosts: Vec<PathBuf>,
    /// `StrictHostKeyChecking accept-new` for this host.
    pub accept_new: bool,
    /// `ConnectTimeout`, `ServerAliveInterval` and `ServerAliveCountMax` for this host.
    pub connect_timeout: Option<Duration>,
    pub keepalive: Option<Duration>,
    pub keepalive_max: Option<usize>,
    /// The jump hosts to go through, first dialled first (each with an empty `via`).
    pub via: Vec<Target>,
}

/// Why a host's connection settings cannot be used: names the host and the file and line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TargetError(String);

impl Target {
    /// Resolves `host`; warnings are what ~/.ssh/config says that fleet does not apply.
    pub fn resolve(
        inventory: &Inventory,
        host: &Host,
        config: &SshConfig,
        warnings: &mut Vec<String>,
    ) -> Result<Target, TargetError> {
        let resolver = Resolver {
            inventory,
            config,
            warnings,
        };
        resolver.target(host)
    }

    /// `addr:port` as people write it (IPv6 in brackets).
    pub fn endpoint(&self) -> String {
        if self.addr.contains(':') {
            format!("[{}]:{}", self.addr, self.port)
        } else {
            format!("{}:{}", self.addr, self.port)
        }
    }

    /// Every target this one needs a key for: its hops and itself.
    pub fn all_hops(&self) -> impl Iterator<Item = &Target> {
        self.via.iter().chain(std::iter::once(self))
    }
}

struct Resolver<'a> {
    inventory: &'a Inventory,
    config: &'a SshConfig,
    warnings: &'a mut Vec<String>,
}

impl Resolver<'_> {
    fn target(mut self, host: &Host) -> Result<Target, TargetError> {
        let defaults = &self.inventory.defaults;
        let user = host.ssh.user.clone().or_else(|| defaults.user.clone());
        let params = self.query(&host.address, user);
        let mut target = self.settle(&host.name, &host.address, &host.ssh, params.clone())?;
        let jump = match &host.ssh.jump {
            Some(own) => own.clone(),
            None => self
                .config_jump(&host.name, &params)?
                .unwrap_or_else(|| defaults.jump.clone().unwrap_or_default()),
        };
        target.via = self.chain(&host.name, &jump, 0)?;
        Ok(target)
    }

    fn query(&mut self, address: &str, user: Option<String>) -> HostParams {
        let params = self.config.query(address, &Asker::here(user));
        for warning in &params.warnings {
            if !self.warnings.contains(warning) {
                self.warnings.push(warning.clone());
            }
        }
        params
    }

    /// ~/.ssh/config's ProxyJump for a host, parsed; `None` when it names none.
    fn config_jump(
        &self,
        name: &str,
        params: &HostParams,
    ) -> Result<Option<Vec<Hop>>, TargetError> {
        params
            .proxy_jump
            .as_ref()
            .map(|(text, place)| {
                crate::inventory::parse_jump(text)
                    .map_err(|why| TargetError(format!("{name}: {place}: ProxyJump {why}")))
            })
            .transpose()
    }

    /// One host's settings: `own` (the `[[host]]` entry or the hop's `user@…:port`), then the
    /// config's, then `[fleet]`'s.
    fn settle(
        &self,
        name: &str,
        address: &str,
        own: &SshSettings,
        params: HostParams,
    ) -> Result<Target, TargetError> {
        let defaults = &self.inventory.defaults;
        let accept_new = match params.strict {
            Some(Strict::No(place)) => {
                return Err(TargetError(format!(
                    "{name}: {place}: StrictHostKeyChecking no is refused: fleet never skips host keys. \
                     Use accept-new (or --accept-new-host-keys) to record a new host's key"
                )));
            }
            Some(Strict::AcceptNew) => true,
            Some(Strict::Yes) | None => false,
        };
        let identities = match (&own.identity, params.identity_files, &defaults.identity) {
            (Some(own), _, _) => vec![own.clone()],
            (None, files, _) if !files.is_empty() => files,
            (None, _, Some(default)) => vec![default.clone()],
            _ => Vec::new(),
        };
        Ok(Target {
            name: name.to_string(),
            addr: params.host_name.unwrap_or_else(|| address.to_string()),
            port: own.port.or(params.port).or(defaults.port).unwrap_or(22),
            user: own
                .user
                .clone()
                .or(params.user)
                .or_else(|| defaults.user.clone())
                .unwrap_or_else(super::config::local_user),
            identities,
            identities_only: params.identities_only.unwrap_or(false),
            known_hosts: if self.inventory.known_hosts.is_some() {
                Vec::new()
            } else {
                params.known_hosts_files
            },
            accept_new,
            connect_timeout: params.connect_timeout,
            keepalive: params.alive_interval,
            keepalive_max: params.alive_count,
            via: Vec::new(),
        })
    }

    /// The hops of `jump`, resolved: the first brings its own ProxyJump along.
    fn chain(
        &mut self,
        name: &str,
        jump: &[Hop],
        depth: usize,
    ) -> Result<Vec<Target>, TargetError> {
        let mut via = Vec::new();
        for (i, hop) in jump.iter().enumerate() {
            let user = hop
                .user
                .clone()
                .or_else(|| self.inventory.defaults.user.clone());
            let params = self.query(&hop.host, user);
            let own = SshSettings {
                port: hop.port,
                user: hop.user.clone(),
                identity: None,
                jump: None,
            };
            if i == 0 {
                if let Some(before) = self.config_jump(&hop.host, &params)? {
                    if depth + jump.len() + before.len() > MAX_HOPS {
                        return Err(TargetError(format!(
                            "{name}: the jump chain through {hop} is longer than {MAX_HOPS} hops \
                             (does a ProxyJump lead back to itself? `Host * !{}` keeps a bastion out of `Host *`)",
                            hop.host
                        )));
                    }
                    via.extend(self.chain(name, &before, depth + jump.len())?);
                }
            }
            via.push(self.settle(&hop.host, &hop.host, &own, params)?);
        }
        Ok(via)
    }
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

    fn resolve(inv: &Inventory, i: usize, cfg: &SshConfig) -> Target {
        Target::resolve(inv, &inv.hosts[i], cfg, &mut Vec::new()).unwrap()
    }

    #[test]
    fn alias_supplies_what_the_host_entry_leaves_out() {
        let inv = inventory(
            "[fleet]\nuser = \"trainer\"\n[[host]]\nname = \"a\"\naddress = \"gpu1\"\n[[host]]\nname = \"b\"\naddress = \"gpu2\"\nuser = \"bob\"\nport = 23\n",
        );
        let cfg = config(
            "Host gpu*\n  HostName %h.lab\n  Port 2222\n  User alice\n  IdentityFile /keys/lab\n",
        );
        let a = resolve(&inv, 0, &cfg);
        assert_eq!(
            (a.addr.as_str(), a.port, a.user.as_str()),
            ("gpu1.lab", 2222, "alice")
        );
        assert_eq!(a.identities, [PathBuf::from("/keys/lab")]);
        let b = resolve(&inv, 1, &cfg);
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
        let t = resolve(&inv, 0, &SshConfig::default());
        assert_eq!(
            (t.name.as_str(), t.addr.as_str(), t.port, t.user.as_str()),
            ("10.0.0.1", "10.0.0.1", 2200, "trainer")
        );
        assert_eq!(t.identities, [PathBuf::from("/k")]);
        assert!(t.via.is_empty());
        assert_eq!(t.endpoint(), "10.0.0.1:2200");
    }

    /// The layout: ProxyJump from a shared block, HostName per host, the bastion's own
    /// user and address from its block.
    #[test]
    fn proxy_jump_goes_through_the_bastion_as_its_block_describes_it() {
        let inv = inventory("[fleet]\nuser = \"trainer\"\n[[host]]\naddress = \"gpu1\"\n");
        let cfg = config(
            "Host bastion\n  HostName 10.0.0.5\n  User me\nHost gpu1 gpu2 gpu3\n  ProxyJump bastion\nHost gpu1\n  HostName 192.168.10.11\n",
        );
        let t = resolve(&inv, 0, &cfg);
        assert_eq!(
            (t.addr.as_str(), t.user.as_str()),
            ("192.168.10.11", "trainer")
        );
        assert_eq!(t.via.len(), 1);
        let hop = &t.via[0];
        assert_eq!(
            (
                hop.name.as_str(),
                hop.addr.as_str(),
                hop.port,
                hop.user.as_str()
            ),
            ("bastion", "10.0.0.5", 22, "me")
        );
    }

    #[test]
    fn jump_in_the_inventory_chains_and_none_turns_it_off() {
        let inv = inventory(
            "[fleet]\nuser = \"trainer\"\nidentity = \"/k\"\njump = \"ops@10.0.0.5:2222,10.0.1.1\"\n[[host]]\naddress = \"10.0.2.1\"\n[[host]]\naddress = \"10.0.2.2\"\njump = \"none\"\n",
        );
        let cfg = SshConfig::default();
        let t = resolve(&inv, 0, &cfg);
        let hops: Vec<(String, u16, String)> = t
            .via
            .iter()
            .map(|h| (h.addr.clone(), h.port, h.user.clone()))
            .collect();
        assert_eq!(
            hops,
            [
                ("10.0.0.5".to_string(), 2222, "ops".to_string()),
                ("10.0.1.1".to_string(), 22, "trainer".to_string())
            ]
        );
        assert_eq!(t.via[1].identities, [PathBuf::from("/k")]);
        assert!(resolve(&inv, 1, &cfg).via.is_empty());
    }

    #[test]
    fn a_first_hop_brings_its_own_proxy_jump_and_a_loop_is_refused() {
        let inv = inventory("[[host]]\naddress = \"gpu1\"\n[[host]]\naddress = \"gpu2\"\n");
        let cfg = config(
            "Host gpu1\n  ProxyJump inner\nHost inner\n  ProxyJump outer\nHost gpu2\n  ProxyJump loop\nHost loop\n  ProxyJump loop\n",
        );
        let names: Vec<String> = resolve(&inv, 0, &cfg)
            .via
            .into_iter()
            .map(|h| h.name)
            .collect();
        assert_eq!(names, ["outer", "inner"]);
        let error = Target::resolve(&inv, &inv.hosts[1], &cfg, &mut Vec::new()).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("gpu2: the jump chain through loop is longer"),
            "{error}"
        );
    }

    #[test]
    fn strict_host_key_checking_no_is_refused_naming_host_and_line() {
        let inv = inventory("[[host]]\nname = \"n1\"\naddress = \"gpu1\"\n");
        let cfg = config("Host gpu1\n  StrictHostKeyChecking no\n");
        let error = Target::resolve(&inv, &inv.hosts[0], &cfg, &mut Vec::new()).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("n1: config:2: StrictHostKeyChecking no is refused"),
            "{error}"
        );
        let cfg =
            config("Host gpu1\n  StrictHostKeyChecking accept-new\n  UserKnownHostsFile /kh\n");
        let t = resolve(&inv, 0, &cfg);
        assert!(t.accept_new);
        assert_eq!(t.known_hosts, [PathBuf::from("/kh")]);
    }

    #[test]
    fn warnings_are_collected_once_across_hosts() {
        let inv = inventory("[[host]]\naddress = \"gpu1\"\n[[host]]\naddress = \"gpu2\"\n");
        let cfg = config("Host *\n  ProxyCommand nc %h %p\n");
        let mut warnings = Vec::new();
        for host in &inv.hosts {
            Target::resolve(&inv, host, &cfg, &mut warnings).unwrap();
        }
        assert_eq!(warnings.len(), 1, "{warnings:?}");
    }
}
