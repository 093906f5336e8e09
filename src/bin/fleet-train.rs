//! fleet-train: parses the command line, runs the command and maps failure to exit status 1,
//! with the rank and host in front of every error so merged logs say who failed.

use clap::Parser;

use fleet::train::cli::{Cli, Command};
use fleet::train::{ddp, gendata, rank::Rank, trainer};

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
        Some(Command::Predict { model, texts, max_len }) => trainer::predict(model, texts, *max_len),
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

fn print_version() {
    println!("fleet-train {}", env!("CARGO_PKG_VERSION"));
    println!("tch 0.24.0, libtorch {}", env!("FLEET_LIBTORCH_VERSION"));
    let devices = tch::Cuda::device_count();
    if tch::Cuda::is_available() {
        println!("cuda available, {devices} device(s)");
    } else {
        println!("cuda not available");
    }
    match ddp::nccl_version() {
        Some(version) => println!("nccl {version}"),
        None => println!("nccl not built in"),
    }
}
