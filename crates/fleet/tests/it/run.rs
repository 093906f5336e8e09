//! `fleet run` on the three hosts of the test bed: the environment of every rank, failures
//! that stop everything, Ctrl-C, and a merged log that loses no line.

use fleet_testkit as common;

use std::io::{BufRead, BufReader, Read};
use std::time::{Duration, Instant};

use common::{Project, await_lines, interrupt, path_value, wait};

/// A project with one file and a master port of its own: tests run side by side, and
/// `fleet check` listens on the master port.
fn job(name: &str) -> Project {
    let project = Project::new(name);
    project.write("README", "a job\n");
    let port = common::own_master_port();
    project.configure(|i| i.fleet("master_port", u32::from(port)));
    project
}

/// Steps these tests take with a project.
trait RunSteps {
    fn with_ranks_on_host2(self, ranks: u32) -> Project;
    fn master_port(&self) -> u16;
}

impl RunSteps for Project {
    fn with_ranks_on_host2(self, ranks: u32) -> Project {
        self.configure(|i| i.host("host2", "ranks", ranks));
        self
    }

    fn master_port(&self) -> u16 {
        let text = std::fs::read_to_string(&self.inventory).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("master_port = "))
            .unwrap()
            .parse()
            .unwrap()
    }
}

const ENV: &str = "echo RANK=$RANK LOCAL_RANK=$LOCAL_RANK WORLD_SIZE=$WORLD_SIZE LOCAL_WORLD_SIZE=$LOCAL_WORLD_SIZE \
    NODE_RANK=$NODE_RANK GROUP_RANK=$GROUP_RANK NNODES=$NNODES MASTER=$MASTER_ADDR:$MASTER_PORT \
    UNBUFFERED=$PYTHONUNBUFFERED IFNAME=$GLOO_SOCKET_IFNAME/$NCCL_SOCKET_IFNAME HOST=$(hostname) JOB=$FLEET_JOB_ID";

#[test]
fn every_rank_gets_its_environment() {
    let job = job("run-env");
    let run = job.fleet(&["run", "--", "sh", "-c", ENV]).run();
    run.assert_code(0);
    let master = &job.tb.hosts[0].addr;
    let port = job.master_port();
    let mut lines = run.sorted_stdout();
    let job_id = lines[0].rsplit("JOB=").next().unwrap().to_string();
    assert_eq!(job_id.len(), 20, "{}", run.stdout);
    lines
        .iter_mut()
        .for_each(|l| *l = l.trim_end_matches(&job_id));
    let expected: Vec<String> = (0..3)
        .map(|r| {
            format!(
                "[{r} host{}] RANK={r} LOCAL_RANK=0 WORLD_SIZE=3 LOCAL_WORLD_SIZE=1 NODE_RANK={r} GROUP_RANK={r} NNODES=3 \
                 MASTER={master}:{port} UNBUFFERED=1 IFNAME=eth0/eth0 HOST=host{} JOB=",
                r + 1,
                r + 1
            )
        })
        .collect();
    assert_eq!(lines, expected);
    // The local record of the job: one log per rank, the merged log, the summary.
    let runs = job.source.path().join("runs").join(&job_id);
    let merged = std::fs::read_to_string(runs.join("merged.log")).unwrap();
    assert_eq!(merged.lines().count(), 3);
    assert!(
        std::fs::read_to_string(runs.join("rank-1.log"))
            .unwrap()
            .starts_with("RANK=1 ")
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(runs.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["exit_code"], 0);
    assert_eq!(summary["outcome"]["exits"], serde_json::json!([0, 0, 0]));
}

#[test]
fn two_ranks_on_one_host_make_four() {
    let job = job("run-four").with_ranks_on_host2(2);
    let run = job
        .fleet(&[
            "run",
            "--",
            "sh",
            "-c",
            "echo $RANK/$LOCAL_RANK/$LOCAL_WORLD_SIZE/$WORLD_SIZE@$(hostname)",
        ])
        .run();
    run.assert_code(0);
    assert_eq!(
        run.sorted_stdout(),
        [
            "[0 host1] 0/0/1/4@host1",
            "[1 host2] 1/0/2/4@host2",
            "[2 host2] 2/1/2/4@host2",
            "[3 host3] 3/0/1/4@host3"
        ]
    );
}

/// accelerate launch divides its processes evenly across machines: uneven ranks are refused
/// with the reason and the way out, before anything is synced or started.
#[test]
fn accelerate_refuses_uneven_ranks_with_the_reason() {
    let job = job("run-accelerate-uneven").with_ranks_on_host2(2);
    let run = job.fleet(&["run", "--accelerate", "--", "train.py"]).run();
    run.assert_code(2);
    assert!(
        run.stderr
            .contains("--accelerate needs the same ranks on every host (")
            && run
                .stderr
                .contains("host1 1, host2 2, host3 1): accelerate launch divides")
            && run.stderr.contains("use --torchrun"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("synced"), "{}", run.stderr);
}

#[test]
fn the_first_failure_stops_every_rank_and_its_code_is_fleets() {
    let job = job("run-fail");
    let script = "if [ $RANK = 1 ]; then echo about to fail; sleep 1; exit 3; fi; echo waiting; exec sleep 6001";
    let run = job
        .fleet(&["run", "--grace", "2", "--", "sh", "-c", script])
        .run();
    run.assert_code(3);
    run.assert_stderr_contains("rank 1 on host2 exited with 3; stopping the other processes");
    run.assert_stderr_contains("last 1 lines of rank 1:\n  about to fail");
    common::redactions(&job.tb).bind(|| insta::assert_snapshot!("failed_rank", run.stderr));
    assert_eq!(job.remaining("sleep 6001"), Vec::<String>::new());
}

#[test]
fn ctrl_c_stops_every_rank_and_exits_130() {
    let job = job("run-interrupt");
    let (mut child, _home, _stdout) = job.start_sleepers(6002);
    interrupt(&child);
    assert_eq!(wait(&mut child), Some(130));
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        stderr.contains("interrupted: stopping every process"),
        "{stderr}"
    );
    assert_eq!(job.remaining("sleep 6002"), Vec::<String>::new());
}

#[test]
fn a_second_job_in_the_same_workdir_is_refused_by_name() {
    let job = job("run-busy");
    let (mut first, _home) = job
        .fleet(&[
            "run",
            "--grace",
            "1",
            "--",
            "sh",
            "-c",
            "echo ready; exec sleep 6003",
        ])
        .spawn();
    let mut stdout = BufReader::new(first.stdout.take().unwrap());
    await_lines(&mut stdout, "ready", 3);
    let second = job.fleet(&["run", "--no-sync", "--", "true"]).run();
    second.assert_code(1);
    second.assert_stderr_contains("host1: job 20");
    common::redactions(&job.tb).bind(|| insta::assert_snapshot!("busy_workdir", second.stderr));
    assert!(
        second
            .stderr
            .contains("is still running in /tmp/fleet-tests/run-busy/host1"),
        "{}",
        second.stderr
    );
    // With its sync, a second run is refused before it changes a file under the first.
    job.write("new.txt", "new\n");
    let third = job.fleet(&["run", "--", "true"]).run();
    third.assert_code(1);
    assert!(
        third
            .stderr
            .contains("(fleet stop, or wait for it); nothing was changed"),
        "{}",
        third.stderr
    );
    assert!(
        !std::path::Path::new(&job.workdir("host1"))
            .join("new.txt")
            .exists(),
        "the sync changed the running job's files"
    );
    interrupt(&first);
    assert_eq!(wait(&mut first), Some(130));
    assert_eq!(job.remaining("sleep 6003"), Vec::<String>::new());
}

#[test]
fn six_hundred_thousand_lines_arrive_whole_and_in_order() {
    let job = job("run-lines");
    let run = job
        .fleet(&[
            "run",
            "--",
            "sh",
            "-c",
            "seq -f \"line %.0f of rank $RANK, padded to be long enough\" 1 200000",
        ])
        .run();
    run.assert_code(0);
    let mut next = [1u64; 3];
    let mut total = 0;
    for line in run.stdout.lines() {
        let rank: usize = line[1..2].parse().unwrap();
        let expected = format!(
            "[{rank} host{}] line {} of rank {rank}, padded to be long enough",
            rank + 1,
            next[rank]
        );
        assert_eq!(line, expected);
        next[rank] += 1;
        total += 1;
    }
    assert_eq!(total, 600_000);
}

#[test]
fn a_killed_laptop_loses_nothing_and_logs_reattach() {
    let job = job("run-reattach");
    let script = "echo first; i=1; while [ $i -le 20 ]; do echo \"line $i of $RANK\"; i=$((i+1)); sleep 0.05; done";
    let (mut child, _home) = job.fleet(&["run", "--", "sh", "-c", script]).spawn();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    await_lines(&mut stdout, "first", 1);
    child.kill().unwrap(); // SIGKILL: no chance to stop anything
    child.wait().unwrap();

    let logs = job.fleet(&["logs", "-f"]).run();
    logs.assert_code(0);
    for rank in 0..3 {
        let mine: Vec<&str> = logs
            .stdout
            .lines()
            .filter(|l| l.starts_with(&format!("[{rank} ")))
            .collect();
        assert_eq!(mine.len(), 21, "rank {rank}: {}", logs.stdout);
        assert!(mine[0].ends_with("] first"));
        assert!(mine[20].ends_with(&format!("] line 20 of {rank}")));
    }
    let only = job.fleet(&["logs", "--rank", "2"]).run();
    only.assert_code(0);
    assert_eq!(only.stdout.lines().count(), 21);
    assert!(only.stdout.lines().all(|l| l.starts_with("[2 host3] ")));
    // A rank the job does not have is a usage mistake.
    let none = job.fleet(&["logs", "--rank", "99"]).run();
    none.assert_code(2);
    none.assert_stderr_contains("no process found with rank 99");
}

/// fleet-train's JSON events are for machines: `fleet run` and `fleet logs` show them as
/// sentences, and they stay whole in the run folder, `--json` and `fleet logs --raw`. A JSON line
/// of the program's own is its output and stays.
#[test]
fn training_events_stay_off_the_human_log() {
    let job = job("run-events");
    let script = r#"echo '{"event":"checkpoint","step":3,"dir":"ck"}'; echo '{"event":"deploy"}'; echo "plain $RANK""#;
    let run = job.fleet(&["run", "--", "sh", "-c", script]).run();
    run.assert_code(0);
    let mut shown: Vec<&str> = run.stdout.lines().collect();
    shown.sort();
    let expected = [
        "[0 host1] plain 0",
        "[0 host1] {\"event\":\"deploy\"}",
        "[1 host2] plain 1",
        "[1 host2] {\"event\":\"deploy\"}",
        "[2 host3] plain 2",
        "[2 host3] {\"event\":\"deploy\"}",
    ];
    assert_eq!(shown, expected, "{}", run.stdout);
    assert_eq!(
        run.stderr
            .matches("training: checkpoint saved at step 3\n")
            .count(),
        1,
        "{}",
        run.stderr
    );
    let merged = std::fs::read_dir(job.root().join("runs"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path().join("merged.log")).unwrap())
        .collect::<String>();
    assert_eq!(
        merged.matches("\"event\":\"checkpoint\"").count(),
        3,
        "{merged}"
    );

    let logs = job.fleet(&["logs"]).run();
    logs.assert_code(0);
    let mut shown: Vec<&str> = logs.stdout.lines().collect();
    shown.sort();
    assert_eq!(shown, expected, "{}", logs.stdout);
    let raw = job.fleet(&["logs", "--raw"]).run();
    raw.assert_code(0);
    assert_eq!(
        raw.stdout.matches("\"event\":\"checkpoint\"").count(),
        3,
        "{}",
        raw.stdout
    );
    let json = job.fleet(&["--json", "logs", "--rank", "1"]).run();
    json.assert_code(0);
    let lines = json.records();
    assert_eq!(lines.len(), 3, "{}", json.stdout);
    assert!(
        lines
            .iter()
            .all(|l| l["type"] == "line" && l["rank"] == "1" && l["host"] == "host2")
    );
    assert_eq!(
        lines[0]["line"],
        r#"{"event":"checkpoint","step":3,"dir":"ck"}"#
    );
}

#[test]
fn detached_jobs_show_in_ps_and_stop_on_request() {
    let job = job("run-detach");
    let started = job
        .fleet(&[
            "run",
            "--detach",
            "--",
            "sh",
            "-c",
            "echo up; exec sleep 6004",
        ])
        .run();
    started.assert_code(0);
    let job_id = started.stdout.trim().to_string();
    assert_eq!(job_id.len(), 20, "{}", started.stdout);

    let logs = job.fleet(&["logs", &job_id]).run();
    logs.assert_code(0);
    let ps = job.fleet(&["--json", "ps"]).run();
    ps.assert_code(0);
    let states: Vec<serde_json::Value> = ps
        .records()
        .into_iter()
        .filter(|r| r["job"] == job_id.as_str())
        .collect();
    assert_eq!(states.len(), 3, "{}", ps.stdout);
    assert!(
        states.iter().all(|s| s["state"] == "running"),
        "{}",
        ps.stdout
    );

    let stop = job
        .fleet(&["--json", "stop", "--grace", "2", &job_id])
        .run();
    stop.assert_code(0);
    let stopped = stop.records();
    assert_eq!(stopped.len(), 3, "{}", stop.stdout);
    assert!(
        stopped
            .iter()
            .all(|r| r["job"] == job_id.as_str() && r["state"] == "exited 143"),
        "{}",
        stop.stdout
    );
    assert_eq!(job.remaining("sleep 6004"), Vec::<String>::new());
}

#[test]
fn metacharacters_in_workdir_env_and_arguments_are_never_executed() {
    let job = job("meta it's $(x)");
    let marker = format!("/tmp/fleet-meta-{}", std::process::id());
    let weird = format!("$(touch {marker}); `touch {marker}` it's \"q\"");
    job.configure(|i| i.env("WEIRD", &weird));
    let run = job
        .fleet(&[
            "run",
            "--",
            "sh",
            "-c",
            "printf '%s|%s|%s\\n' \"$WEIRD\" \"$1\" \"$(pwd)\"",
            "_",
            &format!("$(touch {marker})"),
        ])
        .run();
    run.assert_code(0);
    for (rank, host) in ["host1", "host2", "host3"].iter().enumerate() {
        let line = format!(
            "[{rank} {host}] {weird}|$(touch {marker})|{}",
            job.workdir(host)
        );
        assert!(
            run.stdout.lines().any(|l| l == line),
            "{line}\n{}",
            run.stdout
        );
    }
    assert!(
        !std::path::Path::new(&marker).exists(),
        "something was executed"
    );
}

#[test]
fn sixteen_ranks_on_three_hosts_start_and_stop_cleanly() {
    let job = job("run-sixteen");
    job.configure(|i| i.fleet("ranks", 5).host("host1", "ranks", 6));
    let run = job
        .fleet(&[
            "run",
            "--",
            "sh",
            "-c",
            "echo rank $RANK of $WORLD_SIZE local $LOCAL_RANK",
        ])
        .run();
    run.assert_code(0);
    let mut ranks: Vec<u32> = run
        .stdout
        .lines()
        .map(|l| {
            l.split(" rank ")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    ranks.sort();
    assert_eq!(ranks, (0..16).collect::<Vec<_>>());
    assert!(run.stdout.lines().all(|l| l.contains(" of 16 ")));

    let stopped = job
        .fleet(&[
            "run",
            "--no-sync",
            "--grace",
            "2",
            "--",
            "sh",
            "-c",
            "if [ $RANK = 9 ]; then exit 4; fi; exec sleep 6020",
        ])
        .run();
    stopped.assert_code(4);
    stopped.assert_stderr_contains("rank 9 on host2 exited with 4");
    assert_eq!(job.remaining("sleep 6020"), Vec::<String>::new());
}

/// The torch environment scripts/setup.sh installs (outside /root, so the hosts can run it).
fn torch_venv() -> std::path::PathBuf {
    std::path::PathBuf::from(
        std::env::var_os("FLEET_TORCH_VENV").unwrap_or_else(|| "/opt/fleet/torch-venv".into()),
    )
}

#[test]
fn a_torch_distributed_script_all_reduces_across_the_hosts_with_torchrun() {
    let job = job("run-torchrun");
    job.write(
        "allreduce.py",
        "import os, torch, torch.distributed as dist\n\
         dist.init_process_group('gloo')\n\
         t = torch.tensor([float(dist.get_rank() + 1)])\n\
         dist.all_reduce(t)\n\
         print(f'rank {dist.get_rank()} of {dist.get_world_size()} on {os.uname().nodename}: sum {t.item()}', flush=True)\n\
         dist.destroy_process_group()\n",
    );
    let bin = torch_venv().join("bin");
    assert!(
        bin.join("torchrun").exists(),
        "no torch environment at {}: run scripts/setup.sh",
        bin.display()
    );
    // As a user reaches torch on a host: the venv's activate script, not a PATH of the test's.
    job.configure(|i| i.fleet("activate", format!(". {}/activate", bin.display())));
    let run = job
        .fleet(&["run", "--torchrun", "--", "allreduce.py"])
        .run();
    run.assert_code(0);
    for (rank, host) in ["host1", "host2", "host3"].iter().enumerate() {
        let line = format!("rank {rank} of 3 on {host}: sum 6.0");
        assert!(
            run.stdout
                .lines()
                .any(|l| l.starts_with(&format!("[n{rank} {host}]")) && l.ends_with(&line)),
            "{line}\n{}\n{}",
            run.stdout,
            run.stderr
        );
    }
}

#[test]
fn a_second_ctrl_c_kills_ranks_that_ignore_sigterm() {
    let job = job("run-interrupt-twice");
    // The ranks ignore SIGTERM; only SIGKILL ends them, and the grace period is long.
    let script = "trap '' TERM; echo ready; while :; do sleep 0.2; done";
    let (mut child, _home) = job
        .fleet(&["run", "--grace", "300", "--", "sh", "-c", script])
        .spawn();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    await_lines(&mut stdout, "ready", 3);
    press_ctrl_c_twice(&mut child);
    assert_eq!(wait(&mut child), Some(130));
    assert_eq!(job.remaining("while :; do sleep 0.2"), Vec::<String>::new());
}

/// Ctrl-C, and once fleet says it is stopping, Ctrl-C again. A signal right behind the first is
/// taken as the same request (a burst, not a person), so the second is pressed, as a person
/// would, until fleet answers it.
fn press_ctrl_c_twice(child: &mut std::process::Child) {
    let stderr = lines_of(child.stderr.take().unwrap());
    interrupt(child);
    await_line(&stderr, "interrupted: stopping every process");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        interrupt(child);
        match stderr.recv_timeout(Duration::from_millis(500)) {
            Ok(line) if line.contains("killing every process now") => return,
            Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("fleet ended before it said it was killing: {e}"),
        }
        assert!(Instant::now() < deadline, "fleet never killed the ranks");
    }
}

/// The lines `from` writes, as they come, through a channel (so a test can wait with a deadline).
fn lines_of(from: impl Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    receiver
}

/// Waits (30 s at most) for a line that contains `text`.
fn await_line(lines: &std::sync::mpsc::Receiver<String>, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(text) => return,
            Ok(_) => {}
            Err(e) => panic!("no line with {text:?}: {e}"),
        }
    }
}

#[test]
fn an_encrypted_key_asks_for_its_passphrase_once_on_a_terminal() {
    let job = job("run-passphrase");
    locked_key(&job);
    // `fleet run` connects three times (sync, check, job): the passphrase is asked once.
    let text = run_on_a_terminal_answering_passphrases(&job, None);
    assert_eq!(
        text.matches("Enter passphrase for key").count(),
        1,
        "{text}"
    );
    assert_eq!(text.matches("unlocked").count(), 3, "{text}");
    assert!(
        !text.contains("open sesame"),
        "the passphrase was echoed: {text}"
    );
}

#[test]
fn with_an_agent_the_passphrase_is_asked_only_for_a_key_it_lacks() {
    let job = job("run-passphrase-agent");
    let key = locked_key(&job);
    let agent = Agent::start(job.config.path());
    // An agent that lacks the key cannot sign with it: fleet asks, once.
    let text = run_on_a_terminal_answering_passphrases(&job, Some(&agent.socket));
    assert_eq!(
        text.matches("Enter passphrase for key").count(),
        1,
        "{text}"
    );
    assert_eq!(text.matches("unlocked").count(), 3, "{text}");
    // Once the agent holds it, the agent signs and nothing is asked.
    agent.add(&key, "open sesame");
    let text = run_on_a_terminal_answering_passphrases(&job, Some(&agent.socket));
    assert_eq!(
        text.matches("Enter passphrase for key").count(),
        0,
        "{text}"
    );
    assert_eq!(text.matches("unlocked").count(), 3, "{text}");
}

/// An encrypted copy of the test bed's key (passphrase "open sesame"), named by the inventory.
fn locked_key(job: &Project) -> std::path::PathBuf {
    let key = job.config.path().join("locked_key");
    std::fs::copy(job.tb.key(), &key).unwrap();
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-p", "-N", "open sesame", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(status.success());
    job.configure(|i| i.fleet("identity", path_value(&key)));
    key
}

/// An ssh-agent of the test's own, stopped when dropped.
struct Agent {
    socket: std::path::PathBuf,
    pid: String,
}

impl Agent {
    fn start(dir: &std::path::Path) -> Agent {
        let socket = dir.join("agent.sock");
        let out = std::process::Command::new("ssh-agent")
            .arg("-a")
            .arg(&socket)
            .arg("-s")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let pid = text
            .split(';')
            .find_map(|part| part.trim().strip_prefix("SSH_AGENT_PID="))
            .expect("ssh-agent names its pid")
            .to_string();
        Agent { socket, pid }
    }

    /// Adds an encrypted key, its passphrase given by an askpass program (never argv).
    fn add(&self, key: &std::path::Path, passphrase: &str) {
        let dir = self.socket.parent().unwrap();
        let secret = dir.join("askpass-secret");
        std::fs::write(&secret, passphrase).unwrap();
        let askpass = dir.join("askpass.sh");
        std::fs::write(&askpass, format!("#!/bin/sh\ncat '{}'\n", secret.display())).unwrap();
        std::fs::set_permissions(
            &askpass,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let status = std::process::Command::new("ssh-add")
            .arg(key)
            .env("SSH_AUTH_SOCK", &self.socket)
            .env("SSH_ASKPASS", &askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("DISPLAY", "none")
            .stdin(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").arg(&self.pid).status();
    }
}

/// `fleet run -- echo unlocked` on a terminal of its own, with `agent` as SSH_AUTH_SOCK (or
/// none), typing the passphrase whenever it is asked for; fails unless fleet succeeds. What the
/// terminal showed.
fn run_on_a_terminal_answering_passphrases(
    job: &Project,
    agent: Option<&std::path::Path>,
) -> String {
    let command = format!(
        "{} -i {} run -- echo unlocked",
        env!("CARGO_BIN_EXE_fleet"),
        job.inventory.display()
    );
    let mut script = std::process::Command::new("script");
    script
        .args(["-qec", &command, "/dev/null"])
        .env("HOME", job.config.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    match agent {
        Some(socket) => script.env("SSH_AUTH_SOCK", socket),
        None => script.env_remove("SSH_AUTH_SOCK"),
    };
    let mut child = script.spawn().unwrap();
    // A watchdog, so a fleet that asks again (and waits) fails the test instead of hanging it.
    let pid = child.id().to_string();
    let watchdog = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            if std::process::Command::new("kill")
                .args(["-0", &pid])
                .status()
                .map_or(true, |s| !s.success())
            {
                return;
            }
        }
        let _ = std::process::Command::new("pkill")
            .args(["-KILL", "-P", &pid])
            .status();
    });
    let output = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let output = output.clone();
        let mut stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut stdout, &mut chunk) {
                if n == 0 {
                    break;
                }
                output.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        })
    };
    let seen = || output.lock().unwrap().clone();
    let prompt = "Enter passphrase for key";
    let mut stdin = child.stdin.take().unwrap();
    let mut answered = 0;
    // Answer each prompt once it is there, until fleet ends. Turning echo off discards what was
    // typed ahead (as OpenSSH does), so an answer that lands in that instant is typed again
    // until fleet goes on.
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        let text = seen();
        let asked = String::from_utf8_lossy(&text).matches(prompt).count();
        if asked > answered {
            let mut len = text.len();
            for _ in 0..5 {
                std::io::Write::write_all(&mut stdin, b"open sesame\n").unwrap();
                let until = Instant::now() + Duration::from_secs(2);
                while Instant::now() < until && seen().len() == len {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let now = seen();
                if now.len() == len {
                    continue;
                }
                // The answer shown back means the terminal still echoed when it arrived: it
                // came before echo went off, and going off discarded it. Type it again.
                if String::from_utf8_lossy(&now[len..]).trim() == "open sesame" {
                    len = now.len();
                    continue;
                }
                break;
            }
            answered = asked;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(stdin);
    reader.join().unwrap();
    watchdog.join().unwrap();
    let text = String::from_utf8_lossy(&seen()).into_owned();
    assert!(status.success(), "{text}");
    text
}

#[test]
fn json_lines_carry_rank_and_host() {
    let job = job("run-json");
    let run = job
        .fleet(&["--json", "run", "--", "sh", "-c", "echo \"hi from $RANK\""])
        .run();
    run.assert_code(0);
    let mut records = run.records();
    records.sort_by_key(|r| r["rank"].as_str().unwrap().to_string());
    let expected: Vec<serde_json::Value> = (0..3)
        .map(|r| serde_json::json!({"type": "line", "rank": r.to_string(), "host": format!("host{}", r + 1), "line": format!("hi from {r}")}))
        .collect();
    assert_eq!(records, expected);
}

#[test]
fn a_rank_killed_with_its_wrapper_is_noticed_and_the_job_stops() {
    let job = job("run-vanished");
    let (mut child, _home) = job
        .fleet(&["run", "--", "sh", "-c", "echo ready; exec sleep 6031"])
        .spawn();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    await_lines(&mut stdout, "ready", 3);
    // The wrapper that would record the exit status dies first (its pid is in its job
    // folder), then the rank: nothing is ever written, and only asking the host shows that the
    // process is gone.
    job.tb.ssh(
        "host2",
        &format!(
            "kill -KILL $(cut -d' ' -f1 {}/.fleet/jobs/*/rank-1.wrapper); pkill -KILL -f '^sleep 6031'",
            job.workdir("host2")
        ),
    );
    let killed = Instant::now();
    // When the line that names it arrives, read as it comes.
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let mut noticed = None;
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap();
            if noticed.is_none() && line.contains("rank 1 on host2 vanished") {
                noticed = Some(killed.elapsed());
            }
            text.push_str(&line);
            text.push('\n');
        }
        (text, noticed)
    });
    let code = common::wait_for(&mut child, Duration::from_secs(60));
    let (text, noticed) = reader.join().unwrap();
    assert_eq!(code, Some(255), "{text}");
    assert!(
        text.contains("rank 1 on host2 vanished: it and its wrapper are gone"),
        "{text}"
    );
    // The README says within 10 s (two looks, 5 s apart); a few seconds more for a busy machine.
    let noticed = noticed.unwrap();
    assert!(
        noticed < Duration::from_secs(10 + 4),
        "noticed after {noticed:?}"
    );
    assert_eq!(job.remaining("sleep 6031"), Vec::<String>::new());
    // fleet logs -f shows what there is and does not wait for an exit status that cannot come.
    let logs = job.fleet(&["logs", "-f"]).run();
    logs.assert_stderr_contains("host2: rank 1 is gone without an exit status");
    assert_eq!(logs.stdout.matches("ready").count(), 3, "{}", logs.stdout);
}

#[test]
fn no_secret_reaches_the_output_or_the_run_folder_and_it_is_private() {
    let job = job("run-secrets");
    let key = std::fs::read_to_string(job.tb.key()).unwrap();
    // The body of the private key, line by line, and an agent socket path that must not leak.
    let secrets: Vec<String> = key
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 20)
        .map(str::to_string)
        .chain(["/tmp/agent-socket-that-must-not-leak".to_string()])
        .collect();
    // fleet's caches live in a HOME that outlives the run, where they are checked below.
    let home = tempfile::tempdir().unwrap();
    let run = job
        .fleet_in(
            home.path(),
            &["--json", "run", "--", "sh", "-c", "echo done; env"],
        )
        .run_with_env("SSH_AUTH_SOCK", "/tmp/agent-socket-that-must-not-leak");
    run.assert_code(0);
    // A failed login, with the agent variable set, says nothing of the key either.
    let stranger = common::keygen(home.path(), "stranger", "");
    job.configure(|i| i.fleet("identity", path_value(&stranger)));
    let refused = job
        .fleet_in(home.path(), &["exec", "--", "true"])
        .run_with_env("SSH_AUTH_SOCK", "/tmp/agent-socket-that-must-not-leak");
    refused.assert_code(3);
    let stranger_key = std::fs::read_to_string(&stranger).unwrap();
    for line in stranger_key
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 20)
    {
        assert!(
            !refused.stderr.contains(line),
            "a failed login showed its key: {}",
            refused.stderr
        );
    }
    assert!(
        !refused
            .stderr
            .contains("/tmp/agent-socket-that-must-not-leak"),
        "{}",
        refused.stderr
    );
    let cache = home.path().join(".cache/fleet");
    assert!(
        cache.is_dir(),
        "no cache was written in {}",
        home.path().display()
    );
    for entry in walkdir::WalkDir::new(&cache) {
        let entry = entry.unwrap();
        if entry.file_type().is_dir() {
            let mode =
                std::os::unix::fs::PermissionsExt::mode(&entry.metadata().unwrap().permissions());
            assert_eq!(
                mode & 0o077,
                0,
                "{} is open to others",
                entry.path().display()
            );
        }
    }
    let runs = job.root().join("runs");
    let mut written = String::new();
    for entry in walkdir::WalkDir::new(&runs) {
        let entry = entry.unwrap();
        if entry.file_type().is_dir() {
            let mode =
                std::os::unix::fs::PermissionsExt::mode(&entry.metadata().unwrap().permissions());
            if entry.path() != runs {
                assert_eq!(
                    mode & 0o077,
                    0,
                    "{} is open to others",
                    entry.path().display()
                );
            }
        } else {
            written.push_str(&std::fs::read_to_string(entry.path()).unwrap());
        }
    }
    assert!(written.contains("done"), "the run folder holds the log");
    for secret in &secrets {
        for (what, text) in [
            ("stdout", &run.stdout),
            ("stderr", &run.stderr),
            ("runs/", &written),
        ] {
            assert!(!text.contains(secret.as_str()), "{what} holds {secret:?}");
        }
    }
}

/// A torchrun job whose workers (in sessions of their own, as torch elastic starts them) ignore
/// SIGTERM; returned with `fleet run` started and every worker ready. `extra` goes before `--`.
fn stubborn_torchrun(
    job: &Project,
    tag: &str,
    extra: &[&str],
) -> (std::process::Child, tempfile::TempDir) {
    job.write(
        &format!("stubborn_{tag}.py"),
        "import os, signal, time\n\
         signal.signal(signal.SIGTERM, signal.SIG_IGN)\n\
         print(f\"worker {os.environ['RANK']} ready\", flush=True)\n\
         while True:\n    time.sleep(0.2)\n",
    );
    let bin = torch_venv().join("bin");
    // As a user reaches torch on a host: the venv's activate script, not a PATH of the test's.
    job.configure(|i| i.fleet("activate", format!(". {}/activate", bin.display())));
    let script = format!("stubborn_{tag}.py");
    let mut args = vec!["run", "--grace", "2", "--torchrun"];
    args.extend(extra);
    args.extend(["--", script.as_str()]);
    job.fleet(&args).spawn()
}

/// Polls until no process on any host has `pattern` in its command line.
fn assert_gone(job: &Project, pattern: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = job.remaining(pattern);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "still running: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_torchrun_worker_that_ignores_sigterm_is_gone_after_one_ctrl_c() {
    let job = job("run-stubborn-one");
    let (mut child, _home) = stubborn_torchrun(&job, "one", &[]);
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    await_lines(&mut stdout, "ready", 3);
    interrupt(&child);
    assert_eq!(wait(&mut child), Some(130));
    assert_gone(&job, "stubborn_one");
}

#[test]
fn a_torchrun_worker_that_ignores_sigterm_is_gone_after_two_ctrl_c() {
    let job = job("run-stubborn-two");
    let (mut child, _home) = stubborn_torchrun(&job, "two", &[]);
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    await_lines(&mut stdout, "ready", 3);
    press_ctrl_c_twice(&mut child);
    assert_eq!(wait(&mut child), Some(130));
    assert_gone(&job, "stubborn_two");
}

#[test]
fn a_torchrun_worker_that_ignores_sigterm_is_gone_after_fleet_stop() {
    let job = job("run-stubborn-stop");
    let (mut child, _home) = stubborn_torchrun(&job, "stop", &["--detach"]);
    let code = wait(&mut child);
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(code, Some(0), "{out}\n{err}");
    let job_id = out.trim().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while job.remaining("stubborn_stop").len() < 6 {
        assert!(Instant::now() < deadline, "the workers did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let stop = job.fleet(&["stop", "--grace", "2", &job_id]).run();
    stop.assert_code(0);
    assert_gone(&job, "stubborn_stop");
}

/// A process that leaves its process group and session and outlives the command that started
/// it is still the job's: `fleet ps` says running, a second job is refused, and `fleet stop`
/// ends it (it ignores SIGTERM: after the grace period, SIGKILL).
#[test]
fn a_process_that_escaped_its_group_keeps_the_job_running_until_stopped() {
    let job = job("run-escaped");
    let started = job
        .fleet(&[
            "run",
            "--detach",
            "--",
            "sh",
            "-c",
            "setsid sh -c 'trap \"\" TERM; exec sleep 6121' </dev/null >/dev/null 2>&1 & echo started",
        ])
        .run();
    started.assert_code(0);
    let job_id = started.stdout.trim().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while job.remaining("sleep 6121").len() < 3 {
        assert!(Instant::now() < deadline, "the sleepers did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Each rank's own command has exited; what it left behind still runs.
    let ps = job.fleet(&["--json", "ps"]).run();
    ps.assert_code(0);
    let states: Vec<String> = ps
        .records()
        .into_iter()
        .filter(|r| r["job"] == job_id.as_str())
        .map(|r| r["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(states, ["running", "running", "running"], "{}", ps.stdout);
    let second = job.fleet(&["run", "--no-sync", "--", "true"]).run();
    second.assert_code(1);
    assert!(
        second
            .stderr
            .contains(&format!("job {job_id} is still running")),
        "{}",
        second.stderr
    );
    let stop = job.fleet(&["stop", "--grace", "1", &job_id]).run();
    stop.assert_code(0);
    assert_eq!(
        stop.stdout.matches("exited 0").count(),
        3,
        "{}",
        stop.stdout
    );
    assert_eq!(job.remaining("sleep 6121"), Vec::<String>::new());
}

/// `timeout` sends SIGTERM: fleet stops the job (SIGKILL after the grace period for ranks that
/// ignore SIGTERM) and exits, well before timeout's own SIGKILL would come.
#[test]
fn fleet_under_timeout_stops_the_job_and_exits_on_sigterm() {
    let job = job("run-timeout");
    let fleet = env!("CARGO_BIN_EXE_fleet");
    let home = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("timeout")
        .args(["--preserve-status", "-k", "60", "20", fleet, "-i"])
        .arg(&job.inventory)
        .args([
            "run",
            "--grace",
            "2",
            "--",
            "sh",
            "-c",
            "trap '' TERM; echo ready; exec sleep 6122",
        ])
        .env("HOME", home.path())
        .env_remove("SSH_AUTH_SOCK")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("killing them"), "{stderr}");
    assert_eq!(job.remaining("sleep 6122"), Vec::<String>::new());
}

/// A closed terminal sends SIGHUP: the job is stopped as with Ctrl-C.
#[test]
fn a_hangup_stops_the_job() {
    let job = job("run-hangup");
    let (mut child, _home, _stdout) = job.start_sleepers(6123);
    let status = std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(wait(&mut child), Some(130));
    assert_eq!(job.remaining("sleep 6123"), Vec::<String>::new());
}

/// A secret in the inventory's env reaches the ranks, but never a command line on a host (any
/// user there can read those) nor the local run folder.
#[test]
fn a_secret_in_env_is_absent_from_every_command_line_and_from_runs() {
    let job = job("run-env-secret");
    let secret = "hf_do_not_show_me_4242";
    job.configure(|i| i.env("HF_TOKEN", secret));
    let (mut child, _home) = job
        .fleet(&[
            "run",
            "--grace",
            "2",
            "--",
            "sh",
            "-c",
            "echo has-token-of-${#HF_TOKEN}-characters; exec sleep 6124",
        ])
        .spawn();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    await_lines(
        &mut stdout,
        &format!("has-token-of-{}-characters", secret.len()),
        3,
    );
    for host in &job.tb.hosts {
        let args = job.tb.ssh(&host.name, "ps -eo args");
        assert!(args.contains("sleep 6124"), "{}: {args}", host.name);
        assert!(
            !args.contains(secret),
            "{} shows the secret: {args}",
            host.name
        );
        let files = job.tb.ssh(
            &host.name,
            &format!(
                "grep -rl {secret} {}/.fleet || true",
                job.workdir(&host.name)
            ),
        );
        assert_eq!(files.trim(), "", "{}: the secret stays on disk", host.name);
        // The job's files are the user's alone: its folder 0700, its logs, pids and status 0600.
        let modes = job.tb.ssh(
            &host.name,
            &format!(
                "cd {}/.fleet/jobs && find . -mindepth 1 -printf '%m %y %p\\n'",
                job.workdir(&host.name)
            ),
        );
        for line in modes.lines() {
            let mut fields = line.split_whitespace();
            let (mode, kind) = (fields.next().unwrap(), fields.next().unwrap());
            let private = if kind == "d" { "700" } else { "600" };
            assert!(
                mode == private || kind == "l",
                "{}: {line} is readable by others",
                host.name
            );
        }
        assert!(modes.contains(".log"), "{}: {modes}", host.name);
    }
    interrupt(&child);
    assert_eq!(wait(&mut child), Some(130));
    for entry in walkdir::WalkDir::new(job.root().join("runs")) {
        let entry = entry.unwrap();
        if entry.file_type().is_file() {
            let text = std::fs::read_to_string(entry.path()).unwrap();
            assert!(
                !text.contains(secret),
                "{} holds the secret",
                entry.path().display()
            );
        }
    }
}

/// As the login `train`, whose login shell is fish: the sync and the job work, in a workdir
/// under the home directory.
#[test]
fn a_fish_login_shell_syncs_and_runs() {
    let job = job("run-fish");
    job.write("data/it's a file.txt", "x\n");
    job.configure(|i| {
        i.fleet("user", "train")
            .every_host("workdir", |_| "~/fish project")
    });
    let sync = job.fleet(&["sync"]).run();
    sync.assert_code(0);
    let run = job
        .fleet(&[
            "run",
            "--",
            "sh",
            "-c",
            "echo \"$RANK in $(pwd) as $(id -un): $(cat \"data/it's a file.txt\")\"",
        ])
        .run();
    run.assert_code(0);
    for (rank, host) in ["host1", "host2", "host3"].iter().enumerate() {
        let line = format!("[{rank} {host}] {rank} in /home/train/fish project as train: x");
        assert!(
            run.stdout.contains(&line),
            "{line}\n{}\n{}",
            run.stdout,
            run.stderr
        );
    }
}

/// A host that cannot start its part of the job is named, and what started elsewhere is stopped
/// at once rather than left running unsupervised.
#[test]
fn a_start_failure_on_one_host_stops_the_job_and_names_the_host() {
    let job = job("run-start-fails");
    job.fleet(&["sync"]).run().assert_code(0);
    // host3's job folder cannot be made: a file stands where it goes.
    std::fs::write(
        format!("{}/.fleet/jobs", job.workdir("host3")),
        "in the way\n",
    )
    .unwrap();
    let run = job
        .fleet(&[
            "run",
            "--no-sync",
            "--grace",
            "1",
            "--",
            "sh",
            "-c",
            "echo ready; exec sleep 6132",
        ])
        .run();
    run.assert_code(1);
    run.assert_stderr_contains("host3: could not start the job");
    assert!(
        !run.stderr.contains("host1: could not start"),
        "{}",
        run.stderr
    );
    assert_eq!(job.remaining("sleep 6132"), Vec::<String>::new());
}

/// Between restarts fleet still hears Ctrl-C: it stops waiting and does not restart.
#[test]
fn ctrl_c_during_the_restart_delay_ends_fleet_without_a_restart() {
    let job = job("run-restart-interrupted");
    let (mut child, _home) = job
        .fleet(&[
            "run",
            "--max-restarts",
            "3",
            "--restart-delay",
            "300",
            "--",
            "sh",
            "-c",
            "exit 3",
        ])
        .spawn();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut line = String::new();
    while !line.contains("===== restart 1 of 3 in 300s") {
        assert!(Instant::now() < deadline, "no restart was announced");
        line.clear();
        assert_ne!(stderr.read_line(&mut line).unwrap(), 0, "fleet ended early");
    }
    interrupt(&child);
    assert_eq!(
        common::wait_for(&mut child, Duration::from_secs(30)),
        Some(130)
    );
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("interrupted: no restart"), "{rest}");
}

/// A job folder whose wrapper died without a word (a reboot, an OOM kill) while its pid went to
/// an unrelated process: `fleet ps` says lost and `fleet stop` signals nothing.
#[test]
fn a_stale_pid_is_lost_and_never_signalled() {
    let job = job("run-stale-pid");
    job.fleet(&["sync"]).run().assert_code(0);
    let workdir = job.workdir("host1");
    // An unrelated process on host1, in a process group of its own.
    let pid = job
        .tb
        .ssh(
            "host1",
            "setsid sleep 6151 </dev/null >/dev/null 2>&1 & echo $!",
        )
        .trim()
        .to_string();
    let dir = format!("{workdir}/.fleet/jobs/20260101-000000-dead");
    job.tb.ssh(
        "host1",
        &format!(
            "mkdir -p {dir} && cat /proc/sys/kernel/random/boot_id > {dir}/boot_id && \
             echo 1 > {dir}/rank-0.start && echo {pid} > {dir}/rank-0.pid && \
             echo '{pid} 12345' > {dir}/rank-0.wrapper && echo 20260101-000000-dead > {workdir}/.fleet/current-job"
        ),
    );
    let ps = job.fleet(&["--json", "ps"]).run();
    ps.assert_code(0);
    ps.assert_stdout_contains("\"job\":\"20260101-000000-dead\",\"host\":\"host1\",\"process\":\"rank-0\",\"state\":\"lost\"");
    let stop = job
        .fleet(&["stop", "--grace", "1", "20260101-000000-dead"])
        .run();
    stop.assert_code(0);
    assert_eq!(
        job.remaining_on("host1", "sleep 6151").lines().count(),
        1,
        "the unrelated process was signalled"
    );
    job.tb.ssh("host1", &format!("kill {pid}"));
}

/// A conda-style `activate`: a script that defines a shell function, and a call of it that
/// puts a second environment first on PATH (a venv of its own, which reaches torch through a
/// `.pth` file as a conda environment would hold its own copy). The probe, `fleet exec` and the
/// ranks all run inside that environment.
#[test]
fn a_conda_style_activate_line_reaches_torch_everywhere() {
    let job = job("run-activate-conda");
    let env =
        std::path::PathBuf::from(format!("/tmp/fleet-tests/conda-env-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&env);
    let made = std::process::Command::new("/usr/bin/python3")
        .args(["-m", "venv", "--without-pip"])
        .arg(&env)
        .status()
        .unwrap();
    assert!(made.success());
    let site = |python: &std::path::Path| {
        let out = std::process::Command::new(python)
            .args([
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let torch_site = site(&torch_venv().join("bin/python3"));
    std::fs::write(
        std::path::Path::new(&site(&env.join("bin/python3"))).join("torch-venv.pth"),
        format!("{torch_site}\n"),
    )
    .unwrap();
    let hook = format!("/tmp/fleet-tests/conda-hook-{}.sh", std::process::id());
    std::fs::write(
        &hook,
        format!(
            "use_torch() {{ PATH={}:$PATH; export PATH; TORCH_ENV=torch; export TORCH_ENV; }}\n",
            env.join("bin").display()
        ),
    )
    .unwrap();
    job.configure(|i| i.fleet("activate", format!(". {hook} && use_torch")));
    let exec = job
        .fleet(&[
            "exec",
            "--",
            "python3",
            "-c",
            "import sys, torch; print(sys.prefix, torch.__version__.split('+')[0])",
        ])
        .run();
    exec.assert_code(0);
    let line = format!("{} 2.11.0", env.display());
    assert_eq!(
        exec.sorted_stdout(),
        [
            format!("host1 | {line}"),
            format!("host2 | {line}"),
            format!("host3 | {line}")
        ]
    );
    let check = job.fleet(&["--json", "check"]).run();
    let torch: Vec<serde_json::Value> = check
        .records()
        .into_iter()
        .filter(|r| r["check"] == "torch")
        .collect();
    assert!(
        !torch.is_empty()
            && torch
                .iter()
                .all(|r| r["detail"].as_str().unwrap_or("").starts_with("2.11.0")),
        "{}",
        check.stdout
    );
    let run = job
        .fleet(&[
            "run",
            "--no-check",
            "--",
            "sh",
            "-c",
            "echo $TORCH_ENV $(python3 -c 'import sys; print(sys.prefix)')",
        ])
        .run();
    run.assert_code(0);
    let expected = format!("torch {}", env.display());
    assert_eq!(run.stdout.matches(&expected).count(), 3, "{}", run.stdout);
    let _ = std::fs::remove_file(&hook);
    let _ = std::fs::remove_dir_all(&env);
}

/// An `activate` line that fails is named per host with what it printed, and nothing starts.
#[test]
fn a_failing_activate_line_is_named_per_host_and_nothing_starts() {
    let job = job("run-activate-fails");
    job.configure(|i| i.fleet("activate", ". /nonexistent/venv/bin/activate"));
    let run = job
        .fleet(&["run", "--", "sh", "-c", "echo started; exec sleep 6160"])
        .run();
    run.assert_code(1);
    for host in ["host1", "host2", "host3"] {
        let line = run
            .stderr
            .lines()
            .find(|l| l.contains(&format!("{host}: ")) && l.contains("activate"))
            .unwrap_or_else(|| panic!("{host} is not named: {}", run.stderr));
        assert!(line.contains("/nonexistent/venv/bin/activate"), "{line}");
        common::assert_says(
            line,
            &common::readme_quote("node2: activate: "),
            &[("node2", host), ("/opt/venv/", "/nonexistent/venv/")],
        );
    }
    run.assert_stderr_contains("nothing was started");
    assert!(!run.stdout.contains("started"), "{}", run.stdout);
    assert_eq!(job.remaining("sleep 6160"), Vec::<String>::new());
}

/// A program that is not on a host's PATH is named, with that host and the way to fix it.
#[test]
fn a_missing_program_names_itself_the_host_and_the_activate_fix() {
    let job = job("run-missing-program");
    let run = job
        .fleet(&[
            "run",
            "--no-check",
            "--",
            "no-such-trainer-4711",
            "--epochs",
            "1",
        ])
        .run();
    run.assert_code(127);
    // Whichever rank failed first is named with its host.
    assert!(
        ["host1", "host2", "host3"]
            .iter()
            .any(|h| run.stderr.contains(&format!(" on {h} exited with 127"))),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("fleet: no-such-trainer-4711: not found on this host (PATH="),
        "{}",
        run.stderr
    );
    run.assert_stderr_contains("set activate = \"...\" in the inventory");
    common::assert_says(
        &run.stderr,
        &common::readme_quote("fleet: torchrun: not found on this host"),
        &[("torchrun", "no-such-trainer-4711")],
    );
    // A program of the project's, named as if it were on PATH: the way to start it is named.
    job.write("my-trainer", "#!/bin/sh\necho trained\n");
    std::fs::set_permissions(
        job.root().join("my-trainer"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let run = job.fleet(&["run", "--no-check", "--", "my-trainer"]).run();
    run.assert_code(127);
    run.assert_stderr_contains("fleet: my-trainer: not found on the PATH of this host, but the workdir has ./my-trainer: start it as ./my-trainer");
    job.fleet(&["run", "--no-check", "--", "./my-trainer"])
        .run()
        .assert_code(0);
}
