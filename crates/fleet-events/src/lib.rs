//! The protocol between a training rank and fleet: one JSON object per line on the rank's
//! stdout, named by its `event` field. fleet-train writes these with [`TrainEvent::line`]; fleet
//! reads every line of the ranks' logs with [`TrainEvent::parse`] and turns the events into its
//! status line, sentences, the final table and `training.svg`. Any other program may print the
//! same lines: every field that is not needed to make sense of an event may be left out.
//!
//! ```text
//! {"event":"progress","epoch":1,"epochs":3,"step":20,"steps":375,"loss":0.41,"lr":4.9e-4,...}
//! {"event":"validation","epoch":1,"step":125,"train_loss":0.52,"val_loss":0.33,"val_accuracy":0.91}
//! {"event":"summary","rank":0,"world_size":3,"host":"node1",...,"params_sha256":"..."}
//! ```
//!
//! Rank 0 prints `progress`, `validation`, `model`, `resume`, `world_changed` and `checkpoint`;
//! every rank ends with its `summary`.

use serde::{Deserialize, Deserializer, Serialize};

/// One line of a rank's output that fleet understands. (An event lives for one line; the
/// summary's size is no reason to box it.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TrainEvent {
    Model(Model),
    Resume(Resume),
    WorldChanged(WorldChanged),
    Progress(Progress),
    Validation(Validation),
    Checkpoint(Checkpoint),
    Summary(Summary),
}

impl TrainEvent {
    /// The event `line` holds, if it holds one.
    pub fn parse(line: &str) -> Option<TrainEvent> {
        let trimmed = line.trim();
        if !trimmed.starts_with('{') || !trimmed.contains("\"event\"") {
            return None;
        }
        serde_json::from_str(trimmed).ok()
    }

    /// The event as one line of JSON (without the newline).
    pub fn line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

/// A pretrained model was loaded: how many of its tensors, and which the model had to start
/// afresh (the classification head, typically).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Model {
    pub loaded: u64,
    #[serde(default)]
    pub initialised: Vec<String>,
}

/// A run looked for a checkpoint to continue from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resume {
    pub found: bool,
    /// The step it continues from (found), or the step of another job's checkpoint.
    #[serde(default)]
    pub step: u64,
    #[serde(default)]
    pub dir: String,
    /// Set when the checkpoint found belongs to another job (and was not used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_job: Option<String>,
}

/// The checkpoint was made by another number of ranks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorldChanged {
    pub from: u64,
    pub to: u64,
    /// The micro-batches per step this world takes...
    pub grad_accum: u64,
    /// ...and whether that keeps the global batch of the checkpoint's world.
    pub global_batch_kept: bool,
}

/// Training moved on (rank 0, every `--log-every` steps).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    #[serde(default)]
    pub epoch: u64,
    #[serde(default)]
    pub epochs: u64,
    pub step: u64,
    #[serde(default)]
    pub steps: u64,
    /// Over every rank's rows since the last progress event.
    #[serde(deserialize_with = "number_or_nan")]
    pub loss: f64,
    #[serde(default, deserialize_with = "number_or_nan")]
    pub lr: f64,
    #[serde(default, deserialize_with = "number_or_nan")]
    pub samples_per_s: f64,
    /// Mean milliseconds per step since the last progress event.
    #[serde(default, deserialize_with = "number_or_nan")]
    pub step_ms: f64,
    #[serde(default, deserialize_with = "number_or_nan")]
    pub eta_s: f64,
}

/// The validation split was evaluated (rank 0, after each epoch), over every rank's share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    #[serde(default)]
    pub epoch: u64,
    pub step: u64,
    #[serde(default, deserialize_with = "number_or_nan")]
    pub train_loss: f64,
    #[serde(deserialize_with = "number_or_nan")]
    pub val_loss: f64,
    #[serde(deserialize_with = "number_or_nan")]
    pub val_accuracy: f64,
    /// A resumed run found every step already trained and only evaluated.
    #[serde(default, skip_serializing_if = "is_false")]
    pub nothing_left: bool,
}

/// A checkpoint was written (rank 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub step: u64,
    #[serde(default)]
    pub dir: String,
}

/// How a rank's run went, its last line. Every field may be left out (`rank` is then 0); fleet
/// shows what is there.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Summary {
    pub rank: u64,
    pub world_size: u64,
    pub host: String,
    pub backend: String,
    pub device: String,
    pub steps: u64,
    pub epochs: u64,
    /// Trainable parameters (what each all-reduce moves, times the bytes of its dtype).
    pub params: u64,
    #[serde(deserialize_with = "number_or_nan")]
    pub train_loss: f64,
    #[serde(deserialize_with = "number_or_nan")]
    pub val_loss: f64,
    #[serde(deserialize_with = "number_or_nan")]
    pub val_accuracy: f64,
    /// Optimizer steps this run took (0 when it resumed with nothing left to train).
    pub steps_trained: u64,
    /// Absent when no step was trained: there is no rate to report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_ms: Option<f64>,
    /// The share of the step spent in the gradient all-reduce.
    #[serde(deserialize_with = "number_or_nan")]
    pub comm_fraction: f64,
    /// Mean milliseconds per step waiting for the gradient all-reduce after backward (with
    /// overlap, only the part the backward pass did not hide).
    #[serde(deserialize_with = "number_or_nan")]
    pub comm_ms: f64,
    /// Without overlap: mean milliseconds per step waiting for the slowest rank's backward.
    #[serde(deserialize_with = "number_or_nan")]
    pub wait_ms: f64,
    /// Whether the all-reduce overlapped the backward pass...
    pub overlap: bool,
    /// ...and the share of gradient buckets it started during the backward pass.
    #[serde(deserialize_with = "number_or_nan")]
    pub overlapped: f64,
    /// How many buckets the gradients are all-reduced in.
    pub buckets: u64,
    /// How the gradients travel: "none", "bf16"/"fp16" (the dtype alone), or "powersgd".
    pub compression: String,
    /// PowerSGD's rank (0: off).
    pub powersgd_rank: u64,
    /// Mean bytes each rank put into the gradient all-reduces per optimizer step.
    pub comm_bytes_per_step: u64,
    /// SHA-256 of the final parameters: equal on every rank of a healthy job.
    pub params_sha256: String,
    #[serde(deserialize_with = "number_or_nan")]
    pub seconds: f64,
}

/// A number that may arrive as `null`: serde_json writes NaN (a loss with nothing to average,
/// an accuracy without validation rows) that way.
fn number_or_nan<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

fn is_false(value: &bool) -> bool {
    !value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_goes_through_a_line_and_back() {
        let events = [
            TrainEvent::Progress(Progress {
                epoch: 1,
                epochs: 2,
                step: 5,
                steps: 10,
                loss: 0.5,
                lr: 1e-3,
                samples_per_s: 40.0,
                step_ms: 100.0,
                eta_s: 0.5,
            }),
            TrainEvent::Resume(Resume {
                found: false,
                step: 0,
                dir: "ck".into(),
                other_job: None,
            }),
            TrainEvent::Summary(Summary {
                rank: 2,
                compression: "powersgd".into(),
                samples_per_s: None,
                ..Summary::default()
            }),
        ];
        for event in events {
            let line = event.line();
            assert_eq!(TrainEvent::parse(&line), Some(event), "{line}");
        }
        let line = TrainEvent::Resume(Resume {
            found: true,
            step: 3,
            dir: "ck".into(),
            other_job: None,
        })
        .line();
        assert!(
            line.starts_with(r#"{"event":"resume","found":true"#) && !line.contains("other_job"),
            "{line}"
        );
    }

    #[test]
    fn another_programs_lines_need_only_what_makes_sense_of_them() {
        let progress = TrainEvent::parse(r#"{"event": "progress", "step": 3, "loss": 0.7}"#);
        assert!(matches!(
            progress,
            Some(TrainEvent::Progress(Progress { step: 3, .. }))
        ));
        let summary = TrainEvent::parse(r#"{"event": "summary", "rank": 1}"#);
        assert!(matches!(
            summary,
            Some(TrainEvent::Summary(Summary {
                rank: 1,
                step_ms: None,
                ..
            }))
        ));
        let empty = TrainEvent::parse(
            r#"{"event":"summary","rank":0,"val_loss":null,"val_accuracy":null}"#,
        );
        assert!(matches!(empty, Some(TrainEvent::Summary(s)) if s.val_loss.is_nan()));
        for not_ours in ["loss 0.7", r#"{"event": "unknown"}"#, r#"{"step": 3}"#, "{"] {
            assert_eq!(TrainEvent::parse(not_ours), None, "{not_ours}");
        }
    }
}
