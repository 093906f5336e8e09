//! fleet-train: fine-tunes a BERT-family text classifier on every rank of a job, with tch
//! (libtorch) for the model and PyTorch's c10d for the gradients. `main` parses the command
//! line, runs the command and maps failure to exit status 1, with the rank and host in front of
//! every error so merged logs say who failed.
//!
//! - [`cli`]: fleet-train's command line.
//! - [`data`]: the CSV table, the seeded split and the per-rank shards (DistributedSampler's).
//! - [`tokenizer`]: a model's tokenizer, or a WordPiece vocabulary built from the text.
//! - [`model`]: BERT with a classification head, Hugging Face parameter names.
//! - [`optim`]: fused AdamW, the warm-up/decay schedule, gradient clipping.
//! - [`ddp`]: the c10d shim (store, Gloo, NCCL); the trainer's only `unsafe`.
//! - [`powersgd`]: low-rank gradient compression with error feedback (PowerSGD).
//! - [`rank`]: the torchrun environment and the collectives the loop uses.
//! - [`trainer`]: the loop, validation, checkpoints, export and the summary line.
//! - [`checkpoint`]: atomic checkpoints and the exported model directory.
//! - [`gendata`]: the synthetic dataset of the demo and the tests.

mod checkpoint;
mod cli;
mod data;
mod ddp;
mod gendata;
mod model;
mod optim;
mod powersgd;
mod rank;
mod tokenizer;
mod trainer;

use clap::Parser;

use cli::{Cli, Command};
use rank::Rank;

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
            trainer::event(fleet_events::TrainEvent::Summary(summary));
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
