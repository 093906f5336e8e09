//! The one loop that owns a running job: it receives every follower's events and the user's
//! signals, prints and records the merged log, and decides when to stop the job.
//!
//! The first process to exit non-zero (or a host that is lost) stops every other process:
//! SIGTERM to each process group, then SIGKILL after the grace period. Ctrl-C once does the same
//! stop; a second Ctrl-C kills at once; a third leaves without waiting.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use serde::Serialize;
use tokio::sync::mpsc;

use super::follow::Event;
use super::plan::JobPlan;
use super::remote::{ProcState, Signal, parse_status, signal_script, status_script, stem};
use super::training::Training;
use crate::output::{Labels, LineSplitter, Printer, Stream, sanitize};
use crate::remote::{self, Script};
use crate::signals::Interrupts;
use crate::ssh::Session;

/// How many of a failed process's last lines are shown.
const TAIL_LINES: usize = 20;

/// How often the hosts are asked whether each process still exists. A process whose wrapper was
/// killed with it never writes an exit status; seen gone twice in a row, it counts as failed.
const WATCH: Duration = Duration::from_secs(5);

/// The exit status given to a process that vanished without one.
pub const VANISHED: i32 = 255;

/// How each process ended, and what that means for fleet's exit code.
#[derive(Debug, Default, Serialize)]
pub struct Outcome {
    /// Per process: its exit status (128 + n when killed by signal n); `None` if never known.
    pub exits: Vec<Option<i32>>,
    /// The process whose failure stopped the job.
    pub first_failure: Option<usize>,
    /// Hosts lost while the job ran, with why.
    pub lost: Vec<(String, String)>,
    pub interrupted: bool,
    /// Latest start minus earliest start.
    pub start_skew_ms: Option<f64>,
    pub lines: Vec<u64>,
    pub seconds: f64,
    /// The training curves drawn from fleet-train's events, if the job printed any.
    pub plot: Option<PathBuf>,
    /// The last step rank 0 reported, and the step it resumed from (fleet-train's events).
    pub trained_to: Option<u64>,
    pub resumed_from: Option<u64>,
}

impl Outcome {
    /// The exit code of `fleet run`: the first failed process's own code, 130 after Ctrl-C,
    /// 3 when a host was lost, 0 when everything succeeded.
    pub fn exit_code(&self) -> u8 {
        if self.interrupted {
            return 130;
        }
        if let Some(p) = self.first_failure {
            let code = self.exits[p].unwrap_or(1);
            return u8::try_from(code).ok().filter(|c| *c != 0).unwrap_or(1);
        }
        if !self.lost.is_empty() {
            return 3;
        }
        0
    }
}

/// What the loop needs to know about the job and how to reach it.
pub struct Supervisor<'a> {
    pub printer: &'a Printer,
    pub job: &'a JobPlan,
    pub host_names: &'a [String],
    /// Connected sessions, by host.
    pub sessions: &'a [Session],
    /// Each host's workdir, as the inventory gives it.
    pub workdirs: &'a [String],
    pub grace: Duration,
    pub timestamps: bool,
    /// Local folder for the per-process logs, the merged log and summary.json.
    pub run_dir: Option<PathBuf>,
    /// Per host: are its processes followed? (A host that refused the job started none.)
    pub followed: Vec<bool>,
    /// The user's stop signals: the first stops the job, the second kills it, the third leaves.
    pub interrupts: &'a Interrupts,
}

/// Per-process state of the loop.
struct Track {
    splitter: LineSplitter,
    /// Rank (or `nK`) and host, for `--json`.
    label: String,
    host: String,
    prefix: String,
    plain_prefix: String,
    tail: VecDeque<String>,
    file: Option<BufWriter<File>>,
    ended: bool,
}

/// Where lines go besides the track itself.
struct Sinks<'a> {
    printer: &'a Printer,
    /// `--timestamps`: seconds since the job started.
    stamp: Option<Duration>,
    merged: Option<&'a mut BufWriter<File>>,
    training: &'a mut Training,
}

impl Track {
    /// Prints and records every line `bytes` completes, or with `None` the last partial line
    /// of a process that ended. Returns how many lines that was.
    fn feed(&mut self, bytes: Option<&[u8]>, sinks: &mut Sinks<'_>) -> u64 {
        let Track {
            splitter,
            label,
            host,
            prefix,
            plain_prefix,
            tail,
            file,
            ..
        } = self;
        let mut count = 0;
        let mut emit = |line: &[u8]| {
            count += 1;
            let stamp = sinks
                .stamp
                .map_or(String::new(), |e| format!("+{:.3}s ", e.as_secs_f64()));
            let text = String::from_utf8_lossy(line);
            let in_status_line = sinks.training.observe(label, &text, sinks.printer);
            if sinks.printer.json() {
                sinks.printer.record(
                    &serde_json::json!({"type": "line", "rank": label, "host": host, "line": text}),
                );
            } else if !in_status_line {
                let printer = sinks.printer;
                sinks.training.suspend(|| {
                    printer.remote_line(Stream::Stdout, &format!("{stamp}{prefix}"), line)
                });
            }
            if let Some(m) = sinks.merged.as_deref_mut() {
                let _ = writeln!(m, "{stamp}{plain_prefix}{text}");
            }
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(text.into_owned());
        };
        match bytes {
            Some(bytes) => {
                if let Some(file) = file.as_mut() {
                    let _ = file.write_all(bytes);
                }
                splitter.push(bytes, &mut emit);
            }
            None => {
                splitter.finish(&mut emit);
                if let Some(file) = file.as_mut() {
                    let _ = file.flush();
                }
            }
        }
        count
    }
}

impl<'a> Supervisor<'a> {
    /// Supervises until every followed process has ended. With `stop_first`, the job is
    /// stopped at once (some host refused it).
    pub async fn run(&self, mut events: mpsc::Receiver<Event>, stop_first: bool) -> Outcome {
        let mut job = Watched::new(self);
        let mut interrupts = self.interrupts.from_now();
        let mut watch = tokio::time::interval_at(tokio::time::Instant::now() + WATCH, WATCH);
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The hosts are asked in the background, so a slow answer never holds up the log.
        let mut checks: FuturesUnordered<BoxFuture<'_, Vec<usize>>> = FuturesUnordered::new();
        if stop_first {
            job.stop();
        }
        // A signal that came while the job was starting stops it now.
        if self.interrupts.count() > 0 {
            job.outcome.interrupted = true;
            job.stop();
        }
        while job.tracks.iter().any(|t| !t.ended) {
            tokio::select! {
                event = events.recv() => {
                    let Some(event) = event else { break };
                    job.on_event(event);
                }
                () = interrupts.next() => {
                    if job.on_interrupt() == Leave::Now {
                        break;
                    }
                }
                _ = watch.tick(), if checks.is_empty() => {
                    let open: Vec<usize> = (0..job.tracks.len()).filter(|&p| !job.tracks[p].ended).collect();
                    checks.push(Box::pin(self.vanished(open)));
                }
                Some(gone) = checks.next(), if !checks.is_empty() => job.on_watch(gone),
                () = sleep_until(job.kill_at), if job.kill_at.is_some() && !job.killed => job.on_grace_over(),
                Some(()) = job.stopping.next(), if !job.stopping.is_empty() => {}
            }
        }
        job.finish().await
    }

    /// The last lines of a failed process, on stderr.
    fn print_tail(&self, process: usize, tail: &VecDeque<String>) {
        if tail.is_empty() {
            return;
        }
        let mut text = format!("last {} lines of {}:\n", tail.len(), self.describe(process));
        for line in tail {
            text.push_str("  ");
            text.push_str(&sanitize(
                line.as_bytes(),
                self.printer.stderr_is_terminal(),
            ));
            text.push('\n');
        }
        self.printer.write(Stream::Stderr, &text);
    }

    /// Sends SIGTERM to every process group and sets when SIGKILL follows, unless a stop is
    /// already under way. Returns whether this call began it.
    fn begin_stop<'s>(
        &'s self,
        stopping: &mut FuturesUnordered<BoxFuture<'s, ()>>,
        kill_at: &mut Option<tokio::time::Instant>,
    ) -> bool {
        if kill_at.is_some() {
            return false;
        }
        stopping.push(Box::pin(self.signal_all(Signal::Term)));
        *kill_at = Some(tokio::time::Instant::now() + self.grace);
        true
    }

    /// Why the job stopped, in a few words, when it failed.
    pub fn reason(&self, outcome: &Outcome) -> Option<String> {
        if let Some(p) = outcome.first_failure {
            let process = &self.job.processes[p];
            let code = outcome.exits[p].unwrap_or(1);
            return Some(format!(
                "{} on {} exited with {code}{}",
                self.describe(p),
                self.host_names[process.host],
                signal_note(code)
            ));
        }
        if !outcome.lost.is_empty() {
            let hosts: Vec<&str> = outcome.lost.iter().map(|(h, _)| h.as_str()).collect();
            return Some(format!("{} lost", hosts.join(", ")));
        }
        None
    }

    fn describe(&self, process: usize) -> String {
        let label = &self.job.processes[process].label;
        match label.strip_prefix('n') {
            Some(node) => format!("node {node}"),
            None => format!("rank {label}"),
        }
    }

    fn tracks(&self) -> Vec<Track> {
        let described: Vec<(String, String, usize)> = self
            .job
            .processes
            .iter()
            .map(|p| (p.label.clone(), self.host_names[p.host].clone(), p.host))
            .collect();
        let labels = Labels::processes(self.printer, &described);
        self.job
            .processes
            .iter()
            .map(|p| {
                let file = self
                    .run_dir
                    .as_ref()
                    .and_then(|d| File::create(d.join(format!("{}.log", stem(p)))).ok())
                    .map(BufWriter::new);
                Track {
                    splitter: LineSplitter::new(),
                    label: p.label.clone(),
                    host: self.host_names[p.host].clone(),
                    prefix: labels.prefix(p.index, Stream::Stdout).to_string(),
                    plain_prefix: labels.plain(p.index).to_string(),
                    tail: VecDeque::with_capacity(TAIL_LINES),
                    file,
                    ended: !self.followed[p.host],
                }
            })
            .collect()
    }

    /// A rank whose output lands on a full disk fails without a word (its last lines could not
    /// be written either), so the host's free space is looked at and named when it is gone.
    async fn note_full_disk(&self, host: usize) {
        let script = Script::new(remote::DISK_FREE).arg(&self.workdirs[host]);
        let asked = tokio::time::timeout(WATCH, self.sessions[host].capture(&script)).await;
        let Ok(Ok((_, out, _))) = asked else { return };
        let free_kib: u64 = String::from_utf8_lossy(&out)
            .trim()
            .parse()
            .unwrap_or(u64::MAX);
        if free_kib < 64 {
            self.printer.error(&format!(
                "{}: the disk holding {} is full ({free_kib} KiB free): the job's output could not be written there",
                self.host_names[host], self.workdirs[host]
            ));
        }
    }

    /// Which of the `open` processes their host reports as gone without an exit status.
    async fn vanished(&self, open: Vec<usize>) -> Vec<usize> {
        let open = &open;
        let asks = self
            .sessions
            .iter()
            .enumerate()
            .map(|(host, session)| async move {
                let open: Vec<&super::Process> = self
                    .job
                    .on_host(host)
                    .filter(|p| open.contains(&p.index))
                    .collect();
                if open.is_empty() {
                    return Vec::new();
                }
                let script = status_script(&self.workdirs[host], Some(&self.job.job_id), false);
                let asked = tokio::time::timeout(WATCH, session.capture(&script)).await;
                let Ok(Ok((_, out, _))) = asked else {
                    return Vec::new();
                };
                let states = parse_status(&String::from_utf8_lossy(&out));
                open.into_iter()
                    .filter(|p| {
                        let stem = stem(p);
                        states
                            .iter()
                            .flat_map(|j| &j.processes)
                            .any(|s| s.stem == stem && s.state == ProcState::Lost)
                    })
                    .map(|p| p.index)
                    .collect()
            });
        futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Sends `signal` to every process group of the job on every host still connected.
    async fn signal_all(&self, signal: Signal) {
        let signals = self
            .sessions
            .iter()
            .enumerate()
            .map(|(host, session)| async move {
                let stems: Vec<String> = self.job.on_host(host).map(stem).collect();
                let script = signal_script(&self.workdirs[host], &self.job.job_id, &stems, signal);
                if let Err(e) = session.capture(&script).await {
                    self.printer.warn(&format!(
                        "{}: could not send SIG{}: {e}",
                        self.host_names[host],
                        signal.name()
                    ));
                }
            });
        futures::future::join_all(signals).await;
    }
}

/// Whether the user asked to leave without waiting (the third Ctrl-C).
#[derive(PartialEq, Eq)]
enum Leave {
    Now,
    AfterTheStop,
}

/// The supervision loop's state: one job being watched until every process has ended.
struct Watched<'s, 'a> {
    sup: &'s Supervisor<'a>,
    started: Instant,
    outcome: Outcome,
    tracks: Vec<Track>,
    training: Training,
    merged: Option<BufWriter<File>>,
    starts: Vec<Option<u128>>,
    /// Signals on their way to the hosts.
    stopping: FuturesUnordered<BoxFuture<'s, ()>>,
    /// Set once the graceful stop began (SIGTERM sent): when SIGKILL follows.
    kill_at: Option<tokio::time::Instant>,
    killed: bool,
    /// Processes the last look found gone; gone again at the next, they vanished.
    suspects: Vec<usize>,
}

impl<'s, 'a> Watched<'s, 'a> {
    fn new(sup: &'s Supervisor<'a>) -> Watched<'s, 'a> {
        let n = sup.job.processes.len();
        Watched {
            sup,
            started: Instant::now(),
            outcome: Outcome {
                exits: vec![None; n],
                lines: vec![0; n],
                ..Outcome::default()
            },
            tracks: sup.tracks(),
            training: Training::new(sup.printer),
            merged: sup
                .run_dir
                .as_ref()
                .and_then(|d| File::create(d.join("merged.log")).ok())
                .map(BufWriter::new),
            starts: vec![None; n],
            stopping: FuturesUnordered::new(),
            kill_at: None,
            killed: false,
            suspects: Vec::new(),
        }
    }

    /// Begins the graceful stop unless it is under way; returns whether this call began it.
    fn stop(&mut self) -> bool {
        self.sup.begin_stop(&mut self.stopping, &mut self.kill_at)
    }

    /// Prints and records what `bytes` completes of a process's output (`None`: it ended).
    fn feed(&mut self, process: usize, bytes: Option<&[u8]>) {
        let mut sinks = Sinks {
            printer: self.sup.printer,
            stamp: self.sup.timestamps.then(|| self.started.elapsed()),
            merged: self.merged.as_mut(),
            training: &mut self.training,
        };
        self.outcome.lines[process] += self.tracks[process].feed(bytes, &mut sinks);
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Started { process, at_ns } => self.starts[process] = Some(at_ns),
            Event::Caught { .. } => {}
            Event::Output { process, bytes } => self.feed(process, Some(&bytes)),
            Event::Exited { process, code } => self.on_exit(process, code),
            Event::Lost { host, error } => self.on_lost(host, error),
        }
    }

    /// A process ended with `code`: a failure, the first, stops the job.
    fn on_exit(&mut self, process: usize, code: i32) {
        self.feed(process, None);
        self.tracks[process].ended = true;
        self.outcome.exits[process] = Some(code);
        if code != 0 {
            self.first_failure(process, format!("exited with {code}{}", signal_note(code)));
        }
        if self.outcome.first_failure.is_some() {
            self.stop();
        }
    }

    /// A host was lost: its processes count as ended, and the job stops.
    fn on_lost(&mut self, host: usize, error: String) {
        let name = &self.sup.host_names[host];
        self.sup.printer.error(&format!(
            "{name}: lost while the job ran ({error}); stopping the other processes"
        ));
        self.outcome.lost.push((name.clone(), error));
        for p in self.sup.job.on_host(host) {
            self.tracks[p.index].ended = true;
        }
        self.stop();
    }

    /// Records `process` as the failure that stops the job, if it is the first and no stop was
    /// under way, and says so: "rank R on HOST `what`; stopping the other processes".
    fn first_failure(&mut self, process: usize, what: String) {
        if self.outcome.first_failure.is_some() || self.kill_at.is_some() {
            return;
        }
        self.outcome.first_failure = Some(process);
        let host = self.sup.job.processes[process].host;
        self.sup.printer.error(&format!(
            "{} on {} {what}; stopping the other processes",
            self.sup.describe(process),
            self.sup.host_names[host]
        ));
    }

    /// Ctrl-C: the first stops the job, the second kills it, the third leaves.
    fn on_interrupt(&mut self) -> Leave {
        self.outcome.interrupted = true;
        let printer = self.sup.printer;
        if self.stop() {
            printer.warn(&format!(
                "interrupted: stopping every process (Ctrl-C again to kill them now, {}s grace)",
                self.sup.grace.as_secs()
            ));
        } else if !self.killed {
            printer.warn("killing every process now (Ctrl-C again to leave without waiting)");
            self.kill();
        } else {
            printer.warn("leaving without waiting: processes may still be running; see fleet ps");
            return Leave::Now;
        }
        Leave::AfterTheStop
    }

    /// What a look at the hosts found gone: a process gone twice in a row vanished, which is
    /// a failure.
    fn on_watch(&mut self, gone: Vec<usize>) {
        let gone: Vec<usize> = gone
            .into_iter()
            .filter(|&p| !self.tracks[p].ended)
            .collect();
        let vanished: Vec<usize> = gone
            .iter()
            .copied()
            .filter(|p| self.suspects.contains(p))
            .collect();
        for process in vanished {
            self.tracks[process].ended = true;
            self.outcome.exits[process] = Some(VANISHED);
            self.first_failure(
                process,
                "vanished: it and its wrapper are gone without an exit status".to_string(),
            );
            self.stop();
        }
        self.suspects = gone;
    }

    /// The grace period ended with processes still running.
    fn on_grace_over(&mut self) {
        self.sup.printer.warn(&format!(
            "processes still running after {}s: killing them",
            self.sup.grace.as_secs()
        ));
        self.kill();
    }

    fn kill(&mut self) {
        self.killed = true;
        self.stopping
            .push(Box::pin(self.sup.signal_all(Signal::Kill)));
    }

    /// Waits for the signals under way, then makes the outcome: start skew, time, training,
    /// and the first failure's full disk and last lines.
    async fn finish(mut self) -> Outcome {
        // Signals sent but not yet confirmed still finish, so no process outlives a stop.
        while self.stopping.next().await.is_some() {}
        if let Some(m) = &mut self.merged {
            let _ = m.flush();
        }
        let (sup, mut outcome) = (self.sup, self.outcome);
        let known: Vec<u128> = self.starts.iter().flatten().copied().collect();
        if let (Some(min), Some(max)) = (known.iter().min(), known.iter().max()) {
            outcome.start_skew_ms = Some((max - min) as f64 / 1e6);
        }
        outcome.seconds = self.started.elapsed().as_secs_f64();
        outcome.plot = self.training.finish(sup.run_dir.as_deref(), sup.printer);
        outcome.trained_to = self.training.last_step();
        outcome.resumed_from = self
            .training
            .resume
            .as_ref()
            .map(|r| if r.found { r.step } else { 0 });
        if let Some(p) = outcome.first_failure {
            sup.note_full_disk(sup.job.processes[p].host).await;
            sup.print_tail(p, &self.tracks[p].tail);
        }
        outcome
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn signal_note(code: i32) -> String {
    match code {
        129..=159 => format!(" (killed by signal {})", code - 128),
        _ => String::new(),
    }
}
