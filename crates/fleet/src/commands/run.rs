//! `fleet run [-- CMD ...]`: sync, start every process of the job at once, follow their logs as
//! one, and stop everything when one fails or the user presses Ctrl-C.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use futures::future::join_all;
use serde::Serialize;
use tokio::sync::mpsc;

use super::Fleet;
use crate::cli::RunArgs;
use crate::exit_code::{ExitCode, UsageError};
use crate::inventory::Inventory;
use crate::launch::follow::{Followed, follow_host};
use crate::launch::remote::{BUSY, NO_WORKDIR, interface_to, job_dir, start_script, stem};
use crate::launch::supervise::{Outcome, Supervisor};
use crate::launch::{JobPlan, Mode, new_job_id, plan};
use crate::preflight::Needs;
use crate::ssh::ExitStatus;

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
        let needs = Needs::of(mode, &command);
        let checked = super::check::before_run(fleet, &inventory, needs);
        let code = match fleet.unless_interrupted(checked).await? {
            Ok(code) => code,
            Err(interrupted) => return Ok(interrupted),
        };
        if code != ExitCode::Success {
            fleet
                .printer
                .error("the check failed; nothing was started (--no-check starts anyway)");
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

/// Runs the job, and after a failure stops it, checks the hosts again and starts it anew, up to
/// --max-restarts times; hosts that stay unreachable are left out while --min-hosts allows.
async fn restart_loop(
    fleet: &Fleet,
    args: &RunArgs,
    inventory: &Inventory,
    command: &[String],
    mode: Mode,
    job_id: &str,
    runs: &std::path::Path,
) -> Result<ExitCode> {
    let min_hosts = args.min_hosts.unwrap_or(inventory.hosts.len()).max(1);
    let mut current = inventory.clone();
    let mut records: Vec<AttemptRecord> = Vec::new();
    let mut code = ExitCode::Success;
    for number in 0..=args.max_restarts {
        if number > 0 {
            let reachable = fleet.unless_interrupted(hosts_for_restart(fleet, &current, min_hosts));
            match reachable.await? {
                Ok(Ok(hosts)) => current = hosts,
                Ok(Err(message)) => {
                    fleet.printer.error(&message);
                    code = ExitCode::Unreachable;
                    break;
                }
                Err(interrupted) => {
                    code = interrupted;
                    break;
                }
            }
            if !args.no_check {
                let needs = Needs::of(mode, command);
                let checked =
                    fleet.unless_interrupted(super::check::before_run(fleet, &current, needs));
                let checked = match checked.await? {
                    Ok(checked) => checked,
                    Err(interrupted) => {
                        code = interrupted;
                        break;
                    }
                };
                if checked != ExitCode::Success {
                    fleet.printer.error("the check failed: no restart");
                    code = checked;
                    break;
                }
            }
        }
        let attempt = Attempt {
            number: Some(number),
            run_id: job_id.to_string(),
            remote_id: if number == 0 {
                job_id.to_string()
            } else {
                format!("{job_id}-r{number}")
            },
            run_dir: runs.join(format!("attempt-{number}")),
        };
        let ended = start(fleet, args, &current, command, mode, &attempt).await?;
        code = ended.code;
        records.push(AttemptRecord {
            attempt: number,
            hosts: current.hosts.iter().map(|h| h.name.clone()).collect(),
            exit_code: ended.code.code(),
            reason: ended.reason.clone(),
            trained_to: ended.outcome.as_ref().and_then(|o| o.trained_to),
            resumed_from: ended.outcome.as_ref().and_then(|o| o.resumed_from),
        });
        if !worth_restarting(&ended) || number == args.max_restarts {
            break;
        }
        let reason = ended
            .reason
            .unwrap_or_else(|| "the job could not start".into());
        fleet.printer.warn(&format!(
            "===== restart {} of {} in {}s: {reason} =====",
            number + 1,
            args.max_restarts,
            args.restart_delay
        ));
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(args.restart_delay)) => {}
            () = fleet.interrupts.any() => {
                fleet.printer.warn("interrupted: no restart");
                code = ExitCode::Interrupted;
                break;
            }
        }
    }

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
    if crate::files::create_private_dir(runs).is_ok() {
        let summary = serde_json::json!({
            "job_id": job_id, "command": command, "restarts": restarts,
            "steps_trained_again": redone, "exit_code": code.code(), "attempts": records,
        });
        if let Ok(json) = serde_json::to_vec_pretty(&summary) {
            let _ = std::fs::write(runs.join("summary.json"), json);
        }
    }
    Ok(code)
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

/// The hosts of `inventory` that can be reached now, or why the job cannot go on.
async fn hosts_for_restart(
    fleet: &Fleet,
    inventory: &Inventory,
    min_hosts: usize,
) -> Result<std::result::Result<Inventory, String>> {
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
        return Ok(Ok(kept));
    }
    if kept.hosts.len() < min_hosts {
        return Ok(Err(format!(
            "no restart: {} cannot be reached and {} host(s) are left, fewer than --min-hosts {min_hosts}",
            gone.join(", "),
            kept.hosts.len()
        )));
    }
    fleet.printer.warn(&format!(
        "{} cannot be reached: restarting on the other {} host(s)",
        gone.join(", "),
        kept.hosts.len()
    ));
    Ok(Ok(kept))
}

/// Starts every process of the job on `inventory`'s hosts and supervises them to the end.
async fn start(
    fleet: &Fleet,
    args: &RunArgs,
    inventory: &Inventory,
    command: &[String],
    mode: Mode,
    attempt: &Attempt,
) -> Result<Ended> {
    let not_started = |code: ExitCode| Ended {
        code,
        outcome: None,
        reason: None,
    };
    let (targets, connected) = fleet.connect_all(inventory).await?;
    // Every host that cannot be reached is named before giving up.
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
        for session in sessions {
            session.close().await;
        }
        return Ok(Ended {
            code: ExitCode::Unreachable,
            outcome: None,
            reason: Some("a host could not be reached".into()),
        });
    }

    let host_names: Vec<String> = inventory.hosts.iter().map(|h| h.name.clone()).collect();
    let addresses: Vec<String> = targets.iter().map(|t| t.addr.clone()).collect();
    let job_id = attempt.remote_id.clone();
    let mut job = plan(inventory, &addresses, command, mode, &job_id);
    // The job across its restarts: fleet-train resumes only checkpoints of its own job.
    for process in &mut job.processes {
        process
            .env
            .insert("FLEET_RUN_ID".into(), attempt.run_id.clone());
    }
    if let Some(number) = attempt.number {
        for process in &mut job.processes {
            process
                .env
                .insert("FLEET_RESTART_COUNT".into(), number.to_string());
            process
                .env
                .insert("FLEET_MAX_RESTARTS".into(), args.max_restarts.to_string());
            if mode == Mode::Ranks {
                process
                    .env
                    .insert("TORCHELASTIC_RESTART_COUNT".into(), number.to_string());
            }
        }
    }
    let workdirs: Vec<String> = inventory.hosts.iter().map(|h| h.workdir.clone()).collect();

    // Gloo and NCCL bind to whatever the host name resolves to, often 127.0.1.1: name the
    // interface that reaches the master instead, unless the user did.
    let interfaces = join_all(sessions.iter().map(|s| interface_to(s, &job.master_addr))).await;
    let extra_env: Vec<BTreeMap<String, String>> = inventory
        .hosts
        .iter()
        .zip(&interfaces)
        .map(|(host, iface)| {
            let mut env = BTreeMap::new();
            if let Some(iface) = iface {
                for key in ["GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"] {
                    if !host.env.contains_key(key) {
                        env.insert(key.to_string(), iface.clone());
                    }
                }
            }
            env
        })
        .collect();

    let starts = join_all(sessions.iter().enumerate().map(|(i, session)| {
        let activate = inventory.hosts[i].activate.as_deref();
        let (script, input) = start_script(&workdirs[i], &job, i, activate, &extra_env[i]);
        async move { session.capture_with_input(&script, &input).await }
    }))
    .await;
    let mut refused = false;
    for (i, result) in starts.iter().enumerate() {
        let host = &host_names[i];
        match result {
            Ok((ExitStatus::Code(0), _, _)) => {}
            Ok((ExitStatus::Code(BUSY), out, _)) => {
                let running = String::from_utf8_lossy(out)
                    .trim()
                    .trim_start_matches("busy ")
                    .to_string();
                fleet.printer.error(&format!(
                    "{host}: job {running} is still running in {} (fleet stop, or wait for it)",
                    inventory.hosts[i].workdir
                ));
                refused = true;
            }
            Ok((ExitStatus::Code(NO_WORKDIR), _, _)) => {
                fleet.printer.error(&format!(
                    "{host}: workdir {} does not exist (run fleet sync)",
                    inventory.hosts[i].workdir
                ));
                refused = true;
            }
            Ok((status, _, err)) => {
                fleet.printer.error(&format!(
                    "{host}: could not start the job ({status:?}): {}",
                    String::from_utf8_lossy(err).trim()
                ));
                refused = true;
            }
            Err(e) => {
                fleet.printer.error(&e.to_string());
                refused = true;
            }
        }
    }

    if args.detach && !refused {
        fleet
            .printer
            .write(crate::output::Stream::Stdout, &format!("{job_id}\n"));
        fleet.printer.info(&format!("job {job_id} started; follow it with `fleet logs -f {job_id}`, stop it with `fleet stop {job_id}`"));
        for session in sessions {
            session.close().await;
        }
        return Ok(not_started(ExitCode::Success));
    }
    let run_dir = match crate::files::create_private_dir(&attempt.run_dir) {
        Ok(()) => Some(attempt.run_dir.clone()),
        Err(e) => {
            fleet.printer.warn(&format!(
                "cannot keep logs in {}: {e}",
                attempt.run_dir.display()
            ));
            None
        }
    };
    fleet.printer.info(&format!(
        "job {job_id}: {} processes on {} hosts, MASTER_ADDR {}:{}",
        job.processes.len(),
        sessions.len(),
        job.master_addr,
        job.master_port
    ));

    // Each host that started is followed; one that cannot be (no SFTP, no workdir) is named
    // and the job stopped, never left running unsupervised.
    let mut followed: Vec<bool> = starts
        .iter()
        .map(|s| matches!(s, Ok((ExitStatus::Code(0), _, _))))
        .collect();
    let (events, receiver) = mpsc::channel(1024);
    let mut followers = Vec::new();
    for (i, session) in sessions.iter().enumerate() {
        if !followed[i] {
            continue;
        }
        // The start script said where the workdir is (SFTP does not expand `~`).
        let root = match &starts[i] {
            Ok((_, out, _)) => String::from_utf8_lossy(out)
                .trim()
                .strip_prefix("started ")
                .unwrap_or_default()
                .to_string(),
            Err(_) => String::new(),
        };
        let sftp = match session.sftp().await {
            Ok(sftp) => sftp,
            Err(e) => {
                fleet.printer.error(&format!(
                    "{}: cannot follow the job's logs ({e}); stopping the job",
                    host_names[i]
                ));
                followed[i] = false;
                refused = true;
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
        followers.push(follow_host(
            sftp,
            i,
            format!("{root}/{}", job_dir(&job_id)),
            processes,
            events.clone(),
        ));
    }
    let supervisor = Supervisor {
        printer: &fleet.printer,
        job: &job,
        host_names: &host_names,
        sessions: &sessions,
        workdirs: &workdirs,
        grace: Duration::from_secs(args.grace),
        timestamps: args.timestamps,
        run_dir: run_dir.clone(),
        followed,
        interrupts: &fleet.interrupts,
    };
    drop(events);
    // When a host refused, whatever did start is stopped at once.
    let outcome = {
        let supervised = supervisor.run(receiver, refused);
        tokio::pin!(supervised);
        let mut followed = Box::pin(join_all(followers));
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
    };

    let code = if refused {
        ExitCode::Failure.code()
    } else {
        outcome.exit_code()
    };
    let reason = if refused {
        Some("a host refused to start the job".into())
    } else {
        supervisor.reason(&outcome)
    };
    if let Some(dir) = &run_dir {
        let summary = Summary {
            job_id: &job_id,
            command,
            mode,
            hosts: &host_names,
            plan: &job,
            outcome: &outcome,
            exit_code: code,
        };
        if let Ok(json) = serde_json::to_vec_pretty(&summary) {
            let _ = std::fs::write(dir.join("summary.json"), json);
        }
    }
    let skew = outcome
        .start_skew_ms
        .map_or(String::new(), |ms| format!(", start skew {ms:.1} ms"));
    fleet.printer.info(&format!(
        "job {job_id}: exit {code} after {:.1}s{skew}; logs in {}",
        outcome.seconds,
        run_dir
            .as_ref()
            .map_or(PathBuf::from("(none)"), |d| d.clone())
            .display()
    ));
    for session in sessions {
        session.close().await;
    }
    Ok(Ended {
        code: ExitCode::Exact(code),
        outcome: Some(outcome),
        reason,
    })
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
