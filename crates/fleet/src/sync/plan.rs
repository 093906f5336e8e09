//! What a sync must do on one host: the difference between the local manifest and the host,
//! as a pure function of the two (unit- and property-tested, no I/O).
//!
//! The host is described by two things: the manifest saved after its last verified sync (what
//! each file's content was) and a fresh stat listing of its tree (what is there now). A file is
//! unchanged only when the saved manifest has the same content hash *and* the listing still
//! shows the size and mtime that were saved with it; otherwise it was edited on the host (drift)
//! and is sent again.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::manifest::{Entry, Manifest};

/// One path of the host's tree, as listed now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemoteEntry {
    File {
        size: u64,
        mtime: i64,
        mode: u32,
    },
    Dir,
    Link {
        target: String,
    },
    /// A socket, device or anything else.
    Other,
}

/// The host's tree now, by relative path.
pub type Listing = BTreeMap<String, RemoteEntry>;

/// Why a file is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    /// Not on the host.
    New,
    /// Its content changed locally since the last sync.
    Changed,
    /// It was modified, replaced or never verified on the host.
    Drift,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Upload {
    pub path: String,
    pub size: u64,
    pub reason: Reason,
}

/// Everything one host needs, in the order it is applied.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Paths on the host that are in the way of an entry of another kind (a folder where a file
    /// goes): removed first, with `--delete` only.
    pub conflicts: Vec<String>,
    /// Parents before children.
    pub mkdirs: Vec<String>,
    pub uploads: Vec<Upload>,
    /// Files whose content is right but whose permission bits are not.
    pub chmods: Vec<(String, u32)>,
    pub links: Vec<(String, String)>,
    /// On the host but not local (and not excluded), put there by fleet (in the last verified
    /// manifest): removed with `--delete`, else reported. Children before parents.
    pub extraneous: Vec<String>,
    /// On the host but not local, and not fleet's (never in a manifest it saved, or a folder
    /// that holds such a path): always kept, whatever `--delete` says. Sorted.
    pub foreign: Vec<String>,
    /// Files already right.
    pub unchanged: usize,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.conflicts.is_empty()
            && self.mkdirs.is_empty()
            && self.uploads.is_empty()
            && self.chmods.is_empty()
            && self.links.is_empty()
    }

    pub fn upload_bytes(&self) -> u64 {
        self.uploads.iter().map(|u| u.size).sum()
    }
}

/// Plans the sync of `local` to a host whose last verified manifest is `last` and whose tree
/// is `listing` now.
pub fn plan(local: &Manifest, last: Option<&Manifest>, listing: &Listing) -> Plan {
    let mut plan = Plan::default();
    for (path, entry) in &local.entries {
        let there = listing.get(path);
        match entry {
            Entry::Dir => plan.dir(path, there),
            Entry::Link { target } => plan.link(path, target, there),
            Entry::File {
                size, mode, sha256, ..
            } => {
                let saved = last.and_then(|m| m.entries.get(path));
                match plan.file_reason(path, *mode, sha256, there, saved) {
                    Some(reason) => plan.uploads.push(Upload {
                        path: path.clone(),
                        size: *size,
                        reason,
                    }),
                    None => plan.unchanged += 1,
                }
            }
        }
    }
    plan.judge_the_rest(local, last, listing);
    plan
}

impl Plan {
    /// A folder of the project: made unless the host has one there.
    fn dir(&mut self, path: &str, there: Option<&RemoteEntry>) {
        match there {
            Some(RemoteEntry::Dir) => {}
            Some(_) => {
                self.conflicts.push(path.to_string());
                self.mkdirs.push(path.to_string());
            }
            None => self.mkdirs.push(path.to_string()),
        }
    }

    /// A symbolic link of the project: made unless the host has the same one there.
    fn link(&mut self, path: &str, target: &str, there: Option<&RemoteEntry>) {
        match there {
            Some(RemoteEntry::Link { target: t }) if t == target => {}
            Some(RemoteEntry::Dir) => {
                self.conflicts.push(path.to_string());
                self.links.push((path.to_string(), target.to_string()));
            }
            _ => self.links.push((path.to_string(), target.to_string())),
        }
    }

    /// Why a file of the project is sent (None: the host's copy is the same, at most its mode
    /// to set). A copy counts as the same only when the last verified manifest recorded this
    /// content at the size and time the host shows now.
    fn file_reason(
        &mut self,
        path: &str,
        mode: u32,
        sha256: &str,
        there: Option<&RemoteEntry>,
        saved: Option<&Entry>,
    ) -> Option<Reason> {
        match there {
            None => Some(Reason::New),
            Some(RemoteEntry::File {
                size: now_size,
                mtime: now_mtime,
                mode: now_mode,
            }) => match saved {
                Some(Entry::File {
                    size: saved_size,
                    mtime: saved_mtime,
                    sha256: saved_sha,
                    ..
                }) if saved_size == now_size && saved_mtime == now_mtime => {
                    if saved_sha != sha256 {
                        Some(Reason::Changed)
                    } else {
                        if *now_mode != mode {
                            self.chmods.push((path.to_string(), mode));
                        }
                        None
                    }
                }
                _ => Some(Reason::Drift),
            },
            Some(RemoteEntry::Dir) => {
                self.conflicts.push(path.to_string());
                Some(Reason::Drift)
            }
            Some(_) => Some(Reason::Drift),
        }
    }

    /// What the host holds beyond the project: extraneous if an earlier verified manifest
    /// recorded it (fleet's to remove), foreign otherwise. Reverse order puts children before
    /// their parents, so a folder is judged after all it holds: one that holds anything not
    /// fleet's is not fleet's to remove either.
    fn judge_the_rest(&mut self, local: &Manifest, last: Option<&Manifest>, listing: &Listing) {
        let mut foreign: BTreeSet<&String> = BTreeSet::new();
        for path in listing
            .keys()
            .rev()
            .filter(|p| !local.entries.contains_key(*p))
        {
            let recorded = last.is_some_and(|m| m.entries.contains_key(path));
            let prefix = format!("{path}/");
            let holds_foreign = foreign
                .range::<String, _>(&prefix..)
                .next()
                .is_some_and(|f| f.starts_with(&prefix));
            if recorded && !holds_foreign {
                self.extraneous.push(path.clone());
            } else {
                foreign.insert(path);
            }
        }
        self.foreign = foreign.into_iter().cloned().collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn file(content: &str, mode: u32) -> Entry {
        Entry::File {
            size: content.len() as u64,
            mtime: 1000,
            mode,
            sha256: format!("sha-of-{content}"),
        }
    }

    /// The listing a host has right after `manifest` was applied to it.
    fn listing_of(manifest: &Manifest) -> Listing {
        manifest
            .entries
            .iter()
            .map(|(p, e)| {
                let r = match e {
                    Entry::File {
                        size, mtime, mode, ..
                    } => RemoteEntry::File {
                        size: *size,
                        mtime: *mtime,
                        mode: *mode,
                    },
                    Entry::Dir => RemoteEntry::Dir,
                    Entry::Link { target } => RemoteEntry::Link {
                        target: target.clone(),
                    },
                };
                (p.clone(), r)
            })
            .collect()
    }

    /// Applies a plan to a simulated host (with `--delete`), returning its new manifest and listing.
    fn apply(
        plan: &Plan,
        local: &Manifest,
        last: Option<&Manifest>,
        listing: &Listing,
    ) -> (Manifest, Listing) {
        let mut listing = listing.clone();
        for p in &plan.conflicts {
            listing.retain(|k, _| k != p && !k.starts_with(&format!("{p}/")));
        }
        for p in plan.extraneous.iter() {
            listing.remove(p);
        }
        let mut saved = last.cloned().unwrap_or_default();
        for d in &plan.mkdirs {
            listing.insert(d.clone(), RemoteEntry::Dir);
        }
        for u in &plan.uploads {
            let e = local.entries[&u.path].clone();
            if let Entry::File {
                size, mtime, mode, ..
            } = &e
            {
                listing.insert(
                    u.path.clone(),
                    RemoteEntry::File {
                        size: *size,
                        mtime: *mtime,
                        mode: *mode,
                    },
                );
            }
            saved.entries.insert(u.path.clone(), e);
        }
        for (p, m) in &plan.chmods {
            if let Some(RemoteEntry::File { mode, .. }) = listing.get_mut(p) {
                *mode = *m;
            }
        }
        for (p, t) in &plan.links {
            listing.insert(p.clone(), RemoteEntry::Link { target: t.clone() });
        }
        saved.entries = local.entries.clone();
        (saved, listing)
    }

    fn manifest(entries: &[(&str, Entry)]) -> Manifest {
        Manifest {
            entries: entries
                .iter()
                .map(|(p, e)| (p.to_string(), e.clone()))
                .collect(),
        }
    }

    #[test]
    fn drift_on_the_host_is_sent_again() {
        let local = manifest(&[("a", file("1", 0o644)), ("b", file("2", 0o644))]);
        let mut listing = listing_of(&local);
        listing.insert(
            "a".into(),
            RemoteEntry::File {
                size: 1,
                mtime: 2000,
                mode: 0o644,
            },
        );
        let p = plan(&local, Some(&local), &listing);
        assert_eq!(
            p.uploads,
            [Upload {
                path: "a".into(),
                size: 1,
                reason: Reason::Drift
            }]
        );
        assert_eq!(p.unchanged, 1);
    }

    #[test]
    fn a_host_never_synced_gets_everything() {
        let local = manifest(&[("d", Entry::Dir), ("d/f", file("x", 0o644))]);
        let p = plan(&local, None, &Listing::new());
        assert_eq!(p.mkdirs, ["d"]);
        assert_eq!(p.uploads[0].reason, Reason::New);
    }

    #[test]
    fn same_content_without_a_saved_manifest_is_still_verified() {
        // No saved manifest means nothing on the host was ever verified: send it.
        let local = manifest(&[("a", file("1", 0o644))]);
        let p = plan(&local, None, &listing_of(&local));
        assert_eq!(p.uploads[0].reason, Reason::Drift);
    }

    #[test]
    fn mode_only_changes_are_a_chmod() {
        let before = manifest(&[("run.sh", file("x", 0o644))]);
        let after = manifest(&[("run.sh", file("x", 0o755))]);
        let p = plan(&after, Some(&before), &listing_of(&before));
        assert_eq!(p.chmods, [("run.sh".to_string(), 0o755)]);
        assert!(p.uploads.is_empty());
    }

    #[test]
    fn extraneous_children_come_before_parents() {
        let local = manifest(&[("keep", file("k", 0o644))]);
        let mut listing = listing_of(&local);
        listing.insert("old".into(), RemoteEntry::Dir);
        listing.insert(
            "old/x".into(),
            RemoteEntry::File {
                size: 0,
                mtime: 0,
                mode: 0o644,
            },
        );
        let mut before = local.clone();
        before.entries.insert("old".into(), Entry::Dir);
        before.entries.insert("old/x".into(), file("", 0o644));
        let p = plan(&local, Some(&before), &listing);
        assert_eq!(p.extraneous, ["old/x", "old"]);
        assert!(p.foreign.is_empty());
    }

    /// `--delete` removes only what fleet put there: a path no manifest of fleet's recorded
    /// (the user's own file, a checkpoint a job wrote) is kept, and so is the folder that
    /// holds it, even when fleet made that folder.
    #[test]
    fn what_fleet_did_not_put_there_is_never_extraneous() {
        let mut before = manifest(&[("keep", file("k", 0o644))]);
        before.entries.insert("checkpoints".into(), Entry::Dir);
        before
            .entries
            .insert("checkpoints/old.pt".into(), file("o", 0o644));
        before.entries.insert("gone.txt".into(), file("g", 0o644));
        let local = manifest(&[("keep", file("k", 0o644))]);
        let mut listing = listing_of(&before);
        let plain = RemoteEntry::File {
            size: 1,
            mtime: 0,
            mode: 0o644,
        };
        listing.insert("checkpoints/step-1.pt".into(), plain.clone());
        listing.insert("thesis.txt".into(), plain);
        let p = plan(&local, Some(&before), &listing);
        assert_eq!(p.extraneous, ["gone.txt", "checkpoints/old.pt"]);
        assert_eq!(
            p.foreign,
            ["checkpoints", "checkpoints/step-1.pt", "thesis.txt"]
        );
        // Without a saved manifest nothing there is fleet's.
        let p = plan(&local, None, &listing);
        assert!(p.extraneous.is_empty());
        assert_eq!(p.foreign.len(), 5);
    }

    fn arb_manifest() -> impl Strategy<Value = Manifest> {
        let entry = prop_oneof![
            (0u8..4, prop::bool::ANY)
                .prop_map(|(c, x)| file(&c.to_string(), if x { 0o755 } else { 0o644 })),
            Just(Entry::Dir),
            (0u8..3).prop_map(|t| Entry::Link {
                target: format!("t{t}")
            }),
        ];
        prop::collection::btree_map("[ab]{1,2}(/[ab]{1,2}){0,2}", entry, 0..12).prop_map(
            |mut entries| {
                // A path whose parent is not a folder cannot exist; make every parent a folder.
                let paths: Vec<String> = entries.keys().cloned().collect();
                for p in paths {
                    let mut parent = p.as_str();
                    while let Some((up, _)) = parent.rsplit_once('/') {
                        entries.insert(up.to_string(), Entry::Dir);
                        parent = up;
                    }
                }
                Manifest { entries }
            },
        )
    }

    proptest! {
        #[test]
        fn a_synced_tree_needs_nothing(local in arb_manifest()) {
            let p = plan(&local, Some(&local), &listing_of(&local));
            prop_assert!(p.is_empty());
            prop_assert!(p.extraneous.is_empty());
        }

        #[test]
        fn applying_the_plan_yields_the_local_tree_and_keeps_what_is_not_fleets(local in arb_manifest(), old in arb_manifest(), verified in prop::bool::ANY) {
            let last = verified.then_some(&old);
            let p = plan(&local, last, &listing_of(&old));
            let (saved, listing) = apply(&p, &local, last, &listing_of(&old));
            for (path, entry) in listing_of(&local) {
                prop_assert_eq!(listing.get(&path), Some(&entry));
            }
            if verified {
                // Everything on the host was fleet's: it is now exactly the local tree.
                prop_assert_eq!(&listing, &listing_of(&local));
            } else {
                // Nothing was: what is not in the way of the project stays.
                prop_assert!(p.extraneous.is_empty());
                let in_the_way = |f: &String| p.conflicts.iter().any(|c| f == c || f.starts_with(&format!("{c}/")));
                for f in p.foreign.iter().filter(|f| !in_the_way(f)) {
                    prop_assert!(listing.contains_key(f), "{} was removed", f);
                }
            }
            let again = plan(&local, Some(&saved), &listing);
            prop_assert!(again.is_empty(), "{:?}", again);
        }
    }
}
