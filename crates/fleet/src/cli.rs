//! The command line, as clap reads it. The `///` comments are the `--help` text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::output::ColorChoice;

/// Turn a few GPU PCs into one training job, from one command on a laptop.
#[derive(Debug, Parser)]
#[command(
    name = "fleet",
    version,
    about,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// The inventory of hosts
    #[arg(short, long, global = true, env = "FLEET_INVENTORY", default_value = crate::inventory::DEFAULT_PATH)]
    pub inventory: PathBuf,
    /// Machine-readable output: one JSON object per line on stdout
    #[arg(long, global = true)]
    pub json: bool,
    /// When to colour the output
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,
    /// Print only data and errors
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Print more about what is being done
    #[arg(short, long, global = true)]
    pub verbose: bool,
    /// Seconds to wait for each host to connect and authenticate
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Trust hosts whose key is not yet in known_hosts and record their keys there
    /// (a changed key is still refused)
    #[arg(long, global = true)]
    pub accept_new_host_keys: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Prove the hosts can train together: versions, GPUs, disk, clock, files, the master port
    Check(CheckArgs),
    /// Write an inventory for some hosts, record their host keys, and try logging in
    Init(InitArgs),
    /// Run a command on every host at once; each output line is prefixed with its host
    Exec(ExecArgs),
    /// Start every rank on every host at once and stream one merged log; stop all when one fails
    Run(RunArgs),
    /// Print a job's logs, merged (the current job by default); -f follows them as they grow
    Logs(LogsArgs),
    /// Show the recent jobs in every host's workdir and the state of each process
    Ps,
    /// Stop a job on every host (the current job by default): SIGTERM, then SIGKILL after a grace period
    Stop(StopArgs),
    /// Make the project folder identical on every host, verified by SHA-256
    Sync(SyncArgs),
    /// Copy files or folders from a host's workdir to the laptop, verified by SHA-256 (by
    /// default the last job's model, from rank 0's host, into runs/<job>/)
    Pull(PullArgs),
    /// Show the hosts of the inventory as fleet will use them (node rank, address, user, ranks)
    Inventory,
    /// Measure the links between the master and every other host, and what they cost training
    Net(NetArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Then measure the links and price the job's all-reduce, as `fleet net` does (its options
    /// apply)
    #[arg(long)]
    pub net: bool,
    #[command(flatten)]
    pub net_args: NetArgs,
}

#[derive(Debug, Args)]
pub struct NetArgs {
    /// Seconds each direction of each link is measured
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
    pub seconds: f64,
    /// The model's parameter count alone, which prices everything but PowerSGD (default: the
    /// model directory the inventory's [run].command names with --model, else BERT-base)
    #[arg(long, value_name = "N")]
    pub params: Option<u64>,
    /// Read the model's shapes from a Hugging Face BERT directory's config.json
    #[arg(long, value_name = "DIR", conflicts_with = "params")]
    pub model: Option<std::path::PathBuf>,
    /// Milliseconds one GPU takes for one training step (default: an RTX 4060 Ti's BERT-base
    /// step, batch 32, sequence 128, about 300 ms)
    #[arg(long, value_name = "MS", default_value_t = 300.0)]
    pub step_ms: f64,
    /// Measure every pair of hosts, not only the master with each other host
    #[arg(long)]
    pub all_pairs: bool,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Join the words into one line for the host's `sh`, so pipes and `&&` work (a single
    /// argument with spaces in it is taken so anyway; otherwise every argument arrives exactly
    /// as given)
    #[arg(long)]
    pub shell: bool,
    /// Run without the hosts' `activate` line (to create the environment it activates)
    #[arg(long)]
    pub no_activate: bool,
    /// The command and its arguments, after `--`
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// Files or folders, relative to the host's workdir (default: the `--output` of the last
    /// job's fleet-train command, or `model`)
    pub paths: Vec<String>,
    /// The host to copy from (default: the first host, where rank 0 runs)
    #[arg(long, value_name = "HOST")]
    pub from: Option<String>,
    /// The local folder the paths land in, keeping their relative paths (default:
    /// runs/<job>/ of the host's last job, or the current folder when it has none)
    #[arg(long, value_name = "DIR")]
    pub to: Option<std::path::PathBuf>,
}

#[derive(Debug, Default, Args)]
pub struct SyncArgs {
    /// Print what would be sent, created and removed on each host, and change nothing
    #[arg(long, conflicts_with = "verify")]
    pub dry_run: bool,
    /// Re-hash every file on every host and list the files that differ from the local ones
    #[arg(long)]
    pub verify: bool,
    /// Remove files on the hosts that are not in the project and that an earlier sync put
    /// there (anything else, and excluded paths, are kept); refused while a job runs. On a
    /// terminal it lists them and asks first
    #[arg(long)]
    pub delete: bool,
    /// With --delete: remove without asking
    #[arg(long, short = 'y', requires = "delete")]
    pub yes: bool,
    /// Sync into a workdir that holds files but was never fleet's (no .fleet folder), keeping
    /// what is there; without it such a workdir is refused
    #[arg(long)]
    pub adopt: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Start one `torchrun` per host (for scripts written for torch.distributed) instead of
    /// the command once per rank
    #[arg(long, conflicts_with = "accelerate")]
    pub torchrun: bool,
    /// Start one `accelerate launch` per host
    #[arg(long)]
    pub accelerate: bool,
    /// Do not sync the project first
    #[arg(long)]
    pub no_sync: bool,
    /// Do not run `fleet check` first
    #[arg(long)]
    pub no_check: bool,
    /// Seconds between SIGTERM and SIGKILL when stopping the job
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub grace: u64,
    /// Prefix each line with the seconds since the job started
    #[arg(long)]
    pub timestamps: bool,
    /// Start the job, print its id and return; `fleet logs -f`, `fleet ps` and `fleet stop`
    /// attach to it later (a detached job is not stopped when one of its ranks fails)
    #[arg(long)]
    pub detach: bool,
    /// Restart the whole job up to N times when a rank fails or a host is lost: after the stop,
    /// the hosts are checked again and every rank starts anew with FLEET_RESTART_COUNT set
    /// (fleet-train then resumes from its last checkpoint)
    #[arg(long, value_name = "N", default_value_t = 0, conflicts_with = "detach")]
    pub max_restarts: u32,
    /// Seconds to wait before a restart
    #[arg(long, value_name = "SECONDS", default_value_t = 3)]
    pub restart_delay: u64,
    /// Restart without the hosts that can no longer be reached, as long as at least M remain
    /// (default: every host is needed)
    #[arg(long, value_name = "M")]
    pub min_hosts: Option<usize>,
    /// The command and its arguments (default: [run].command of the inventory)
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The job id (default: the current job of the first host)
    pub job: Option<String>,
    /// Keep following until every process has ended
    #[arg(short, long)]
    pub follow: bool,
    /// Only this rank (or `n1` for node 1's launcher)
    #[arg(long, value_name = "RANK")]
    pub rank: Option<String>,
    /// Every line as the ranks wrote it, fleet-train's JSON events included
    #[arg(long)]
    pub raw: bool,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// The job id (default: the current job on each host)
    pub job: Option<String>,
    /// Seconds between SIGTERM and SIGKILL
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub grace: u64,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// The hosts, in node-rank order: addresses or ~/.ssh/config aliases, with :PORT if not 22
    #[arg(
        long,
        required = true,
        value_delimiter = ',',
        value_name = "HOST,HOST,..."
    )]
    pub hosts: Vec<String>,
    /// The login on every host (default: ~/.ssh/config's, else yours)
    #[arg(long)]
    pub user: Option<String>,
    /// The private key to log in with (default: ~/.ssh/config, ssh-agent, ~/.ssh/id_*)
    #[arg(long, value_name = "PATH")]
    pub identity: Option<PathBuf>,
    /// A shell line every host runs before fleet's commands, to reach torch there: a venv
    /// (". ~/venv/bin/activate"), conda's hook, "module load ..."
    #[arg(long, value_name = "LINE")]
    pub activate: Option<String>,
    /// Replace an existing inventory
    #[arg(long)]
    pub force: bool,
}
