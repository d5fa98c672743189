//! `cargo xtask audit`: lists the workspace's Rust files over [`MAX_FILE_LINES`] lines and
//! functions over [`MAX_FN_LINES`] lines that do not say why at their top, and module cycles
//! in the library crates (see [`crate::cycles`]).
//!
//! A file says why with a comment line starting `Long:` (or `Longer than`) among its first
//! lines (`//! Long: ...`); a function with such a line among the comment and attribute
//! lines right above it (`/// Long: ...`). Functions are found by their `fn` line and measured
//! with a brace counter that skips comments, strings and character literals: a rough tool,
//! not a parser, but the code it reads is `rustfmt`ed.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// The longest file, in lines, that needs no reason.
pub const MAX_FILE_LINES: usize = 600;
/// The longest function, in lines from its `fn` line to its closing brace, that needs no
/// reason.
pub const MAX_FN_LINES: usize = 80;
/// How many lines at the top of a file may hold its `Long:` line.
const FILE_HEAD_LINES: usize = 20;
/// What a reason starts with.
const MARKERS: [&str; 2] = ["Long:", "Longer than"];

/// Audits every `.rs` file under the workspace root and prints what is too long and
/// unexplained (with `--all`, the explained ones too), then the module cycles of the library
/// crates. Fails if anything is unexplained or any cycle found.
pub fn run(all: bool) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    collect(&root, &mut files)?;
    files.sort();
    let mut unexplained = 0;
    for file in &files {
        let text = std::fs::read_to_string(file)?;
        let lines: Vec<&str> = text.lines().collect();
        let name = file.strip_prefix(&root).unwrap_or(file).display();
        if lines.len() > MAX_FILE_LINES {
            let why = lines.iter().take(FILE_HEAD_LINES).any(|l| is_reason(l));
            unexplained += usize::from(!why);
            if !why || all {
                println!("{name}: {} lines{}", lines.len(), tag(why));
            }
        }
        for f in functions(&lines) {
            if f.len > MAX_FN_LINES {
                let why = explained_above(&lines, f.start);
                unexplained += usize::from(!why);
                if !why || all {
                    let line = f.start + 1;
                    println!(
                        "{name}:{line}: fn {} is {} lines{}",
                        f.name,
                        f.len,
                        tag(why)
                    );
                }
            }
        }
    }
    let mut cycles = 0;
    for src in crate::cycles::CRATES {
        for cycle in crate::cycles::cycles(&crate::cycles::graph(&root.join(src))?) {
            println!("{src}: module cycle {}", cycle.join(" -> "));
            cycles += 1;
        }
    }
    if unexplained > 0 || cycles > 0 {
        bail!("{unexplained} long files or functions without a `Long:` reason, {cycles} module cycles");
    }
    println!("audit: nothing too long without a reason, no module cycles");
    Ok(())
}

fn tag(explained: bool) -> &'static str {
    if explained {
        " (reason given)"
    } else {
        ""
    }
}

/// The `.rs` files under `dir`, skipping build output and hidden folders.
pub fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            if !name.starts_with('.') && name != "target" {
                collect(&path, out)?;
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// Whether a line is a comment that gives a reason.
fn is_reason(line: &str) -> bool {
    let body = line
        .trim_start()
        .trim_start_matches('/')
        .trim_start_matches('!');
    let body = body.trim_start();
    line.trim_start().starts_with("//") && MARKERS.iter().any(|m| body.starts_with(m))
}

/// Whether the comment and attribute lines right above line `start` give a reason.
fn explained_above(lines: &[&str], start: usize) -> bool {
    lines[..start]
        .iter()
        .rev()
        .map(|l| l.trim_start())
        .take_while(|l| l.starts_with("//") || l.starts_with("#["))
        .any(is_reason)
}

/// A function found in a file.
struct Function {
    name: String,
    /// Index of its `fn` line.
    start: usize,
    /// Lines from its `fn` line to its closing brace.
    len: usize,
}

/// The name of the function a line declares, if it does.
fn declared_fn(line: &str) -> Option<String> {
    let code = line.split("//").next().unwrap_or("");
    let mut words = code.split_whitespace();
    while let Some(w) = words.next() {
        if w == "fn" {
            let next = words.next()?;
            let name: String = next
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            return (!name.is_empty()).then_some(name);
        }
        let qualifier = w.starts_with("pub")
            || ["const", "async", "unsafe", "extern", "\"C\"", "default"].contains(&w);
        if !qualifier {
            return None;
        }
    }
    None
}

/// Every function with a body, measured by counting its braces.
fn functions(lines: &[&str]) -> Vec<Function> {
    let mut found = Vec::new();
    for (start, line) in lines.iter().enumerate() {
        let Some(name) = declared_fn(line) else {
            continue;
        };
        let mut lexer = Lexer::default();
        let mut depth = 0usize;
        let mut opened = false;
        'lines: for (i, l) in lines.iter().enumerate().skip(start) {
            for c in lexer.code(l) {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => {
                        depth = depth.saturating_sub(1);
                        if opened && depth == 0 {
                            found.push(Function {
                                name,
                                start,
                                len: i - start + 1,
                            });
                            break 'lines;
                        }
                    }
                    // A declaration without a body (in a trait).
                    ';' if !opened => break 'lines,
                    _ => {}
                }
            }
        }
    }
    found
}

/// Where a scan stands across lines: inside a block comment or a string.
#[derive(Default)]
struct Lexer {
    in_block_comment: bool,
    /// Inside a string; `Some(n)`: a raw string closed by `"` and `n` hashes.
    in_string: Option<Option<usize>>,
}

impl Lexer {
    /// The code characters of one line: comments, strings and character literals left out.
    fn code(&mut self, line: &str) -> Vec<char> {
        let chars: Vec<char> = line.chars().collect();
        let mut out = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            let next = chars.get(i + 1).copied();
            if self.in_block_comment {
                if c == '*' && next == Some('/') {
                    self.in_block_comment = false;
                    i += 1;
                }
            } else if let Some(raw) = self.in_string {
                match raw {
                    None if c == '\\' => i += 1,
                    None if c == '"' => self.in_string = None,
                    Some(n)
                        if c == '"'
                            && chars[i + 1..].iter().take_while(|h| **h == '#').count() >= n =>
                    {
                        self.in_string = None;
                        i += n;
                    }
                    _ => {}
                }
            } else if c == '/' && next == Some('/') {
                break;
            } else if c == '/' && next == Some('*') {
                self.in_block_comment = true;
                i += 1;
            } else if c == '"' {
                let hashes = chars[..i].iter().rev().take_while(|h| **h == '#').count();
                let raw = chars[..i - hashes.min(i)].last() == Some(&'r');
                self.in_string = Some(raw.then_some(hashes));
            } else if c == '\'' {
                // A character literal ('x', '\n', '\u{7f}'); otherwise a lifetime.
                if next == Some('\\') {
                    i += 2;
                    while i < chars.len() && chars[i] != '\'' {
                        i += 1;
                    }
                } else if chars.get(i + 2) == Some(&'\'') {
                    i += 2;
                }
            } else {
                out.push(c);
            }
            i += 1;
        }
        out
    }
}
