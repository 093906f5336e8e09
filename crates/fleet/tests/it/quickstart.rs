//! The README's quick start, command by command, on the test bed. Every command of the
//! section's `sh` blocks either runs as printed, with the test bed's addresses for the seed's
//! three PCs, its user `root` for `trainer` and the fleet-train cargo built for this test for the
//! laptop's release build, or is named here with why the test bed does not need it. A command
//! this test does not know fails it, and so does a step the README no longer has.
//!
//! The laptop is a HOME of the test's own holding the test bed's key as `~/.ssh/id_ed25519` and
//! an empty `known_hosts`; the project is an empty folder. The hosts are prepared as a user
//! prepares them: torch lives in the venv `/opt/fleet/torch-venv` (each host's own copy, see
//! scripts/testbed.sh), reached through `activate` alone, with no PATH in the inventory.

use fleet_testkit as common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Run, Testbed};

/// The seed's addresses, in the README's order.
const SEED: [&str; 3] = ["192.168.1.100", "192.168.1.101", "192.168.1.102"];

/// An existing torch.distributed script, as the README's last block starts it: a Gloo
/// all-reduce of `rank + 1` per epoch (6 on three ranks). Started by `accelerate launch`, it lets
/// accelerate set up the process group and says which kind it chose.
const SCRIPT: &str = r#"import argparse, os, socket
import torch
import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=1)
args = parser.parse_args()
if "ACCELERATE_DYNAMO_BACKEND" in os.environ:
    from accelerate import Accelerator
    print(f"accelerate: {Accelerator().distributed_type}", flush=True)
else:
    dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
for epoch in range(args.epochs):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    print(f"epoch {epoch + 1}: rank {rank} of {world} on {socket.gethostname()}: all_reduce sum {t.item():g}", flush=True)
dist.destroy_process_group()
"#;

#[test]
fn the_readme_quick_start_works_on_the_test_bed_as_printed() {
    // The README's inventory keeps the default master port.
    let _turn = common::default_master_port();
    let laptop = Laptop::new();
    laptop.write("02_finetune_distributed.py", SCRIPT);
    let mut done = Vec::new();
    for line in quick_start() {
        let command = laptop.substitute(&line);
        let step = if let Some(why) = not_needed(&line) {
            eprintln!("quick start: not run here ({why}): {line}");
            continue;
        } else if line.starts_with("fleet init ") {
            laptop.init(&command)
        } else if line.starts_with("fleet exec --no-activate -- 'python3 -m venv ") {
            laptop.install_torch(&command)
        } else if line == "fleet check" {
            laptop.check(&command)
        } else if line.starts_with("cp target/release/fleet-train . && ./fleet-train gen-data ") {
            laptop.gen_data(&command)
        } else if line.starts_with("fleet run -- ./fleet-train ") {
            laptop.train(&command)
        } else if line == "fleet pull" {
            laptop.pull(&command)
        } else if line.starts_with("fleet run --torchrun -- 02_finetune_distributed.py") {
            laptop.script(&command, "n", 3, None)
        } else if line.starts_with("fleet run -- python3 02_finetune_distributed.py") {
            laptop.script(&command, "", 1, None)
        } else if line.starts_with("fleet run --accelerate -- 02_finetune_distributed.py") {
            laptop.script(
                &command,
                "n",
                1,
                Some("accelerate: DistributedType.MULTI_CPU"),
            )
        } else {
            panic!("the README's quick start has a command this test does not know: {line}");
        };
        done.push(step);
    }
    assert_eq!(
        done,
        [
            "init",
            "torch",
            "check",
            "gen-data",
            "train",
            "pull",
            "torchrun",
            "plain",
            "accelerate"
        ],
        "the quick start's steps changed"
    );
}

/// Why a command of the quick start does not run on the test bed, if it does not.
fn not_needed(line: &str) -> Option<&'static str> {
    let reasons = [
        (
            "ssh-keygen -t ed25519",
            "the laptop's ~/.ssh/id_ed25519 is the test bed's client key",
        ),
        (
            "for h in ",
            "the test bed authorises that key for root, who owns /opt/fleet",
        ),
        ("sudo ufw ", "the test bed's hosts have no firewall"),
        (
            "scripts/setup.sh",
            "scripts/test.sh ran it before the tests",
        ),
        (
            "source scripts/env.sh && cargo build ",
            "cargo built this test's fleet-train, which stands in for target/release's",
        ),
    ];
    reasons
        .iter()
        .find(|(start, _)| line.starts_with(start))
        .map(|(_, why)| *why)
}

/// The commands of the quick start's `sh` blocks, in order, without their comments.
fn quick_start() -> Vec<String> {
    let readme = std::fs::read_to_string(common::repo().join("README.md")).unwrap();
    let start = readme
        .find("## Quick start")
        .expect("the README has a quick start");
    let rest = &readme[start + 2..];
    let section = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    let mut commands = Vec::new();
    let mut inside = false;
    for line in section.lines().map(str::trim) {
        if line.starts_with("```") {
            inside = !inside && line == "```sh";
        } else if inside && !line.is_empty() {
            let command = line.find("  #").map_or(line, |i| &line[..i]);
            commands.push(command.trim_end().to_string());
        }
    }
    assert!(commands.len() > 5, "no commands found in:\n{section}");
    commands
}

/// The laptop: a HOME, the project folder, and the fleet binaries on PATH.
struct Laptop {
    tb: Testbed,
    home: tempfile::TempDir,
    project: tempfile::TempDir,
    bin: PathBuf,
}

impl Laptop {
    fn new() -> Laptop {
        let tb = Testbed::get();
        let home = tempfile::tempdir().unwrap();
        let ssh = home.path().join(".ssh");
        std::fs::create_dir_all(&ssh).unwrap();
        std::fs::copy(tb.key(), ssh.join("id_ed25519")).unwrap();
        let project = tempfile::tempdir().unwrap();
        let bin = Path::new(env!("CARGO_BIN_EXE_fleet"))
            .parent()
            .unwrap()
            .to_path_buf();
        Laptop {
            tb,
            home,
            project,
            bin,
        }
    }

    fn write(&self, path: &str, text: &str) {
        std::fs::write(self.project.path().join(path), text).unwrap();
    }

    /// The README's line with the test bed's addresses, user and build.
    fn substitute(&self, line: &str) -> String {
        let mut line = line.replace("--user trainer", "--user root").replace(
            "target/release/fleet-train",
            &common::trainer_binary().display().to_string(),
        );
        for (seed, host) in SEED.iter().zip(&self.tb.hosts) {
            let endpoint = match host.port {
                22 => host.addr.clone(),
                port => format!("{}:{port}", host.addr),
            };
            line = line.replace(seed, &endpoint);
        }
        line
    }

    /// A script that runs `command` in the project, as the user's shell would.
    fn script_for(&self, command: &str) -> PathBuf {
        let path = self.home.path().join("step.sh");
        std::fs::write(
            &path,
            format!(
                "cd '{}'\nexport PATH='{}':\"$PATH\"\n{command}\n",
                self.project.path().display(),
                self.bin.display()
            ),
        )
        .unwrap();
        path
    }

    /// Runs `command` in the project folder, without a terminal.
    fn shell(&self, command: &str) -> Run {
        let output = Command::new("bash")
            .arg(self.script_for(command))
            .env("HOME", self.home.path())
            .env_remove("SSH_AUTH_SOCK")
            .env_remove("FLEET_INVENTORY")
            .env_remove("NO_COLOR")
            .env_remove("CLICOLOR_FORCE")
            .output()
            .unwrap();
        Run::from(output)
    }

    /// Step 3: the inventory, the host keys confirmed on a terminal, the logins tried.
    fn init(&self, command: &str) -> &'static str {
        let script = self.script_for(command);
        let (code, shown) = common::on_a_terminal(
            &format!("bash {}", script.display()),
            self.home.path(),
            b"y\n",
        );
        assert_eq!(code, Some(0), "{shown}");
        assert_eq!(shown.matches("host key recorded").count(), 3, "{shown}");
        assert_eq!(shown.matches("login as root ok").count(), 3, "{shown}");
        let inventory =
            std::fs::read_to_string(self.project.path().join("inventory/fleet.toml")).unwrap();
        assert!(
            inventory.contains("activate = \". /opt/fleet/torch-venv/bin/activate\""),
            "{inventory}"
        );
        // The test bed has no GPU: init says so and the inventory asks for none.
        assert!(inventory.contains("device = \"cpu\""), "{inventory}");
        assert!(shown.contains("no host has an NVIDIA GPU"), "{shown}");
        // torch is reached through activate alone.
        assert!(!inventory.contains("PATH"), "{inventory}");
        "init"
    }

    /// Step 4, exactly as printed.
    fn install_torch(&self, command: &str) -> &'static str {
        let run = self.shell(command);
        run.assert_code(0);
        for node in ["node1", "node2", "node3"] {
            run.assert_stdout_contains(&format!(
                "{node} | Requirement already satisfied: torch==2.11.0 in /opt/fleet/torch-venv/"
            ));
        }
        "torch"
    }

    /// Step 5: the table shows the venv's torch on every host; only the files are to fix (on hosts
    /// an earlier run of this test left the project on, nothing is).
    fn check(&self, command: &str) -> &'static str {
        let run = self.shell(command);
        // Before the first sync (a fresh host), the files are all there is to fix.
        let fresh = run.code == Some(1);
        if !fresh {
            run.assert_code(0);
        }
        let row = |name: &str| {
            run.stdout
                .lines()
                .find(|l| l.starts_with(&format!("{name} ")))
                .unwrap_or_else(|| panic!("no {name} row:\n{}", run.stdout))
                .to_string()
        };
        assert_eq!(
            row("torch").matches("✓ 2.11.0").count(),
            3,
            "{}",
            run.stdout
        );
        assert_eq!(
            row("activate")
                .matches("✓ . /opt/fleet/torch-venv/bin/activate")
                .count(),
            3
        );
        for name in ["python", "nccl", "disk", "clock", "master port"] {
            assert_eq!(row(name).matches('✓').count(), 3, "{}", run.stdout);
        }
        let errors: Vec<&str> = run
            .stderr
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect();
        assert_eq!(errors.len(), if fresh { 3 } else { 0 }, "{}", run.stderr);
        assert!(
            errors.iter().all(|l| l.contains(": files: ")),
            "{}",
            run.stderr
        );
        "check"
    }

    fn gen_data(&self, command: &str) -> &'static str {
        self.shell(command).assert_code(0);
        let csv = std::fs::read_to_string(self.project.path().join("data/training_data_10000.csv"))
            .unwrap();
        // A header, then rows "id,..." numbered from 0 (a quoted text may hold a newline).
        assert!(csv.starts_with("id,text,label\n"), "{csv:.200}");
        assert!(csv.contains("\n9999,"), "not 10,000 rows");
        "gen-data"
    }

    /// Step 6: fleet-train on the three hosts; progress as a status line, never raw events.
    fn train(&self, command: &str) -> &'static str {
        let run = self.shell(command);
        run.assert_code(0);
        for text in [&run.stdout, &run.stderr] {
            assert!(
                !text.contains("\"event\""),
                "a raw event was shown:\n{text}"
            );
        }
        run.assert_stderr_contains("training: epoch 3/3  step ");
        let accuracy: f64 = run
            .stderr
            .split("training: final validation accuracy ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no final accuracy:\n{}", run.stderr));
        assert!(accuracy > 0.9, "{accuracy}");
        // "fleet run starts every rank at once (start skew is printed)".
        run.assert_stderr_contains(", start skew ");
        let job = self.last_job();
        for file in ["summary.json", "training.svg", "merged.log"] {
            assert!(
                job.join(file).is_file(),
                "{file} missing in {}",
                job.display()
            );
        }
        // The troubleshooting table's `comm_fraction`: in every rank's summary event (kept in
        // the merged log) and as the final table's comm column.
        let log = std::fs::read_to_string(job.join("merged.log")).unwrap();
        let summaries = log
            .lines()
            .filter(|l| l.contains("\"event\":\"summary\"") && l.contains("\"comm_fraction\":"))
            .count();
        assert_eq!(summaries, 3, "{log}");
        run.assert_stderr_contains("samples/s   step ms   comm");
        "train"
    }

    /// Step 7: the model of rank 0's host, byte for byte.
    fn pull(&self, command: &str) -> &'static str {
        let run = self.shell(command);
        run.assert_code(0);
        let files = ["config.json", "model.safetensors", "tokenizer.json"];
        let here = Command::new("sha256sum")
            .args(files)
            .current_dir(self.last_job().join("model"))
            .output()
            .unwrap();
        assert!(here.status.success(), "{}", run.stderr);
        let there = self.tb.ssh(
            "host1",
            &format!("cd fleet/project/model && sha256sum {}", files.join(" ")),
        );
        assert_eq!(String::from_utf8_lossy(&here.stdout), there);
        "pull"
    }

    /// The script's all-reduce on every rank, each line prefixed `[<prefix><rank> node<n>]`;
    /// `expect` is one more line each rank prints.
    fn script(
        &self,
        command: &str,
        prefix: &str,
        epochs: usize,
        expect: Option<&str>,
    ) -> &'static str {
        let run = self.shell(command);
        run.assert_code(0);
        for rank in 0..3 {
            let tag = format!("[{prefix}{rank} node{}] ", rank + 1);
            let lines: Vec<&str> = run.stdout.lines().filter(|l| l.starts_with(&tag)).collect();
            for epoch in 1..=epochs {
                let line = format!(
                    "{tag}epoch {epoch}: rank {rank} of 3 on host{}: all_reduce sum 6",
                    rank + 1
                );
                assert!(lines.contains(&line.as_str()), "{line}:\n{}", run.stdout);
            }
            if let Some(expect) = expect {
                let line = format!("{tag}{expect}");
                assert!(lines.contains(&line.as_str()), "{line}:\n{}", run.stdout);
            }
        }
        match (prefix, expect) {
            ("", _) => "plain",
            (_, None) => "torchrun",
            _ => "accelerate",
        }
    }

    /// The newest run folder.
    fn last_job(&self) -> PathBuf {
        let mut runs: Vec<PathBuf> = std::fs::read_dir(self.project.path().join("runs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        runs.sort();
        runs.pop().expect("a run folder")
    }
}
