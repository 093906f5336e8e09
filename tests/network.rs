//! The networks users really have: GPU hosts reachable only through a bastion, described in
//! `~/.ssh/config` (Include, ProxyJump, per-host HostName) or by `jump =` in the inventory.
//! The test bed's wall makes hosts 1-3 refuse SSH from this machine, as a lab network does, so
//! these tests live in their own binary and take a lock against each other.

mod common;

use std::path::Path;
use std::sync::Mutex;

use common::{Fleet, Restore, Testbed};

static TESTBED: Mutex<()> = Mutex::new(());

/// Raises the wall (hosts 1-3 refuse SSH from this machine) until dropped, after proving it
/// stands: a direct connection is refused.
fn wall(tb: &Testbed) -> Restore<'_> {
    tb.control(&["wall", "on"]);
    let restore = Restore {
        tb,
        args: ["wall", "off"],
    };
    let direct = Fleet::new()
        .arg("-i")
        .arg(tb.inventory())
        .args(["exec", "--", "true"])
        .run();
    direct.assert_code(3);
    assert!(
        direct.stderr.contains("Connection refused"),
        "{}",
        direct.stderr
    );
    restore
}

/// An inventory of hosts 1-3 reached as `address` names them (`gpu1`, ...), each with its
/// workdir under `/tmp/fleet-tests/<name>/`, syncing `source`; `fleet_extra` goes into [fleet].
fn inventory(
    dir: &Path,
    name: &str,
    source: &Path,
    fleet_extra: &str,
    address: impl Fn(usize) -> String,
) -> std::path::PathBuf {
    let tb = Testbed::get();
    let root = Path::new("/tmp/fleet-tests").join(name);
    let _ = std::fs::remove_dir_all(&root);
    let mut text = format!(
        "[fleet]\ndevice = \"cpu\"\n{fleet_extra}\n\n[sync]\nsource = \"{}\"\n",
        source.display()
    );
    for (i, h) in tb.hosts.iter().enumerate() {
        text.push_str(&format!(
            "\n[[host]]\nname = \"{}\"\naddress = \"{}\"\nworkdir = \"{}\"\n",
            h.name,
            address(i),
            root.join(&h.name).display()
        ));
    }
    let path = dir.join("fleet.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `~/.ssh/config` as a lab's users write it: an Include of config.d/*.conf (relative to
/// ~/.ssh), the bastion by name, and every GPU host behind it with its own HostName.
fn lab_ssh_config(home: &Path, tb: &Testbed) {
    let ssh = home.join(".ssh");
    std::fs::create_dir_all(ssh.join("config.d")).unwrap();
    std::fs::write(
        ssh.join("config"),
        format!(
            "Include config.d/*.conf\n\nHost *\n  User root\n  IdentityFile {}\n  UserKnownHostsFile {}\n",
            tb.key().display(),
            tb.known_hosts().display()
        ),
    )
    .unwrap();
    let mut lab = format!(
        "Host bastion\n  HostName {}\n\nHost gpu1 gpu2 gpu3\n  ProxyJump bastion\n",
        tb.bastion().addr
    );
    for (i, h) in tb.hosts.iter().enumerate() {
        lab.push_str(&format!("\nHost gpu{}\n  HostName {}\n", i + 1, h.addr));
    }
    std::fs::write(ssh.join("config.d/lab.conf"), lab).unwrap();
}

/// Where each host saw its SSH client come from, by host name (`SSH_CLIENT`'s address).
fn client_addresses(home: &Path, inventory: &Path) -> Vec<String> {
    let run = Fleet::in_home(home)
        .arg("-i")
        .arg(inventory)
        .args(["exec", "--", "sh", "-c", "echo ${SSH_CLIENT%% *}"])
        .run();
    run.assert_code(0);
    run.sorted_stdout().iter().map(|l| l.to_string()).collect()
}

/// How many logins the bastion's sshd has accepted so far.
fn logins_on_bastion(tb: &Testbed) -> usize {
    std::fs::read_to_string(tb.dir.join("bastion/sshd.log"))
        .unwrap()
        .matches("Accepted publickey")
        .count()
}

/// exec, sync, check and run all work through the bastion: each host sees its SSH client
/// come from the bastion's address, the project lands, every check passes, the ranks meet.
fn everything_works_through(home: &Path, inventory: &Path, project: &Source, via: &str) {
    let tb = Testbed::get();
    let logins = logins_on_bastion(&tb);
    let expected: Vec<String> = tb
        .hosts
        .iter()
        .map(|h| format!("{} | {via}", h.name))
        .collect();
    assert_eq!(client_addresses(home, inventory), expected);
    // One connection to the bastion carried all three hosts.
    assert_eq!(logins_on_bastion(&tb), logins + 1);
    let fleet = |args: &[&str]| Fleet::in_home(home).arg("-i").arg(inventory).args(args);

    let sync = fleet(&["sync"]).run();
    sync.assert_code(0);
    // /tmp is shared with the hosts: what landed is read here (the wall keeps ssh out).
    for h in &tb.hosts {
        let landed = std::fs::read_to_string(Path::new(&project.workdir(&h.name)).join("README"));
        assert_eq!(landed.unwrap(), "behind a bastion\n", "{}", h.name);
    }
    let check = fleet(&["check"]).run();
    check.assert_code(0);
    assert!(
        check.stderr.contains("every check passed"),
        "{}",
        check.stderr
    );

    let run = fleet(&[
        "run",
        "--no-sync",
        "--",
        "sh",
        "-c",
        "echo rank $RANK of $WORLD_SIZE at $MASTER_ADDR",
    ])
    .run();
    run.assert_code(0);
    for (rank, h) in tb.hosts.iter().enumerate() {
        let line = format!(
            "[{rank} {}] rank {rank} of 3 at {}",
            h.name, tb.hosts[0].addr
        );
        assert!(run.stdout.contains(&line), "{line}\n{}", run.stdout);
    }
}

/// A project folder and where it lands on each host.
struct Source {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    name: String,
}

impl Source {
    fn new(name: &str) -> Source {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        std::fs::write(root.join("README"), "behind a bastion\n").unwrap();
        Source {
            _dir: dir,
            root,
            name: name.to_string(),
        }
    }

    fn workdir(&self, host: &str) -> String {
        format!("/tmp/fleet-tests/{}/{host}", self.name)
    }
}

#[test]
fn ssh_config_with_include_and_proxyjump_reaches_hosts_behind_a_bastion() {
    let _lock = TESTBED.lock().unwrap_or_else(|p| p.into_inner());
    let tb = Testbed::get();
    let _wall = wall(&tb);
    let home = tempfile::tempdir().unwrap();
    lab_ssh_config(home.path(), &tb);
    let source = Source::new("via-ssh-config");
    let config = tempfile::tempdir().unwrap();
    let inventory = inventory(config.path(), &source.name, &source.root, "", |i| {
        format!("gpu{}", i + 1)
    });
    everything_works_through(home.path(), &inventory, &source, &tb.bastion().addr);
}

#[test]
fn jump_in_the_inventory_reaches_hosts_without_ssh_config() {
    let _lock = TESTBED.lock().unwrap_or_else(|p| p.into_inner());
    let tb = Testbed::get();
    let _wall = wall(&tb);
    let home = tempfile::tempdir().unwrap();
    let source = Source::new("via-jump");
    let config = tempfile::tempdir().unwrap();
    let extra = format!(
        "user = \"root\"\nidentity = \"{}\"\nknown_hosts = \"{}\"\njump = \"root@{}\"",
        tb.key().display(),
        tb.known_hosts().display(),
        tb.bastion().addr
    );
    let inventory = inventory(config.path(), &source.name, &source.root, &extra, |i| {
        tb.hosts[i].addr.clone()
    });
    everything_works_through(home.path(), &inventory, &source, &tb.bastion().addr);
}

#[test]
fn a_two_hop_chain_goes_through_both_hops() {
    let _lock = TESTBED.lock().unwrap_or_else(|p| p.into_inner());
    let tb = Testbed::get();
    let _wall = wall(&tb);
    let home = tempfile::tempdir().unwrap();
    let source = Source::new("via-two-hops");
    let config = tempfile::tempdir().unwrap();
    // host1 through the bastion; hosts 2 and 3 through the bastion and then host1.
    let bastion = tb.bastion().addr;
    let host1 = &tb.hosts[0].addr;
    let extra = format!(
        "user = \"root\"\nidentity = \"{}\"\nknown_hosts = \"{}\"\njump = \"root@{bastion}:22,root@{host1}\"",
        tb.key().display(),
        tb.known_hosts().display(),
    );
    let path = inventory(config.path(), &source.name, &source.root, &extra, |i| {
        tb.hosts[i].addr.clone()
    });
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "name = \"host1\"\n",
        &format!("name = \"host1\"\njump = \"{bastion}\"\n"),
        1,
    );
    std::fs::write(&path, text).unwrap();
    assert_eq!(
        client_addresses(home.path(), &path),
        [
            format!("host1 | {bastion}"),
            format!("host2 | {host1}"),
            format!("host3 | {host1}"),
        ]
    );
    let sync = Fleet::in_home(home.path())
        .arg("-i")
        .arg(&path)
        .arg("sync")
        .run();
    sync.assert_code(0);
    let landed = std::fs::read_to_string(Path::new(&source.workdir("host3")).join("README"));
    assert_eq!(landed.unwrap(), "behind a bastion\n");
}

#[test]
fn an_unknown_key_on_the_bastion_is_refused_naming_the_bastion() {
    let _lock = TESTBED.lock().unwrap_or_else(|p| p.into_inner());
    let tb = Testbed::get();
    let _wall = wall(&tb);
    let bastion = tb.bastion();
    let config = tempfile::tempdir().unwrap();
    // The hosts' keys are known; the bastion's is not.
    let known: String = std::fs::read_to_string(tb.known_hosts())
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with(&format!("{} ", bastion.addr)))
        .map(|l| format!("{l}\n"))
        .collect();
    let known_hosts = config.path().join("known_hosts");
    std::fs::write(&known_hosts, known).unwrap();
    let extra = format!(
        "user = \"root\"\nidentity = \"{}\"\nknown_hosts = \"{}\"\njump = \"root@{}\"",
        tb.key().display(),
        known_hosts.display(),
        bastion.addr
    );
    let source = Source::new("unknown-bastion");
    let inventory = inventory(config.path(), &source.name, &source.root, &extra, |i| {
        tb.hosts[i].addr.clone()
    });
    let run = Fleet::new()
        .arg("-i")
        .arg(&inventory)
        .args([
            "exec",
            "--",
            "touch",
            "/tmp/fleet-tests/unknown-bastion-ran",
        ])
        .run();
    run.assert_code(3);
    for h in &tb.hosts {
        let needle = format!(
            "{}: via {addr} ({addr}:22): host key of {addr} is not known",
            h.name,
            addr = bastion.addr
        );
        assert!(run.stderr.contains(&needle), "{needle}\n{}", run.stderr);
    }
    assert!(!Path::new("/tmp/fleet-tests/unknown-bastion-ran").exists());
}

#[test]
fn a_stopped_bastion_is_named_as_the_hop_that_failed() {
    let _lock = TESTBED.lock().unwrap_or_else(|p| p.into_inner());
    let tb = Testbed::get();
    let _wall = wall(&tb);
    tb.control(&["stop", "bastion"]);
    let _restore = Restore {
        tb: &tb,
        args: ["start", "bastion"],
    };
    let home = tempfile::tempdir().unwrap();
    lab_ssh_config(home.path(), &tb);
    let source = Source::new("stopped-bastion");
    let config = tempfile::tempdir().unwrap();
    let inventory = inventory(config.path(), &source.name, &source.root, "", |i| {
        format!("gpu{}", i + 1)
    });
    let run = Fleet::in_home(home.path())
        .arg("-i")
        .arg(&inventory)
        .args(["exec", "--", "true"])
        .run();
    run.assert_code(3);
    let bastion = tb.bastion().addr;
    for h in &tb.hosts {
        let needle = format!(
            "{}: via bastion ({bastion}:22): cannot connect to {bastion}:22: Connection refused",
            h.name
        );
        assert!(run.stderr.contains(&needle), "{needle}\n{}", run.stderr);
    }
}

#[test]
fn ssh_config_keywords_fleet_does_not_apply_are_named_once_with_file_and_line() {
    let _lock = TESTBED.lock().unwrap_or_else(|p| p.into_inner());
    let tb = Testbed::get();
    let home = tempfile::tempdir().unwrap();
    let ssh = home.path().join(".ssh");
    std::fs::create_dir_all(&ssh).unwrap();
    let marker = home.path().join("on-the-lab-network");
    std::fs::write(&marker, "").unwrap();
    // Match exec is honoured (its command runs, as OpenSSH runs it): the user becomes `train`.
    // ProxyUseFdpass in a matching block is named; ProxyCommand in a block that does not match
    // is not.
    let mut config = format!(
        "Host nowhere\n  ProxyCommand nc %h %p\n\nMatch exec \"test -e {}\"\n  User train\n\nHost gpu*\n  ProxyUseFdpass yes\n  IdentityFile {}\n  UserKnownHostsFile {}\n",
        marker.display(),
        tb.key().display(),
        tb.known_hosts().display()
    );
    for (i, h) in tb.hosts.iter().enumerate() {
        config.push_str(&format!("\nHost gpu{}\n  HostName {}\n", i + 1, h.addr));
    }
    std::fs::write(ssh.join("config"), config).unwrap();
    let source = Source::new("unsupported-keyword");
    let dir = tempfile::tempdir().unwrap();
    let inventory = inventory(dir.path(), &source.name, &source.root, "", |i| {
        format!("gpu{}", i + 1)
    });
    let run = Fleet::in_home(home.path())
        .arg("-i")
        .arg(&inventory)
        .args(["exec", "--", "id", "-un"])
        .run();
    run.assert_code(0);
    assert_eq!(
        run.sorted_stdout(),
        ["host1 | train", "host2 | train", "host3 | train"]
    );
    let warning = "~/.ssh/config:8: ProxyUseFdpass is not supported; use ProxyJump, or jump = in the inventory, for a bastion";
    assert_eq!(run.stderr.matches(warning).count(), 1, "{}", run.stderr);
    assert!(!run.stderr.contains("ProxyCommand"), "{}", run.stderr);
}
