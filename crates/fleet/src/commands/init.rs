//! `fleet init --hosts A,B,C`: writes a commented inventory for the hosts, connects to each,
//! shows its host-key fingerprint, and records the keys the user confirms (or all new ones with
//! `--accept-new-host-keys`), then says whether logging in works.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use futures::future::join_all;

use super::Fleet;
use crate::cli::InitArgs;
use crate::exit_code::{ExitCode, UsageError};
use crate::inventory::Inventory;
use crate::output::Stream;
use crate::ssh::{ConnectOptions, HostKeyError, HostKeyPolicy, Session, SshError, Target};

pub async fn run(fleet: &Fleet, args: &InitArgs) -> Result<ExitCode> {
    let path = fleet.inventory_path();
    let source = write_inventory(fleet, args, path)?;
    let inventory = fleet.inventory()?;
    let targets = fleet.targets(&inventory)?;
    let mut options = fleet.connect_options(&inventory, &targets).await?;
    let mut results = join_all(targets.iter().map(|t| Session::connect(t, &options))).await;
    if fleet.printer.can_prompt() {
        confirm_new_keys(fleet, &targets, &mut options, &mut results).await;
    }
    let (code, gpus) = report_logins(fleet, path, &targets, &options, results).await;
    settle_device(fleet, args, path, &source, &gpus)?;
    if code == ExitCode::Success {
        fleet
            .printer
            .info(&format!("next: fleet -i {} check", path.display()));
    }
    Ok(code)
}

/// Writes the commented inventory for the hosts (validated first), unless one is there and
/// not --force; returns the project's source folder it names.
fn write_inventory(fleet: &Fleet, args: &InitArgs, path: &Path) -> Result<String> {
    if path.exists() && !args.force {
        return Err(UsageError(format!(
            "{} exists already; pass --force to replace it, or -i another path",
            path.display()
        ))
        .into());
    }
    let source = project_source(path)?;
    let text = inventory_text(args, &source, "cuda")?;
    // The text must read back: validate it before writing anything.
    Inventory::from_toml(path, &text).context("the generated inventory is not valid")?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(path, &text).with_context(|| format!("cannot write {}", path.display()))?;
    fleet.printer.info(&format!(
        "wrote {} for {} hosts",
        path.display(),
        args.hosts.len()
    ));
    Ok(source)
}

/// New host keys: shows their fingerprints and asks; if the user trusts them, connects to
/// those hosts again with the keys confirmed (recorded once logged in).
async fn confirm_new_keys(
    fleet: &Fleet,
    targets: &[Target],
    options: &mut ConnectOptions,
    results: &mut [Result<Session, SshError>],
) {
    let unknown: Vec<(usize, String, String)> = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match r {
            Err(SshError::HostKey(HostKeyError::Unknown {
                endpoint,
                fingerprint,
                ..
            })) => Some((i, endpoint.clone(), fingerprint.clone())),
            _ => None,
        })
        .collect();
    if unknown.is_empty() {
        return;
    }
    let mut question = String::from("These hosts are not in known_hosts yet:\n");
    for (i, endpoint, fingerprint) in &unknown {
        question.push_str(&format!(
            "  {:<12} {endpoint:<24} {fingerprint}\n",
            targets[*i].name
        ));
    }
    question.push_str("Compare with `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on each host.\nTrust them and record them? [y/N] ");
    fleet.printer.write(Stream::Stderr, &question);
    let answer = console::Term::stderr().read_line().unwrap_or_default();
    if !matches!(answer.trim(), "y" | "Y" | "yes") {
        return;
    }
    let confirmed: HashMap<String, String> = unknown
        .iter()
        .map(|(_, e, f)| (e.clone(), f.clone()))
        .collect();
    let known_hosts = options.host_keys.known_hosts().to_path_buf();
    options.host_keys = Arc::new(HostKeyPolicy::new(known_hosts, false).with_confirmed(confirmed));
    let again = join_all(
        unknown
            .iter()
            .map(|(i, _, _)| Session::connect(&targets[*i], options)),
    )
    .await;
    for ((i, _, _), result) in unknown.iter().zip(again) {
        results[*i] = result;
    }
}

/// Says for each host whether its key is known or was recorded and whether logging in works
/// (a record each with --json); asks each host that logged in whether it has a GPU. Returns
/// the exit code and the hosts that logged in with their answer (None: could not tell).
async fn report_logins(
    fleet: &Fleet,
    path: &Path,
    targets: &[Target],
    options: &ConnectOptions,
    results: Vec<Result<Session, SshError>>,
) -> (ExitCode, Vec<(String, Option<bool>)>) {
    let learned = options.host_keys.learned();
    let mut code = ExitCode::Success;
    let mut report = String::new();
    let mut gpus: Vec<(String, Option<bool>)> = Vec::new();
    for (target, result) in targets.iter().zip(results) {
        let key = learned
            .iter()
            .find(|l| l.host == target.name)
            .map_or("known", |_| "recorded");
        let login = match result {
            Ok(session) => {
                gpus.push((target.name.clone(), has_gpu(&session).await));
                session.close().await;
                Ok(())
            }
            Err(e) => {
                code = ExitCode::Unreachable;
                fleet.printer.error(&e.to_string());
                Err(e.kind().replace('_', " "))
            }
        };
        if fleet.printer.json() {
            fleet.printer.record(&serde_json::json!({
                "type": "host", "inventory": path, "host": target.name,
                "address": target.endpoint(), "user": target.user,
                "host_key": if login.is_ok() { key } else { "unconfirmed" },
                "login": login.as_ref().map_or_else(|e| e.as_str(), |()| "ok"),
            }));
            continue;
        }
        report.push_str(&match &login {
            Ok(()) => format!(
                "{}\t{}\thost key {key}\tlogin as {} ok\n",
                target.name,
                target.endpoint(),
                target.user
            ),
            Err(kind) => format!("{}\t{}\t{kind}\n", target.name, target.endpoint()),
        });
    }
    fleet.printer.write(Stream::Stdout, &report);
    (code, gpus)
}

/// Whether the host lists an NVIDIA GPU (None when the question failed).
async fn has_gpu(session: &Session) -> Option<bool> {
    let script = crate::remote::Script::new(crate::remote::GPU_COUNT);
    match session.capture(&script).await {
        Ok((status, out, _)) if status.success() => String::from_utf8_lossy(&out)
            .trim()
            .parse::<u32>()
            .ok()
            .map(|n| n > 0),
        _ => None,
    }
}

/// `device = "cuda"` was written; hosts without a GPU would fail `fleet check`. When none of
/// the hosts that answered has one, the inventory says `device = "cpu"`; when only some lack
/// one, they are named.
fn settle_device(
    fleet: &Fleet,
    args: &InitArgs,
    path: &std::path::Path,
    source: &str,
    gpus: &[(String, Option<bool>)],
) -> Result<()> {
    let without: Vec<&str> = gpus
        .iter()
        .filter(|(_, gpu)| *gpu == Some(false))
        .map(|(name, _)| name.as_str())
        .collect();
    if without.is_empty() {
        return Ok(());
    }
    if without.len() == gpus.len() {
        let text = inventory_text(args, source, "cpu")?;
        std::fs::write(path, &text).with_context(|| format!("cannot write {}", path.display()))?;
        fleet.printer.info(&format!(
            "no host has an NVIDIA GPU (nvidia-smi lists none): {} says device = \"cpu\"",
            path.display()
        ));
    } else {
        fleet.printer.warn(&format!(
            "no NVIDIA GPU on {} (nvidia-smi lists none): set device = \"cpu\" in their [[host]] entries, or check the driver",
            without.join(", ")
        ));
    }
    Ok(())
}

/// `[sync] source` for an inventory written to `inventory`: the folder `fleet init` runs in
/// (the project), relative to the inventory's folder: `..` for `inventory/fleet.toml`, `.`
/// for a `fleet.toml` beside the project's files, else the absolute path.
fn project_source(inventory: &std::path::Path) -> Result<String> {
    let project = std::env::current_dir().context("cannot tell the current folder")?;
    let folder = match inventory.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => project.join(dir),
        None => project.clone(),
    };
    let folder = lexically_normal(&folder);
    Ok(if folder == project {
        ".".to_string()
    } else if folder.parent() == Some(project.as_path()) {
        "..".to_string()
    } else {
        project.display().to_string()
    })
}

/// `path` with `.` and `..` components resolved as text (the folders need not exist yet).
fn lexically_normal(path: &std::path::Path) -> std::path::PathBuf {
    use std::path::Component;
    let mut out = std::path::PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// The inventory for `args`, commented like inventory/example.toml, syncing `source`.
fn inventory_text(args: &InitArgs, source: &str, device: &str) -> Result<String> {
    let mut text = String::from(
        "# Written by `fleet init`. Every field is described in README.md;\n\
         # `fleet inventory` shows how fleet reads this file.\n\n\
         [fleet]                             # defaults for every [[host]]\n",
    );
    match &args.user {
        Some(user) => text.push_str(&format!("user = {}\n", toml_string(user))),
        None => text.push_str(
            "# user = \"trainer\"                # the login on each host (default: yours)\n",
        ),
    }
    match &args.identity {
        Some(identity) => text.push_str(&format!("identity = {}\n", toml_string(&identity.display().to_string()))),
        None => text.push_str("# identity = \"~/.ssh/id_ed25519\"  # default: ~/.ssh/config, ssh-agent, ~/.ssh/id_*\n"),
    }
    match &args.activate {
        Some(line) => text.push_str(&format!("activate = {}\n", toml_string(line))),
        None => text.push_str(
            "# activate = \". ~/torch-venv/bin/activate\"  # run before every command: venv, conda, module load\n",
        ),
    }
    text.push_str(
        "workdir = \"~/fleet/project\"         # where `fleet sync` puts the project on each host\n\
         ranks = 1                           # processes per host: one per GPU\n",
    );
    text.push_str(&format!(
        "device = {:<27}# \"cuda\": rank r uses GPU LOCAL_RANK; \"cpu\": no GPU expected\n",
        toml_string(device)
    ));
    text.push_str(
        "master_port = 29500                 # MASTER_PORT; MASTER_ADDR is the first host's address\n\n\
         [sync]\n",
    );
    text.push_str(&format!(
        "source = {:<27}# the project folder, relative to this file\n",
        toml_string(source)
    ));
    text.push_str(
        "exclude = [\".git/\", \"target/\", \"runs/\"]\n\n\
         # Host order is node rank: the first host is rank 0 and the master.\n",
    );
    for (i, host) in args.hosts.iter().enumerate() {
        let (address, port) = match host.rsplit_once(':') {
            Some((a, p)) if !a.contains(':') => {
                let port: u16 = p
                    .parse()
                    .ok()
                    .filter(|p| *p > 0)
                    .with_context(|| format!("{host}: the port must be 1 to 65535"))?;
                (a, Some(port))
            }
            _ => (host.as_str(), None),
        };
        text.push_str(&format!(
            "\n[[host]]\nname = \"node{}\"\naddress = {}\n",
            i + 1,
            toml_string(address)
        ));
        if let Some(port) = port {
            text.push_str(&format!("port = {port}\n"));
        }
    }
    Ok(text)
}

/// A TOML basic string.
fn toml_string(value: &str) -> String {
    toml::Value::String(value.to_string()).to_string()
}
