//! OpenSSH's `ssh_config`, read as ssh(1) reads it, for everything that decides where and how
//! fleet connects.
//!
//! - `Host` lines (whitespace-separated patterns, `*`, `?`, `!negation`) and `Match` lines
//!   (`all`, `canonical`, `final`, `host`, `originalhost`, `user`, `localuser` and `exec`, each
//!   negatable with `!`) open blocks; lines before the first of them apply to every host.
//! - `Include` reads more files in place, with globs, relative to `~/.ssh`, nested up to 16 deep;
//!   inside a block that does not match, nothing included can match either.
//! - The first value found for a keyword wins; `IdentityFile` adds up.
//! - Applied: `HostName` (`%h`), `Port`, `User`, `IdentityFile`, `IdentitiesOnly`,
//!   `UserKnownHostsFile`, `StrictHostKeyChecking`, `ConnectTimeout`, `ServerAliveInterval`,
//!   `ServerAliveCountMax` and `ProxyJump`. Keywords that would change the connection but are
//!   not applied are named as warnings with their file and line ([`UNSUPPORTED`]); the rest do
//!   not matter to fleet and are skipped.
//!
//! Written here rather than taken from a crate: the crates that parse ssh_config skip `Match`
//! (or `Match exec`) and keep no file and line to name in a warning.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::inventory::expand_tilde;

/// How deep `Include` may nest, as in OpenSSH.
const MAX_INCLUDE_DEPTH: usize = 16;

/// Keywords that change where or how ssh connects and that fleet does not apply, with what to
/// do instead. Any other keyword fleet does not apply does not matter to it.
const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "proxycommand",
        "use ProxyJump, or jump = in the inventory, for a bastion",
    ),
    (
        "proxyusefdpass",
        "use ProxyJump, or jump = in the inventory, for a bastion",
    ),
    (
        "hostkeyalias",
        "fleet looks host keys up under the address it dials",
    ),
    ("certificatefile", "fleet authenticates with plain keys"),
    (
        "pkcs11provider",
        "fleet authenticates with key files and ssh-agent",
    ),
    (
        "securitykeyprovider",
        "fleet authenticates with key files and ssh-agent",
    ),
    ("identityagent", "fleet uses the agent of SSH_AUTH_SOCK"),
    (
        "canonicalizehostname",
        "fleet dials the HostName as written",
    ),
    ("addressfamily", "fleet dials whatever the name resolves to"),
    ("bindaddress", "fleet connects from the default address"),
    ("bindinterface", "fleet connects from the default interface"),
    ("hostkeyalgorithms", "fleet offers its own algorithms"),
    ("kexalgorithms", "fleet offers its own algorithms"),
    ("ciphers", "fleet offers its own algorithms"),
    ("macs", "fleet offers its own algorithms"),
    (
        "pubkeyacceptedalgorithms",
        "fleet offers its own algorithms",
    ),
    ("pubkeyacceptedkeytypes", "fleet offers its own algorithms"),
    (
        "globalknownhostsfile",
        "fleet reads the user's known_hosts only",
    ),
    (
        "knownhostscommand",
        "fleet reads the user's known_hosts only",
    ),
    (
        "verifyhostkeydns",
        "fleet reads the user's known_hosts only",
    ),
];

/// Where a line is: its file (as people write it, `~/` for the home) and line number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    file: Arc<str>,
    line: usize,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// What `StrictHostKeyChecking` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Strict {
    /// `yes` or `ask`: a new host key is refused (fleet never asks mid-run).
    Yes,
    /// `accept-new`: a new key is recorded, a changed one refused.
    AcceptNew,
    /// `no` or `off`: refused by fleet, which never skips host keys.
    No(Place),
}

/// What ssh_config says about one host. `None` or empty where it says nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostParams {
    pub host_name: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub identity_files: Vec<PathBuf>,
    pub identities_only: Option<bool>,
    pub known_hosts_files: Vec<PathBuf>,
    pub strict: Option<Strict>,
    pub connect_timeout: Option<Duration>,
    pub alive_interval: Option<Duration>,
    pub alive_count: Option<usize>,
    /// `ProxyJump` as written (`none` included), with its place.
    pub proxy_jump: Option<(String, Place)>,
    /// Lines that matched and would change the connection, but that fleet does not apply.
    pub warnings: Vec<String>,
}

/// Who asks, for `Match user`, `Match localuser` and the `%` tokens.
#[derive(Clone, Debug)]
pub struct Asker {
    pub local_user: String,
    pub home: PathBuf,
    /// The user fleet logs in as when ssh_config names none (the inventory's).
    pub user: Option<String>,
}

impl Asker {
    pub fn here(user: Option<String>) -> Asker {
        Asker {
            local_user: local_user(),
            home: expand_tilde("~"),
            user,
        }
    }
}

/// The user running fleet, OpenSSH's default remote user.
pub fn local_user() -> String {
    ["USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "root".to_string())
}

/// A parsed `ssh_config`, its `Include`s read.
#[derive(Clone, Debug, Default)]
pub struct SshConfig {
    items: Vec<Item>,
}

#[derive(Clone, Debug)]
enum Item {
    Host(Vec<String>),
    Match(Vec<Criterion>, Place),
    Set {
        keyword: String,
        written: String,
        args: Vec<String>,
        place: Place,
    },
    /// Another file's lines, evaluated in place.
    Include(Vec<Item>),
}

#[derive(Clone, Debug)]
struct Criterion {
    negated: bool,
    test: Test,
}

#[derive(Clone, Debug)]
enum Test {
    All,
    /// `canonical` and `final`: fleet reads the config once, as that final pass.
    Final,
    Host(String),
    OriginalHost(String),
    User(String),
    LocalUser(String),
    Exec(String),
    /// A criterion fleet does not evaluate (`tagged`, `localnetwork`, …): never matches.
    Unknown(String),
}

/// Why a config cannot be read: `file:line: message`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl SshConfig {
    /// Reads `~/.ssh/config` when it exists.
    pub fn load_user() -> Result<SshConfig, ConfigError> {
        let path = expand_tilde("~/.ssh/config");
        if !path.is_file() {
            return Ok(SshConfig::default());
        }
        Self::load(&path, &expand_tilde("~/.ssh"))
    }

    /// Reads `path`; a relative `Include` is looked for in `ssh_dir`.
    pub fn load(path: &Path, ssh_dir: &Path) -> Result<SshConfig, ConfigError> {
        Ok(SshConfig {
            items: read_file(path, ssh_dir, 0)?,
        })
    }

    /// Parses config text (for tests and `Include`-free configs); errors read `config:LINE: …`.
    pub fn parse(text: &str) -> Result<SshConfig, ConfigError> {
        Ok(SshConfig {
            items: parse_text(text, "config".into(), Path::new("/nonexistent"), 0)?,
        })
    }

    /// The settings for `host` (what was typed: an alias or an address).
    pub fn query(&self, host: &str, asker: &Asker) -> HostParams {
        let mut eval = Eval {
            original: host,
            asker,
            params: HostParams::default(),
            identity_raw: Vec::new(),
            known_hosts_raw: None,
            warned: Vec::new(),
        };
        let mut active = true;
        eval.items(&self.items, &mut active, false);
        eval.finish()
    }
}

fn read_file(path: &Path, ssh_dir: &Path, depth: usize) -> Result<Vec<Item>, ConfigError> {
    let text = std::fs::read(path)
        .map_err(|e| ConfigError(format!("cannot read {}: {e}", shown(path))))?;
    parse_text(
        &String::from_utf8_lossy(&text),
        shown(path).into(),
        ssh_dir,
        depth,
    )
}

/// `path` with the home directory written as `~`.
fn shown(path: &Path) -> String {
    let home = expand_tilde("~");
    match path.strip_prefix(&home) {
        Ok(rest) if home != Path::new("~") => format!("~/{}", rest.display()),
        _ => path.display().to_string(),
    }
}

fn parse_text(
    text: &str,
    file: Arc<str>,
    ssh_dir: &Path,
    depth: usize,
) -> Result<Vec<Item>, ConfigError> {
    let mut items = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let place = Place {
            file: file.clone(),
            line: index + 1,
        };
        let fail = |message: String| ConfigError(format!("{place}: {message}"));
        let Some((written, args)) = split_line(line).map_err(fail)? else {
            continue;
        };
        let keyword = written.to_ascii_lowercase();
        let item = match keyword.as_str() {
            "host" => {
                if args.is_empty() {
                    return Err(fail("Host needs at least one pattern".into()));
                }
                Item::Host(args)
            }
            "match" => Item::Match(parse_match(&args).map_err(fail)?, place),
            "include" => {
                if depth >= MAX_INCLUDE_DEPTH {
                    return Err(fail(format!(
                        "Include nested more than {MAX_INCLUDE_DEPTH} deep"
                    )));
                }
                let mut included = Vec::new();
                for pattern in &args {
                    for path in glob(&include_path(pattern, ssh_dir)) {
                        included.extend(read_file(&path, ssh_dir, depth + 1)?);
                    }
                }
                Item::Include(included)
            }
            _ => {
                check_value(&keyword, &written, &args).map_err(fail)?;
                Item::Set {
                    keyword,
                    written,
                    args,
                    place,
                }
            }
        };
        items.push(item);
    }
    Ok(items)
}

/// Refuses values fleet would apply but cannot read.
fn check_value(keyword: &str, written: &str, args: &[String]) -> Result<(), String> {
    let first = args.first().map_or("", String::as_str);
    let bad = || Err(format!("bad {written} {first:?}"));
    match keyword {
        "port" if first.parse::<u16>().map_or(true, |p| p == 0) => bad(),
        "connecttimeout" | "serveraliveinterval" | "serveralivecountmax"
            if first.parse::<u64>().is_err() && first != "none" =>
        {
            bad()
        }
        "stricthostkeychecking"
            if !["yes", "ask", "accept-new", "no", "off"]
                .contains(&first.to_ascii_lowercase().as_str()) =>
        {
            bad()
        }
        "identitiesonly" if !["yes", "no"].contains(&first.to_ascii_lowercase().as_str()) => bad(),
        _ if args.is_empty() => Err(format!("{written} needs a value")),
        _ => Ok(()),
    }
}

/// A relative `Include` is in `~/.ssh`; `~` is the home directory.
fn include_path(pattern: &str, ssh_dir: &Path) -> PathBuf {
    let path = expand_tilde(pattern);
    if path.is_absolute() {
        path
    } else {
        ssh_dir.join(path)
    }
}

/// The existing files `pattern` names (`*` and `?` in any component), sorted as glob(3) sorts.
fn glob(pattern: &Path) -> Vec<PathBuf> {
    let mut found = vec![PathBuf::new()];
    for component in pattern.components() {
        let part = component.as_os_str().to_string_lossy();
        if !part.contains(['*', '?']) {
            found = found.into_iter().map(|p| p.join(&*part)).collect();
            continue;
        }
        let mut next = Vec::new();
        for dir in &found {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| !name.starts_with('.') && wildcard(&part, name))
                .collect();
            names.sort();
            next.extend(names.into_iter().map(|name| dir.join(name)));
        }
        found = next;
    }
    found.into_iter().filter(|p| p.is_file()).collect()
}

fn parse_match(args: &[String]) -> Result<Vec<Criterion>, String> {
    let mut criteria = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let lower = arg.to_ascii_lowercase();
        let (negated, name) = match lower.strip_prefix('!') {
            Some(name) => (true, name.to_string()),
            None => (false, lower),
        };
        let mut value = || {
            args.next()
                .cloned()
                .ok_or_else(|| format!("Match {name} needs a value"))
        };
        let test = match name.as_str() {
            "all" => Test::All,
            "canonical" | "final" => Test::Final,
            "host" => Test::Host(value()?),
            "originalhost" => Test::OriginalHost(value()?),
            "user" => Test::User(value()?),
            "localuser" => Test::LocalUser(value()?),
            "exec" => Test::Exec(value()?),
            "tagged" | "localnetwork" | "version" | "sessiontype" | "command" => {
                Test::Unknown(format!("{name} {}", value()?))
            }
            _ => return Err(format!("unknown Match criterion {name:?}")),
        };
        criteria.push(Criterion { negated, test });
    }
    if criteria.is_empty() {
        return Err("Match needs a criterion (Match all for every host)".into());
    }
    Ok(criteria)
}

/// Splits a line as OpenSSH does: `Keyword value...` or `Keyword=value`, arguments separated by
/// whitespace, grouped by `"` or `'`, `\` escaping the next quote, backslash or space, and an
/// unquoted `#` at the start of an argument ending the line. `None` for blank and comment lines.
fn split_line(line: &str) -> Result<Option<(String, Vec<String>)>, String> {
    let line = line.trim_start();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let end = line
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(line.len());
    let keyword = line[..end].to_string();
    let rest = line[end..].trim_start();
    let rest = rest.strip_prefix('=').unwrap_or(rest);
    let mut args = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        match chars.peek() {
            None => break,
            Some('#') => break,
            Some(_) => {}
        }
        let mut arg = String::new();
        let mut quote: Option<char> = None;
        while let Some(c) = chars.next() {
            match (c, quote) {
                ('\\', _) if matches!(chars.peek(), Some('"' | '\'' | '\\' | ' ')) => {
                    arg.extend(chars.next());
                }
                (q, None) if q == '"' || q == '\'' => quote = Some(q),
                (q, Some(open)) if q == open => quote = None,
                (w, None) if w.is_whitespace() => break,
                (other, _) => arg.push(other),
            }
        }
        if quote.is_some() {
            return Err("unterminated quote".into());
        }
        args.push(arg);
    }
    Ok(Some((keyword, args)))
}

/// One evaluation of the config for one host.
struct Eval<'a> {
    original: &'a str,
    asker: &'a Asker,
    params: HostParams,
    /// IdentityFile and UserKnownHostsFile keep their `%` tokens until the end, as in OpenSSH.
    identity_raw: Vec<String>,
    known_hosts_raw: Option<Vec<String>>,
    warned: Vec<Place>,
}

impl Eval<'_> {
    /// `active`: whether the current block applies. `never`: inside an `Include` from a block
    /// that does not apply, where no block can.
    fn items(&mut self, items: &[Item], active: &mut bool, never: bool) {
        for item in items {
            match item {
                Item::Host(patterns) => *active = !never && matches_host(patterns, self.original),
                Item::Match(criteria, place) => {
                    *active = !never && criteria.iter().all(|c| self.criterion(c, place));
                }
                Item::Include(included) => {
                    let outer = *active;
                    self.items(included, active, never || !outer);
                    *active = outer;
                }
                Item::Set {
                    keyword,
                    written,
                    args,
                    place,
                } if *active => self.set(keyword, written, args, place),
                Item::Set { .. } => {}
            }
        }
    }

    /// The host name as it stands so far (`HostName` applied), for `Match host` and `%h`.
    fn host_name(&self) -> String {
        self.params
            .host_name
            .clone()
            .unwrap_or_else(|| self.original.to_string())
    }

    fn remote_user(&self) -> String {
        self.params
            .user
            .clone()
            .or_else(|| self.asker.user.clone())
            .unwrap_or_else(|| self.asker.local_user.clone())
    }

    fn criterion(&mut self, criterion: &Criterion, place: &Place) -> bool {
        let matched = match &criterion.test {
            Test::All | Test::Final => true,
            Test::Host(list) => match_list(list, &self.host_name()),
            Test::OriginalHost(list) => match_list(list, self.original),
            Test::User(list) => match_list(list, &self.remote_user()),
            Test::LocalUser(list) => match_list(list, &self.asker.local_user),
            Test::Exec(command) => run_exec(&self.tokens(command)),
            Test::Unknown(what) => {
                self.warn(
                    place,
                    &format!("Match {what} is not supported; fleet treats it as not matching"),
                );
                return false;
            }
        };
        matched != criterion.negated
    }

    fn set(&mut self, keyword: &str, written: &str, args: &[String], place: &Place) {
        let first = args[0].clone();
        let p = &mut self.params;
        match keyword {
            "hostname" if p.host_name.is_none() => {
                p.host_name = Some(first.replace("%h", self.original).replace("%%", "%"));
            }
            "port" if p.port.is_none() => p.port = first.parse().ok(),
            "user" if p.user.is_none() => p.user = Some(first),
            "identityfile" => self.identity_raw.push(first),
            "identitiesonly" if p.identities_only.is_none() => {
                p.identities_only = Some(first.eq_ignore_ascii_case("yes"));
            }
            "userknownhostsfile" if self.known_hosts_raw.is_none() => {
                self.known_hosts_raw = Some(args.to_vec());
            }
            "stricthostkeychecking" if p.strict.is_none() => {
                p.strict = Some(match first.to_ascii_lowercase().as_str() {
                    "accept-new" => Strict::AcceptNew,
                    "no" | "off" => Strict::No(place.clone()),
                    _ => Strict::Yes,
                });
            }
            "connecttimeout" if p.connect_timeout.is_none() => {
                p.connect_timeout = first.parse().ok().map(Duration::from_secs);
            }
            "serveraliveinterval" if p.alive_interval.is_none() => {
                p.alive_interval = first.parse().ok().map(Duration::from_secs);
            }
            "serveralivecountmax" if p.alive_count.is_none() => {
                p.alive_count = first.parse().ok();
            }
            "proxyjump" if p.proxy_jump.is_none() => p.proxy_jump = Some((first, place.clone())),
            "globalknownhostsfile" if args.iter().all(|a| a == "/dev/null" || a == "none") => {}
            "canonicalizehostname" if first.eq_ignore_ascii_case("no") => {}
            _ => {
                if let Some((_, instead)) = UNSUPPORTED.iter().find(|(k, _)| *k == keyword) {
                    self.warn(place, &format!("{written} is not supported; {instead}"));
                }
            }
        }
    }

    fn warn(&mut self, place: &Place, message: &str) {
        if !self.warned.contains(place) {
            self.warned.push(place.clone());
            self.params.warnings.push(format!("{place}: {message}"));
        }
    }

    /// Expands `%%`, `%d`, `%h`, `%n`, `%p`, `%r`, `%u` and a leading `~`.
    fn tokens(&self, text: &str) -> String {
        let mut out = String::new();
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('%') => out.push('%'),
                Some('d') => out.push_str(&self.asker.home.to_string_lossy()),
                Some('h') => out.push_str(&self.host_name()),
                Some('n') => out.push_str(self.original),
                Some('p') => out.push_str(&self.params.port.unwrap_or(22).to_string()),
                Some('r') => out.push_str(&self.remote_user()),
                Some('u') => out.push_str(&self.asker.local_user),
                Some(other) => {
                    out.push('%');
                    out.push(other);
                }
                None => out.push('%'),
            }
        }
        out
    }

    fn finish(mut self) -> HostParams {
        let path = |eval: &Self, raw: &str| {
            let text = eval.tokens(raw);
            match text.strip_prefix("~/") {
                Some(rest) => eval.asker.home.join(rest),
                None => PathBuf::from(text),
            }
        };
        let identities: Vec<PathBuf> = self.identity_raw.iter().map(|r| path(&self, r)).collect();
        let known: Vec<PathBuf> = self
            .known_hosts_raw
            .iter()
            .flatten()
            .filter(|r| *r != "none")
            .map(|r| path(&self, r))
            .collect();
        self.params.identity_files = identities;
        self.params.known_hosts_files = known;
        self.params
    }
}

/// Runs a `Match exec` command with `sh -c`; it matches when it exits 0, as in OpenSSH.
fn run_exec(command: &str) -> bool {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
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

/// A `Match` pattern list: comma-separated, with `!` negation, as `Host`'s patterns.
fn match_list(list: &str, value: &str) -> bool {
    let patterns: Vec<String> = list.split(',').map(str::to_string).collect();
    matches_host(&patterns, value)
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

    fn asker() -> Asker {
        Asker {
            local_user: "me".into(),
            home: PathBuf::from("/home/me"),
            user: None,
        }
    }

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
        let p = cfg.query("gpu1", &asker());
        assert_eq!(p.host_name.as_deref(), Some("gpu1.lab.example"));
        assert_eq!(p.port, Some(2222));
        assert_eq!(p.user.as_deref(), Some("everyone"));
        assert_eq!(
            p.identity_files,
            [PathBuf::from("/keys/lab"), PathBuf::from("/keys/default")]
        );
    }

    #[test]
    fn negation_excludes_and_match_user_sees_the_user_so_far() {
        let cfg = SshConfig::parse(CONFIG).unwrap();
        let p = cfg.query("gpu9", &asker());
        assert_eq!(p.host_name, None);
        assert_eq!(p.port, None);
        assert_eq!(p.identity_files, [PathBuf::from("/keys/default")]);
        let cfg = SshConfig::parse("Match user bob\n  Port 2\nHost *\n  Port 3\n").unwrap();
        assert_eq!(cfg.query("x", &asker()).port, Some(3));
        let bob = Asker {
            user: Some("bob".into()),
            ..asker()
        };
        assert_eq!(cfg.query("x", &bob).port, Some(2));
    }

    #[test]
    fn match_criteria_combine_and_negate() {
        let cfg = SshConfig::parse(
            "Host gpu1\n  HostName 10.0.0.1\n\
             Match host 10.0.0.* !originalhost gpu2\n  Port 2201\n\
             Match originalhost gpu2,gpu3 localuser me\n  Port 2202\n\
             Match !localuser me\n  Port 2203\n\
             Match exec \"test %n = gpu4\"\n  Port 2204\n\
             Match all\n  Port 2209\n",
        )
        .unwrap();
        let port = |host| cfg.query(host, &asker()).port;
        assert_eq!(port("gpu1"), Some(2201), "Match host sees HostName");
        assert_eq!(port("gpu2"), Some(2202));
        assert_eq!(port("gpu4"), Some(2204), "Match exec runs with %n");
        assert_eq!(port("gpu5"), Some(2209));
    }

    #[test]
    fn quoting_equals_and_trailing_comments_split_as_openssh_does() {
        assert_eq!(
            split_line("  IdentityFile \"/keys/my key\" # mine").unwrap(),
            Some(("IdentityFile".into(), vec!["/keys/my key".into()]))
        );
        assert_eq!(
            split_line("Port=2222").unwrap(),
            Some(("Port".into(), vec!["2222".into()]))
        );
        assert_eq!(
            split_line("Host = a 'b c' d\\ e").unwrap(),
            Some(("Host".into(), vec!["a".into(), "b c".into(), "d e".into()]))
        );
        assert_eq!(split_line("   # comment").unwrap(), None);
        assert_eq!(
            split_line("HostName \"x").unwrap_err(),
            "unterminated quote"
        );
    }

    #[test]
    fn include_reads_globs_relative_to_the_ssh_folder_nested_and_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let ssh = dir.path();
        std::fs::create_dir_all(ssh.join("config.d")).unwrap();
        std::fs::write(
            ssh.join("config"),
            "Include config.d/*.conf\nHost *\n  User fallback\n",
        )
        .unwrap();
        std::fs::write(
            ssh.join("config.d/lab.conf"),
            "Host bastion\n  HostName 10.0.0.5\n  User me\nHost gpu1 gpu2\n  ProxyJump bastion\nInclude nested\n",
        )
        .unwrap();
        std::fs::write(ssh.join("config.d/.hidden.conf"), "Host *\n  Port 1\n").unwrap();
        std::fs::write(ssh.join("nested"), "Host gpu1\n  HostName 192.168.10.11\n").unwrap();
        let cfg = SshConfig::load(&ssh.join("config"), ssh).unwrap();
        let gpu1 = cfg.query("gpu1", &asker());
        assert_eq!(gpu1.host_name.as_deref(), Some("192.168.10.11"));
        assert_eq!(
            gpu1.proxy_jump.as_ref().map(|j| j.0.as_str()),
            Some("bastion")
        );
        assert_eq!(gpu1.user.as_deref(), Some("fallback"));
        assert_eq!(gpu1.port, None, "dot files are not globbed");
        let gpu2 = cfg.query("gpu2", &asker());
        assert_eq!(gpu2.host_name, None);
        let bastion = cfg.query("bastion", &asker());
        assert_eq!(bastion.user.as_deref(), Some("me"));
    }

    #[test]
    fn an_include_inside_a_block_that_does_not_match_adds_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("inner"),
            "Port 2222\nHost *\n  User inner\n",
        )
        .unwrap();
        let outer = dir.path().join("config");
        std::fs::write(&outer, "Host other\n  Include inner\nHost *\n  Port 22\n").unwrap();
        let cfg = SshConfig::load(&outer, dir.path()).unwrap();
        let p = cfg.query("gpu1", &asker());
        assert_eq!((p.port, p.user), (Some(22), None));
        assert_eq!(cfg.query("other", &asker()).port, Some(2222));
    }

    #[test]
    fn include_loops_are_refused_with_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config");
        std::fs::write(&config, "Include config\n").unwrap();
        let error = SshConfig::load(&config, dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("config:1: Include nested more than 16 deep"),
            "{error}"
        );
    }

    #[test]
    fn unsupported_keywords_that_matter_are_named_once_with_file_and_line() {
        let cfg = SshConfig::parse(
            "Host gpu*\n  ProxyCommand ssh -W %h:%p bastion\n  ProxyUseFdpass yes\n  ForwardAgent yes\n  GlobalKnownHostsFile /dev/null\nMatch tagged x\n  Port 1\nHost other\n  Ciphers aes128-ctr\n",
        )
        .unwrap();
        let p = cfg.query("gpu1", &asker());
        assert_eq!(p.warnings.len(), 3, "{:?}", p.warnings);
        assert!(
            p.warnings[0].starts_with("config:2: ProxyCommand is not supported; use ProxyJump")
        );
        assert!(p.warnings[1].starts_with("config:3: ProxyUseFdpass is not supported"));
        assert!(p.warnings[2].starts_with("config:6: Match tagged x is not supported"));
        assert_eq!(p.port, None);
    }

    #[test]
    fn strictness_timeouts_and_known_hosts_files() {
        let cfg = SshConfig::parse(
            "Host a\n  StrictHostKeyChecking accept-new\n  ConnectTimeout 7\n  ServerAliveInterval 4\n  ServerAliveCountMax 2\n  UserKnownHostsFile ~/kh %d/kh2\n  IdentitiesOnly yes\n  IdentityFile ~/.ssh/id_%r@%h\nHost b\n  StrictHostKeyChecking no\n",
        )
        .unwrap();
        let a = cfg.query("a", &asker());
        assert_eq!(a.strict, Some(Strict::AcceptNew));
        assert_eq!(a.connect_timeout, Some(Duration::from_secs(7)));
        assert_eq!(a.alive_interval, Some(Duration::from_secs(4)));
        assert_eq!(a.alive_count, Some(2));
        assert_eq!(a.identities_only, Some(true));
        assert_eq!(
            a.known_hosts_files,
            [PathBuf::from("/home/me/kh"), PathBuf::from("/home/me/kh2")]
        );
        assert_eq!(a.identity_files, [PathBuf::from("/home/me/.ssh/id_me@a")]);
        let Some(Strict::No(place)) = cfg.query("b", &asker()).strict else {
            panic!("StrictHostKeyChecking no is kept with its place");
        };
        assert_eq!(place.to_string(), "config:10");
    }

    #[test]
    fn bad_values_name_their_line() {
        for (text, error) in [
            ("Host a\n  Port x\n", "config:2: bad Port \"x\""),
            (
                "Host a\n  ConnectTimeout soon\n",
                "config:2: bad ConnectTimeout \"soon\"",
            ),
            (
                "Match bogus x\n",
                "config:1: unknown Match criterion \"bogus\"",
            ),
            ("Match host\n", "config:1: Match host needs a value"),
            ("Host\n", "config:1: Host needs at least one pattern"),
        ] {
            assert_eq!(SshConfig::parse(text).unwrap_err().to_string(), error);
        }
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

    /// What `ssh -G -F FILE HOST` says of the keywords fleet applies.
    fn openssh(file: &Path, host: &str) -> Option<std::collections::HashMap<String, String>> {
        let out = std::process::Command::new("ssh")
            .arg("-G")
            .arg("-F")
            .arg(file)
            .arg(host)
            .stdin(std::process::Stdio::null())
            .output()
            .ok()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.split_once(' '))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// The answers come from OpenSSH itself, run on the same file: first value wins, `Host *`
    /// last, `Match` in order, nested `Include`, quoting.
    #[test]
    fn the_answers_agree_with_ssh_dash_g() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(
            root.join("lab.conf"),
            format!(
                "Host bastion\n  HostName 10.0.0.5\n  User me\nHost gpu? !gpu9\n  ProxyJump bastion\nInclude {}\n",
                root.join("more/*.conf").display()
            ),
        )
        .unwrap();
        std::fs::create_dir(root.join("more")).unwrap();
        std::fs::write(
            root.join("more/a.conf"),
            "Host gpu1\n  HostName 192.168.10.11\n  Port 2201\nMatch host 192.168.10.* user trainer\n  IdentityFile \"/keys/lab key\"\n",
        )
        .unwrap();
        let config = root.join("config");
        std::fs::write(
            &config,
            format!(
                "Include {}\nHost gpu1 gpu2\n  User trainer\n  Port 2299\nMatch originalhost gpu2\n  HostName=10.1.1.2\n  ProxyJump none\nHost *\n  User everyone\n  Port 22\n  ConnectTimeout 9\n",
                root.join("lab.conf").display()
            ),
        )
        .unwrap();
        let ours = SshConfig::load(&config, root).unwrap();
        let me = Asker::here(None);
        for host in ["gpu1", "gpu2", "gpu9", "bastion", "10.0.0.7"] {
            let Some(theirs) = openssh(&config, host) else {
                return; // no ssh client here
            };
            let p = ours.query(host, &me);
            let say = |key: &str| theirs.get(key).cloned().unwrap_or_default();
            assert_eq!(
                p.host_name.unwrap_or_else(|| host.to_string()),
                say("hostname"),
                "{host}"
            );
            assert_eq!(p.port.unwrap_or(22).to_string(), say("port"), "{host}");
            assert_eq!(p.user.unwrap_or_else(local_user), say("user"), "{host}");
            assert_eq!(
                p.proxy_jump
                    .map(|j| j.0)
                    .filter(|j| j != "none")
                    .unwrap_or_default(),
                say("proxyjump"),
                "{host}"
            );
            assert_eq!(
                p.connect_timeout.map(|t| t.as_secs().to_string()),
                Some(say("connecttimeout")),
                "{host}"
            );
            let files: Vec<String> = p
                .identity_files
                .iter()
                .map(|f| f.display().to_string())
                .collect();
            let listed: Vec<String> = String::from_utf8_lossy(
                &std::process::Command::new("ssh")
                    .args(["-G", "-F"])
                    .arg(&config)
                    .arg(host)
                    .output()
                    .unwrap()
                    .stdout,
            )
            .lines()
            .filter_map(|l| l.strip_prefix("identityfile "))
            .filter(|f| f.starts_with("/keys"))
            .map(str::to_string)
            .collect();
            assert_eq!(files, listed, "{host}");
        }
    }
}
