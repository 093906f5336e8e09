//! `fleet check`'s knowledge: what to read on each host (one probe script, `key=value` lines)
//! and the cross-host checks, as pure functions over what the probes read.
//!
//! A value that must be equal everywhere (torch, its CUDA build, NCCL, the Python minor version,
//! fleet-train, each `[[check]]` with `must_match`) is reported with every host's value when it
//! is not; a missing tool reads "not installed", never an error.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::inventory::{Check, Device, Host, Inventory};
use crate::launch::Mode;
use crate::remote::{self, Script};

/// What one host's probe read, or why it could not.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HostReport {
    pub host: String,
    pub values: BTreeMap<String, String>,
    /// Set when the host could not be probed at all.
    pub error: Option<String>,
}

impl HostReport {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }
}

/// The probe script for a host ([`remote::PROBE`]): one `key=value` per line. `check.<name>`
/// lines hold the `[[check]]` probes' first output line.
pub fn probe_script(workdir: &str, activate: Option<&str>, checks: &[Check]) -> Script {
    let mut script =
        Script::new(remote::PROBE).args([workdir, activate.unwrap_or(""), remote::PROBE_PY]);
    for check in checks {
        script = script.args([key_safe(&check.name), check.command.clone()]);
    }
    script
}

/// `[[check]]` names become keys: anything but letters, digits, `_`, `-` and `.` is `_`.
fn key_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Reads probe output. Repeated keys (one `gpu=` per GPU) are numbered `gpu.0`, `gpu.1`, ...
pub fn parse_probe(host: &str, text: &str) -> HostReport {
    let mut values = BTreeMap::new();
    let mut gpus = 0;
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim().to_string();
        if key == "gpu" {
            values.insert(format!("gpu.{gpus}"), value);
            gpus += 1;
        } else {
            values.insert(key.to_string(), value);
        }
    }
    if !values.contains_key("gpu_tool") {
        values.insert("gpu_count".into(), gpus.to_string());
    }
    HostReport {
        host: host.to_string(),
        values,
        error: None,
    }
}

/// The outcome of one check, for the whole fleet or one host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub check: String,
    /// `None` for a fleet-wide check (a value that must match).
    pub host: Option<String>,
    pub ok: bool,
    /// What was found, e.g. "host1 2.11.0, host2 2.10.0".
    pub detail: String,
    /// How to fix it, when it failed.
    pub fix: Option<String>,
    /// For a value that must match: each host's value.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<(String, String)>,
}

impl Finding {
    pub(crate) fn pass(check: &str, host: Option<&str>, detail: impl Into<String>) -> Finding {
        Finding {
            check: check.to_string(),
            host: host.map(str::to_string),
            ok: true,
            detail: detail.into(),
            fix: None,
            values: Vec::new(),
        }
    }

    pub(crate) fn fail(
        check: &str,
        host: Option<&str>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding {
            check: check.to_string(),
            host: host.map(str::to_string),
            ok: false,
            detail: detail.into(),
            fix: Some(fix.into()),
            values: Vec::new(),
        }
    }
}

/// A GPU a rank will use with less free memory than this (MiB) fails the check.
const MIN_GPU_FREE_MB: u64 = 1024;
/// Free disk below this (MB) in a workdir fails the check.
const MIN_DISK_MB: u64 = 1024;
/// A clock further than this from the laptop's (ms) fails: logs and timeouts stop making sense.
const MAX_CLOCK_OFFSET_MS: i64 = 5_000;

/// Reads one value of a host's report, for the values that must match.
type Reader = Box<dyn Fn(&HostReport) -> Option<String>>;

/// The probe's word for a tool or package a host does not have.
pub const NOT_INSTALLED: &str = "not installed";

/// What the job needs on every host, read from how it is started (pure): its Python needs
/// torch, `--torchrun` needs torchrun, fleet-train needs fleet-train.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    pub torch: bool,
    /// `torchrun` or `accelerate`, the per-host launcher the job is started with.
    pub launcher: Option<&'static str>,
    pub fleet_train: Option<FleetTrain>,
}

/// Which fleet-train a job starts: the project's (`./fleet-train`, run in the workdir) or the
/// one on the host's PATH (`fleet-train`), as the shell finds a program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FleetTrain {
    Workdir,
    Path,
}

impl FleetTrain {
    /// The probe's key for it.
    fn key(self) -> &'static str {
        match self {
            FleetTrain::Workdir => "fleet_train",
            FleetTrain::Path => "fleet_train_on_path",
        }
    }
}

impl Needs {
    /// For a job started in `mode` with `command` (`[run].command` when `fleet check` runs
    /// alone; nothing when there is none).
    pub fn of(mode: Mode, command: &[String]) -> Needs {
        let program = command
            .first()
            .map(|p| p.rsplit('/').next().unwrap_or(p))
            .unwrap_or("");
        // The probe asks the `python3` of the host's PATH; an interpreter named by its path is
        // another one, which it cannot vouch for.
        let on_path = command.first().is_some_and(|p| !p.contains('/'));
        let python = on_path && (program == "python" || program.starts_with("python3"));
        let launcher = match (mode, program) {
            (Mode::Torchrun, _) | (Mode::Ranks, "torchrun") => Some("torchrun"),
            (Mode::Accelerate, _) | (Mode::Ranks, "accelerate") => Some("accelerate"),
            _ => None,
        };
        Needs {
            torch: python || launcher.is_some(),
            launcher,
            fleet_train: match (mode, command.first().map(String::as_str)) {
                (Mode::Ranks, Some("./fleet-train")) => Some(FleetTrain::Workdir),
                (Mode::Ranks, Some("fleet-train")) => Some(FleetTrain::Path),
                _ => None,
            },
        }
    }
}

/// Every check over what the probes read. `laptop_ms` is the laptop's clock when each probe's
/// answer arrived (the host reads its clock as the probe's last act).
pub fn evaluate(
    inventory: &Inventory,
    reports: &[HostReport],
    laptop_ms: &[i64],
    needs: Needs,
) -> Vec<Finding> {
    let mut findings: Vec<Finding> = reports
        .iter()
        .filter_map(|report| {
            let error = report.error.as_ref()?;
            Some(Finding::fail(
                "reachable",
                Some(&report.host),
                error.clone(),
                "check that the host is on, its address, and that sshd runs",
            ))
        })
        .collect();
    let reachable: Vec<&HostReport> = reports.iter().filter(|r| r.error.is_none()).collect();
    for (name, read) in &must_match(inventory, needs) {
        findings.extend(matching(name, read, &reachable, needs));
    }
    for (i, (report, host)) in reports.iter().zip(&inventory.hosts).enumerate() {
        if report.error.is_none() {
            findings.extend(host_findings(
                report,
                host,
                laptop_ms.get(i).copied(),
                needs,
            ));
        }
    }
    findings
}

/// The values that must be the same on every host, each with how to read it from a report:
/// Python's minor version, torch, its CUDA build, NCCL, fleet-train and the inventory's
/// `[[check]]`s with `must_match`.
fn must_match(inventory: &Inventory, needs: Needs) -> Vec<(String, Reader)> {
    let python_minor = |r: &HostReport| {
        r.get("python")
            .map(|v| v.splitn(3, '.').take(2).collect::<Vec<_>>().join("."))
    };
    let mut must_match: Vec<(String, Reader)> = vec![
        ("python".into(), Box::new(python_minor)),
        (
            "torch".into(),
            Box::new(|r: &HostReport| r.get("torch").map(str::to_string)),
        ),
        (
            "torch CUDA build".into(),
            Box::new(|r: &HostReport| r.get("torch_cuda").map(str::to_string)),
        ),
        (
            "nccl".into(),
            Box::new(|r: &HostReport| r.get("nccl").map(str::to_string)),
        ),
        (
            "fleet-train".into(),
            Box::new(move |r: &HostReport| {
                let key = match needs.fleet_train {
                    Some(which) => which.key(),
                    None if r.get("fleet_train") == Some(NOT_INSTALLED) => "fleet_train_on_path",
                    None => "fleet_train",
                };
                r.get(key).map(str::to_string)
            }),
        ),
    ];
    for check in &inventory.checks {
        let key = format!("check.{}", key_safe(&check.name));
        if check.must_match {
            must_match.push((
                check.name.clone(),
                Box::new(move |r: &HostReport| r.get(&key).map(str::to_string)),
            ));
        }
    }
    must_match
}

/// The finding for one value that must match, over the reachable hosts: the same everywhere,
/// or how it differs (None: no host has it, or all lack what the job needs, which is said per
/// host).
fn matching(name: &str, read: &Reader, reachable: &[&HostReport], needs: Needs) -> Option<Finding> {
    let values: Vec<(&str, String)> = reachable
        .iter()
        .filter_map(|r| read(r).map(|v| (r.host.as_str(), v)))
        .collect();
    let distinct: std::collections::BTreeSet<&String> = values.iter().map(|(_, v)| v).collect();
    let listing = values
        .iter()
        .map(|(h, v)| format!("{h} {v}"))
        .collect::<Vec<_>>()
        .join(", ");
    let needed =
        (name == "torch" && needs.torch) || (name == "fleet-train" && needs.fleet_train.is_some());
    let mut finding = match distinct.len() {
        0 => return None,
        // The same everywhere is no pass when it is missing and the job needs it: that is
        // said per host.
        1 if needed && values[0].1 == NOT_INSTALLED => return None,
        1 if values[0].1 == NOT_INSTALLED => Finding::pass(
            name,
            None,
            format!("{NOT_INSTALLED} (the job does not need it)"),
        ),
        1 => Finding::pass(name, None, values[0].1.clone()),
        _ => Finding::fail(
            name,
            None,
            format!("differs: {listing}"),
            format!("make {name} the same on every host"),
        ),
    };
    finding.values = values
        .iter()
        .map(|(h, v)| (h.to_string(), v.clone()))
        .collect();
    Some(finding)
}

/// The checks of one reachable host: what the job needs, its activate line, facts, WSL's
/// networking, GPUs, disk, clock and hostname.
fn host_findings(
    report: &HostReport,
    host: &Host,
    laptop_ms: Option<i64>,
    needs: Needs,
) -> Vec<Finding> {
    let name = Some(report.host.as_str());
    let mut findings = missing_for_the_job(report, host, needs);
    if let Some(line) = &host.activate {
        findings.push(match report.get("activate_error") {
            Some(error) => Finding::fail(
                "activate",
                name,
                format!("`{line}` failed: {}", error.trim()),
                "fix activate in the inventory: it runs before every command fleet runs on the host",
            ),
            None => Finding::pass("activate", name, line.clone()),
        });
    }
    findings.extend(facts(report));
    findings.extend(wsl_networking(report));
    if host.device == Device::Cuda {
        findings.extend(gpus(report, host));
    }
    findings.extend(disk(report, host));
    findings.extend(clock(report, laptop_ms));
    if report
        .get("hostname_address")
        .is_some_and(|a| a.starts_with("127."))
    {
        findings.push(Finding::pass(
            "hostname",
            name,
            format!("{} resolves to {}: fleet run sets GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME so ranks do not bind it", report.get("hostname").unwrap_or("?"), report.get("hostname_address").unwrap_or("?")),
        ));
    }
    findings
}

/// A CUDA host's GPUs: nvidia-smi there, one GPU per rank, and their free memory.
fn gpus(report: &HostReport, host: &Host) -> Vec<Finding> {
    let name = Some(report.host.as_str());
    let gpus: u32 = report
        .get("gpu_count")
        .and_then(|g| g.parse().ok())
        .unwrap_or(0);
    if report.get("gpu_tool").is_some() {
        vec![Finding::fail(
            "gpus",
            name,
            "nvidia-smi not installed",
            "install the NVIDIA driver, or set device = \"cpu\" for this host",
        )]
    } else if gpus < host.ranks {
        vec![Finding::fail(
            "gpus",
            name,
            format!("{gpus} GPUs for {} ranks", host.ranks),
            "lower `ranks` for this host to its GPU count",
        )]
    } else {
        let mut findings = vec![Finding::pass(
            "gpus",
            name,
            format!("{gpus}: {}", report.get("gpu.0").unwrap_or("")),
        )];
        findings.extend(gpu_memory(report, host.ranks));
        findings
    }
}

/// Free space in the workdir's file system.
fn disk(report: &HostReport, host: &Host) -> Option<Finding> {
    let name = Some(report.host.as_str());
    let free = report.get("disk_free_mb")?.parse::<u64>().ok()?;
    Some(if free < MIN_DISK_MB {
        Finding::fail(
            "disk",
            name,
            format!("{free} MB free in {}", host.workdir),
            "free some space in the workdir's file system",
        )
    } else {
        Finding::pass("disk", name, format!("{:.1} GB free", free as f64 / 1024.0))
    })
}

/// The host's clock against the laptop's when the probe's answer arrived.
fn clock(report: &HostReport, laptop_ms: Option<i64>) -> Option<Finding> {
    let name = Some(report.host.as_str());
    let offset = report.get("time_ms")?.parse::<i64>().ok()? - laptop_ms?;
    let detail = format!("{:+.1} s from the laptop", offset as f64 / 1000.0);
    Some(if offset.abs() > MAX_CLOCK_OFFSET_MS {
        Finding::fail(
            "clock",
            name,
            detail,
            "enable time sync (timedatectl set-ntp true)",
        )
    } else {
        Finding::pass("clock", name, detail)
    })
}

/// What the probe found that is shown, not judged: the system, the driver's CUDA, and the
/// Python packages a script may use besides torch.
fn facts(report: &HostReport) -> Vec<Finding> {
    let name = Some(report.host.as_str());
    let mut facts = Vec::new();
    if let Some(os) = report.get("os") {
        let arch = report.get("arch").unwrap_or("?");
        let kernel = report.get("kernel").unwrap_or("?");
        facts.push(Finding::pass(
            "system",
            name,
            format!("{os}, {arch}, kernel {kernel}"),
        ));
    }
    if let Some(cuda) = report.get("cuda_driver").filter(|c| !c.is_empty()) {
        facts.push(Finding::pass("driver CUDA", name, cuda));
    }
    for package in ["transformers", "accelerate"] {
        if let Some(version) = report.get(package) {
            facts.push(Finding::pass(package, name, version));
        }
    }
    facts
}

/// A host in WSL 2 is reachable from the other PCs only with mirrored networking: under the
/// default NAT, Windows answers on the PC's address and the Linux side (its sshd, the master
/// port, Gloo's and NCCL's ports) sits behind it on a private address.
fn wsl_networking(report: &HostReport) -> Option<Finding> {
    let mode = report.get("wsl_networking")?;
    let name = Some(report.host.as_str());
    let fix = "in %UserProfile%\\.wslconfig on that PC put `[wsl2]` and `networkingMode=mirrored`, \
               run `wsl --shutdown`, and allow inbound connections in an administrator PowerShell: \
               `Set-NetFirewallHyperVVMSetting -Name '{40E0AC32-46A5-438A-A0B2-2B479E8F2E90}' -DefaultInboundAction Allow` \
               (README: Windows PCs)";
    Some(match mode {
        "mirrored" => Finding::pass("wsl", name, "WSL 2, mirrored networking"),
        "nat" => Finding::fail(
            "wsl",
            name,
            "WSL 2 with NAT networking: the other PCs cannot reach its ranks",
            fix,
        ),
        other => Finding::fail(
            "wsl",
            name,
            format!(
                "WSL 2, networking mode {other} (wslinfo is missing: WSL older than 2.0, which has no mirrored mode)"
            ),
            format!("update WSL (`wsl --update` in PowerShell), then {fix}"),
        ),
    })
}

/// What the job needs that `report` says is missing on `host`, each with the fix.
fn missing_for_the_job(
    report: &HostReport,
    host: &crate::inventory::Host,
    needs: Needs,
) -> Vec<Finding> {
    let name = Some(report.host.as_str());
    let missing = |key: &str| report.get(key).is_none_or(|v| v == NOT_INSTALLED);
    let reach = match &host.activate {
        Some(line) => format!("the environment `{line}` makes"),
        None => "the login's PATH (no activate is set)".to_string(),
    };
    let fix = |what: &str| {
        format!(
            "install {what} there, or set activate = \"...\" in the inventory to the line that reaches it (a venv, conda, module load)"
        )
    };
    let mut findings = Vec::new();
    if needs.torch && missing("torch") {
        let python = report.get("python").unwrap_or(NOT_INSTALLED);
        findings.push(Finding::fail(
            "torch",
            name,
            format!("{NOT_INSTALLED} for python3 ({python}) in {reach}, and the job needs it"),
            fix("torch"),
        ));
    }
    if let Some(launcher) = needs.launcher {
        if missing(&format!("tool.{launcher}")) {
            findings.push(Finding::fail(
                launcher,
                name,
                format!("{launcher}: {NOT_INSTALLED} in {reach}"),
                fix(launcher),
            ));
        }
    }
    if let Some(which) = needs.fleet_train {
        findings.extend(fleet_train_finding(report, name, which, &reach));
    }
    findings
}

/// Whether the fleet-train the job starts is there and runs (its libtorch loads).
fn fleet_train_finding(
    report: &HostReport,
    name: Option<&str>,
    which: FleetTrain,
    reach: &str,
) -> Option<Finding> {
    let value = report.get(which.key()).unwrap_or(NOT_INSTALLED);
    let in_workdir = report
        .get(FleetTrain::Workdir.key())
        .is_some_and(|v| v != NOT_INSTALLED);
    let (found, fix) = match which {
        _ if value.starts_with("fails:") => (
            format!("`fleet-train --version` {value}"),
            "its libtorch must load on the host: the torch venv at the path it was built for \
             (FLEET_EXTRA_RPATH at build time), or LD_LIBRARY_PATH in the inventory's env"
                .to_string(),
        ),
        _ if value != NOT_INSTALLED => return None,
        FleetTrain::Workdir => (
            format!("{NOT_INSTALLED} in the workdir (./fleet-train)"),
            "copy fleet-train into the project folder: fleet run syncs it".to_string(),
        ),
        FleetTrain::Path if in_workdir => (
            format!("not on PATH in {reach}, but the project's ./fleet-train is in the workdir"),
            "start it as ./fleet-train (a program in the workdir is not on PATH)".to_string(),
        ),
        FleetTrain::Path => (
            format!("{NOT_INSTALLED} on PATH in {reach}"),
            "copy fleet-train into the project and start it as ./fleet-train, or install it \
             on the host's PATH"
                .to_string(),
        ),
    };
    Some(Finding::fail("fleet-train", name, found, fix))
}

/// The GPUs the ranks will use (LOCAL_RANK 0..ranks) need memory to spare: another process
/// holding one makes the job fail with "CUDA out of memory" minutes later.
fn gpu_memory(report: &HostReport, ranks: u32) -> Vec<Finding> {
    let mut findings = Vec::new();
    for index in 0..ranks {
        let line = report.get(&format!("gpu.{index}")).unwrap_or("");
        let fields: Vec<u64> = line
            .split(',')
            .skip(1)
            .take(2)
            .filter_map(|f| f.trim().parse().ok())
            .collect();
        let [total, free] = fields[..] else { continue };
        if free < MIN_GPU_FREE_MB {
            let holders = report.get("gpu_processes").unwrap_or("?");
            findings.push(Finding::fail(
                "gpu memory",
                Some(&report.host),
                format!("GPU {index} has {free} of {total} MiB free ({holders} processes hold GPU memory)"),
                "stop what holds it (nvidia-smi lists the processes; fleet ps shows fleet's own jobs)",
            ));
        }
    }
    findings
}

/// A listener for the port checks (`port` 0: one the kernel picks): it prints `listening PORT`
/// once bound (or `in use <holder>`), accepts for `seconds`, and ends early when its stdin
/// closes.
pub fn listener_script(port: u16, seconds: u32) -> Script {
    Script::new(remote::LISTENER).args([
        port.to_string(),
        seconds.to_string(),
        remote::LISTENER_PY.into(),
    ])
}

/// Connects from a host to every `(index, addr, port)` at once, within `seconds` each: prints
/// `INDEX ok`, `INDEX refused`, `INDEX timeout` or `INDEX error WHY` per target.
pub fn pairs_script(seconds: u32, targets: &[(usize, String, u16)]) -> Script {
    let mut args = vec![seconds.to_string(), remote::PAIRS_PY.into()];
    for (index, addr, port) in targets {
        args.extend([index.to_string(), addr.clone(), port.to_string()]);
    }
    Script::new(remote::PAIRS).args(args)
}

/// Connects from a host to `addr:port` within `seconds`: prints `ok`, `refused` or `timeout`.
pub fn connect_script(addr: &str, port: u16, seconds: u32) -> Script {
    Script::new(remote::CONNECT).args([
        addr.to_string(),
        port.to_string(),
        seconds.to_string(),
        remote::CONNECT_PY.into(),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn inventory(extra: &str) -> Inventory {
        let text = format!(
            "[fleet]\ndevice = \"cpu\"\n{extra}\n[[host]]\nname = \"a\"\naddress = \"10.0.0.1\"\n[[host]]\nname = \"b\"\naddress = \"10.0.0.2\"\n"
        );
        Inventory::from_toml(Path::new("fleet.toml"), &text).unwrap()
    }

    fn report(host: &str, lines: &str) -> HostReport {
        parse_probe(host, lines)
    }

    /// The probe, run by a real `sh` here, reads what it should.
    #[test]
    fn the_probe_script_reads_this_machine() {
        let checks = [
            Check {
                name: "greeting".into(),
                command: "echo 'hi there'; echo second".into(),
                must_match: true,
            },
            Check {
                name: "backslashes".into(),
                command: r"printf '%s\n' 'a\tb\\c'".into(),
                must_match: true,
            },
        ];
        let out = crate::remote::run_here(
            "sh",
            Path::new("/"),
            &probe_script("/tmp", None, &checks),
            b"",
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let report = parse_probe("here", &text);
        assert_eq!(
            report.get("check.greeting"),
            Some("hi there"),
            "{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(report.get("check.backslashes"), Some(r"a\tb\\c"), "{text}");
        assert!(
            report
                .get("python")
                .is_some_and(|v| v.starts_with("3.") || v == "not installed"),
            "{text}"
        );
        assert!(
            report.get("torch").is_some() || report.get("python") == Some("not installed"),
            "{text}"
        );
        assert!(
            report
                .get("disk_free_mb")
                .is_some_and(|v| v.parse::<u64>().is_ok()),
            "{text}"
        );
        assert!(report.get("arch").is_some_and(|v| !v.is_empty()));
        assert_eq!(report.get("probe_complete"), Some("yes"), "{text}");
        assert_eq!(report.get("fleet_train"), Some("not installed"));
    }

    /// The fleet-train the job starts is checked where the shell will look for it, and one
    /// whose libtorch does not load fails with what it printed.
    #[test]
    fn fleet_train_is_looked_for_where_the_job_starts_it() {
        let inv = inventory("");
        let fails = |lines: &str, command: &str| {
            let reports = [report("a", lines), report("b", lines)];
            let needs = Needs::of(Mode::Ranks, &[command.to_string()]);
            evaluate(&inv, &reports, &[0, 0], needs)
                .into_iter()
                .filter(|f| !f.ok && f.check == "fleet-train")
                .map(|f| format!("{} | {}", f.detail, f.fix.unwrap_or_default()))
                .collect::<Vec<_>>()
        };
        let in_workdir = "fleet_train=fleet-train 0.1.0\nfleet_train_on_path=not installed\n";
        assert!(fails(in_workdir, "./fleet-train").is_empty());
        let bare = fails(in_workdir, "fleet-train");
        assert_eq!(bare.len(), 2, "{bare:?}");
        assert!(bare[0].contains("start it as ./fleet-train"), "{bare:?}");
        let nowhere = "fleet_train=not installed\nfleet_train_on_path=not installed\n";
        let missing = fails(nowhere, "./fleet-train");
        assert!(
            missing[0].contains("copy fleet-train into the project"),
            "{missing:?}"
        );
        let broken = "fleet_train=fails: ./fleet-train: error while loading shared libraries: \
                      libtorch_cpu.so: cannot open shared object file\n";
        let broken = fails(broken, "./fleet-train");
        assert_eq!(broken.len(), 2, "{broken:?}");
        assert!(broken[0].contains("libtorch_cpu.so"), "{broken:?}");
        assert!(broken[0].contains("LD_LIBRARY_PATH"), "{broken:?}");
    }

    #[test]
    fn what_the_job_needs_is_read_from_how_it_starts() {
        let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let torch = Needs {
            torch: true,
            launcher: None,
            fleet_train: None,
        };
        assert_eq!(
            Needs::of(Mode::Ranks, &words(&["python3", "train.py"])),
            torch
        );
        assert_eq!(
            Needs::of(Mode::Ranks, &words(&["/opt/venv/bin/python", "t.py"])),
            Needs::default()
        );
        assert_eq!(
            Needs::of(Mode::Torchrun, &words(&["train.py"])),
            Needs {
                torch: true,
                launcher: Some("torchrun"),
                fleet_train: None
            }
        );
        assert_eq!(
            Needs::of(Mode::Ranks, &words(&["accelerate", "launch", "t.py"])),
            Needs {
                torch: true,
                launcher: Some("accelerate"),
                fleet_train: None
            }
        );
        assert_eq!(
            Needs::of(Mode::Ranks, &words(&["./fleet-train", "--data", "d.csv"])),
            Needs {
                torch: false,
                launcher: None,
                fleet_train: Some(FleetTrain::Workdir)
            }
        );
        assert_eq!(
            Needs::of(Mode::Ranks, &words(&["fleet-train", "--data", "d.csv"])),
            Needs {
                torch: false,
                launcher: None,
                fleet_train: Some(FleetTrain::Path)
            }
        );
        assert_eq!(
            Needs::of(Mode::Ranks, &words(&["sh", "-c", "true"])),
            Needs::default()
        );
        assert_eq!(Needs::of(Mode::Ranks, &[]), Needs::default());
    }

    /// torch "not installed" on every host is the same everywhere, yet no pass for a job that
    /// needs it: each host is named with the fix.
    #[test]
    fn what_the_job_needs_and_no_host_has_fails_on_every_host() {
        let inv = inventory("");
        let reports = [
            report(
                "a",
                "python=3.11.2\ntorch=not installed\ntool.torchrun=not installed\n",
            ),
            report(
                "b",
                "python=3.11.2\ntorch=not installed\ntool.torchrun=not installed\n",
            ),
        ];
        let needs = Needs::of(Mode::Torchrun, &["t.py".to_string()]);
        let findings = evaluate(&inv, &reports, &[0, 0], needs);
        let failed: Vec<(&str, Option<&str>)> = findings
            .iter()
            .filter(|f| !f.ok)
            .map(|f| (f.check.as_str(), f.host.as_deref()))
            .collect();
        for host in ["a", "b"] {
            assert!(failed.contains(&("torch", Some(host))), "{failed:?}");
            assert!(failed.contains(&("torchrun", Some(host))), "{failed:?}");
        }
        assert!(
            findings
                .iter()
                .all(|f| !(f.ok && f.detail == NOT_INSTALLED))
        );
        let torch = findings.iter().find(|f| f.check == "torch").unwrap();
        assert!(
            torch.fix.as_deref().unwrap().contains("set activate"),
            "{torch:?}"
        );
        // A job that does not need it: no failure, and not a bare tick either.
        let findings = evaluate(&inv, &reports, &[0, 0], Needs::default());
        let torch = findings.iter().find(|f| f.check == "torch").unwrap();
        assert!(torch.ok && torch.detail == "not installed (the job does not need it)");
    }

    /// A failing activate line (here a `.` of a missing file, which would end a plain `sh`) is
    /// reported with what it printed, and the probe still runs to its end.
    #[test]
    fn a_failing_activate_line_is_reported_and_the_probe_goes_on() {
        let script = probe_script("/tmp", Some(". /nonexistent/venv/bin/activate"), &[]);
        let out = crate::remote::run_here("sh", Path::new("/"), &script, b"");
        let report = parse_probe("here", &String::from_utf8_lossy(&out.stdout));
        let error = report.get("activate_error").unwrap_or_default();
        assert!(error.contains("/nonexistent/venv/bin/activate"), "{error}");
        assert!(error.contains("cannot open"), "{error}");
        assert!(
            !error.contains("failed (exit"),
            "said once, by the finding: {error}"
        );
        assert_eq!(report.get("probe_complete"), Some("yes"));
        // A line that fails without a word is reported with its exit status.
        let script = probe_script("/tmp", Some("false"), &[]);
        let out = crate::remote::run_here("sh", Path::new("/"), &script, b"");
        let silent = parse_probe("here", &String::from_utf8_lossy(&out.stdout));
        let error = silent.get("activate_error").unwrap_or_default();
        assert!(error.contains("failed (exit 1)"), "{error}");
        let inventory = inventory("activate = \". /nonexistent/venv/bin/activate\"\n");
        let findings = evaluate(
            &inventory,
            &[report.clone(), report],
            &[0, 0],
            Needs::default(),
        );
        let failed: Vec<&Finding> = findings.iter().filter(|f| f.check == "activate").collect();
        assert_eq!(failed.len(), 2);
        assert!(
            failed
                .iter()
                .all(|f| !f.ok && f.detail.contains("/nonexistent"))
        );
    }

    /// Without python3 the port check falls back to bash's /dev/tcp; the address reaches it as
    /// an argument, never as code.
    #[test]
    fn the_port_probe_never_runs_the_address() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let addr = format!("$(touch {})", marker.display());
        // A PATH without python3 but with bash and timeout (and head, which reads the script).
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        for tool in ["bash", "timeout", "sh", "head"] {
            let found = ["/usr/bin", "/bin"]
                .iter()
                .map(|d| Path::new(d).join(tool))
                .find(|p| p.exists())
                .unwrap();
            std::os::unix::fs::symlink(found, bin.join(tool)).unwrap();
        }
        let script = connect_script(&addr, 9, 2);
        let mut stdin = script.stdin();
        let command = Script::command(stdin.len());
        stdin.extend_from_slice(b"");
        let mut child = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(&command)
            .env("PATH", &bin)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), &stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        let answer = String::from_utf8_lossy(&out.stdout);
        assert!(matches!(answer.trim(), "refused" | "timeout"), "{answer}");
        assert!(!marker.exists(), "the address ran as a command");
    }

    #[test]
    fn the_system_driver_and_packages_are_shown() {
        let probed = report(
            "pc1",
            "os=Ubuntu 24.04.1 LTS\narch=x86_64\nkernel=6.8.0-49-generic\ncuda_driver=12.4\n\
             transformers=4.57.1\naccelerate=not installed\n",
        );
        let shown: Vec<(String, String)> = facts(&probed)
            .into_iter()
            .map(|f| (f.check, f.detail))
            .collect();
        let expected = [
            (
                "system",
                "Ubuntu 24.04.1 LTS, x86_64, kernel 6.8.0-49-generic",
            ),
            ("driver CUDA", "12.4"),
            ("transformers", "4.57.1"),
            ("accelerate", "not installed"),
        ]
        .map(|(c, d)| (c.to_string(), d.to_string()));
        assert_eq!(shown, expected);
    }

    /// A probe's answer from WSL 2 (its kernel's name, and what wslinfo says in each mode).
    #[test]
    fn a_wsl_host_needs_mirrored_networking() {
        let recorded = "os=Ubuntu 24.04.1 LTS\narch=x86_64\nkernel=5.15.167.4-microsoft-standard-WSL2\n\
                        hostname=DESKTOP-4060\nhostname_address=127.0.1.1\n";
        let nat = report("pc2", &format!("{recorded}wsl_networking=nat\n"));
        let finding = wsl_networking(&nat).unwrap();
        assert!(!finding.ok);
        assert_eq!(finding.host.as_deref(), Some("pc2"));
        assert!(
            finding.detail.contains("NAT networking"),
            "{}",
            finding.detail
        );
        assert_eq!(
            format!("{} ✗ {}", finding.check, finding.detail),
            readme_quote("wsl ✗ ")
        );
        assert!(finding.fix.unwrap().contains("networkingMode=mirrored"));
        let mirrored = report("pc2", &format!("{recorded}wsl_networking=mirrored\n"));
        assert!(wsl_networking(&mirrored).unwrap().ok);
        let old = report("pc2", &format!("{recorded}wsl_networking=unknown\n"));
        assert!(
            wsl_networking(&old)
                .unwrap()
                .fix
                .unwrap()
                .starts_with("update WSL")
        );
        let linux = report("pc1", "kernel=6.8.0-49-generic\n");
        assert_eq!(wsl_networking(&linux), None);
    }

    /// The README's quote (in backticks) that begins with `start`.
    fn readme_quote(start: &str) -> &'static str {
        const README: &str = include_str!("../../../README.md");
        README
            .split('`')
            .skip(1)
            .step_by(2)
            .find(|quote| quote.starts_with(start))
            .unwrap_or_else(|| panic!("the README no longer quotes `{start}...`"))
    }

    /// A host whose name resolves to a loopback address is named as the README says, and passes.
    #[test]
    fn a_host_name_on_loopback_is_said_and_handled() {
        let inv = inventory("");
        let line = "hostname=desktop1\nhostname_address=127.0.1.1\n";
        let reports = [report("a", line), report("b", line)];
        let findings = evaluate(&inv, &reports, &[0, 0], Needs::default());
        let said = findings.iter().find(|f| f.check == "hostname").unwrap();
        assert!(said.ok);
        assert_eq!(said.detail, readme_quote("desktop1 resolves to 127.0.1.1"));
    }

    #[test]
    fn differing_values_name_every_host() {
        let inv = inventory("[[check]]\nname = \"data version\"\ncommand = \"cat VERSION\"\n");
        let reports = [
            report("a", "python=3.12.1\ntorch=2.11.0\ncheck.data_version=7\n"),
            report("b", "python=3.12.9\ntorch=2.10.0\ncheck.data_version=8\n"),
        ];
        let findings = evaluate(&inv, &reports, &[0, 0], Needs::default());
        let failed: Vec<(&str, &str)> = findings
            .iter()
            .filter(|f| !f.ok)
            .map(|f| (f.check.as_str(), f.detail.as_str()))
            .collect();
        assert_eq!(
            failed,
            [
                ("torch", "differs: a 2.11.0, b 2.10.0"),
                ("data version", "differs: a 7, b 8")
            ]
        );
        // As the README's troubleshooting table quotes it, for hosts named as init names them.
        let named = [
            report("node1", "torch=2.11.0\n"),
            report("node2", "torch=2.10.0\n"),
        ];
        let quoted = evaluate(&inv, &named, &[0, 0], Needs::default());
        let torch = quoted.iter().find(|f| f.check == "torch").unwrap();
        assert_eq!(
            format!("{}: {}", torch.check, torch.detail),
            readme_quote("torch: differs: ")
        );
        assert!(
            findings
                .iter()
                .any(|f| f.check == "python" && f.ok && f.detail == "3.12")
        );
    }

    #[test]
    fn gpus_are_counted_against_ranks() {
        let inv = Inventory::from_toml(
            Path::new("f.toml"),
            "[fleet]\nranks = 2\n[[host]]\naddress = \"a\"\n[[host]]\naddress = \"b\"\n",
        )
        .unwrap();
        let reports = [
            report(
                "a",
                "gpu=NVIDIA GeForce RTX 4060 Ti, 16380, 16000, 550.1\ngpu=NVIDIA GeForce RTX 4060 Ti, 16380, 16000, 550.1\n",
            ),
            report("b", "gpu=NVIDIA GeForce RTX 4060 Ti, 16380, 16000, 550.1\n"),
        ];
        let findings = evaluate(&inv, &reports, &[0, 0], Needs::default());
        let gpus: Vec<(bool, &str)> = findings
            .iter()
            .filter(|f| f.check == "gpus")
            .map(|f| (f.ok, f.detail.as_str()))
            .collect();
        assert_eq!(
            gpus,
            [
                (true, "2: NVIDIA GeForce RTX 4060 Ti, 16380, 16000, 550.1"),
                (false, "1 GPUs for 2 ranks")
            ]
        );

        let busy = [
            report(
                "a",
                "gpu=RTX, 16380, 16000, 550.1\ngpu=RTX, 16380, 300, 550.1\ngpu_processes=1\n",
            ),
            report(
                "b",
                "gpu=RTX, 16380, 16000, 550.1\ngpu=RTX, 16380, 16000, 550.1\n",
            ),
        ];
        let findings = evaluate(&inv, &busy, &[0, 0], Needs::default());
        let memory: Vec<(Option<&str>, &str)> = findings
            .iter()
            .filter(|f| f.check == "gpu memory")
            .map(|f| (f.host.as_deref(), f.detail.as_str()))
            .collect();
        assert_eq!(
            memory,
            [(
                Some("a"),
                "GPU 1 has 300 of 16380 MiB free (1 processes hold GPU memory)"
            )]
        );
    }

    #[test]
    fn unreachable_hosts_fail_and_the_rest_is_still_checked() {
        let inv = inventory("");
        let reports = [
            HostReport {
                host: "a".into(),
                error: Some("a: cannot connect".into()),
                ..HostReport::default()
            },
            report("b", "disk_free_mb=10\ntime_ms=100000\n"),
        ];
        let findings = evaluate(&inv, &reports, &[0, 0], Needs::default());
        let failed: Vec<(&str, Option<&str>)> = findings
            .iter()
            .filter(|f| !f.ok)
            .map(|f| (f.check.as_str(), f.host.as_deref()))
            .collect();
        assert_eq!(
            failed,
            [
                ("reachable", Some("a")),
                ("disk", Some("b")),
                ("clock", Some("b"))
            ]
        );
    }
}
