//! `fleet sync` when things go wrong: a full disk, a concurrent sync, a file being written.
//! Nothing may be lost: the previous version of every file stays intact and no temporary
//! file is left behind.

use fleet_testkit as common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::Project;

/// Steps these tests take with a project.
trait FaultSteps {
    fn sync(&self) -> common::Run;
    fn leftovers(&self, host: &str) -> String;
}

impl FaultSteps for Project {
    fn sync(&self) -> common::Run {
        self.fleet(&["sync"]).run()
    }

    /// Temporary files left anywhere in a host's workdir.
    fn leftovers(&self, host: &str) -> String {
        self.tb.ssh(
            host,
            &format!("find '{}' -name '.fleet-tmp.*'", self.workdir(host)),
        )
    }
}

/// Unmounts the small file system given to a host, however the test ends.
struct Unmount<'a>(&'a Project, &'static str);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        let _ = self.0.tb.ssh(
            self.1,
            &format!("umount '{}' || true", self.0.workdir(self.1)),
        );
    }
}

#[test]
fn a_full_disk_names_host_and_file_and_keeps_the_previous_version() {
    let p = Project::new("disk-full");
    // host1's workdir is a 2 MB file system, mounted in host1's own mount namespace only.
    p.tb.ssh(
        "host1",
        &format!(
            "mkdir -p '{0}' && mount -t tmpfs -o size=2m fleet-test '{0}'",
            p.workdir("host1")
        ),
    );
    let _unmount = Unmount(&p, "host1");
    p.write("model.bin", vec![1u8; 100_000]);
    p.write("notes.txt", "v1\n");
    p.sync().assert_code(0);
    let before = p.tb.ssh(
        "host1",
        &format!(
            "cd '{}' && sha256sum model.bin notes.txt",
            p.workdir("host1")
        ),
    );

    p.write("model.bin", vec![2u8; 5_000_000]);
    p.write("notes.txt", "v2\n");
    // A new folder lands whole or not at all, as files do.
    p.write("new/deeper/part.txt", "new\n");
    let run = p.sync();
    run.assert_code(1);
    run.assert_stderr_contains("host1: model.bin: writing failed");
    run.assert_stderr_contains("disk full");
    assert!(
        !run.stderr.contains("host2:") && !run.stderr.contains("host3:"),
        "{}",
        run.stderr
    );
    // Nothing on host1 changed, not even the file that fitted: a sync lands whole or not at all.
    assert_eq!(
        p.tb.ssh(
            "host1",
            &format!(
                "cd '{}' && sha256sum model.bin notes.txt",
                p.workdir("host1")
            )
        ),
        before
    );
    assert_eq!(p.leftovers("host1"), "");
    assert_eq!(
        p.tb.ssh("host1", &format!("ls -A '{}'", p.workdir("host1"))),
        ".fleet\nmodel.bin\nnotes.txt\n"
    );
    assert_eq!(
        p.tb.ssh("host2", &format!("cat '{}/notes.txt'", p.workdir("host2"))),
        "v2\n"
    );
    assert_eq!(
        p.tb.ssh(
            "host2",
            &format!("cat '{}/new/deeper/part.txt'", p.workdir("host2"))
        ),
        "new\n"
    );
}

#[test]
fn a_second_sync_waits_for_the_first_and_never_interleaves() {
    let p = Project::new("lock");
    p.write("a.txt", "a\n");
    // Hold host2's workdir lock from outside fleet, as a sync in progress would.
    let mut holder = Command::new("ssh")
        .arg("-F")
        .arg(p.tb.dir.join("ssh_config"))
        .arg("host2")
        .arg(format!("mkdir -p '{0}/.fleet' && cd '{0}' && flock .fleet/sync.lock sh -c 'echo held; exec cat >/dev/null'", p.workdir("host2")))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut held = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut held)
        .unwrap();
    assert_eq!(held, "held\n");

    let mut sync = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .arg("-i")
        .arg(&p.inventory)
        .arg("sync")
        .env("HOME", p.config.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(sync.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut line = String::new();
    while !line.contains("waiting for another sync") {
        assert!(Instant::now() < deadline, "fleet never said it was waiting");
        line.clear();
        assert_ne!(
            stderr.read_line(&mut line).unwrap(),
            0,
            "fleet ended without waiting"
        );
    }
    assert!(
        line.starts_with("host2: waiting for another sync of"),
        "{line}"
    );
    // While the lock is held, nothing may land on host2.
    assert!(
        !std::path::Path::new(&p.workdir("host2"))
            .join("a.txt")
            .exists()
    );

    holder.stdin.take().unwrap().write_all(b"").unwrap();
    holder.wait().unwrap();
    assert!(sync.wait().unwrap().success());
    assert_eq!(
        std::fs::read_to_string(format!("{}/a.txt", p.workdir("host2"))).unwrap(),
        "a\n"
    );
}

/// The file is still while the project is scanned, and written to once its upload has begun (a
/// temporary file of fleet's exists on a host): the upload notices, and nothing lands.
#[test]
fn a_file_written_while_it_is_sent_is_named_and_never_lands() {
    let p = Project::new("written-while-sent");
    p.write("steady.txt", "steady\n");
    // Large enough that its upload takes a while on loopback.
    p.write("big.bin", vec![7u8; 256 << 20]);
    let workdir = std::path::PathBuf::from(p.workdir("host1"));
    let path = p.source.path().join("big.bin");
    let watcher = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let sending = std::fs::read_dir(&workdir)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".fleet-tmp."));
            if sending {
                let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                // Near the end: the upload reads from the start, so it has not got there yet.
                file.write_all_at(b"changed", 250 << 20).unwrap();
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let run = p.sync();
    assert!(watcher.join().unwrap(), "no upload was seen on host1");
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    run.assert_stderr_contains(
        "big.bin: changed while it was being sent; sync again once it is written",
    );
    for h in ["host1", "host2", "host3"] {
        assert_eq!(p.leftovers(h), "", "{h}");
        assert!(
            !std::path::Path::new(&p.workdir(h)).join("big.bin").exists(),
            "{h}: a file that changed while it was sent landed"
        );
    }
}

#[test]
fn a_file_written_during_the_sync_is_named_and_not_half_sent() {
    let p = Project::new("growing");
    p.write("steady.txt", "steady\n");
    p.write("growing.log", "start\n");
    // Rewrites a counter in place without end: the size stays, the content never repeats.
    p.write("growing.log", vec![b'.'; 1 << 20]);
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, rounds) = (stop.clone(), rounds.clone());
        let path = p.source.path().join("growing.log");
        std::thread::spawn(move || {
            let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                file.write_all_at(&n.to_le_bytes(), (n * 4096) % (1 << 20))
                    .unwrap();
                rounds.store(n, Ordering::Relaxed);
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while rounds.load(Ordering::Relaxed) < 1000 {
        assert!(Instant::now() < deadline, "the writer did not start");
        std::thread::yield_now();
    }
    let run = p.sync();
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert_ne!(run.code, Some(0), "{}", run.stderr);
    run.assert_stderr_contains("growing.log");
    run.assert_stderr_contains("chang");
    for h in ["host1", "host2", "host3"] {
        let workdir = p.workdir(h);
        if std::path::Path::new(&workdir).exists() {
            assert_eq!(p.leftovers(h), "", "{h}");
            assert!(
                !std::path::Path::new(&workdir).join("growing.log").exists(),
                "{h}: a half-written file landed"
            );
        }
    }
}

#[test]
fn an_unreadable_file_is_named_and_nothing_is_sent() {
    use std::os::unix::fs::PermissionsExt;
    let p = Project::new("unreadable");
    p.write("ok.txt", "fine\n");
    p.write("secret.bin", "no\n");
    // Root reads everything: run fleet as `nobody`, with copies of what it needs that it may read.
    let own = tempfile::tempdir().unwrap();
    let dir = own.path();
    let copy = |from: &std::path::Path, name: &str, mode: u32| {
        let to = dir.join(name);
        std::fs::copy(from, &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode)).unwrap();
        to
    };
    let fleet = copy(
        std::path::Path::new(env!("CARGO_BIN_EXE_fleet")),
        "fleet",
        0o755,
    );
    let key = copy(&p.tb.key(), "id_ed25519", 0o600);
    let inventory = copy(&p.inventory, "fleet.toml", 0o644);
    let text = std::fs::read_to_string(&inventory).unwrap().replace(
        &p.tb.key().display().to_string(),
        &key.display().to_string(),
    );
    std::fs::write(&inventory, text).unwrap();
    let home = dir.join("home");
    std::fs::create_dir(&home).unwrap();
    for path in [dir, key.as_path(), home.as_path()] {
        std::os::unix::fs::chown(path, Some(65534), Some(65534)).unwrap();
    }
    for path in [p.root(), &p.root().join("ok.txt")] {
        std::fs::set_permissions(
            path,
            std::fs::Permissions::from_mode(if path.is_dir() { 0o755 } else { 0o644 }),
        )
        .unwrap();
    }
    std::fs::set_permissions(
        p.root().join("secret.bin"),
        std::fs::Permissions::from_mode(0o000),
    )
    .unwrap();

    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&fleet)
        .arg("-i")
        .arg(&inventory)
        .arg("sync")
        .env("HOME", &home)
        .env_remove("SSH_AUTH_SOCK")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let named = format!(
        "cannot read {}: Permission denied",
        p.root().join("secret.bin").display()
    );
    assert!(stderr.contains(&named), "{named}\n{stderr}");
    for h in ["host1", "host2", "host3"] {
        assert!(
            !std::path::Path::new(&p.workdir(h)).join("ok.txt").exists(),
            "{h}: a sync with an unreadable file sent files"
        );
    }
}

#[test]
fn a_full_disk_during_a_run_stops_the_job_and_names_the_host() {
    let p = Project::new("disk-full-run");
    // host1's workdir holds 1 MB; every rank prints 3 MB, which lands in its log there.
    p.tb.ssh(
        "host1",
        &format!(
            "mkdir -p '{0}' && mount -t tmpfs -o size=1m fleet-test '{0}'",
            p.workdir("host1")
        ),
    );
    let _unmount = Unmount(&p, "host1");
    p.write("README", "job\n");
    let port = common::own_master_port();
    p.configure(|i| i.fleet("master_port", u32::from(port)));
    // fleet check would refuse a host with under 1 GB free: this is the disk filling up later.
    let run = p
        .fleet(&[
            "run",
            "--no-check",
            "--",
            "sh",
            "-c",
            "if [ \"$RANK\" = 0 ]; then head -c 3000000 /dev/zero | tr '\\0' x; echo; else exec sleep 6140; fi",
        ])
        .run();
    // Not even the exit status fits on that disk: the rank is seen gone (exit 255), and why.
    assert_eq!(run.code, Some(255), "{}", run.stderr);
    run.assert_stderr_contains("rank 0 on host1 vanished");
    let expected = format!("host1: the disk holding {} is full", p.workdir("host1"));
    run.assert_stderr_contains(&expected);
    // The other ranks, which would have slept on, were stopped.
    assert_eq!(p.remaining("sleep 6140"), Vec::<String>::new());
}
