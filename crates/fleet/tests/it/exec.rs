//! `fleet exec` against the three real OpenSSH hosts of the test bed.

use fleet_testkit as common;

use common::{Fleet, Inventory, Testbed, keygen, path_value};

fn exec(tb: &Testbed, args: &[&str]) -> common::Run {
    Fleet::new()
        .arg("-i")
        .arg(tb.inventory())
        .arg("exec")
        .arg("--")
        .args(args)
        .run()
}

#[test]
fn runs_on_every_host_with_its_prefix() {
    let tb = Testbed::get();
    let run = exec(&tb, &["hostname"]);
    run.assert_code(0);
    assert_eq!(
        run.sorted_stdout(),
        ["host1 | host1", "host2 | host2", "host3 | host3"]
    );
}

#[test]
fn stderr_stays_stderr_and_lines_stay_whole() {
    let tb = Testbed::get();
    // Partial writes and a last line without a newline still come out as whole lines.
    let run = exec(
        &tb,
        &[
            "sh",
            "-c",
            "printf 'par'; printf 'tial\\nout\\n'; echo err >&2; printf last",
        ],
    );
    run.assert_code(0);
    for h in ["host1", "host2", "host3"] {
        for line in ["partial", "out", "last"] {
            assert!(
                run.stdout.lines().any(|l| l == format!("{h} | {line}")),
                "{h} {line}:\n{}",
                run.stdout
            );
        }
        assert!(
            run.stderr.lines().any(|l| l == format!("{h} | err")),
            "{}",
            run.stderr
        );
        assert!(!run.stdout.contains("err"));
    }
}

#[test]
fn arguments_arrive_as_literal_text() {
    let tb = Testbed::get();
    let marker = format!("/tmp/fleet-quoting-{}", std::process::id());
    let injected = format!("$(touch {marker})");
    let run = exec(
        &tb,
        &[
            "printf",
            "%s|",
            "a b",
            "$HOME",
            "it's",
            "; touch /tmp/x;",
            &injected,
            "`id`",
            "\"q\"",
        ],
    );
    run.assert_code(0);
    let expected = format!("a b|$HOME|it's|; touch /tmp/x;|{injected}|`id`|\"q\"|");
    for h in ["host1", "host2", "host3"] {
        assert!(
            run.stdout.lines().any(|l| l == format!("{h} | {expected}")),
            "{}",
            run.stdout
        );
    }
    assert!(
        !std::path::Path::new(&marker).exists(),
        "an argument was executed"
    );
}

#[test]
fn shell_mode_passes_one_command_line() {
    let tb = Testbed::get();
    let run = Fleet::new()
        .arg("-i")
        .arg(tb.inventory())
        .args(["exec", "--shell", "--", "echo $((6*7)) | tr 4 x"])
        .run();
    run.assert_code(0);
    assert_eq!(
        run.sorted_stdout(),
        ["host1 | x2", "host2 | x2", "host3 | x2"]
    );
}

#[test]
fn failed_hosts_are_named_and_the_exit_is_non_zero() {
    let tb = Testbed::get();
    let run = exec(
        &tb,
        &[
            "sh",
            "-c",
            "case $(hostname) in host2) echo bad; exit 3;; host3) kill -TERM $$;; esac; echo ok",
        ],
    );
    run.assert_code(1);
    run.assert_stdout_contains("host1 | ok");
    run.assert_stdout_contains("host2 | bad");
    run.assert_stderr_contains("host2: exited with 3");
    run.assert_stderr_contains("host3: killed by SIGTERM");
    run.assert_stderr_contains("2 of 3 hosts failed: host2 (exit 3), host3 (killed by SIGTERM)");
    assert!(!run.stderr.contains("host1:"), "{}", run.stderr);
}

#[test]
fn json_lines_then_a_summary() {
    let tb = Testbed::get();
    let run = Fleet::new()
        .arg("-i")
        .arg(tb.inventory())
        .args([
            "--json",
            "exec",
            "--",
            "sh",
            "-c",
            "echo 'x \"y\"'; echo e >&2; [ $(hostname) != host3 ]",
        ])
        .run();
    run.assert_code(1);
    let records = run.records();
    assert_eq!(records.len(), 7, "{}", run.stdout);
    for host in ["host1", "host2", "host3"] {
        assert!(records.contains(&serde_json::json!({"type": "line", "host": host, "stream": "stdout", "line": "x \"y\""})));
        assert!(records.contains(
            &serde_json::json!({"type": "line", "host": host, "stream": "stderr", "line": "e"})
        ));
    }
    let summary = records.last().unwrap();
    assert_eq!(summary["type"], "summary");
    assert_eq!(summary["ok"], false);
    let hosts = summary["hosts"].as_array().unwrap();
    assert_eq!(
        hosts[0],
        serde_json::json!({"host": "host1", "status": "exited", "exit_code": 0})
    );
    assert_eq!(
        hosts[2],
        serde_json::json!({"host": "host3", "status": "exited", "exit_code": 1})
    );
}

#[test]
fn runs_as_the_configured_user() {
    let tb = Testbed::get();
    let dir = tempfile::tempdir().unwrap();
    let inventory = as_fish_user(&tb, dir.path());
    let run = Fleet::new()
        .arg("-i")
        .arg(&inventory)
        .args(["exec", "--", "id", "-un"])
        .run();
    run.assert_code(0);
    assert_eq!(
        run.sorted_stdout(),
        ["host1 | train", "host2 | train", "host3 | train"]
    );
}

#[test]
fn unknown_host_key_is_refused_and_nothing_runs() {
    let tb = Testbed::get();
    let dir = tempfile::tempdir().unwrap();
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(&known_hosts, "").unwrap();
    let inventory = tb
        .login_inventory(&tb.key(), &known_hosts)
        .write_in(dir.path());
    let marker = format!("/tmp/fleet-unknown-key-{}", std::process::id());
    let run = Fleet::new()
        .arg("-i")
        .arg(&inventory)
        .args(["exec", "--", "touch", &marker])
        .run();
    run.assert_code(3);
    for h in &tb.hosts {
        let needle = format!(
            "{}: host key of {} is not known. It offers ssh-ed25519 key SHA256:",
            h.name, h.addr
        );
        run.assert_stderr_contains(&needle);
    }
    run.assert_stderr_contains("--accept-new-host-keys");
    common::redactions(&tb).bind(|| insta::assert_snapshot!("unknown_host_key", run.stderr));
    assert!(
        !std::path::Path::new(&marker).exists(),
        "a command ran on a host with an unknown key"
    );
    assert_eq!(
        std::fs::read_to_string(&known_hosts).unwrap(),
        "",
        "known_hosts was modified"
    );
}

#[test]
fn accept_new_host_keys_records_them_once() {
    let tb = Testbed::get();
    let dir = tempfile::tempdir().unwrap();
    let known_hosts = dir.path().join("ssh/known_hosts");
    let inventory = tb
        .login_inventory(&tb.key(), &known_hosts)
        .write_in(dir.path());
    let run = Fleet::new()
        .arg("-i")
        .arg(&inventory)
        .args(["--accept-new-host-keys", "exec", "--", "true"])
        .run();
    run.assert_code(0);
    assert_eq!(
        run.stderr.matches("recorded host key SHA256:").count(),
        3,
        "{}",
        run.stderr
    );
    let recorded = std::fs::read_to_string(&known_hosts).unwrap();
    assert_eq!(
        recorded.lines().filter(|l| !l.is_empty()).count(),
        3,
        "{recorded}"
    );
    // The recorded keys are the hosts' real keys: a strict run now succeeds.
    let again = Fleet::new()
        .arg("-i")
        .arg(&inventory)
        .args(["exec", "--", "true"])
        .run();
    again.assert_code(0);
    assert_eq!(std::fs::read_to_string(&known_hosts).unwrap(), recorded);
}

#[test]
fn changed_host_key_is_refused_loudly_and_never_overwritten() {
    let tb = Testbed::get();
    let dir = tempfile::tempdir().unwrap();
    let impostor = keygen(dir.path(), "impostor", "");
    let impostor_pub = std::fs::read_to_string(impostor.with_extension("pub")).unwrap();
    let fake: Vec<&str> = impostor_pub.split_whitespace().take(2).collect();
    let real = std::fs::read_to_string(tb.known_hosts()).unwrap();
    let host1 = &tb.hosts[0];
    let tampered: String = real
        .lines()
        .map(|l| {
            if l.starts_with(&format!("{} ", host1.addr)) {
                format!("{} {} {}\n", host1.addr, fake[0], fake[1])
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    assert_ne!(tampered, real);
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(&known_hosts, &tampered).unwrap();
    let inventory = tb
        .login_inventory(&tb.key(), &known_hosts)
        .write_in(dir.path());
    let run = Fleet::new()
        .arg("-i")
        .arg(&inventory)
        .args(["--accept-new-host-keys", "exec", "--", "hostname"])
        .run();
    run.assert_code(3);
    run.assert_stderr_contains(&format!("host1: HOST KEY CHANGED for {}!", host1.addr));
    run.assert_stderr_contains("ssh-keygen -R");
    assert_eq!(run.sorted_stdout(), ["host2 | host2", "host3 | host3"]);
    assert_eq!(
        std::fs::read_to_string(&known_hosts).unwrap(),
        tampered,
        "known_hosts was modified"
    );
}

#[test]
fn wrong_client_key_is_refused_with_each_host_named() {
    let tb = Testbed::get();
    let dir = tempfile::tempdir().unwrap();
    let stranger = keygen(dir.path(), "stranger", "");
    let inventory = tb
        .login_inventory(&stranger, &tb.known_hosts())
        .write_in(dir.path());
    let run = Fleet::new()
        .arg("-i")
        .arg(&inventory)
        .args(["exec", "--", "hostname"])
        .run();
    run.assert_code(3);
    assert_eq!(run.stdout, "");
    for h in &tb.hosts {
        let needle = format!(
            "{}: authentication as \"root\" failed; tried {}",
            h.name,
            stranger.display()
        );
        run.assert_stderr_contains(&needle);
    }
}

#[test]
fn encrypted_key_without_a_terminal_says_what_to_do() {
    let tb = Testbed::get();
    let dir = tempfile::tempdir().unwrap();
    let locked = keygen(dir.path(), "locked", "correct horse");
    let inventory = tb
        .login_inventory(&locked, &tb.known_hosts())
        .write_in(dir.path());
    let run = Fleet::new()
        .arg("-i")
        .arg(&inventory)
        .args(["exec", "--", "hostname"])
        .run();
    run.assert_code(3);
    run.assert_stderr_contains("encrypted; add it to ssh-agent with `ssh-add");
    assert!(!run.stderr.contains("correct horse"));
}

#[test]
fn ssh_config_alias_supplies_address_port_user_and_key() {
    let tb = Testbed::get();
    let fleet = Fleet::new();
    let ssh_dir = fleet.home().join(".ssh");
    std::fs::create_dir_all(&ssh_dir).unwrap();
    let mut config = String::new();
    let mut inventory = Inventory::new().fleet("known_hosts", path_value(&tb.known_hosts()));
    for h in &tb.hosts {
        config.push_str(&format!(
            "Host gpu-{}\n  HostName {}\n  Port {}\n  User train\n  IdentityFile {}\n\n",
            h.name,
            h.addr,
            h.port,
            tb.key().display()
        ));
        inventory = inventory.add_host(&h.name, &format!("gpu-{}", h.name));
    }
    std::fs::write(ssh_dir.join("config"), config).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = inventory.write_in(dir.path());
    let run = fleet
        .arg("-i")
        .arg(&path)
        .args(["exec", "--", "sh", "-c", "echo $(id -un)@$(hostname)"])
        .run();
    run.assert_code(0);
    assert_eq!(
        run.sorted_stdout(),
        [
            "host1 | train@host1",
            "host2 | train@host2",
            "host3 | train@host3"
        ]
    );
}

#[test]
fn hostile_output_is_bounded_and_defused_on_a_terminal() {
    let tb = Testbed::get();
    // A 3 MB line without a newline arrives in pieces of at most 1 MiB, nothing lost.
    let run = exec(&tb, &["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x"]);
    run.assert_code(0);
    let pieces: Vec<usize> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("host1 | "))
        .map(|l| l.len() - "host1 | ".len())
        .collect();
    assert_eq!(pieces.iter().sum::<usize>(), 3_000_000);
    assert!(pieces.iter().all(|p| *p <= 1 << 20), "{pieces:?}");

    // On a terminal, escape sequences and carriage returns are shown, not obeyed.
    let command = format!(
        "{} -i {} exec -- printf '\\033]0;pwned\\007\\033[31mred\\rcr\\377end\\n'",
        env!("CARGO_BIN_EXE_fleet"),
        tb.inventory().display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("host1 | ^[]0;pwned^G^[[31mred^Mcr\u{fffd}end"),
        "{text:?}"
    );
    assert!(
        !text.contains("\u{1b}]0;pwned"),
        "an escape sequence reached the terminal: {text:?}"
    );
}

#[test]
fn a_gigabyte_of_output_streams_through_in_bounded_memory() {
    let tb = Testbed::get();
    // 350 MB per host without a newline: 1.05 GB in all, in pieces of at most 1 MiB.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args(["-i"])
        .arg(tb.inventory())
        .args([
            "exec",
            "--",
            "sh",
            "-c",
            "head -c 350000000 /dev/zero | tr '\\0' x",
        ])
        .env("HOME", tempfile::tempdir().unwrap().path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buffer = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            match std::io::Read::read(&mut stdout, &mut buffer) {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += buffer[..n].iter().filter(|&&b| b == b'x').count() as u64,
            }
        }
    });
    let status = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "fleet did not end");
        if let Ok(text) = std::fs::read_to_string(&status) {
            if let Some(kib) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
            {
                peak_kib = peak_kib.max(kib);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(reader.join().unwrap(), 3 * 350_000_000, "bytes were lost");
    assert!(peak_kib > 0, "never saw fleet's memory");
    assert!(
        peak_kib < 64 * 1024,
        "fleet held {peak_kib} KiB for 1 GB of output"
    );
}

/// An inventory of the test bed's hosts as the login `train`, whose login shell is fish.
fn as_fish_user(tb: &Testbed, dir: &std::path::Path) -> std::path::PathBuf {
    let inventory = tb
        .login_inventory(&tb.key(), &tb.known_hosts())
        .fleet("user", "train")
        .write_in(dir);
    let shells = Fleet::new()
        .arg("-i")
        .arg(&inventory)
        .args([
            "exec",
            "--",
            "sh",
            "-c",
            "getent passwd train | cut -d: -f7",
        ])
        .run();
    shells.assert_code(0);
    assert_eq!(
        shells.sorted_stdout(),
        [
            "host1 | /usr/bin/fish",
            "host2 | /usr/bin/fish",
            "host3 | /usr/bin/fish"
        ],
        "the test bed's user train logs in with fish (scripts/setup.sh installs it)"
    );
    inventory
}

/// fish reads `\'` inside single quotes as an escape, so an argument quoted for sh and read by
/// fish would end its quotes early and run what follows. fleet's command line is read by sh
/// only: the arguments arrive as typed and nothing in them runs.
#[test]
fn arguments_arrive_literally_under_a_fish_login_shell() {
    let tb = Testbed::get();
    let dir = tempfile::tempdir().unwrap();
    let inventory = as_fish_user(&tb, dir.path());
    let marker = format!("/tmp/fleet-fish-injected-{}", std::process::id());
    let hostile = format!("\\';touch {marker};#");
    let args = [hostile.as_str(), "it's", "$HOME", "a\\b", "!!", "(echo x)"];
    let mut command = vec!["exec", "--", "printf", "%s|"];
    command.extend(args);
    let run = Fleet::new().arg("-i").arg(&inventory).args(&command).run();
    run.assert_code(0);
    let expected = format!("{}|", args.join("|"));
    for host in ["host1", "host2", "host3"] {
        assert!(
            run.stdout.contains(&format!("{host} | {expected}")),
            "{host}: {}\n{}",
            run.stdout,
            run.stderr
        );
    }
    assert!(
        !std::path::Path::new(&marker).exists(),
        "an argument ran as a command"
    );
}

/// A command still running when fleet is interrupted is stopped on every host (its process
/// group gets SIGTERM), as a terminal's would be.
#[test]
fn an_interrupted_exec_stops_its_commands_on_the_hosts() {
    let tb = Testbed::get();
    let (mut child, _home) = Fleet::new()
        .arg("-i")
        .arg(tb.inventory())
        .args(["exec", "--", "sh", "-c", "echo up; exec sleep 6110"])
        .spawn();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    common::await_lines(&mut stdout, "up", 3);
    // SIGTERM, as `timeout` or systemd send it.
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        common::wait_for(&mut child, std::time::Duration::from_secs(20)),
        Some(130)
    );
    for host in ["host1", "host2", "host3"] {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let left = tb.ssh(host, "pgrep -f '[s]leep 6110' || true");
            if left.trim().is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{host} still runs it: {left}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// An inventory of the test bed's hosts with `known_hosts` as given.
fn with_known_hosts(
    tb: &Testbed,
    dir: &std::path::Path,
    known_hosts: &std::path::Path,
) -> std::path::PathBuf {
    tb.login_inventory(&tb.key(), known_hosts).write_in(dir)
}

/// Hosts known only by their ECDSA keys are asked for those: they do not look unknown.
#[test]
fn hosts_known_by_their_ecdsa_keys_alone_are_trusted() {
    let tb = Testbed::get();
    let dir = tempfile::tempdir().unwrap();
    let inventory = with_known_hosts(&tb, dir.path(), &tb.dir.join("known_hosts_ecdsa"));
    let run = Fleet::new()
        .arg("-i")
        .arg(&inventory)
        .args(["exec", "--", "hostname"])
        .run();
    run.assert_code(0);
    assert_eq!(
        run.sorted_stdout(),
        ["host1 | host1", "host2 | host2", "host3 | host3"]
    );
}

/// A key marked `@revoked` is refused even where another line trusts it.
#[test]
fn a_revoked_host_key_is_refused() {
    let tb = Testbed::get();
    let dir = tempfile::tempdir().unwrap();
    let known = std::fs::read_to_string(tb.known_hosts()).unwrap();
    let host2 = known
        .lines()
        .find(|l| {
            l.starts_with(&format!("{} ", tb.hosts[1].addr))
                || l.starts_with(&format!("[{}]", tb.hosts[1].addr))
        })
        .unwrap();
    let key = host2.split_once(' ').unwrap().1;
    let path = dir.path().join("known_hosts");
    std::fs::write(&path, format!("{known}@revoked * {key}\n")).unwrap();
    let inventory = with_known_hosts(&tb, dir.path(), &path);
    let marker = format!("/tmp/fleet-revoked-{}", std::process::id());
    let run = Fleet::new()
        .arg("-i")
        .arg(&inventory)
        .args([
            "exec",
            "--",
            "sh",
            "-c",
            &format!("touch {marker}-$(hostname)"),
        ])
        .run();
    run.assert_code(3);
    run.assert_stderr_contains("host2: host key SHA256:");
    run.assert_stderr_contains("is marked @revoked in");
    assert!(!std::path::Path::new(&format!("{marker}-host2")).exists());
    assert!(std::path::Path::new(&format!("{marker}-host1")).exists());
    let _ = std::fs::remove_file(format!("{marker}-host1"));
    let _ = std::fs::remove_file(format!("{marker}-host3"));
}

/// One argument with spaces in it is a shell line, as `ssh host 'a && b'` takes it (the
/// README's step 4 is written that way); several arguments stay literal words.
#[test]
fn one_argument_with_spaces_is_a_shell_line() {
    let tb = Testbed::get();
    let run = Fleet::new()
        .arg("-i")
        .arg(tb.inventory())
        .args(["exec", "--", "echo one && echo two | tr a-z A-Z"])
        .run();
    run.assert_code(0);
    for host in ["host1", "host2", "host3"] {
        run.assert_stdout_contains(&format!("{host} | one\n"));
        run.assert_stdout_contains(&format!("{host} | TWO\n"));
    }
    let words = Fleet::new()
        .arg("-i")
        .arg(tb.inventory())
        .args(["exec", "--", "echo", "one && echo two"])
        .run();
    words.assert_code(0);
    assert_eq!(
        words.stdout.matches("| one && echo two\n").count(),
        3,
        "{}",
        words.stdout
    );
}

/// Mistakes in what was asked exit 2, as the README's exit codes say, and nothing runs.
#[test]
fn usage_mistakes_exit_2() {
    let tb = Testbed::get();
    let fleet = || Fleet::new().arg("-i").arg(tb.inventory());
    let run = fleet().args(["run"]).run();
    run.assert_code(2);
    run.assert_stderr_contains("no command to run: give one after `--`");
    let timeout = fleet()
        .args(["--connect-timeout", "0", "exec", "--", "true"])
        .run();
    timeout.assert_code(2);
    assert!(
        timeout
            .stderr
            .contains("--connect-timeout 0: expected seconds"),
        "{}",
        timeout.stderr
    );
    let flag = Fleet::new()
        .args(["--no-such-flag", "exec", "--", "true"])
        .run();
    flag.assert_code(2);
}

/// `fleet exec` runs inside the hosts' `activate` environment; a line that fails ends the
/// command with 126 and says so, and `--no-activate` runs without it (to make that environment:
/// the README's step 4).
#[test]
fn exec_runs_inside_activate_unless_told_not_to() {
    let tb = Testbed::get();
    let dir = tempfile::tempdir().unwrap();
    let hook = dir.path().join("hook.sh");
    std::fs::write(&hook, "GREETING=activated; export GREETING\n").unwrap();
    let with_activate = |line: &str| {
        tb.login_inventory(&tb.key(), &tb.known_hosts())
            .fleet("activate", line)
            .write_in(dir.path())
    };
    let good = with_activate(&format!(". {}", hook.display()));
    let run = Fleet::new()
        .arg("-i")
        .arg(&good)
        .args(["exec", "--", "sh", "-c", "echo ${GREETING:-plain}"])
        .run();
    run.assert_code(0);
    assert_eq!(
        run.stdout.matches("| activated").count(),
        3,
        "{}",
        run.stdout
    );
    let bad = with_activate(". /nonexistent/venv/bin/activate");
    let run = Fleet::new()
        .arg("-i")
        .arg(&bad)
        .args(["exec", "--", "echo", "ran"])
        .run();
    run.assert_code(1);
    assert!(!run.stdout.contains("ran"), "{}", run.stdout);
    run.assert_stderr_contains("fleet: activate = \". /nonexistent/venv/bin/activate\" failed");
    run.assert_stderr_contains("exited with 126");
    let run = Fleet::new()
        .arg("-i")
        .arg(&bad)
        .args(["exec", "--no-activate", "--", "echo", "ran"])
        .run();
    run.assert_code(0);
    assert_eq!(run.stdout.matches("| ran").count(), 3, "{}", run.stdout);
}
