//! Applies a [`Plan`] to one host over SFTP: every file lands under a temporary name beside its
//! destination (or inside a new folder that has one), the host hashes what landed, and only when
//! every hash matches are the files and new folders renamed into place (`posix-rename`, atomic).
//! A failure at any point removes the temporary files and folders and leaves the previous version
//! of every file where it was.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::stream::{FuturesUnordered, StreamExt};
use russh_sftp::client::RawSftpSession;
use russh_sftp::client::error::Error as SftpError;
use russh_sftp::protocol::{FileAttributes, OpenFlags, Packet, StatusCode};
use sha2::{Digest, Sha256};

use super::manifest::{Entry, Manifest, Scan};
use super::plan::{Listing, Plan, RemoteEntry};
use super::remote::{HostState, HostTree, SAVED_MANIFEST, SyncError, TMP_PREFIX};

/// Bytes per SFTP write request.
const CHUNK: usize = 240 * 1024;
/// Write requests in flight per file: enough to fill a link with 100 ms of latency.
const WRITES_IN_FLIGHT: usize = 64;
/// Files uploaded at once per host, so small files do not wait on each other's round trips.
const FILES_IN_FLIGHT: usize = 32;
/// Files up to this size are read whole and sent in one burst.
const SMALL_FILE: u64 = 1 << 20;
/// Larger files are read this many chunks at a time.
const CHUNKS_PER_READ: usize = 16;
/// Landed files are handed to the host's `sha256sum` in batches of about this much...
const VERIFY_BATCH_BYTES: u64 = 32 << 20;
/// ...or this many files, whichever comes first.
const VERIFY_BATCH_FILES: usize = 512;
/// A batch up to this size is read back over SFTP and hashed here instead: the same bytes from
/// the host's disk, without starting a command there for a few small files.
const READ_BACK_BYTES: u64 = 1 << 20;

/// Counts what has been sent to one host, for progress reporting while the sync runs.
#[derive(Debug, Default)]
pub struct Progress {
    pub bytes: AtomicU64,
    pub files: AtomicU64,
}

/// What applying a plan did.
#[derive(Debug, Default, Clone)]
pub struct Applied {
    pub files_sent: usize,
    pub bytes_sent: u64,
    pub removed: usize,
    /// The manifest the host holds now...
    pub saved: Manifest,
    /// ...as the bytes to keep in the local copy of it; `None` when the host confirmed that
    /// copy and kept its manifest unchanged.
    pub copy: Option<Vec<u8>>,
}

/// One host's transfer: what its sync holds, for [`Transfer::apply`].
pub struct Transfer<'a, 't> {
    pub tree: &'a HostTree<'t>,
    pub sftp: &'a RawSftpSession,
    pub source: &'a Path,
    pub scan: &'a Scan,
    pub state: &'a HostState,
    pub plan: &'a Plan,
    /// `--delete`: what an earlier sync put there and the project no longer has is removed.
    pub delete: bool,
    pub progress: &'a Progress,
}

/// Where each upload lands, and what is renamed into place once every file is verified.
struct Staged {
    /// Each file's path and where it lands (its temporary name, or inside a new folder's).
    files: Vec<(String, String)>,
    /// Each new folder and each file outside them, with its temporary name.
    renames: Vec<(String, String)>,
}

impl Transfer<'_, '_> {
    /// Sends what the plan says to the host and saves the host's new verified manifest (unless
    /// the host's state shows it has that one already).
    pub async fn apply(&self) -> Result<Applied, SyncError> {
        let mut applied = Applied {
            removed: self.clear_the_way().await?,
            ..Applied::default()
        };
        let staged = self.stage().await?;
        // The host's new manifest is written beside the old one while the files travel, and
        // replaces it once everything is in place.
        applied.saved = saved_manifest(&self.scan.manifest, &self.state.listing, self.plan);
        let unchanged = self.state.saved.as_deref() == Some(&applied.saved);
        if !(unchanged && self.state.confirmed) {
            applied.copy = Some(applied.saved.to_bytes());
        }
        let writing = async {
            match &applied.copy {
                Some(bytes) if !unchanged => {
                    write_manifest(self.tree, self.sftp, bytes).await.map(Some)
                }
                _ => Ok(None),
            }
        };
        let (outcome, written) = tokio::join!(self.send_and_verify(&staged), writing);
        let new_manifest = match outcome.and(written) {
            Ok(tmp) => tmp,
            Err(e) => {
                let temporaries: Vec<String> =
                    staged.renames.iter().map(|(_, tmp)| tmp.clone()).collect();
                let _ = self.tree.remove(&temporaries).await;
                return Err(e);
            }
        };
        applied.files_sent = self.plan.uploads.len();
        applied.bytes_sent = self.plan.upload_bytes();
        self.finish(new_manifest).await?;
        Ok(applied)
    }

    /// Removes what is in the project's way (a path of another kind, only with --delete and
    /// only if a sync put it there) and, with --delete, what is extraneous; returns how many.
    async fn clear_the_way(&self) -> Result<usize, SyncError> {
        let (tree, plan) = (self.tree, self.plan);
        let mut removed = 0;
        if !plan.conflicts.is_empty() {
            if let Some(message) = self.conflicts_refused() {
                let host = tree.host().to_string();
                return Err(SyncError::Host { host, message });
            }
            tree.remove(&plan.conflicts).await?;
            removed += plan.conflicts.len();
        }
        if self.delete {
            tree.remove(&plan.extraneous).await?;
            removed += plan.extraneous.len();
        }
        Ok(removed)
    }

    /// Why the paths of another kind cannot be replaced: not without --delete, and never one
    /// a sync did not put there (or that holds anything no sync did).
    fn conflicts_refused(&self) -> Option<String> {
        let plan = self.plan;
        if !self.delete {
            return Some(format!(
                "{} is of another kind on the host (a folder where a file goes, or the reverse); run with --delete to replace it",
                plan.conflicts.join(", ")
            ));
        }
        let fleets = |p: &String| {
            let prefix = format!("{p}/");
            self.state
                .saved
                .as_ref()
                .is_some_and(|m| m.entries.contains_key(p))
                && !plan.foreign.iter().any(|f| f.starts_with(&prefix))
        };
        let theirs: Vec<&str> = plan
            .conflicts
            .iter()
            .filter(|p| !fleets(p))
            .map(String::as_str)
            .collect();
        if theirs.is_empty() {
            return None;
        }
        Some(format!(
            "{} is in the way of the project and no sync put it there: move it away (fleet removes only what it put there)",
            theirs.join(", ")
        ))
    }

    /// Makes the new folders under temporary names and decides where every file lands. Largest
    /// first: a big file streams while the small ones fill the gaps beside it, and its
    /// verification on the host overlaps the rest instead of trailing at the end.
    async fn stage(&self) -> Result<Staged, SyncError> {
        let plan = self.plan;
        let nonce = super::remote::temporary_nonce();
        let staging = Staging::new(&plan.mkdirs, &nonce);
        let folders: Vec<String> = plan
            .mkdirs
            .iter()
            .filter_map(|d| staging.place(d))
            .collect();
        self.tree.mkdirs(&folders).await?;
        let mut order: Vec<&super::plan::Upload> = plan.uploads.iter().collect();
        order.sort_by_key(|u| std::cmp::Reverse(u.size));
        let mut staged = Staged {
            files: Vec::with_capacity(order.len()),
            renames: staging
                .tops
                .iter()
                .map(|(path, tmp)| (path.clone(), tmp.clone()))
                .collect(),
        };
        for (i, upload) in order.into_iter().enumerate() {
            let path = upload.path.clone();
            match staging.place(&path) {
                Some(inside) => staged.files.push((path, inside)),
                None => {
                    let tmp = temporary_name(&path, &nonce, &i.to_string());
                    staged.renames.push((path.clone(), tmp.clone()));
                    staged.files.push((path, tmp));
                }
            }
        }
        Ok(staged)
    }

    /// Uploads every file under its temporary name, verifies them in batches as they land (so
    /// the host hashes while more arrive), then renames everything into place.
    async fn send_and_verify(&self, staged: &Staged) -> Result<(), SyncError> {
        let (tree, sftp, source, scan) = (self.tree, self.sftp, self.source, self.scan);
        let local = &scan.manifest;
        let mut uploads = futures::stream::iter(
            staged
                .files
                .iter()
                .map(|(path, tmp)| upload(tree, sftp, source, scan, path, tmp, self.progress)),
        )
        .buffer_unordered(FILES_IN_FLIGHT);
        let mut verifying = FuturesUnordered::new();
        let mut batch: Vec<(String, String)> = Vec::new();
        let mut batch_bytes = 0u64;
        loop {
            tokio::select! {
                landed = uploads.next() => match landed {
                    Some(result) => {
                        let (path, tmp, size) = result?;
                        batch.push((path, tmp));
                        batch_bytes += size;
                        if batch_bytes >= VERIFY_BATCH_BYTES || batch.len() >= VERIFY_BATCH_FILES {
                            let bytes = std::mem::take(&mut batch_bytes);
                            verifying.push(verify(tree, sftp, source, local, std::mem::take(&mut batch), bytes));
                        }
                    }
                    None => break,
                },
                Some(result) = verifying.next(), if !verifying.is_empty() => result?,
            }
        }
        drop(uploads);
        verifying.push(verify(tree, sftp, source, local, batch, batch_bytes));
        while let Some(result) = verifying.next().await {
            result?;
        }
        commit(tree, sftp, &staged.renames).await
    }

    /// After the files are in place: modes, links, and the new manifest renamed over the old.
    async fn finish(&self, new_manifest: Option<String>) -> Result<(), SyncError> {
        let (tree, sftp) = (self.tree, self.sftp);
        for (path, mode) in &self.plan.chmods {
            let attrs = FileAttributes {
                permissions: Some(*mode),
                ..Default::default()
            };
            sftp.setstat(tree.path(path), attrs)
                .await
                .map_err(|e| file_error(tree, path, "setting permissions", &e))?;
        }
        tree.links(&self.plan.links).await?;
        if let Some(tmp) = new_manifest {
            posix_rename(sftp, &tmp, &tree.path(SAVED_MANIFEST))
                .await
                .map_err(|e| file_error(tree, SAVED_MANIFEST, "saving", &e))?;
        }
        Ok(())
    }
}

/// `path`'s temporary name beside it: `.fleet-tmp.<nonce>.<tag>` in the same folder.
fn temporary_name(path: &str, nonce: &str, tag: &str) -> String {
    let dir = path
        .rsplit_once('/')
        .map_or(String::new(), |(d, _)| format!("{d}/"));
    format!("{dir}{TMP_PREFIX}{nonce}.{tag}")
}

/// The folders new on a host: each outermost one (whose parent is there already) is made under
/// a temporary name with everything inside it, and renamed into place once, so that the files
/// in it need no temporary names and renames of their own.
struct Staging {
    /// Outermost new folder -> its temporary name.
    tops: std::collections::HashMap<String, String>,
}

impl Staging {
    fn new(mkdirs: &[String], nonce: &str) -> Staging {
        let new: std::collections::HashSet<&str> = mkdirs.iter().map(String::as_str).collect();
        let tops = mkdirs
            .iter()
            .enumerate()
            .filter(|(_, dir)| {
                !dir.rsplit_once('/')
                    .is_some_and(|(parent, _)| new.contains(parent))
            })
            .map(|(i, dir)| (dir.clone(), temporary_name(dir, nonce, &format!("d{i}"))))
            .collect();
        Staging { tops }
    }

    /// Where `path` is written while the sync runs, if it is a new folder or inside one.
    fn place(&self, path: &str) -> Option<String> {
        if self.tops.is_empty() {
            return None;
        }
        let ends = path.match_indices('/').map(|(i, _)| i).chain([path.len()]);
        for end in ends {
            if let Some(tmp) = self.tops.get(&path[..end]) {
                return Some(format!("{tmp}{}", &path[end..]));
            }
        }
        None
    }
}

/// The manifest to keep on the host: the local one, with the mtime each file has *there*
/// (what was set for files just sent, what the listing showed for files left alone).
pub fn saved_manifest(local: &Manifest, listing: &Listing, plan: &Plan) -> Manifest {
    let sent: std::collections::HashSet<&str> =
        plan.uploads.iter().map(|u| u.path.as_str()).collect();
    let mut saved = local.clone();
    for (path, entry) in saved.entries.iter_mut() {
        if let Entry::File { mtime, .. } = entry {
            *mtime = match listing.get(path) {
                Some(RemoteEntry::File { mtime: there, .. }) if !sent.contains(path.as_str()) => {
                    *there
                }
                _ => i64::from(sftp_time(*mtime)),
            };
        }
    }
    saved
}

/// SFTP version 3 carries times as unsigned 32-bit seconds.
fn sftp_time(seconds: i64) -> u32 {
    u32::try_from(seconds.max(0)).unwrap_or(u32::MAX)
}

fn file_error(tree: &HostTree<'_>, path: &str, doing: &str, error: &SftpError) -> SyncError {
    let hint = match error {
        SftpError::Status(status) if status.status_code == StatusCode::Failure => {
            " (is the host's disk full?)"
        }
        SftpError::Status(status) if status.status_code == StatusCode::PermissionDenied => {
            " (check the workdir's owner and permissions)"
        }
        _ => "",
    };
    SyncError::File {
        host: tree.host().to_string(),
        path: path.to_string(),
        message: format!("{doing} failed: {error}{hint}"),
    }
}

/// Streams one local file to `tmp` on the host, hashing the bytes as they are read.
async fn upload(
    tree: &HostTree<'_>,
    sftp: &RawSftpSession,
    source: &Path,
    scan: &Scan,
    path: &str,
    tmp: &str,
    progress: &Progress,
) -> Result<(String, String, u64), SyncError> {
    let kept = scan.contents.get(path).map(Vec::as_slice);
    let Some(Entry::File {
        size, mtime, mode, ..
    }) = scan.manifest.entries.get(path)
    else {
        return Ok((path.to_string(), tmp.to_string(), 0));
    };
    let create = OpenFlags::CREATE | OpenFlags::TRUNCATE | OpenFlags::WRITE;
    let attrs = FileAttributes {
        permissions: Some(*mode),
        ..Default::default()
    };
    let local_path = source.join(path);
    // Small files are read whole (unless the scan kept their bytes) while the host opens the
    // file; large ones are streamed.
    let small = *size <= SMALL_FILE;
    let (content, opened) = tokio::join!(
        async {
            match kept {
                Some(bytes) => Ok(Some(Content::Kept(bytes))),
                None if small => tokio::fs::read(&local_path)
                    .await
                    .map(|bytes| Some(Content::Read(bytes))),
                None => Ok(None),
            }
        },
        sftp.open(tree.path(tmp), create, attrs)
    );
    let writer = Writer {
        tree,
        sftp,
        path,
        progress,
        handle: String::new(),
    };
    let content = content.map_err(|e| writer.local_error(e))?;
    let handle = opened
        .map_err(|e| file_error(tree, path, "creating it on the host", &e))?
        .handle;
    let writer = Writer { handle, ..writer };
    let sent = match content {
        Some(content) => writer.write_content(content).await?,
        None => writer.stream(&local_path).await?,
    };
    writer.close(sent, *size, *mtime, *mode).await?;
    progress.files.fetch_add(1, Ordering::Relaxed);
    Ok((path.to_string(), tmp.to_string(), *size))
}

/// Writes one file's bytes to its open handle on the host, many requests in flight.
struct Writer<'a, 't> {
    tree: &'a HostTree<'t>,
    sftp: &'a RawSftpSession,
    path: &'a str,
    progress: &'a Progress,
    handle: String,
}

impl Writer<'_, '_> {
    /// One write request of `data` at `offset`, counted as sent when it is answered.
    async fn send(&self, data: Vec<u8>, offset: u64) -> Result<(), SftpError> {
        let len = data.len() as u64;
        let result = self.sftp.write(self.handle.as_str(), offset, data).await;
        self.progress.bytes.fetch_add(len, Ordering::Relaxed);
        result.map(|_| ())
    }

    fn local_error(&self, e: std::io::Error) -> SyncError {
        SyncError::File {
            host: self.tree.host().to_string(),
            path: self.path.to_string(),
            message: format!("reading the local file failed: {e}"),
        }
    }

    fn write_error(&self, e: &SftpError) -> SyncError {
        file_error(self.tree, self.path, "writing", e)
    }

    /// Sends bytes in memory (a small file in one request, without a copy); returns how many.
    async fn write_content(&self, content: Content<'_>) -> Result<u64, SyncError> {
        let mut in_flight = FuturesUnordered::new();
        let mut offset = 0u64;
        match content {
            Content::Read(bytes) if bytes.len() <= CHUNK => {
                offset = bytes.len() as u64;
                in_flight.push(self.send(bytes, 0));
            }
            content => {
                let bytes = match &content {
                    Content::Kept(bytes) => bytes,
                    Content::Read(bytes) => bytes.as_slice(),
                };
                for chunk in bytes.chunks(CHUNK) {
                    in_flight.push(self.send(chunk.to_vec(), offset));
                    offset += chunk.len() as u64;
                }
            }
        }
        while let Some(result) = in_flight.next().await {
            result.map_err(|e| self.write_error(&e))?;
        }
        Ok(offset)
    }

    /// Streams a large file from disk, a few chunks per read, at most WRITES_IN_FLIGHT
    /// requests unanswered; returns how many bytes it sent.
    async fn stream(&self, local_path: &Path) -> Result<u64, SyncError> {
        let file =
            std::sync::Arc::new(std::fs::File::open(local_path).map_err(|e| self.local_error(e))?);
        let mut in_flight = FuturesUnordered::new();
        let mut offset = 0u64;
        loop {
            let reading = file.clone();
            let chunks =
                tokio::task::spawn_blocking(move || read_chunks(&reading, offset, CHUNKS_PER_READ))
                    .await
                    .map_err(|e| self.local_error(std::io::Error::other(e.to_string())))?
                    .map_err(|e| self.local_error(e))?;
            if chunks.is_empty() {
                break;
            }
            for chunk in chunks {
                let length = chunk.len() as u64;
                in_flight.push(self.send(chunk, offset));
                offset += length;
                if in_flight.len() >= WRITES_IN_FLIGHT {
                    if let Some(result) = in_flight.next().await {
                        result.map_err(|e| self.write_error(&e))?;
                    }
                }
            }
        }
        while let Some(result) = in_flight.next().await {
            result.map_err(|e| self.write_error(&e))?;
        }
        Ok(offset)
    }

    /// Checks that `sent` bytes are the file's `size` (content is checked by the host's hash;
    /// a size that moved is caught here already), then sets its time and mode and closes it.
    async fn close(&self, sent: u64, size: u64, mtime: i64, mode: u32) -> Result<(), SyncError> {
        let (tree, sftp, path) = (self.tree, self.sftp, self.path);
        if sent != size {
            let _ = sftp.close(self.handle.as_str()).await;
            return Err(SyncError::File {
                host: tree.host().to_string(),
                path: path.to_string(),
                message: "changed while it was being sent; sync again once it is written".into(),
            });
        }
        let time = sftp_time(mtime);
        let attrs = FileAttributes {
            permissions: Some(mode),
            atime: Some(time),
            mtime: Some(time),
            ..Default::default()
        };
        // The host answers requests in order: both go out at once.
        let (set, closed) = tokio::join!(
            sftp.fsetstat(self.handle.as_str(), attrs),
            sftp.close(self.handle.as_str())
        );
        set.map_err(|e| file_error(tree, path, "setting its time and mode", &e))?;
        closed.map_err(|e| file_error(tree, path, "closing", &e))?;
        Ok(())
    }
}

/// A file's bytes for an upload: kept by the scan, or read now.
enum Content<'a> {
    Kept(&'a [u8]),
    Read(Vec<u8>),
}

/// Up to `count` chunks of `file` from `offset` on, each in a buffer of its own (handed to the
/// SFTP writes as it is); fewer at the end of the file.
fn read_chunks(file: &std::fs::File, offset: u64, count: usize) -> std::io::Result<Vec<Vec<u8>>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut reader = file;
    reader.seek(SeekFrom::Start(offset))?;
    let mut chunks = Vec::with_capacity(count);
    for _ in 0..count {
        let mut chunk = Vec::with_capacity(CHUNK);
        let n = reader.take(CHUNK as u64).read_to_end(&mut chunk)?;
        if n == 0 {
            break;
        }
        chunks.push(chunk);
        if n < CHUNK {
            break;
        }
    }
    Ok(chunks)
}

/// The host reads back every landed file and its SHA-256 must be the local one.
async fn verify(
    tree: &HostTree<'_>,
    sftp: &RawSftpSession,
    source: &Path,
    local: &Manifest,
    staged: Vec<(String, String)>,
    bytes: u64,
) -> Result<(), SyncError> {
    if staged.is_empty() {
        return Ok(());
    }
    let temporaries: Vec<String> = staged.iter().map(|(_, tmp)| tmp.clone()).collect();
    let landed = if bytes <= READ_BACK_BYTES {
        read_back(tree, sftp, &temporaries).await
    } else {
        tree.hash(&temporaries).await?
    };
    for (path, tmp) in &staged {
        let Some(Entry::File { sha256, .. }) = local.entries.get(path) else {
            continue;
        };
        match landed.get(tmp) {
            Some(hash) if hash == sha256 => {}
            Some(hash) => {
                // Most likely the local file was written to after it was scanned: see if it
                // still has the content that was scanned.
                let local_now = crate::sync::manifest::hash_file(&source.join(path)).ok();
                let message = if local_now.as_deref() != Some(sha256.as_str()) {
                    "changed while it was being sent; sync again once it is written".to_string()
                } else {
                    format!("landed with SHA-256 {hash}, expected {sha256}; nothing was replaced")
                };
                return Err(SyncError::File {
                    host: tree.host().to_string(),
                    path: path.clone(),
                    message,
                });
            }
            None => {
                return Err(SyncError::File {
                    host: tree.host().to_string(),
                    path: path.clone(),
                    message: "was not found on the host after upload".into(),
                });
            }
        }
    }
    Ok(())
}

/// SHA-256 of files on the host (paths relative to the workdir), read back to the end over SFTP.
/// A file that cannot be read is missing from the result.
async fn read_back(
    tree: &HostTree<'_>,
    sftp: &RawSftpSession,
    paths: &[String],
) -> std::collections::HashMap<String, String> {
    let reads = paths.iter().map(|path| async move {
        let handle = sftp
            .open(tree.path(path), OpenFlags::READ, FileAttributes::default())
            .await
            .ok()?
            .handle;
        let mut hasher = Sha256::new();
        let mut offset = 0u64;
        let complete = loop {
            match sftp.read(handle.as_str(), offset, CHUNK as u32).await {
                Ok(data) => {
                    hasher.update(&data.data);
                    offset += data.data.len() as u64;
                }
                Err(SftpError::Status(status)) if status.status_code == StatusCode::Eof => {
                    break true;
                }
                Err(_) => break false,
            }
        };
        let _ = sftp.close(handle.as_str()).await;
        complete.then(|| (path.clone(), hex::encode(hasher.finalize())))
    });
    futures::stream::iter(reads)
        .buffer_unordered(FILES_IN_FLIGHT)
        .filter_map(|hashed| async move { hashed })
        .collect()
        .await
}

/// Renames every verified temporary file and new folder over its destination, once their
/// contents are on the host's disk.
async fn commit(
    tree: &HostTree<'_>,
    sftp: &RawSftpSession,
    renames: &[(String, String)],
) -> Result<(), SyncError> {
    if renames.is_empty() {
        return Ok(());
    }
    tree.flush().await?;
    let mut renames = futures::stream::iter(renames.iter().map(|(path, tmp)| async move {
        posix_rename(sftp, &tree.path(tmp), &tree.path(path))
            .await
            .map_err(|e| file_error(tree, path, "moving it into place", &e))
    }))
    .buffer_unordered(WRITES_IN_FLIGHT);
    while let Some(result) = renames.next().await {
        result?;
    }
    Ok(())
}

/// OpenSSH's `posix-rename@openssh.com`: rename(2), replacing the destination atomically
/// (plain SFTP rename refuses an existing destination).
async fn posix_rename(sftp: &RawSftpSession, from: &str, to: &str) -> Result<(), SftpError> {
    let mut data = Vec::with_capacity(from.len() + to.len() + 8);
    for s in [from, to] {
        data.extend_from_slice(&(s.len() as u32).to_be_bytes());
        data.extend_from_slice(s.as_bytes());
    }
    match sftp.extended("posix-rename@openssh.com", data).await? {
        Packet::Status(status) if status.status_code == StatusCode::Ok => Ok(()),
        Packet::Status(status) => Err(SftpError::Status(status)),
        _ => Err(SftpError::UnexpectedPacket),
    }
}

/// Writes the host's new manifest under a temporary name beside the current one and returns
/// that name (renamed into place once the files it describes are).
async fn write_manifest(
    tree: &HostTree<'_>,
    sftp: &RawSftpSession,
    bytes: &[u8],
) -> Result<String, SyncError> {
    let tmp = format!("{}.tmp", tree.path(SAVED_MANIFEST));
    let fail = |e: SftpError| file_error(tree, SAVED_MANIFEST, "saving", &e);
    let create = OpenFlags::CREATE | OpenFlags::TRUNCATE | OpenFlags::WRITE;
    let handle = sftp
        .open(tmp.as_str(), create, FileAttributes::default())
        .await
        .map_err(fail)?
        .handle;
    let mut writes = FuturesUnordered::new();
    for (i, chunk) in bytes.chunks(CHUNK).enumerate() {
        writes.push(sftp.write(handle.as_str(), (i * CHUNK) as u64, chunk.to_vec()));
    }
    while let Some(result) = writes.next().await {
        result.map_err(fail)?;
    }
    drop(writes);
    sftp.close(handle.as_str()).await.map_err(fail)?;
    Ok(tmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_folders_are_staged_under_their_outermost_new_folder() {
        let mkdirs = ["a", "a/b", "a/b/c", "old/new", "x y/ü"].map(String::from);
        // "old" and "x y" are on the host already.
        let staging = Staging::new(&mkdirs, "n");
        let mut tops: Vec<(&str, &str)> = staging
            .tops
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        tops.sort();
        assert_eq!(
            tops,
            [
                ("a", ".fleet-tmp.n.d0"),
                ("old/new", "old/.fleet-tmp.n.d3"),
                ("x y/ü", "x y/.fleet-tmp.n.d4")
            ]
        );
        assert_eq!(staging.place("a").as_deref(), Some(".fleet-tmp.n.d0"));
        assert_eq!(
            staging.place("a/b/c/f.txt").as_deref(),
            Some(".fleet-tmp.n.d0/b/c/f.txt")
        );
        assert_eq!(
            staging.place("old/new/f").as_deref(),
            Some("old/.fleet-tmp.n.d3/f")
        );
        assert_eq!(staging.place("old/f"), None);
        assert_eq!(
            staging.place("ab/f"),
            None,
            "a prefix of a name is not a folder"
        );
        assert_eq!(staging.place("f"), None);
        assert_eq!(Staging::new(&[], "n").place("a/f"), None);
    }
}
