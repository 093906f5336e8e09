//! A host that is down or cut off is named with what went wrong, and the others still run.
//! These tests stop and cut test-bed hosts, so they live in their own test binary (cargo runs
//! test binaries one after another) and take a lock against each other.

mod common;

use std::sync::Mutex;

use common::{Fleet, Testbed};

static TESTBED: Mutex<()> = Mutex::new(());

/// Brings the host back however the test ends.
struct Restore<'a> {
    tb: &'a Testbed,
    args: [&'static str; 2],
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        self.tb.control(&self.args);
    }
}

#[test]
fn stopped_host_is_named_and_the_others_still_run() {
    let _lock = TESTBED.lock().unwrap_or_else(|p| p.into_inner());
    let tb = Testbed::get();
    tb.control(&["stop", "host3"]);
    let _restore = Restore {
        tb: &tb,
        args: ["start", "host3"],
    };
    let run = Fleet::new()
        .arg("-i")
        .arg(tb.inventory())
        .args(["exec", "--", "hostname"])
        .run();
    run.assert_code(3);
    assert_eq!(run.sorted_stdout(), ["host1 | host1", "host2 | host2"]);
    let host3 = &tb.hosts[2];
    let needle = format!(
        "host3: cannot connect to {}:{}: Connection refused",
        host3.addr, host3.port
    );
    assert!(run.stderr.contains(&needle), "{needle}\n{}", run.stderr);
    assert!(
        run.stderr
            .contains("1 of 3 hosts failed: host3 (unreachable)"),
        "{}",
        run.stderr
    );
}

#[test]
fn silent_host_times_out_at_the_deadline() {
    let _lock = TESTBED.lock().unwrap_or_else(|p| p.into_inner());
    let tb = Testbed::get();
    tb.control(&["cut", "host2"]);
    let _restore = Restore {
        tb: &tb,
        args: ["heal", "host2"],
    };
    let run = Fleet::new()
        .arg("-i")
        .arg(tb.inventory())
        .args(["--connect-timeout", "1", "exec", "--", "hostname"])
        .run();
    run.assert_code(3);
    assert_eq!(run.sorted_stdout(), ["host1 | host1", "host3 | host3"]);
    let needle = format!("host2: no answer from {}:22 within 1s", tb.hosts[1].addr);
    assert!(run.stderr.contains(&needle), "{needle}\n{}", run.stderr);
}

#[test]
fn check_names_a_stopped_host_and_checks_the_others() {
    let _lock = TESTBED.lock().unwrap_or_else(|p| p.into_inner());
    let tb = Testbed::get();
    tb.control(&["stop", "host2"]);
    let _restore = Restore {
        tb: &tb,
        args: ["start", "host2"],
    };
    let run = Fleet::new()
        .arg("-i")
        .arg(tb.inventory())
        .args(["--json", "check"])
        .run();
    run.assert_code(3);
    let records: Vec<serde_json::Value> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let unreachable: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["check"] == "reachable")
        .collect();
    assert_eq!(unreachable.len(), 1);
    assert_eq!(unreachable[0]["host"], "host2");
    assert_eq!(unreachable[0]["ok"], false);
    // The others were still probed.
    for host in ["host1", "host3"] {
        assert!(
            records
                .iter()
                .any(|r| r["check"] == "disk" && r["host"] == host && r["ok"] == true),
            "{host}: {}",
            run.stdout
        );
    }
}
