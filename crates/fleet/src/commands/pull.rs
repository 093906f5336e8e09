//! `fleet pull`: what a job wrote on a host, brought back to the laptop. The host hashes the
//! files (SHA-256); a local file with the same hash stays as it is, every other one is read over
//! SFTP into a temporary file beside its destination, hashed as it arrives, and renamed over
//! the destination only when the hashes agree. A file that changed while it was copied (a job
//! still writing it) replaces nothing.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use russh_sftp::client::RawSftpSession;
use russh_sftp::client::error::Error as SftpError;
use russh_sftp::protocol::{FileAttributes, OpenFlags, StatusCode};
use sha2::{Digest, Sha256};

use super::Fleet;
use super::sync::human_bytes;
use crate::cli::PullArgs;
use crate::exit_code::{ExitCode, UsageError};
use crate::inventory::Inventory;
use crate::launch::remote::{parse_status, status_script};
use crate::remote::{self, Script};
use crate::ssh::{ExitStatus, Session};
use crate::sync::manifest::hash_file;
use crate::sync::remote::{TMP_PREFIX, temporary_nonce};

/// Bytes asked for by one SFTP read (OpenSSH's server answers up to 256 KiB).
const CHUNK: u64 = 240 * 1024;
/// Reads in flight per file: enough to keep a LAN busy, where one at a time waits on latency.
const READS_IN_FLIGHT: usize = 16;
/// Files copied at once.
const FILES_IN_FLIGHT: usize = 4;

/// One file the host has under the paths asked for.
#[derive(Debug)]
struct RemoteFile {
    /// Relative to the workdir (and to the destination folder).
    path: String,
    sha256: String,
}

/// What was asked of one pull, resolved.
struct Request<'a> {
    host: &'a str,
    /// The workdir's absolute path on the host.
    root: String,
    to: PathBuf,
}

pub async fn run(fleet: &Fleet, args: &PullArgs) -> Result<ExitCode> {
    let inventory = fleet.inventory()?;
    let index = chosen_host(&inventory, args.from.as_deref())?;
    for path in &args.paths {
        checked_path(path).map_err(UsageError)?;
    }
    let targets = fleet.targets(&inventory)?;
    let target = &targets[index..=index];
    let options = fleet.connect_options(&inventory, target).await?;
    let session = match Session::connect(&target[0], &options).await {
        Ok(session) => session,
        Err(e) => {
            fleet.printer.error(&e.to_string());
            return Ok(ExitCode::Unreachable);
        }
    };
    let pulled = pull_from(fleet, &inventory, index, &session, args).await;
    session.close().await;
    pulled
}

/// The index of the host named `from`, or of the first host (where rank 0 runs).
fn chosen_host(inventory: &Inventory, from: Option<&str>) -> Result<usize, UsageError> {
    let Some(name) = from else {
        return Ok(0);
    };
    inventory
        .hosts
        .iter()
        .position(|h| h.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = inventory.hosts.iter().map(|h| h.name.as_str()).collect();
            UsageError(format!(
                "--from {name}: no such host in the inventory (hosts: {})",
                names.join(", ")
            ))
        })
}

async fn pull_from(
    fleet: &Fleet,
    inventory: &Inventory,
    index: usize,
    session: &Session,
    args: &PullArgs,
) -> Result<ExitCode> {
    let host = &inventory.hosts[index];
    let (_, out, _) = session
        .capture(&status_script(&host.workdir, None, false))
        .await?;
    let job = parse_status(&String::from_utf8_lossy(&out))
        .into_iter()
        .next()
        .map(|state| state.job_id);
    let runs = job
        .as_ref()
        .map(|job| inventory.sync.source.join("runs").join(job));
    let paths = if args.paths.is_empty() {
        vec![default_output(inventory, runs.as_deref())]
    } else {
        args.paths.iter().map(|p| normalised(p)).collect()
    };
    let to = match (&args.to, &runs) {
        (Some(to), _) => to.clone(),
        (None, Some(runs)) => runs.clone(),
        (None, None) => PathBuf::from("."),
    };
    let (root, files) = list(session, &host.name, &host.workdir, &paths).await?;
    let request = Request {
        host: &host.name,
        root,
        to,
    };
    std::fs::create_dir_all(&request.to)
        .with_context(|| format!("cannot create {}", request.to.display()))?;
    let sftp = session.sftp().await?;
    let nonce = temporary_nonce();
    let results: Vec<Copied> = futures::stream::iter(files.iter().enumerate())
        .map(|(n, file)| copy_one(&sftp, &request, file, format!("{nonce}.{n}")))
        .buffered(FILES_IN_FLIGHT)
        .try_collect()
        .await?;
    report(fleet, &request, job.as_deref(), &paths, &files, &results);
    Ok(ExitCode::Success)
}

/// What a pull of nothing but defaults brings: the `--output` folder of the job's fleet-train
/// command (as its run folder recorded it, or the inventory's `[run].command`), else `model`.
fn default_output(inventory: &Inventory, runs: Option<&Path>) -> String {
    let recorded = runs
        .and_then(|dir| std::fs::read(dir.join("summary.json")).ok())
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|summary| serde_json::from_value::<Vec<String>>(summary["command"].clone()).ok());
    recorded
        .or_else(|| inventory.run_command.clone())
        .and_then(|command| fleet_train_output(&command))
        .unwrap_or_else(|| "model".into())
}

/// The `--output` of a fleet-train command line (`model` when it gives none); None when the
/// command is not fleet-train's training.
fn fleet_train_output(command: &[String]) -> Option<String> {
    let start = command.iter().position(|word| {
        Path::new(word)
            .file_name()
            .is_some_and(|n| n == "fleet-train")
    })?;
    let mut words = command[start + 1..].iter();
    let mut output = "model".to_string();
    while let Some(word) = words.next() {
        if word == "--output" {
            output = words.next()?.clone();
        } else if let Some(value) = word.strip_prefix("--output=") {
            output = value.to_string();
        }
    }
    checked_path(&output).ok()?;
    Some(normalised(&output))
}

/// Refuses a path that leaves the workdir or is not relative to it.
fn checked_path(path: &str) -> Result<(), String> {
    let parsed = Path::new(path);
    if path.is_empty() || parsed.is_absolute() {
        return Err(format!(
            "{path:?}: a path relative to the host's workdir, such as model or checkpoints/last"
        ));
    }
    if parsed
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(format!(
            "{path}: a path inside the host's workdir (no `..`)"
        ));
    }
    if parsed.components().all(|c| c == Component::CurDir) {
        return Err(format!(
            "{path}: the whole workdir is the project, which `fleet sync` sends; name what the job wrote"
        ));
    }
    Ok(())
}

/// `./model/` as `model`.
fn normalised(path: &str) -> String {
    let parts: Vec<&str> = Path::new(path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(part) => part.to_str(),
            _ => None,
        })
        .collect();
    parts.join("/")
}

/// The workdir's absolute path and every file under `paths` there, with its SHA-256.
async fn list(
    session: &Session,
    host: &str,
    workdir: &str,
    paths: &[String],
) -> Result<(String, Vec<RemoteFile>)> {
    let script = Script::new(remote::PULL_LIST)
        .arg(workdir)
        .args(paths.iter().cloned());
    let (status, out, err) = session.capture(&script).await?;
    let err = String::from_utf8_lossy(&err);
    match status {
        ExitStatus::Code(0) => {}
        ExitStatus::Code(3) => {
            let missing: Vec<&str> = err.lines().collect();
            bail!(
                "{host}: not in {workdir}: {} (did the job write it there?)",
                missing.join(", ")
            );
        }
        _ => bail!(
            "{host}: cannot list {} in {workdir}: {}",
            paths.join(", "),
            err.trim()
        ),
    }
    parse_listing(host, &out)
}

/// Parses [`remote::PULL_LIST`]'s output: the root on a line, then `HASH  ./PATH` records,
/// each ended by a NUL. A name that would leave the destination folder is refused.
fn parse_listing(host: &str, out: &[u8]) -> Result<(String, Vec<RemoteFile>)> {
    let newline = out
        .iter()
        .position(|&b| b == b'\n')
        .with_context(|| format!("{host}: the file listing ended early"))?;
    let root = String::from_utf8_lossy(&out[..newline]).into_owned();
    let mut files = Vec::new();
    for record in out[newline + 1..]
        .split(|&b| b == 0)
        .filter(|r| !r.is_empty())
    {
        let record = std::str::from_utf8(record).map_err(|_| {
            anyhow::anyhow!("{host}: a file name that is not UTF-8 under the pulled paths")
        })?;
        let parsed = record
            .get(..64)
            .zip(record.get(66..))
            .filter(|(hash, _)| hash.bytes().all(|b| b.is_ascii_hexdigit()));
        let Some((sha256, name)) = parsed else {
            bail!("{host}: cannot read the file listing at {record:?}");
        };
        let path = name.strip_prefix("./").unwrap_or(name);
        checked_path(path).map_err(|e| anyhow::anyhow!("{host}: {e}"))?;
        files.push(RemoteFile {
            path: path.to_string(),
            sha256: sha256.to_ascii_lowercase(),
        });
    }
    Ok((root, files))
}

/// How one file ended up.
struct Copied {
    bytes: u64,
    copied: bool,
}

/// Brings one file over, unless the local copy already has its hash.
async fn copy_one(
    sftp: &RawSftpSession,
    request: &Request<'_>,
    file: &RemoteFile,
    tag: String,
) -> Result<Copied> {
    let local = request.to.join(&file.path);
    if local.is_dir() {
        bail!(
            "{}: {} is a folder here and a file on {}: nothing replaced",
            local.display(),
            file.path,
            request.host
        );
    }
    if let Ok(hash) = hash_file(&local) {
        if hash == file.sha256 {
            let bytes = std::fs::metadata(&local).map_or(0, |m| m.len());
            return Ok(Copied {
                bytes,
                copied: false,
            });
        }
    }
    let folder = local.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(folder)
        .with_context(|| format!("cannot create {}", folder.display()))?;
    let temporary = Temporary(folder.join(format!("{TMP_PREFIX}{tag}")));
    let remote = format!("{}/{}", request.root, file.path);
    let (bytes, sha256) = download(sftp, &remote, &temporary.0)
        .await
        .with_context(|| format!("{}: {}: cannot copy", request.host, file.path))?;
    if sha256 != file.sha256 {
        bail!(
            "{}: {}: changed while it was copied (SHA-256 {} on the host, {} arrived); nothing replaced (is a job still writing it?)",
            request.host,
            file.path,
            short(&file.sha256),
            short(&sha256)
        );
    }
    std::fs::rename(&temporary.0, &local)
        .with_context(|| format!("cannot put {} in place", local.display()))?;
    std::mem::forget(temporary);
    Ok(Copied {
        bytes,
        copied: true,
    })
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// A file removed when dropped: a copy that failed, or was interrupted, leaves nothing behind.
struct Temporary(PathBuf);

impl Drop for Temporary {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Reads the host's file `remote` into the local file `into`, several reads in flight, and
/// returns its size and SHA-256. The data is on the laptop's disk when this returns.
async fn download(sftp: &RawSftpSession, remote: &str, into: &Path) -> Result<(u64, String)> {
    let handle = sftp
        .open(remote, OpenFlags::READ, FileAttributes::default())
        .await
        .map_err(sftp_error)?
        .handle;
    let copied = async {
        let size = sftp
            .fstat(handle.as_str())
            .await
            .map_err(sftp_error)?
            .attrs
            .size
            .unwrap_or(0);
        let mut out = std::io::BufWriter::new(std::fs::File::create(into)?);
        let mut hasher = Sha256::new();
        let offsets = (0..size.div_ceil(CHUNK)).map(|n| n * CHUNK);
        let mut chunks = futures::stream::iter(offsets)
            .map(|offset| read_range(sftp, handle.as_str(), offset, CHUNK.min(size - offset)))
            .buffered(READS_IN_FLIGHT);
        let mut total = 0u64;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            hasher.update(&chunk);
            out.write_all(&chunk)?;
            total += chunk.len() as u64;
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        anyhow::Ok((total, hex::encode(hasher.finalize())))
    }
    .await;
    let _ = sftp.close(handle.as_str()).await;
    copied
}

/// `length` bytes at `offset` (fewer only where the file now ends): a server may answer a read
/// with less than was asked, so the rest is asked for again.
async fn read_range(
    sftp: &RawSftpSession,
    handle: &str,
    offset: u64,
    length: u64,
) -> Result<Vec<u8>> {
    let mut data = Vec::with_capacity(length as usize);
    while (data.len() as u64) < length {
        let at = offset + data.len() as u64;
        let want = (length - data.len() as u64) as u32;
        match sftp.read(handle, at, want).await {
            Ok(part) if !part.data.is_empty() => data.extend_from_slice(&part.data),
            Ok(_) => break,
            Err(SftpError::Status(status)) if status.status_code == StatusCode::Eof => break,
            Err(e) => return Err(sftp_error(e)),
        }
    }
    Ok(data)
}

fn sftp_error(error: SftpError) -> anyhow::Error {
    match error {
        SftpError::Status(status) => anyhow::anyhow!("{}", status.error_message),
        other => anyhow::anyhow!("{other}"),
    }
}

/// The local path as a person would type it: relative to the current folder when under it.
fn shown(path: &Path) -> String {
    let relative = std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf));
    relative
        .unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
}

fn report(
    fleet: &Fleet,
    request: &Request<'_>,
    job: Option<&str>,
    paths: &[String],
    files: &[RemoteFile],
    results: &[Copied],
) {
    let copied: Vec<&Copied> = results.iter().filter(|c| c.copied).collect();
    let bytes: u64 = copied.iter().map(|c| c.bytes).sum();
    if fleet.printer.json() {
        for (file, result) in files.iter().zip(results) {
            fleet.printer.record(&serde_json::json!({
                "type": "pulled", "host": request.host, "path": file.path,
                "bytes": result.bytes, "sha256": file.sha256, "copied": result.copied,
            }));
        }
        fleet.printer.record(&serde_json::json!({
            "type": "pull", "host": request.host, "job": job, "paths": paths,
            "to": request.to, "files": files.len(), "copied": copied.len(), "bytes": bytes,
        }));
        return;
    }
    fleet.printer.info(&format!(
        "pulled {} from {} into {}: {} copied ({}), {} unchanged; every file verified by SHA-256",
        paths.join(", "),
        request.host,
        shown(&request.to),
        crate::output::count(copied.len(), "file"),
        human_bytes(bytes),
        results.len() - copied.len(),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_fleet_trains_output() {
        let words = |line: &str| line.split(' ').map(String::from).collect::<Vec<_>>();
        let output = |line: &str| fleet_train_output(&words(line));
        assert_eq!(
            output("./fleet-train --data d.csv").as_deref(),
            Some("model")
        );
        assert_eq!(
            output("/opt/bin/fleet-train --output out/m --epochs 1").as_deref(),
            Some("out/m")
        );
        assert_eq!(
            output("fleet-train --output=./final/").as_deref(),
            Some("final")
        );
        assert_eq!(output("python3 train.py --output x"), None);
        assert_eq!(output("fleet-train --output /etc"), None);
    }

    #[test]
    fn paths_stay_inside_the_workdir() {
        for good in ["model", "./model/", "a/b.txt"] {
            assert!(checked_path(good).is_ok(), "{good}");
        }
        for bad in ["", "/etc/passwd", "../x", "model/../../x", ".", "./"] {
            assert!(checked_path(bad).is_err(), "{bad}");
        }
        assert_eq!(normalised("./model//x/"), "model/x");
    }

    #[test]
    fn a_listing_names_its_files_and_refuses_one_that_leaves() {
        let hash = "ab".repeat(32);
        let out = format!("/home/u/p\n{hash}  ./model/a b\n.txt\0{hash}  ./model/c\0");
        let (root, files) = parse_listing("h", out.as_bytes()).unwrap();
        assert_eq!(root, "/home/u/p");
        let names: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(names, ["model/a b\n.txt", "model/c"]);
        let hostile = format!("/r\n{hash}  ./../../.bashrc\0");
        let error = parse_listing("h", hostile.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("h: "), "{error}");
    }
}
