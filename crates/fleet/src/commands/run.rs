//! `fleet run [-- CMD ...]`: sync, start every process of the job at once, follow their logs as
//! one, and stop everything when one fails or the user presses Ctrl-C.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use futures::FutureExt;
use futures::future::{BoxFuture, join_all};
use serde::Serialize;
use tokio::sync::mpsc;

use super::Fleet;
use crate::cli::RunArgs;
use crate::exit_code::{ExitCode, UsageError};
use crate::inventory::Inventory;
use crate::launch::follow::{Event, Followed, follow_host};
use crate::launch::remote::{BUSY, NO_WORKDIR, job_dir, start_script, stem};
use crate::launch::supervise::{Outcome, Supervisor};
use crate::launch::{JobPlan, Mode, new_job_id, plan};
use crate::preflight::Needs;
use crate::ssh::{ExitStatus, Session};

/// `runs/<job>/summary.json`.
#[derive(Serialize)]
struct Summary<'a> {
    job_id: &'a str,
    command: &'a [String],
    mode: Mode,
    hosts: &'a [String],
    plan: &'a JobPlan,
    outcome: &'a Outcome,
    exit_code: u8,
}

pub async fn run(fleet: &Fleet, args: &RunArgs) -> Result<ExitCode> {
    let inventory = fleet.inventory()?;
    let command = if !args.command.is_empty() {
        args.command.clone()
    } else if let Some(command) = &inventory.run_command {
        command.clone()
    } else {
        return Err(UsageError(format!(
            "no command to run: give one after `--` (fleet run -- python3 train.py) or set [run].command in {}",
            inventory.path.display()
        ))
        .into());
    };
    let mode = if args.torchrun {
        Mode::Torchrun
    } else if args.accelerate {
        Mode::Accelerate
    } else {
        Mode::Ranks
    };
    if mode == Mode::Accelerate {
        if let Some(reason) = crate::launch::plan::uneven_for_accelerate(&inventory) {
            return Err(UsageError(reason).into());
        }
    }
    if !args.no_sync {
        let code = match fleet
            .unless_interrupted(super::sync::before_run(fleet))
            .await?
        {
            Ok(code) => code,
            Err(interrupted) => return Ok(interrupted),
        };
        if code != ExitCode::Success {
            fleet
                .printer
                .error("the sync failed; nothing was started (--no-sync starts without syncing)");
            return Ok(code);
        }
    }

    if !args.no_check {
        let code = check_before_start(fleet, &inventory, mode, &command).await?;
        if code != ExitCode::Success {
            if code != ExitCode::Interrupted {
                fleet
                    .printer
                    .error("the check failed; nothing was started (--no-check starts anyway)");
            }
            return Ok(code);
        }
    }
    let job_id = new_job_id();
    let runs = inventory.sync.source.join("runs").join(&job_id);
    if args.max_restarts == 0 {
        let attempt = Attempt {
            number: None,
            run_id: job_id.clone(),
            remote_id: job_id,
            run_dir: runs,
        };
        return Ok(start(fleet, args, &inventory, &command, mode, &attempt)
            .await?
            .code);
    }
    restart_loop(fleet, args, &inventory, &command, mode, &job_id, &runs).await
}

/// One start of the job: which attempt, its id on the hosts, and where its logs go.
struct Attempt {
    /// None without --max-restarts (the job runs once, exactly as it always did).
    number: Option<u32>,
    /// The job's id, the same for every attempt.
    run_id: String,
    remote_id: String,
    run_dir: PathBuf,
}

/// How an attempt ended.
struct Ended {
    code: ExitCode,
    /// None when the job never started (a host unreachable or refusing) or was detached.
    outcome: Option<Outcome>,
    reason: Option<String>,
}

/// One line of runs/<job>/summary.json with --max-restarts.
#[derive(Serialize)]
struct AttemptRecord {
    attempt: u32,
    hosts: Vec<String>,
    exit_code: u8,
    reason: Option<String>,
    trained_to: Option<u64>,
    resumed_from: Option<u64>,
}

/// Checks the hosts before a start: `Success` when they pass, else the code to end with.
async fn check_before_start(
    fleet: &Fleet,
    inventory: &Inventory,
    mode: Mode,
    command: &[String],
) -> Result<ExitCode> {
    let checked = super::check::before_run(fleet, inventory, Needs::of(mode, command));
    Ok(fleet
        .unless_interrupted(checked)
        .await?
        .unwrap_or_else(|interrupted| interrupted))
}

/// Runs the job, and after a failure stops it, checks the hosts again and starts it anew, up to
/// --max-restarts times; hosts that stay unreachable are left out while --min-hosts allows.
async fn restart_loop(
    fleet: &Fleet,
    args: &RunArgs,
    inventory: &Inventory,
    command: &[String],
    mode: Mode,
    job_id: &str,
    runs: &Path,
) -> Result<ExitCode> {
    let mut current = inventory.clone();
    let mut records: Vec<AttemptRecord> = Vec::new();
    let mut code = ExitCode::Success;
    for number in 0..=args.max_restarts {
        if number > 0 {
            match hosts_for_restart(fleet, args, &current, mode, command).await? {
                Ok(hosts) => current = hosts,
                Err(stopped) => {
                    code = stopped;
                    break;
                }
            }
        }
        let attempt = Attempt::numbered(job_id, runs, number);
        let ended = start(fleet, args, &current, command, mode, &attempt).await?;
        code = ended.code;
        records.push(AttemptRecord::of(number, &current, &ended));
        if !worth_restarting(&ended) || number == args.max_restarts {
            break;
        }
        if let Some(interrupted) = pause_before_restart(fleet, args, number, ended.reason).await {
            code = interrupted;
            break;
        }
    }
    report_restarts(fleet, job_id, command, runs, code, &records);
    Ok(code)
}

impl Attempt {
    /// Attempt `number` of job `job_id` with --max-restarts: its id on the hosts gains `-rN`
    /// after the first, and its logs go to `runs/attempt-N`.
    fn numbered(job_id: &str, runs: &Path, number: u32) -> Attempt {
        Attempt {
            number: Some(number),
            run_id: job_id.to_string(),
            remote_id: if number == 0 {
                job_id.to_string()
            } else {
                format!("{job_id}-r{number}")
            },
            run_dir: runs.join(format!("attempt-{number}")),
        }
    }
}

impl AttemptRecord {
    fn of(attempt: u32, inventory: &Inventory, ended: &Ended) -> AttemptRecord {
        AttemptRecord {
            attempt,
            hosts: inventory.hosts.iter().map(|h| h.name.clone()).collect(),
            exit_code: ended.code.code(),
            reason: ended.reason.clone(),
            trained_to: ended.outcome.as_ref().and_then(|o| o.trained_to),
            resumed_from: ended.outcome.as_ref().and_then(|o| o.resumed_from),
        }
    }
}

/// Says why the job restarts and waits --restart-delay; a Ctrl-C meanwhile ends the job
/// instead, with its exit code returned.
async fn pause_before_restart(
    fleet: &Fleet,
    args: &RunArgs,
    number: u32,
    reason: Option<String>,
) -> Option<ExitCode> {
    let reason = reason.unwrap_or_else(|| "the job could not start".into());
    fleet.printer.warn(&format!(
        "===== restart {} of {} in {}s: {reason} =====",
        number + 1,
        args.max_restarts,
        args.restart_delay
    ));
    tokio::select! {
        () = tokio::time::sleep(Duration::from_secs(args.restart_delay)) => None,
        () = fleet.interrupts.any() => {
            fleet.printer.warn("interrupted: no restart");
            Some(ExitCode::Interrupted)
        }
    }
}

/// The job's last line across its attempts, and runs/<job>/summary.json with one record each.
fn report_restarts(
    fleet: &Fleet,
    job_id: &str,
    command: &[String],
    runs: &Path,
    code: ExitCode,
    records: &[AttemptRecord],
) {
    let restarts = records.len().saturating_sub(1);
    // Steps trained again: from where each attempt resumed back to where the one before it got.
    let redone: u64 = records
        .windows(2)
        .map(|w| {
            w[0].trained_to
                .unwrap_or(0)
                .saturating_sub(w[1].resumed_from.unwrap_or(0))
        })
        .sum();
    let reasons: Vec<&str> = records.iter().filter_map(|r| r.reason.as_deref()).collect();
    let mut text = format!(
        "job {job_id}: exit {} after {restarts} restart(s)",
        code.code()
    );
    if restarts > 0 {
        text.push_str(&format!(" ({})", reasons.join("; ")));
        if records.iter().any(|r| r.trained_to.is_some()) {
            text.push_str(&format!("; {redone} step(s) trained again"));
        }
    }
    fleet
        .printer
        .info(&format!("{text}; logs in {}", runs.display()));
    match crate::files::create_private_dir(runs) {
        Ok(()) => {
            let summary = serde_json::json!({
                "job_id": job_id, "command": command, "restarts": restarts,
                "steps_trained_again": redone, "exit_code": code.code(), "attempts": records,
            });
            write_summary(fleet, &runs.join("summary.json"), &summary);
        }
        Err(e) => fleet
            .printer
            .warn(&format!("could not write {}: {e}", runs.display())),
    }
}

/// Whether an attempt that ended so is started again (restarts permitting): not after a
/// success, a Ctrl-C, or when every process of the job exited 0 whatever else went wrong (a
/// host lost once the work was done): its result stands.
fn worth_restarting(ended: &Ended) -> bool {
    if ended.code == ExitCode::Success {
        return false;
    }
    match &ended.outcome {
        Some(outcome) => {
            let finished = !outcome.exits.is_empty() && outcome.exits.iter().all(|e| *e == Some(0));
            !outcome.interrupted && !finished
        }
        None => true,
    }
}

/// The hosts to restart on: those of `inventory` that can be reached now and pass the check,
/// or the code the job ends with (fewer than --min-hosts left, a failed check, a Ctrl-C).
async fn hosts_for_restart(
    fleet: &Fleet,
    args: &RunArgs,
    inventory: &Inventory,
    mode: Mode,
    command: &[String],
) -> Result<std::result::Result<Inventory, ExitCode>> {
    let min_hosts = args.min_hosts.unwrap_or(inventory.hosts.len()).max(1);
    let reachable = fleet.unless_interrupted(reachable_hosts(fleet, inventory, min_hosts));
    let hosts = match reachable.await? {
        Ok(Some(hosts)) => hosts,
        Ok(None) => return Ok(Err(ExitCode::Unreachable)),
        Err(interrupted) => return Ok(Err(interrupted)),
    };
    if !args.no_check {
        let code = check_before_start(fleet, &hosts, mode, command).await?;
        if code != ExitCode::Success {
            if code != ExitCode::Interrupted {
                fleet.printer.error("the check failed: no restart");
            }
            return Ok(Err(code));
        }
    }
    Ok(Ok(hosts))
}

/// The hosts of `inventory` that can be reached now, or `None` (said on stderr) when fewer
/// than `min_hosts` are.
async fn reachable_hosts(
    fleet: &Fleet,
    inventory: &Inventory,
    min_hosts: usize,
) -> Result<Option<Inventory>> {
    let (_, connected) = fleet.connect_all(inventory).await?;
    let mut kept = inventory.clone();
    kept.hosts.clear();
    let mut gone = Vec::new();
    for (result, host) in connected.into_iter().zip(&inventory.hosts) {
        match result {
            Ok(session) => {
                session.close().await;
                kept.hosts.push(host.clone());
            }
            Err(e) => gone.push(format!("{} ({e})", host.name)),
        }
    }
    if gone.is_empty() {
        return Ok(Some(kept));
    }
    if kept.hosts.len() < min_hosts {
        fleet.printer.error(&format!(
            "no restart: {} cannot be reached and {} host(s) are left, fewer than --min-hosts {min_hosts}",
            gone.join(", "),
            kept.hosts.len()
        ));
        return Ok(None);
    }
    fleet.printer.warn(&format!(
        "{} cannot be reached: restarting on the other {} host(s)",
        gone.join(", "),
        kept.hosts.len()
    ));
    Ok(Some(kept))
}

/// Starts every process of the job on `inventory`'s hosts and supervises them to the end:
/// connect, plan, launch, follow, supervise, then the summary.
async fn start(
    fleet: &Fleet,
    args: &RunArgs,
    inventory: &Inventory,
    command: &[String],
    mode: Mode,
    attempt: &Attempt,
) -> Result<Ended> {
    let Some((addresses, sessions)) = connect_every_host(fleet, inventory).await? else {
        return Ok(Ended {
            code: ExitCode::Unreachable,
            outcome: None,
            reason: Some("a host could not be reached".into()),
        });
    };
    let job = plan_attempt(
        inventory,
        &addresses,
        command,
        mode,
        attempt,
        args.max_restarts,
    );
    let roots = launch(fleet, inventory, &sessions, &job).await;
    let refused = roots.iter().any(Option::is_none);
    if args.detach && !refused {
        let job_id = &job.job_id;
        fleet
            .printer
            .write(crate::output::Stream::Stdout, &format!("{job_id}\n"));
        fleet.printer.info(&format!("job {job_id} started; follow it with `fleet logs -f {job_id}`, stop it with `fleet stop {job_id}`"));
        close_all(sessions).await;
        return Ok(Ended {
            code: ExitCode::Success,
            outcome: None,
            reason: None,
        });
    }
    let run_dir = keep_logs_in(fleet, &attempt.run_dir);
    fleet.printer.info(&format!(
        "job {}: {} processes on {} hosts, MASTER_ADDR {}:{}",
        job.job_id,
        job.processes.len(),
        sessions.len(),
        job.master_addr,
        job.master_port
    ));
    let host_names: Vec<String> = inventory.hosts.iter().map(|h| h.name.clone()).collect();
    let (events, receiver) = mpsc::channel(1024);
    let (followers, followed) = follow(fleet, &sessions, &host_names, &job, &roots, &events).await;
    drop(events);
    // A host that refused, or that cannot be followed, stops whatever did start at once.
    let refused = refused || followed.iter().any(|f| !f);
    let workdirs: Vec<String> = inventory.hosts.iter().map(|h| h.workdir.clone()).collect();
    let supervisor = Supervisor {
        printer: &fleet.printer,
        job: &job,
        host_names: &host_names,
        sessions: &sessions,
        workdirs: &workdirs,
        grace: Duration::from_secs(args.grace),
        timestamps: args.timestamps,
        run_dir,
        followed,
        interrupts: &fleet.interrupts,
    };
    let outcome = supervise(&supervisor, receiver, followers, refused).await;
    let ended = conclude(fleet, &supervisor, command, outcome, refused);
    close_all(sessions).await;
    Ok(ended)
}

/// A session to every host, with each host's address, or `None` once every host that cannot
/// be reached has been named.
async fn connect_every_host(
    fleet: &Fleet,
    inventory: &Inventory,
) -> Result<Option<(Vec<String>, Vec<Session>)>> {
    let (targets, connected) = fleet.connect_all(inventory).await?;
    let mut sessions = Vec::with_capacity(connected.len());
    let mut unreachable = false;
    for result in connected {
        match result {
            Ok(s) => sessions.push(s),
            Err(e) => {
                fleet.printer.error(&format!("{e}; nothing was started"));
                unreachable = true;
            }
        }
    }
    if unreachable {
        close_all(sessions).await;
        return Ok(None);
    }
    Ok(Some((
        targets.into_iter().map(|t| t.addr).collect(),
        sessions,
    )))
}

/// The job's plan for this attempt: fleet-train resumes only checkpoints of its own run
/// (`FLEET_RUN_ID`), and with --max-restarts every process learns which attempt it is.
fn plan_attempt(
    inventory: &Inventory,
    addresses: &[String],
    command: &[String],
    mode: Mode,
    attempt: &Attempt,
    max_restarts: u32,
) -> JobPlan {
    let mut job = plan(inventory, addresses, command, mode, &attempt.remote_id);
    for process in &mut job.processes {
        let env = &mut process.env;
        env.insert("FLEET_RUN_ID".into(), attempt.run_id.clone());
        if let Some(number) = attempt.number {
            env.insert("FLEET_RESTART_COUNT".into(), number.to_string());
            env.insert("FLEET_MAX_RESTARTS".into(), max_restarts.to_string());
            if mode == Mode::Ranks {
                env.insert("TORCHELASTIC_RESTART_COUNT".into(), number.to_string());
            }
        }
    }
    job
}

/// Starts each host's processes; per host, the workdir's absolute path where they started,
/// or `None` where the host refused (named on stderr: busy, no workdir, a failed script).
async fn launch(
    fleet: &Fleet,
    inventory: &Inventory,
    sessions: &[Session],
    job: &JobPlan,
) -> Vec<Option<String>> {
    let starts = join_all(sessions.iter().enumerate().map(|(i, session)| {
        let host = &inventory.hosts[i];
        // Gloo and NCCL bind to whatever the host name resolves to, often 127.0.1.1: name the
        // interface that reaches the master instead, unless the user did.
        let interface_keys: Vec<&str> = ["GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"]
            .into_iter()
            .filter(|key| !host.env.contains_key(*key))
            .collect();
        let activate = host.activate.as_deref();
        let (script, input) = start_script(&host.workdir, job, i, activate, &interface_keys);
        async move { session.capture_with_input(&script, &input).await }
    }))
    .await;
    let started = starts.into_iter().zip(&inventory.hosts);
    started
        .map(|(result, host)| {
            let (name, workdir) = (&host.name, &host.workdir);
            let refusal = match result {
                Ok((ExitStatus::Code(0), out, _)) => {
                    // The start script says where the workdir is (SFTP does not expand `~`).
                    let out = String::from_utf8_lossy(&out);
                    return Some(out.trim().trim_start_matches("started ").to_string());
                }
                Ok((ExitStatus::Code(BUSY), out, _)) => {
                    let running = String::from_utf8_lossy(&out);
                    let running = running.trim().trim_start_matches("busy ");
                    format!(
                        "{name}: job {running} is still running in {workdir} (fleet stop, or wait for it)"
                    )
                }
                Ok((ExitStatus::Code(NO_WORKDIR), _, _)) => {
                    format!("{name}: workdir {workdir} does not exist (run fleet sync)")
                }
                Ok((status, _, err)) => format!(
                    "{name}: could not start the job ({status:?}): {}",
                    String::from_utf8_lossy(&err).trim()
                ),
                Err(e) => e.to_string(),
            };
            fleet.printer.error(&refusal);
            None
        })
        .collect()
}

/// Where this attempt's logs are kept locally, if that folder can be made.
fn keep_logs_in(fleet: &Fleet, dir: &Path) -> Option<PathBuf> {
    match crate::files::create_private_dir(dir) {
        Ok(()) => Some(dir.to_path_buf()),
        Err(e) => {
            fleet
                .printer
                .warn(&format!("cannot keep logs in {}: {e}", dir.display()));
            None
        }
    }
}

/// One follower per host that started (`roots`), and per host whether it is followed. A host
/// that cannot be followed (no SFTP) is named: the job is then stopped, never left running
/// unsupervised.
async fn follow(
    fleet: &Fleet,
    sessions: &[Session],
    host_names: &[String],
    job: &JobPlan,
    roots: &[Option<String>],
    events: &mpsc::Sender<Event>,
) -> (Vec<BoxFuture<'static, ()>>, Vec<bool>) {
    let mut followers = Vec::new();
    let mut followed = vec![false; sessions.len()];
    for (i, session) in sessions.iter().enumerate() {
        let Some(root) = &roots[i] else { continue };
        let sftp = match session.sftp().await {
            Ok(sftp) => sftp,
            Err(e) => {
                fleet.printer.error(&format!(
                    "{}: cannot follow the job's logs ({e}); stopping the job",
                    host_names[i]
                ));
                continue;
            }
        };
        let processes = job
            .on_host(i)
            .map(|p| Followed {
                process: p.index,
                stem: stem(p),
                offset: 0,
                until_exit: true,
            })
            .collect();
        let dir = format!("{root}/{}", job_dir(&job.job_id));
        followers.push(follow_host(sftp, i, dir, processes, events.clone()).boxed());
        followed[i] = true;
    }
    (followers, followed)
}

/// Supervises the job to its end while the followers read its logs; `stop_first` when a
/// host refused, so whatever did start is stopped at once.
async fn supervise(
    supervisor: &Supervisor<'_>,
    events: mpsc::Receiver<Event>,
    followers: Vec<BoxFuture<'static, ()>>,
    stop_first: bool,
) -> Outcome {
    let supervised = supervisor.run(events, stop_first);
    tokio::pin!(supervised);
    let mut followed = join_all(followers);
    let mut followers_done = false;
    let outcome = loop {
        tokio::select! {
            outcome = &mut supervised => break outcome,
            _ = &mut followed, if !followers_done => followers_done = true,
        }
    };
    // A process that vanished has no exit file its follower could wait for: the followers
    // get a moment to finish reading, then are dropped.
    if !followers_done {
        let _ = tokio::time::timeout(Duration::from_secs(2), followed).await;
    }
    outcome
}

/// The attempt's exit code and reason, its summary.json and its last line.
fn conclude(
    fleet: &Fleet,
    supervisor: &Supervisor<'_>,
    command: &[String],
    outcome: Outcome,
    refused: bool,
) -> Ended {
    let job = supervisor.job;
    let (code, reason) = if refused {
        let reason = "a host refused to start the job".to_string();
        (ExitCode::Failure.code(), Some(reason))
    } else {
        (outcome.exit_code(), supervisor.reason(&outcome))
    };
    if let Some(dir) = &supervisor.run_dir {
        let summary = Summary {
            job_id: &job.job_id,
            command,
            mode: job.mode,
            hosts: supervisor.host_names,
            plan: job,
            outcome: &outcome,
            exit_code: code,
        };
        write_summary(fleet, &dir.join("summary.json"), &summary);
    }
    let skew = outcome
        .start_skew_ms
        .map_or(String::new(), |ms| format!(", start skew {ms:.1} ms"));
    let logs = supervisor
        .run_dir
        .as_ref()
        .map_or_else(|| "(none)".to_string(), |d| d.display().to_string());
    fleet.printer.info(&format!(
        "job {}: exit {code} after {:.1}s{skew}; logs in {logs}",
        job.job_id, outcome.seconds
    ));
    Ended {
        code: ExitCode::Exact(code),
        outcome: Some(outcome),
        reason,
    }
}

/// Writes `summary` as JSON to `path`; a failure is said, not kept quiet.
fn write_summary(fleet: &Fleet, path: &Path, summary: &impl Serialize) {
    let written = serde_json::to_vec_pretty(summary)
        .map_err(std::io::Error::from)
        .and_then(|json| std::fs::write(path, json));
    if let Err(e) = written {
        fleet
            .printer
            .warn(&format!("could not write {}: {e}", path.display()));
    }
}

async fn close_all(sessions: Vec<Session>) {
    join_all(sessions.into_iter().map(Session::close)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(code: ExitCode, exits: Vec<Option<i32>>, interrupted: bool) -> Ended {
        Ended {
            code,
            outcome: Some(Outcome {
                exits,
                interrupted,
                ..Outcome::default()
            }),
            reason: None,
        }
    }

    #[test]
    fn a_job_whose_every_process_exited_zero_is_never_restarted() {
        // A host lost after the work was done: exit 3, and still nothing to redo.
        let done = ended(
            ExitCode::Unreachable,
            vec![Some(0), Some(0), Some(0)],
            false,
        );
        assert!(!worth_restarting(&done));
        let failed = ended(ExitCode::Exact(1), vec![Some(0), Some(1), Some(143)], false);
        assert!(worth_restarting(&failed));
        let gone = ended(ExitCode::Unreachable, vec![Some(0), None, Some(143)], false);
        assert!(worth_restarting(&gone));
        assert!(!worth_restarting(&ended(
            ExitCode::Interrupted,
            vec![Some(130)],
            true
        )));
        assert!(!worth_restarting(&ended(
            ExitCode::Success,
            vec![Some(0)],
            false
        )));
        let never_started = Ended {
            code: ExitCode::Unreachable,
            outcome: None,
            reason: Some("a host could not be reached".into()),
        };
        assert!(worth_restarting(&never_started));
    }
}
