"""long_fns.py LIMIT [--check] FILE...: the Rust functions longer than LIMIT lines, outside tests.

A function's length runs from the line of its `fn` to the line of its closing brace, found by
matching braces while skipping comments, string and character literals (raw strings included).
Items under `#[cfg(test)]` (the unit-test modules) and `#[test]` functions are left out.
Prints `FILE:LINE: NAME LINES` for each, longest first; with --check, exits 1 if any.

    python3 scripts/long_fns.py 90 $(find crates -name "*.rs" -not -path "*/tests/*")
"""
import re
import sys

FN = re.compile(r"\bfn\s+([A-Za-z_][A-Za-z0-9_]*)")


def code_only(text):
    """The text with comments and literals blanked (newlines kept), so braces can be counted."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif (m := re.compile(r'b?r(#*)"').match(text, i)) and (i == 0 or not text[i - 1].isalnum()):
            end = text.find('"' + m.group(1), m.end())
            j = n if end < 0 else end + 1 + len(m.group(1))
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(re.sub(r"[^\n]", " ", text[i : j + 1]))
            i = j + 1
        elif c == "'" and (m := re.compile(r"'(\\.|\\u\{[0-9a-fA-F]+\}|[^\\'])'").match(text, i)):
            out.append(" " * (m.end() - i))
            i = m.end()
        else:
            out.append(c)
            i += 1
    return "".join(out)


def closing(code, open_at):
    """Index of the brace that closes the one at `open_at`."""
    depth = 0
    for j in range(open_at, len(code)):
        if code[j] == "{":
            depth += 1
        elif code[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return len(code) - 1


def test_spans(code):
    """(start, end) of every item under #[cfg(test)] or #[test]."""
    spans = []
    for m in re.finditer(r"#\[(cfg\(test\)|test)\]", code):
        brace = code.find("{", m.end())
        semi = code.find(";", m.end())
        if brace >= 0 and (semi < 0 or brace < semi):
            spans.append((m.start(), closing(code, brace)))
    return spans


def long_functions(path, limit):
    text = open(path, encoding="utf-8").read()
    code = code_only(text)
    skip = test_spans(code)
    found = []
    for m in FN.finditer(code):
        if any(a <= m.start() <= b for a, b in skip):
            continue
        brace, semi = code.find("{", m.end()), code.find(";", m.end())
        if brace < 0 or (0 <= semi < brace):
            continue  # a declaration without a body (trait item, extern fn)
        end = closing(code, brace)
        first = code.count("\n", 0, m.start()) + 1
        lines = code.count("\n", m.start(), end) + 1
        if lines > limit:
            found.append((lines, path, first, m.group(1)))
    return found


def main(argv):
    check = "--check" in argv
    args = [a for a in argv if a != "--check"]
    if len(args) < 2 or not args[0].isdigit():
        sys.exit(__doc__)
    limit, files = int(args[0]), args[1:]
    found = sorted((f for path in files for f in long_functions(path, limit)), reverse=True)
    for lines, path, first, name in found:
        print(f"{path}:{first}: {name} {lines}")
    if check and found:
        sys.exit(f"long_fns: {len(found)} function(s) longer than {limit} lines")


if __name__ == "__main__":
    main(sys.argv[1:])
