//! `fleet check` on the test bed: hosts have private home directories, so per-host differences
//! are planted there; firewall rules go into a host's own network namespace. The tests that keep
//! the default master port take turns with it (`common::default_master_port`).

use fleet_testkit as common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::Project;

/// A synced project with a `[[check]]` that reads /root/marker on each host, no marker planted.
fn fixture(name: &str) -> Project {
    let project = Project::new(name);
    project.write("data.csv", "a,b\n");
    project.configure(|i| i.check("marker", "cat /root/marker 2>/dev/null || echo none"));
    project.fleet(&["sync"]).run().assert_code(0);
    for h in &project.tb.hosts {
        project
            .tb
            .ssh(&h.name, "rm -f /root/marker /root/bin/python3");
    }
    project
}

#[test]
fn healthy_hosts_pass_and_json_parses_line_by_line() {
    let _turn = common::default_master_port();
    let f = fixture("check-healthy");
    let run = f.fleet(&["check"]).run();
    run.assert_code(0);
    run.assert_stdout_contains("python");
    run.assert_stdout_contains("reaches");
    run.assert_stderr_contains("every check passed");
    // What a host does not have is never ticked (the hosts' python3 has no transformers).
    run.assert_stdout_contains("– not installed");
    assert!(!run.stdout.contains("✓ not installed"), "{}", run.stdout);

    let json = f.fleet(&["--json", "check"]).run();
    json.assert_code(0);
    let records = json.records();
    assert_eq!(
        records.last().unwrap(),
        &serde_json::json!({"type": "verdict", "ok": true, "failed": 0})
    );
    let files: Vec<&serde_json::Value> = records.iter().filter(|r| r["check"] == "files").collect();
    assert_eq!(files.len(), 3);
    assert!(
        files
            .iter()
            .all(|r| r["ok"] == true && r["detail"] == "1 file in sync"),
        "{}",
        json.stdout
    );
}

#[test]
fn a_differing_probe_shows_every_hosts_value() {
    let _turn = common::default_master_port();
    let f = fixture("check-probe");
    f.tb.ssh("host2", "echo v2 > /root/marker");
    let run = f.fleet(&["check"]).run();
    run.assert_code(1);
    run.assert_stderr_contains("marker: differs: host1 none, host2 v2, host3 none");
}

#[test]
fn a_different_python_first_on_path_is_named() {
    let _turn = common::default_master_port();
    let f = fixture("check-python");
    // host3's login shell puts another python3 first on PATH.
    f.tb.ssh("host3", "mkdir -p /root/bin && printf '#!/bin/sh\\necho python=3.9.18\\n' > /root/bin/python3 && chmod +x /root/bin/python3 && \
        grep -q root/bin /root/.bashrc 2>/dev/null || echo 'export PATH=/root/bin:$PATH' >> /root/.bashrc");
    let run = f.fleet(&["check"]).run();
    f.tb.ssh("host3", "rm -f /root/bin/python3");
    run.assert_code(1);
    run.assert_stderr_contains("python: differs: host1 3.");
    run.assert_stderr_contains("host3 3.9");
}

#[test]
fn a_firewall_on_one_host_is_named_with_the_port() {
    let f = fixture("check-firewall");
    // A master port of the inventory's own: the fix names that one.
    let port = common::own_master_port();
    f.configure(|i| i.fleet("master_port", u32::from(port)));
    let port = port.to_string();
    let host3 = &f.tb.hosts[2];
    let rule = ["-p", "tcp", "--dport", &port, "-j", "DROP"];
    let iptables = |action: &str| {
        let status = Command::new("ip")
            .args(["netns", "exec", &host3.netns, "iptables", action, "OUTPUT"])
            .args(rule)
            .status()
            .unwrap();
        assert!(status.success(), "iptables {action}");
    };
    iptables("-A");
    let run = f.fleet(&["check"]).run();
    iptables("-D");
    run.assert_code(1);
    let needle = format!(
        "host3 cannot reach {}:{port} (timed out: firewall?)",
        f.tb.hosts[0].addr
    );
    run.assert_stderr_contains(&needle);
    common::assert_says(
        &run.stdout,
        &common::readme_quote("master port ✗ node2 cannot reach "),
        &[
            ("master port ✗ ", "master port ... ✗ "),
            ("node2", "host3"),
            ("192.168.1.100", &f.tb.hosts[0].addr),
            ("29500", &port),
        ],
    );
    run.assert_stderr_contains(&format!("sudo ufw allow {port}/tcp"));
    run.assert_stderr_contains(&format!("-LocalPort {port} -Action Allow"));
    assert!(!run.stderr.contains("29500"), "{}", run.stderr);
    assert!(!run.stderr.contains("host2 cannot reach"), "{}", run.stderr);
}

#[test]
fn a_taken_master_port_is_in_use() {
    let _turn = common::default_master_port();
    let f = fixture("check-in-use");
    // Something else listens on host1:29500 until its stdin closes.
    let holder_script = "import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 29500)); s.listen(); print('held', flush=True); sys.stdin.read()";
    let mut holder = Command::new("ssh")
        .arg("-F")
        .arg(f.tb.dir.join("ssh_config"))
        .arg("host1")
        .arg(format!("python3 -c \"{holder_script}\""))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "held\n");
    let run = f.fleet(&["check"]).run();
    drop(holder.stdin.take());
    holder.wait().unwrap();
    run.assert_code(1);
    run.assert_stderr_contains("port 29500 is in use by python3 on host1");
    common::assert_says(
        &run.stdout,
        &common::readme_quote("master port ✗ port 29500 is in use"),
        &[("master port ✗ ", "master port ... ✗ "), ("node1", "host1")],
    );
}

/// The README's troubleshooting row quotes `files ✗ 3 files to send`: that is what fleet says.
#[test]
fn files_not_yet_synced_are_counted_as_the_readme_quotes() {
    let _turn = common::default_master_port();
    let f = fixture("check-files-to-send");
    for name in ["one.csv", "two.csv", "three.csv"] {
        f.write(name, "x\n");
    }
    let run = f.fleet(&["check"]).run();
    run.assert_code(1);
    let readme = std::fs::read_to_string(common::repo().join("README.md")).unwrap();
    assert!(
        readme.contains("`files ✗ 3 files to send`"),
        "the README no longer quotes it"
    );
    run.assert_stdout_contains("✗ 3 files to send");
    run.assert_stderr_contains("host1: files: 3 files to send");
}

/// A job that runs Python needs torch on every host: on hosts whose login environment lacks it,
/// fleet check fails on each with the fix; with `activate` reaching the venv, it passes.
#[test]
fn a_torch_job_fails_the_check_until_activate_reaches_torch() {
    let _turn = common::default_master_port();
    let f = fixture("check-needs-torch");
    f.configure(|i| i.section("run", "command", vec!["python3", "train.py"]));
    let run = f.fleet(&["check"]).run();
    run.assert_code(1);
    for host in ["host1", "host2", "host3"] {
        assert!(
            run.stderr
                .contains(&format!("{host}: torch: not installed for python3 (")),
            "{}",
            run.stderr
        );
    }
    run.assert_stderr_contains("set activate = \"...\"");
    let venv = std::env::var("FLEET_TORCH_VENV").unwrap_or_else(|_| "/opt/fleet/torch-venv".into());
    f.configure(|i| i.fleet("activate", format!(". {venv}/bin/activate")));
    let run = f.fleet(&["check"]).run();
    run.assert_code(0);
    run.assert_stdout_contains("2.11.0");
}
