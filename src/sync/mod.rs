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
/// of a sync (and of `fleet check`'s file comparison). `keep` bytes of small files are kept for
/// the upload ([`KEPT_BYTES`] for a sync, 0 for a check, which sends nothing).
pub fn scan_project(
    source: &std::path::Path,
    filter: &Filter,
    keep: u64,
) -> Result<Scan, ManifestError> {
    let mut cache = HashCache::open(source);
    let result = scan_keeping(source, filter, &mut cache, keep);
    if let Ok(scan) = &result {
        cache.save(&scan.manifest);
    }
    result
}

/// Drops from a host's listing what the filter excludes (never touched, never reported) and
/// returns the temporary files an interrupted sync left behind (to be removed). Paths of the
/// `local` manifest passed the same filter already; only the others are matched against it.
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
        let name = path.rsplit('/').next().unwrap_or(path);
        if name.starts_with(remote::TMP_PREFIX) {
            stale.push(path.clone());
            return false;
        }
        !filter.excludes(path, *entry == RemoteEntry::Dir)
    });
    (listing, stale)
}
