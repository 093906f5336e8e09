//! Remote output is untrusted: before it reaches a terminal, control characters (escape
//! sequences that move the cursor, retitle the window or rewrite the clipboard) are shown as
//! visible text instead of being obeyed.

use std::borrow::Cow;

/// Decodes `line` as UTF-8 (invalid bytes become U+FFFD) and, when `for_terminal`, replaces
/// control characters other than tab with caret notation (`^[` for ESC, `^M` for CR).
pub fn sanitize(line: &[u8], for_terminal: bool) -> Cow<'_, str> {
    let text = String::from_utf8_lossy(line);
    if !for_terminal || !text.chars().any(is_unsafe) {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            c if !is_unsafe(c) => out.push(c),
            '\u{7f}' => out.push_str("^?"),
            c if (c as u32) < 0x20 => {
                out.push('^');
                out.push(char::from(b'@' + c as u8));
            }
            c => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
        }
    }
    Cow::Owned(out)
}

/// Like [`sanitize`] for text fleet composes around host-supplied parts (a file name, a probe
/// value, a host's stderr in an error): line breaks and tabs of its own stay.
pub fn sanitize_text(text: &str, for_terminal: bool) -> Cow<'_, str> {
    if !for_terminal || !text.chars().any(|c| c != '\n' && is_unsafe(c)) {
        return Cow::Borrowed(text);
    }
    let lines: Vec<Cow<'_, str>> = text
        .split('\n')
        .map(|l| sanitize(l.as_bytes(), true))
        .collect();
    Cow::Owned(lines.join("\n"))
}

fn is_unsafe(c: char) -> bool {
    (c.is_control() && c != '\t') || matches!(c, '\u{2028}' | '\u{2029}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composed_text_keeps_its_lines_and_tabs_but_not_escapes() {
        let text = "host1\tsend\tevil\x1b]0;owned\x07.txt\nhost2\tsend\tok.txt\n";
        assert_eq!(
            sanitize_text(text, true),
            "host1\tsend\tevil^[]0;owned^G.txt\nhost2\tsend\tok.txt\n"
        );
        assert_eq!(sanitize_text(text, false), text);
    }

    #[test]
    fn escapes_become_visible() {
        assert_eq!(sanitize(b"\x1b[31mred\x1b[0m", true), "^[[31mred^[[0m");
        assert_eq!(sanitize(b"\x1b]0;title\x07", true), "^[]0;title^G");
        assert_eq!(sanitize(b"50%\r60%", true), "50%^M60%");
        assert_eq!(sanitize("c1 \u{9b}".as_bytes(), true), "c1 \\u{9b}");
        assert_eq!(sanitize(b"tab\tkept", true), "tab\tkept");
        assert_eq!(sanitize("한국어".as_bytes(), true), "한국어");
    }

    #[test]
    fn invalid_utf8_is_replaced_not_dropped() {
        assert_eq!(sanitize(b"a\xffb", false), "a\u{fffd}b");
    }

    #[test]
    fn pipes_get_the_text_unchanged() {
        assert_eq!(sanitize(b"\x1b[31mred", false), "\x1b[31mred");
    }
}
