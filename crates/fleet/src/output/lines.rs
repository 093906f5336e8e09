//! Turns a byte stream that arrives in arbitrary chunks into whole lines.

/// Lines longer than this are passed on in pieces, so one host printing megabytes without a
/// newline cannot exhaust the laptop's memory.
pub const MAX_LINE: usize = 1 << 20;

/// Collects chunks of one stream and hands out complete lines, without their `\n` (or `\r\n`).
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds a chunk; `emit` receives every line it completes.
    pub fn push(&mut self, mut data: &[u8], mut emit: impl FnMut(&[u8])) {
        while let Some(i) = data.iter().position(|&b| b == b'\n') {
            if self.partial.is_empty() {
                emit(trim_cr(&data[..i]));
            } else {
                self.partial.extend_from_slice(&data[..i]);
                emit(trim_cr(&self.partial));
                self.partial.clear();
            }
            data = &data[i + 1..];
        }
        self.partial.extend_from_slice(data);
        while self.partial.len() >= MAX_LINE {
            let rest = self.partial.split_off(MAX_LINE);
            emit(&self.partial);
            self.partial = rest;
        }
    }

    /// Ends the stream: a last line without a newline is still a line.
    pub fn finish(&mut self, mut emit: impl FnMut(&[u8])) {
        if !self.partial.is_empty() {
            emit(trim_cr(&self.partial));
            self.partial.clear();
        }
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut s = LineSplitter::new();
        for c in chunks {
            s.push(c, |l| out.push(l.to_vec()));
        }
        s.finish(|l| out.push(l.to_vec()));
        out
    }

    #[test]
    fn chunk_boundaries_do_not_matter() {
        let text = b"alpha\nbeta\r\n\ngamma";
        let whole = split(&[text]);
        assert_eq!(
            whole,
            [
                b"alpha".to_vec(),
                b"beta".to_vec(),
                b"".to_vec(),
                b"gamma".to_vec()
            ]
        );
        for cut in 0..text.len() {
            assert_eq!(split(&[&text[..cut], &text[cut..]]), whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(split(&bytes), whole);
    }

    #[test]
    fn huge_lines_come_out_in_bounded_pieces() {
        let big = vec![b'x'; MAX_LINE * 2 + 10];
        let lines = split(&[&big, b"\n"]);
        assert_eq!(
            lines.iter().map(Vec::len).collect::<Vec<_>>(),
            [MAX_LINE, MAX_LINE, 10]
        );
    }
}
