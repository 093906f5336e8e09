//! The `fleet` controller: parse the command line, run the command, map the outcome to an exit code.

use clap::Parser;
use fleet::cli::Cli;
use fleet::exit_code::{ExitCode, UsageError};
use fleet::inventory::InventoryError;
use fleet::sync::ManifestError;

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::Failure.into();
        }
    };
    match runtime.block_on(fleet::commands::run(cli)) {
        Ok(code) => code.into(),
        Err(error) => {
            // Mistakes in what the user gave (inventory, project folder) mean nothing was run.
            let usage = error.downcast_ref::<InventoryError>().is_some()
                || error.downcast_ref::<ManifestError>().is_some()
                || error.downcast_ref::<UsageError>().is_some();
            let code = if usage {
                ExitCode::Usage
            } else {
                ExitCode::Failure
            };
            let label = console::style("error:").red().bold().for_stderr();
            // The chain may quote a host (its stderr, a path it sent).
            let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let text = format!("{error:#}");
            eprintln!("{label} {}", fleet::output::sanitize_text(&text, terminal));
            code.into()
        }
    }
}

/// A sync moves each file through many short-lived buffers of a few hundred KiB (chunks read,
/// SFTP packets). glibc gives allocations that large their own `mmap` and unmaps them when
/// freed, so every one costs page faults and zeroed pages; kept in the heap instead, freed
/// buffers are reused as they are.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; it runs before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}
