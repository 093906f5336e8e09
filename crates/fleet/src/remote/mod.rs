//! Scripts that run on hosts, and how they reach `sh` there intact.
//!
//! sshd hands the command line of an exec to the user's login shell, and login shells do not
//! agree on quoting: fish reads `\'` inside single quotes as an escape, tcsh expands `!`. So
//! the command line fleet sends is always the same few words that every shell reads alike,
//! `sh -c 'eval "$(head -c N)"' fleet`, and the script itself arrives on the channel's stdin:
//! first its arguments as `set -- 'a' 'b'` (quoted for `sh`, and read by `sh` alone), then its
//! text. `head -c` reads exactly those N bytes, so whatever fleet sends after them is the
//! script's own stdin (a NUL-separated list of paths, a lock held while stdin stays open).
//!
//! Scripts are files beside this module (`*.sh`, included at build time) and take their values
//! as positional arguments; nothing is spliced into their text.

use std::borrow::Cow;

use crate::shell::quote;

/// Functions every script can use (`workdir_of`, `enter_workdir`).
const PRELUDE: &str = include_str!("prelude.sh");

/// `print_state`: a workdir's saved manifest and listing, for a sync.
pub const SYNC_STATE: &str = include_str!("sync_state.sh");
pub const SYNC_PEEK: &str = include_str!("sync_peek.sh");
pub const SYNC_LOCK: &str = include_str!("sync_lock.sh");
pub const SYNC_BATCH: &str = include_str!("sync_batch.sh");
pub const SYNC_HASH: &str = include_str!("sync_hash.sh");
pub const PULL_LIST: &str = include_str!("pull_list.sh");

/// Functions that find a job's processes (`marked_pids`, `starttime`, `state`).
pub const JOB_LIB: &str = include_str!("job_lib.sh");
pub const JOB_START: &str = include_str!("job_start.sh");
pub const JOB_WRAPPER: &str = include_str!("job_wrapper.sh");
pub const JOB_SIGNAL: &str = include_str!("job_signal.sh");
pub const JOB_STATUS: &str = include_str!("job_status.sh");
pub const EXEC: &str = include_str!("exec.sh");
/// `interface_to`: the interface that reaches an address.
pub const NET_LIB: &str = include_str!("net_lib.sh");
pub const INTERFACE: &str = include_str!("interface.sh");
pub const DISK_FREE: &str = include_str!("disk_free.sh");
pub const GPU_COUNT: &str = include_str!("gpu_count.sh");
pub const PROBE: &str = include_str!("probe.sh");
pub const PROBE_PY: &str = include_str!("probe.py");
pub const LISTENER: &str = include_str!("listener.sh");
pub const LISTENER_PY: &str = include_str!("listener.py");
pub const CONNECT: &str = include_str!("connect.sh");
pub const CONNECT_PY: &str = include_str!("connect.py");
pub const PAIRS: &str = include_str!("pairs.sh");
pub const PAIRS_PY: &str = include_str!("pairs.py");
pub const NETPERF: &str = include_str!("netperf.sh");
pub const NETPERF_PY: &str = include_str!("netperf.py");

/// A script for a host's `sh`, with its arguments.
#[derive(Clone, Debug)]
pub struct Script {
    /// Files of shell functions the text uses, read before it.
    functions: Vec<&'static str>,
    text: Cow<'static, str>,
    args: Vec<String>,
}

impl Script {
    /// One of fleet's scripts (`include_str!` of a file in this folder).
    pub fn new(text: &'static str) -> Self {
        Script {
            functions: Vec::new(),
            text: Cow::Borrowed(text),
            args: Vec::new(),
        }
    }

    /// Reads the shell functions of `functions` (such as [`SYNC_STATE`]) before the text.
    pub fn using(mut self, functions: &'static str) -> Self {
        self.functions.push(functions);
        self
    }

    /// Appends one positional argument (`$1`, `$2`, ... in order).
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Appends positional arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The script as a file for `sh FILE ARGS` to run later on the host: the prelude, its
    /// functions and its text (arguments are the caller's).
    pub fn file(&self) -> Vec<u8> {
        let mut text = String::with_capacity(PRELUDE.len() + self.text.len() + 64);
        text.push_str(PRELUDE);
        for functions in &self.functions {
            text.push_str(functions);
        }
        text.push_str(&self.text);
        text.push('\n');
        text.into_bytes()
    }

    /// What goes on stdin before the script's own input: the prelude, the arguments, the text.
    pub fn stdin(&self) -> Vec<u8> {
        let mut text = String::with_capacity(PRELUDE.len() + self.text.len() + 64);
        text.push_str(PRELUDE);
        for functions in &self.functions {
            text.push_str(functions);
        }
        text.push_str("set --");
        for arg in &self.args {
            text.push(' ');
            text.push_str(&quote(arg));
        }
        text.push('\n');
        text.push_str(&self.text);
        text.push('\n');
        text.into_bytes()
    }

    /// The command line for the exec request, given the length of [`Script::stdin`]. It holds
    /// nothing but ASCII letters, digits, spaces, `-`, `$`, `(`, `)`, `"` and single quotes
    /// around them, which bash, dash, zsh, fish and tcsh all pass to `sh` unchanged.
    pub fn command(length: usize) -> String {
        format!("sh -c 'eval \"$(head -c {length})\"' fleet")
    }
}

/// Runs `script` here as sshd would on a host (`LOGIN_SHELL -c COMMAND`, the script then `input`
/// on stdin), in `dir`; for unit tests of the scripts.
#[cfg(test)]
pub fn run_here(
    login_shell: &str,
    dir: &std::path::Path,
    script: &Script,
    input: &[u8],
) -> std::process::Output {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut stdin = script.stdin();
    let command = Script::command(stdin.len());
    stdin.extend_from_slice(input);
    let mut child = Command::new(login_shell)
        .arg("-c")
        .arg(&command)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&stdin).unwrap();
    child.wait_with_output().unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    /// Runs `script` the way sshd would, under `login_shell`; returns stdout.
    fn run_under(login_shell: &str, script: &Script, input: &[u8]) -> Vec<u8> {
        let out = run_here(login_shell, std::path::Path::new("/"), script, input);
        assert!(
            out.status.success(),
            "{login_shell}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// The login shells fleet's hosts may have, those installed here (scripts/setup.sh
    /// installs fish, zsh and tcsh).
    fn login_shells() -> Vec<&'static str> {
        let shells = [
            "/bin/sh",
            "/bin/bash",
            "/bin/dash",
            "/usr/bin/zsh",
            "/usr/bin/fish",
            "/usr/bin/tcsh",
        ];
        shells
            .into_iter()
            .filter(|s| std::path::Path::new(s).exists())
            .collect()
    }

    const HOSTILE: [&str; 14] = [
        "\\';touch /nonexistent-fleet;#",
        "it's",
        "$HOME",
        "$(id)",
        "`id`",
        "a\nb",
        "!!",
        "\\\\",
        "\"",
        "*",
        "~",
        "",
        "노드 1",
        "%s\\n",
    ];

    #[test]
    fn arguments_arrive_literally_whatever_the_login_shell() {
        let script = Script::new("printf '%s\\0' \"$@\"").args(HOSTILE);
        for shell in login_shells() {
            let out = run_under(shell, &script, b"");
            let got: Vec<String> = String::from_utf8(out)
                .unwrap()
                .split_terminator('\0')
                .map(str::to_string)
                .collect();
            assert_eq!(got, HOSTILE, "under {shell}");
        }
    }

    #[test]
    fn what_follows_the_script_is_its_stdin() {
        let script =
            Script::new("n=0\nwhile IFS= read -r line; do n=$((n+1)); done\necho \"$n lines\"");
        let input = b"one\ntwo\nthree\n";
        for shell in login_shells() {
            assert_eq!(
                run_under(shell, &script, input),
                b"3 lines\n",
                "under {shell}"
            );
        }
    }

    #[test]
    fn the_command_line_is_plain() {
        let command = Script::command(1234);
        assert_eq!(command, "sh -c 'eval \"$(head -c 1234)\"' fleet");
        assert!(!command.contains(['\\', '!', '\n']));
    }

    #[test]
    fn workdirs_under_home_are_entered() {
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(home.path().join("a b/c")).unwrap();
        let script = Script::new("enter_workdir \"$1\" && pwd -P");
        for (workdir, expected) in [("~", ""), ("~/a b/c", "/a b/c"), ("~/a b/c/", "/a b/c")] {
            let stdin = script.clone().arg(workdir).stdin();
            let command = Script::command(stdin.len());
            let mut child = Command::new("sh")
                .arg("-c")
                .arg(&command)
                .env("HOME", home.path())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(&stdin).unwrap();
            let out = child.wait_with_output().unwrap();
            let root = home.path().canonicalize().unwrap();
            assert_eq!(
                String::from_utf8(out.stdout).unwrap(),
                format!("{}{expected}\n", root.display()),
                "{workdir}"
            );
        }
    }
}
