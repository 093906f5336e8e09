//! The host's side of a sync: its workdir, held under a lock for the whole sync; what is there
//! now (a stat listing and the manifest saved by the last verified sync); and the batched
//! commands a sync runs there (hash, remove, mkdir, link), each one exec for many paths.

use std::collections::HashMap;
use std::sync::Arc;

use super::manifest::{MANIFEST_HEADER, Manifest};
use super::plan::{Listing, RemoteEntry};
use crate::remote::{self, Script};
use crate::ssh::{ExitStatus, RemoteProcess, Session, SshError};

/// Where the last verified manifest is kept, relative to the workdir.
pub const SAVED_MANIFEST: &str = ".fleet/manifest";
/// Temporary files are named `.fleet-tmp.<nonce>.<n>` beside their destination.
pub const TMP_PREFIX: &str = ".fleet-tmp.";

/// The `<nonce>` of one transfer's temporary names: two transfers at once (or one right after
/// another in the same process) never share it.
pub fn temporary_nonce() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{:08x}", std::process::id() ^ nanos)
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error("{host}: {message}")]
    Host { host: String, message: String },
    #[error("{host}: {path}: {message}")]
    File {
        host: String,
        path: String,
        message: String,
    },
}

/// A host's workdir, locked against other syncs until [`HostTree::release`].
pub struct HostTree<'a> {
    pub session: &'a Session,
    /// The workdir's absolute path on the host.
    pub root: String,
    lock: RemoteProcess,
}

/// What a host's workdir holds: the manifest saved by its last verified sync (`None` if there
/// is none, or it cannot be read) and a stat listing of the tree now.
pub struct HostState {
    pub saved: Option<Arc<Manifest>>,
    pub listing: Listing,
    /// The host confirmed that its saved manifest is the local copy fleet holds of it (the
    /// same digest on its first line).
    pub confirmed: bool,
    /// The job running in the workdir, if one is (only known under the sync lock).
    pub running_job: Option<String>,
}

/// Parses the two blocks of `print_state` (`saved` is None when the host confirmed the
/// `known` manifest). Ten thousand entries are real work: it runs off the async threads, so
/// hosts parse in parallel.
async fn parse_state(
    host: &str,
    saved: Option<Vec<u8>>,
    known: Option<Arc<Manifest>>,
    listing: Vec<u8>,
) -> Result<HostState, SyncError> {
    let parsed = tokio::task::spawn_blocking(move || {
        parse_listing(&listing).map(|listing| HostState {
            running_job: None,
            confirmed: saved.is_none() && known.is_some(),
            saved: match saved {
                Some(bytes) => Manifest::from_bytes(&bytes).map(Arc::new),
                None => known,
            },
            listing,
        })
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    parsed.map_err(|message| SyncError::Host {
        host: host.to_string(),
        message,
    })
}

/// A decimal length on its own line, then that many bytes, from the front of `bytes`.
fn take_sized(bytes: &mut &[u8]) -> Option<Vec<u8>> {
    let newline = bytes.iter().position(|&b| b == b'\n')?;
    let length: usize = std::str::from_utf8(&bytes[..newline])
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let block = bytes.get(newline + 1..newline + 1 + length)?.to_vec();
    *bytes = &bytes[newline + 1 + length..];
    Some(block)
}

/// The saved manifest and a listing of a workdir, read without taking the sync lock (for
/// `fleet check`: a sync running at the same time can make it report files out of sync).
pub async fn peek(session: &Session, workdir: &str) -> Result<HostState, SyncError> {
    let host = &session.target().name;
    let script = Script::new(remote::SYNC_PEEK)
        .using(remote::SYNC_STATE)
        .args([workdir, SAVED_MANIFEST]);
    let (_, out, _) = session.capture(&script).await?;
    let mut rest = out.as_slice();
    match (take_sized(&mut rest), take_sized(&mut rest)) {
        (Some(saved), Some(listing)) => parse_state(host, Some(saved), None, listing).await,
        // No workdir yet: nothing saved, nothing there.
        _ => Ok(HostState {
            running_job: None,
            confirmed: false,
            saved: None,
            listing: Listing::new(),
        }),
    }
}

/// Why sync_lock.sh refused a workdir (its `foreign` and `unsafe` replies), as the user reads it.
fn refusal(line: &str, workdir: &str) -> Option<String> {
    if line == "foreign" {
        return Some(format!(
            "workdir {workdir} holds files but was never synced by fleet (it has no .fleet folder): refused, so nothing in it is replaced or deleted; `fleet sync --adopt` takes it over, or choose an empty workdir"
        ));
    }
    let what = line.strip_prefix("unsafe ")?;
    Some(format!(
        "workdir {workdir} is {what}: the root folder, the home directory or a folder above it, which fleet sync --delete could empty: refused; set workdir to a folder of its own, such as ~/fleet/project"
    ))
}

/// What to say when the lock script ended without locking: it timed out waiting if it said
/// nothing, or failed with `why`.
fn lock_failed(workdir: &str, why: &str) -> String {
    if why.is_empty() {
        format!("cannot lock workdir {workdir}: another sync held it for 10 minutes")
    } else {
        format!("cannot prepare workdir {workdir}: {why}")
    }
}

/// The host's state that follows `locked`: the job running in the workdir, the saved manifest
/// (or `same` as the one `known` holds) and the listing of the tree, each behind its length.
async fn read_state(
    lock: &mut RemoteProcess,
    host: &str,
    workdir: &str,
    known: Option<Arc<Manifest>>,
) -> Result<HostState, SyncError> {
    let running_job = lock
        .next_line()
        .await
        .and_then(|l| l.strip_prefix("job ").map(str::to_string))
        .filter(|j| !j.is_empty());
    let saved = match lock.next_line().await {
        Some(line) if line == "same" => Some(None),
        Some(line) => match line.trim().parse() {
            Ok(length) => lock.next_bytes(length).await.map(Some),
            Err(_) => None,
        },
        None => None,
    };
    let listing = read_sized(lock).await;
    let (Some(saved), Some(listing)) = (saved, listing) else {
        let message = format!("listing workdir {workdir} failed: {}", lock.stderr());
        return Err(SyncError::Host {
            host: host.to_string(),
            message,
        });
    };
    let mut state = parse_state(host, saved, known, listing).await?;
    state.running_job = running_job;
    Ok(state)
}

/// A decimal length on its own line, then that many bytes.
async fn read_sized(process: &mut RemoteProcess) -> Option<Vec<u8>> {
    let length: usize = process.next_line().await?.trim().parse().ok()?;
    process.next_bytes(length).await
}

impl<'a> HostTree<'a> {
    /// Creates the workdir if needed and takes its lock, waiting (up to 10 minutes) while another
    /// sync holds it; `waiting` is called once if it has to. The lock is a `flock` held by a
    /// command that lives until its stdin closes, so a laptop that vanishes releases it too.
    /// `known` is a local copy of the manifest the host is thought to hold, with its digest
    /// ([`Manifest::digest_of`]): when the host's has the same, it is not sent back.
    ///
    /// A workdir that holds files but was never fleet's is refused unless `adopt`, and one that
    /// is `/`, the home directory or above it always is.
    pub async fn lock(
        session: &'a Session,
        workdir: &str,
        known: Option<(String, Arc<Manifest>)>,
        adopt: bool,
        waiting: impl FnOnce(),
    ) -> Result<(HostTree<'a>, HostState), SyncError> {
        let host = session.target().name.clone();
        // Once locked, the same command reports the host's state (saved manifest, then a stat
        // listing of the tree, each behind its length), saving a round trip per sync.
        let header = match &known {
            Some((digest, _)) => format!("{MANIFEST_HEADER}{digest}"),
            None => String::new(),
        };
        let script = Script::new(remote::SYNC_LOCK)
            .using(remote::SYNC_STATE)
            .args([
                workdir,
                SAVED_MANIFEST,
                &header,
                if adopt { "1" } else { "0" },
            ]);
        let mut lock = session.start(&script).await?;
        let mut waiting = Some(waiting);
        loop {
            let Some(line) = lock.next_line().await else {
                let message = lock_failed(workdir, &lock.stderr());
                return Err(SyncError::Host { host, message });
            };
            if line == "busy" {
                if let Some(f) = waiting.take() {
                    f();
                }
            } else if let Some(message) = refusal(&line, workdir) {
                return Err(SyncError::Host { host, message });
            } else if let Some(root) = line.strip_prefix("locked ") {
                let root = root.to_string();
                let known = known.map(|(_, manifest)| manifest);
                let state = read_state(&mut lock, &host, workdir, known).await?;
                return Ok((
                    HostTree {
                        session,
                        root,
                        lock,
                    },
                    state,
                ));
            }
        }
    }

    pub fn host(&self) -> &str {
        &self.session.target().name
    }

    /// Absolute path on the host of `rel`.
    pub fn path(&self, rel: &str) -> String {
        format!("{}/{rel}", self.root)
    }

    /// Releases the lock.
    pub async fn release(self) {
        self.lock.finish().await;
    }

    fn error(&self, message: impl Into<String>) -> SyncError {
        SyncError::Host {
            host: self.host().to_string(),
            message: message.into(),
        }
    }

    /// Runs `operation` of [`remote::SYNC_BATCH`] on the NUL-separated paths of `input`.
    async fn batch(&self, what: &str, operation: &str, input: &[u8]) -> Result<(), SyncError> {
        let script = Script::new(remote::SYNC_BATCH).args([&self.root, operation]);
        let (status, _, stderr) = self.session.capture_with_input(&script, input).await?;
        if status != ExitStatus::Code(0) {
            let stderr = String::from_utf8_lossy(&stderr);
            return Err(self.error(format!("{what} failed ({status:?}): {}", stderr.trim())));
        }
        Ok(())
    }

    /// SHA-256 of files on the host (paths relative to the workdir), read back from its disk
    /// ([`remote::SYNC_HASH`]). A file that cannot be read is missing from the result.
    pub async fn hash(&self, paths: &[String]) -> Result<HashMap<String, String>, SyncError> {
        if paths.is_empty() {
            return Ok(HashMap::new());
        }
        // Names openssl would escape go last, to sha256sum -z, in the order the records come.
        let (plain, odd): (Vec<&String>, Vec<&String>) =
            paths.iter().partition(|p| !p.contains(['\n', '\\']));
        let ordered: Vec<String> = plain.iter().chain(&odd).map(|p| p.to_string()).collect();
        // "./" keeps a name that starts with '-' from reading as an option.
        let dotted: Vec<String> = ordered.iter().map(|p| format!("./{p}")).collect();
        let input = nul_list(&dotted);
        let plain_bytes: usize = dotted[..plain.len()].iter().map(|p| p.len() + 1).sum();
        let script =
            Script::new(remote::SYNC_HASH).args([self.root.clone(), plain_bytes.to_string()]);
        let (status, out, _) = self.session.capture_with_input(&script, &input).await?;
        let _ = status; // A missing file makes the tools fail; the files that were hashed still count.
        Ok(parse_hashes(&out, &ordered))
    }

    /// `rm -rf` of many paths.
    pub async fn remove(&self, paths: &[String]) -> Result<(), SyncError> {
        if paths.is_empty() {
            return Ok(());
        }
        self.batch("removing files", "remove", &nul_list(paths))
            .await
    }

    /// `mkdir -p` of many folders.
    pub async fn mkdirs(&self, paths: &[String]) -> Result<(), SyncError> {
        if paths.is_empty() {
            return Ok(());
        }
        self.batch("creating folders", "mkdir", &nul_list(paths))
            .await
    }

    /// Writes the workdir's file system to disk (see [`remote::SYNC_BATCH`]'s `flush`).
    pub async fn flush(&self) -> Result<(), SyncError> {
        self.batch("writing files to disk", "flush", &[]).await
    }

    /// Creates (or replaces) symlinks: `(path, target)` pairs.
    pub async fn links(&self, links: &[(String, String)]) -> Result<(), SyncError> {
        if links.is_empty() {
            return Ok(());
        }
        let pairs: Vec<String> = links
            .iter()
            .flat_map(|(path, target)| [target.clone(), path.clone()])
            .collect();
        self.batch("creating symlinks", "link", &nul_list(&pairs))
            .await
    }
}

fn nul_list(paths: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(paths.iter().map(|p| p.len() + 1).sum());
    for p in paths {
        out.extend_from_slice(p.as_bytes());
        out.push(0);
    }
    out
}

/// Reads `<64 hex><2 separator bytes>./<path><terminator>` records, for the expected paths in
/// order (the tools keep argument order), so names holding newlines or spaces parse exactly.
/// Parsing stops at the first record that does not match.
pub fn parse_hashes(out: &[u8], paths: &[String]) -> HashMap<String, String> {
    let mut hashes = HashMap::with_capacity(paths.len());
    let mut rest = out;
    let mut expected = paths.iter().peekable();
    while let Some(path) = expected.peek() {
        let name = format!("./{path}");
        let fits = rest.len() > 66 + name.len();
        let matches = fits && {
            let (hash, after) = rest.split_at(64);
            hash.iter().all(u8::is_ascii_hexdigit)
                && &after[2..2 + name.len()] == name.as_bytes()
                && matches!(after[2 + name.len()], b'\n' | 0)
        };
        if !matches {
            // A file the tool could not read has no record: try the next expected path here.
            expected.next();
            continue;
        }
        hashes.insert(
            path.to_string(),
            String::from_utf8_lossy(&rest[..64]).to_ascii_lowercase(),
        );
        rest = &rest[67 + name.len()..];
        expected.next();
    }
    hashes
}

/// Parses `find -printf '%y\0%s\0%T@\0%m\0%P\0%l\0'` output (`%T@` is seconds with a fraction;
/// `%Ts` would go through strftime and mktime for every file, three times the cost of the walk).
pub fn parse_listing(bytes: &[u8]) -> Result<Listing, String> {
    // Numbers are ASCII; anything else fails to parse below.
    fn number(field: &[u8]) -> &str {
        std::str::from_utf8(field).unwrap_or("")
    }
    let mut fields = bytes.split(|&b| b == 0);
    let mut listing = Listing::new();
    while let (Some(kind), Some(size), Some(mtime), Some(mode), Some(path), Some(target)) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) {
        let path = String::from_utf8_lossy(path).into_owned();
        let entry = match kind {
            b"f" => RemoteEntry::File {
                size: number(size)
                    .parse()
                    .map_err(|_| format!("bad size in listing for {path}"))?,
                mtime: number(mtime)
                    .split('.')
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0),
                mode: u32::from_str_radix(number(mode), 8)
                    .map_err(|_| format!("bad mode in listing for {path}"))?,
            },
            b"d" => RemoteEntry::Dir,
            b"l" => RemoteEntry::Link {
                target: String::from_utf8_lossy(target).into_owned(),
            },
            _ => RemoteEntry::Other,
        };
        listing.insert(path, entry);
    }
    Ok(listing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_fields_split_on_nul_only() {
        let raw = b"d\x004096\x001700000000.5\x00755\x00data dir\x00\x00f\x0012\x001700000001.9999\x00644\x00data dir/a\tb\nc.csv\x00\x00l\x004\x001\x00777\x00ln\x00data dir\x00";
        let listing = parse_listing(raw).unwrap();
        assert_eq!(listing["data dir"], RemoteEntry::Dir);
        assert_eq!(
            listing["data dir/a\tb\nc.csv"],
            RemoteEntry::File {
                size: 12,
                mtime: 1700000001,
                mode: 0o644
            }
        );
        assert_eq!(
            listing["ln"],
            RemoteEntry::Link {
                target: "data dir".into()
            }
        );
    }

    #[test]
    fn hash_records_parse_with_any_name() {
        let a = "a".repeat(64);
        let b = "B".repeat(64);
        let names = vec![
            "x y\nz".to_string(),
            "missing".to_string(),
            "d/f".to_string(),
        ];
        let openssl = format!("{a} *./x y\nz\n{b} *./d/f\n");
        let hashes = parse_hashes(openssl.as_bytes(), &names);
        assert_eq!(hashes.get("x y\nz"), Some(&a));
        assert_eq!(hashes.get("d/f"), Some(&"b".repeat(64)));
        assert_eq!(hashes.get("missing"), None);
        let coreutils = format!("{a}  ./x y\nz\0{b}  ./d/f\0");
        assert_eq!(parse_hashes(coreutils.as_bytes(), &names), hashes);
    }

    #[test]
    fn sized_blocks_read_back_with_any_content() {
        let raw = b"5\na\n\0bc0\n12\nrest";
        let mut rest = &raw[..];
        assert_eq!(take_sized(&mut rest).as_deref(), Some(&b"a\n\0bc"[..]));
        assert_eq!(take_sized(&mut rest).as_deref(), Some(&b""[..]));
        assert_eq!(
            take_sized(&mut rest),
            None,
            "a block shorter than its length is not read"
        );
    }
}
