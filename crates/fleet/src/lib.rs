//! fleet: one command on a laptop turns a few GPU PCs into one data-parallel training job.
//!
//! # Layout
//!
//! - [`cli`]: the command line (clap derive); `--help` text lives there.
//! - [`commands`]: one module per subcommand, and [`commands::Fleet`], the resolved global flags.
//! - [`inventory`]: the hosts file (TOML), validated with file:line:column errors.
//! - [`ssh`]: russh connections: targets (with `~/.ssh/config`), host keys, keys, commands.
//! - [`remote`]: the scripts run on hosts (files beside it) and how they reach `sh` there.
//! - [`shell`]: quoting for `sh`, so arguments arrive as typed.
//! - [`sync`]: the project onto every host: manifest, plan (pure), remote side, transfer.
//! - [`preflight`]: `fleet check`'s probe script and its cross-host checks (pure).
//! - [`netperf`]: `fleet net`'s link probe and the all-reduce cost model (pure).
//! - [`launch`]: `fleet run`: rank plan (pure), job folder scripts, log followers, supervisor.
//! - [`output`]: the printer (stdout data, stderr messages), colours, line assembly, sanitising.
//! - [`signals`]: Ctrl-C, SIGTERM and SIGHUP, counted for the whole process.
//! - [`exit_code`]: what the process's exit status means.
//! - [`files`]: local folders created for the user alone.
//!
//! The controller never links libtorch; the trainer (`crates/fleet-train`) does, in a package
//! of its own.

pub mod cli;
pub mod commands;
pub mod exit_code;
pub mod files;
pub mod inventory;
pub mod launch;
pub mod netperf;
pub mod output;
pub mod preflight;
pub mod remote;
pub mod shell;
pub mod signals;
pub mod ssh;
pub mod sync;
