//! A training job seen through its log: fleet-train (or any program printing the same JSON
//! events) reports `progress` and `validation` on rank 0 and a `summary` on every rank. While the
//! job runs, rank 0's progress becomes one status line, redrawn in place on a terminal; at the
//! end the curves and each rank's throughput are drawn into `runs/<job>/training.svg`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fleet_events::{Progress, Resume, Summary, TrainEvent as Event, Validation};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::output::{self, Printer, Stream};

/// Whether `line` is one of fleet-train's machine events, which people see as the status line,
/// sentences and the final table rather than as JSON.
pub fn is_event(line: &str) -> bool {
    Event::parse(line).is_some()
}

/// What the job's lines said about training, and the status line showing it.
pub struct Training {
    pub progress: Vec<Progress>,
    pub validations: Vec<Validation>,
    pub summaries: Vec<Summary>,
    pub resume: Option<Resume>,
    /// Redrawn status line (terminal only), made at the first progress event.
    bar: Option<ProgressBar>,
    live: bool,
    /// Sentences for people (not `--json`, not `--quiet`).
    speaks: bool,
    last_plain: Option<Instant>,
}

impl Training {
    pub fn new(printer: &Printer) -> Training {
        Training {
            progress: Vec::new(),
            validations: Vec::new(),
            summaries: Vec::new(),
            resume: None,
            bar: None,
            live: printer.live(),
            speaks: !printer.json() && !printer.quiet(),
            last_plain: None,
        }
    }

    /// Looks at one line of the process labelled `label`. Returns true when the line is one of
    /// fleet-train's events, which people see another way: rank 0's progress as the status line
    /// (on a terminal) or a line every 5 s (off one), its other events as sentences, and every
    /// rank's summary in the final table. The events stay in the run folder and in `--json`.
    pub fn observe(&mut self, label: &str, line: &str, printer: &Printer) -> bool {
        let Some(event) = Event::parse(line) else {
            return false;
        };
        if let Event::Summary(summary) = event {
            self.summaries.push(summary);
            return true;
        }
        if label != "0" {
            return true;
        }
        let sentence = match event {
            Event::Summary(_) => None,
            Event::Progress(progress) => self.progressed(progress),
            Event::Validation(v) => {
                let text = format!(
                    "epoch {} validation accuracy {:.4}, loss {:.4}",
                    v.epoch, v.val_accuracy, v.val_loss
                );
                self.validations.push(v);
                Some(text)
            }
            Event::Resume(resume) => {
                let text = match (&resume.other_job, resume.found) {
                    (Some(other), _) => format!(
                        "the checkpoint in {} is job {other}'s (step {}): starting afresh",
                        resume.dir, resume.step
                    ),
                    (None, true) => format!(
                        "resumed from the checkpoint at step {} in {}",
                        resume.step, resume.dir
                    ),
                    (None, false) => format!("no checkpoint in {}: starting afresh", resume.dir),
                };
                self.resume = Some(resume);
                Some(text)
            }
            Event::Checkpoint(c) => Some(format!("checkpoint saved at step {}", c.step)),
            Event::WorldChanged(w) => Some(format!(
                "the checkpoint was made by {} ranks, this job has {}: grad_accum {}{}",
                w.from,
                w.to,
                w.grad_accum,
                if w.global_batch_kept {
                    " keeps the global batch"
                } else {
                    " (the global batch cannot be kept)"
                }
            )),
            Event::Model(m) => Some(format!(
                "loaded {} tensors of the model{}",
                m.loaded,
                match m.initialised.len() {
                    0 => String::new(),
                    n => format!(", {} newly initialised", output::count(n, "tensor")),
                }
            )),
        };
        if let Some(sentence) = sentence.filter(|_| self.speaks) {
            let text = format!("training: {sentence}\n");
            self.suspend(|| printer.write(Stream::Stderr, &text));
        }
        true
    }

    /// Records rank 0's progress; returns the line to print off a terminal (every 5 s at most).
    /// On a terminal the status line shows it.
    fn progressed(&mut self, progress: Progress) -> Option<String> {
        let status = status(&progress);
        self.progress.push(progress);
        if self.live {
            if self.speaks {
                self.bar().set_message(status);
            }
            return None;
        }
        let due = self
            .last_plain
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(5));
        if !due {
            return None;
        }
        self.last_plain = Some(Instant::now());
        Some(status)
    }

    /// The last step rank 0 reported.
    pub fn last_step(&self) -> Option<u64> {
        self.progress.last().map(|p| p.step)
    }

    /// Runs `print` with the status line out of the way, so lines never tear it.
    pub fn suspend<T>(&self, print: impl FnOnce() -> T) -> T {
        match &self.bar {
            Some(bar) => bar.suspend(print),
            None => print(),
        }
    }

    fn bar(&mut self) -> &ProgressBar {
        self.bar.get_or_insert_with(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{spinner} training: {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        })
    }

    /// Clears the status line, then reports the result and draws the plot into `run_dir`.
    /// Returns the plot's path when one was written.
    pub fn finish(&mut self, run_dir: Option<&Path>, printer: &Printer) -> Option<PathBuf> {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if self.progress.is_empty() && self.validations.is_empty() && self.summaries.is_empty() {
            return None;
        }
        self.summaries.sort_by_key(|s| s.rank);
        let plot = run_dir.and_then(|dir| {
            let path = dir.join("training.svg");
            match super::plot::draw(&path, self) {
                Ok(()) => Some(path),
                Err(e) => {
                    printer.warn(&format!("cannot draw {}: {e}", path.display()));
                    None
                }
            }
        });
        if printer.json() {
            printer.record(&serde_json::json!({
                "type": "training",
                "val_accuracy": self.validations.last().map(|v| v.val_accuracy),
                "plot": plot,
                "ranks": self.summaries.iter().map(|s| serde_json::json!({
                    "rank": s.rank, "host": s.host, "samples_per_s": s.samples_per_s,
                    "step_ms": s.step_ms, "comm_fraction": s.comm_fraction,
                })).collect::<Vec<_>>(),
            }));
            return plot;
        }
        if printer.quiet() {
            return plot;
        }
        let mut text = String::new();
        if let Some(last) = self.validations.last() {
            text.push_str(&format!(
                "training: final validation accuracy {:.4} (loss {:.4}) after epoch {}, step {}\n",
                last.val_accuracy, last.val_loss, last.epoch, last.step
            ));
        }
        if !self.summaries.is_empty() {
            text.push_str("  rank  host              samples/s   step ms   comm\n");
            for s in &self.summaries {
                text.push_str(&format!(
                    "  {:<5} {:<16} {:>10.1} {:>9.1} {:>5.0}%\n",
                    s.rank,
                    s.host,
                    s.samples_per_s.unwrap_or(0.0),
                    s.step_ms.unwrap_or(0.0),
                    s.comm_fraction * 100.0
                ));
            }
        }
        if let Some(path) = &plot {
            text.push_str(&format!("  curves: {}\n", path.display()));
        }
        printer.write(Stream::Stderr, &text);
        plot
    }
}

fn status(p: &Progress) -> String {
    let mut text = format!(
        "epoch {}/{}  step {}/{}  loss {:.4}",
        p.epoch, p.epochs, p.step, p.steps, p.loss
    );
    if p.samples_per_s > 0.0 {
        text.push_str(&format!("  {:.0} samples/s", p.samples_per_s));
    }
    if p.step < p.steps {
        text.push_str(&format!("  ETA {}", duration(p.eta_s)));
    }
    text
}

fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::ColorChoice;

    #[test]
    fn every_event_is_taken_off_the_log_and_rank_zeros_are_collected() {
        let printer = Printer::new(ColorChoice::Never, true, false, false);
        let mut training = Training::new(&printer);
        let progress = r#"{"event":"progress","epoch":1,"epochs":3,"step":10,"steps":90,"loss":0.5,"samples_per_s":100.0,"eta_s":80.0}"#;
        assert!(training.observe("0", progress, &printer));
        assert!(training.observe("1", progress, &printer));
        for other in [
            r#"{"event":"checkpoint","step":10,"dir":"checkpoints"}"#,
            r#"{"event":"resume","found":false,"dir":"checkpoints"}"#,
            r#"{"event":"world_changed","from":3,"to":2,"grad_accum":3,"global_batch_kept":true}"#,
            r#"{"event":"model","loaded":199,"initialised":["classifier.weight"]}"#,
        ] {
            assert!(training.observe("0", other, &printer), "{other}");
        }
        // Lines that are not fleet-train's events are the program's own and stay.
        assert!(!training.observe("0", "{\"not\": \"an event\"}", &printer));
        assert!(!training.observe("0", r#"{"event":"deploy","to":"prod"}"#, &printer));
        assert!(!training.observe("0", "plain text", &printer));
        let validation = r#"{"event":"validation","epoch":1,"step":30,"train_loss":0.4,"val_loss":0.3,"val_accuracy":0.9}"#;
        assert!(training.observe("0", validation, &printer));
        assert!(training.observe("2", r#"{"event":"summary","rank":2,"host":"h3","samples_per_s":5.0,"step_ms":9.0,"comm_fraction":0.25}"#, &printer));
        assert_eq!(training.progress.len(), 1);
        assert_eq!(training.validations[0].val_accuracy, 0.9);
        assert_eq!(training.summaries[0].host, "h3");
        assert_eq!(training.resume.as_ref().map(|r| r.found), Some(false));
        assert_eq!(
            status(&training.progress[0]),
            "epoch 1/3  step 10/90  loss 0.5000  100 samples/s  ETA 1m20s"
        );
    }
}
