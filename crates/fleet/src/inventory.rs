//! The inventory: which hosts make up the fleet and how each one trains.
//!
//! The file is TOML (`inventory/fleet.toml` by default). It is read in two steps: serde fills the
//! `Raw*` types, which keep the byte span of every value, then [`Inventory::from_toml`] applies
//! the `[fleet]` defaults to each `[[host]]` and validates what serde cannot (duplicates, ranges,
//! names). Every error carries the file, line and column it is about, so a typo in a 50-line
//! inventory is found without searching.
//!
//! Settings that decide how to reach a host over SSH (`port`, `user`, `identity`) are kept in
//! layers (host, then `[fleet]`) because `~/.ssh/config` slots in between them: see
//! [`crate::ssh::Target`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

/// Where the inventory is read from when neither `-i` nor `FLEET_INVENTORY` says otherwise.
pub const DEFAULT_PATH: &str = "inventory/fleet.toml";

/// An inventory larger than this is not something a person wrote.
const MAX_BYTES: u64 = 1 << 20;

/// The torch.distributed port the seed guide uses, and torchrun's default.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// What a rank computes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// Rank `r` on a host uses GPU `LOCAL_RANK`.
    Cuda,
    /// No GPU is expected.
    Cpu,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Device::Cuda => "cuda",
            Device::Cpu => "cpu",
        })
    }
}

/// SSH settings given in the inventory at one level (a host, or `[fleet]` for all hosts).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SshSettings {
    pub port: Option<u16>,
    pub user: Option<String>,
    pub identity: Option<PathBuf>,
    /// `jump`: the hosts to go through, first dialled first; `Some(empty)` is `jump = "none"`.
    pub jump: Option<Vec<Hop>>,
}

/// One hop of a `jump` chain or of ssh_config's `ProxyJump`: `[user@]host[:port]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hop {
    pub user: Option<String>,
    /// A name (looked up in ~/.ssh/config) or an address.
    pub host: String,
    pub port: Option<u16>,
}

impl fmt::Display for Hop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(user) = &self.user {
            write!(f, "{user}@")?;
        }
        match (self.host.contains(':'), self.port) {
            (true, Some(port)) => write!(f, "[{}]:{port}", self.host),
            (false, Some(port)) => write!(f, "{}:{port}", self.host),
            _ => f.write_str(&self.host),
        }
    }
}

/// Parses a jump chain as OpenSSH's `ProxyJump` takes it: `[user@]host[:port]` (or
/// `ssh://[user@]host[:port]`), comma-separated; `none` is no jump (an empty chain).
pub fn parse_jump(text: &str) -> Result<Vec<Hop>, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    text.split(',').map(parse_hop).collect()
}

fn parse_hop(item: &str) -> Result<Hop, String> {
    let bad = |why: &str| {
        Err(format!(
            "{item:?} is not a jump host ([user@]host[:port]): {why}"
        ))
    };
    let spec = item.trim();
    let spec = spec.strip_prefix("ssh://").unwrap_or(spec);
    if spec.is_empty() {
        return bad("it is empty");
    }
    if spec
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '/')
    {
        return bad("it contains a space, a slash or a control character");
    }
    let (user, rest) = match spec.rsplit_once('@') {
        Some((user, rest)) if !user.is_empty() => (Some(user.to_string()), rest),
        Some(_) => return bad("the user before @ is empty"),
        None => (None, spec),
    };
    let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
        match bracketed.split_once(']') {
            Some((host, "")) => (host, None),
            Some((host, port)) => match port.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return bad("expected :port after ]"),
            },
            None => return bad("no ] after ["),
        }
    } else if rest.matches(':').count() == 1 {
        let (host, port) = rest.split_once(':').unwrap_or((rest, ""));
        (host, Some(port))
    } else {
        (rest, None)
    };
    if host.is_empty() {
        return bad("the host is empty");
    }
    let port = match port {
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => Some(n),
            _ => return bad("the port is not a number from 1 to 65535"),
        },
        None => None,
    };
    Ok(Hop {
        user,
        host: host.to_string(),
        port,
    })
}

/// One machine of the fleet, with the `[fleet]` defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// The name used in prefixes, summaries and errors.
    pub name: String,
    /// An IP address, a DNS name, or a `Host` alias of `~/.ssh/config`.
    pub address: String,
    /// SSH settings written on this `[[host]]` itself.
    pub ssh: SshSettings,
    /// The project folder on the host (`~` is the remote user's home).
    pub workdir: String,
    /// Processes on this host (one per GPU).
    pub ranks: u32,
    pub device: Device,
    /// `[fleet].env` with this host's `env` on top.
    pub env: BTreeMap<String, String>,
    /// A shell line run before every command fleet runs there for the user (the probe, the
    /// ranks, `fleet exec`): `. ~/venv/bin/activate`, conda's hook, `module load cuda`.
    pub activate: Option<String>,
    /// Line of the `[[host]]` entry, for messages about the host that arise later.
    pub line: usize,
}

/// A `[[check]]` probe: a command run on every host whose output is compared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub command: String,
    pub must_match: bool,
}

/// The `[sync]` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sync {
    /// The local project folder, relative to the inventory's folder when not absolute.
    pub source: PathBuf,
    pub exclude: Vec<String>,
}

/// A whole inventory, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inventory {
    /// The file it was read from, as given.
    pub path: PathBuf,
    /// In node-rank order.
    pub hosts: Vec<Host>,
    /// SSH settings from `[fleet]`, below each host's own and `~/.ssh/config`.
    pub defaults: SshSettings,
    /// `known_hosts` when the inventory names one; otherwise ~/.ssh/config's
    /// UserKnownHostsFile for each host, then ~/.ssh/known_hosts.
    pub known_hosts: Option<PathBuf>,
    pub master_port: u16,
    /// Overrides rank 0's host address as MASTER_ADDR.
    pub master_addr: Option<String>,
    pub checks: Vec<Check>,
    pub sync: Sync,
    /// The default command of `fleet run`.
    pub run_command: Option<Vec<String>>,
}

/// Why an inventory could not be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("cannot read inventory {}: {error}{hint}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
        hint: &'static str,
    },
    #[error("inventory {} is {size} bytes; an inventory is at most {MAX_BYTES} bytes", path.display())]
    TooLarge { path: PathBuf, size: u64 },
    #[error("inventory {} is not UTF-8 text (byte {offset} is not valid UTF-8)", path.display())]
    NotText { path: PathBuf, offset: usize },
    #[error("{0}")]
    At(Located),
}

/// An error at a place in the file: `path:line:column: message`, then the line and a caret.
#[derive(Debug)]
pub struct Located {
    pub path: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
    /// The line, or a window of it around the column.
    source_line: String,
    /// Where the caret goes in `source_line`.
    caret: usize,
    width: usize,
}

/// Characters of a source line shown under an error.
const SNIPPET: usize = 100;

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}:{}:{}: {}",
            self.path.display(),
            self.line,
            self.column,
            self.message
        )?;
        let gutter = self.line.to_string().len();
        writeln!(f, "{:gutter$} |", "")?;
        writeln!(f, "{} | {}", self.line, self.source_line)?;
        write!(
            f,
            "{:gutter$} | {:pad$}{}",
            "",
            "",
            "^".repeat(self.width.max(1)),
            pad = self.caret
        )
    }
}

/// Maps byte offsets of one text to lines and columns.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn error(&self, span: Range<usize>, message: impl Into<String>) -> InventoryError {
        let start = span.start.min(self.text.len());
        let line_start = self.text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = self.text[start..]
            .find('\n')
            .map_or(self.text.len(), |i| start + i);
        let source_line = self.text[line_start..line_end].trim_end_matches('\r');
        let column = self.text[line_start..start].chars().count() + 1;
        let end = span.end.clamp(start, line_end);
        let width = self.text[start..end].chars().count();
        // A very long line is shown as a window around the column.
        let chars: Vec<char> = source_line.chars().collect();
        let from = (column - 1)
            .saturating_sub(SNIPPET / 2)
            .min(chars.len().saturating_sub(SNIPPET));
        let to = (from + SNIPPET).min(chars.len());
        let mut excerpt: String = chars[from..to].iter().collect();
        let mut caret = column - 1 - from;
        if from > 0 {
            excerpt.insert(0, '…');
            caret += 1;
        }
        if to < chars.len() {
            excerpt.push('…');
        }
        InventoryError::At(Located {
            path: self.path.to_path_buf(),
            line: self.text[..start].matches('\n').count() + 1,
            column,
            message: message.into(),
            source_line: excerpt,
            caret,
            width: width.min(SNIPPET),
        })
    }

    /// The line (1-based) of a byte offset.
    fn line_of(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .matches('\n')
            .count()
            + 1
    }
}

// What serde reads. `Spanned` keeps each value's place for the checks serde cannot do.

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawInventory {
    #[serde(default)]
    fleet: RawDefaults,
    #[serde(default)]
    check: Vec<RawCheck>,
    #[serde(default)]
    sync: RawSync,
    #[serde(default)]
    run: RawRun,
    #[serde(default)]
    host: Vec<Spanned<RawHost>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    port: Option<Spanned<i64>>,
    user: Option<Spanned<String>>,
    identity: Option<Spanned<String>>,
    jump: Option<Spanned<String>>,
    known_hosts: Option<Spanned<String>>,
    workdir: Option<Spanned<String>>,
    ranks: Option<Spanned<i64>>,
    device: Option<Device>,
    master_port: Option<Spanned<i64>>,
    master_addr: Option<Spanned<String>>,
    #[serde(default)]
    env: BTreeMap<Spanned<String>, String>,
    activate: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    name: Spanned<String>,
    command: Spanned<String>,
    #[serde(default = "yes")]
    must_match: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSync {
    source: Option<String>,
    exclude: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRun {
    command: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    name: Option<Spanned<String>>,
    address: Spanned<String>,
    port: Option<Spanned<i64>>,
    user: Option<Spanned<String>>,
    identity: Option<Spanned<String>>,
    jump: Option<Spanned<String>>,
    workdir: Option<Spanned<String>>,
    ranks: Option<Spanned<i64>>,
    device: Option<Device>,
    #[serde(default)]
    env: BTreeMap<Spanned<String>, String>,
    activate: Option<Spanned<String>>,
}

impl Inventory {
    /// Reads and validates the inventory at `path`.
    pub fn load(path: &Path) -> Result<Inventory, InventoryError> {
        let read_error = |error: std::io::Error| InventoryError::Read {
            path: path.to_path_buf(),
            hint: if error.kind() == std::io::ErrorKind::NotFound {
                " (write one from inventory/example.toml, or name another with -i PATH or FLEET_INVENTORY)"
            } else {
                ""
            },
            error,
        };
        let size = std::fs::metadata(path).map_err(read_error)?.len();
        if size > MAX_BYTES {
            return Err(InventoryError::TooLarge {
                path: path.to_path_buf(),
                size,
            });
        }
        let bytes = std::fs::read(path).map_err(read_error)?;
        let text = String::from_utf8(bytes).map_err(|e| InventoryError::NotText {
            path: path.to_path_buf(),
            offset: e.utf8_error().valid_up_to(),
        })?;
        Inventory::from_toml(path, &text)
    }

    /// Parses and validates inventory text; `path` is used in errors and to resolve `[sync].source`.
    pub fn from_toml(path: &Path, text: &str) -> Result<Inventory, InventoryError> {
        let src = Source { path, text };
        let raw: RawInventory = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            src.error(span, explain(e.message().trim_end()))
        })?;
        resolve(&src, raw)
    }

    /// Global rank of the first rank on each host (the sum of `ranks` of the hosts before it).
    pub fn first_ranks(&self) -> Vec<u32> {
        self.hosts
            .iter()
            .scan(0u32, |next, host| {
                let first = *next;
                *next += host.ranks;
                Some(first)
            })
            .collect()
    }

    /// Processes in the whole job.
    pub fn world_size(&self) -> u32 {
        self.hosts.iter().map(|h| h.ranks).sum()
    }
}

fn resolve(src: &Source, raw: RawInventory) -> Result<Inventory, InventoryError> {
    let fleet = raw.fleet;
    let defaults = ssh_settings(src, &fleet.port, &fleet.user, &fleet.identity, &fleet.jump)?;
    let known_hosts = fleet
        .known_hosts
        .as_ref()
        .map(|k| local_path(src, k, "known_hosts"))
        .transpose()?;
    let workdir = match &fleet.workdir {
        Some(w) => checked_workdir(src, w)?,
        None => "~/fleet/project".to_string(),
    };
    let ranks = fleet
        .ranks
        .as_ref()
        .map(|r| rank_count(src, r))
        .transpose()?
        .unwrap_or(1);
    let device = fleet.device.unwrap_or(Device::Cuda);
    let master_port = match &fleet.master_port {
        Some(p) => port(src, p)?,
        None => DEFAULT_MASTER_PORT,
    };
    let master_addr = fleet
        .master_addr
        .as_ref()
        .map(|a| address(src, a))
        .transpose()?;
    let each_host = HostDefaults {
        workdir,
        ranks,
        device,
        env: env_table(src, fleet.env)?,
        activate: match &fleet.activate {
            Some(a) => activate_line(src, a)?,
            None => None,
        },
    };
    let hosts = hosts(src, raw.host, &defaults, &each_host)?;
    Ok(Inventory {
        path: src.path.to_path_buf(),
        hosts,
        defaults,
        known_hosts,
        master_port,
        master_addr,
        checks: checks(src, raw.check)?,
        sync: sync_section(src, raw.sync),
        run_command: run_command(src, raw.run)?,
    })
}

/// What `[fleet]` gives every host that does not set it itself.
struct HostDefaults {
    workdir: String,
    ranks: u32,
    device: Device,
    env: BTreeMap<String, String>,
    activate: Option<String>,
}

/// The SSH settings of `[fleet]` or of one host.
fn ssh_settings(
    src: &Source,
    port_value: &Option<Spanned<i64>>,
    user: &Option<Spanned<String>>,
    identity: &Option<Spanned<String>>,
    jump_value: &Option<Spanned<String>>,
) -> Result<SshSettings, InventoryError> {
    Ok(SshSettings {
        port: port_value.as_ref().map(|p| port(src, p)).transpose()?,
        user: user
            .as_ref()
            .map(|u| non_empty(src, u, "user"))
            .transpose()?,
        identity: identity
            .as_ref()
            .map(|i| local_path(src, i, "identity"))
            .transpose()?,
        jump: jump_value.as_ref().map(|j| jump(src, j)).transpose()?,
    })
}

/// Every `[[host]]`, in order, with no name and no address (and port) given twice.
fn hosts(
    src: &Source,
    raw: Vec<Spanned<RawHost>>,
    defaults: &SshSettings,
    each_host: &HostDefaults,
) -> Result<Vec<Host>, InventoryError> {
    if raw.is_empty() {
        return Err(src.error(
            src.text.len()..src.text.len(),
            "no [[host]] entries: add one per machine, with its name and address (see inventory/example.toml)",
        ));
    }
    let mut hosts: Vec<Host> = Vec::with_capacity(raw.len());
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut endpoints: HashMap<(String, Option<u16>), usize> = HashMap::new();
    for entry in raw {
        let line = src.line_of(entry.span().start);
        let h = entry.into_inner();
        let host = host(src, &h, line, each_host)?;
        let name_span = h.name.as_ref().map_or(h.address.span(), |n| n.span());
        if let Some(first) = names.insert(host.name.clone(), line) {
            let name = &host.name;
            return Err(src.error(
                name_span,
                format!("duplicate host name {name:?}: already used by the host on line {first}"),
            ));
        }
        // Two entries for one sshd would start two node ranks on one machine by accident.
        let port = host.ssh.port.or(defaults.port);
        if let Some(first) = endpoints.insert((host.address.to_ascii_lowercase(), port), line) {
            let shown_port = port.map_or(String::new(), |p| format!(":{p}"));
            return Err(src.error(
                h.address.span(),
                format!(
                    "duplicate address {}{shown_port}: the host on line {first} has it already",
                    host.address
                ),
            ));
        }
        hosts.push(host);
    }
    Ok(hosts)
}

/// One `[[host]]` (on `line`), with `[fleet]`'s values where it sets none.
fn host(
    src: &Source,
    h: &RawHost,
    line: usize,
    each_host: &HostDefaults,
) -> Result<Host, InventoryError> {
    let address = address(src, &h.address)?;
    let name = match &h.name {
        Some(n) => host_name(src, n)?,
        None => address.clone(),
    };
    let ssh = ssh_settings(src, &h.port, &h.user, &h.identity, &h.jump)?;
    let mut env = each_host.env.clone();
    env.extend(env_table(src, h.env.clone())?);
    Ok(Host {
        name,
        address,
        ssh,
        workdir: h
            .workdir
            .as_ref()
            .map(|w| checked_workdir(src, w))
            .transpose()?
            .unwrap_or_else(|| each_host.workdir.clone()),
        ranks: h
            .ranks
            .as_ref()
            .map(|r| rank_count(src, r))
            .transpose()?
            .unwrap_or(each_host.ranks),
        device: h.device.unwrap_or(each_host.device),
        env,
        activate: match &h.activate {
            Some(a) => activate_line(src, a)?,
            None => each_host.activate.clone(),
        },
        line,
    })
}

/// The `[[check]]`s.
fn checks(src: &Source, raw: Vec<RawCheck>) -> Result<Vec<Check>, InventoryError> {
    raw.into_iter()
        .map(|c| {
            Ok(Check {
                name: non_empty(src, &c.name, "check name")?,
                command: non_empty(src, &c.command, "check command")?,
                must_match: c.must_match,
            })
        })
        .collect()
}

/// `[run].command`, which must name a program.
fn run_command(src: &Source, raw: RawRun) -> Result<Option<Vec<String>>, InventoryError> {
    match raw.command {
        Some(c) if c.get_ref().is_empty() || c.get_ref()[0].is_empty() => Err(src.error(
            c.span(),
            "[run].command must name a program, e.g. [\"fleet-train\", \"--data\", \"data.csv\"]",
        )),
        Some(c) => Ok(Some(c.into_inner())),
        None => Ok(None),
    }
}

/// `[sync]`: the source folder relative to the inventory's, and what is left out.
fn sync_section(src: &Source, raw: RawSync) -> Sync {
    let base = src.path.parent().unwrap_or(Path::new(""));
    let source = expand_tilde(raw.source.as_deref().unwrap_or("."));
    let joined = if source.is_absolute() {
        source
    } else {
        base.join(source)
    };
    Sync {
        // Resolved where it exists, so messages name `/home/me/proj/runs/<job>`, not
        // `inventory/../runs/<job>`; a missing source is reported as given.
        source: joined.canonicalize().unwrap_or(joined),
        exclude: raw
            .exclude
            .unwrap_or_else(|| vec![".git/".into(), "target/".into(), "runs/".into()]),
    }
}

/// Rewords serde's messages for people who write TOML, not Rust.
fn explain(message: &str) -> String {
    let mut text = message
        .replace("expected i64", "expected an integer")
        .replace("expected a sequence", "expected an array");
    if let Some(rest) = text.strip_prefix("unknown field `") {
        let (field, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let closest = expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(|candidate| (edit_distance(field, candidate), candidate))
            .min();
        if let Some((distance, candidate)) = closest {
            if distance <= 2 {
                text.push_str(&format!(" (did you mean `{candidate}`?)"));
            }
        }
    }
    text
}

/// Levenshtein distance, for "did you mean" on a misspelt field.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

fn port(src: &Source, value: &Spanned<i64>) -> Result<u16, InventoryError> {
    match u16::try_from(*value.get_ref()) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(src.error(
            value.span(),
            format!(
                "port {} is out of range: expected 1 to 65535",
                value.get_ref()
            ),
        )),
    }
}

fn rank_count(src: &Source, value: &Spanned<i64>) -> Result<u32, InventoryError> {
    match u32::try_from(*value.get_ref()) {
        Ok(0) => Err(src.error(value.span(), "ranks = 0: a host needs at least 1 rank (one per GPU); remove the host to leave it out")),
        Ok(r) if r <= 1024 => Ok(r),
        _ => Err(src.error(value.span(), format!("ranks = {}: expected 1 to 1024 processes on a host", value.get_ref()))),
    }
}

fn jump(src: &Source, value: &Spanned<String>) -> Result<Vec<Hop>, InventoryError> {
    parse_jump(value.get_ref()).map_err(|why| src.error(value.span(), format!("jump: {why}")))
}

fn non_empty(src: &Source, value: &Spanned<String>, what: &str) -> Result<String, InventoryError> {
    let v = value.get_ref();
    if v.trim().is_empty() {
        return Err(src.error(value.span(), format!("{what} is empty")));
    }
    if v.chars().any(char::is_control) {
        return Err(src.error(value.span(), format!("{what} contains a control character")));
    }
    Ok(v.clone())
}

/// A workdir is fleet's alone: `fleet sync --delete` may empty it. `/`, a home directory
/// itself (`~`, `.`, `/root`, `/home/NAME`, `/Users/NAME`) and the folders that hold home
/// directories are refused, as is `..` (the host checks the resolved path again).
fn checked_workdir(src: &Source, value: &Spanned<String>) -> Result<String, InventoryError> {
    let v = non_empty(src, value, "workdir")?;
    let parts: Vec<&str> = v
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    let absolute = v.starts_with('/');
    let home_relative = !absolute && parts.first() == Some(&"~");
    let under_home = if absolute {
        &parts[..]
    } else if home_relative {
        &parts[1..]
    } else {
        &parts[..]
    };
    let refuse = |why: &str| {
        Err(src.error(
            value.span(),
            format!("workdir {v:?} {why}: fleet sync --delete could remove everything in it; use a folder of its own, such as \"~/fleet/project\""),
        ))
    };
    if parts.contains(&"..") {
        return refuse("climbs out with \"..\"");
    }
    if absolute && parts.is_empty() {
        return refuse("is the root folder");
    }
    if !absolute && under_home.is_empty() {
        return refuse("is the home directory");
    }
    if absolute {
        let homes = ["home", "Users", "var/home"];
        let joined = parts.join("/");
        if parts == ["root"]
            || homes.iter().any(|h| {
                joined == *h
                    || joined
                        .rsplit_once('/')
                        .is_some_and(|(parent, _)| parent == *h)
            })
        {
            return refuse("is a home directory or the folder that holds them");
        }
    }
    Ok(v)
}

/// `activate`: one shell line; an empty one (`activate = ""` on a host) turns the default off.
fn activate_line(src: &Source, value: &Spanned<String>) -> Result<Option<String>, InventoryError> {
    let v = value.get_ref();
    if v.trim().is_empty() {
        return Ok(None);
    }
    if v.chars().any(|c| c.is_control() && c != '\t') {
        return Err(src.error(
            value.span(),
            "activate is one shell line: join commands with && or ;",
        ));
    }
    Ok(Some(v.clone()))
}

fn address(src: &Source, value: &Spanned<String>) -> Result<String, InventoryError> {
    let v = non_empty(src, value, "address")?;
    if v.chars().any(char::is_whitespace) || v.starts_with('-') {
        return Err(src.error(
            value.span(),
            format!("address {v:?} is not a host name or IP address"),
        ));
    }
    Ok(v)
}

/// Host names appear in log prefixes, file names under `runs/` and JSON; keep them plain.
fn host_name(src: &Source, value: &Spanned<String>) -> Result<String, InventoryError> {
    let v = non_empty(src, value, "host name")?;
    let plain = |c: char| c.is_alphanumeric() || matches!(c, '.' | '_' | '-');
    if !v.chars().all(plain) || v.starts_with(['.', '-']) || v.chars().count() > 64 {
        return Err(src.error(
            value.span(),
            format!("host name {v:?}: use up to 64 letters, digits, '.', '_' or '-', not starting with '.' or '-'"),
        ));
    }
    Ok(v)
}

fn local_path(
    src: &Source,
    value: &Spanned<String>,
    what: &str,
) -> Result<PathBuf, InventoryError> {
    Ok(expand_tilde(&non_empty(src, value, what)?))
}

fn env_table(
    src: &Source,
    table: BTreeMap<Spanned<String>, String>,
) -> Result<BTreeMap<String, String>, InventoryError> {
    let mut env = BTreeMap::new();
    for (key, value) in table {
        let k = key.get_ref();
        let valid = k
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(src.error(
                key.span(),
                format!("env name {k:?} is not a valid variable name (letters, digits, '_')"),
            ));
        }
        env.insert(key.into_inner(), value);
    }
    Ok(env)
}

/// Expands a leading `~` or `~/` to the local home directory.
pub fn expand_tilde(path: &str) -> PathBuf {
    match path.strip_prefix('~') {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            home.join(rest.trim_start_matches('/'))
        }
        _ => PathBuf::from(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Inventory, String> {
        Inventory::from_toml(Path::new("fleet.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn jump_chains_parse_as_proxy_jump_does_and_bad_ones_name_their_place() {
        let hops = parse_jump("me@10.0.0.5:2222, ssh://ops@[fe80::1]:22,bastion").unwrap();
        let shown: Vec<String> = hops.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["me@10.0.0.5:2222", "ops@[fe80::1]:22", "bastion"]);
        assert_eq!(parse_jump("none").unwrap(), []);
        let err =
            parse("[fleet]\njump = \"me@host:99999\"\n[[host]]\naddress = \"a\"\n").unwrap_err();
        assert!(
            err.contains("fleet.toml:2:8: jump: \"me@host:99999\" is not a jump host ([user@]host[:port]): the port is not a number"),
            "{err}"
        );
        let err = parse("[[host]]\naddress = \"a\"\njump = \"a,,b\"\n").unwrap_err();
        assert!(
            err.contains("fleet.toml:3:8: jump: \"\" is not a jump host"),
            "{err}"
        );
    }

    const THREE: &str = r#"
[fleet]
user = "trainer"
ranks = 1
env = { NCCL_DEBUG = "WARN" }

[[host]]
name = "node1"
address = "192.168.1.100"

[[host]]
name = "node2"
address = "192.168.1.101"
ranks = 2
env = { NCCL_DEBUG = "INFO", EXTRA = "1" }

[[host]]
name = "node3"
address = "192.168.1.102"
port = 2222
user = "alice"
device = "cpu"
"#;

    #[test]
    fn defaults_apply_and_hosts_override() {
        let inv = parse(THREE).unwrap();
        let names: Vec<_> = inv.hosts.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["node1", "node2", "node3"]);
        assert_eq!(inv.defaults.user.as_deref(), Some("trainer"));
        assert_eq!(inv.hosts[2].ssh.user.as_deref(), Some("alice"));
        assert_eq!(inv.hosts[2].ssh.port, Some(2222));
        assert_eq!(inv.hosts[0].ssh.port, None);
        assert_eq!(inv.hosts[1].ranks, 2);
        assert_eq!(inv.hosts[2].device, Device::Cpu);
        assert_eq!(inv.hosts[0].device, Device::Cuda);
        assert_eq!(inv.hosts[0].env["NCCL_DEBUG"], "WARN");
        assert_eq!(inv.hosts[1].env["NCCL_DEBUG"], "INFO");
        assert_eq!(inv.hosts[1].env["EXTRA"], "1");
        assert_eq!(inv.master_port, DEFAULT_MASTER_PORT);
        assert_eq!(inv.first_ranks(), [0, 1, 3]);
        assert_eq!(inv.world_size(), 4);
        assert_eq!(inv.hosts[1].line, 11);
    }

    #[test]
    fn unknown_field_is_named_with_its_place() {
        let err = parse("[[host]]\nname = \"a\"\nadress = \"10.0.0.1\"\n").unwrap_err();
        assert!(
            err.starts_with("fleet.toml:3:1: unknown field `adress`"),
            "{err}"
        );
    }

    #[test]
    fn misspelt_fields_get_a_suggestion() {
        let err = parse("[[host]]\nadress = \"10.0.0.1\"\n").unwrap_err();
        assert!(err.contains("(did you mean `address`?)"), "{err}");
        let err = parse("[[host]]\naddress = \"10.0.0.1\"\ncolour = 1\n").unwrap_err();
        assert!(!err.contains("did you mean"), "{err}");
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "ab"), 2);
    }

    #[test]
    fn long_lines_are_shown_around_the_column() {
        let err = parse(&format!("a = {}{}", "[".repeat(1000), "]".repeat(1000))).unwrap_err();
        let snippet = err.lines().nth(2).unwrap();
        assert!(snippet.chars().count() < 120, "{snippet}");
        assert!(err.lines().count() == 4, "{err}");
    }

    #[test]
    fn name_defaults_to_address() {
        let inv = parse("[[host]]\naddress = \"10.0.0.1\"\n").unwrap();
        assert_eq!(inv.hosts[0].name, "10.0.0.1");
    }

    #[test]
    fn same_address_on_other_ports_is_two_hosts() {
        let inv = parse("[[host]]\naddress = \"h\"\nport = 2201\n[[host]]\naddress = \"h\"\nport = 2202\nname = \"b\"\n").unwrap();
        assert_eq!(inv.hosts.len(), 2);
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        let err = parse("[[host]]\nname = \"노드 1\"\naddress = \"a\"\n").unwrap_err();
        assert!(
            err.starts_with("fleet.toml:2:8: host name \"노드 1\""),
            "{err}"
        );
    }

    #[test]
    fn korean_names_are_plain() {
        let inv = parse("[[host]]\nname = \"노드1\"\naddress = \"a\"\n").unwrap();
        assert_eq!(inv.hosts[0].name, "노드1");
    }

    #[test]
    fn sync_source_is_relative_to_the_inventory() {
        let inv = Inventory::from_toml(
            Path::new("inv/fleet.toml"),
            "[sync]\nsource = \"..\"\n[[host]]\naddress = \"a\"\n",
        )
        .unwrap();
        assert_eq!(inv.sync.source, Path::new("inv/.."));
    }

    #[test]
    fn tilde_expands_to_home() {
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default();
        assert_eq!(expand_tilde("~/.ssh/id"), home.join(".ssh/id"));
        assert_eq!(expand_tilde("~user/x"), PathBuf::from("~user/x"));
        assert_eq!(expand_tilde("/abs"), PathBuf::from("/abs"));
    }

    #[test]
    fn workdirs_that_would_let_delete_empty_a_home_are_refused_by_line() {
        for bad in [
            "~",
            "~/",
            ".",
            "./",
            "/",
            "//",
            "/root",
            "/home",
            "/home/me",
            "/home/me/",
            "/Users/me",
            "~/a/../..",
            "/srv/../root",
        ] {
            let text = format!("[fleet]\nworkdir = \"{bad}\"\n[[host]]\naddress = \"a\"\n");
            let err = parse(&text).expect_err(bad).to_string();
            assert!(err.contains("fleet.toml:2:11"), "{bad}: {err}");
            assert!(err.contains("use a folder of its own"), "{bad}: {err}");
            let per_host = format!("[[host]]\naddress = \"a\"\nworkdir = \"{bad}\"\n");
            assert!(
                parse(&per_host)
                    .expect_err(bad)
                    .to_string()
                    .contains("fleet.toml:3:11")
            );
        }
        for good in [
            "~/fleet/project",
            "/home/me/project",
            "/srv/fleet",
            "work",
            "/tmp/x",
            "~/.local/fleet",
        ] {
            let text = format!("[fleet]\nworkdir = \"{good}\"\n[[host]]\naddress = \"a\"\n");
            assert_eq!(parse(&text).unwrap().hosts[0].workdir, good);
        }
    }
}
