//! Every inventory mistake gets one clear message naming the file, line and column.
//! The messages are snapshots (tests/it/snapshots/): a change to any of them shows up in review.

use fleet_testkit as common;

use common::Fleet;

/// Runs `fleet inventory` on a fixture and returns what it printed on stderr.
fn error_for(fixture: &str) -> String {
    let run = Fleet::new()
        .args([
            "-i",
            &format!("tests/fixtures/inventory/{fixture}.toml"),
            "inventory",
        ])
        .run();
    run.assert_code(2);
    assert_eq!(run.stdout, "", "nothing may reach stdout on an error");
    run.stderr
}

macro_rules! snapshot_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                insta::assert_snapshot!(stringify!($name), error_for(stringify!($name)));
            }
        )*
    };
}

snapshot_tests!(
    syntax,
    unknown_field,
    unknown_section,
    missing_address,
    duplicate_name,
    duplicate_address,
    zero_ranks,
    port_range,
    master_port_range,
    no_hosts,
    empty,
    bad_device,
    wrong_type,
    bad_env_name,
    bad_host_name,
    binary,
);

#[test]
fn missing_file_says_how_to_make_one() {
    let run = Fleet::new()
        .args([
            "-i",
            "tests/fixtures/inventory/absent.toml",
            "exec",
            "--",
            "true",
        ])
        .run();
    run.assert_code(2);
    insta::assert_snapshot!("missing_file", run.stderr);
}

#[test]
fn the_environment_names_the_inventory() {
    let run = Fleet::new().args(["inventory"]).run_with_env(
        "FLEET_INVENTORY",
        "tests/fixtures/inventory/zero_ranks.toml",
    );
    run.assert_code(2);
    assert!(
        run.stderr
            .starts_with("error: tests/fixtures/inventory/zero_ranks.toml:7:9: ranks = 0"),
        "{}",
        run.stderr
    );
}

#[test]
fn the_example_is_the_seed_guides_three_pcs() {
    let run = Fleet::new()
        .args(["-i", "../../inventory/example.toml", "--json", "inventory"])
        .run();
    run.assert_code(0);
    let hosts = run.records();
    let addresses: Vec<&str> = hosts
        .iter()
        .map(|h| h["address"].as_str().unwrap())
        .collect();
    assert_eq!(
        addresses,
        ["192.168.1.100", "192.168.1.101", "192.168.1.102"]
    );
    assert!(
        hosts
            .iter()
            .all(|h| h["ranks"] == 1 && h["device"] == "cuda")
    );
    let first: Vec<u64> = hosts
        .iter()
        .map(|h| h["first_rank"].as_u64().unwrap())
        .collect();
    assert_eq!(first, [0, 1, 2]);
}

#[test]
fn huge_and_deeply_nested_inventories_get_an_error_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let deep = dir.path().join("deep.toml");
    std::fs::write(
        &deep,
        format!("a = {}{}", "[".repeat(100_000), "]".repeat(100_000)),
    )
    .unwrap();
    let run = Fleet::new().arg("-i").arg(&deep).arg("inventory").run();
    run.assert_code(2);
    assert!(
        run.stderr.contains("deep.toml:1:"),
        "{}",
        &run.stderr[..200.min(run.stderr.len())]
    );
    assert!(
        run.stderr.len() < 1000,
        "the error quotes the whole line: {} bytes",
        run.stderr.len()
    );

    let huge = dir.path().join("huge.toml");
    std::fs::write(&huge, format!("[fleet]\n{}", "# padding\n".repeat(200_000))).unwrap();
    let run = Fleet::new().arg("-i").arg(&huge).arg("inventory").run();
    run.assert_code(2);
    run.assert_stderr_contains("is 2000008 bytes; an inventory is at most 1048576 bytes");
}
