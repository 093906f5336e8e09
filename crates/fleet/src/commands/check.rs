//! `fleet check`: probes every host at once, checks that they can train together (same
//! versions, GPUs for the ranks, disk, clock, files in sync, the master port reachable from every
//! host), and says what to fix.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use futures::future::join_all;
use serde::Serialize;

mod pairs;

use super::{Fleet, table};
use crate::cli::CheckArgs;
use crate::exit_code::ExitCode;
use crate::inventory::{Check, Host, Inventory};
use crate::launch::Mode;
use crate::launch::remote::interface_to;
use crate::output::{Printer, Stream, count};
use crate::preflight::{
    Finding, HostReport, Needs, connect_script, evaluate, listener_script, parse_probe,
    probe_script,
};
use crate::remote::Script;
use crate::ssh::{ExitStatus, RemoteProcess, Session, SshError};
use crate::sync::remote::{HostState, peek};
use crate::sync::{Filter, plan, scan_project, split_listing};

/// How long a probe may take (importing torch is slow on a cold disk).
const PROBE_DEADLINE: Duration = Duration::from_secs(60);
/// How long a host may take to open a TCP connection to the master port.
const CONNECT_SECONDS: u32 = 3;

#[derive(Serialize)]
struct CheckRecord<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(flatten)]
    finding: &'a Finding,
}

#[derive(Serialize)]
struct Verdict {
    #[serde(rename = "type")]
    kind: &'static str,
    ok: bool,
    failed: usize,
}

pub async fn run(fleet: &Fleet, args: &CheckArgs) -> Result<ExitCode> {
    let inventory = fleet.inventory()?;
    // Alone, fleet check reads what the job needs from [run].command.
    let command = inventory.run_command.clone().unwrap_or_default();
    let needs = Needs::of(Mode::Ranks, &command);
    let code = check(fleet, &inventory, false, needs).await?;
    // The links are measured only between hosts that answered.
    if args.net && code != ExitCode::Unreachable && inventory.hosts.len() > 1 {
        return Ok(code.max_with(super::net::run(fleet, &args.net_args).await?));
    }
    Ok(code)
}

/// The check `fleet run` makes before it starts (and before each restart), on `inventory`'s
/// hosts (after a restart, those still in the job), for what the job `needs`: only problems
/// are printed, on stderr.
pub async fn before_run(fleet: &Fleet, inventory: &Inventory, needs: Needs) -> Result<ExitCode> {
    check(fleet, inventory, true, needs).await
}

async fn check(
    fleet: &Fleet,
    inventory: &Inventory,
    before_run: bool,
    needs: Needs,
) -> Result<ExitCode> {
    let (targets, connected) = fleet.connect_all(inventory).await?;
    let (sessions, mut reports) = sessions_and_reports(connected, inventory);
    let master_addr = inventory
        .master_addr
        .clone()
        .unwrap_or_else(|| targets[0].addr.clone());

    // Probes, the file comparison and the port check run on all hosts at once.
    let probes = join_all(sessions.iter().zip(&inventory.hosts).map(
        |(session, host)| async move {
            probe(session.as_ref()?, host, &inventory.checks)
                .await
                .into()
        },
    ));
    // Before a run the sync has just happened (or was declined with --no-sync).
    let files = async {
        if before_run {
            Vec::new()
        } else {
            files_in_sync(inventory, &sessions).await
        }
    };
    let addrs: Vec<String> = targets.iter().map(|t| t.addr.clone()).collect();
    let (probes, files, port, between, interfaces) = tokio::join!(
        probes,
        files,
        master_port(inventory, &sessions, &master_addr),
        pairs::between_hosts(&fleet.printer, inventory, &sessions, &addrs),
        join_all(
            sessions
                .iter()
                .map(|s| async { interface_to(s.as_ref()?, &master_addr).await })
        )
    );
    let laptop_ms = take_probes(&mut reports, probes);

    let mut findings = evaluate(inventory, &reports, &laptop_ms, needs);
    findings.extend(files);
    findings.extend(port);
    findings.extend(between);
    findings.extend(routes_to_master(inventory, &reports, &interfaces));
    for session in sessions.into_iter().flatten() {
        session.close().await;
    }
    let hosts: Vec<String> = inventory.hosts.iter().map(|h| h.name.clone()).collect();
    Ok(report(
        &fleet.printer,
        &hosts,
        &findings,
        reports.iter().any(|r| r.error.is_some()),
        before_run,
    ))
}

/// Each host's session (None where it could not connect) and its report, which holds the
/// connection error until a probe fills it.
fn sessions_and_reports(
    connected: Vec<Result<Session, SshError>>,
    inventory: &Inventory,
) -> (Vec<Option<Session>>, Vec<HostReport>) {
    connected
        .into_iter()
        .zip(&inventory.hosts)
        .map(|(result, host)| {
            let (session, error) = match result {
                Ok(session) => (Some(session), None),
                Err(e) => (None, Some(e.to_string())),
            };
            let report = HostReport {
                host: host.name.clone(),
                error,
                ..HostReport::default()
            };
            (session, report)
        })
        .unzip()
}

/// Runs the probe on a host: its report and the laptop's clock when the answer came, or what
/// went wrong.
async fn probe(
    session: &Session,
    host: &Host,
    checks: &[Check],
) -> Result<(HostReport, i64), String> {
    let script = probe_script(&host.workdir, host.activate.as_deref(), checks);
    let result = tokio::time::timeout(PROBE_DEADLINE, session.capture(&script)).await;
    // The host reads its clock as the probe's last act: the answer arrives a one-way
    // trip later, however long the probe took.
    let laptop = now_ms();
    match result {
        Ok(Ok((_, out, err))) => {
            let report = parse_probe(&host.name, &String::from_utf8_lossy(&out));
            if report.get("probe_complete").is_some() {
                Ok((report, laptop))
            } else {
                Err(format!(
                    "{}: the probe stopped before its end: {}",
                    host.name,
                    String::from_utf8_lossy(&err).trim()
                ))
            }
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "{}: no answer to the probe within {}s",
            host.name,
            PROBE_DEADLINE.as_secs()
        )),
    }
}

/// Puts each host's probe answer into its report; returns the laptop's clock at each answer.
fn take_probes(
    reports: &mut [HostReport],
    probes: Vec<Option<Result<(HostReport, i64), String>>>,
) -> Vec<i64> {
    let mut laptop_ms = vec![0; reports.len()];
    for (i, probe) in probes.into_iter().enumerate() {
        match probe {
            Some(Ok((report, laptop))) => {
                reports[i] = report;
                laptop_ms[i] = laptop;
            }
            Some(Err(error)) => reports[i].error = Some(error),
            None => {}
        }
    }
    laptop_ms
}

/// The interface each probed host reaches the master through (fleet run sets
/// GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME to it).
fn routes_to_master(
    inventory: &Inventory,
    reports: &[HostReport],
    interfaces: &[Option<String>],
) -> Vec<Finding> {
    inventory
        .hosts
        .iter()
        .zip(reports)
        .zip(interfaces)
        .filter_map(|((host, report), iface)| match (&report.error, iface) {
            (None, Some(iface)) => Some(Finding::pass(
                "route to master",
                Some(&host.name),
                iface.clone(),
            )),
            _ => None,
        })
        .collect()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Compares the local project with each host's tree (without syncing).
async fn files_in_sync(inventory: &Inventory, sessions: &[Option<Session>]) -> Vec<Finding> {
    let source = inventory.sync.source.clone();
    let Ok(filter) = Filter::new(&source, &inventory.sync.exclude) else {
        return Vec::new();
    };
    let scanned =
        tokio::task::spawn_blocking(move || scan_project(&source, &filter, 0).map(|s| (s, filter)))
            .await;
    let Ok(Ok((local, filter))) = scanned else {
        return vec![Finding {
            check: "files".into(),
            host: None,
            ok: false,
            detail: format!(
                "cannot read the project folder {}",
                inventory.sync.source.display()
            ),
            fix: Some("see fleet sync for the error".into()),
            values: Vec::new(),
        }];
    };
    let checks = sessions
        .iter()
        .zip(&inventory.hosts)
        .map(|(session, host)| {
            let (local, filter) = (&local, &filter);
            async move {
                let session = session.as_ref()?;
                let name = Some(host.name.clone());
                Some(match peek(session, &host.workdir).await {
                    Ok(HostState { saved, listing, .. }) => {
                        let (listing, _) = split_listing(listing, filter, &local.manifest);
                        let plan = plan(&local.manifest, saved.as_deref(), &listing);
                        if plan.is_empty() {
                            Finding {
                                check: "files".into(),
                                host: name,
                                ok: true,
                                detail: format!("{} in sync", count(plan.unchanged, "file")),
                                fix: None,
                                values: Vec::new(),
                            }
                        } else {
                            Finding {
                                check: "files".into(),
                                host: name,
                                ok: false,
                                detail: match plan.mkdirs.len() {
                                    0 => format!("{} to send", count(plan.uploads.len(), "file")),
                                    folders => format!(
                                        "{} to send, {} to create",
                                        count(plan.uploads.len(), "file"),
                                        count(folders, "folder")
                                    ),
                                },
                                fix: Some("run fleet sync (fleet run does it first)".into()),
                                values: Vec::new(),
                            }
                        }
                    }
                    Err(e) => Finding {
                        check: "files".into(),
                        host: name,
                        ok: false,
                        detail: e.to_string(),
                        fix: None,
                        values: Vec::new(),
                    },
                })
            }
        });
    join_all(checks).await.into_iter().flatten().collect()
}

/// Listens on MASTER_PORT on the master and has every other host connect to it.
async fn master_port(
    inventory: &Inventory,
    sessions: &[Option<Session>],
    master_addr: &str,
) -> Vec<Finding> {
    let port = inventory.master_port;
    let Some(master) = sessions[0].as_ref() else {
        return Vec::new();
    };
    let master_name = &inventory.hosts[0].name;
    let listener = match listen_on_master(master, master_name, port).await {
        Ok(listener) => listener,
        Err(finding) => return vec![*finding],
    };
    let script = connect_script(master_addr, port, CONNECT_SECONDS);
    let attempts = sessions
        .iter()
        .zip(&inventory.hosts)
        .skip(1)
        .map(|(session, host)| {
            let script = &script;
            async move {
                let answer = connect_answer(session.as_ref()?, script).await;
                Some(reach_finding(&host.name, &answer, master_addr, port))
            }
        });
    let mut findings: Vec<Finding> = join_all(attempts).await.into_iter().flatten().collect();
    listener.finish().await;
    let listens = Finding::pass(MASTER_PORT, Some(master_name), format!("listens on {port}"));
    findings.insert(0, listens);
    findings
}

/// The name of the master port's findings.
const MASTER_PORT: &str = "master port";

/// Starts the listener on the master's port, or says why the port cannot be tested: in use
/// (failed), or no python3 to listen with (not tested, which passes).
async fn listen_on_master(
    master: &Session,
    master_name: &str,
    port: u16,
) -> Result<RemoteProcess, Box<Finding>> {
    let Ok(mut listener) = master.start(&listener_script(port, 30)).await else {
        let finding = Finding::fail(
            MASTER_PORT,
            Some(master_name),
            "could not start a listener",
            "check the host",
        );
        return Err(Box::new(finding));
    };
    let first = listener.next_line().await.unwrap_or_default();
    if let Some(holder) = first.strip_prefix("in use") {
        listener.finish().await;
        let holder = holder.trim();
        let held = if holder.is_empty() {
            String::new()
        } else {
            format!(" by {holder}")
        };
        return Err(Box::new(Finding::fail(
            MASTER_PORT,
            Some(master_name),
            format!("port {port} is in use{held} on {master_name}"),
            "stop what holds it (a previous job: fleet ps / fleet stop), or set master_port to a free port",
        )));
    }
    if first.split_whitespace().next() != Some("listening") {
        listener.finish().await;
        let detail = format!("not tested ({first}: python3 is needed on the master to listen)");
        return Err(Box::new(Finding::pass(
            MASTER_PORT,
            Some(master_name),
            detail,
        )));
    }
    Ok(listener)
}

/// What connect.sh answered on a host: `ok`, `timeout`, `refused`, or `error ...`.
async fn connect_answer(session: &Session, script: &Script) -> String {
    match session.capture(script).await {
        Ok((ExitStatus::Code(0), out, _)) => String::from_utf8_lossy(&out).trim().to_string(),
        Ok((_, _, err)) => format!("error {}", String::from_utf8_lossy(&err).trim()),
        Err(e) => format!("error {e}"),
    }
}

/// The finding for `host` reaching the master port from its connect answer (pure).
fn reach_finding(host: &str, answer: &str, master_addr: &str, port: u16) -> Finding {
    let target = format!("{master_addr}:{port}");
    let cannot = |why: &str| format!("{host} cannot reach {target} ({why})");
    match answer {
        "ok" => Finding::pass(MASTER_PORT, Some(host), format!("reaches {target}")),
        "timeout" => Finding::fail(
            MASTER_PORT,
            Some(host),
            cannot("timed out: firewall?"),
            firewall_fix(port),
        ),
        "refused" => Finding::fail(
            MASTER_PORT,
            Some(host),
            cannot("connection refused"),
            firewall_fix(port),
        ),
        other => Finding::fail(
            MASTER_PORT,
            Some(host),
            format!("{host} cannot test {target}: {other}"),
            "install python3 or bash on the host",
        ),
    }
}

/// Checks down, hosts across: each cell ✓ or ✗ with what was read. A value that must match
/// is marked ✗ on the hosts whose value differs from the most common one, and `–` where it is
/// "not installed" and the job does not need it (no tick for a thing that is not there).
fn grid(printer: &Printer, hosts: &[String], findings: &[Finding]) -> String {
    let ok = printer
        .style(Stream::Stdout, console::Style::new().green())
        .apply_to("✓")
        .to_string();
    let bad = printer
        .style(Stream::Stdout, console::Style::new().red().bold())
        .apply_to("✗")
        .to_string();
    let absent = printer
        .style(Stream::Stdout, console::Style::new().dim())
        .apply_to("–")
        .to_string();
    let highlight = printer.style(Stream::Stdout, console::Style::new().red());
    let mut checks: Vec<&str> = Vec::new();
    let mut cells: HashMap<(&str, &str), String> = HashMap::new();
    for f in findings {
        if !checks.contains(&f.check.as_str()) {
            checks.push(&f.check);
        }
        let mark = match (f.ok, f.detail == crate::preflight::NOT_INSTALLED) {
            (true, true) => &absent,
            (true, false) => &ok,
            (false, _) => &bad,
        };
        match (&f.host, f.values.is_empty()) {
            (Some(host), _) => {
                // Several findings of one check on one host (pairs that fail) share its cell.
                let detail = printer.clean(&f.detail);
                cells
                    .entry((&f.check, host))
                    .and_modify(|cell| {
                        cell.push_str("; ");
                        cell.push_str(&detail);
                    })
                    .or_insert_with(|| format!("{mark} {detail}"));
            }
            (None, false) => {
                let count = |v: &String| f.values.iter().filter(|(_, w)| w == v).count();
                let common = f
                    .values
                    .iter()
                    .map(|(_, v)| v)
                    .max_by_key(|v| count(v))
                    .cloned()
                    .unwrap_or_default();
                for (host, value) in &f.values {
                    let value = printer.clean(value);
                    let cell = if f.ok && value == crate::preflight::NOT_INSTALLED {
                        format!("{absent} {value}")
                    } else if f.ok || *value == common {
                        format!("{ok} {value}")
                    } else {
                        format!("{bad} {}", highlight.apply_to(value))
                    };
                    cells.insert((&f.check, host), cell);
                }
            }
            (None, true) => {
                for host in hosts {
                    cells.insert(
                        (&f.check, host),
                        format!("{mark} {}", printer.clean(&f.detail)),
                    );
                }
            }
        }
    }
    let header: Vec<&str> = std::iter::once("CHECK")
        .chain(hosts.iter().map(String::as_str))
        .collect();
    let rows: Vec<Vec<String>> = checks
        .iter()
        .map(|check| {
            std::iter::once(check.to_string())
                .chain(hosts.iter().map(|h| {
                    cells
                        .get(&(*check, h.as_str()))
                        .cloned()
                        .unwrap_or_default()
                }))
                .collect()
        })
        .collect();
    table::render(&header, &rows)
}

/// Every failed check on stderr, with its fix.
fn print_problems(printer: &Printer, findings: &[Finding]) {
    for f in findings.iter().filter(|f| !f.ok) {
        let host = f
            .host
            .as_deref()
            .map_or(String::new(), |h| format!("{h}: "));
        let fix = f
            .fix
            .as_deref()
            .map_or(String::new(), |x| format!("\n  fix: {x}"));
        printer.error(&format!("{host}{}: {}{fix}", f.check, f.detail));
    }
}

/// How to open `port` on the master, for the systems the hosts run.
fn firewall_fix(port: u16) -> String {
    format!(
        "open the port on the master: Linux `sudo ufw allow {port}/tcp` or \
         `sudo firewall-cmd --add-port={port}/tcp`; Windows `New-NetFirewallRule -DisplayName fleet -Direction Inbound -Protocol TCP -LocalPort {port} -Action Allow`"
    )
}

fn report(
    printer: &Printer,
    hosts: &[String],
    findings: &[Finding],
    unreachable: bool,
    before_run: bool,
) -> ExitCode {
    let failed = findings.iter().filter(|f| !f.ok).count();
    if before_run {
        print_problems(printer, findings);
        printer.info(&format!(
            "checked: {} of {} checks passed",
            findings.len() - failed,
            findings.len()
        ));
    } else if printer.json() {
        for finding in findings {
            printer.record(&CheckRecord {
                kind: "check",
                finding,
            });
        }
        printer.record(&Verdict {
            kind: "verdict",
            ok: failed == 0,
            failed,
        });
    } else {
        printer.write(Stream::Stdout, &grid(printer, hosts, findings));
        print_problems(printer, findings);
        if failed == 0 {
            printer.info("every check passed");
        }
    }
    match (unreachable, failed) {
        (true, _) => ExitCode::Unreachable,
        (false, 0) => ExitCode::Success,
        _ => ExitCode::Failure,
    }
}
