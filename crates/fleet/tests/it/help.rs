//! Every `--help` as the user reads it, snapshotted: a change to a flag or its text shows up in
//! review as a change to `tests/it/snapshots/it__help__*.snap`.

use std::process::Command;

const SUBCOMMANDS: [&str; 11] = [
    "check",
    "init",
    "exec",
    "run",
    "logs",
    "ps",
    "stop",
    "sync",
    "pull",
    "inventory",
    "net",
];

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args(args)
        .arg("--help")
        .env("COLUMNS", "100")
        .env("NO_COLOR", "1")
        .env_remove("FLEET_INVENTORY")
        .output()
        .unwrap();
    assert!(out.status.success(), "fleet {args:?} --help: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn fleet_help() {
    insta::assert_snapshot!("fleet", help(&[]));
}

#[test]
fn every_subcommands_help() {
    for subcommand in SUBCOMMANDS {
        insta::assert_snapshot!(subcommand, help(&[subcommand]));
    }
}
