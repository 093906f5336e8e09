//! `fleet run [-- CMD ...]`: sync, start every process of the job at once, follow their logs as
//! one, and stop everything when one fails or the user presses Ctrl-C.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use futures::future::join_all;
use serde::Serialize;
use tokio::sync::mpsc;

use super::Fleet;
use crate::cli::RunArgs;
use crate::exit_code::ExitCode;
use crate::launch::follow::{Followed, follow_host};
use crate::launch::remote::{BUSY, NO_WORKDIR, interface_to, job_dir, start_script, stem};
use crate::launch::supervise::{Outcome, Supervisor};
use crate::launch::{JobPlan, Mode, new_job_id, plan};
use crate::shell;
use crate::ssh::{ExitStatus, Session};
use crate::sync::remote::shell_path;

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
        bail!(
            "no command to run: give one after `--` (fleet run -- python3 train.py) or set [run].command in {}",
            inventory.path.display()
        );
    };
    let mode = if args.torchrun {
        Mode::Torchrun
    } else if args.accelerate {
        Mode::Accelerate
    } else {
        Mode::Ranks
    };
    if !args.no_sync {
        let code = super::sync::before_run(fleet).await?;
        if code != ExitCode::Success {
            fleet
                .printer
                .error("the sync failed; nothing was started (--no-sync starts without syncing)");
            return Ok(code);
        }
    }

    if !args.no_check {
        let code = super::check::before_run(fleet).await?;
        if code != ExitCode::Success {
            fleet
                .printer
                .error("the check failed; nothing was started (--no-check starts anyway)");
            return Ok(code);
        }
    }
    let (targets, connected) = fleet.connect_all(&inventory).await?;
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
        return Ok(ExitCode::Unreachable);
    }

    let host_names: Vec<String> = inventory.hosts.iter().map(|h| h.name.clone()).collect();
    let addresses: Vec<String> = targets.iter().map(|t| t.addr.clone()).collect();
    let job_id = new_job_id();
    let job = plan(&inventory, &addresses, &command, mode, &job_id);
    let workdirs: Vec<String> = inventory
        .hosts
        .iter()
        .map(|h| shell_path(&h.workdir))
        .collect();

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
        let script = start_script(&workdirs[i], &job, i, &extra_env[i]);
        async move { session.capture(&shell::sh(&script)).await }
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
        return Ok(ExitCode::Success);
    }
    let run_dir = inventory.sync.source.join("runs").join(&job_id);
    let run_dir = match std::fs::create_dir_all(&run_dir) {
        Ok(()) => Some(run_dir),
        Err(e) => {
            fleet
                .printer
                .warn(&format!("cannot keep logs in {}: {e}", run_dir.display()));
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

    let supervisor = Supervisor {
        printer: &fleet.printer,
        job: &job,
        host_names: &host_names,
        sessions: &sessions,
        workdirs: &workdirs,
        grace: Duration::from_secs(args.grace),
        timestamps: args.timestamps,
        run_dir: run_dir.clone(),
        followed: starts
            .iter()
            .map(|s| matches!(s, Ok((ExitStatus::Code(0), _, _))))
            .collect(),
    };
    let (events, receiver) = mpsc::channel(1024);
    let mut followers = Vec::new();
    for (i, session) in sessions.iter().enumerate() {
        if !supervisor.followed[i] {
            continue;
        }
        let sftp = session.sftp().await?;
        let root = remote_root(session, &workdirs[i]).await?;
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
    drop(events);
    // When a host refused, whatever did start is stopped at once.
    let (outcome, _) = tokio::join!(supervisor.run(receiver, refused), join_all(followers));

    let code = if refused {
        ExitCode::Failure.code()
    } else {
        outcome.exit_code()
    };
    if let Some(dir) = &run_dir {
        let summary = Summary {
            job_id: &job_id,
            command: &command,
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
    Ok(ExitCode::Exact(code))
}

/// The absolute path of a workdir on the host (SFTP does not expand `~`).
async fn remote_root(session: &Session, workdir: &str) -> Result<String> {
    let (status, out, err) = session
        .capture(&shell::sh(&format!("cd -- {workdir} && pwd -P")))
        .await?;
    if status != ExitStatus::Code(0) {
        bail!(
            "{}: cannot enter {workdir}: {}",
            session.target().name,
            String::from_utf8_lossy(&err).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out).trim().to_string())
}
