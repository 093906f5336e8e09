//! `fleet sync` against the three OpenSSH hosts of the test bed: what lands is checked with
//! OpenSSH and `sha256sum` on each host, independently of fleet.

use fleet_testkit as common;

use std::collections::BTreeMap;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use common::{Project, path_value};

/// Steps these tests take with a project.
trait SyncSteps {
    fn sync_json(&self, args: &[&str]) -> (common::Run, BTreeMap<String, serde_json::Value>);
    fn sync_json_in(
        &self,
        home: Option<&Path>,
        args: &[&str],
    ) -> (common::Run, BTreeMap<String, serde_json::Value>);
    fn remote_hashes(&self, host: &str) -> BTreeMap<String, String>;
    fn remote_inodes(&self, host: &str) -> BTreeMap<String, String>;
    fn manifest_inode(&self, host: &str) -> String;
    fn local_hashes(&self) -> BTreeMap<String, String>;
}

impl SyncSteps for Project {
    /// `fleet --json sync ARGS` with one record per host, by host name.
    fn sync_json(&self, args: &[&str]) -> (common::Run, BTreeMap<String, serde_json::Value>) {
        self.sync_json_in(None, args)
    }

    /// `fleet --json sync` with `home` as HOME when given (so the runs share fleet's caches).
    fn sync_json_in(
        &self,
        home: Option<&Path>,
        args: &[&str],
    ) -> (common::Run, BTreeMap<String, serde_json::Value>) {
        let mut all = vec!["--json", "sync"];
        all.extend_from_slice(args);
        let fleet = match home {
            Some(home) => self.fleet_in(home, &all),
            None => self.fleet(&all),
        };
        let run = fleet.run();
        let records = run
            .records()
            .into_iter()
            .map(|r| (r["host"].as_str().unwrap().to_string(), r))
            .collect();
        (run, records)
    }

    /// `path -> sha256` of every file under the workdir on `host`, read by sha256sum there.
    fn remote_hashes(&self, host: &str) -> BTreeMap<String, String> {
        let out = self.tb.ssh(host, &format!("cd '{}' && find . -path ./.fleet -prune -o -type f -print0 | xargs -0 -r sha256sum -z", self.workdir(host)));
        sha256sums(&out)
    }

    /// `path -> inode` on `host`: a file rewritten gets a new inode (temporary file + rename).
    fn remote_inodes(&self, host: &str) -> BTreeMap<String, String> {
        let out = self.tb.ssh(
            host,
            &format!(
                "cd '{}' && find . -path ./.fleet -prune -o -type f -printf '%i %P\\0'",
                self.workdir(host)
            ),
        );
        out.split('\0')
            .filter(|r| !r.is_empty())
            .map(|r| {
                let (inode, path) = r.split_once(' ').unwrap();
                (path.to_string(), inode.to_string())
            })
            .collect()
    }

    /// The inode of the manifest fleet saved in `host`'s workdir.
    fn manifest_inode(&self, host: &str) -> String {
        self.tb.ssh(
            host,
            &format!("stat -c %i '{}/.fleet/manifest'", self.workdir(host)),
        )
    }

    fn local_hashes(&self) -> BTreeMap<String, String> {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg("find . -path ./target -prune -o -type f -print0 | xargs -0 -r sha256sum -z")
            .current_dir(self.root())
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .split('\0')
            .filter(|r| !r.is_empty())
            .map(|r| {
                (
                    r[66..].trim_start_matches("./").to_string(),
                    r[..64].to_string(),
                )
            })
            .collect()
    }
}

/// Deterministic, incompressible bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn a_tricky_tree_lands_identical_on_every_host_and_resyncs_nothing() {
    let p = Project::new("tricky-tree");
    p.write(
        "data/training_data_10000.csv",
        "text,label\n\"안녕, 세계\",1\n",
    );
    p.write(
        "data/한국어 폴더/학습 데이터.csv",
        "문장,레이블\n좋아요,1\n",
    );
    p.write(
        "names with spaces/it's \"quoted\" $(touch x) `id`.txt",
        "careful\n",
    );
    p.write("a/b/c/d/deep.txt", "deep\n");
    p.write("run.sh", "#!/bin/sh\necho run\n");
    std::fs::set_permissions(
        p.root().join("run.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::create_dir_all(p.root().join("empty/inner")).unwrap();
    symlink("data/training_data_10000.csv", p.root().join("latest.csv")).unwrap();
    p.write("target/skip.bin", "excluded");
    p.write("big/model.bin", noise(200 << 20, 7));
    // Both syncs share fleet's caches, as two runs on one laptop do.
    let home = tempfile::tempdir().unwrap();

    let (run, records) = p.sync_json_in(Some(home.path()), &[]);
    run.assert_code(0);
    let local = p.local_hashes();
    assert_eq!(local.len(), 6);
    for h in ["host1", "host2", "host3"] {
        assert_eq!(records[h]["files_sent"], 6, "{h}: {}", run.stdout);
        assert_eq!(p.remote_hashes(h), local, "{h}");
        let modes = p.tb.ssh(h, &format!("cd '{}' && stat -c '%a %F' run.sh empty/inner latest.csv && readlink latest.csv && ls target 2>&1 || true", p.workdir(h)));
        assert_eq!(
            modes,
            "755 regular file\n755 directory\n777 symbolic link\ndata/training_data_10000.csv\nls: cannot access 'target': No such file or directory\n",
            "{h}"
        );
    }
    assert!(
        !p.root().join("x").exists() && !Path::new(&p.workdir("host1")).join("x").exists(),
        "a name was executed"
    );

    let inodes: Vec<_> = ["host1", "host2", "host3"]
        .iter()
        .map(|h| (p.remote_inodes(h), p.manifest_inode(h)))
        .collect();
    let copies = manifest_copies(home.path());
    assert_eq!(copies.len(), 3, "one local copy per host's manifest");
    let (again, records) = p.sync_json_in(Some(home.path()), &[]);
    again.assert_code(0);
    for (i, h) in ["host1", "host2", "host3"].iter().enumerate() {
        assert_eq!(records[*h]["files_sent"], 0, "{}", again.stdout);
        assert_eq!(records[*h]["unchanged"], 6);
        assert_eq!(
            p.remote_inodes(h),
            inodes[i].0,
            "{h}: a second sync rewrote files"
        );
        assert_eq!(
            p.manifest_inode(h),
            inodes[i].1,
            "{h}: a second sync rewrote the saved manifest"
        );
    }
    // Each host confirmed fleet's copy of its manifest, so none was written again.
    assert_eq!(manifest_copies(home.path()), copies);
}

/// `file -> modification time` of fleet's local copies of the hosts' manifests under `home`.
fn manifest_copies(home: &Path) -> BTreeMap<String, std::time::SystemTime> {
    std::fs::read_dir(home.join(".cache/fleet/hosts"))
        .map(|dir| {
            dir.map(|entry| {
                let entry = entry.unwrap();
                let modified = entry.metadata().unwrap().modified().unwrap();
                (entry.file_name().to_string_lossy().into_owned(), modified)
            })
            .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_host_manifest_unlike_the_local_copy_is_read_from_the_host() {
    let p = Project::new("manifest-copy");
    for i in 0..5 {
        p.write(&format!("f{i}.txt"), format!("file {i}\n"));
    }
    let home = tempfile::tempdir().unwrap();
    p.fleet_in(home.path(), &["sync"]).run().assert_code(0);
    assert_eq!(manifest_copies(home.path()).len(), 3);
    // On host2: f3.txt edited with its size and mtime kept (a stat listing cannot see it), and
    // the saved manifest replaced. The local copy of host2's manifest still says all is well.
    let dir = p.workdir("host2");
    p.tb.ssh(
        "host2",
        &format!(
            "cd '{dir}' && t=$(stat -c %Y f3.txt) && printf 'FILE 3\n' > f3.txt && touch -d @$t f3.txt \
             && printf 'fleet-manifest 1\\0' > .fleet/manifest"
        ),
    );
    let (run, records) = p.sync_json_in(Some(home.path()), &[]);
    run.assert_code(0);
    // Without a manifest it can trust, host2 gets every file again; trusting the local copy
    // instead would have sent nothing and left f3.txt edited.
    assert_eq!(records["host2"]["files_sent"], 5, "{}", run.stdout);
    assert_eq!(records["host1"]["files_sent"], 0, "{}", run.stdout);
    assert_eq!(p.remote_hashes("host2"), p.local_hashes());
}

#[test]
fn only_the_changed_file_is_sent_and_host_edits_are_restored() {
    let p = Project::new("changes");
    for i in 0..20 {
        p.write(&format!("f{i:02}.txt"), format!("file {i}\n"));
    }
    p.fleet(&["sync"]).run().assert_code(0);
    let before: Vec<_> = ["host1", "host2", "host3"]
        .iter()
        .map(|h| p.remote_inodes(h))
        .collect();

    p.write("f07.txt", "changed locally\n");
    p.tb.ssh(
        "host2",
        &format!("echo edited on host2 > '{}/f13.txt'", p.workdir("host2")),
    );
    // What an interrupted sync left on host3 (a new folder under its temporary name) is removed.
    p.tb.ssh(
        "host3",
        &format!(
            "mkdir -p '{0}/.fleet-tmp.0.d0/sub' && echo x > '{0}/.fleet-tmp.0.d0/sub/f'",
            p.workdir("host3")
        ),
    );
    let (run, records) = p.sync_json(&[]);
    run.assert_code(0);
    assert_eq!(
        p.tb.ssh(
            "host3",
            &format!("find '{}' -name '.fleet-tmp*'", p.workdir("host3"))
        ),
        ""
    );
    let local = p.local_hashes();
    for (i, h) in ["host1", "host2", "host3"].iter().enumerate() {
        let expected_sent = if *h == "host2" { 2 } else { 1 };
        assert_eq!(
            records[*h]["files_sent"], expected_sent,
            "{h}: {}",
            run.stdout
        );
        assert_eq!(p.remote_hashes(h), local, "{h}");
        let after = p.remote_inodes(h);
        let rewritten: Vec<&String> = after
            .keys()
            .filter(|k| after[*k] != before[i][*k])
            .collect();
        let expected: Vec<&str> = if *h == "host2" {
            vec!["f07.txt", "f13.txt"]
        } else {
            vec!["f07.txt"]
        };
        assert_eq!(rewritten, expected, "{h}");
    }
}

#[test]
fn dry_run_changes_nothing_and_verify_finds_differences() {
    let p = Project::new("dry-verify");
    p.write("keep.txt", "keep\n");
    p.write("data.csv", "a,b\n");
    p.fleet(&["sync"]).run().assert_code(0);
    p.tb.ssh(
        "host3",
        &format!(
            "cd '{}' && echo tampered > data.csv && echo stray > stray.txt",
            p.workdir("host3")
        ),
    );
    p.write("new.txt", "new\n");

    let dry = p.fleet(&["sync", "--dry-run"]).run();
    dry.assert_code(0);
    dry.assert_stdout_contains("host1\tsend\tnew.txt\tnew 4 B");
    dry.assert_stdout_contains("host3\tsend\tdata.csv\tdrift");
    dry.assert_stdout_contains("host3\textraneous\tstray.txt");
    assert!(
        !Path::new(&p.workdir("host1")).join("new.txt").exists(),
        "dry run wrote a file"
    );

    let verify = p.fleet(&["sync", "--verify"]).run();
    verify.assert_code(1);
    let mut lines: Vec<&str> = verify.stdout.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            "host1\tmissing\tnew.txt",
            "host2\tmissing\tnew.txt",
            "host3\tdiffers\tdata.csv",
            "host3\textra\tstray.txt",
            "host3\tmissing\tnew.txt"
        ]
    );

    let run = p.fleet(&["sync"]).run();
    run.assert_code(0);
    run.assert_stderr_contains("host3: 1 path(s) on the host are not in the project (kept; --delete removes those an earlier sync put there): stray.txt");
    // stray.txt was never fleet's: --delete keeps it, and removes what a sync put there.
    std::fs::remove_file(p.root().join("keep.txt")).unwrap();
    let delete = p.fleet(&["sync", "--delete"]).run();
    delete.assert_code(0);
    for host in ["host1", "host2", "host3"] {
        delete.assert_stderr_contains(&format!(
            "{host}: --delete removes 1 path(s) an earlier sync put there: keep.txt"
        ));
        assert!(!Path::new(&p.workdir(host)).join("keep.txt").exists());
    }
    delete.assert_stderr_contains("host3: 1 path(s) on the host are not in the project and no sync put them there (kept): stray.txt");
    assert!(Path::new(&p.workdir("host3")).join("stray.txt").exists());
    let verify = p.fleet(&["sync", "--verify"]).run();
    verify.assert_code(1);
    assert_eq!(verify.stdout, "host3\textra\tstray.txt\n");
}

/// `workdir = "~"` with `--delete` once emptied the home directory. Such workdirs are refused
/// when the inventory is read, and a workdir that only resolves to a home directory on the
/// host (a link to it) is refused there, before anything is changed.
#[test]
fn a_home_directory_is_never_a_workdir() {
    let p = Project::new("home-workdir");
    p.write("a.txt", "a\n");
    p.tb.ssh(
        "host1",
        "mkdir -p ~/precious && echo mine > ~/precious/thesis.txt",
    );
    p.configure(|i| i.fleet("workdir", "~"));
    let text = std::fs::read_to_string(&p.inventory).unwrap();
    let line = 1 + text.lines().position(|l| l == "workdir = \"~\"").unwrap();
    let run = p.fleet(&["sync", "--delete", "--yes"]).run();
    run.assert_code(2);
    run.assert_stderr_contains(&format!(
        "fleet.toml:{line}:11: workdir \"~\" is the home directory"
    ));
    // A link to the home directory, given as the workdir of host1.
    let link = format!("/tmp/fleet-tests/home-workdir-link-{}", std::process::id());
    p.tb.ssh("host1", &format!("ln -sfn /root {link}"));
    p.configure(|i| {
        i.remove("fleet", "workdir")
            .host("host1", "workdir", link.as_str())
    });
    let run = p.fleet(&["sync", "--delete", "--yes"]).run();
    run.assert_code(1);
    run.assert_stderr_contains(&format!(
        "host1: workdir {link} is /root: the root folder, the home directory or a folder above it"
    ));
    assert_eq!(p.tb.ssh("host1", "cat ~/precious/thesis.txt"), "mine\n");
    p.tb.ssh("host1", &format!("rm -f {link}; rm -rf ~/precious"));
}

/// A workdir that holds files but was never fleet's is refused, so a typo cannot turn
/// someone's folder into a sync target; `--adopt` takes it over and keeps what was there.
#[test]
fn a_folder_that_was_never_fleets_is_adopted_only_when_asked() {
    let p = Project::new("adopt");
    p.write("a.txt", "a\n");
    let host1 = p.workdir("host1");
    std::fs::create_dir_all(&host1).unwrap();
    std::fs::write(Path::new(&host1).join("notes.txt"), "mine\n").unwrap();
    let run = p.fleet(&["sync"]).run();
    run.assert_code(1);
    run.assert_stderr_contains(&format!("host1: workdir {host1} holds files but was never synced by fleet (it has no .fleet folder): refused"));
    assert!(
        !Path::new(&host1).join("a.txt").exists(),
        "the refused host was changed"
    );
    assert!(
        Path::new(&p.workdir("host2")).join("a.txt").exists(),
        "an empty workdir is fine"
    );
    p.fleet(&["sync", "--adopt"]).run().assert_code(0);
    p.fleet(&["sync", "--delete", "--yes"]).run().assert_code(0);
    assert_eq!(
        std::fs::read_to_string(Path::new(&host1).join("notes.txt")).unwrap(),
        "mine\n"
    );
    assert!(Path::new(&host1).join("a.txt").exists());
}

/// What a running job writes into the workdir is not the project's: `--delete` is refused
/// while the job runs, and afterwards keeps what the job wrote (no sync put it there).
#[test]
fn a_running_jobs_checkpoint_is_never_deleted() {
    let p = Project::new("delete-running");
    p.write("train.sh", "mkdir -p checkpoints && echo weights > checkpoints/step-1.pt && echo saved && exec sleep 6130\n");
    p.fleet(&["sync"]).run().assert_code(0);
    let started = p
        .fleet(&[
            "run",
            "--detach",
            "--no-check",
            "--no-sync",
            "--",
            "sh",
            "train.sh",
        ])
        .run();
    started.assert_code(0);
    let job = started.stdout.trim().to_string();
    let checkpoint = |host: &str| Path::new(&p.workdir(host)).join("checkpoints/step-1.pt");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !["host1", "host2", "host3"]
        .iter()
        .all(|h| checkpoint(h).exists())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint was written"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let run = p.fleet(&["sync", "--delete", "--yes"]).run();
    run.assert_code(1);
    run.assert_stderr_contains(&format!("host1: job {job} is still running in {} and --delete could remove what it writes: nothing was changed", p.workdir("host1")));
    p.fleet(&["stop", "--grace", "1", &job])
        .run()
        .assert_code(0);
    let run = p.fleet(&["sync", "--delete", "--yes"]).run();
    run.assert_code(0);
    for host in ["host1", "host2", "host3"] {
        assert_eq!(
            std::fs::read_to_string(checkpoint(host)).unwrap(),
            "weights\n",
            "{host}"
        );
    }
    run.assert_stderr_contains("no sync put them there (kept): checkpoints");
}

/// A name holding a newline (or a backslash) is hashed on the host by a tool that writes it as
/// it is: such files sync, are verified and compare equal.
#[test]
fn names_with_newlines_and_backslashes_sync_and_verify() {
    let p = Project::new("newline-names");
    p.write("line\nbreak.txt", "one\n");
    p.write("back\\slash.txt", "two\n");
    p.write("plain.txt", "three\n");
    let run = p.fleet(&["sync"]).run();
    run.assert_code(0);
    for host in ["host1", "host2", "host3"] {
        let dir = Path::new(&p.workdir(host)).to_path_buf();
        assert_eq!(
            std::fs::read_to_string(dir.join("line\nbreak.txt")).unwrap(),
            "one\n"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("back\\slash.txt")).unwrap(),
            "two\n"
        );
    }
    let verify = p.fleet(&["sync", "--verify"]).run();
    verify.assert_code(0);
    assert_eq!(verify.stdout, "", "{}", verify.stderr);
    p.fleet(&["sync"]).run().assert_code(0);
}

#[test]
fn a_missing_source_or_a_link_out_of_the_tree_is_refused_by_name() {
    let p = Project::new("bad-source");
    symlink("/etc/passwd", p.root().join("passwd")).unwrap();
    let run = p.fleet(&["sync"]).run();
    run.assert_code(2);
    run.assert_stderr_contains(
        "passwd: symlink to \"/etc/passwd\" points outside the synced folder",
    );

    let gone = p.root().join("gone");
    p.configure(|i| i.section("sync", "source", path_value(&gone)));
    let run = p.fleet(&["sync"]).run();
    run.assert_code(2);
    run.assert_stderr_contains(&format!(
        "sync source {} does not exist or is not a folder",
        gone.display()
    ));
}

/// On a terminal `--delete` lists what it would remove and asks; "n" removes nothing. A name
/// from the host with an escape sequence in it is shown, not obeyed.
#[test]
fn on_a_terminal_delete_asks_and_no_keeps_everything() {
    let p = Project::new("delete-asks");
    p.write("a.txt", "a\n");
    p.write("old\x1b]0;owned\x07.txt", "old\n");
    p.fleet(&["sync"]).run().assert_code(0);
    std::fs::remove_file(p.root().join("old\x1b]0;owned\x07.txt")).unwrap();
    let home = tempfile::tempdir().unwrap();
    let command = format!(
        "{} -i {} sync --delete",
        env!("CARGO_BIN_EXE_fleet"),
        p.inventory.display()
    );
    let (code, text) = common::on_a_terminal(&command, home.path(), b"n\nn\nn\n");
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(text.matches("[y/N]").count(), 3, "{text}");
    assert!(
        text.contains("--delete removes 1 path(s) an earlier sync put there: old^[]0;owned^G.txt"),
        "{text}"
    );
    // fleet's own colours are escape sequences too; the host's must not be among them.
    assert!(
        !text.contains("\x1b]0;owned"),
        "the host's escape sequence reached the terminal: {text:?}"
    );
    for host in ["host1", "host2", "host3"] {
        assert!(
            Path::new(&p.workdir(host))
                .join("old\x1b]0;owned\x07.txt")
                .exists(),
            "{host}"
        );
    }
}

/// Text a host sends (names of files it has that the project does not, the plans of --dry-run
/// and --verify, the values of a `[[check]]`) is shown on a terminal with its control
/// characters made visible, never obeyed.
#[test]
fn host_text_on_a_terminal_is_shown_not_obeyed() {
    let p = Project::new("host-text");
    p.write("a.txt", "a\n");
    p.fleet(&["sync"]).run().assert_code(0);
    let evil = "x\x1b]0;owned\x07.txt";
    let host1 = Path::new(&p.workdir("host1")).to_path_buf();
    std::fs::write(host1.join(evil), "theirs\n").unwrap();
    std::fs::write(host1.join("a.txt"), "edited on the host\n").unwrap();
    p.configure(|i| i.check("banner", "printf 'v1\\033]0;owned\\007'"));
    let home = tempfile::tempdir().unwrap();
    let fleet = |args: &str| {
        let command = format!(
            "{} -i {} {args}",
            env!("CARGO_BIN_EXE_fleet"),
            p.inventory.display()
        );
        common::on_a_terminal(&command, home.path(), b"")
    };
    for (args, shows) in [
        ("sync --dry-run", "x^[]0;owned^G.txt"),
        ("sync --verify", "x^[]0;owned^G.txt"),
        ("check", "v1^[]0;owned^G"),
    ] {
        let (_, text) = fleet(args);
        assert!(text.contains(shows), "{args}: {text}");
        assert!(
            !text.contains("\x1b]0;owned"),
            "{args}: the host's escape sequence reached the terminal: {text:?}"
        );
    }
}

/// The host's copy of a verified file reaches its disk before the file is renamed into place
/// (a crash then never leaves an empty file where a whole one was): traced with strace on
/// host1's sshd and everything it starts, syncfs(2) comes before the rename of the new file.
#[test]
fn files_reach_the_hosts_disk_before_they_are_renamed() {
    let p = Project::new("fsync-before-rename");
    p.write("landed.txt", "whole\n");
    let unshare = std::fs::read_to_string(p.tb.dir.join("host1/unshare.pid")).unwrap();
    let sshd = std::process::Command::new("pgrep")
        .args(["-P", unshare.trim(), "-x", "sshd"])
        .output()
        .unwrap();
    let sshd = String::from_utf8(sshd.stdout).unwrap().trim().to_string();
    assert!(!sshd.is_empty(), "host1's sshd was not found");
    let trace = tempfile::tempdir().unwrap();
    let log = trace.path().join("trace");
    let mut strace = std::process::Command::new("strace")
        // -y names each file descriptor's path: the syncfs of this workdir, not another test's.
        .args([
            "-f",
            "-qq",
            "-y",
            "-e",
            "trace=syncfs,rename,renameat,renameat2",
            "-o",
        ])
        .arg(&log)
        .args(["-p", &sshd])
        .spawn()
        .unwrap();
    let traced = || {
        std::fs::read_to_string(format!("/proc/{sshd}/status"))
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0"))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !traced() {
        assert!(
            std::time::Instant::now() < deadline,
            "strace did not attach"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let run = p.fleet(&["sync"]).run();
    // strace detaches on SIGINT and writes out what it saw.
    let _ = std::process::Command::new("kill")
        .args(["-INT", &strace.id().to_string()])
        .status();
    strace.wait().unwrap();
    run.assert_code(0);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let workdir = p.workdir("host1");
    let synced = lines
        .iter()
        .position(|l| l.contains("syncfs(") && l.contains(&workdir));
    let renamed = lines
        .iter()
        .position(|l| l.contains("rename") && l.contains("landed.txt\""));
    let (Some(synced), Some(renamed)) = (synced, renamed) else {
        panic!("no syncfs or no rename of landed.txt:\n{text}");
    };
    assert!(
        synced < renamed,
        "renamed before it reached the disk:\n{text}"
    );
}

/// `path -> sha256` of every file under `dir`, by the local sha256sum.
fn local_hashes(dir: &Path) -> BTreeMap<String, String> {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("find . -type f -print0 | xargs -0 -r sha256sum -z")
        .current_dir(dir)
        .output()
        .unwrap();
    sha256sums(&String::from_utf8(out.stdout).unwrap())
}

/// `path -> sha256` from what `sha256sum -z` printed for `./`-relative names.
fn sha256sums(out: &str) -> BTreeMap<String, String> {
    out.split('\0')
        .filter(|r| !r.is_empty())
        .map(|r| {
            (
                r[66..].trim_start_matches("./").to_string(),
                r[..64].to_string(),
            )
        })
        .collect()
}

/// `fleet pull` brings what a job wrote on rank 0's host into `runs/<job>/`, byte for byte as
/// sha256sum reads it on both ends, copies only what changed, and refuses paths outside the
/// workdir or not there, naming the host.
#[test]
fn pull_brings_home_what_the_job_wrote_verified_and_incremental() {
    let project = Project::new("pull");
    let port = common::own_master_port();
    project.configure(|i| i.fleet("master_port", u32::from(port)));
    project.write("train.sh", "echo training");
    let script = "mkdir -p model/sub && echo \"rank $RANK\" > model/rank \
                  && head -c 3000000 /dev/urandom > model/weights.bin \
                  && printf x > 'model/sub/odd name\nhere'";
    project
        .fleet(&["run", "--", "sh", "-c", script])
        .run()
        .assert_code(0);
    let job = std::fs::read_dir(project.root().join("runs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();

    let pull = project.fleet(&["pull"]).run();
    pull.assert_code(0);
    assert!(
        pull.stderr.contains("pulled model from host1 into ")
            && pull.stderr.contains(": 3 files copied ("),
        "{}",
        pull.stderr
    );
    let on_host: BTreeMap<String, String> = project
        .remote_hashes("host1")
        .into_iter()
        .filter(|(path, _)| path.starts_with("model/"))
        .collect();
    assert_eq!(on_host.len(), 3, "{on_host:?}");
    let arrived: BTreeMap<String, String> = local_hashes(&job)
        .into_iter()
        .filter(|(path, _)| path.starts_with("model/"))
        .collect();
    assert_eq!(arrived, on_host, "what arrived is not what host1 has");
    assert_eq!(
        std::fs::read_to_string(job.join("model/rank")).unwrap(),
        "rank 0\n"
    );

    // Again: nothing to copy. Then one file changes on the host: only it comes.
    let record = |run: &common::Run| -> serde_json::Value {
        run.assert_code(0);
        run.records().pop().unwrap()
    };
    let again = record(&project.fleet(&["--json", "pull"]).run());
    assert_eq!(
        (again["files"].as_u64(), again["copied"].as_u64()),
        (Some(3), Some(0))
    );
    project.tb.ssh(
        "host1",
        &format!("echo changed > {}/model/rank", project.workdir("host1")),
    );
    let changed = record(&project.fleet(&["--json", "pull"]).run());
    assert_eq!(changed["copied"], 1, "{changed}");
    assert_eq!(
        std::fs::read_to_string(job.join("model/rank")).unwrap(),
        "changed\n"
    );
    let leftovers: Vec<_> = walkdir::WalkDir::new(&job)
        .into_iter()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".fleet-tmp."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Another host, one file, another folder.
    let to = tempfile::tempdir().unwrap();
    let to_arg = to.path().display().to_string();
    project
        .fleet(&["pull", "model/rank", "--from", "host2", "--to", &to_arg])
        .run()
        .assert_code(0);
    assert_eq!(
        std::fs::read_to_string(to.path().join("model/rank")).unwrap(),
        "rank 1\n"
    );

    // Mistakes: named, and nothing written.
    let missing = project.fleet(&["pull", "model", "outputs"]).run();
    missing.assert_code(1);
    missing.assert_stderr_contains(&format!(
        "host1: not in {}: outputs (did the job write it there?)",
        project.workdir("host1")
    ));
    for (args, says) in [
        (
            &["pull", "../other"][..],
            "a path inside the host's workdir",
        ),
        (
            &["pull", "/etc/passwd"][..],
            "a path relative to the host's workdir",
        ),
        (
            &["pull", "--from", "host9"][..],
            "--from host9: no such host in the inventory (hosts: host1, host2, host3)",
        ),
    ] {
        let refused = project.fleet(args).run();
        refused.assert_code(2);
        assert!(
            refused.stderr.contains(says),
            "{args:?}: {}",
            refused.stderr
        );
    }
}
