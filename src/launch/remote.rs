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
    fn stems_name_ranks_and_nodes() {
        let mut p = job().processes[0].clone();
        assert_eq!(stem(&p), "rank-0");
        p.label = "n2".into();
        assert_eq!(stem(&p), "node-2");
    }
}
