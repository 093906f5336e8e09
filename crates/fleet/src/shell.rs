//! Quoting for `sh`.
//!
//! Every value fleet hands a host's `sh` (a script's arguments, a rank's environment and
//! command) is single-quoted: inside single quotes nothing is special except the quote itself,
//! which is closed, escaped and reopened (`'\''`). Values then arrive exactly as the user typed
//! them, and `$HOME`, `;` or `$(...)` in them are text, never code. Only `sh` reads this quoting
//! (see [`crate::remote`]): the user's login shell, which may be fish, never sees it.

/// Quotes one argument so the shell reads it back unchanged.
pub fn quote(arg: &str) -> String {
    let plain = |c: char| {
        c.is_ascii_alphanumeric()
            || matches!(c, '-' | '_' | '.' | '/' | ':' | '=' | ',' | '+' | '@' | '%')
    };
    if !arg.is_empty() && arg.chars().all(plain) {
        return arg.to_string();
    }
    let mut quoted = String::with_capacity(arg.len() + 2);
    quoted.push('\'');
    for c in arg.chars() {
        if c == '\'' {
            quoted.push_str("'\\''");
        } else {
            quoted.push(c);
        }
    }
    quoted.push('\'');
    quoted
}

/// Joins arguments into one command line, each quoted.
pub fn join<S: AsRef<str>>(args: &[S]) -> String {
    args.iter()
        .map(|a| quote(a.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Runs `printf '%s\n' ARGS` through a real `sh -c` and returns what each argument became.
    fn through_sh(args: &[&str]) -> Vec<String> {
        let mut line = vec!["printf", "%s\\0"];
        line.extend_from_slice(args);
        let out = Command::new("sh")
            .arg("-c")
            .arg(join(&line))
            .output()
            .unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        text.split_terminator('\0').map(str::to_string).collect()
    }

    #[test]
    fn hostile_arguments_arrive_as_text() {
        let args = [
            "a b",
            "$HOME",
            "it's",
            "; touch /nonexistent-fleet",
            "$(id)",
            "`id`",
            "\"q\"",
            "a\nb",
            "*",
            "~",
            "",
            "!",
            "\\",
            "'",
            "''",
            "노드 1",
            "-n",
            "x=$((1+1))",
            "&&",
            "|",
            ">",
            "#c",
        ];
        assert_eq!(through_sh(&args), args);
    }

    #[test]
    fn plain_words_stay_readable() {
        assert_eq!(
            join(&["python3", "train.py", "--lr=1e-4", "data/a.csv"]),
            "python3 train.py --lr=1e-4 data/a.csv"
        );
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("it's"), "'it'\\''s'");
    }
}
