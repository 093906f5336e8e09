//! The networks users really have: GPU hosts reachable only through a bastion, described in
//! `~/.ssh/config` (Include, ProxyJump, per-host HostName) or by `jump =` in the inventory.
//! The test bed's wall makes hosts 1-3 refuse SSH from this machine, as a lab network does, so
//! each of these tests has the test bed alone (`Testbed::alone`).

use fleet_testkit as common;

use std::path::Path;

use common::{Fleet, Inventory, Restore, Testbed, path_value};

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
    direct.assert_stderr_contains("Connection refused");
    restore
}

/// Logs in as root with the test bed's key and checks host keys in `known_hosts`.
fn login(inventory: Inventory, tb: &Testbed, known_hosts: &Path) -> Inventory {
    inventory
        .fleet("user", "root")
        .fleet("identity", path_value(&tb.key()))
        .fleet("known_hosts", path_value(known_hosts))
}

/// An inventory of hosts 1-3 reached as `address` names them (`gpu1`, ...), each with its
/// workdir under `/tmp/fleet-tests/<name>/`, syncing `source`.
fn inventory(source: &Source, address: impl Fn(usize) -> String) -> Inventory {
    let tb = Testbed::get();
    let root = Path::new("/tmp/fleet-tests").join(&source.name);
    let _ = std::fs::remove_dir_all(&root);
    let mut inventory =
        Inventory::new()
            .fleet("device", "cpu")
            .section("sync", "source", path_value(&source.root));
    for (i, h) in tb.hosts.iter().enumerate() {
        inventory = inventory.add_host(&h.name, &address(i)).host(
            &h.name,
            "workdir",
            path_value(&root.join(&h.name)),
        );
    }
    inventory
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
    check.assert_stderr_contains("every check passed");

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
    let tb = Testbed::alone();
    let _wall = wall(&tb);
    let home = tempfile::tempdir().unwrap();
    lab_ssh_config(home.path(), &tb);
    let source = Source::new("via-ssh-config");
    let config = tempfile::tempdir().unwrap();
    let inventory = inventory(&source, |i| format!("gpu{}", i + 1)).write_in(config.path());
    everything_works_through(home.path(), &inventory, &source, &tb.bastion().addr);
}

#[test]
fn jump_in_the_inventory_reaches_hosts_without_ssh_config() {
    let tb = Testbed::alone();
    let _wall = wall(&tb);
    let home = tempfile::tempdir().unwrap();
    let source = Source::new("via-jump");
    let config = tempfile::tempdir().unwrap();
    let inventory = login(
        inventory(&source, |i| tb.hosts[i].addr.clone()),
        &tb,
        &tb.known_hosts(),
    )
    .fleet("jump", format!("root@{}", tb.bastion().addr))
    .write_in(config.path());
    everything_works_through(home.path(), &inventory, &source, &tb.bastion().addr);
}

#[test]
fn a_two_hop_chain_goes_through_both_hops() {
    let tb = Testbed::alone();
    let _wall = wall(&tb);
    let home = tempfile::tempdir().unwrap();
    let source = Source::new("via-two-hops");
    let config = tempfile::tempdir().unwrap();
    // host1 through the bastion; hosts 2 and 3 through the bastion and then host1.
    let bastion = tb.bastion().addr;
    let host1 = &tb.hosts[0].addr;
    let path = login(
        inventory(&source, |i| tb.hosts[i].addr.clone()),
        &tb,
        &tb.known_hosts(),
    )
    .fleet("jump", format!("root@{bastion}:22,root@{host1}"))
    .host("host1", "jump", bastion.as_str())
    .write_in(config.path());
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
    let tb = Testbed::alone();
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
    let source = Source::new("unknown-bastion");
    let inventory = login(
        inventory(&source, |i| tb.hosts[i].addr.clone()),
        &tb,
        &known_hosts,
    )
    .fleet("jump", format!("root@{}", bastion.addr))
    .write_in(config.path());
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
        run.assert_stderr_contains(&needle);
    }
    assert!(!Path::new("/tmp/fleet-tests/unknown-bastion-ran").exists());
}

#[test]
fn a_stopped_bastion_is_named_as_the_hop_that_failed() {
    let tb = Testbed::alone();
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
    let inventory = inventory(&source, |i| format!("gpu{}", i + 1)).write_in(config.path());
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
        run.assert_stderr_contains(&needle);
    }
    common::assert_says(
        &run.stderr,
        &common::readme_quote("gpu2: via bastion ("),
        &[("gpu2", "host2"), ("10.0.0.5", &bastion)],
    );
}

#[test]
fn ssh_config_keywords_fleet_does_not_apply_are_named_once_with_file_and_line() {
    let tb = Testbed::alone();
    let home = tempfile::tempdir().unwrap();
    let ssh = home.path().join(".ssh");
    std::fs::create_dir_all(ssh.join("config.d")).unwrap();
    let marker = home.path().join("on-the-lab-network");
    std::fs::write(&marker, "").unwrap();
    // ProxyCommand in a block that matches every host is named once (fleet connects directly,
    // which the test bed allows); in a block that matches none it is not. Match exec is
    // honoured (its command runs, as ssh runs it): the user becomes `train`.
    let mut lab = format!(
        "Host gpu*\n  IdentityFile {}\n  ProxyCommand nc %h %p\n  UserKnownHostsFile {}\n\nHost nowhere\n  ProxyCommand nc %h %p\n\nMatch exec \"test -e {}\"\n  User train\n",
        tb.key().display(),
        tb.known_hosts().display(),
        marker.display(),
    );
    for (i, h) in tb.hosts.iter().enumerate() {
        lab.push_str(&format!("\nHost gpu{}\n  HostName {}\n", i + 1, h.addr));
    }
    std::fs::write(ssh.join("config"), "Include config.d/*.conf\n").unwrap();
    std::fs::write(ssh.join("config.d/lab.conf"), lab).unwrap();
    let source = Source::new("unsupported-keyword");
    let dir = tempfile::tempdir().unwrap();
    let inventory = inventory(&source, |i| format!("gpu{}", i + 1)).write_in(dir.path());
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
    let quote = common::readme_quote("~/.ssh/config.d/lab.conf:3: ProxyCommand");
    assert_eq!(
        run.stderr.matches(&quote).count(),
        1,
        "{quote}\n{}",
        run.stderr
    );
    assert_eq!(
        run.stderr.matches("ProxyCommand").count(),
        1,
        "{}",
        run.stderr
    );
}

/// Gloo and NCCL connect every pair of hosts on random ports: a host whose firewall lets in
/// only SSH and the master port passes the master-port check, and `fleet check` still names it,
/// with every pair that cannot connect and the fix.
#[test]
fn a_host_that_lets_in_only_ssh_and_the_master_port_fails_the_check_between_hosts() {
    let tb = Testbed::alone();
    let source = Source::new("check-between-hosts");
    let config = tempfile::tempdir().unwrap();
    let inventory = login(
        inventory(&source, |i| tb.hosts[i].addr.clone()),
        &tb,
        &tb.known_hosts(),
    )
    .write_in(config.path());
    let fleet = |args: &[&str]| Fleet::new().arg("-i").arg(&inventory).args(args).run();
    fleet(&["sync"]).assert_code(0);
    fleet(&["check"]).assert_code(0);

    tb.control(&["firewall", "host2"]);
    let firewall = Restore {
        tb: &tb,
        args: ["nofirewall", "host2"],
    };
    let check = fleet(&["check"]);
    check.assert_code(1);
    // The master port is open on the master, so that check passes: only the pairs fail.
    assert!(!check.stderr.contains("master port"), "{}", check.stderr);
    for from in ["host1", "host3"] {
        let needle = format!("error: host2: between hosts: {from} cannot reach host2 on port ");
        check.assert_stderr_contains(&needle);
    }
    let lan = tb.hosts[0].addr.rsplit_once('.').unwrap().0;
    let fix = format!(
        "fix: Gloo/NCCL connect every pair of hosts on random ports: allow the LAN on host2, e.g. sudo ufw allow from {lan}.0/24"
    );
    assert_eq!(check.stderr.matches(&fix).count(), 2, "{}", check.stderr);
    assert!(!check.stderr.contains("reach host1 on"), "{}", check.stderr);
    assert!(!check.stderr.contains("reach host3 on"), "{}", check.stderr);
    common::assert_says(
        &check.stdout,
        &common::readme_quote("between hosts ✗ "),
        &[
            ("between hosts ✗ ", "between hosts ... ✗ "),
            ("node1", "host1"),
            ("node2", "host2"),
            ("41234", "..."),
        ],
    );
    // --json: one record per pair that failed.
    let json = Fleet::new()
        .arg("-i")
        .arg(&inventory)
        .args(["--json", "check"])
        .run();
    json.assert_code(1);
    let failed: Vec<String> = json
        .records()
        .iter()
        .filter(|r| r["check"] == "between hosts" && r["ok"] == false)
        .map(|r| r["detail"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(failed.len(), 2, "{}", json.stdout);
    assert!(
        failed[0].starts_with("host1 cannot reach host2 on port "),
        "{failed:?}"
    );
    assert!(
        failed[1].starts_with("host3 cannot reach host2 on port "),
        "{failed:?}"
    );
    assert!(
        failed.iter().all(|d| d.ends_with(": timed out")),
        "{failed:?}"
    );

    drop(firewall);
    fleet(&["check"]).assert_code(0);
}
