//! Everything that reaches the terminal: the [`Printer`] (stdout for data, stderr for progress
//! and logs), colour, sanitising of remote text, and assembly of remote byte streams into lines.

mod lines;
mod printer;
mod sanitize;

pub use lines::LineSplitter;
pub use printer::{ColorChoice, Labels, Printer, Stream};
pub use sanitize::{sanitize, sanitize_text};

/// `1 file`, `3 files`: a count with its noun, for messages.
pub fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}
