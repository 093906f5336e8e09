//! `fleet sync`: the project folder identical on every host, proven by SHA-256.
//!
//! [`manifest`] reads the local tree (pure walk + hash cache), [`plan`] diffs it against what a
//! host has (pure), [`remote`] reads the host's side and [`transfer`] applies a plan over SFTP.

pub mod manifest;
pub mod plan;
pub mod remote;
pub mod transfer;

pub use manifest::{
    Entry, Filter, HashCache, KEPT_BYTES, Manifest, ManifestError, SavedCopy, Scan, scan,
    scan_keeping,
};
pub use plan::{Listing, Plan, Reason, RemoteEntry, Upload, plan};

/// Scans the project folder with its hash cache and saves the cache: the local, blocking part
/// of a sync (and of `fleet check`'s file comparison). A source that is `/` or a home
/// directory, or that holds credentials it does not exclude, is refused. `keep` bytes of small files are kept for
/// the upload ([`KEPT_BYTES`] for a sync, 0 for a check, which sends nothing).
pub fn scan_project(
    source: &std::path::Path,
    filter: &Filter,
    keep: u64,
) -> Result<Scan, ManifestError> {
    manifest::refuse_wide_source(source)?;
    let mut cache = HashCache::open(source);
    let result = scan_keeping(source, filter, &mut cache, keep);
    if let Ok(scan) = &result {
        cache.save(&scan.manifest);
        manifest::refuse_secrets(source, &scan.manifest)?;
    }
    result
}

/// Drops from a host's listing what the filter excludes (never touched, never reported) and
/// returns the temporary files and folders an interrupted sync left behind (to be removed).
/// Paths of the `local` manifest passed the same filter already; only the others are matched
/// against it.
pub fn split_listing(
    mut listing: Listing,
    filter: &Filter,
    local: &Manifest,
) -> (Listing, Vec<String>) {
    let mut stale = Vec::new();
    listing.retain(|path, entry| {
        if local.entries.contains_key(path) {
            return true;
        }
        // A temporary file or folder is removed whole; what is inside such a folder goes with it.
        let mut names = path.split('/');
        if names.any(|name| name.starts_with(remote::TMP_PREFIX)) {
            if names.next().is_none() {
                stale.push(path.clone());
            }
            return false;
        }
        !filter.excludes(path, *entry == RemoteEntry::Dir)
    });
    (listing, stale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_of_an_interrupted_sync_are_removed_whole() {
        let dir = tempfile::tempdir().unwrap();
        let filter = Filter::new(dir.path(), &[]).unwrap();
        let file = RemoteEntry::File {
            size: 1,
            mtime: 0,
            mode: 0o644,
        };
        let listing: Listing = [
            ("kept.txt", file.clone()),
            ("d", RemoteEntry::Dir),
            ("d/.fleet-tmp.1.0", file.clone()),
            (".fleet-tmp.1.d2", RemoteEntry::Dir),
            (".fleet-tmp.1.d2/sub", RemoteEntry::Dir),
            (".fleet-tmp.1.d2/sub/f", file.clone()),
        ]
        .into_iter()
        .map(|(path, entry)| (path.to_string(), entry))
        .collect();
        let (kept, stale) = split_listing(listing, &filter, &Manifest::default());
        assert_eq!(kept.keys().collect::<Vec<_>>(), ["d", "kept.txt"]);
        assert_eq!(stale, [".fleet-tmp.1.d2", "d/.fleet-tmp.1.0"]);
    }
}
