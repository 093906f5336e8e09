//! fleet-train's command line (clap derive); the `///` comments are its --help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use super::model::Preset;

/// Fine-tunes a BERT-family text classifier on every rank of a job, gradients averaged through
/// PyTorch's c10d (NCCL on GPUs, Gloo on CPUs).
///
/// Ranks read RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT as torchrun sets them
/// (`fleet run` sets them too); without them it trains alone. Progress, validation and a final
/// summary are printed as JSON lines on stdout; errors go to stderr with the rank and host.
#[derive(Debug, Parser)]
#[command(name = "fleet-train", version = None, disable_version_flag = true)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Cli {
    /// Print fleet-train's, tch's and libtorch's versions, CUDA devices and the NCCL version.
    #[arg(long)]
    pub version: bool,

    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a deterministic synthetic labelled text table (English and Korean) as CSV.
    GenData {
        /// Number of data rows.
        #[arg(long, default_value_t = 10_000)]
        rows: usize,
        /// Where to write it.
        #[arg(long, default_value = "data/training_data_10000.csv")]
        out: PathBuf,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Print the logits of a trained model (a Hugging Face directory) for each text, as JSON.
    Predict {
        /// The model directory (config.json, model.safetensors, tokenizer.json).
        #[arg(long)]
        model: PathBuf,
        /// A text to classify (repeat for several).
        #[arg(long = "text", required = true)]
        texts: Vec<String>,
        #[arg(long, default_value_t = 128)]
        max_len: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Precision {
    Fp32,
    /// Double precision: slow, for checking that sharded training equals one process.
    Fp64,
    /// bfloat16 autocast (on CUDA, or on a CPU with bfloat16 support).
    Bf16,
    /// float16 autocast with dynamic loss scaling.
    Fp16,
}

/// The dtype gradients travel in during the all-reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WireDtype {
    /// As computed (float32).
    Fp32,
    /// bfloat16: half the bytes, float32's range.
    Bf16,
    /// float16: half the bytes, less range.
    Fp16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceChoice {
    /// CUDA device LOCAL_RANK when CUDA is available, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// NCCL on CUDA, Gloo on the CPU.
    Auto,
    Gloo,
    Nccl,
}

#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// The CSV file (header row; RFC 4180 quoting; UTF-8). Required to train.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Column holding the text.
    #[arg(long, default_value = "text")]
    pub text_column: String,
    /// Column holding the label (strings or integers).
    #[arg(long, default_value = "label")]
    pub label_column: String,

    /// Fine-tune a Hugging Face model directory (config.json, model.safetensors, tokenizer.json
    /// or vocab.txt).
    #[arg(long, conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    /// Train a model of this size from scratch, with a vocabulary built from the training text.
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// Vocabulary size when training from scratch.
    #[arg(long, default_value_t = 8000)]
    pub vocab_size: usize,
    /// Longest token sequence; longer texts are cut.
    #[arg(long, default_value_t = 128)]
    pub max_len: usize,
    /// Dropout of the hidden layers and attention (default: the model's own, 0.1 from scratch).
    #[arg(long)]
    pub dropout: Option<f64>,

    #[arg(long, default_value_t = 3)]
    pub epochs: u64,
    /// Stop after this many optimizer steps in all. The learning-rate schedule still spans
    /// --epochs, so a later --resume continues it exactly.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Rows per rank per micro-batch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step; gradients are all-reduced once per step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Peak learning rate (default 5e-5 with --model, 1e-3 from scratch).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Fraction of the steps spent warming the learning rate up from 0.
    #[arg(long, default_value_t = 0.1)]
    pub warmup: f64,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Gradients are scaled down to this global L2 norm (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Fraction of the rows held out for validation (a seeded split).
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
    /// Seeds the split, the shuffles, the initialisation and dropout.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,

    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    pub precision: Precision,
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// Compress gradients to this dtype for the all-reduce (halves the bytes on the network).
    #[arg(long, value_enum, default_value_t = WireDtype::Fp32)]
    pub allreduce_dtype: WireDtype,
    /// Compress gradient matrices to rank-R factors with PowerSGD (error feedback, warm-started
    /// power iteration; PyTorch's powerSGD_hook): 0 is off. Vectors and matrices the factors
    /// would not shrink still travel whole.
    #[arg(long, value_name = "R", default_value_t = 0)]
    pub powersgd_rank: usize,
    /// Optimizer steps averaged plainly before PowerSGD starts (PyTorch's start_powerSGD_iter).
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub powersgd_warmup_steps: u64,
    /// Gradient bucket size for the all-reduce, in MiB (fractions allowed).
    #[arg(long, default_value_t = 25.0)]
    pub bucket_mb: f64,
    /// All-reduce the gradients after the backward pass instead of during it (the step then
    /// reports how long it waited for the slowest rank apart from the network's time).
    #[arg(long)]
    pub no_overlap: bool,

    /// Where rank 0 keeps checkpoints.
    #[arg(long, default_value = "checkpoints")]
    pub checkpoint_dir: PathBuf,
    /// Write a checkpoint every N optimizer steps (0: only at the end). Default: only at the
    /// end, or every 50 steps when fleet restarts the job on failure (FLEET_MAX_RESTARTS > 0),
    /// so that a restart has something to resume.
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Continue from the last checkpoint in --checkpoint-dir, whichever job wrote it. A restart
    /// by `fleet run --max-restarts` continues by itself, from its own job's checkpoints only.
    #[arg(long)]
    pub resume: bool,
    /// Continue from the last checkpoint in DIR (another job's, say); new checkpoints still go
    /// to --checkpoint-dir.
    #[arg(long, value_name = "DIR", conflicts_with = "resume")]
    pub resume_from: Option<PathBuf>,
    /// Where rank 0 writes the trained model as a Hugging Face directory.
    #[arg(long, default_value = "model")]
    pub output: PathBuf,

    /// Print progress every N optimizer steps.
    #[arg(long, default_value_t = 10)]
    pub log_every: u64,
    /// Seconds to wait for all ranks to meet at MASTER_ADDR:MASTER_PORT.
    #[arg(long, default_value_t = 60)]
    pub connect_timeout: u64,
    /// Seconds a collective may take before the job is declared broken (a peer lost).
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}
