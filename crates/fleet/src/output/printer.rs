//! The one place that decides what goes to stdout (data: tables, command output, JSON lines)
//! and what goes to stderr (progress, diagnostics, remote stderr), and whether it is coloured.

use std::io::{self, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use console::{Color, Style};
use serde::Serialize;

use super::sanitize;

/// `--color`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    /// Colour when writing to a terminal and NO_COLOR is not set.
    #[default]
    Auto,
    Always,
    Never,
}

/// Which of the process's output streams a line belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// How one output stream is written.
#[derive(Debug)]
struct Sink {
    color: bool,
    terminal: bool,
    /// Set once a write fails with a broken pipe (`fleet ... | head`): later writes are dropped.
    closed: AtomicBool,
}

impl Sink {
    fn new(terminal: bool, choice: ColorChoice) -> Self {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let color = match choice {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => terminal && !no_color,
        };
        Sink {
            color,
            terminal,
            closed: AtomicBool::new(false),
        }
    }

    fn write(&self, out: &mut dyn Write, bytes: &[u8]) {
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        // A stream that cannot be written (a closed pipe: `fleet ... | head`) stays closed; the
        // run goes on and its exit code still tells how the hosts did.
        if out.write_all(bytes).and_then(|()| out.flush()).is_err() {
            self.closed.store(true, Ordering::Relaxed);
        }
    }
}

/// Writes data to stdout and messages to stderr, honouring `--json`, `--color`, `-q` and `-v`.
#[derive(Debug)]
pub struct Printer {
    stdout: Sink,
    stderr: Sink,
    json: bool,
    quiet: bool,
    verbose: bool,
}

impl Printer {
    pub fn new(color: ColorChoice, json: bool, quiet: bool, verbose: bool) -> Self {
        Printer {
            stdout: Sink::new(io::stdout().is_terminal(), color),
            stderr: Sink::new(io::stderr().is_terminal(), color),
            json,
            quiet,
            verbose,
        }
    }

    pub fn json(&self) -> bool {
        self.json
    }

    pub fn verbose(&self) -> bool {
        self.verbose
    }

    pub fn quiet(&self) -> bool {
        self.quiet
    }

    /// Whether lines may be redrawn in place: stderr is a terminal, and not `-q`, `--json` or CI.
    pub fn live(&self) -> bool {
        let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
        self.stderr.terminal && !self.quiet && !self.json && !ci
    }

    /// Whether stderr is a terminal (remote text is sanitised for it).
    pub fn stderr_is_terminal(&self) -> bool {
        self.stderr.terminal
    }

    /// Whether a question can be asked and answered: stdin and stderr are both terminals.
    pub fn can_prompt(&self) -> bool {
        self.stderr.terminal && io::stdin().is_terminal()
    }

    /// Progress bars: on a terminal only, never with `-q`, `--json` or in CI.
    pub fn progress_bars(&self) -> Option<indicatif::MultiProgress> {
        self.live().then(indicatif::MultiProgress::new)
    }

    fn sink(&self, stream: Stream) -> &Sink {
        match stream {
            Stream::Stdout => &self.stdout,
            Stream::Stderr => &self.stderr,
        }
    }

    /// A style that is applied only when `stream` is coloured.
    pub fn style(&self, stream: Stream, style: Style) -> Style {
        style.force_styling(self.sink(stream).color)
    }

    /// Writes text as it is (tables, reports) to `stream`.
    pub fn write(&self, stream: Stream, text: &str) {
        match stream {
            Stream::Stdout => self.stdout.write(&mut io::stdout().lock(), text.as_bytes()),
            Stream::Stderr => self.stderr.write(&mut io::stderr().lock(), text.as_bytes()),
        }
    }

    /// Data on stdout that holds text from hosts (tables, paths): on a terminal, control
    /// characters in it are shown, not obeyed.
    pub fn data(&self, text: &str) {
        let clean = super::sanitize::sanitize_text(text, self.stdout.terminal);
        self.write(Stream::Stdout, &clean);
    }

    /// `text` as it may be shown on stdout (see [`Printer::data`]), for text that is styled
    /// afterwards.
    pub fn clean<'t>(&self, text: &'t str) -> std::borrow::Cow<'t, str> {
        super::sanitize::sanitize_text(text, self.stdout.terminal)
    }

    /// One JSON Lines record on stdout.
    pub fn record<T: Serialize>(&self, value: &T) {
        match serde_json::to_string(value) {
            Ok(mut line) => {
                line.push('\n');
                self.write(Stream::Stdout, &line);
            }
            Err(e) => self.error(&format!("cannot encode a JSON record: {e}")),
        }
    }

    /// A line from a remote host, behind its prefix, sanitised when `stream` is a terminal.
    pub fn remote_line(&self, stream: Stream, prefix: &str, line: &[u8]) {
        let text = sanitize(line, self.sink(stream).terminal);
        let mut out = String::with_capacity(prefix.len() + text.len() + 1);
        out.push_str(prefix);
        out.push_str(&text);
        out.push('\n');
        self.write(stream, &out);
    }

    /// Progress and notes on stderr; silent with `-q` or `--json`.
    /// Messages may quote hosts (a file name, a host's stderr): on a terminal their control
    /// characters are shown, not obeyed.
    fn message<'m>(&self, message: &'m str) -> std::borrow::Cow<'m, str> {
        super::sanitize::sanitize_text(message, self.stderr.terminal)
    }

    pub fn info(&self, message: &str) {
        if !self.quiet && !self.json {
            self.write(Stream::Stderr, &format!("{}\n", self.message(message)));
        }
    }

    /// Details shown with `-v`.
    pub fn debug(&self, message: &str) {
        if self.verbose {
            self.write(Stream::Stderr, &format!("{}\n", self.message(message)));
        }
    }

    pub fn warn(&self, message: &str) {
        let label = self
            .style(Stream::Stderr, Style::new().yellow().bold())
            .apply_to("warning:");
        self.write(
            Stream::Stderr,
            &format!("{label} {}\n", self.message(message)),
        );
    }

    pub fn error(&self, message: &str) {
        let label = self
            .style(Stream::Stderr, Style::new().red().bold())
            .apply_to("error:");
        self.write(
            Stream::Stderr,
            &format!("{label} {}\n", self.message(message)),
        );
    }
}

const PALETTE: [Color; 6] = [
    Color::Cyan,
    Color::Magenta,
    Color::Yellow,
    Color::Green,
    Color::Blue,
    Color::Red,
];

/// Prefixes for remote lines, padded to a common width and coloured per host on a terminal:
/// `host1 | ` for `fleet exec`, `[3 host2] ` for the processes of a job.
#[derive(Debug)]
pub struct Labels {
    plain: Vec<String>,
    stdout: Vec<String>,
    stderr: Vec<String>,
}

impl Labels {
    /// One label per host name.
    pub fn hosts<S: AsRef<str>>(printer: &Printer, names: &[S]) -> Self {
        let width = names
            .iter()
            .map(|n| console::measure_text_width(n.as_ref()))
            .max()
            .unwrap_or(0);
        let plain = names
            .iter()
            .map(|n| format!("{} | ", pad(n.as_ref(), width)))
            .collect();
        Labels::paint(printer, plain, &(0..names.len()).collect::<Vec<_>>())
    }

    /// One label per process: (rank or `nK`, host name, host index).
    pub fn processes(printer: &Printer, processes: &[(String, String, usize)]) -> Self {
        let width = processes.iter().map(|p| p.0.len()).max().unwrap_or(1);
        let host_width = processes
            .iter()
            .map(|p| console::measure_text_width(&p.1))
            .max()
            .unwrap_or(0);
        let plain = processes
            .iter()
            .map(|(label, host, _)| format!("[{label:>width$} {}] ", pad(host, host_width)))
            .collect();
        let hosts: Vec<usize> = processes.iter().map(|p| p.2).collect();
        Labels::paint(printer, plain, &hosts)
    }

    fn paint(printer: &Printer, plain: Vec<String>, hosts: &[usize]) -> Self {
        let paint = |stream: Stream| {
            plain
                .iter()
                .zip(hosts)
                .map(|(p, host)| {
                    printer
                        .style(stream, Style::new().fg(PALETTE[host % PALETTE.len()]))
                        .apply_to(p)
                        .to_string()
                })
                .collect()
        };
        Labels {
            stdout: paint(Stream::Stdout),
            stderr: paint(Stream::Stderr),
            plain,
        }
    }

    /// The prefix of `index` for `stream`, coloured when that stream is.
    pub fn prefix(&self, index: usize, stream: Stream) -> &str {
        match stream {
            Stream::Stdout => &self.stdout[index],
            Stream::Stderr => &self.stderr[index],
        }
    }

    /// Without colour, for files.
    pub fn plain(&self, index: usize) -> &str {
        &self.plain[index]
    }
}

/// `text` followed by spaces up to `width` display columns.
fn pad(text: &str, width: usize) -> String {
    format!(
        "{text}{}",
        " ".repeat(width.saturating_sub(console::measure_text_width(text)))
    )
}
