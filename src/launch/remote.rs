//! The job directory on a host and the shell that drives it.
//!
//! `<workdir>/.fleet/jobs/<job>/` holds, per process, `<stem>.log` (its output), `.pid` (its
//! process group), `.start` (when it started, ns) and `.exit` (how it ended). A process is
//! started by a detached wrapper (`setsid -f`: its own session, stdio to files) which starts the
//! command in a process group of its own, waits for it and writes its exit status. Because the
//! wrapper is outside that group, stopping the group still records how the process ended; and
//! because nothing is attached to the SSH channel, a lost laptop loses nothing.
//!
//! While any wrapper lives it holds a shared `flock` on `.fleet/job.lock`: a second job in the
//! same workdir is refused, and the name of the running one read from `.fleet/current-job`.

use std::collections::BTreeMap;

use super::plan::{JobPlan, Process};
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

/// The shell script that starts host `host`'s processes of `job`, run with `sh -c`. It prints
/// `busy <job>` (exit 75) when another job runs there, or `started` once every wrapper is off.
pub fn start_script(
    workdir: &str,
    job: &JobPlan,
    host: usize,
    extra_env: &BTreeMap<String, String>,
) -> String {
    let dir = job_dir(&job.job_id);
    let mut script = format!(
        "cd -- {workdir} 2>/dev/null || {{ echo \"no workdir\"; exit {NO_WORKDIR}; }}\n\
         mkdir -p {dir} || exit 1\n\
         exec 9>>.fleet/job.lock\n\
         if ! flock -n -x 9; then printf 'busy %s\\n' \"$(cat .fleet/current-job 2>/dev/null)\"; exit {BUSY}; fi\n\
         printf '%s\\n' {job} > .fleet/current-job\n\
         flock -s 9\n",
        job = quote(&job.job_id),
    );
    for process in job.on_host(host) {
        let wrapper = wrapper_script(&dir, process, extra_env);
        script.push_str(&format!(
            "setsid -f sh -c {} fleet-rank </dev/null >/dev/null 2>&1\n",
            quote(&wrapper)
        ));
    }
    script.push_str("echo started\n");
    script
}

/// The wrapper of one process: environment, start time, the command in its own process group,
/// then its exit status (written under a temporary name and renamed, so it is never half read).
fn wrapper_script(dir: &str, process: &Process, extra_env: &BTreeMap<String, String>) -> String {
    let stem = format!("{dir}/{}", stem(process));
    let mut env = extra_env.clone();
    env.extend(process.env.clone());
    let exports: Vec<String> = env
        .iter()
        .map(|(k, v)| format!("{k}={}", quote(v)))
        .collect();
    let argv: Vec<String> = process.argv.iter().map(|a| quote(a)).collect();
    format!(
        "export {exports}\n\
         date +%s%N > {stem}.start\n\
         setsid -w sh -c 'echo $$ > \"$0\"; exec \"$@\"' {stem}.pid {argv} <\"/dev/null\" >{stem}.log 2>&1 9>&- &\n\
         wait $!\n\
         echo $? > {stem}.exit.tmp && mv -f {stem}.exit.tmp {stem}.exit\n",
        exports = exports.join(" "),
        argv = argv.join(" "),
        stem = quote(&stem),
    )
}

/// Sends `signal` to the process group of every process of the job on this host that has not
/// ended (`kill -SIG -PGID`: dash, Debian's sh, has no `--` in kill). A process whose pid file is not written yet (it is starting) is waited for briefly.
pub fn signal_script(workdir: &str, job_id: &str, stems: &[String], signal: &str) -> String {
    let stems: Vec<String> = stems.iter().map(|s| quote(s)).collect();
    format!(
        "cd -- {workdir}/{dir} 2>/dev/null || exit 0\n\
         for s in {stems}; do\n\
           [ -e \"$s.exit\" ] && continue\n\
           n=0; while [ ! -s \"$s.pid\" ] && [ ! -e \"$s.exit\" ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done\n\
           [ -s \"$s.pid\" ] && kill -{signal} -\"$(cat \"$s.pid\")\" 2>/dev/null\n\
         done\n\
         exit 0\n",
        dir = quote(&job_dir(job_id)),
        stems = stems.join(" "),
    )
}

/// How a process of a job stands on its host.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ProcessState {
    pub stem: String,
    /// "running", "exited N", or "lost" (no exit recorded and its process group is gone).
    pub state: String,
}

/// A job as one host knows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct JobState {
    pub job_id: String,
    /// The job folder's absolute path on the host.
    pub dir: String,
    pub processes: Vec<ProcessState>,
}

/// Reports jobs in a workdir: `job` itself, or the current (latest) one, or with `all` the
/// last ten. Prints `job ID DIR` then `STEM STATE` lines per job.
pub fn status_script(workdir: &str, job: Option<&str>, all: bool) -> String {
    let select = match (job, all) {
        (Some(job), _) => format!("jobs={}", quote(job)),
        (None, true) => "jobs=$(ls -1 jobs 2>/dev/null | tail -n 10)".to_string(),
        (None, false) => "jobs=$(cat current-job 2>/dev/null)".to_string(),
    };
    format!(
        "cd -- {workdir}/.fleet 2>/dev/null || exit 0\n\
         {select}\n\
         for j in $jobs; do\n\
           [ -d \"jobs/$j\" ] || continue\n\
           printf 'job %s %s\\n' \"$j\" \"$(cd \"jobs/$j\" && pwd -P)\"\n\
           for f in \"jobs/$j\"/*.start; do\n\
             [ -e \"$f\" ] || continue\n\
             s=${{f%.start}}\n\
             if [ -e \"$s.exit\" ]; then st=\"exited $(cat \"$s.exit\")\"\n\
             elif [ -s \"$s.pid\" ] && kill -0 -\"$(cat \"$s.pid\")\" 2>/dev/null; then st=running\n\
             else st=lost; fi\n\
             printf '%s %s\\n' \"${{s##*/}}\" \"$st\"\n\
           done\n\
         done\n"
    )
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
        } else if let (Some(job), Some((stem, state))) = (jobs.last_mut(), line.split_once(' ')) {
            job.processes.push(ProcessState {
                stem: stem.to_string(),
                state: state.to_string(),
            });
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
    let script = format!(
        "a={addr}\n\
         case $a in *[!0-9.:]*) a=$(getent hosts \"$a\" | awk '{{print $1; exit}}') ;; esac\n\
         i=$(ip -o addr show to \"$a\" 2>/dev/null | awk '{{print $2; exit}}')\n\
         [ -n \"$i\" ] || i=$(ip -o route get \"$a\" 2>/dev/null | sed -n 's/.* dev \\([^ ]*\\).*/\\1/p')\n\
         printf '%s' \"$i\"",
        addr = quote(addr)
    );
    match session.capture(&crate::shell::sh(&script)).await {
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

    /// The start script, run by a real `sh` in a scratch workdir, starts both processes with
    /// their environment, records how they ended, and refuses a second job while they run.
    #[test]
    fn the_start_script_runs_detached_wrappers() {
        let dir = tempfile::tempdir().unwrap();
        let workdir = dir.path().to_str().unwrap();
        let script = start_script(&quote(workdir), &job(), 0, &BTreeMap::new());
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "started\n",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let jobs = dir.path().join(".fleet/jobs/J1");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !(jobs.join("rank-0.exit").exists() && jobs.join("rank-1.exit").exists()) {
            assert!(
                std::time::Instant::now() < deadline,
                "the wrappers did not finish"
            );
            std::thread::yield_now();
        }
        let read = |f: &str| std::fs::read_to_string(jobs.join(f)).unwrap();
        assert_eq!(read("rank-0.log"), "rank 0: it's $HOME\n");
        assert_eq!(read("rank-0.exit"), "3\n");
        assert_eq!(read("rank-1.log"), "a b\n");
        assert_eq!(read("rank-1.exit"), "0\n");
        assert!(read("rank-0.start").trim().parse::<u128>().is_ok());
        assert!(read("rank-1.pid").trim().parse::<u32>().is_ok());
        assert_eq!(read("../../current-job"), "J1\n");
    }

    #[test]
    fn the_status_script_reports_each_process() {
        let dir = tempfile::tempdir().unwrap();
        let workdir = dir.path().to_str().unwrap();
        let script = start_script(&quote(workdir), &job(), 0, &BTreeMap::new());
        std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        let jobs_dir = dir.path().join(".fleet/jobs/J1");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !(jobs_dir.join("rank-0.exit").exists() && jobs_dir.join("rank-1.exit").exists()) {
            assert!(std::time::Instant::now() < deadline);
            std::thread::yield_now();
        }
        std::fs::write(jobs_dir.join("rank-2.start"), "1\n").unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(status_script(&quote(workdir), None, false))
            .output()
            .unwrap();
        let jobs = parse_status(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].job_id, "J1");
        let states: Vec<(&str, &str)> = jobs[0]
            .processes
            .iter()
            .map(|p| (p.stem.as_str(), p.state.as_str()))
            .collect();
        assert_eq!(
            states,
            [
                ("rank-0", "exited 3"),
                ("rank-1", "exited 0"),
                ("rank-2", "lost")
            ]
        );
        assert_eq!(label_of("rank-12"), "12");
        assert_eq!(label_of("node-2"), "n2");
    }

    #[test]
    fn stems_name_ranks_and_nodes() {
        let mut p = job().processes[0].clone();
        assert_eq!(stem(&p), "rank-0");
        p.label = "n2".into();
        assert_eq!(stem(&p), "node-2");
    }
}
