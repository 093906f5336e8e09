//! The local side of a sync: which files make up the project and what each one holds.
//!
//! A [`Manifest`] maps each relative path (UTF-8, `/`-separated) to a file (size, mtime, mode,
//! SHA-256), a directory or a symlink. Building one walks `[sync].source`, skips what the
//! [`Filter`] excludes, and hashes only files whose size, mtime or inode changed since the last
//! scan ([`HashCache`]), so a sync with nothing to do costs a `stat` per file.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The folder fleet keeps its own state in, on the hosts. Never synced.
pub const STATE_DIR: &str = ".fleet";

/// One entry of the tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Entry {
    File {
        size: u64,
        /// Seconds since the epoch: what SFTP can set on the host.
        mtime: i64,
        /// Permission bits (`0o755` for a script).
        mode: u32,
        /// Lower-case hex.
        sha256: String,
    },
    Dir,
    Link {
        target: String,
    },
}

/// A tree's entries by relative path. Directories come before what they hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub entries: BTreeMap<String, Entry>,
}

impl Manifest {
    pub fn files(&self) -> impl Iterator<Item = (&String, u64, &str)> {
        self.entries.iter().filter_map(|(path, entry)| match entry {
            Entry::File { size, sha256, .. } => Some((path, *size, sha256.as_str())),
            _ => None,
        })
    }

    pub fn total_bytes(&self) -> u64 {
        self.files().map(|(_, size, _)| size).sum()
    }

    /// The form kept on hosts: a first line with the format's version and the SHA-256 of the
    /// rest, then NUL-separated fields, a few times faster to read than JSON for the
    /// 10,000-file trees a sync must handle in a fraction of a second. Paths may hold any
    /// character but NUL, which no path can. The first line lets a host's shell tell whether
    /// its manifest is one fleet holds a copy of, with a builtin `read` and no hashing.
    pub fn to_bytes(&self) -> Vec<u8> {
        let header = MANIFEST_HEADER.len() + 65;
        let mut out = Vec::with_capacity(header + self.entries.len() * 100);
        out.resize(header, b'\n');
        let field = |out: &mut Vec<u8>, text: &str| {
            out.extend_from_slice(text.as_bytes());
            out.push(0);
        };
        let number = |out: &mut Vec<u8>, value: &dyn std::fmt::Display| {
            use std::io::Write;
            let _ = write!(out, "{value}\0");
        };
        for (path, entry) in &self.entries {
            match entry {
                Entry::File {
                    size,
                    mtime,
                    mode,
                    sha256,
                } => {
                    field(&mut out, "F");
                    field(&mut out, sha256);
                    number(&mut out, size);
                    number(&mut out, mtime);
                    number(&mut out, mode);
                }
                Entry::Dir => field(&mut out, "D"),
                Entry::Link { target } => {
                    field(&mut out, "L");
                    field(&mut out, target);
                }
            }
            field(&mut out, path);
        }
        let digest = hex::encode(Sha256::digest(&out[header..]));
        out[..header - 1].copy_from_slice(format!("{MANIFEST_HEADER}{digest}").as_bytes());
        out
    }

    /// The SHA-256 that the first line of [`Manifest::to_bytes`] gives for the rest.
    pub fn digest_of(bytes: &[u8]) -> Option<&str> {
        let rest = bytes.strip_prefix(MANIFEST_HEADER.as_bytes())?;
        let digest = std::str::from_utf8(rest.get(..64)?).ok()?;
        (rest.get(64) == Some(&b'\n')).then_some(digest)
    }

    /// Reads [`Manifest::to_bytes`] (or the version before it); `None` for anything else, and
    /// for a manifest whose content is not what its first line says (a manifest is only a
    /// cache of what was verified: one that cannot be read means "verify everything again").
    pub fn from_bytes(bytes: &[u8]) -> Option<Manifest> {
        let body = match Manifest::digest_of(bytes) {
            Some(digest) => {
                let body = &bytes[MANIFEST_HEADER.len() + 65..];
                if hex::encode(Sha256::digest(body)) != digest {
                    return None;
                }
                body
            }
            None => bytes.strip_prefix(MANIFEST_V1)?,
        };
        let mut fields = body.split(|&b| b == 0);
        let mut text = || fields.next().and_then(|f| std::str::from_utf8(f).ok());
        let mut entries = BTreeMap::new();
        loop {
            let entry = match text() {
                Some("F") => Entry::File {
                    sha256: text()?.to_string(),
                    size: text()?.parse().ok()?,
                    mtime: text()?.parse().ok()?,
                    mode: text()?.parse().ok()?,
                },
                Some("D") => Entry::Dir,
                Some("L") => Entry::Link {
                    target: text()?.to_string(),
                },
                Some("") | None => break,
                Some(_) => return None,
            };
            entries.insert(text()?.to_string(), entry);
        }
        Some(Manifest { entries })
    }
}

/// The start of a saved manifest's first line: the format's version; the SHA-256 of what
/// follows the line completes it.
pub const MANIFEST_HEADER: &str = "fleet-manifest 2 ";
/// The first bytes of the previous version, which had no digest; still read.
const MANIFEST_V1: &[u8] = b"fleet-manifest 1\0";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("sync source {} does not exist or is not a folder", path.display())]
    SourceMissing { path: PathBuf },
    #[error("cannot read {}: {error}", path.display())]
    Unreadable {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: the name is not UTF-8; rename it to sync it, or exclude it", path.display())]
    NotUtf8 { path: PathBuf },
    #[error(
        "{path}: symlink to {target:?} points outside the synced folder; exclude it, or copy what it points to into the folder"
    )]
    LinkEscapes { path: String, target: String },
    #[error("{path}: is not a file, folder or symlink (a socket or device?); exclude it")]
    Special { path: String },
    #[error("{}: kept changing while it was read; sync again once it is written", path.display())]
    Unstable { path: PathBuf },
    #[error("exclude pattern {pattern:?}: {error}")]
    Pattern { pattern: String, error: String },
    #[error(
        "sync source {} is {what}: fleet would send everything in it to every host, keys included; set [sync] source to the project's own folder",
        path.display()
    )]
    SourceTooWide { path: PathBuf, what: &'static str },
    #[error(
        "sync source {} holds what looks like secrets: {}; add them to [sync] exclude (such as \".ssh/\") or move them out of the project",
        folder.display(),
        paths.join(", ")
    )]
    Secrets { folder: PathBuf, paths: Vec<String> },
}

/// Folders that hold credentials, and the names of SSH private keys: a project never needs
/// them on its training hosts.
const SECRET_FOLDERS: [&str; 3] = [".ssh", ".gnupg", ".aws"];
const PRIVATE_KEYS: [&str; 6] = [
    "id_rsa",
    "id_dsa",
    "id_ecdsa",
    "id_ed25519",
    "id_ecdsa_sk",
    "id_ed25519_sk",
];

/// Refuses a source that is `/` or a home directory.
pub fn refuse_wide_source(source: &Path) -> Result<(), ManifestError> {
    let resolved = source
        .canonicalize()
        .unwrap_or_else(|_| source.to_path_buf());
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .and_then(|h| h.canonicalize().ok());
    let what = if resolved == Path::new("/") {
        "the root folder"
    } else if home.as_deref() == Some(resolved.as_path()) {
        "your home directory"
    } else {
        return Ok(());
    };
    Err(ManifestError::SourceTooWide {
        path: source.to_path_buf(),
        what,
    })
}

/// Refuses a scanned project that holds credentials (see [`SECRET_FOLDERS`], [`PRIVATE_KEYS`])
/// that the filter did not exclude, naming them.
pub fn refuse_secrets(source: &Path, manifest: &Manifest) -> Result<(), ManifestError> {
    let mut paths: Vec<String> = Vec::new();
    for (path, entry) in &manifest.entries {
        let name = path.rsplit('/').next().unwrap_or(path);
        let secret = match entry {
            Entry::Dir => SECRET_FOLDERS.contains(&name),
            Entry::File { .. } => PRIVATE_KEYS.contains(&name),
            Entry::Link { .. } => false,
        };
        // A secret folder is named once, not with everything in it.
        let inside = paths
            .iter()
            .any(|p| p.ends_with('/') && path.starts_with(p.as_str()));
        if secret && !inside {
            paths.push(if matches!(entry, Entry::Dir) {
                format!("{path}/")
            } else {
                path.clone()
            });
        }
    }
    if paths.is_empty() {
        return Ok(());
    }
    Err(ManifestError::Secrets {
        folder: source.to_path_buf(),
        paths,
    })
}

/// What is left out of a sync: `[sync].exclude`, the source's `.fleetignore` (gitignore syntax),
/// fleet's own state folder, and `runs/`, where `fleet run` keeps its local logs.
#[derive(Debug)]
pub struct Filter {
    ignore: Gitignore,
}

impl Filter {
    pub fn new(source: &Path, exclude: &[String]) -> Result<Filter, ManifestError> {
        let mut builder = GitignoreBuilder::new(source);
        for pattern in exclude
            .iter()
            .map(String::as_str)
            // fleet's own state on the hosts, and `fleet run`'s local logs: never synced, whatever
            // the user's exclude list says.
            .chain([&*format!("/{STATE_DIR}/"), "/runs/"])
        {
            builder
                .add_line(None, pattern)
                .map_err(|e| ManifestError::Pattern {
                    pattern: pattern.to_string(),
                    error: e.to_string(),
                })?;
        }
        let fleetignore = source.join(".fleetignore");
        if fleetignore.is_file() {
            if let Some(e) = builder.add(&fleetignore) {
                return Err(ManifestError::Pattern {
                    pattern: fleetignore.display().to_string(),
                    error: e.to_string(),
                });
            }
        }
        let ignore = builder.build().map_err(|e| ManifestError::Pattern {
            pattern: "(all)".into(),
            error: e.to_string(),
        })?;
        Ok(Filter { ignore })
    }

    /// Is `path` (relative to the source) or a folder above it excluded?
    pub fn excludes(&self, path: &str, is_dir: bool) -> bool {
        self.ignore
            .matched_path_or_any_parents(path, is_dir)
            .is_ignore()
    }

    /// Is `path` itself excluded? Enough during a walk, which never enters an excluded folder.
    fn excludes_entry(&self, path: &str, is_dir: bool) -> bool {
        self.ignore.matched(path, is_dir).is_ignore()
    }
}

/// What a scan did, besides the manifest.
#[derive(Debug, Default)]
pub struct Scan {
    pub manifest: Manifest,
    /// Files whose content was read (not found in the cache).
    pub hashed: usize,
    /// The bytes of small files that were hashed (up to [`KEPT_BYTES`] in all): what an upload
    /// then sends to every host without reading the file again.
    pub contents: HashMap<String, Vec<u8>>,
}

/// Files up to this size that the scan hashes are kept in memory for the upload...
pub const KEPT_FILE: u64 = 1 << 20;
/// ...up to this much in all.
pub const KEPT_BYTES: u64 = 128 << 20;

/// Walks `source` and builds its manifest, hashing only what `cache` does not know, and keeps
/// the bytes of small files it hashed (up to [`KEPT_BYTES`]).
pub fn scan(source: &Path, filter: &Filter, cache: &mut HashCache) -> Result<Scan, ManifestError> {
    scan_keeping(source, filter, cache, KEPT_BYTES)
}

/// [`scan`], keeping up to `keep` bytes of small files (0 when nothing will be sent).
pub fn scan_keeping(
    source: &Path,
    filter: &Filter,
    cache: &mut HashCache,
    keep: u64,
) -> Result<Scan, ManifestError> {
    if !source.is_dir() {
        return Err(ManifestError::SourceMissing {
            path: source.to_path_buf(),
        });
    }
    let mut walk = Walk {
        filter,
        cache,
        scan: Scan::default(),
        pending: Vec::new(),
        kept: 0,
        keep,
    };
    walk.folder(source, "")?;
    let Walk {
        cache,
        mut scan,
        pending,
        ..
    } = walk;
    // In walk order, so the first file that fails is the one reported.
    for (file, hashed) in pending.iter().zip(hash_all(&pending, cache)) {
        let Hashed {
            entry,
            key,
            content,
        } = hashed?;
        if let (Some(key), Entry::File { sha256, .. }) = (key, &entry) {
            cache.put(&file.rel, key, sha256);
            scan.hashed += 1;
        }
        if let Some(content) = content {
            scan.contents.insert(file.rel.clone(), content);
        }
        scan.manifest.entries.insert(file.rel.clone(), entry);
    }
    Ok(scan)
}

/// A scan under way.
struct Walk<'a> {
    filter: &'a Filter,
    cache: &'a mut HashCache,
    scan: Scan,
    /// Files the cache does not know, hashed once the walk is done.
    pending: Vec<Pending>,
    /// Bytes of small files set to be kept so far...
    kept: u64,
    /// ...and at most.
    keep: u64,
}

/// A file to hash.
struct Pending {
    path: PathBuf,
    rel: String,
    meta: std::fs::Metadata,
    /// Keep its bytes (a small file, within the budget).
    keep: bool,
}

/// A hashed file: its entry, the stat key to cache its hash under (`None` when the cache knew
/// it after all), and its bytes if they were kept.
struct Hashed {
    entry: Entry,
    key: Option<StatKey>,
    content: Option<Vec<u8>>,
}

/// Hashes `pending` on as many threads as there are cores (up to 8), largest files first so a
/// big file starts at once while the small ones share the other threads. Results come back in
/// the order of `pending`.
fn hash_all(pending: &[Pending], cache: &HashCache) -> Vec<Result<Hashed, ManifestError>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .min(8)
        .min(pending.len());
    if threads <= 1 {
        return pending.iter().map(|file| file_entry(file, cache)).collect();
    }
    let mut order: Vec<usize> = (0..pending.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(pending[i].meta.len()));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<Option<Result<Hashed, ManifestError>>> =
        pending.iter().map(|_| None).collect();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    while let Some(&i) =
                        order.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                    {
                        done.push((i, file_entry(&pending[i], cache)));
                    }
                    done
                })
            })
            .collect();
        for worker in workers {
            for (i, result) in worker.join().unwrap_or_default() {
                results[i] = Some(result);
            }
        }
    });
    results
        .into_iter()
        .zip(pending)
        .map(|(result, file)| {
            result.unwrap_or_else(|| {
                Err(ManifestError::Unreadable {
                    path: file.path.clone(),
                    error: std::io::Error::other("the thread hashing it failed"),
                })
            })
        })
        .collect()
}

impl Walk<'_> {
    /// Adds what `dir` holds (`prefix` is its path relative to the source, empty at the top),
    /// in name order. Each entry is `stat`ed through its folder's open handle, not by its full
    /// path, which spares the kernel a path walk per file.
    fn folder(&mut self, dir: &Path, prefix: &str) -> Result<(), ManifestError> {
        let unreadable = |path: &Path, error| ManifestError::Unreadable {
            path: path.to_path_buf(),
            error,
        };
        let mut items = std::fs::read_dir(dir)
            .and_then(|items| items.collect::<std::io::Result<Vec<_>>>())
            .map_err(|e| unreadable(dir, e))?;
        items.sort_by_key(std::fs::DirEntry::file_name);
        for item in items {
            let path = item.path();
            let name = item.file_name();
            let name = name
                .to_str()
                .ok_or_else(|| ManifestError::NotUtf8 { path: path.clone() })?;
            let rel = if prefix.is_empty() {
                name.to_string()
            } else {
                format!("{prefix}/{name}")
            };
            let file_type = item.file_type().map_err(|e| unreadable(&path, e))?;
            if self.filter.excludes_entry(&rel, file_type.is_dir()) {
                continue;
            }
            let entry = if file_type.is_dir() {
                self.scan.manifest.entries.insert(rel.clone(), Entry::Dir);
                self.folder(&path, &rel)?;
                continue;
            } else if file_type.is_symlink() {
                let target = std::fs::read_link(&path).map_err(|e| unreadable(&path, e))?;
                let target = target
                    .to_str()
                    .ok_or_else(|| ManifestError::NotUtf8 { path: path.clone() })?
                    .to_string();
                if escapes(&rel, &target) {
                    return Err(ManifestError::LinkEscapes { path: rel, target });
                }
                Entry::Link { target }
            } else if file_type.is_file() {
                let meta = item.metadata().map_err(|e| unreadable(&path, e))?;
                if let Some(sha256) = self.cache.get(&rel, &StatKey::of(&meta)) {
                    file_of(&meta, sha256)
                } else {
                    let keep = meta.len() <= KEPT_FILE && self.kept < self.keep;
                    if keep {
                        self.kept += meta.len();
                    }
                    self.pending.push(Pending {
                        path,
                        rel,
                        meta,
                        keep,
                    });
                    continue;
                }
            } else {
                return Err(ManifestError::Special { path: rel });
            };
            self.scan.manifest.entries.insert(rel, entry);
        }
        Ok(())
    }
}

/// Does a symlink at `link` (relative path) with `target` resolve outside the tree?
fn escapes(link: &str, target: &str) -> bool {
    let target = Path::new(target);
    if target.is_absolute() {
        return true;
    }
    // Depth of the link's folder below the root, then walk the target's components.
    let mut depth = link.split('/').count() as i64 - 1;
    for component in target.components() {
        match component {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return true,
        }
        if depth < 0 {
            return true;
        }
    }
    false
}

/// The entry of the file `meta` describes, with its hash.
fn file_of(meta: &std::fs::Metadata, sha256: String) -> Entry {
    Entry::File {
        size: meta.len(),
        mtime: meta.mtime(),
        mode: meta.mode() & 0o7777,
        sha256,
    }
}

/// Hashes a file the cache did not know; reads it again when it changes under us (and takes
/// the cache's hash if it then knows the new version). A small file's bytes come back too if
/// it is to be kept and settled.
fn file_entry(file: &Pending, cache: &HashCache) -> Result<Hashed, ManifestError> {
    let path = &file.path;
    let unreadable = |error| ManifestError::Unreadable {
        path: path.clone(),
        error,
    };
    let mut before = file.meta.clone();
    for attempt in 0..3 {
        let key = StatKey::of(&before);
        if attempt > 0 {
            if let Some(sha256) = cache.get(&file.rel, &key) {
                return Ok(Hashed {
                    entry: file_of(&before, sha256),
                    key: None,
                    content: None,
                });
            }
        }
        // A file written within the last moments may change again within the same mtime tick,
        // unseen by the stat check: it is read again for the upload, whose check on the host
        // then catches a change.
        let settled = key.mtime_ns < cache.fresh_after_ns;
        let (sha256, content) = if file.keep && settled && before.len() <= KEPT_FILE {
            let content = std::fs::read(path).map_err(unreadable)?;
            (hex::encode(Sha256::digest(&content)), Some(content))
        } else {
            (hash_file(path).map_err(unreadable)?, None)
        };
        let after = std::fs::symlink_metadata(path).map_err(unreadable)?;
        if StatKey::of(&after) == key {
            return Ok(Hashed {
                entry: file_of(&before, sha256),
                key: Some(key),
                content,
            });
        }
        before = after;
    }
    Err(ManifestError::Unstable { path: path.clone() })
}

/// SHA-256 of a file's content, lower-case hex.
pub fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// What identifies a file's version without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatKey {
    size: u64,
    mtime_ns: i128,
    ino: u64,
}

impl StatKey {
    fn of(meta: &std::fs::Metadata) -> StatKey {
        StatKey {
            size: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ino: meta.ino(),
        }
    }
}

/// Hashes of local files by path, valid while their size, mtime and inode stay the same.
/// Kept in `~/.cache/fleet/hashes/`, one file per source folder.
#[derive(Debug, Default)]
pub struct HashCache {
    entries: HashMap<String, (StatKey, String)>,
    file: Option<PathBuf>,
    changed: bool,
    /// Files modified this recently may still change within the same mtime tick: not cached.
    fresh_after_ns: i128,
}

impl HashCache {
    /// The cache for `source`, empty when there is none yet or it cannot be read.
    pub fn open(source: &Path) -> HashCache {
        let absolute = std::fs::canonicalize(source).unwrap_or_else(|_| source.to_path_buf());
        let file = cache_file("hashes", &absolute.to_string_lossy(), "cache");
        let entries = std::fs::read(&file)
            .ok()
            .and_then(|bytes| HashCache::from_bytes(&bytes))
            .unwrap_or_default();
        HashCache {
            entries,
            file: Some(file),
            changed: false,
            fresh_after_ns: now_ns() - 2_000_000_000,
        }
    }

    /// NUL-separated fields as in a manifest: path, size, mtime (ns), inode, SHA-256.
    fn to_bytes(&self) -> Vec<u8> {
        use std::io::Write;
        let mut out = Vec::with_capacity(64 + self.entries.len() * 120);
        out.extend_from_slice(HASHES_MAGIC);
        for (path, (key, sha256)) in &self.entries {
            let _ = write!(
                out,
                "{path}\0{}\0{}\0{}\0{sha256}\0",
                key.size, key.mtime_ns, key.ino
            );
        }
        out
    }

    fn from_bytes(bytes: &[u8]) -> Option<HashMap<String, (StatKey, String)>> {
        let mut fields = bytes.strip_prefix(HASHES_MAGIC)?.split(|&b| b == 0);
        let mut text = || fields.next().and_then(|f| std::str::from_utf8(f).ok());
        let mut entries = HashMap::new();
        loop {
            let path = match text() {
                Some("") | None => break,
                Some(path) => path.to_string(),
            };
            let key = StatKey {
                size: text()?.parse().ok()?,
                mtime_ns: text()?.parse().ok()?,
                ino: text()?.parse().ok()?,
            };
            entries.insert(path, (key, text()?.to_string()));
        }
        Some(entries)
    }

    /// A cache that remembers nothing between runs.
    pub fn in_memory() -> HashCache {
        HashCache {
            fresh_after_ns: now_ns() - 2_000_000_000,
            ..HashCache::default()
        }
    }

    fn get(&self, path: &str, key: &StatKey) -> Option<String> {
        self.entries
            .get(path)
            .filter(|(k, _)| k == key)
            .map(|(_, sha)| sha.clone())
    }

    fn put(&mut self, path: &str, key: StatKey, sha256: &str) {
        if key.mtime_ns < self.fresh_after_ns {
            self.entries
                .insert(path.to_string(), (key, sha256.to_string()));
            self.changed = true;
        }
    }

    /// Keeps only `manifest`'s files and writes the cache (best effort: it is only a cache).
    pub fn save(&mut self, manifest: &Manifest) {
        let before = self.entries.len();
        self.entries
            .retain(|path, _| matches!(manifest.entries.get(path), Some(Entry::File { .. })));
        let Some(file) = &self.file else { return };
        if !self.changed && before == self.entries.len() {
            return;
        }
        write_cache_file(file, &self.to_bytes());
    }
}

/// The first bytes of a hash cache file, with its format version.
const HASHES_MAGIC: &[u8] = b"fleet-hashes 1\0";

/// `~/.cache/fleet/<kind>/<digest of key>.<extension>` (or under `$XDG_CACHE_HOME`).
fn cache_file(kind: &str, key: &str, extension: &str) -> PathBuf {
    let name = hex::encode(&Sha256::digest(key.as_bytes())[..12]);
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::inventory::expand_tilde("~/.cache"))
        .join("fleet")
        .join(kind)
        .join(format!("{name}.{extension}"))
}

/// A local copy of the manifest a host's workdir holds (what its last verified sync saved
/// there), in `~/.cache/fleet/hosts/`. With it the host need not send its manifest back: it
/// only confirms that its own starts with the same first line (the same digest of the rest),
/// and a sync that changes nothing need not write it again. It is only a cache: when the host's differs, the host's is read.
#[derive(Clone, Debug)]
pub struct SavedCopy {
    file: PathBuf,
}

impl SavedCopy {
    /// The copy for `workdir` on the host known as `host` (user, address and port).
    pub fn for_host(host: &str, workdir: &str) -> SavedCopy {
        SavedCopy {
            file: cache_file("hosts", &format!("{host}\0{workdir}"), "manifest"),
        }
    }

    /// Reads the copies of several hosts: each one's digest ([`Manifest::digest_of`]) and
    /// manifest, if it reads. Hosts synced together hold the same manifest: equal copies are
    /// parsed once and shared.
    pub fn read_all(copies: &[SavedCopy]) -> Vec<Option<(String, Arc<Manifest>)>> {
        let mut parsed: Vec<(Vec<u8>, Arc<Manifest>)> = Vec::new();
        copies
            .iter()
            .map(|copy| {
                let bytes = std::fs::read(&copy.file).ok()?;
                let digest = Manifest::digest_of(&bytes)?.to_string();
                let manifest = match parsed.iter().find(|(seen, _)| *seen == bytes) {
                    Some((_, manifest)) => manifest.clone(),
                    None => {
                        let manifest = Arc::new(Manifest::from_bytes(&bytes)?);
                        parsed.push((bytes, manifest.clone()));
                        manifest
                    }
                };
                Some((digest, manifest))
            })
            .collect()
    }

    /// Replaces the copy with `bytes`, a manifest's [`Manifest::to_bytes`].
    pub fn write(&self, bytes: &[u8]) {
        write_cache_file(&self.file, bytes);
    }
}

/// Replaces a cache file (best effort: it is only a cache).
fn write_cache_file(file: &Path, bytes: &[u8]) {
    let Some(dir) = file.parent() else {
        return;
    };
    let tmp = file.with_extension(format!("tmp.{}", std::process::id()));
    if crate::files::create_private_dir(dir).is_ok() && std::fs::write(&tmp, bytes).is_ok() {
        let _ = std::fs::rename(&tmp, file);
    }
}

fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("data/한국어 폴더")).unwrap();
        std::fs::create_dir_all(root.join("empty")).unwrap();
        std::fs::create_dir_all(root.join("target/debug")).unwrap();
        std::fs::write(
            root.join("data/한국어 폴더/학습 데이터.csv"),
            "text,label\n안녕,1\n",
        )
        .unwrap();
        std::fs::write(root.join("target/debug/big"), "x").unwrap();
        std::fs::write(root.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::fs::write(root.join("it's $(x).txt"), "").unwrap();
        symlink("data/한국어 폴더", root.join("latest")).unwrap();
        // fleet's own folders at the top are never synced; a folder named runs deeper down is.
        for (folder, file) in [
            ("runs/20261126-1", "rank-0.log"),
            (".fleet", "manifest"),
            ("data/runs", "kept.txt"),
        ] {
            std::fs::create_dir_all(root.join(folder)).unwrap();
            std::fs::write(root.join(folder).join(file), "x").unwrap();
        }
        dir
    }

    #[test]
    fn scan_keeps_names_modes_links_and_empty_folders() {
        let dir = tree();
        let filter = Filter::new(dir.path(), &["target/".to_string()]).unwrap();
        let scan = scan(dir.path(), &filter, &mut HashCache::in_memory()).unwrap();
        let paths: Vec<&str> = scan.manifest.entries.keys().map(String::as_str).collect();
        assert_eq!(
            paths,
            [
                "data",
                "data/runs",
                "data/runs/kept.txt",
                "data/한국어 폴더",
                "data/한국어 폴더/학습 데이터.csv",
                "empty",
                "it's $(x).txt",
                "latest",
                "run.sh"
            ]
        );
        assert_eq!(
            scan.manifest.entries["latest"],
            Entry::Link {
                target: "data/한국어 폴더".into()
            }
        );
        let Entry::File { mode, sha256, .. } = &scan.manifest.entries["run.sh"] else {
            panic!()
        };
        assert_eq!(*mode, 0o755);
        assert_eq!(sha256, &hash_file(&dir.path().join("run.sh")).unwrap());
        assert_eq!(scan.hashed, 4);
    }

    #[test]
    fn fleetignore_excludes_like_gitignore() {
        let dir = tree();
        std::fs::write(dir.path().join(".fleetignore"), "*.csv\n!keep.csv\n").unwrap();
        std::fs::write(dir.path().join("keep.csv"), "").unwrap();
        let filter = Filter::new(dir.path(), &[]).unwrap();
        let scan = scan(dir.path(), &filter, &mut HashCache::in_memory()).unwrap();
        assert!(scan.manifest.entries.contains_key("keep.csv"));
        assert!(
            !scan
                .manifest
                .entries
                .contains_key("data/한국어 폴더/학습 데이터.csv")
        );
        assert!(scan.manifest.entries.contains_key("target/debug/big"));
    }

    #[test]
    fn links_out_of_the_tree_are_refused_by_name() {
        let dir = tree();
        symlink("../../etc/passwd", dir.path().join("data/escape")).unwrap();
        let filter = Filter::new(dir.path(), &[]).unwrap();
        let err = scan(dir.path(), &filter, &mut HashCache::in_memory())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("data/escape: symlink to \"../../etc/passwd\" points outside"),
            "{err}"
        );
        assert!(escapes("a", "/etc"));
        assert!(!escapes("a/b/link", "../c"));
        assert!(escapes("a/link", "../../c"));
        assert!(!escapes("link", "a/../b"));
    }

    #[test]
    fn the_cache_skips_unchanged_files_and_notices_edits() {
        let dir = tree();
        let filter = Filter::new(dir.path(), &[]).unwrap();
        let mut cache = HashCache::in_memory();
        // Files written just now are too fresh to cache; pretend the scan happens later.
        cache.fresh_after_ns = i128::MAX;
        let first = scan(dir.path(), &filter, &mut cache).unwrap();
        assert_eq!(first.hashed, 5);
        let second = scan(dir.path(), &filter, &mut cache).unwrap();
        assert_eq!(second.hashed, 0);
        assert_eq!(second.manifest, first.manifest);
        std::fs::write(dir.path().join("run.sh"), "#!/bin/sh\necho changed\n").unwrap();
        let third = scan(dir.path(), &filter, &mut cache).unwrap();
        assert_eq!(third.hashed, 1);
        assert_ne!(
            third.manifest.entries["run.sh"],
            first.manifest.entries["run.sh"]
        );
    }

    #[test]
    fn settled_small_files_keep_their_hashed_bytes_and_fresh_ones_do_not() {
        let dir = tree();
        let filter = Filter::new(dir.path(), &[]).unwrap();
        let mut cache = HashCache::in_memory();
        // Just written: too fresh to trust a second read to match the first.
        let fresh = scan(dir.path(), &filter, &mut cache).unwrap();
        assert!(fresh.contents.is_empty());
        let mut cache = HashCache::in_memory();
        cache.fresh_after_ns = i128::MAX;
        let settled = scan(dir.path(), &filter, &mut cache).unwrap();
        assert!(settled.hashed > 0);
        assert_eq!(settled.contents.len(), settled.hashed);
        for (path, bytes) in &settled.contents {
            assert_eq!(
                bytes,
                &std::fs::read(dir.path().join(path)).unwrap(),
                "{path}"
            );
            let Entry::File { sha256, .. } = &settled.manifest.entries[path] else {
                panic!("{path} is not a file");
            };
            assert_eq!(sha256, &hex::encode(Sha256::digest(bytes)));
        }
        // A scan whose files will not be sent (`fleet check`) keeps none.
        let mut cache = HashCache::in_memory();
        cache.fresh_after_ns = i128::MAX;
        let checked = scan_keeping(dir.path(), &filter, &mut cache, 0).unwrap();
        assert_eq!(checked.hashed, settled.hashed);
        assert!(checked.contents.is_empty());
    }

    #[test]
    fn saved_manifests_read_back_exactly() {
        let dir = tree();
        let filter = Filter::new(dir.path(), &[]).unwrap();
        let manifest = scan(dir.path(), &filter, &mut HashCache::in_memory())
            .unwrap()
            .manifest;
        let mut odd = manifest.clone();
        odd.entries.insert(
            "new\nline/and tab\t".into(),
            Entry::Link {
                target: "x y".into(),
            },
        );
        for m in [manifest, odd, Manifest::default()] {
            assert_eq!(Manifest::from_bytes(&m.to_bytes()), Some(m));
        }
        assert_eq!(Manifest::from_bytes(b"{\"entries\":{}}"), None);
        assert_eq!(
            Manifest::from_bytes(b"fleet-manifest 1\0F\0abc\0notanumber\0"),
            None
        );
        // The version before digests still reads.
        assert_eq!(
            Manifest::from_bytes(b"fleet-manifest 1\0D\0data\0"),
            Some(Manifest {
                entries: [("data".to_string(), Entry::Dir)].into()
            })
        );
        // A manifest whose content is not what its first line says is not trusted.
        let mut bytes = Manifest {
            entries: [("data".to_string(), Entry::Dir)].into(),
        }
        .to_bytes();
        assert!(Manifest::digest_of(&bytes).is_some());
        let last = bytes.len() - 2;
        bytes[last] = b'x';
        assert_eq!(Manifest::from_bytes(&bytes), None);
    }

    #[test]
    fn missing_source_is_named() {
        let filter = Filter::new(Path::new("/nonexistent"), &[]).unwrap();
        let err = scan(
            Path::new("/nonexistent/project"),
            &filter,
            &mut HashCache::in_memory(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "sync source /nonexistent/project does not exist or is not a folder"
        );
    }

    #[test]
    fn credentials_in_the_source_are_named_once_each() {
        let file = || Entry::File {
            size: 1,
            mtime: 0,
            mode: 0o600,
            sha256: String::new(),
        };
        let entries = [
            ("a.py", file()),
            ("home/.ssh", Entry::Dir),
            ("home/.ssh/id_rsa", file()),
            ("home/.ssh/known_hosts", file()),
            ("keys/id_ed25519", file()),
            ("keys/id_ed25519.pub", file()),
            (".aws", Entry::Dir),
        ];
        let manifest = Manifest {
            entries: entries
                .into_iter()
                .map(|(p, e)| (p.to_string(), e))
                .collect(),
        };
        let err = refuse_secrets(Path::new("proj"), &manifest)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "holds what looks like secrets: .aws/, home/.ssh/, keys/id_ed25519; add them"
            ),
            "{err}"
        );
        let clean = Manifest {
            entries: [("a.py".to_string(), file())].into_iter().collect(),
        };
        assert!(refuse_secrets(Path::new("proj"), &clean).is_ok());
        assert!(
            refuse_wide_source(Path::new("/"))
                .unwrap_err()
                .to_string()
                .contains("is the root folder")
        );
    }
}
