//! The subcommands. Each takes the resolved global settings ([`Fleet`]) and its own arguments,
//! and returns the exit code it decided on; errors it cannot place on a host come back as
//! `anyhow` errors for `main` to print.

mod check;
mod exec;
mod init;
mod inventory;
mod jobs;
mod net;
mod pull;
mod run;
mod sync;
mod table;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use crate::cli::{Cli, Command, GlobalArgs};
use crate::exit_code::{ExitCode, UsageError};
use crate::inventory::{Inventory, InventoryError, expand_tilde};
use crate::output::Printer;
use crate::signals::Interrupts;
use crate::ssh::{
    ConnectOptions, HostKeyPolicy, Jumps, Keyring, Session, SshConfig, SshError, Target,
};

/// The global flags, resolved into what commands use.
pub struct Fleet {
    pub printer: Printer,
    global: GlobalArgs,
    /// Client keys, read once per process: `fleet run` connects for its sync, its check and the
    /// job, and an encrypted key must ask for its passphrase once.
    keyring: tokio::sync::OnceCell<Arc<Keyring>>,
    /// ~/.ssh/config warnings already shown.
    warned: std::sync::Mutex<Vec<String>>,
    /// Ctrl-C, SIGTERM and SIGHUP, counted since fleet started.
    pub interrupts: Interrupts,
}

impl Fleet {
    /// Resolves the global flags; starts counting signals, so it runs inside the runtime.
    pub fn new(global: GlobalArgs) -> Self {
        let printer = Printer::new(global.color, global.json, global.quiet, global.verbose);
        Fleet {
            printer,
            global,
            keyring: tokio::sync::OnceCell::new(),
            warned: Default::default(),
            interrupts: Interrupts::install(),
        }
    }

    /// Runs `work` unless a stop signal comes first: then it is dropped (its connections
    /// close) and the answer is [`ExitCode::Interrupted`].
    pub async fn unless_interrupted<T>(
        &self,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Result<std::result::Result<T, ExitCode>> {
        tokio::select! {
            result = work => result.map(Ok),
            () = self.interrupts.any() => {
                self.printer.warn("interrupted");
                Ok(Err(ExitCode::Interrupted))
            }
        }
    }

    /// Where the inventory is (`-i`, FLEET_INVENTORY or the default).
    pub fn inventory_path(&self) -> &std::path::Path {
        &self.global.inventory
    }

    pub fn inventory(&self) -> Result<Inventory, InventoryError> {
        Inventory::load(&self.global.inventory)
    }

    /// Where each host is reached, after `~/.ssh/config`; says once per run what in it fleet
    /// does not apply.
    pub fn targets(&self, inventory: &Inventory) -> Result<Vec<Target>> {
        let config = SshConfig::load_user()?;
        let mut warnings = Vec::new();
        let targets = inventory
            .hosts
            .iter()
            .map(|h| Target::resolve(inventory, h, &config, &mut warnings))
            .collect::<Result<Vec<Target>, _>>()?;
        let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        for warning in warnings {
            if !warned.contains(&warning) {
                self.printer.warn(&warning);
                warned.push(warning);
            }
        }
        Ok(targets)
    }

    /// Connection settings for this run; reads the client keys (asking for passphrases now).
    pub async fn connect_options(
        &self,
        inventory: &Inventory,
        targets: &[Target],
    ) -> Result<ConnectOptions> {
        let timeout = self.global.connect_timeout;
        if !(timeout.is_finite() && timeout > 0.0 && timeout <= 3600.0) {
            return Err(UsageError(format!(
                "--connect-timeout {timeout}: expected seconds between 0 and 3600"
            ))
            .into());
        }
        let interactive = self.printer.can_prompt();
        Ok(ConnectOptions {
            timeout: Duration::from_secs_f64(timeout),
            keepalive: Duration::from_secs(5),
            keepalive_max: 3,
            host_keys: Arc::new(HostKeyPolicy::new(
                inventory
                    .known_hosts
                    .clone()
                    .unwrap_or_else(|| expand_tilde("~/.ssh/known_hosts")),
                self.global.accept_new_host_keys,
            )),
            keyring: self
                .keyring
                .get_or_init(|| async {
                    let every: Vec<&Target> = targets.iter().flat_map(Target::all_hops).collect();
                    Arc::new(Keyring::load(&every, interactive).await)
                })
                .await
                .clone(),
            jumps: Jumps::default(),
        })
    }
}

impl Fleet {
    /// Connects to every host at once; one result per host, in inventory order.
    pub async fn connect_all(
        &self,
        inventory: &Inventory,
    ) -> Result<(Vec<Target>, Vec<Result<Session, SshError>>)> {
        let targets = self.targets(inventory)?;
        let options = self.connect_options(inventory, &targets).await?;
        let sessions =
            futures::future::join_all(targets.iter().map(|t| Session::connect(t, &options))).await;
        Ok((targets, sessions))
    }
}

/// Runs the command line and returns the exit code. A stop signal ends any command at once,
/// but `fleet run`, which stops its job first (see [`crate::launch::supervise`]).
pub async fn run(cli: Cli) -> Result<ExitCode> {
    let fleet = Fleet::new(cli.global);
    match cli.command {
        Command::Run(args) => run::run(&fleet, &args).await,
        command => {
            let ended = fleet.unless_interrupted(dispatch(&fleet, command)).await?;
            Ok(ended.unwrap_or_else(|code| code))
        }
    }
}

async fn dispatch(fleet: &Fleet, command: Command) -> Result<ExitCode> {
    match command {
        Command::Check(args) => check::run(fleet, &args).await,
        Command::Init(args) => init::run(fleet, &args).await,
        Command::Exec(args) => exec::run(fleet, &args).await,
        Command::Logs(args) => jobs::logs(fleet, &args).await,
        Command::Ps => jobs::ps(fleet).await,
        Command::Stop(args) => jobs::stop(fleet, &args).await,
        Command::Run(args) => run::run(fleet, &args).await,
        Command::Sync(args) => sync::run(fleet, &args).await,
        Command::Pull(args) => pull::run(fleet, &args).await,
        Command::Inventory => inventory::run(fleet),
        Command::Net(args) => net::run(fleet, &args).await,
    }
}
