//! The host's side of a sync: its workdir, held under a lock for the whole sync; what is there
//! now (a stat listing and the manifest saved by the last verified sync); and the batched
//! commands a sync runs there (hash, remove, mkdir, link), each one exec for many paths.

use std::collections::HashMap;
use std::sync::Arc;

use super::manifest::{MANIFEST_HEADER, Manifest, STATE_DIR};
use super::plan::{Listing, RemoteEntry};
use crate::shell;
use crate::ssh::{ExitStatus, RemoteProcess, Session, SshError};

/// Where the last verified manifest is kept, relative to the workdir.
pub const SAVED_MANIFEST: &str = ".fleet/manifest";
/// Temporary files are named `.fleet-tmp.<nonce>.<n>` beside their destination.
pub const TMP_PREFIX: &str = ".fleet-tmp.";

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
}

/// Shell that prints a workdir's state, run in the workdir: the saved manifest, then the
/// listing, each as a decimal length on its own line followed by that many bytes. When the
/// saved manifest's first line carries the digest `known` (that of fleet's copy), the line
/// `same` replaces it: the shell's builtin `read` tells, without reading the rest.
fn state_script(known: Option<&str>) -> String {
    let same = match known {
        Some(digest) if digest.bytes().all(|b| b.is_ascii_hexdigit()) => format!(
            "IFS= read -r head < {SAVED_MANIFEST} && [ \"$head\" = '{MANIFEST_HEADER}{digest}' ] && echo same || "
        ),
        _ => String::new(),
    };
    format!(
        "if [ -f {SAVED_MANIFEST} ]; then {same}{{ wc -c < {SAVED_MANIFEST}; cat {SAVED_MANIFEST}; }}; else echo 0; fi\n\
         l={STATE_DIR}/listing.$$\n\
         find . -mindepth 1 -path ./{STATE_DIR} -prune -o -printf '%y\\0%s\\0%T@\\0%m\\0%P\\0%l\\0' > \"$l\"\n\
         wc -c < \"$l\"; cat \"$l\"; rm -f \"$l\"\n"
    )
}

/// Parses the two blocks of [`state_script`] (`saved` is None when the host confirmed the
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
    let script = format!(
        "cd -- {} 2>/dev/null || exit 0\n{}",
        shell_path(workdir),
        state_script(None)
    );
    let (_, out, _) = session.capture(&shell::sh(&script)).await?;
    let mut rest = out.as_slice();
    match (take_sized(&mut rest), take_sized(&mut rest)) {
        (Some(saved), Some(listing)) => parse_state(host, Some(saved), None, listing).await,
        // No workdir yet: nothing saved, nothing there.
        _ => Ok(HostState {
            confirmed: false,
            saved: None,
            listing: Listing::new(),
        }),
    }
}

/// A decimal length on its own line, then that many bytes.
async fn read_sized(process: &mut RemoteProcess) -> Option<Vec<u8>> {
    let length: usize = process.next_line().await?.trim().parse().ok()?;
    process.next_bytes(length).await
}

/// The workdir as the remote shell should see it: `~/` stays unquoted so it expands there.
pub fn shell_path(workdir: &str) -> String {
    match workdir.strip_prefix("~/") {
        Some(rest) if !rest.is_empty() => format!("~/{}", shell::quote(rest)),
        _ if workdir == "~" || workdir == "~/" => "~".to_string(),
        _ => shell::quote(workdir),
    }
}

impl<'a> HostTree<'a> {
    /// Creates the workdir if needed and takes its lock, waiting (up to 10 minutes) while another
    /// sync holds it; `waiting` is called once if it has to. The lock is a `flock` held by a
    /// command that lives until its stdin closes, so a laptop that vanishes releases it too.
    /// `known` is a local copy of the manifest the host is thought to hold, with its digest
    /// ([`Manifest::digest_of`]): when the host's has the same, it is not sent back.
    pub async fn lock(
        session: &'a Session,
        workdir: &str,
        known: Option<(String, Arc<Manifest>)>,
        waiting: impl FnOnce(),
    ) -> Result<(HostTree<'a>, HostState), SyncError> {
        let host = session.target().name.clone();
        // Once locked, the same command reports the host's state (saved manifest, then a stat
        // listing of the tree, each behind its length), saving a round trip per sync.
        let script = format!(
            "{{ [ -d {dir}/{STATE_DIR} ] || mkdir -p -- {dir}/{STATE_DIR}; }} && cd -- {dir} && {{ flock -n 9 || {{ echo busy; flock -w 600 9; }} || exit 75\n\
             printf 'locked '; pwd -P\n\
             {state}\
             exec cat >/dev/null; }} 9>{STATE_DIR}/sync.lock",
            dir = shell_path(workdir),
            state = state_script(known.as_ref().map(|(sha256, _)| sha256.as_str()))
        );
        let mut lock = session.start(&shell::sh(&script)).await?;
        let mut waiting = Some(waiting);
        loop {
            match lock.next_line().await {
                Some(line) if line == "busy" => {
                    if let Some(f) = waiting.take() {
                        f();
                    }
                }
                Some(line) => {
                    if let Some(root) = line.strip_prefix("locked ") {
                        let root = root.to_string();
                        let saved = match lock.next_line().await {
                            Some(line) if line == "same" => Some(None),
                            Some(line) => match line.trim().parse() {
                                Ok(length) => lock.next_bytes(length).await.map(Some),
                                Err(_) => None,
                            },
                            None => None,
                        };
                        let listing = read_sized(&mut lock).await;
                        let (Some(saved), Some(listing)) = (saved, listing) else {
                            let message =
                                format!("listing workdir {workdir} failed: {}", lock.stderr());
                            return Err(SyncError::Host { host, message });
                        };
                        let known = known.map(|(_, manifest)| manifest);
                        let state = parse_state(&host, saved, known, listing).await?;
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
                None => {
                    let why = lock.stderr();
                    let message = if why.is_empty() {
                        format!(
                            "cannot lock workdir {workdir}: another sync held it for 10 minutes"
                        )
                    } else {
                        format!("cannot prepare workdir {workdir}: {why}")
                    };
                    return Err(SyncError::Host { host, message });
                }
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

    /// Runs `command` in the workdir with `input` on stdin; returns stdout, or an error with stderr.
    async fn run(&self, what: &str, command: &str, input: &[u8]) -> Result<Vec<u8>, SyncError> {
        let (status, stdout, stderr) = self
            .session
            .capture_with_input(
                &format!("cd -- {} && {command}", shell::quote(&self.root)),
                input,
            )
            .await?;
        if status != ExitStatus::Code(0) {
            let stderr = String::from_utf8_lossy(&stderr);
            return Err(self.error(format!("{what} failed ({status:?}): {}", stderr.trim())));
        }
        Ok(stdout)
    }

    /// SHA-256 of files on the host (paths relative to the workdir), read back from its disk.
    /// `openssl dgst` uses the CPU's SHA instructions (3x `sha256sum` where they exist); hosts
    /// without openssl use coreutils. A file that cannot be read is missing from the result.
    pub async fn hash(&self, paths: &[String]) -> Result<HashMap<String, String>, SyncError> {
        if paths.is_empty() {
            return Ok(HashMap::new());
        }
        // "./" keeps a name that starts with '-' from reading as an option.
        let dotted: Vec<String> = paths.iter().map(|p| format!("./{p}")).collect();
        let command = "if command -v openssl >/dev/null 2>&1; then xargs -0 -r openssl dgst -sha256 -r; \
                       else xargs -0 -r sha256sum -z --; fi";
        let (status, out, _) = self
            .session
            .capture_with_input(
                &shell::sh(&format!("cd -- {} && {command}", shell::quote(&self.root))),
                &nul_list(&dotted),
            )
            .await?;
        let _ = status; // A missing file makes the tools fail; the files that were hashed still count.
        Ok(parse_hashes(&out, paths))
    }

    /// `rm -rf` of many paths.
    pub async fn remove(&self, paths: &[String]) -> Result<(), SyncError> {
        if paths.is_empty() {
            return Ok(());
        }
        self.run("removing files", "xargs -0 -r rm -rf --", &nul_list(paths))
            .await
            .map(drop)
    }

    /// `mkdir -p` of many folders.
    pub async fn mkdirs(&self, paths: &[String]) -> Result<(), SyncError> {
        if paths.is_empty() {
            return Ok(());
        }
        self.run(
            "creating folders",
            "xargs -0 -r mkdir -p --",
            &nul_list(paths),
        )
        .await
        .map(drop)
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
        let command = "xargs -0 -r -n 2 sh -c 'ln -sfn -- \"$0\" \"$1\"'";
        self.run("creating symlinks", command, &nul_list(&pairs))
            .await
            .map(drop)
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

    #[test]
    fn home_relative_workdirs_expand_remotely() {
        assert_eq!(shell_path("~/fleet/my project"), "~/'fleet/my project'");
        assert_eq!(shell_path("~"), "~");
        assert_eq!(shell_path("/srv/$x"), "'/srv/$x'");
    }
}
