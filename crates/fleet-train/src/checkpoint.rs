//! Checkpoints and the exported model. A checkpoint is `step-<N>.safetensors` (weights as
//! `model.<name>`, AdamW moments as `adam.*`) plus `latest.json`, which names it and holds the
//! step and what the run was trained on. Both are written under a temporary name, synced and
//! renamed, and `latest.json` last, so a crash at any moment leaves the previous checkpoint whole.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
}

fn file_error(path: &Path, error: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::File {
        path: path.into(),
        message: error.to_string(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Latest {
    pub file: String,
    /// Optimizer steps done.
    pub step: u64,
    pub world_size: usize,
    pub data_sha256: String,
    pub seed: u64,
    /// The job that wrote it (`FLEET_RUN_ID`, the same across its restarts); None outside
    /// fleet, and in checkpoints of older versions.
    #[serde(default)]
    pub run_id: Option<String>,
    /// The mean training loss of the last epoch it finished, for a resume with nothing left
    /// to train.
    #[serde(default)]
    pub train_loss: Option<f64>,
}

pub fn save(
    dir: &Path,
    latest: &Latest,
    tensors: &[(String, Tensor)],
) -> Result<(), CheckpointError> {
    fs::create_dir_all(dir).map_err(|e| file_error(dir, e))?;
    let weights = dir.join(&latest.file);
    let partial = dir.join(format!("{}.partial", latest.file));
    write_tensors(&partial, tensors)?;
    sync_and_rename(&partial, &weights)?;

    let pointer = dir.join("latest.json");
    let partial_pointer = dir.join("latest.json.partial");
    let text = serde_json::to_vec_pretty(latest).map_err(|e| file_error(&pointer, e))?;
    fs::write(&partial_pointer, text).map_err(|e| file_error(&partial_pointer, e))?;
    sync_and_rename(&partial_pointer, &pointer)?;

    // Older checkpoints are removed only once the new one is in place.
    remove_older(dir, "step-", &latest.file)
}

/// Removes the `<prefix>*.safetensors` files in `dir` other than `keep`.
fn remove_older(dir: &Path, prefix: &str, keep: &str) -> Result<(), CheckpointError> {
    for entry in fs::read_dir(dir).map_err(|e| file_error(dir, e))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) && name.ends_with(".safetensors") && name != keep {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// A rank's own state beside the checkpoint of `step` (PowerSGD's error feedback, which differs
/// between ranks): `rank-<R>-step-<N>.safetensors` in `dir` on the rank's host, written whole
/// or not at all; the rank's older ones are removed once it is in place.
pub fn save_rank_state(
    dir: &Path,
    rank: usize,
    step: u64,
    tensors: &[(String, Tensor)],
) -> Result<(), CheckpointError> {
    fs::create_dir_all(dir).map_err(|e| file_error(dir, e))?;
    let name = format!("rank-{rank}-step-{step}.safetensors");
    let path = dir.join(&name);
    let partial = dir.join(format!("{name}.partial"));
    write_tensors(&partial, tensors)?;
    sync_and_rename(&partial, &path)?;
    remove_older(dir, &format!("rank-{rank}-step-"), &name)
}

/// What [`save_rank_state`] wrote for `rank` at `step`, or None when it did not.
pub fn load_rank_state(
    dir: &Path,
    rank: usize,
    step: u64,
) -> Result<Option<Vec<(String, Tensor)>>, CheckpointError> {
    let path = dir.join(format!("rank-{rank}-step-{step}.safetensors"));
    if !path.exists() {
        return Ok(None);
    }
    Tensor::read_safetensors(&path)
        .map(Some)
        .map_err(|e| file_error(&path, e))
}

/// A checkpoint as read back: what `latest.json` says, and the named tensors.
pub type Loaded = (Latest, Vec<(String, Tensor)>);

/// The last checkpoint in `dir`, or None when there is none.
pub fn load(dir: &Path) -> Result<Option<Loaded>, CheckpointError> {
    let pointer = dir.join("latest.json");
    let bytes = match fs::read(&pointer) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(file_error(&pointer, e)),
    };
    let latest: Latest = serde_json::from_slice(&bytes).map_err(|e| file_error(&pointer, e))?;
    let weights = dir.join(&latest.file);
    let tensors = Tensor::read_safetensors(&weights).map_err(|e| file_error(&weights, e))?;
    Ok(Some((latest, tensors)))
}

fn sync_and_rename(from: &Path, to: &Path) -> Result<(), CheckpointError> {
    fs::File::open(from)
        .and_then(|f| f.sync_all())
        .map_err(|e| file_error(from, e))?;
    fs::rename(from, to).map_err(|e| file_error(to, e))?;
    if let Some(dir) = to.parent() {
        let _ = fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// Makes the directory `out` with `fill`, replacing what was there only once the new directory
/// is complete and synced.
pub fn write_directory(
    out: &Path,
    fill: impl FnOnce(&Path) -> Result<(), CheckpointError>,
) -> Result<(), CheckpointError> {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| file_error(parent, e))?;
    let partial = parent.join(format!(".{name}.partial"));
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir(&partial).map_err(|e| file_error(&partial, e))?;
    fill(&partial)?;
    for entry in fs::read_dir(&partial)
        .map_err(|e| file_error(&partial, e))?
        .flatten()
    {
        let path = entry.path();
        fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| file_error(&path, e))?;
    }
    let old = parent.join(format!(".{name}.old"));
    let _ = fs::remove_dir_all(&old);
    if out.exists() {
        fs::rename(out, &old).map_err(|e| file_error(out, e))?;
    }
    fs::rename(&partial, out).map_err(|e| file_error(out, e))?;
    let _ = fs::remove_dir_all(&old);
    Ok(())
}

/// Writes `bytes` to `path`, for use inside [`write_directory`]'s `fill`.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    fs::write(path, bytes).map_err(|e| file_error(path, e))
}

/// Writes named tensors as safetensors (on the CPU, contiguous).
pub fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), CheckpointError> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(name, t)| {
            (
                name.clone(),
                t.detach().to_device(tch::Device::Cpu).contiguous(),
            )
        })
        .collect();
    Tensor::write_safetensors(&cpu, path).map_err(|e| file_error(path, e))
}
