//! The exit codes of `fleet`, documented in the README.

/// A mistake in what the user asked for (the command line, the inventory, the project folder):
/// nothing was run, and fleet exits 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Why `fleet` exits the way it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitCode {
    /// Everything asked for succeeded on every host.
    Success,
    /// A command failed on at least one host (non-zero exit, or killed by a signal), or fleet
    /// itself failed.
    Failure,
    /// Bad command line or inventory: nothing was run.
    Usage,
    /// At least one host could not be reached, its host key was refused, or authentication failed.
    Unreachable,
    /// Stopped by Ctrl-C.
    Interrupted,
    /// A code passed through from elsewhere: `fleet run` exits with the failed rank's own code.
    Exact(u8),
}

impl ExitCode {
    /// The graver of two outcomes, for a command that collects one per host.
    pub fn max_with(self, other: ExitCode) -> ExitCode {
        let rank = |c: ExitCode| match c {
            ExitCode::Success => 0,
            ExitCode::Failure => 1,
            ExitCode::Unreachable => 2,
            ExitCode::Usage => 3,
            ExitCode::Interrupted => 4,
            ExitCode::Exact(_) => 5,
        };
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }

    pub fn code(self) -> u8 {
        match self {
            ExitCode::Success => 0,
            ExitCode::Failure => 1,
            ExitCode::Usage => 2,
            ExitCode::Unreachable => 3,
            ExitCode::Interrupted => 130,
            ExitCode::Exact(code) => code,
        }
    }
}

impl From<ExitCode> for std::process::ExitCode {
    fn from(code: ExitCode) -> Self {
        std::process::ExitCode::from(code.code())
    }
}
