//! fleet-train's `--help` (and its subcommands'), snapshotted.

use std::process::Command;

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fleet-train"))
        .args(args)
        .arg("--help")
        .env("COLUMNS", "100")
        .output()
        .unwrap();
    assert!(out.status.success(), "fleet-train {args:?} --help: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn every_help() {
    for (name, args) in [
        ("fleet-train", &[][..]),
        ("gen-data", &["gen-data"][..]),
        ("predict", &["predict"][..]),
    ] {
        insta::assert_snapshot!(name, help(args));
    }
}
