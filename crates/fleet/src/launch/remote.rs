//! The job directory on a host and the scripts that drive it (`src/remote/job_*.sh`).
//!
//! `<workdir>/.fleet/jobs/<job>/` holds, per process, `<stem>.log` (its output), `.pid` (its
//! process group), `.wrapper` (its wrapper's pid and start time), `.start` (when it started,
//! ns) and `.exit` (how it ended), and for the job `boot_id` (the host's boot it ran in). A
//! process is started by a detached wrapper (`setsid -f`: its own session, stdio to files) which
//! starts the command in a process group of its own, waits for it and for every process it left
//! behind, and writes its exit status. Because the wrapper is outside that group, stopping the
//! group still records how the process ended; and because nothing is attached to the SSH
//! channel, a lost laptop loses nothing.
//!
//! Every process of a job, and all it starts, carries `FLEET_JOB_ID` and `FLEET_PROCESS` in its
//! environment: that mark is how stop and status find processes that left their group or
//! session (torchrun's workers do), and a pid reused later by another program lacks it. Files
//! are the user's alone (0600, folders 0700); a process's environment reaches the host in a file
//! its wrapper deletes, never on a command line.
//!
//! While any wrapper lives it holds a shared `flock` on `.fleet/job.lock`: a second job in the
//! same workdir is refused, and the name of the running one read from `.fleet/current-job`.

use super::plan::{JobPlan, Process};
use crate::remote::{self, Script};
use crate::shell::quote;

/// The job's folder, relative to the workdir.
pub fn job_dir(job_id: &str) -> String {
    format!(".fleet/jobs/{job_id}")
}

/// File names of a process in the job folder: `rank-3`, or `node-1` for a per-host launcher.
pub fn stem(process: &Process) -> String {
    match process.label.strip_prefix('n') {
        Some(node) => format!("node-{node}"),
        None => format!("rank-{}", process.label),
    }
}

/// Exit status of the start script when another job holds the workdir.
pub const BUSY: u32 = 75;
/// Exit status of the start script when the workdir is missing.
pub const NO_WORKDIR: u32 = 70;

/// The script that starts host `host`'s processes of `job` in `workdir`, and its stdin: it
/// prints `busy <job>` (exit 75) when another job runs there, or `started <workdir's absolute
/// path>` once every wrapper is off. Each of `interface_keys` (GLOO_SOCKET_IFNAME, ...) is set
/// to the host's interface that reaches the master, which the script looks up as it starts.
pub fn start_script(
    workdir: &str,
    job: &JobPlan,
    host: usize,
    activate: Option<&str>,
    interface_keys: &[&str],
) -> (Script, Vec<u8>) {
    let processes: Vec<&Process> = job.on_host(host).collect();
    let script = Script::new(remote::JOB_START)
        .using(remote::JOB_LIB)
        .using(remote::NET_LIB)
        .args([workdir, &job.job_id, &job.master_addr])
        .args(processes.iter().map(|p| stem(p)));
    let mut input = Vec::new();
    let mut block = |bytes: &[u8]| {
        input.extend_from_slice(format!("{}\n", bytes.len()).as_bytes());
        input.extend_from_slice(bytes);
    };
    block(
        &Script::new(remote::JOB_WRAPPER)
            .using(remote::JOB_LIB)
            .file(),
    );
    for process in processes {
        block(process_file(process, activate, interface_keys).as_bytes());
    }
    (script, input)
}

/// What the wrapper of `process` reads: the host's `activate` line (a failure ends the process
/// with 126 and says so in its log), `interface_keys` set to the start script's
/// `$FLEET_IFACE`, its environment as `export` lines (with the mark that finds all its
/// processes), then its command as `set --`.
fn process_file(process: &Process, activate: Option<&str>, interface_keys: &[&str]) -> String {
    let mut env = process.env.clone();
    env.insert("FLEET_PROCESS".into(), stem(process));
    let mut file = String::new();
    if let Some(line) = activate {
        file.push_str(&format!(
            "command eval {line} || {{ printf 'fleet: activate = \"%s\" failed (exit %s)\\n' {line} \"$?\" >&2; exit 126; }}\n",
            line = quote(line)
        ));
    }
    if !interface_keys.is_empty() {
        let exports: Vec<String> = interface_keys
            .iter()
            .map(|key| format!("{key}=\"$FLEET_IFACE\""))
            .collect();
        file.push_str(&format!(
            "if [ -n \"${{FLEET_IFACE-}}\" ]; then export {}; fi\n",
            exports.join(" ")
        ));
    }
    file.push_str("unset FLEET_IFACE\n");
    for (name, value) in &env {
        file.push_str(&format!("export {name}={}\n", quote(value)));
    }
    file.push_str("set --");
    for arg in &process.argv {
        file.push(' ');
        file.push_str(&quote(arg));
    }
    file.push('\n');
    file
}

/// What fleet sends a job's processes to stop them: TERM first, KILL after the grace period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Term,
    Kill,
}

impl Signal {
    /// Its name for `kill -NAME`.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Term => "TERM",
            Signal::Kill => "KILL",
        }
    }
}

/// Sends `signal` to every process of the job on this host that has not ended, wherever it
/// went (`kill -SIG PID` of each marked process).
pub fn signal_script(workdir: &str, job_id: &str, stems: &[String], signal: Signal) -> Script {
    Script::new(remote::JOB_SIGNAL)
        .using(remote::JOB_LIB)
        .args([workdir, job_id, signal.name()])
        .args(stems.iter().cloned())
}

/// How a process of a job stands on its host, as job_lib.sh's `state` says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcState {
    /// It, its wrapper or anything it started still lives.
    Running,
    /// It ended with this exit status, as its wrapper recorded it.
    Exited(i32),
    /// No exit recorded, and neither its wrapper nor any process of it lives.
    Lost,
}

impl ProcState {
    /// `running`, `exited N` or `lost`; None for anything else.
    pub fn parse(reply: &str) -> Option<ProcState> {
        match reply.trim() {
            "running" => Some(ProcState::Running),
            "lost" => Some(ProcState::Lost),
            other => other
                .strip_prefix("exited ")
                .and_then(|code| code.trim().parse().ok())
                .map(ProcState::Exited),
        }
    }
}

impl std::fmt::Display for ProcState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProcState::Running => f.write_str("running"),
            ProcState::Exited(code) => write!(f, "exited {code}"),
            ProcState::Lost => f.write_str("lost"),
        }
    }
}

/// How a process of a job stands on its host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessState {
    pub stem: String,
    pub state: ProcState,
}

/// A job as one host knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobState {
    pub job_id: String,
    /// The job folder's absolute path on the host.
    pub dir: String,
    pub processes: Vec<ProcessState>,
}

/// Reports jobs in a workdir: `job` itself, or the current (latest) one, or with `all` the
/// last ten. Prints `job ID DIR` then `STEM STATE` lines per job.
pub fn status_script(workdir: &str, job: Option<&str>, all: bool) -> Script {
    let select = match (job, all) {
        (Some(job), _) => job,
        (None, true) => "--all",
        (None, false) => "",
    };
    Script::new(remote::JOB_STATUS)
        .using(remote::JOB_LIB)
        .args([workdir, select])
}

/// Parses [`status_script`] output.
pub fn parse_status(text: &str) -> Vec<JobState> {
    let mut jobs: Vec<JobState> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("job ") {
            let (job_id, dir) = rest.split_once(' ').unwrap_or((rest, ""));
            jobs.push(JobState {
                job_id: job_id.to_string(),
                dir: dir.to_string(),
                processes: Vec::new(),
            });
        } else if let (Some(job), Some((stem, reply))) = (jobs.last_mut(), line.split_once(' ')) {
            // The script says nothing else; a line it did not write is not a process.
            if let Some(state) = ProcState::parse(reply) {
                job.processes.push(ProcessState {
                    stem: stem.to_string(),
                    state,
                });
            }
        }
    }
    jobs
}

/// The label shown in log prefixes for a file stem: `rank-3` → `3`, `node-1` → `n1`.
pub fn label_of(stem: &str) -> String {
    match (stem.strip_prefix("rank-"), stem.strip_prefix("node-")) {
        (Some(rank), _) => rank.to_string(),
        (_, Some(node)) => format!("n{node}"),
        _ => stem.to_string(),
    }
}

/// The interface of `host` that reaches `addr`: the one holding it, else the route's device.
pub async fn interface_to(session: &crate::ssh::Session, addr: &str) -> Option<String> {
    let script = Script::new(remote::INTERFACE)
        .using(remote::NET_LIB)
        .arg(addr);
    match session.capture(&script).await {
        Ok((crate::ssh::ExitStatus::Code(0), out, _)) => {
            Some(String::from_utf8_lossy(&out).trim().to_string()).filter(|s| !s.is_empty())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::plan::{JobPlan, Mode};
    use std::collections::BTreeMap;

    fn job() -> JobPlan {
        let process = |index: usize, label: &str, argv: &[&str]| Process {
            index,
            host: 0,
            label: label.to_string(),
            env: BTreeMap::from([
                ("RANK".to_string(), label.to_string()),
                ("ODD".to_string(), "it's $HOME".to_string()),
            ]),
            argv: argv.iter().map(|s| s.to_string()).collect(),
        };
        JobPlan {
            job_id: "J1".into(),
            mode: Mode::Ranks,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
            world_size: 2,
            processes: vec![
                process(0, "0", &["sh", "-c", "echo rank $RANK: $ODD; exit 3"]),
                process(1, "1", &["printf", "%s\\n", "a b"]),
            ],
        }
    }

    #[test]
    fn a_process_state_is_read_once_into_its_type() {
        for (reply, state) in [
            ("running", ProcState::Running),
            ("exited 0", ProcState::Exited(0)),
            ("exited 143\n", ProcState::Exited(143)),
            ("lost", ProcState::Lost),
        ] {
            assert_eq!(ProcState::parse(reply), Some(state), "{reply:?}");
            assert_eq!(state.to_string(), reply.trim());
        }
        for reply in ["", "exited", "exited x", "Running", "gone"] {
            assert_eq!(ProcState::parse(reply), None, "{reply:?}");
        }
        // A line the script did not write is not taken for a process.
        let jobs = parse_status("job J1 /w\nrank-0 running\nrank-1 confused\nrank-2 exited 1\n");
        let states: Vec<_> = jobs[0]
            .processes
            .iter()
            .map(|p| (p.stem.as_str(), p.state))
            .collect();
        assert_eq!(
            states,
            [
                ("rank-0", ProcState::Running),
                ("rank-2", ProcState::Exited(1))
            ]
        );
    }

    /// Runs `script` with `input` under `sh` in `dir`; returns stdout.
    fn run(dir: &std::path::Path, script: &Script, input: &[u8]) -> String {
        let out = crate::remote::run_here("sh", dir, script, input);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn start(dir: &std::path::Path, job: &JobPlan) -> String {
        let (script, input) = start_script(dir.to_str().unwrap(), job, 0, None, &[]);
        run(dir, &script, &input)
    }

    fn states(dir: &std::path::Path, job: &str) -> Vec<(String, String)> {
        let out = run(
            dir,
            &status_script(dir.to_str().unwrap(), Some(job), false),
            b"",
        );
        parse_status(&out)
            .into_iter()
            .flat_map(|j| j.processes)
            .map(|p| (p.stem, p.state.to_string()))
            .collect()
    }

    /// Polls `done` for up to 10 s.
    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The start script, run by a real `sh` in a scratch workdir, starts both processes with
    /// their environment and records how they ended, in files only the user can read.
    #[test]
    fn the_start_script_runs_detached_wrappers() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        assert_eq!(
            start(dir.path(), &job()),
            format!("started {}\n", root.display())
        );
        let jobs = dir.path().join(".fleet/jobs/J1");
        wait_for("the wrappers did not finish", || {
            jobs.join("rank-0.exit").exists() && jobs.join("rank-1.exit").exists()
        });
        let read = |f: &str| std::fs::read_to_string(jobs.join(f)).unwrap();
        assert_eq!(read("rank-0.log"), "rank 0: it's $HOME\n");
        assert_eq!(read("rank-0.exit"), "3\n");
        assert_eq!(read("rank-1.log"), "a b\n");
        assert_eq!(read("rank-1.exit"), "0\n");
        assert!(read("rank-0.start").trim().parse::<u128>().is_ok());
        assert!(read("rank-1.pid").trim().parse::<u32>().is_ok());
        assert_eq!(read("../../current-job"), "J1\n");
        assert!(
            !jobs.join("rank-0.env").exists(),
            "the environment file is removed"
        );
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&jobs), 0o700);
        assert_eq!(mode(&jobs.join("rank-0.log")), 0o600);
        assert_eq!(mode(&jobs.join("rank-0.exit")), 0o600);
    }

    /// The start script looks up the interface that reaches the master (loopback here) and
    /// each process gets it under the keys asked for, without the start script's variable.
    #[test]
    fn the_processes_get_the_interface_that_reaches_the_master() {
        let dir = tempfile::tempdir().unwrap();
        let mut job = job();
        job.processes.truncate(1);
        job.processes[0].argv = [
            "sh",
            "-c",
            "echo \"$GLOO_SOCKET_IFNAME ${NCCL_SOCKET_IFNAME-none} ${FLEET_IFACE-gone}\"",
        ]
        .map(String::from)
        .to_vec();
        let workdir = dir.path().to_str().unwrap();
        let (script, input) = start_script(workdir, &job, 0, None, &["GLOO_SOCKET_IFNAME"]);
        run(dir.path(), &script, &input);
        let jobs = dir.path().join(".fleet/jobs/J1");
        wait_for("the wrapper did not finish", || {
            jobs.join("rank-0.exit").exists()
        });
        let log = std::fs::read_to_string(jobs.join("rank-0.log")).unwrap();
        assert_eq!(log, "lo none gone\n");
    }

    #[test]
    fn the_status_script_reports_each_process() {
        let dir = tempfile::tempdir().unwrap();
        start(dir.path(), &job());
        let jobs_dir = dir.path().join(".fleet/jobs/J1");
        wait_for("the wrappers did not finish", || {
            jobs_dir.join("rank-0.exit").exists() && jobs_dir.join("rank-1.exit").exists()
        });
        std::fs::write(jobs_dir.join("rank-2.start"), "1\n").unwrap();
        let out = run(
            dir.path(),
            &status_script(dir.path().to_str().unwrap(), None, false),
            b"",
        );
        let jobs = parse_status(&out);
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].job_id, "J1");
        assert_eq!(
            states(dir.path(), "J1"),
            [
                ("rank-0".to_string(), "exited 3".to_string()),
                ("rank-1".to_string(), "exited 0".to_string()),
                ("rank-2".to_string(), "lost".to_string())
            ]
        );
        assert_eq!(label_of("rank-12"), "12");
        assert_eq!(label_of("node-2"), "n2");
    }

    /// A second job is refused while the first runs, before it writes anything of its own.
    #[test]
    fn a_busy_workdir_refuses_a_second_job_and_gets_no_folder_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = escaping_job("J4", "x");
        first.processes[0].argv = ["sh", "-c", "exec sleep 30"].map(String::from).to_vec();
        start(dir.path(), &first);
        let mut second = job();
        second.job_id = "J5".into();
        let (script, input) = start_script(dir.path().to_str().unwrap(), &second, 0, None, &[]);
        let out = crate::remote::run_here("sh", dir.path(), &script, &input);
        assert_eq!(out.status.code(), Some(BUSY as i32));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "busy J4\n");
        assert!(!dir.path().join(".fleet/jobs/J5").exists());
        let workdir = dir.path().to_str().unwrap();
        run(
            dir.path(),
            &signal_script(workdir, "J4", &["rank-0".to_string()], Signal::Kill),
            b"",
        );
        wait_for("J4 did not end", || {
            dir.path().join(".fleet/jobs/J4/rank-0.exit").exists()
        });
    }

    /// A job stopped before its wrappers started its processes: none starts, each records 143
    /// and leaves an empty log (the followers read logs until the exit).
    #[test]
    fn a_job_stopped_before_it_started_starts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = dir.path().join(".fleet/jobs/J1");
        std::fs::create_dir_all(&jobs).unwrap();
        std::fs::write(jobs.join("stopping"), "").unwrap();
        start(dir.path(), &job());
        wait_for("the wrappers did not finish", || {
            jobs.join("rank-0.exit").exists() && jobs.join("rank-1.exit").exists()
        });
        for stem in ["rank-0", "rank-1"] {
            let read =
                |ext: &str| std::fs::read_to_string(jobs.join(format!("{stem}.{ext}"))).unwrap();
            assert_eq!(read("exit"), "143\n");
            assert_eq!(read("log"), "", "{stem} ran");
            assert!(!jobs.join(format!("{stem}.env")).exists());
        }
    }

    /// A job of one process that starts a child in a session of its own (as torchrun starts
    /// its workers), which ignores SIGTERM, then exits.
    fn escaping_job(id: &str, secret: &str) -> JobPlan {
        let mut job = job();
        job.job_id = id.into();
        job.processes.truncate(1);
        job.processes[0]
            .env
            .insert("FLEET_JOB_ID".into(), id.into());
        job.processes[0]
            .env
            .insert("HF_TOKEN".into(), secret.into());
        job.processes[0].argv = ["sh", "-c", "setsid sh -c 'trap \"\" TERM; echo $$ > worker.pid; while :; do sleep 0.05; done' & exit 0"]
            .map(String::from)
            .to_vec();
        job
    }

    /// The worker has left the process's group and session, yet the process counts as running
    /// while it lives, TERM reaches it, and KILL ends it; its exit is recorded only then.
    #[test]
    fn processes_that_leave_the_group_are_found_and_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let secret = "hf_secret_in_env_123";
        let job = escaping_job("J2", secret);
        start(dir.path(), &job);
        let worker_file = dir.path().join("worker.pid");
        wait_for("the worker did not start", || {
            std::fs::read_to_string(&worker_file).is_ok_and(|s| s.ends_with('\n'))
        });
        let worker: u32 = std::fs::read_to_string(&worker_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let alive = || {
            std::fs::read_to_string(format!("/proc/{worker}/stat"))
                .is_ok_and(|s| !s.rsplit(") ").next().unwrap_or("").starts_with('Z'))
        };
        // The main command exited, the worker lives on: still running.
        assert_eq!(
            states(dir.path(), "J2"),
            [("rank-0".to_string(), "running".to_string())]
        );
        // No command line on this machine holds the secret.
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
                assert!(
                    !String::from_utf8_lossy(&cmdline).contains(secret),
                    "{:?} shows the secret",
                    entry.path()
                );
            }
        }
        let workdir = dir.path().to_str().unwrap();
        let stems = ["rank-0".to_string()];
        run(
            dir.path(),
            &signal_script(workdir, "J2", &stems, Signal::Term),
            b"",
        );
        assert!(alive(), "the worker ignores TERM");
        run(
            dir.path(),
            &signal_script(workdir, "J2", &stems, Signal::Kill),
            b"",
        );
        wait_for("the worker survived KILL", || !alive());
        wait_for("no exit was recorded", || {
            dir.path().join(".fleet/jobs/J2/rank-0.exit").exists()
        });
        assert_eq!(
            states(dir.path(), "J2"),
            [("rank-0".to_string(), "exited 0".to_string())]
        );
    }

    /// A process whose wrapper died without a word, whose recorded pids now belong to other
    /// processes (here this test's own), is lost and nothing is signalled; so is every process
    /// of an earlier boot.
    #[test]
    fn stale_pids_are_never_signalled() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = dir.path().join(".fleet/jobs/J3");
        std::fs::create_dir_all(&jobs).unwrap();
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
        std::fs::write(jobs.join("boot_id"), &boot).unwrap();
        // A live process with this pid, but another start time: a reused pid.
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = other.id();
        std::fs::write(jobs.join("rank-0.start"), "1\n").unwrap();
        std::fs::write(jobs.join("rank-0.wrapper"), format!("{pid} 1\n")).unwrap();
        std::fs::write(jobs.join("rank-0.pid"), format!("{pid}\n")).unwrap();
        assert_eq!(
            states(dir.path(), "J3"),
            [("rank-0".to_string(), "lost".to_string())]
        );
        let workdir = dir.path().to_str().unwrap();
        run(
            dir.path(),
            &signal_script(workdir, "J3", &["rank-0".to_string()], Signal::Kill),
            b"",
        );
        assert!(
            other.try_wait().unwrap().is_none(),
            "an unrelated process was killed"
        );
        // The same with the right start time but another boot: lost too.
        std::fs::write(jobs.join("boot_id"), "another-boot\n").unwrap();
        let out = run(
            dir.path(),
            &Script::new("starttime \"$1\"")
                .using(remote::JOB_LIB)
                .arg(pid.to_string()),
            b"",
        );
        std::fs::write(jobs.join("rank-0.wrapper"), format!("{pid} {out}")).unwrap();
        assert_eq!(
            states(dir.path(), "J3"),
            [("rank-0".to_string(), "lost".to_string())]
        );
        std::fs::write(jobs.join("boot_id"), &boot).unwrap();
        assert_eq!(
            states(dir.path(), "J3"),
            [("rank-0".to_string(), "running".to_string())]
        );
        other.kill().unwrap();
        other.wait().unwrap();
    }

    #[test]
    fn stems_name_ranks_and_nodes() {
        let mut p = job().processes[0].clone();
        assert_eq!(stem(&p), "rank-0");
        p.label = "n2".into();
        assert_eq!(stem(&p), "node-2");
    }
}
