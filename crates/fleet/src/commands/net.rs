//! `fleet net`: the bandwidth (each way alone and both at once) and round trip between the master
//! and every other host (every pair with `--all-pairs`), measured one link at a time with python3
//! on the hosts, and what that means for training: the all-reduce time per step and the speed-up
//! over one GPU for a few settings.

use anyhow::{Context, Result, bail};

use super::{Fleet, table};
use crate::cli::NetArgs;
use crate::exit_code::{ExitCode, UsageError};
use crate::inventory::Inventory;
use crate::netperf::{self, Link, Measured, Model, ModelSize};
use crate::output::Stream;
use crate::remote::{self, Script};
use crate::ssh::ExitStatus;

pub async fn run(fleet: &Fleet, args: &NetArgs) -> Result<ExitCode> {
    let inventory = fleet.inventory()?;
    if inventory.hosts.len() < 2 {
        return Err(UsageError(format!(
            "fleet net needs two hosts or more; {} has one",
            inventory.path.display()
        ))
        .into());
    }
    let model = model_size(args, &inventory)?;
    let (targets, connected) = fleet.connect_all(&inventory).await?;
    // Every host must answer: one that does not is reported, and the sessions opened to the
    // others are closed before fleet says so.
    let mut sessions = Vec::with_capacity(connected.len());
    let mut unreachable = None;
    for result in connected {
        match result {
            Ok(session) => sessions.push(session),
            Err(e) => unreachable = unreachable.or(Some(e)),
        }
    }
    if let Some(e) = unreachable {
        for session in sessions {
            session.close().await;
        }
        fleet.printer.error(&format!("{e}; nothing was measured"));
        return Ok(ExitCode::Unreachable);
    }
    let master_addr = inventory
        .master_addr
        .clone()
        .unwrap_or_else(|| targets[0].addr.clone());
    let measured = measure_all(fleet, &inventory, &sessions, &targets, &master_addr, args).await;
    for session in sessions {
        session.close().await;
    }
    let links = measured?;

    // A ring all-reduce sends and receives on every link at once: the rate with both
    // directions busy is the one it gets.
    let slowest = links
        .iter()
        .min_by(|a, b| a.both_ways_mbit_per_s.total_cmp(&b.both_ways_mbit_per_s))
        .context("no link was measured")?;
    let rtt = links.iter().map(|l| l.rtt_ms).fold(0.0, f64::max);
    let estimate = netperf::estimate(
        &model,
        inventory.world_size() as usize,
        slowest.both_ways_mbit_per_s,
        rtt,
        args.step_ms,
    );

    if fleet.printer.json() {
        for link in &links {
            let mut value = serde_json::to_value(link)?;
            value["type"] = "link".into();
            fleet.printer.record(&value);
        }
        let mut value = serde_json::to_value(&estimate)?;
        value["type"] = "estimate".into();
        fleet.printer.record(&value);
        return Ok(ExitCode::Success);
    }
    let text = render(&links, slowest, &estimate);
    fleet.printer.write(Stream::Stdout, &text);
    Ok(ExitCode::Success)
}

/// The links, the estimate and the advice, as tables for a terminal.
fn render(links: &[Link], slowest: &Link, estimate: &netperf::Estimate) -> String {
    let rows: Vec<Vec<String>> = links
        .iter()
        .map(|l| {
            vec![
                l.from.clone(),
                l.to.clone(),
                format!("{:.0}", l.mbit_per_s),
                format!("{:.0}", l.both_ways_mbit_per_s),
                format!("{:.2}", l.rtt_ms),
            ]
        })
        .collect();
    let mut text = table::render(&["FROM", "TO", "MBIT/S", "BOTH WAYS", "RTT MS"], &rows);
    text.push_str(&format!(
        "\nall-reduce of {:.1} M parameters over {} ranks, slowest link {:.0} Mbit/s both ways ({} -> {}):\n\
         \x20 fp32 {:.0} ms, bf16 {:.0} ms per step; one step computes in {:.0} ms (--step-ms)\n",
        estimate.params as f64 / 1e6,
        estimate.ranks,
        slowest.both_ways_mbit_per_s,
        slowest.from,
        slowest.to,
        estimate.allreduce_fp32_ms,
        estimate.allreduce_bf16_ms,
        estimate.step_ms
    ));
    let settings: Vec<Vec<String>> = estimate
        .settings
        .iter()
        .map(|s| {
            vec![
                format!("{}", s.grad_accum),
                format!("{:.2}x", s.speedup_fp32),
                format!("{:.2}x", s.speedup_bf16),
            ]
        })
        .collect();
    text.push_str(&table::render(
        &["GRAD-ACCUM", "SPEED-UP FP32", "SPEED-UP BF16"],
        &settings,
    ));
    if estimate.powersgd.is_empty() {
        text.push_str(
            "PowerSGD: not priced without the model's shapes (--model DIR, not --params)\n",
        );
    } else {
        let rows: Vec<Vec<String>> = estimate
            .powersgd
            .iter()
            .map(|row| {
                vec![
                    format!("{}", row.rank),
                    format!("{:.2}", row.bytes_per_step as f64 / 1e6),
                    format!("{:.0}", row.allreduce_ms),
                    format!("{:.2}x", row.speedup),
                ]
            })
            .collect();
        text.push_str(&table::render(
            &["POWERSGD-RANK", "MB/STEP", "ALL-REDUCE MS", "SPEED-UP"],
            &rows,
        ));
    }
    text.push_str(&format!("recommended: {}\n", estimate.recommendation));
    text
}

/// Every link `fleet net` measures: the master with every other host; with --all-pairs, every
/// host with each after it too.
async fn measure_all(
    fleet: &Fleet,
    inventory: &Inventory,
    sessions: &[crate::ssh::Session],
    targets: &[crate::ssh::Target],
    master_addr: &str,
    args: &NetArgs,
) -> Result<Vec<Link>> {
    let servers = if args.all_pairs {
        sessions.len() - 1
    } else {
        1
    };
    let mut links = Vec::new();
    for (server, target) in targets.iter().enumerate().take(servers) {
        let address = if server == 0 {
            master_addr
        } else {
            &target.addr
        };
        links
            .extend(measure_from(fleet, inventory, sessions, server, address, args.seconds).await?);
    }
    Ok(links)
}

/// Measures the links between host `server` (listening on `address` at the master port) and
/// each host after it, one at a time: both directions of each.
async fn measure_from(
    fleet: &Fleet,
    inventory: &Inventory,
    sessions: &[crate::ssh::Session],
    server: usize,
    address: &str,
    seconds: f64,
) -> Result<Vec<Link>> {
    let (hosts, port) = (&inventory.hosts, inventory.master_port);
    let name = &hosts[server].name;
    let activate = |host: &crate::inventory::Host| host.activate.clone().unwrap_or_default();
    let serve = Script::new(remote::NETPERF).args([
        activate(&hosts[server]),
        remote::NETPERF_PY.to_string(),
        "serve".into(),
        port.to_string(),
        (sessions.len() - 1 - server).to_string(),
        seconds.to_string(),
    ]);
    let mut listening = sessions[server].start(&serve).await?;
    match listening.next_line().await {
        Some(line) if line.trim() == "listening" => {}
        other => bail!(
            "{name}: the measuring server did not start on port {port}: {} (is the port in use, or python3 missing?)",
            other.unwrap_or_default().trim()
        ),
    }
    let mut links = Vec::new();
    for (host, session) in hosts.iter().zip(sessions).skip(server + 1) {
        fleet
            .printer
            .info(&format!("measuring {name} <-> {} ...", host.name));
        let measure = Script::new(remote::NETPERF).args([
            activate(host),
            remote::NETPERF_PY.to_string(),
            "measure".into(),
            address.to_string(),
            port.to_string(),
            seconds.to_string(),
        ]);
        let (status, out, err) = session.capture(&measure).await?;
        if status != ExitStatus::Code(0) {
            bail!(
                "{}: could not measure the link to {address}:{port}: {}",
                host.name,
                String::from_utf8_lossy(&err).trim()
            );
        }
        let measured: Measured = serde_json::from_slice(&out).with_context(|| {
            format!(
                "{}: unexpected answer {:?}",
                host.name,
                String::from_utf8_lossy(&out)
            )
        })?;
        links.push(Link {
            from: name.clone(),
            to: host.name.clone(),
            mbit_per_s: measured.down_mbit,
            both_ways_mbit_per_s: measured.both_down_mbit,
            rtt_ms: measured.rtt_ms,
        });
        links.push(Link {
            from: host.name.clone(),
            to: name.clone(),
            mbit_per_s: measured.up_mbit,
            both_ways_mbit_per_s: measured.both_up_mbit,
            rtt_ms: measured.rtt_ms,
        });
    }
    drop(listening);
    Ok(links)
}

/// The model: --params (a count alone), --model's config.json, the config.json of the model
/// directory the job's `[run].command` names with `--model` (in the project folder), or BERT-base.
fn model_size(args: &NetArgs, inventory: &Inventory) -> Result<ModelSize> {
    if let Some(params) = args.params {
        return Ok(ModelSize::Parameters(params));
    }
    let model = match (&args.model, job_model(inventory)) {
        (Some(dir), _) => model_from_config(dir)?,
        (None, Some(dir)) if dir.join("config.json").is_file() => model_from_config(&dir)?,
        _ => Model::bert_base(),
    };
    Ok(ModelSize::Shapes(model))
}

/// The `--model DIR` (or `--model=DIR`) of the inventory's `[run].command`, in the project folder.
fn job_model(inventory: &Inventory) -> Option<std::path::PathBuf> {
    let command = inventory.run_command.as_ref()?;
    let dir = command.iter().enumerate().find_map(|(i, word)| {
        if word == "--model" {
            command.get(i + 1).cloned()
        } else {
            word.strip_prefix("--model=").map(String::from)
        }
    })?;
    Some(inventory.sync.source.join(dir))
}

/// The Hugging Face BERT model in `dir`, from its config.json.
fn model_from_config(dir: &std::path::Path) -> Result<Model> {
    let path = dir.join("config.json");
    let text = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let config: serde_json::Value =
        serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let field = |name: &str, default: Option<u64>| {
        config
            .get(name)
            .and_then(serde_json::Value::as_u64)
            .or(default)
            .with_context(|| format!("{}: no {name}", path.display()))
    };
    Ok(Model::bert(
        field("vocab_size", None)?,
        field("hidden_size", None)?,
        field("num_hidden_layers", None)?,
        field("intermediate_size", None)?,
        field("max_position_embeddings", Some(512))?,
        field("num_labels", Some(2))?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn args() -> NetArgs {
        NetArgs {
            seconds: 1.0,
            params: None,
            model: None,
            step_ms: 300.0,
            all_pairs: false,
        }
    }

    #[test]
    fn the_model_is_the_one_the_job_fine_tunes_unless_given() {
        let project = tempfile::tempdir().unwrap();
        let model = project.path().join("models/mini");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(
            model.join("config.json"),
            r#"{"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "intermediate_size": 1536}"#,
        )
        .unwrap();
        let mini = ModelSize::Shapes(Model::bert(30522, 384, 6, 1536, 512, 2));
        let inventory = |command: &str| {
            let text = format!(
                "[sync]\nsource = \"{}\"\n[run]\ncommand = {command}\n[[host]]\naddress = \"a\"\n",
                project.path().display()
            );
            Inventory::from_toml(Path::new("fleet.toml"), &text).unwrap()
        };
        for command in [
            r#"["./fleet-train", "--model", "models/mini", "--data", "d.csv"]"#,
            r#"["python3", "train.py", "--model=models/mini"]"#,
        ] {
            assert_eq!(
                model_size(&args(), &inventory(command)).unwrap(),
                mini,
                "{command}"
            );
        }
        let base = ModelSize::Shapes(Model::bert_base());
        let no_model = inventory(r#"["./fleet-train", "--data", "d.csv"]"#);
        assert_eq!(model_size(&args(), &no_model).unwrap(), base);
        let elsewhere = inventory(r#"["./fleet-train", "--model", "not/here"]"#);
        assert_eq!(model_size(&args(), &elsewhere).unwrap(), base);
        let given = NetArgs {
            params: Some(7),
            ..args()
        };
        assert_eq!(
            model_size(&given, &inventory(r#"["x", "--model", "models/mini"]"#)).unwrap(),
            ModelSize::Parameters(7)
        );
    }
}
