//! The c10d shim is compiled against declaration-only gloo headers (csrc/gloo_declarations):
//! it links only if every gloo name it references is one libtorch_cpu.so exports. This test
//! reads both symbol tables with `nm`, so a change to the shim that starts using more of gloo
//! fails here, with the symbol named, instead of at link or load time on a user's machine.

use std::collections::HashSet;
use std::process::Command;

fn symbols(args: &[&str], file: &str) -> Vec<String> {
    let output = Command::new("nm")
        .args(args)
        .arg(file)
        .output()
        .expect("nm (binutils) runs");
    assert!(
        output.status.success(),
        "nm {file}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_string))
        .collect()
}

#[test]
fn the_shim_references_only_gloo_symbols_that_libtorch_exports() {
    let archive = env!("FLEET_SHIM_ARCHIVE");
    let library = format!("{}/libtorch_cpu.so", env!("FLEET_TORCH_LIB"));
    let referenced: Vec<String> = symbols(&["--undefined-only", "--format=posix"], archive)
        .into_iter()
        .filter(|name| name.to_lowercase().contains("gloo"))
        .collect();
    assert!(
        !referenced.is_empty(),
        "the shim references no gloo symbol at all: is it the right archive?"
    );
    let exported: HashSet<String> =
        symbols(&["--dynamic", "--defined-only", "--format=posix"], &library)
            .into_iter()
            .collect();
    let missing: Vec<&String> = referenced
        .iter()
        .filter(|name| !exported.contains(*name))
        .collect();
    assert!(missing.is_empty(), "{library} does not export {missing:?}");
    eprintln!("gloo symbols the shim references, all exported: {referenced:#?}");
}

#[test]
fn the_controller_needs_no_libtorch_even_in_a_build_with_the_trainer() {
    let output = Command::new("readelf")
        .arg("--dynamic")
        .arg(fleet_testkit::fleet_binary())
        .output()
        .expect("readelf runs");
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    let needed: Vec<&str> = text.lines().filter(|l| l.contains("(NEEDED)")).collect();
    assert!(!needed.is_empty(), "{text}");
    assert!(
        needed
            .iter()
            .all(|l| !l.contains("torch") && !l.contains("c10")),
        "fleet loads libtorch: {needed:#?}"
    );
}
