//! A host that is down or cut off is named with what went wrong, and the others still run.
//! These tests stop and cut test-bed hosts, so each has the test bed alone (`Testbed::alone`).

use fleet_testkit as common;

use std::process::Command;

use common::{Fleet, Restore, Testbed};

#[test]
fn stopped_host_is_named_and_the_others_still_run() {
    let tb = Testbed::alone();
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
    run.assert_stderr_contains(&needle);
    run.assert_stderr_contains("1 of 3 hosts failed: host3 (unreachable)");
    common::redactions(&tb).bind(|| insta::assert_snapshot!("host_down", run.stderr));
}

#[test]
fn silent_host_times_out_at_the_deadline() {
    let tb = Testbed::alone();
    tb.control(&["cut", "host2"]);
    let _restore = Restore {
        tb: &tb,
        args: ["heal", "host2"],
    };
    // The deadline is what is tested: fleet gives up on host2 after 2 s, not sooner (it
    // waited) and not much later (it did not hang on the dropped packets).
    let started = std::time::Instant::now();
    let run = Fleet::new()
        .arg("-i")
        .arg(tb.inventory())
        .args(["--connect-timeout", "2", "exec", "--", "hostname"])
        .run();
    let elapsed = started.elapsed();
    run.assert_code(3);
    assert_eq!(run.sorted_stdout(), ["host1 | host1", "host3 | host3"]);
    assert!(
        elapsed >= std::time::Duration::from_secs(2)
            && elapsed < std::time::Duration::from_secs(12),
        "gave up after {elapsed:?}"
    );
    let needle = format!("host2: no answer from {}:22 within 2s", tb.hosts[1].addr);
    run.assert_stderr_contains(&needle);
    common::assert_says(
        &run.stderr,
        &common::readme_quote("node2: no answer from "),
        &[
            ("node2", "host2"),
            ("192.168.1.101", &tb.hosts[1].addr),
            ("10s", "2s"),
        ],
    );
}

#[test]
fn check_names_a_stopped_host_and_checks_the_others() {
    let tb = Testbed::alone();
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
    let records = run.records();
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

#[test]
fn a_host_crashing_during_a_run_stops_the_others_and_is_named() {
    Testbed::alone();
    let project = common::Project::new("crash-during-run");
    project.write("README", "job\n");
    let (mut child, _home, _stdout) = project.start_sleepers(6010);
    project.tb.control(&["stop", "host3"]);
    let _restore = Restore {
        tb: &project.tb,
        args: ["start", "host3"],
    };
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("host3: lost while the job ran"), "{stderr}");
    for host in ["host1", "host2"] {
        assert_eq!(
            project.remaining_on(host, "sleep 6010"),
            "",
            "{host} still runs the job"
        );
    }
}

#[test]
fn a_host_crashing_during_a_sync_is_named_and_a_rerun_completes() {
    Testbed::alone();
    let project = common::Project::new("crash-during-sync");
    let mut big = vec![0u8; 300 << 20];
    big.iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i * 7 + i / 4093) as u8);
    project.write("big.bin", &big);
    project.write("small.txt", "small\n");
    let (mut child, _home) = project.fleet(&["sync"]).spawn();
    // Stop host2 once its upload has begun: a temporary file appears in its workdir.
    let workdir = std::path::PathBuf::from(project.workdir("host2"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let started = || {
        std::fs::read_dir(&workdir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(".fleet-tmp."))
    };
    while !started() {
        assert!(
            std::time::Instant::now() < deadline,
            "the upload to host2 never started"
        );
        std::thread::yield_now();
    }
    project.tb.control(&["stop", "host2"]);
    let restore = Restore {
        tb: &project.tb,
        args: ["start", "host2"],
    };
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
    // A lost host is an unreachable host (3), named by the line that says what happened.
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("error: host2: connection lost (")),
        "{stderr}"
    );
    assert!(!workdir.join("big.bin").exists(), "a half-sent file landed");
    // The other hosts completed their sync.
    for host in ["host1", "host3"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.split_whitespace().next() == Some(host)),
            "{host} has no row: {stdout}\n{stderr}"
        );
        let landed =
            std::fs::read(std::path::Path::new(&project.workdir(host)).join("big.bin")).unwrap();
        assert!(landed == big, "{host}: big.bin differs");
    }
    drop(restore);

    let rerun = project.fleet(&["sync"]).run();
    rerun.assert_code(0);
    let verify = project.fleet(&["sync", "--verify"]).run();
    verify.assert_code(0);
    assert!(
        !std::fs::read_dir(&workdir)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(".fleet-tmp."))
    );
}

#[test]
fn a_link_cut_shorter_than_the_keepalive_budget_loses_nothing() {
    Testbed::alone();
    let project = common::Project::new("cut-short");
    project.write("README", "job\n");
    // 40 lines over 8 s on every rank; host2's link is down for 4 s of them (the budget is
    // 3 keepalives 5 s apart).
    let ticks =
        "echo ready; i=0; while [ $i -lt 40 ]; do i=$((i+1)); echo tick $i; sleep 0.2; done";
    let (mut child, _home) = project.fleet(&["run", "--", "sh", "-c", ticks]).spawn();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    // Every line is kept, from the first: the ticks are counted at the end.
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while seen.matches("ready").count() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the ranks did not start"
        );
        let mut line = String::new();
        assert_ne!(
            std::io::BufRead::read_line(&mut stdout, &mut line).unwrap(),
            0
        );
        seen.push_str(&line);
    }
    project.tb.control(&["cut", "host2"]);
    let restore = Restore {
        tb: &project.tb,
        args: ["heal", "host2"],
    };
    let cut_at = std::time::Instant::now();
    while cut_at.elapsed() < std::time::Duration::from_secs(4) {
        // Polling the clock, not sleeping: the cut lasts as long as this loop.
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut stdout, &mut line).unwrap() == 0 {
            break;
        }
        seen.push_str(&line);
    }
    drop(restore);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let code = common::wait(&mut child);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    // Every line of every rank, once each and in order: the cut lost and repeated nothing.
    let all = format!("{seen}{rest}");
    for (rank, host) in ["host1", "host2", "host3"].iter().enumerate() {
        let prefix = format!("[{rank} {host}] tick ");
        let ticks: Vec<u32> = all
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .map(|n| n.trim().parse().unwrap())
            .collect();
        assert_eq!(ticks, (1..=40).collect::<Vec<u32>>(), "{host}:\n{all}");
    }
}

#[test]
fn a_link_cut_longer_than_the_keepalive_budget_loses_the_host_and_stop_cleans_up_after_heal() {
    Testbed::alone();
    let project = common::Project::new("cut-long");
    project.write("README", "job\n");
    let (mut child, home, _stdout) = project.start_sleepers(6020);
    project.tb.control(&["cut", "host2"]);
    let restore = Restore {
        tb: &project.tb,
        args: ["heal", "host2"],
    };
    let code = common::wait_for(&mut child, std::time::Duration::from_secs(90));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains("host2: lost while the job ran"), "{stderr}");
    for host in ["host1", "host3"] {
        assert_eq!(
            project.remaining_on(host, "sleep 6020"),
            "",
            "{host} still runs the job"
        );
    }
    drop(restore);
    // Back on the network, host2 still runs its rank: fleet ps says so, fleet stop ends it.
    let ps = common::Fleet::in_home(home.path())
        .arg("-i")
        .arg(&project.inventory)
        .arg("ps")
        .run();
    assert!(
        ps.stdout
            .lines()
            .any(|l| l.contains("host2") && l.contains("running")),
        "{}\n{}",
        ps.stdout,
        ps.stderr
    );
    let stop = common::Fleet::in_home(home.path())
        .arg("-i")
        .arg(&project.inventory)
        .arg("stop")
        .run();
    stop.assert_code(0);
    assert_eq!(project.remaining("sleep 6020"), Vec::<String>::new());
}

/// A host where the ranks start but their logs cannot be followed (its SFTP subsystem is off)
/// is named, and the whole job is stopped rather than left running unsupervised.
#[test]
fn a_host_whose_logs_cannot_be_followed_stops_the_job() {
    Testbed::alone();
    let project = common::Project::new("no-sftp-run");
    project.write("README", "job\n");
    project.fleet(&["sync"]).run().assert_code(0);
    project.tb.control(&["nosftp", "host2"]);
    let _restore = Restore {
        tb: &project.tb,
        args: ["sftp", "host2"],
    };
    let run = project
        .fleet(&[
            "run",
            "--no-sync",
            "--no-check",
            "--grace",
            "1",
            "--",
            "sh",
            "-c",
            "echo ready; exec sleep 6170",
        ])
        .run();
    run.assert_code(1);
    assert!(
        run.stderr.contains("host2: cannot follow the job's logs ("),
        "{}",
        run.stderr
    );
    run.assert_stderr_contains("stopping the job");
    assert_eq!(project.remaining("sleep 6170"), Vec::<String>::new());
}

/// A job whose every rank exited 0 has done its work: a host lost afterwards is reported, and
/// the job is not started again however many restarts are allowed.
#[test]
fn a_job_whose_ranks_all_exit_zero_is_never_restarted() {
    Testbed::alone();
    let project = common::Project::new("all-exit-zero");
    project.write("README", "job\n");
    // Rank 2 ends at once; ranks 0 and 1 end when the test writes `go` into their workdir.
    let script = "if [ \"$RANK\" = 2 ]; then echo finished; exit 0; fi; \
                  echo waiting; while [ ! -e go ]; do sleep 0.1; done; echo finished";
    let (mut child, _home) = project
        .fleet(&[
            "run",
            "--max-restarts",
            "2",
            "--restart-delay",
            "1",
            "--",
            "sh",
            "-c",
            script,
        ])
        .spawn();
    let jobs = std::path::PathBuf::from(project.workdir("host3")).join(".fleet/jobs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let rank2_exited = || {
        std::fs::read_dir(&jobs)
            .into_iter()
            .flatten()
            .flatten()
            .any(|job| job.path().join("rank-2.exit").exists())
    };
    // fleet has seen rank 2 end once it closes host3's SFTP session (its log follower's).
    let netns = project.tb.hosts[2].netns.clone();
    let following = || {
        let pids = Command::new("ip")
            .args(["netns", "pids", &netns])
            .output()
            .unwrap();
        String::from_utf8_lossy(&pids.stdout).lines().any(|pid| {
            std::fs::read_to_string(format!("/proc/{}/comm", pid.trim()))
                .is_ok_and(|comm| comm.trim() == "sftp-server")
        })
    };
    while !rank2_exited() || following() {
        assert!(
            std::time::Instant::now() < deadline,
            "rank 2 never exited, or fleet never saw it"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    project.tb.control(&["stop", "host3"]);
    let _restore = Restore {
        tb: &project.tb,
        args: ["start", "host3"],
    };
    for host in ["host1", "host2"] {
        std::fs::write(std::path::Path::new(&project.workdir(host)).join("go"), "").unwrap();
    }
    let code = common::wait_for(&mut child, std::time::Duration::from_secs(90));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
    assert!(!stderr.contains("===== restart"), "{stderr}");
    assert!(stderr.contains("after 0 restart(s)"), "{stderr}");
    assert_eq!(stdout.matches("finished").count(), 3, "{stdout}\n{stderr}");
    // Its work was done before host3 went: the job succeeded.
    assert_eq!(code, Some(0), "{stderr}");
}
