//! The part of OpenSSH's `ssh_config` that decides where and as whom to connect.
//!
//! Read: `Host` blocks with patterns (`*`, `?`, `!negation`, several per line) and the
//! keywords `HostName` (with `%h` and `%%`), `Port`, `User` and `IdentityFile`. As in OpenSSH,
//! the first value found for a keyword wins, and lines before the first `Host` apply to every
//! host. `Match` blocks are skipped (their conditions need more than a host name); `Include`
//! and every other keyword are ignored.

use std::path::{Path, PathBuf};

use crate::inventory::expand_tilde;

/// What `~/.ssh/config` says about one host. `None` where it says nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostParams {
    pub host_name: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub identity_files: Vec<PathBuf>,
}

/// A parsed `ssh_config`.
#[derive(Clone, Debug, Default)]
pub struct SshConfig {
    blocks: Vec<Block>,
}

#[derive(Clone, Debug)]
struct Block {
    /// `None`: a `Match` block, never applied.
    patterns: Option<Vec<String>>,
    settings: Vec<(String, String)>,
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
        let text = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        Self::parse(&String::from_utf8_lossy(&text))
            .map_err(|e| anyhow::anyhow!("{}:{e}", path.display()))
    }

    /// Parses config text; an error names the line (`LINE: message`).
    pub fn parse(text: &str) -> Result<SshConfig, String> {
        let mut blocks = vec![Block {
            patterns: Some(vec!["*".to_string()]),
            settings: Vec::new(),
        }];
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (keyword, value) = split_keyword(line);
            let keyword = keyword.to_ascii_lowercase();
            let value = value.trim().trim_matches('"').to_string();
            match keyword.as_str() {
                "host" => {
                    let patterns: Vec<String> =
                        value.split_whitespace().map(str::to_string).collect();
                    if patterns.is_empty() {
                        return Err(format!("{}: Host needs at least one pattern", number + 1));
                    }
                    blocks.push(Block {
                        patterns: Some(patterns),
                        settings: Vec::new(),
                    });
                }
                "match" => blocks.push(Block {
                    patterns: None,
                    settings: Vec::new(),
                }),
                "hostname" | "port" | "user" | "identityfile" => {
                    if keyword == "port" && value.parse::<u16>().map_or(true, |p| p == 0) {
                        return Err(format!("{}: bad Port {value:?}", number + 1));
                    }
                    if let Some(block) = blocks.last_mut() {
                        block.settings.push((keyword, value));
                    }
                }
                _ => {}
            }
        }
        Ok(SshConfig { blocks })
    }

    /// The settings that apply to `host` (what was typed: an alias or an address).
    pub fn query(&self, host: &str) -> HostParams {
        let mut params = HostParams::default();
        for block in &self.blocks {
            let Some(patterns) = &block.patterns else {
                continue;
            };
            if !matches_host(patterns, host) {
                continue;
            }
            for (keyword, value) in &block.settings {
                match keyword.as_str() {
                    "hostname" if params.host_name.is_none() => {
                        params.host_name = Some(value.replace("%h", host).replace("%%", "%"));
                    }
                    "port" if params.port.is_none() => params.port = value.parse().ok(),
                    "user" if params.user.is_none() => params.user = Some(value.clone()),
                    // IdentityFile accumulates, as in OpenSSH.
                    "identityfile" => params.identity_files.push(expand_tilde(value)),
                    _ => {}
                }
            }
        }
        params
    }
}

/// `Keyword value` or `Keyword=value`.
fn split_keyword(line: &str) -> (&str, &str) {
    let end = line
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(line.len());
    let rest = line[end..].trim_start();
    let rest = rest.strip_prefix('=').unwrap_or(rest);
    (&line[..end], rest)
}

/// A host matches when some pattern matches it and no negated pattern does.
fn matches_host(patterns: &[String], host: &str) -> bool {
    let mut matched = false;
    for pattern in patterns {
        if let Some(negated) = pattern.strip_prefix('!') {
            if wildcard(negated, host) {
                return false;
            }
        } else if wildcard(pattern, host) {
            matched = true;
        }
    }
    matched
}

/// `*` matches any run of characters, `?` exactly one; case-insensitive like host names.
fn wildcard(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.to_lowercase().chars().collect();
    let t: Vec<char> = text.to_lowercase().chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            backtrack = Some((pi, ti));
            pi += 1;
        } else if let Some((star, matched)) = backtrack {
            pi = star + 1;
            ti = matched + 1;
            backtrack = Some((star, matched + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "\
# global
User everyone
Host gpu? !gpu9
  HostName %h.lab.example
  Port 2222
  IdentityFile /keys/lab
Host gpu1
  User alice
  Port 22
Match user bob
  Port 2
Host *
  IdentityFile=/keys/default
  User nobody
";

    #[test]
    fn first_value_wins_and_identity_files_add_up() {
        let cfg = SshConfig::parse(CONFIG).unwrap();
        let p = cfg.query("gpu1");
        assert_eq!(p.host_name.as_deref(), Some("gpu1.lab.example"));
        assert_eq!(p.port, Some(2222));
        assert_eq!(p.user.as_deref(), Some("everyone"));
        assert_eq!(
            p.identity_files,
            [PathBuf::from("/keys/lab"), PathBuf::from("/keys/default")]
        );
    }

    #[test]
    fn negation_and_match_blocks_exclude() {
        let cfg = SshConfig::parse(CONFIG).unwrap();
        let p = cfg.query("gpu9");
        assert_eq!(p.host_name, None);
        assert_eq!(p.port, None);
        assert_eq!(p.identity_files, [PathBuf::from("/keys/default")]);
    }

    #[test]
    fn wildcards() {
        assert!(wildcard("*", "anything"));
        assert!(wildcard("10.0.0.*", "10.0.0.7"));
        assert!(wildcard("n?de*x", "node-1x"));
        assert!(!wildcard("n?de", "nde"));
        assert!(wildcard("GPU*", "gpu2"));
        assert!(!wildcard("a*b", "acbd"));
    }

    #[test]
    fn bad_port_names_its_line() {
        assert_eq!(
            SshConfig::parse("Host a\n  Port x\n").unwrap_err(),
            "2: bad Port \"x\""
        );
    }
}
