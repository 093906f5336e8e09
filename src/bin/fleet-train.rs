//! fleet-train: parses the command line, runs the command and maps failure to exit status 1,
//! with the rank and host in front of every error so merged logs say who failed.

// The trainer's modules are compiled into this binary only, not into the library the
// controller links: `fleet` must never load libtorch, even in a build with feature `train`.
#[path = "../train/mod.rs"]
mod train;

// The c10d shim that build.rs compiles is attached to the library crate: linking the library
// brings it in (the controller, which references none of it, links none of it).
extern crate fleet;

use clap::Parser;

use train::cli::{Cli, Command};
use train::{ddp, gendata, rank::Rank, trainer};

fn main() {
    ddp::init_logging();
    let cli = Cli::parse();
    if cli.version {
        print_version();
        return;
    }
    let result = match &cli.command {
        Some(Command::GenData { rows, out, seed }) => gendata::write(out, *rows, *seed)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", out.display())),
        Some(Command::Predict {
            model,
            texts,
            max_len,
        }) => trainer::predict(model, texts, *max_len),
        None => train(&cli),
    };
    if let Err(error) = result {
        eprintln!("fleet-train: {error:#}");
        std::process::exit(1);
    }
}

fn train(cli: &Cli) -> anyhow::Result<()> {
    let rank = Rank::from_env()?;
    match trainer::run(&cli.train, &rank) {
        Ok(summary) => {
            println!("{}", serde_json::to_string(&summary)?);
            Ok(())
        }
        Err(error) => Err(error.context(format!("rank {} ({})", rank.rank, rank.host))),
    }
}

/// The first line holds what must match on every host (`fleet check` compares it); the rest
/// describes this host's GPUs.
fn print_version() {
    let nccl = ddp::nccl_version().unwrap_or_else(|| "not built in".into());
    println!(
        "fleet-train {} (libtorch {}, tch 0.24.0, nccl {nccl})",
        env!("CARGO_PKG_VERSION"),
        env!("FLEET_LIBTORCH_VERSION")
    );
    let names = ddp::cuda_device_names();
    if tch::Cuda::is_available() {
        println!("cuda: {} device(s)", tch::Cuda::device_count());
    } else {
        println!("cuda: not available");
    }
    for (index, name) in names.iter().enumerate() {
        println!("cuda:{index} {name}");
    }
}
