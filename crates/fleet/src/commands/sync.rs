//! `fleet sync`: the local project folder onto every host, verified; `--dry-run` shows the plan,
//! `--verify` re-hashes every host's copy and lists what differs.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared, join_all};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use russh_sftp::client::RawSftpSession;
use serde::Serialize;

use super::{Fleet, table};
use crate::cli::SyncArgs;
use crate::exit_code::ExitCode;
use crate::inventory::{Host, Inventory};
use crate::output::{Printer, Stream};
use crate::ssh::{ConnectOptions, Session, Target};
use crate::sync::remote::{HostState, HostTree, SyncError};
use crate::sync::transfer::{Applied, Progress, Transfer};
use crate::sync::{
    Entry, Filter, KEPT_BYTES, Manifest, ManifestError, Plan, RemoteEntry, SavedCopy, Scan, plan,
    scan_project, split_listing,
};

/// How one host's sync ended.
#[derive(Debug)]
enum HostResult {
    Synced {
        plan: Plan,
        applied: Applied,
        seconds: f64,
    },
    Planned(Plan),
    Verified(Vec<Difference>),
}

/// A file that is not the same on a host as locally (`--verify`).
#[derive(Debug, Serialize)]
struct Difference {
    path: String,
    /// "differs", "missing" or "extra".
    problem: &'static str,
}

#[derive(Default, Serialize)]
struct HostRecord<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    host: &'a str,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    files_sent: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_sent: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unchanged: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    removed: Option<usize>,
    /// Paths on the host that are not in the project (without `--delete`).
    #[serde(skip_serializing_if = "Option::is_none")]
    extraneous: Option<Vec<String>>,
    /// With `--delete`: paths not in the project that no sync put there, kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    kept: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    plan: Option<&'a Plan>,
    #[serde(skip_serializing_if = "Option::is_none")]
    differences: Option<&'a [Difference]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

pub async fn run(fleet: &Fleet, args: &SyncArgs) -> Result<ExitCode> {
    sync(fleet, args, false).await
}

/// The sync before a `fleet run`: its report is progress, so it goes to stderr (no JSON).
pub async fn before_run(fleet: &Fleet) -> Result<ExitCode> {
    sync(fleet, &SyncArgs::default(), true).await
}

async fn sync(fleet: &Fleet, args: &SyncArgs, before_run: bool) -> Result<ExitCode> {
    let inventory = fleet.inventory()?;
    let targets = fleet.targets(&inventory)?;
    let options = fleet.connect_options(&inventory, &targets).await?;

    // The local scan runs while the hosts connect and list their trees.
    let started = Instant::now();
    let filter = Arc::new(Filter::new(
        &inventory.sync.source,
        &inventory.sync.exclude,
    )?);
    let scanned = start_scan(inventory.sync.source.clone(), filter.clone());
    let copies = saved_copies(&inventory, &targets);
    let known = read_copies(copies.clone());

    let context = HostContext {
        printer: &fleet.printer,
        options: &options,
        source: inventory.sync.source.clone(),
        scanned: scanned.clone(),
        copies,
        known,
        filter: &filter,
        args,
        bars: fleet.printer.progress_bars(),
        before_run,
        workdirs: inventory
            .hosts
            .iter()
            .map(|h| (h.name.clone(), h.workdir.clone()))
            .collect(),
        asking: tokio::sync::Mutex::new(()),
    };
    let results = join_all(
        inventory
            .hosts
            .iter()
            .zip(&targets)
            .enumerate()
            .map(|(index, (host, target))| context.sync_host(index, host, target)),
    )
    .await;
    drop(context);
    describe_scan(fleet, &inventory, scanned, started).await?;
    Ok(report(
        &fleet.printer,
        &inventory,
        &results,
        args,
        before_run,
    ))
}

/// Starts the scan of the project on a thread of its own, to be awaited by every host.
fn start_scan(source: PathBuf, filter: Arc<Filter>) -> SharedScan {
    let scanning = tokio::task::spawn_blocking(move || scan_project(&source, &filter, KEPT_BYTES));
    async move {
        Arc::new(scanning.await.unwrap_or_else(|e| {
            Err(ManifestError::Unreadable {
                path: PathBuf::from("(scan)"),
                error: std::io::Error::other(e.to_string()),
            })
        }))
    }
    .boxed()
    .shared()
}

/// Where the local copy of each host's manifest is kept, in inventory order.
fn saved_copies(inventory: &Inventory, targets: &[Target]) -> Vec<SavedCopy> {
    inventory
        .hosts
        .iter()
        .zip(targets)
        .map(|(host, target)| {
            SavedCopy::for_host(
                &format!("{}@{}:{}", target.user, target.addr, target.port),
                &host.workdir,
            )
        })
        .collect()
}

/// Reads the local copies of the hosts' manifests on a thread of its own.
fn read_copies(copies: Vec<SavedCopy>) -> SharedCopies {
    async move {
        Arc::new(
            tokio::task::spawn_blocking(move || SavedCopy::read_all(&copies))
                .await
                .unwrap_or_default(),
        )
    }
    .boxed()
    .shared()
}

/// Says what the scan found (files, bytes, hashed, time) once the hosts are done with it, or
/// returns its error with its type intact.
async fn describe_scan(
    fleet: &Fleet,
    inventory: &Inventory,
    scanned: SharedScan,
    started: Instant,
) -> Result<()> {
    let describe = |local: &Scan| {
        fleet.printer.info(&format!(
            "{}: {}, {} ({} hashed) in {:.2}s",
            inventory.sync.source.display(),
            crate::output::count(local.manifest.files().count(), "file"),
            human_bytes(local.manifest.total_bytes()),
            local.hashed,
            started.elapsed().as_secs_f64()
        ))
    };
    match Arc::try_unwrap(scanned.await) {
        Ok(Ok(local)) => describe(&local),
        Ok(Err(e)) => return Err(e.into()),
        Err(shared) => match shared.as_ref() {
            Ok(local) => describe(local),
            // Still shared by a host that is done with it: its message, still a usage error.
            Err(e) => return Err(crate::exit_code::UsageError(e.to_string()).into()),
        },
    }
    Ok(())
}

/// Awaits `applying` while redrawing the host's bar (if any) from the counters every 100 ms;
/// clears the bar at the end.
async fn with_bar<T>(
    applying: impl std::future::Future<Output = T>,
    bar: Option<ProgressBar>,
    progress: &Progress,
    files: usize,
) -> T {
    tokio::pin!(applying);
    let result = loop {
        tokio::select! {
            result = &mut applying => break result,
            // Redraw the bar from the counters; nothing waits on this.
            () = tokio::time::sleep(Duration::from_millis(100)), if bar.is_some() => {
                if let Some(bar) = &bar {
                    bar.set_position(progress.bytes.load(Ordering::Relaxed));
                    bar.set_message(format!("{}/{files} files", progress.files.load(Ordering::Relaxed)));
                }
            }
        }
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    result
}

/// The local scan, awaited by every host.
type SharedScan = Shared<BoxFuture<'static, Arc<Result<Scan, ManifestError>>>>;
/// The local copies of the hosts' manifests ([`SavedCopy::read_all`]), in inventory order.
type SharedCopies = Shared<BoxFuture<'static, Arc<Vec<Option<(String, Arc<Manifest>)>>>>>;

struct HostContext<'a> {
    printer: &'a Printer,
    options: &'a ConnectOptions,
    source: PathBuf,
    scanned: SharedScan,
    /// Where fleet keeps its copy of each host's manifest, in inventory order...
    copies: Vec<SavedCopy>,
    /// ...and what they hold.
    known: SharedCopies,
    filter: &'a Filter,
    args: &'a SyncArgs,
    bars: Option<MultiProgress>,
    /// The sync before a `fleet run`, which a running job refuses.
    before_run: bool,
    /// Each host's workdir as the inventory gives it, by host name.
    workdirs: std::collections::HashMap<String, String>,
    /// Held while a question about one host is on the terminal.
    asking: tokio::sync::Mutex<()>,
}

impl HostContext<'_> {
    /// The workdir of the host `tree` locked, as the inventory gives it.
    fn workdir(&self, tree: &HostTree<'_>) -> String {
        self.workdirs
            .get(tree.host())
            .cloned()
            .unwrap_or_else(|| tree.root.clone())
    }

    /// `--delete`: names what it will remove on the host and, on a terminal without `--yes`,
    /// asks (one host at a time). Returns whether to remove them.
    async fn confirm_removal(&self, host: &str, plan: &Plan) -> bool {
        if plan.extraneous.is_empty() {
            return true;
        }
        let _asking = self.asking.lock().await;
        self.printer.warn(&format!(
            "{host}: --delete removes {} path(s) an earlier sync put there: {}",
            plan.extraneous.len(),
            preview(&plan.extraneous)
        ));
        if self.args.yes || !self.printer.can_prompt() {
            return true;
        }
        self.printer
            .write(Stream::Stderr, &format!("Remove them from {host}? [y/N] "));
        let answer = tokio::task::spawn_blocking(|| console::Term::stderr().read_line())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let yes = matches!(answer.trim(), "y" | "Y" | "yes");
        if !yes {
            self.printer.info(&format!("{host}: kept them"));
        }
        yes
    }

    async fn sync_host(
        &self,
        index: usize,
        host: &Host,
        target: &Target,
    ) -> Result<HostResult, SyncError> {
        let started = Instant::now();
        // The local copy of the host's manifest is read while the host connects.
        let (session, known) =
            tokio::join!(Session::connect(target, self.options), self.known.clone());
        let session = session?;
        let known = known.get(index).cloned().flatten();
        let copy = &self.copies[index];
        self.printer.debug(&format!(
            "{}: connected after {:.0} ms",
            host.name,
            started.elapsed().as_secs_f64() * 1e3
        ));
        let result = self
            .with_session(&session, host, copy, known, started)
            .await;
        // A host that went away mid-sync (a crash, a cut link) fails whatever was on the wire;
        // it is a lost host (exit 3), with what failed as the reason.
        let result = match result {
            Err(e) if session.is_closed() && !matches!(e, SyncError::Ssh(_)) => {
                let reason = e.to_string();
                let reason = reason
                    .strip_prefix(&format!("{}: ", host.name))
                    .unwrap_or(&reason)
                    .to_string();
                Err(SyncError::Ssh(crate::ssh::SshError::Lost {
                    host: host.name.clone(),
                    reason: format!("during the sync: {reason}"),
                }))
            }
            other => other,
        };
        session.close().await;
        result
    }

    async fn with_session(
        &self,
        session: &Session,
        host: &Host,
        copy: &SavedCopy,
        known: Option<(String, Arc<Manifest>)>,
        started: Instant,
    ) -> Result<HostResult, SyncError> {
        let printer = self.printer;
        let (tree, sftp) = tokio::join!(
            HostTree::lock(session, &host.workdir, known, self.args.adopt, || {
                printer.info(&format!(
                    "{}: waiting for another sync of {} to finish",
                    host.name, host.workdir
                ))
            }),
            session.sftp()
        );
        let (tree, state) = tree?;
        let result = match sftp {
            Ok(sftp) => {
                let result = self.locked(&tree, state, &sftp, started).await;
                if let Ok(HostResult::Synced { applied, .. }) = &result {
                    if let Some(bytes) = &applied.copy {
                        copy.write(bytes);
                    }
                }
                let _ = sftp.close_session();
                result
            }
            Err(e) => Err(e.into()),
        };
        tree.release().await;
        result
    }

    async fn locked(
        &self,
        tree: &HostTree<'_>,
        state: HostState,
        sftp: &RawSftpSession,
        started: Instant,
    ) -> Result<HostResult, SyncError> {
        let scanned = self.scanned.clone().await;
        self.after(tree, "local scan ready", started);
        let Ok(scan) = scanned.as_ref() else {
            // The scan's own error is reported once, for all hosts.
            return Err(SyncError::Host {
                host: tree.host().to_string(),
                message: "the local scan failed".into(),
            });
        };
        let local = &scan.manifest;
        let HostState {
            saved,
            listing,
            confirmed,
            running_job,
        } = state;
        if let Some(refused) = self.running_job_refusal(tree, running_job.as_deref()) {
            return Err(refused);
        }
        self.after(tree, "locked and listed", started);
        let (listing, stale) = split_listing(listing, self.filter, local);
        if self.args.verify {
            return verify(tree, local, &listing)
                .await
                .map(HostResult::Verified);
        }
        let plan = plan(local, saved.as_deref(), &listing);
        let state = HostState {
            saved,
            listing,
            confirmed,
            running_job,
        };
        if self.args.dry_run {
            return Ok(HostResult::Planned(plan));
        }
        self.after(tree, "planned", started);
        tree.remove(&stale).await?;
        let delete = self.args.delete && self.confirm_removal(tree.host(), &plan).await;
        let progress = Progress::default();
        let bar = self
            .bars
            .as_ref()
            .map(|bars| host_bar(bars, tree.host(), &plan));
        let transfer = Transfer {
            tree,
            sftp,
            source: &self.source,
            scan,
            state: &state,
            plan: &plan,
            delete,
            progress: &progress,
        };
        let applied = with_bar(transfer.apply(), bar, &progress, plan.uploads.len()).await?;
        self.after(tree, "applied", started);
        Ok(HostResult::Synced {
            plan,
            applied,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// A debug line: how long after `started` the host got to `what`.
    fn after(&self, tree: &HostTree<'_>, what: &str, started: Instant) {
        self.printer.debug(&format!(
            "{}: {what} after {:.0} ms",
            tree.host(),
            started.elapsed().as_secs_f64() * 1e3
        ));
    }

    /// The refusal to change a workdir a job runs in before a run, or to --delete in it.
    fn running_job_refusal(
        &self,
        tree: &HostTree<'_>,
        running_job: Option<&str>,
    ) -> Option<SyncError> {
        let job = running_job?;
        if !(self.before_run || (self.args.delete && !self.args.dry_run)) {
            return None;
        }
        let why = if self.before_run {
            "(fleet stop, or wait for it); nothing was changed"
        } else {
            "and --delete could remove what it writes: nothing was changed (wait for it, or fleet stop)"
        };
        Some(SyncError::Host {
            host: tree.host().to_string(),
            message: format!("job {job} is still running in {} {why}", self.workdir(tree)),
        })
    }
}

/// Re-hashes every file on the host and compares it, and the rest of the tree, with `local`.
async fn verify(
    tree: &HostTree<'_>,
    local: &Manifest,
    listing: &crate::sync::Listing,
) -> Result<Vec<Difference>, SyncError> {
    let files: Vec<String> = listing
        .iter()
        .filter(|(_, e)| matches!(e, RemoteEntry::File { .. }))
        .map(|(p, _)| p.clone())
        .collect();
    let hashes = tree.hash(&files).await?;
    let mut differences = Vec::new();
    for (path, entry) in &local.entries {
        let problem = match (entry, listing.get(path)) {
            (_, None) => Some("missing"),
            (Entry::File { sha256, .. }, Some(RemoteEntry::File { .. })) => {
                (hashes.get(path) != Some(sha256)).then_some("differs")
            }
            (Entry::Dir, Some(RemoteEntry::Dir)) => None,
            (Entry::Link { target }, Some(RemoteEntry::Link { target: there })) => {
                (target != there).then_some("differs")
            }
            _ => Some("differs"),
        };
        if let Some(problem) = problem {
            differences.push(Difference {
                path: path.clone(),
                problem,
            });
        }
    }
    let known: BTreeSet<&String> = local.entries.keys().collect();
    differences.extend(
        listing
            .keys()
            .filter(|p| !known.contains(p))
            .map(|p| Difference {
                path: p.clone(),
                problem: "extra",
            }),
    );
    Ok(differences)
}

/// Reports each host's sync (a record each with --json, a table otherwise; a line before a
/// run) and returns the exit code they make together.
fn report(
    printer: &Printer,
    inventory: &Inventory,
    results: &[Result<HostResult, SyncError>],
    args: &SyncArgs,
    before_run: bool,
) -> ExitCode {
    let mut code = ExitCode::Success;
    let mut rows = Vec::new();
    for (host, result) in inventory.hosts.iter().zip(results) {
        let name = host.name.as_str();
        let mut record = HostRecord {
            kind: "host",
            host: name,
            ok: true,
            ..HostRecord::default()
        };
        match result {
            Ok(HostResult::Synced {
                plan,
                applied,
                seconds,
            }) => rows.push(synced(
                printer,
                &mut record,
                plan,
                applied,
                *seconds,
                args.delete,
            )),
            Ok(HostResult::Planned(plan)) => {
                record.plan = Some(plan);
                if !printer.json() {
                    print_plan(printer, name, plan, args.delete);
                }
            }
            Ok(HostResult::Verified(differences)) => {
                code = code.max_with(verified(printer, &mut record, differences));
            }
            Err(e) => code = code.max_with(failed(printer, &mut record, e)),
        }
        if printer.json() && !before_run {
            printer.record(&record);
        }
    }
    print_totals(printer, &rows, before_run);
    code
}

/// A host that was synced: its record filled in, a warning for what the host holds beyond the
/// project, and its row of the table.
fn synced<'a>(
    printer: &Printer,
    record: &mut HostRecord<'a>,
    plan: &'a Plan,
    applied: &Applied,
    seconds: f64,
    delete: bool,
) -> Vec<String> {
    let name = record.host;
    record.files_sent = Some(applied.files_sent);
    record.bytes_sent = Some(applied.bytes_sent);
    record.unchanged = Some(plan.unchanged);
    record.removed = Some(applied.removed);
    record.seconds = Some(seconds);
    if !delete {
        let extra = not_in_project(plan);
        if !extra.is_empty() {
            printer.warn(&format!(
                "{name}: {} path(s) on the host are not in the project (kept; --delete removes those an earlier sync put there): {}",
                extra.len(),
                preview(&extra)
            ));
        }
        record.extraneous = Some(extra);
    } else if !plan.foreign.is_empty() {
        printer.warn(&format!(
            "{name}: {} path(s) on the host are not in the project and no sync put them there (kept): {}",
            plan.foreign.len(),
            preview(&plan.foreign)
        ));
        record.kept = Some(&plan.foreign);
    }
    vec![
        name.to_string(),
        applied.files_sent.to_string(),
        human_bytes(applied.bytes_sent),
        plan.unchanged.to_string(),
        applied.removed.to_string(),
        format!("{seconds:.2}"),
    ]
}

/// A host that was verified (`--verify`): each difference, or that every file matches;
/// failure if any differs.
fn verified<'a>(
    printer: &Printer,
    record: &mut HostRecord<'a>,
    differences: &'a [Difference],
) -> ExitCode {
    let name = record.host;
    record.ok = differences.is_empty();
    record.differences = Some(differences);
    if !printer.json() {
        for d in differences {
            printer.data(&format!("{name}\t{}\t{}\n", d.problem, d.path));
        }
        if differences.is_empty() {
            printer.info(&format!("{name}: every file matches"));
        }
    }
    if differences.is_empty() {
        ExitCode::Success
    } else {
        ExitCode::Failure
    }
}

/// A host whose sync failed: named, exit 3 when it could not be reached.
fn failed(printer: &Printer, record: &mut HostRecord<'_>, e: &SyncError) -> ExitCode {
    record.ok = false;
    record.error = Some(e.to_string());
    printer.error(&e.to_string());
    if matches!(e, SyncError::Ssh(_)) {
        ExitCode::Unreachable
    } else {
        ExitCode::Failure
    }
}

/// The table of synced hosts, or before a run one line of what was sent.
fn print_totals(printer: &Printer, rows: &[Vec<String>], before_run: bool) {
    if before_run {
        let sent: usize = rows.iter().filter_map(|r| r[1].parse::<usize>().ok()).sum();
        printer.info(&format!(
            "synced {}: {} sent",
            crate::output::count(rows.len(), "host"),
            crate::output::count(sent, "file")
        ));
    } else if !rows.is_empty() && !printer.json() {
        let header = ["HOST", "SENT", "BYTES", "UNCHANGED", "REMOVED", "SECONDS"];
        printer.data(&table::render(&header, rows));
    }
}

/// Everything on the host that is not in the project, sorted: what an earlier sync put there
/// and what it did not.
fn not_in_project(plan: &Plan) -> Vec<String> {
    let mut all: Vec<String> = plan
        .extraneous
        .iter()
        .chain(&plan.foreign)
        .cloned()
        .collect();
    all.sort();
    all
}

/// One bar per host: bytes sent of the bytes to send, rate, files.
fn host_bar(bars: &MultiProgress, host: &str, plan: &Plan) -> ProgressBar {
    let bar = bars.add(ProgressBar::new(plan.upload_bytes()));
    let style = ProgressStyle::with_template(
        "{prefix:.bold} [{bar:30.cyan/blue}] {decimal_bytes}/{decimal_total_bytes} {decimal_bytes_per_sec} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(host.to_string());
    bar
}

fn print_plan(printer: &Printer, host: &str, plan: &Plan, delete: bool) {
    let mut lines = String::new();
    for p in &plan.conflicts {
        lines.push_str(&format!("{host}\treplace\t{p}\n"));
    }
    for d in &plan.mkdirs {
        lines.push_str(&format!("{host}\tmkdir\t{d}\n"));
    }
    for u in &plan.uploads {
        lines.push_str(
            &format!(
                "{host}\tsend\t{}\t{:?} {}\n",
                u.path,
                u.reason,
                human_bytes(u.size)
            )
            .replace("\tNew ", "\tnew ")
            .replace("\tChanged ", "\tchanged ")
            .replace("\tDrift ", "\tdrift "),
        );
    }
    for (p, mode) in &plan.chmods {
        lines.push_str(&format!("{host}\tchmod\t{p}\t{mode:o}\n"));
    }
    for (p, t) in &plan.links {
        lines.push_str(&format!("{host}\tlink\t{p}\t{t}\n"));
    }
    for p in &plan.extraneous {
        lines.push_str(&format!(
            "{host}\t{}\t{p}\n",
            if delete { "remove" } else { "extraneous" }
        ));
    }
    for p in &plan.foreign {
        lines.push_str(&format!(
            "{host}\t{}\t{p}\n",
            if delete { "keep" } else { "extraneous" }
        ));
    }
    printer.data(&lines);
    printer.info(&format!(
        "{host}: {} to send ({}), {} unchanged",
        plan.uploads.len(),
        human_bytes(plan.upload_bytes()),
        plan.unchanged
    ));
}

fn preview(paths: &[String]) -> String {
    let shown: Vec<&str> = paths.iter().take(5).map(String::as_str).collect();
    let more = paths.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// `1.5 MB`, decimal units like rsync and most file managers.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
