//! `fleet exec -- CMD ARGS...`: one command on every host at once, output merged line by line.

use anyhow::Result;
use futures::future::join_all;
use serde::Serialize;

use super::Fleet;
use crate::cli::ExecArgs;
use crate::exit_code::ExitCode;
use crate::output::{Labels, LineSplitter, Printer, Stream};
use crate::remote::{self, Script};
use crate::shell;
use crate::ssh::{ConnectOptions, ExitStatus, Session, SshError, Target};

/// A `--json` record: one line of a host's output.
#[derive(Serialize)]
struct LineRecord<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    host: &'a str,
    stream: Stream,
    line: &'a str,
}

/// The last `--json` record: how every host ended.
#[derive(Serialize)]
struct SummaryRecord<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    ok: bool,
    hosts: Vec<HostSummary<'a>>,
}

#[derive(Serialize)]
struct HostSummary<'a> {
    host: &'a str,
    /// "exited", "signal", or why the command never ran or never finished
    /// ("unreachable", "host_key", "auth", "ssh", "lost").
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit_code: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signal: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

pub async fn run(fleet: &Fleet, args: &ExecArgs) -> Result<ExitCode> {
    let inventory = fleet.inventory()?;
    let targets = fleet.targets(&inventory)?;
    let options = fleet.connect_options(&inventory, &targets).await?;
    // One argument with spaces in it is a shell line, as `ssh host 'a && b'` takes it.
    let one_line = matches!(&args.command[..], [line] if line.contains(char::is_whitespace));
    let line = if args.shell || one_line {
        args.command.join(" ")
    } else {
        shell::join(&args.command)
    };
    let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
    let labels = Labels::hosts(&fleet.printer, &names);

    let outcomes = join_all(targets.iter().enumerate().map(|(index, target)| {
        let activate = match args.no_activate {
            true => String::new(),
            false => inventory.hosts[index].activate.clone().unwrap_or_default(),
        };
        let command = Script::new(remote::EXEC).args([line.clone(), activate]);
        run_on(&fleet.printer, &labels, &options, index, target, command)
    }))
    .await;

    for learned in options.host_keys.learned() {
        fleet.printer.info(&format!(
            "{}: recorded host key {} of {}",
            learned.host, learned.fingerprint, learned.endpoint
        ));
    }
    Ok(summarise(&fleet.printer, &targets, &outcomes))
}

async fn run_on(
    printer: &Printer,
    labels: &Labels,
    options: &ConnectOptions,
    index: usize,
    target: &Target,
    command: Script,
) -> Result<ExitStatus, SshError> {
    let session = Session::connect(target, options).await?;
    printer.debug(&format!(
        "{}: connected to {} as {}",
        target.name,
        target.endpoint(),
        target.user
    ));
    let mut output = HostOutput {
        printer,
        labels,
        index,
        host: &target.name,
        stdout: LineSplitter::new(),
        stderr: LineSplitter::new(),
    };
    let status = session
        .exec_attended(&command, |stream, data| output.push(stream, data))
        .await;
    output.finish();
    session.close().await;
    status
}

/// Assembles one host's output into lines and prints each whole.
struct HostOutput<'a> {
    printer: &'a Printer,
    labels: &'a Labels,
    index: usize,
    host: &'a str,
    stdout: LineSplitter,
    stderr: LineSplitter,
}

impl HostOutput<'_> {
    fn push(&mut self, stream: Stream, data: &[u8]) {
        let (printer, labels, index, host) = (self.printer, self.labels, self.index, self.host);
        let splitter = match stream {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        };
        splitter.push(data, |line| {
            emit(printer, labels, index, host, stream, line)
        });
    }

    fn finish(&mut self) {
        let (printer, labels, index, host) = (self.printer, self.labels, self.index, self.host);
        self.stdout
            .finish(|line| emit(printer, labels, index, host, Stream::Stdout, line));
        self.stderr
            .finish(|line| emit(printer, labels, index, host, Stream::Stderr, line));
    }
}

fn emit(printer: &Printer, labels: &Labels, index: usize, host: &str, stream: Stream, line: &[u8]) {
    if printer.json() {
        let text = String::from_utf8_lossy(line);
        printer.record(&LineRecord {
            kind: "line",
            host,
            stream,
            line: &text,
        });
    } else {
        printer.remote_line(stream, labels.prefix(index, stream), line);
    }
}

/// Reports how each host ended and decides the exit code from all of them.
fn summarise(
    printer: &Printer,
    targets: &[Target],
    outcomes: &[Result<ExitStatus, SshError>],
) -> ExitCode {
    let mut code = ExitCode::Success;
    let mut hosts = Vec::with_capacity(targets.len());
    let mut failed = Vec::new();
    for (target, outcome) in targets.iter().zip(outcomes) {
        let host = target.name.as_str();
        let summary = match outcome {
            Ok(ExitStatus::Code(c)) => {
                if *c != 0 {
                    failed.push(format!("{host} (exit {c})"));
                    printer.error(&format!("{host}: exited with {c}"));
                }
                HostSummary {
                    host,
                    status: "exited",
                    exit_code: Some(*c),
                    signal: None,
                    error: None,
                }
            }
            Ok(ExitStatus::Signal(s)) => {
                failed.push(format!("{host} (killed by SIG{s})"));
                printer.error(&format!("{host}: killed by SIG{s}"));
                HostSummary {
                    host,
                    status: "signal",
                    exit_code: None,
                    signal: Some(s),
                    error: None,
                }
            }
            Err(e) => {
                failed.push(format!("{host} ({})", e.kind().replace('_', " ")));
                printer.error(&e.to_string());
                HostSummary {
                    host,
                    status: e.kind(),
                    exit_code: None,
                    signal: None,
                    error: Some(e.to_string()),
                }
            }
        };
        code = match outcome {
            Err(_) => code.max_with(ExitCode::Unreachable),
            Ok(status) if !status.success() => code.max_with(ExitCode::Failure),
            Ok(_) => code,
        };
        hosts.push(summary);
    }
    if printer.json() {
        printer.record(&SummaryRecord {
            kind: "summary",
            ok: code == ExitCode::Success,
            hosts,
        });
    } else if !failed.is_empty() {
        printer.error(&format!(
            "{} of {} hosts failed: {}",
            failed.len(),
            targets.len(),
            failed.join(", ")
        ));
    } else {
        printer.debug(&format!("all {} hosts exited 0", targets.len()));
    }
    code
}
