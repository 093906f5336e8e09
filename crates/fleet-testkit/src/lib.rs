//! The harness shared by the integration tests of fleet and fleet-train: the test bed's hosts,
//! and a builder that runs the real `fleet` binary in a clean environment (its own HOME, no
//! agent, no inherited inventory), so a test sees only what it set up.
//!
//! The binaries are the workspace's own, next to the test executable (`target/<profile>/`):
//! `cargo test --workspace` builds both, since both packages have integration tests.

use std::cell::RefCell;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// One host of the test bed, as `scripts/testbed.sh` wrote it to hosts.tsv.
#[derive(Clone, Debug)]
pub struct TestHost {
    pub name: String,
    pub addr: String,
    pub port: u16,
    /// Its network namespace (netns variant).
    pub netns: String,
}

/// The hosts of a hosts.tsv of the test bed (name, address, port, netns).
fn read_hosts(tsv: &Path) -> Vec<TestHost> {
    let text = std::fs::read_to_string(tsv).unwrap_or_else(|e| {
        panic!(
            "the test bed is not up ({}: {e}); run the tests with scripts/test.sh",
            tsv.display()
        )
    });
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            TestHost {
                name: f[0].to_string(),
                addr: f[1].to_string(),
                port: f[2].parse().unwrap(),
                netns: f.get(3).unwrap_or(&"").to_string(),
            }
        })
        .collect()
}

/// The running test bed (`scripts/testbed.sh up`, done by `scripts/test.sh`).
#[derive(Clone, Debug)]
pub struct Testbed {
    pub dir: PathBuf,
    pub hosts: Vec<TestHost>,
}

/// The test bed's lock: tests that only use it share it, a test that changes it for everyone has
/// it alone.
static BED: RwLock<()> = RwLock::new(());

/// What the current test holds of the test bed. libtest runs every test on a thread of its own,
/// so the hold ends with the test, passed or failed.
enum Hold {
    Shared(#[allow(dead_code)] RwLockReadGuard<'static, ()>),
    Alone(#[allow(dead_code)] RwLockWriteGuard<'static, ()>),
}

thread_local! {
    static HOLD: RefCell<Option<Hold>> = const { RefCell::new(None) };
}

impl Testbed {
    /// The test bed, shared with the tests running beside this one.
    pub fn get() -> Testbed {
        HOLD.with(|hold| {
            let mut hold = hold.borrow_mut();
            if hold.is_none() {
                *hold = Some(Hold::Shared(
                    BED.read().unwrap_or_else(PoisonError::into_inner),
                ));
            }
        });
        Testbed::read()
    }

    /// The test bed for this test alone, for a test that changes it for everyone (stops a host,
    /// cuts, shapes or walls a link, counts sshd processes): waits until no other test uses it
    /// and keeps them out until this test ends. It must come before any other use of the bed.
    pub fn alone() -> Testbed {
        HOLD.with(|hold| {
            let mut hold = hold.borrow_mut();
            match *hold {
                Some(Hold::Alone(_)) => {}
                Some(Hold::Shared(_)) => {
                    panic!("Testbed::alone() must come before the test's first Testbed::get()")
                }
                None => {
                    *hold = Some(Hold::Alone(
                        BED.write().unwrap_or_else(PoisonError::into_inner),
                    ))
                }
            }
        });
        Testbed::read()
    }

    /// The test bed as scripts/testbed.sh described it in `$TB_DIR`.
    fn read() -> Testbed {
        let dir = PathBuf::from(
            std::env::var_os("TB_DIR").unwrap_or_else(|| "/tmp/fleet-testbed".into()),
        );
        let hosts = read_hosts(&dir.join("hosts.tsv"));
        Testbed { dir, hosts }
    }

    /// The jump host: made like the others, but in neither hosts.tsv nor fleet.toml.
    pub fn bastion(&self) -> TestHost {
        read_hosts(&self.dir.join("bastion.tsv")).remove(0)
    }

    /// The inventory testbed.sh wrote for its hosts.
    pub fn inventory(&self) -> PathBuf {
        self.dir.join("fleet.toml")
    }

    pub fn key(&self) -> PathBuf {
        self.dir.join("id_ed25519")
    }

    pub fn known_hosts(&self) -> PathBuf {
        self.dir.join("known_hosts")
    }

    /// An inventory of every test-bed host (root, cpu, no identity or known_hosts), as data.
    pub fn inventory_builder(&self) -> Inventory {
        let mut inventory = Inventory::new()
            .fleet("user", "root")
            .fleet("device", "cpu");
        for h in &self.hosts {
            inventory =
                inventory
                    .add_host(&h.name, &h.addr)
                    .host(&h.name, "port", u32::from(h.port));
        }
        inventory
    }

    /// An inventory of every test-bed host that logs in with `identity` and checks host keys
    /// against `known_hosts`.
    pub fn login_inventory(&self, identity: &Path, known_hosts: &Path) -> Inventory {
        self.inventory_builder()
            .fleet("identity", path_value(identity))
            .fleet("known_hosts", path_value(known_hosts))
    }

    /// An inventory that logs in with the test bed's key and knows its host keys, whose hosts
    /// each get their own workdir under `/tmp/fleet-tests/<name>/` (emptied first), syncing
    /// `source`.
    pub fn sync_inventory(&self, name: &str, source: &Path) -> Inventory {
        let root = PathBuf::from("/tmp/fleet-tests").join(name);
        let _ = std::fs::remove_dir_all(&root);
        self.login_inventory(&self.key(), &self.known_hosts())
            .section("sync", "source", path_value(source))
            .section("sync", "exclude", vec!["target/"])
            .every_host("workdir", |host| path_value(&root.join(host)))
    }

    /// Runs a shell command on a host with OpenSSH's own client, independent of fleet.
    pub fn ssh(&self, host: &str, command: &str) -> String {
        let out = Command::new("ssh")
            .arg("-F")
            .arg(self.dir.join("ssh_config"))
            .arg(host)
            .arg(command)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ssh {host} {command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a script of the test bed (`stop host3`, `cut host2`, ...).
    pub fn control(&self, args: &[&str]) {
        let status = Command::new(repo().join("scripts/testbed.sh"))
            .args(args)
            .env("TB_DIR", &self.dir)
            .status()
            .unwrap();
        assert!(status.success(), "testbed.sh {args:?} failed");
    }
}

/// An inventory built as data and written as TOML by the toml crate, so that no test quotes a
/// value by hand: `[fleet]` keys, other sections' keys, `[[check]]`s and `[[host]]`s in order.
#[derive(Clone, Debug, Default)]
pub struct Inventory {
    tables: toml::Table,
}

/// A path as a TOML string.
pub fn path_value(path: &Path) -> toml::Value {
    toml::Value::String(path.display().to_string())
}

impl Inventory {
    pub fn new() -> Inventory {
        Inventory::default()
    }

    /// Sets `key` of `[fleet]`.
    pub fn fleet(self, key: &str, value: impl Into<toml::Value>) -> Inventory {
        self.section("fleet", key, value)
    }

    /// Sets `key` of the table `[section]`.
    pub fn section(mut self, section: &str, key: &str, value: impl Into<toml::Value>) -> Inventory {
        let table = self
            .tables
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table
            .as_table_mut()
            .unwrap_or_else(|| panic!("[{section}] is not a table"))
            .insert(key.to_string(), value.into());
        self
    }

    /// Removes `key` from the table `[section]`.
    pub fn remove(mut self, section: &str, key: &str) -> Inventory {
        if let Some(table) = self
            .tables
            .get_mut(section)
            .and_then(toml::Value::as_table_mut)
        {
            table.remove(key);
        }
        self
    }

    /// Sets `name` in `[fleet]`'s `env`, the environment of every rank.
    pub fn env(self, name: &str, value: &str) -> Inventory {
        let mut env = self
            .tables
            .get("fleet")
            .and_then(|fleet| fleet.get("env"))
            .and_then(toml::Value::as_table)
            .cloned()
            .unwrap_or_default();
        env.insert(name.to_string(), value.into());
        self.fleet("env", env)
    }

    /// Adds a `[[check]]` running `command` on every host.
    pub fn check(mut self, name: &str, command: &str) -> Inventory {
        let mut check = toml::Table::new();
        check.insert("name".into(), name.into());
        check.insert("command".into(), command.into());
        self.array("check").push(toml::Value::Table(check));
        self
    }

    /// Adds a `[[host]]` after the others.
    pub fn add_host(mut self, name: &str, address: &str) -> Inventory {
        let mut host = toml::Table::new();
        host.insert("name".into(), name.into());
        host.insert("address".into(), address.into());
        self.array("host").push(toml::Value::Table(host));
        self
    }

    /// Sets `key` of the host named `name`.
    pub fn host(mut self, name: &str, key: &str, value: impl Into<toml::Value>) -> Inventory {
        let host = self
            .array("host")
            .iter_mut()
            .filter_map(toml::Value::as_table_mut)
            .find(|h| h.get("name").and_then(toml::Value::as_str) == Some(name))
            .unwrap_or_else(|| panic!("no host {name} in the inventory"));
        host.insert(key.to_string(), value.into());
        self
    }

    /// Sets `key` of every host to what `value_of` gives for its name.
    pub fn every_host<V: Into<toml::Value>>(
        mut self,
        key: &str,
        value_of: impl Fn(&str) -> V,
    ) -> Inventory {
        for host in self
            .array("host")
            .iter_mut()
            .filter_map(toml::Value::as_table_mut)
        {
            let name = host["name"].as_str().unwrap_or_default().to_string();
            host.insert(key.to_string(), value_of(&name).into());
        }
        self
    }

    fn array(&mut self, name: &str) -> &mut Vec<toml::Value> {
        self.tables
            .entry(name)
            .or_insert_with(|| toml::Value::Array(Vec::new()))
            .as_array_mut()
            .unwrap_or_else(|| panic!("{name} is not an array of tables"))
    }

    /// The inventory as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.tables).unwrap()
    }

    /// Writes it to `dir/fleet.toml` and returns that path.
    pub fn write_in(&self, dir: &Path) -> PathBuf {
        let path = dir.join("fleet.toml");
        std::fs::write(&path, self.to_toml()).unwrap();
        path
    }
}

/// A master port for one test's job, used by no other test of this run (29600 and up), so jobs
/// can run side by side: `fleet check` and rank 0 listen on it.
pub fn own_master_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(29600);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A turn with the inventory's default master port, 29500, for the tests whose inventory
/// keeps it (as the README's does) or that hold it on a host: they take turns.
pub fn default_master_port() -> MutexGuard<'static, ()> {
    static PORT_29500: Mutex<()> = Mutex::new(());
    PORT_29500.lock().unwrap_or_else(PoisonError::into_inner)
}

/// insta settings for snapshots of what fleet printed on the test bed: the hosts' addresses, key
/// fingerprints, master ports, job ids, temporary folders and times become placeholders, so
/// that a snapshot holds only what reads the same in every run. Bind them around
/// `insta::assert_snapshot!`.
pub fn redactions(tb: &Testbed) -> insta::Settings {
    let mut settings = insta::Settings::clone_current();
    // Every test's job has a master port of its own (own_master_port). First, as the addresses
    // become words with a space.
    settings.add_filter(r"(MASTER_ADDR \S+):\d+", "$1:[port]");
    for host in &tb.hosts {
        settings.add_filter(
            &format!(r"\b{}\b", host.addr.replace('.', r"\.")),
            format!("[{} address]", host.name),
        );
    }
    settings.add_filter(r"SHA256:[A-Za-z0-9+/]+", "SHA256:[fingerprint]");
    settings.add_filter(r"\b\d{8}-\d{6}-[0-9a-z]+\b", "[job id]");
    settings.add_filter(r"/tmp/\.tmp[0-9A-Za-z]+", "[temporary folder]");
    settings.add_filter(r"\b\d+(\.\d+)? ?(ms|s)\b", "[time]");
    settings
}

/// The workspace's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// A binary of the workspace, built beside the running test: `target/<profile>/<name>`.
#[track_caller]
pub fn workspace_binary(name: &str) -> PathBuf {
    let test = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test>-<hash>
    let profile = test.parent().and_then(Path::parent).unwrap();
    let binary = profile.join(name);
    assert!(
        binary.is_file(),
        "{} is not built: run the tests with `cargo test --workspace` (scripts/test.sh does)",
        binary.display()
    );
    binary
}

/// The `fleet` binary under test.
pub fn fleet_binary() -> PathBuf {
    workspace_binary("fleet")
}

/// The `fleet-train` binary under test.
pub fn trainer_binary() -> PathBuf {
    workspace_binary("fleet-train")
}

/// A `fleet` invocation with an isolated environment.
pub struct Fleet {
    command: Command,
    home: tempfile::TempDir,
}

impl Default for Fleet {
    fn default() -> Fleet {
        Fleet::new()
    }
}

impl Fleet {
    pub fn new() -> Fleet {
        let home = tempfile::tempdir().unwrap();
        let mut command = Command::new(fleet_binary());
        // In the package's folder, as cargo runs its tests: paths like tests/fixtures/... hold.
        command
            .current_dir(std::env::current_dir().unwrap())
            .env("HOME", home.path())
            .env_remove("SSH_AUTH_SOCK")
            .env_remove("FLEET_INVENTORY")
            .env_remove("NO_COLOR")
            .env_remove("CLICOLOR_FORCE");
        Fleet { command, home }
    }

    /// Runs with `home` as HOME, for tests that need two commands to share one.
    pub fn in_home(home: &Path) -> Fleet {
        let mut fleet = Fleet::new();
        fleet.command.env("HOME", home);
        fleet
    }

    /// Runs it in `dir` instead of the repository.
    pub fn current_dir(mut self, dir: &Path) -> Fleet {
        self.command.current_dir(dir);
        self
    }

    /// The HOME the command sees (to place `~/.ssh/config` in).
    pub fn home(&self) -> &Path {
        self.home.path()
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Fleet {
        self.command.arg(arg);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Fleet
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command.args(args);
        self
    }

    pub fn run_with_env(mut self, key: &str, value: &str) -> Run {
        self.command.env(key, value);
        self.run()
    }

    /// Starts it with stdout and stderr piped, for tests that act while it runs.
    pub fn spawn(mut self) -> (std::process::Child, tempfile::TempDir) {
        let child = self
            .command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        (child, self.home)
    }

    pub fn run(mut self) -> Run {
        let output = self.command.output().unwrap();
        Run::from(output)
    }
}

/// What a finished `fleet` printed and how it exited.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Run {
    /// stdout lines, sorted (hosts answer in any order).
    pub fn sorted_stdout(&self) -> Vec<&str> {
        let mut lines: Vec<&str> = self.stdout.lines().collect();
        lines.sort();
        lines
    }

    /// stdout as JSON Lines (`--json`), one value per line; every record names its `type`.
    #[track_caller]
    pub fn records(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .map(|l| {
                let record: serde_json::Value =
                    serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: not JSON: {l}"));
                assert!(
                    record["type"].is_string(),
                    "a --json record without a type: {l}"
                );
                record
            })
            .collect()
    }

    /// Fails the test, showing all of stderr, unless stderr contains `needle`.
    #[track_caller]
    pub fn assert_stderr_contains(&self, needle: &str) -> &Run {
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}\n--- stderr\n{}",
            self.stderr
        );
        self
    }

    /// Fails the test, showing all of stdout, unless stdout contains `needle`.
    #[track_caller]
    pub fn assert_stdout_contains(&self, needle: &str) -> &Run {
        assert!(
            self.stdout.contains(needle),
            "stdout lacks {needle:?}\n--- stdout\n{}",
            self.stdout
        );
        self
    }

    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Run {
        assert_eq!(
            self.code,
            Some(code),
            "exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// A fresh ed25519 key pair in `dir`, with an optional passphrase.
pub fn keygen(dir: &Path, name: &str, passphrase: &str) -> PathBuf {
    let path = dir.join(name);
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", passphrase, "-C", name, "-f"])
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    path
}

/// A project folder for one test, and an inventory that syncs it to per-test workdirs
/// (`/tmp/fleet-tests/<name>/<host>`).
pub struct Project {
    pub tb: Testbed,
    pub source: tempfile::TempDir,
    /// Holds the inventory, and serves as HOME where a test needs one that outlives a run.
    pub config: tempfile::TempDir,
    pub inventory: PathBuf,
    pub name: String,
    /// What `inventory` holds, as data (`Project::configure` changes both).
    spec: std::cell::RefCell<Inventory>,
}

impl Project {
    pub fn new(name: &str) -> Project {
        let tb = Testbed::get();
        let source = tempfile::tempdir().unwrap();
        let config = tempfile::tempdir().unwrap();
        let spec = tb.sync_inventory(name, source.path());
        let inventory = spec.write_in(config.path());
        Project {
            tb,
            source,
            config,
            inventory,
            name: name.to_string(),
            spec: spec.into(),
        }
    }

    /// Changes the inventory (`[fleet]` keys, hosts, sections) and writes it again.
    pub fn configure(&self, change: impl FnOnce(Inventory) -> Inventory) {
        let changed = change(self.spec.take());
        changed.write_in(self.config.path());
        self.spec.replace(changed);
    }

    pub fn root(&self) -> &Path {
        self.source.path()
    }

    /// Writes a file of the project, creating its folders.
    pub fn write(&self, path: &str, content: impl AsRef<[u8]>) {
        let full = self.root().join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, content).unwrap();
    }

    pub fn workdir(&self, host: &str) -> String {
        format!("/tmp/fleet-tests/{}/{host}", self.name)
    }

    /// Processes on `host` whose command line contains `pattern`, as `pgrep -a` lists them.
    pub fn remaining_on(&self, host: &str, pattern: &str) -> String {
        // The [x] trick keeps pgrep from finding the shell that runs it.
        let pattern = format!("[{}]{}", &pattern[..1], &pattern[1..]);
        self.tb
            .ssh(host, &format!("pgrep -a -f '{pattern}' || true"))
    }

    /// Processes on any test-bed host whose command line contains `pattern`.
    pub fn remaining(&self, pattern: &str) -> Vec<String> {
        self.tb
            .hosts
            .iter()
            .flat_map(|h| {
                self.remaining_on(&h.name, pattern)
                    .lines()
                    .map(|l| format!("{}: {l}", h.name))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// `fleet -i <inventory> ARGS`.
    pub fn fleet(&self, args: &[&str]) -> Fleet {
        Fleet::new().arg("-i").arg(&self.inventory).args(args)
    }

    /// Like [`Project::fleet`], with `home` as HOME: runs that share it share fleet's caches.
    pub fn fleet_in(&self, home: &Path, args: &[&str]) -> Fleet {
        Fleet::in_home(home)
            .arg("-i")
            .arg(&self.inventory)
            .args(args)
    }

    /// `fleet run --grace 2` of ranks that print "ready" and then `sleep <tag>` (a number other
    /// tests do not use, so `remaining` finds exactly these), returned once every rank is ready:
    /// the running fleet, its HOME, and the rest of its stdout.
    pub fn start_sleepers(
        &self,
        tag: u32,
    ) -> (
        std::process::Child,
        tempfile::TempDir,
        std::io::BufReader<std::process::ChildStdout>,
    ) {
        let script = format!("echo ready; exec sleep {tag}");
        let (mut child, home) = self
            .fleet(&["run", "--grace", "2", "--", "sh", "-c", &script])
            .spawn();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        await_lines(&mut stdout, "ready", self.tb.hosts.len());
        (child, home, stdout)
    }
}

/// Reads a child's stdout until `count` lines contain `needle`, within a deadline.
pub fn await_lines(out: &mut impl std::io::BufRead, needle: &str, count: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut seen = 0;
    let mut line = String::new();
    while seen < count {
        assert!(
            std::time::Instant::now() < deadline,
            "only {seen} of {count} lines with {needle:?}"
        );
        line.clear();
        assert_ne!(out.read_line(&mut line).unwrap(), 0, "fleet ended early");
        seen += usize::from(line.contains(needle));
    }
}

/// Waits for a child with a deadline that only catches hangs.
pub fn wait(child: &mut std::process::Child) -> Option<i32> {
    wait_for(child, std::time::Duration::from_secs(60))
}

/// Waits for a child up to `limit`; a child still running then is killed and the test fails.
pub fn wait_for(child: &mut std::process::Child, limit: std::time::Duration) -> Option<i32> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("fleet did not end within {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Undoes a test-bed change (`["start", "host3"]`, `["heal", "host2"]`) however the test ends.
pub struct Restore<'a> {
    pub tb: &'a Testbed,
    pub args: [&'static str; 2],
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        self.tb.control(&self.args);
    }
}

/// Sends SIGINT (Ctrl-C) to a child.
pub fn interrupt(child: &std::process::Child) {
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -INT failed");
}

/// Runs the shell line `command` on a terminal of its own (`script`), with `home` as HOME and
/// no agent, typing `answers` into it; returns the exit code and everything the terminal showed.
pub fn on_a_terminal(command: &str, home: &Path, answers: &[u8]) -> (Option<i32>, String) {
    use std::io::Write;
    let mut child = Command::new("script")
        .args(["-qec", command, "/dev/null"])
        .env("HOME", home)
        .env_remove("SSH_AUTH_SOCK")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(answers).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The README, then every page of `docs/` (in name order), as one text.
pub fn documentation() -> String {
    let mut pages: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.sort();
    let mut text = std::fs::read_to_string(repo().join("README.md")).unwrap();
    for page in pages {
        text.push_str("\n\n");
        text.push_str(&std::fs::read_to_string(page).unwrap());
    }
    text
}

/// The text the documentation (README or docs/) quotes in backticks that begins with `start`
/// (the first such quote): `` `text` ``, or ``` `` text `` ``` for a text that holds a
/// backtick itself.
#[track_caller]
pub fn readme_quote(start: &str) -> String {
    let readme = documentation();
    let mut from = 0;
    while let Some(i) = readme[from..].find(start).map(|i| from + i) {
        let before = &readme[..i];
        let after = &readme[i..];
        let end = if before.ends_with("`` ") {
            after.find(" ``")
        } else if before.ends_with('`') {
            after.find('`')
        } else {
            None
        };
        if let Some(end) = end {
            return after[..end].to_string();
        }
        from = i + start.len();
    }
    panic!("neither the README nor docs/ quotes `{start}...` any longer")
}

/// Asserts that a line of `output` says what the README's `quote` says, once `substitute`
/// turns the README's names and numbers into this run's: its pieces between `...` (or `…`)
/// appear in that order on one line.
#[track_caller]
pub fn assert_says(output: &str, quote: &str, substitute: &[(&str, &str)]) {
    let mut quote = quote.replace('…', "...");
    for (from, to) in substitute {
        quote = quote.replace(from, to);
    }
    let pieces: Vec<&str> = quote.split("...").map(str::trim).collect();
    let says = |line: &str| {
        let mut rest = line;
        pieces.iter().all(|piece| match rest.find(piece) {
            Some(i) => {
                rest = &rest[i + piece.len()..];
                true
            }
            None => false,
        })
    };
    assert!(
        output.lines().any(says),
        "no line says what the README quotes, `{quote}`:\n{output}"
    );
}
