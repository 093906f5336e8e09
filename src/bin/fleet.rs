//! The `fleet` controller: parse the command line, run the command, map the outcome to an exit code.

use clap::Parser;
use fleet::cli::Cli;
use fleet::exit_code::ExitCode;
use fleet::inventory::InventoryError;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::Failure.into();
        }
    };
    match runtime.block_on(fleet::commands::run(cli)) {
        Ok(code) => code.into(),
        Err(error) => {
            let code = if error.downcast_ref::<InventoryError>().is_some() { ExitCode::Usage } else { ExitCode::Failure };
            let label = console::style("error:").red().bold().for_stderr();
            eprintln!("{label} {error:#}");
            code.into()
        }
    }
}
