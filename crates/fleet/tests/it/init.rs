//! `fleet init` against the test bed: an inventory that works, and host keys recorded only
//! when the user trusts them.

use fleet_testkit as common;

use common::{Fleet, Testbed};

fn hosts(tb: &Testbed) -> String {
    tb.hosts
        .iter()
        .map(|h| format!("{}:{}", h.addr, h.port))
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn init_writes_a_working_inventory_and_records_new_keys() {
    let tb = Testbed::get();
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let inventory = dir.path().join("inventory/fleet.toml");
    let key = tb.key().display().to_string();
    let init = Fleet::in_home(home.path())
        .arg("-i")
        .arg(&inventory)
        .args([
            "--accept-new-host-keys",
            "init",
            "--hosts",
            &hosts(&tb),
            "--user",
            "root",
            "--identity",
            &key,
        ])
        .run();
    init.assert_code(0);
    let lines: Vec<&str> = init.stdout.lines().collect();
    assert_eq!(lines.len(), 3);
    assert!(
        lines
            .iter()
            .all(|l| l.contains("host key recorded\tlogin as root ok")),
        "{}",
        init.stdout
    );
    let recorded = std::fs::read_to_string(home.path().join(".ssh/known_hosts")).unwrap();
    assert_eq!(recorded.lines().filter(|l| !l.is_empty()).count(), 3);

    // What it wrote is a real inventory (device set to cpu for the test bed's hosts).
    let text = std::fs::read_to_string(&inventory)
        .unwrap()
        .replace("device = \"cuda\"", "device = \"cpu\"");
    std::fs::write(&inventory, text).unwrap();
    let exec = Fleet::in_home(home.path())
        .arg("-i")
        .arg(&inventory)
        .args(["exec", "--", "hostname"])
        .run();
    exec.assert_code(0);
    assert_eq!(
        exec.sorted_stdout(),
        ["node1 | host1", "node2 | host2", "node3 | host3"]
    );

    // A second init does not overwrite the inventory without --force.
    let again = Fleet::in_home(home.path())
        .arg("-i")
        .arg(&inventory)
        .args(["init", "--hosts", &hosts(&tb)])
        .run();
    again.assert_code(2);
    again.assert_stderr_contains("exists already; pass --force");
}

#[test]
fn without_a_terminal_or_the_flag_no_key_is_recorded() {
    let tb = Testbed::get();
    let home = tempfile::tempdir().unwrap();
    let inventory = home.path().join("fleet.toml");
    let key = tb.key().display().to_string();
    let init = Fleet::in_home(home.path())
        .arg("-i")
        .arg(&inventory)
        .args(["--json", "init", "--hosts", &hosts(&tb), "--identity", &key])
        .run();
    init.assert_code(3);
    let records = init.records();
    assert_eq!(records.len(), 3, "{}", init.stdout);
    assert!(
        records.iter().all(|r| r["type"] == "host"
            && r["host_key"] == "unconfirmed"
            && r["login"] == "host key"),
        "{}",
        init.stdout
    );
    assert_eq!(
        init.stderr
            .matches("is not known. It offers ssh-ed25519 key SHA256:")
            .count(),
        3,
        "{}",
        init.stderr
    );
    assert!(!home.path().join(".ssh/known_hosts").exists());
    assert!(
        inventory.exists(),
        "the inventory is written even when keys are not yet trusted"
    );
}

#[test]
fn on_a_terminal_the_user_confirms_the_fingerprints() {
    let tb = Testbed::get();
    let home = tempfile::tempdir().unwrap();
    let inventory = home.path().join("fleet.toml");
    let command = format!(
        "{} -i {} init --hosts {} --user root --identity {}",
        env!("CARGO_BIN_EXE_fleet"),
        inventory.display(),
        hosts(&tb),
        tb.key().display()
    );
    let (code, text) = common::on_a_terminal(&command, home.path(), b"y\n");
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("Trust them and record them? [y/N]"), "{text}");
    assert_eq!(text.matches("host key recorded").count(), 3, "{text}");
    let recorded = std::fs::read_to_string(home.path().join(".ssh/known_hosts")).unwrap();
    assert_eq!(recorded.lines().filter(|l| !l.is_empty()).count(), 3);
}

/// `fleet init -i fleet.toml` beside the project's files syncs that folder (`source = "."`),
/// not the one above it, which in a home directory holds `.ssh/`. A source that holds keys is
/// refused by name until they are excluded, and a home directory as the source always is.
#[test]
fn init_beside_the_project_syncs_the_project_and_keys_are_never_sent() {
    let tb = Testbed::get();
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(home.path().join(".ssh")).unwrap();
    std::fs::write(home.path().join(".ssh/id_ed25519"), "PRIVATE KEY\n").unwrap();
    let project = home.path().join("thesis");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(project.join("train.py"), "print('hi')\n").unwrap();
    let key = tb.key().display().to_string();
    let init = Fleet::in_home(home.path())
        .current_dir(&project)
        .args([
            "-i",
            "fleet.toml",
            "--accept-new-host-keys",
            "init",
            "--hosts",
            &hosts(&tb),
            "--user",
            "root",
            "--identity",
            &key,
            "--activate",
            "true && . /dev/null",
        ])
        .run();
    init.assert_code(0);
    let text = std::fs::read_to_string(project.join("fleet.toml")).unwrap();
    assert!(text.contains("source = \".\" "), "{text}");
    assert!(
        text.contains("\nactivate = \"true && . /dev/null\"\n"),
        "{text}"
    );
    let workdir = format!("/tmp/fleet-tests/init-source-{}", std::process::id());
    let text = text.replace(
        "workdir = \"~/fleet/project\"",
        &format!("workdir = \"{workdir}\""),
    );
    std::fs::write(project.join("fleet.toml"), &text).unwrap();
    let dry = Fleet::in_home(home.path())
        .current_dir(&project)
        .args(["-i", "fleet.toml", "sync", "--dry-run"])
        .run();
    dry.assert_code(0);
    dry.assert_stdout_contains("node1\tsend\ttrain.py");
    dry.assert_stdout_contains("node1\tsend\tfleet.toml");
    assert!(!dry.stdout.contains(".ssh"), "{}", dry.stdout);

    // The folder above, the home directory, is refused as a source.
    std::fs::write(
        project.join("fleet.toml"),
        text.replace("source = \".\"", "source = \"..\""),
    )
    .unwrap();
    let wide = Fleet::in_home(home.path())
        .current_dir(&project)
        .args(["-i", "fleet.toml", "sync", "--dry-run"])
        .run();
    wide.assert_code(2);
    wide.assert_stderr_contains("is your home directory: fleet would send everything in it");

    // A project with keys in it is refused, naming them, until they are excluded.
    std::fs::create_dir_all(project.join(".ssh")).unwrap();
    std::fs::write(project.join(".ssh/id_rsa"), "PRIVATE KEY\n").unwrap();
    std::fs::write(project.join("id_ed25519"), "PRIVATE KEY\n").unwrap();
    std::fs::write(project.join("fleet.toml"), &text).unwrap();
    let keys = Fleet::in_home(home.path())
        .current_dir(&project)
        .args(["-i", "fleet.toml", "sync", "--dry-run"])
        .run();
    keys.assert_code(2);
    keys.assert_stderr_contains(
        "holds what looks like secrets: .ssh/, id_ed25519; add them to [sync] exclude",
    );
    let excluded = text.replace("exclude = [", "exclude = [\".ssh/\", \"id_ed25519\", ");
    std::fs::write(project.join("fleet.toml"), excluded).unwrap();
    let dry = Fleet::in_home(home.path())
        .current_dir(&project)
        .args(["-i", "fleet.toml", "sync", "--dry-run"])
        .run();
    dry.assert_code(0);
    assert!(!dry.stdout.contains("id_"), "{}", dry.stdout);
}

#[test]
fn on_a_terminal_an_answer_of_no_records_nothing() {
    let tb = Testbed::get();
    let home = tempfile::tempdir().unwrap();
    let inventory = home.path().join("fleet.toml");
    let command = format!(
        "{} -i {} init --hosts {} --user root --identity {}",
        env!("CARGO_BIN_EXE_fleet"),
        inventory.display(),
        hosts(&tb),
        tb.key().display()
    );
    let (code, text) = common::on_a_terminal(&command, home.path(), b"n\n");
    assert!(text.contains("Trust them and record them? [y/N]"), "{text}");
    assert_eq!(code, Some(3), "{text}");
    assert_eq!(text.matches("host key recorded").count(), 0, "{text}");
    assert!(!home.path().join(".ssh/known_hosts").exists(), "{text}");
}
