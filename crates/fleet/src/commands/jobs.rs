//! `fleet ps`, `fleet stop` and `fleet logs`: jobs as the hosts record them in their job folders,
//! so they work from any laptop, after fleet was killed, or for a job started with `--detach`.

use std::time::{Duration, Instant};

use anyhow::Result;
use futures::future::join_all;
use serde::Serialize;
use tokio::sync::mpsc;

use super::{Fleet, table};
use crate::cli::{LogsArgs, StopArgs};
use crate::exit_code::{ExitCode, UsageError};
use crate::inventory::Inventory;
use crate::launch::follow::{Event, Followed, follow_host};
use crate::launch::remote::{
    JobState, ProcState, Signal, label_of, parse_status, signal_script, status_script,
};
use crate::output::{Labels, LineSplitter, Stream};
use crate::ssh::{Session, SshError};

/// Connects to every host; unreachable ones are reported and left out.
async fn connect(fleet: &Fleet, inventory: &Inventory) -> Result<(Vec<Option<Session>>, ExitCode)> {
    let (_, results) = fleet.connect_all(inventory).await?;
    let mut code = ExitCode::Success;
    let sessions = results
        .into_iter()
        .map(|r| match r {
            Ok(s) => Some(s),
            Err(e) => {
                fleet.printer.error(&e.to_string());
                code = ExitCode::Unreachable;
                None
            }
        })
        .collect();
    Ok((sessions, code))
}

/// The jobs a host reports (see [`status_script`]).
async fn status(
    session: &Session,
    workdir: &str,
    job: Option<&str>,
    all: bool,
) -> Result<Vec<JobState>, SshError> {
    let (_, out, _) = session.capture(&status_script(workdir, job, all)).await?;
    Ok(parse_status(&String::from_utf8_lossy(&out)))
}

#[derive(Serialize)]
struct PsRecord<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    job: &'a str,
    host: &'a str,
    process: &'a str,
    state: &'a str,
}

pub async fn ps(fleet: &Fleet) -> Result<ExitCode> {
    let inventory = fleet.inventory()?;
    let (sessions, mut code) = connect(fleet, &inventory).await?;
    let states = join_all(
        sessions
            .iter()
            .zip(&inventory.hosts)
            .map(|(s, h)| async move {
                match s {
                    Some(s) => Some(status(s, &h.workdir, None, true).await),
                    None => None,
                }
            }),
    )
    .await;
    let mut rows = Vec::new();
    for (host, state) in inventory.hosts.iter().zip(&states) {
        match state {
            Some(Ok(jobs)) => {
                for job in jobs {
                    for p in &job.processes {
                        rows.push(vec![
                            job.job_id.clone(),
                            host.name.clone(),
                            p.stem.clone(),
                            p.state.to_string(),
                        ]);
                    }
                }
            }
            Some(Err(e)) => {
                fleet.printer.error(&e.to_string());
                code = code.max_with(ExitCode::Unreachable);
            }
            None => {}
        }
    }
    rows.sort();
    print_processes(fleet, &rows);
    close(sessions).await;
    Ok(code)
}

/// Rows of job, host, process and state: a table, or with `--json` one record each.
fn print_processes(fleet: &Fleet, rows: &[Vec<String>]) {
    if !fleet.printer.json() {
        fleet
            .printer
            .data(&table::render(&["JOB", "HOST", "PROCESS", "STATE"], rows));
        return;
    }
    for row in rows {
        fleet.printer.record(&PsRecord {
            kind: "process",
            job: &row[0],
            host: &row[1],
            process: &row[2],
            state: &row[3],
        });
    }
}

/// A process `fleet stop` saw end: its job, its file stem and how it ended.
type Stopped = (String, String, String);

pub async fn stop(fleet: &Fleet, args: &StopArgs) -> Result<ExitCode> {
    let inventory = fleet.inventory()?;
    let (sessions, code) = connect(fleet, &inventory).await?;
    let grace = Duration::from_secs(args.grace);
    let stops = sessions
        .iter()
        .zip(&inventory.hosts)
        .map(|(session, host)| async move {
            let Some(session) = session else {
                return Ok(Vec::new());
            };
            let job = args.job.as_deref();
            // SIGTERM once, SIGKILL once after the grace period, polling in between: a program
            // that handles SIGTERM (torchrun forwards it) must not get a second one.
            let deadline = Instant::now() + grace;
            let mut sent: Option<Signal> = None;
            loop {
                let jobs = status(session, &host.workdir, job, false).await?;
                let Some(state) = jobs.into_iter().next() else {
                    return Ok(Vec::new());
                };
                let running: Vec<String> = state
                    .processes
                    .iter()
                    .filter(|p| p.state == ProcState::Running)
                    .map(|p| p.stem.clone())
                    .collect();
                if running.is_empty() {
                    return Ok(state
                        .processes
                        .into_iter()
                        .map(|p| (state.job_id.clone(), p.stem, p.state.to_string()))
                        .collect());
                }
                let signal = match sent {
                    None => Some(Signal::Term),
                    Some(Signal::Term) if Instant::now() >= deadline => Some(Signal::Kill),
                    _ => None,
                };
                if let Some(signal) = signal {
                    let script = signal_script(&host.workdir, &state.job_id, &running, signal);
                    session.capture(&script).await?;
                    sent = Some(signal);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    let results: Vec<Result<Vec<Stopped>, SshError>> = join_all(stops).await;
    let mut code = code;
    let mut rows = Vec::new();
    for (host, result) in inventory.hosts.iter().zip(results) {
        match result {
            Ok(processes) if processes.is_empty() => fleet
                .printer
                .info(&format!("{}: no job to stop", host.name)),
            Ok(processes) => rows.extend(
                processes
                    .into_iter()
                    .map(|(job, stem, state)| vec![job, host.name.clone(), stem, state]),
            ),
            Err(e) => {
                fleet.printer.error(&e.to_string());
                code = code.max_with(ExitCode::Unreachable);
            }
        }
    }
    if !rows.is_empty() {
        print_processes(fleet, &rows);
    }
    close(sessions).await;
    Ok(code)
}

pub async fn logs(fleet: &Fleet, args: &LogsArgs) -> Result<ExitCode> {
    let inventory = fleet.inventory()?;
    let (sessions, code) = connect(fleet, &inventory).await?;
    let Some(job) = job_to_show(&sessions, &inventory, args).await? else {
        return Ok(code);
    };
    let states = job_states(&sessions, &inventory, &job).await;
    let (events, receiver) = mpsc::channel(1024);
    let mut described = Vec::new();
    let mut followers = Vec::new();
    for (host_index, (session, state)) in sessions.iter().zip(&states).enumerate() {
        let (Some(session), Some(state)) = (session, state) else {
            continue;
        };
        let host = &inventory.hosts[host_index].name;
        let followed = followed_processes(fleet, args, host, host_index, state, &mut described);
        if !followed.is_empty() {
            let sftp = session.sftp().await?;
            followers.push(follow_host(
                sftp,
                host_index,
                state.dir.clone(),
                followed,
                events.clone(),
            ));
        }
    }
    drop(events);
    if described.is_empty() {
        // A rank the job does not have is a mistake in the command line (exit 2).
        if let Some(rank) = &args.rank {
            return Err(UsageError(format!("job {job}: no process found with rank {rank}")).into());
        }
        anyhow::bail!("job {job}: no process found");
    }
    let print = print_logs(fleet, args, &inventory, &described, receiver);
    let (_, failed) = tokio::join!(join_all(followers), print);
    close(sessions).await;
    Ok(if failed && args.follow {
        code.max_with(ExitCode::Failure)
    } else {
        code
    })
}

/// One job id for every host: the one asked for, or the first reachable host's current job
/// (None: no host is reachable).
async fn job_to_show(
    sessions: &[Option<Session>],
    inventory: &Inventory,
    args: &LogsArgs,
) -> Result<Option<String>> {
    if let Some(job) = &args.job {
        return Ok(Some(job.clone()));
    }
    let first = sessions
        .iter()
        .zip(&inventory.hosts)
        .find_map(|(s, h)| s.as_ref().map(|s| (s, h)));
    let Some((session, host)) = first else {
        return Ok(None);
    };
    match status(session, &host.workdir, None, false)
        .await?
        .into_iter()
        .next()
    {
        Some(state) => Ok(Some(state.job_id)),
        None => anyhow::bail!("{}: no job has run in {}", host.name, host.workdir),
    }
}

/// The state of `job` on each host (None where it is unreachable or has no such job).
async fn job_states(
    sessions: &[Option<Session>],
    inventory: &Inventory,
    job: &str,
) -> Vec<Option<JobState>> {
    join_all(
        sessions
            .iter()
            .zip(&inventory.hosts)
            .map(|(s, h)| async move {
                status(s.as_ref()?, &h.workdir, Some(job), false)
                    .await
                    .ok()
                    .and_then(|j| j.into_iter().next())
            }),
    )
    .await
}

/// The processes of the job on one host whose logs are shown (all, or `--rank`'s), each
/// numbered across hosts in `described` (label, host, host index).
fn followed_processes(
    fleet: &Fleet,
    args: &LogsArgs,
    host: &str,
    host_index: usize,
    state: &JobState,
    described: &mut Vec<(String, String, usize)>,
) -> Vec<Followed> {
    let mut followed = Vec::new();
    for p in &state.processes {
        let label = label_of(&p.stem);
        if args.rank.as_ref().is_some_and(|r| *r != label) {
            continue;
        }
        // A process gone without an exit status will never write one: its log is shown to
        // the end, not waited on.
        let vanished = p.state == ProcState::Lost;
        if vanished && args.follow {
            fleet.printer.warn(&format!(
                "{host}: rank {label} is gone without an exit status (killed with its wrapper?)"
            ));
        }
        followed.push(Followed {
            process: described.len(),
            stem: p.stem.clone(),
            offset: 0,
            until_exit: args.follow && !vanished,
        });
        described.push((label, host.to_string(), host_index));
    }
    followed
}

/// Prints the followed logs as their lines arrive, each behind its rank's label; returns
/// whether a process exited with a failure.
async fn print_logs(
    fleet: &Fleet,
    args: &LogsArgs,
    inventory: &Inventory,
    described: &[(String, String, usize)],
    mut receiver: mpsc::Receiver<Event>,
) -> bool {
    let labels = Labels::processes(&fleet.printer, described);
    let mut splitters: Vec<LineSplitter> = described.iter().map(|_| LineSplitter::new()).collect();
    // fleet-train's events are for machines: shown with --raw and in --json, as fleet run does.
    let show = |process: usize, line: &[u8]| {
        let text = String::from_utf8_lossy(line);
        if fleet.printer.json() {
            let (rank, host, _) = &described[process];
            fleet.printer.record(
                &serde_json::json!({"type": "line", "rank": rank, "host": host, "line": text}),
            );
        } else if args.raw || !crate::launch::training::is_event(&text) {
            fleet
                .printer
                .remote_line(Stream::Stdout, labels.prefix(process, Stream::Stdout), line);
        }
    };
    let mut failed = false;
    while let Some(event) = receiver.recv().await {
        match event {
            Event::Output { process, bytes } => {
                splitters[process].push(&bytes, |line| show(process, line))
            }
            Event::Exited { process, code } => {
                splitters[process].finish(|line| show(process, line));
                failed |= code != 0;
            }
            Event::Caught { process } => splitters[process].finish(|line| show(process, line)),
            Event::Lost { host, error } => fleet
                .printer
                .error(&format!("{}: lost ({error})", inventory.hosts[host].name)),
            Event::Started { .. } => {}
        }
    }
    failed
}

async fn close(sessions: Vec<Option<Session>>) {
    join_all(sessions.into_iter().flatten().map(Session::close)).await;
}
