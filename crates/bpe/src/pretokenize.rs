//! Pre-tokenization: cutting text into the chunks ("pieces") that BPE merges never cross.
//!
//! The original splits with a `fancy-regex` pattern. Backtracking regex costs more than the
//! merges themselves, so the GPT-4-style patterns (nanochat's, with numbers in groups of 1–2, and
//! GPT-4's 1–3) are run by a hand-written scanner that follows the regex alternative by
//! alternative. Its character classes (`\p{L}`, `\p{N}`, `\s`, the case-folded contraction
//! letters) are taken from `regex-syntax`, the very tables the regex engine uses, so the two agree
//! on every Unicode character; property tests check the scanner against `fancy-regex`.
//! Any other pattern runs through `fancy-regex`.

use std::sync::Arc;

use crate::{Error, DEFAULT_PATTERN, GPT4_PATTERN};

const LETTER: u8 = 1;
const NUMBER: u8 = 2;
const SPACE: u8 = 4;
/// `\r` and `\n` (also SPACE): the pattern treats them apart from other whitespace.
const CRLF: u8 = 8;

/// Splits text into pieces according to a pattern.
#[derive(Clone)]
pub struct Splitter {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Fast(Arc<Scanner>),
    Regex(Arc<fancy_regex::Regex>),
}

impl Splitter {
    /// The fastest splitter for `pattern`: the scanner for the GPT-4-style patterns, else `fancy-regex`.
    pub fn new(pattern: &str) -> Result<Self, Error> {
        let digits = if pattern == DEFAULT_PATTERN {
            2
        } else if pattern == GPT4_PATTERN {
            3
        } else {
            return Self::regex(pattern);
        };
        Ok(Splitter { inner: Inner::Fast(Arc::new(Scanner::new(digits)?)) })
    }

    /// A splitter that always runs the pattern through `fancy-regex` (the reference).
    pub fn regex(pattern: &str) -> Result<Self, Error> {
        let re = fancy_regex::Regex::new(pattern).map_err(|e| Error::Pattern(e.to_string()))?;
        Ok(Splitter { inner: Inner::Regex(Arc::new(re)) })
    }

    /// The pieces of `text`, in order; they concatenate back to `text`.
    pub fn pieces<'a>(&'a self, text: &'a str) -> Pieces<'a> {
        Pieces { splitter: self, text, pos: 0 }
    }
}

/// Iterator over the pieces of a text (see [`Splitter::pieces`]).
pub struct Pieces<'a> {
    splitter: &'a Splitter,
    text: &'a str,
    pos: usize,
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let (start, end) = match &self.splitter.inner {
            Inner::Fast(scanner) => {
                if self.pos >= self.text.len() {
                    return None;
                }
                (self.pos, scanner.piece_end(self.text, self.pos))
            }
            Inner::Regex(re) => match re.find_from_pos(self.text, self.pos) {
                Ok(Some(m)) if m.end() > m.start() => (m.start(), m.end()),
                Ok(_) => return None,
                // The backtrack limit was hit (only possible with a custom pattern): keep the
                // rest of the text as one piece rather than losing it.
                Err(_) if self.pos < self.text.len() => (self.pos, self.text.len()),
                Err(_) => return None,
            },
        };
        self.pos = end;
        Some(&self.text[start..end])
    }
}

/// The hand-written equivalent of the GPT-4-style pattern
/// `'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,D}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+`.
struct Scanner {
    digits: usize,
    /// Class bits for every character of the Basic Multilingual Plane.
    bmp: Vec<u8>,
    /// Class bits for the rest, as sorted disjoint ranges.
    astral: Vec<(u32, u32, u8)>,
    /// Case-insensitive letters of the contractions: `[sdmt]`, `l`, `v`, `e`, `r`.
    fold_sdmt: Vec<(char, char)>,
    fold_l: Vec<(char, char)>,
    fold_v: Vec<(char, char)>,
    fold_e: Vec<(char, char)>,
    fold_r: Vec<(char, char)>,
}

/// The ranges of a character class, parsed by `regex-syntax` exactly as the regex engine does.
fn class_ranges(class: &str) -> Result<Vec<(char, char)>, Error> {
    use regex_syntax::hir::{Class, HirKind};
    let hir = regex_syntax::Parser::new().parse(class).map_err(|e| Error::Pattern(e.to_string()))?;
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => Ok(c.ranges().iter().map(|r| (r.start(), r.end())).collect()),
        HirKind::Literal(lit) => {
            let s = std::str::from_utf8(&lit.0).map_err(|e| Error::Pattern(e.to_string()))?;
            Ok(s.chars().map(|c| (c, c)).collect())
        }
        _ => Err(Error::Pattern(format!("{class} is not a character class"))),
    }
}

fn in_ranges(ranges: &[(char, char)], c: char) -> bool {
    ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi)
}

impl Scanner {
    fn new(digits: usize) -> Result<Self, Error> {
        let mut bmp = vec![0u8; 0x10000];
        let mut astral = Vec::new();
        for (class, bit) in [(r"\p{L}", LETTER), (r"\p{N}", NUMBER), (r"\s", SPACE), (r"[\r\n]", CRLF)] {
            for (lo, hi) in class_ranges(class)? {
                let (lo, hi) = (lo as u32, hi as u32);
                for c in lo..=hi.min(0xFFFF) {
                    bmp[c as usize] |= bit;
                }
                if hi > 0xFFFF {
                    astral.push((lo.max(0x10000), hi, bit));
                }
            }
        }
        astral.sort_unstable();
        Ok(Scanner {
            digits,
            bmp,
            astral,
            fold_sdmt: class_ranges("(?i:[sdmt])")?,
            fold_l: class_ranges("(?i:l)")?,
            fold_v: class_ranges("(?i:v)")?,
            fold_e: class_ranges("(?i:e)")?,
            fold_r: class_ranges("(?i:r)")?,
        })
    }

    #[inline]
    fn kind(&self, c: char) -> u8 {
        let c = c as u32;
        if c < 0x10000 {
            return self.bmp[c as usize];
        }
        // The classes do not overlap beyond the BMP, so the first range that holds `c` decides.
        let i = self.astral.partition_point(|&(_, hi, _)| hi < c);
        match self.astral.get(i) {
            Some(&(lo, _, bit)) if lo <= c => bit,
            _ => 0,
        }
    }

    /// End of the run of characters whose class has any of `bits`, starting at `i`.
    #[inline]
    fn run(&self, s: &str, mut i: usize, bits: u8) -> usize {
        while let Some((c, n)) = char_at(s, i) {
            if self.kind(c) & bits == 0 {
                break;
            }
            i += n;
        }
        i
    }

    /// End of the run of "other" characters (not letter, number or whitespace) starting at `i`.
    #[inline]
    fn run_other(&self, s: &str, mut i: usize) -> usize {
        while let Some((c, n)) = char_at(s, i) {
            if self.kind(c) != 0 {
                break;
            }
            i += n;
        }
        i
    }

    /// `'(?i:[sdmt]|ll|ve|re)` after an apostrophe ending at `i`.
    fn contraction(&self, s: &str, i: usize) -> Option<usize> {
        let (c1, n1) = char_at(s, i)?;
        if in_ranges(&self.fold_sdmt, c1) {
            return Some(i + n1);
        }
        let (c2, n2) = char_at(s, i + n1)?;
        let two = (in_ranges(&self.fold_l, c1) && in_ranges(&self.fold_l, c2))
            || (in_ranges(&self.fold_v, c1) && in_ranges(&self.fold_e, c2))
            || (in_ranges(&self.fold_r, c1) && in_ranges(&self.fold_e, c2));
        two.then_some(i + n1 + n2)
    }

    /// End of the piece starting at `i < s.len()`: the alternatives of the pattern, in order.
    fn piece_end(&self, s: &str, i: usize) -> usize {
        let Some((c, n)) = char_at(s, i) else { return s.len() };
        let kind = self.kind(c);
        // '(?i:[sdmt]|ll|ve|re)
        if c == '\'' {
            if let Some(end) = self.contraction(s, i + n) {
                return end;
            }
        }
        // [^\r\n\p{L}\p{N}]?+\p{L}+  (possessive: a taken prefix is never given back)
        if kind & LETTER != 0 {
            return self.run(s, i + n, LETTER);
        }
        if kind & (NUMBER | CRLF) == 0 {
            if let Some((c2, n2)) = char_at(s, i + n) {
                if self.kind(c2) & LETTER != 0 {
                    return self.run(s, i + n + n2, LETTER);
                }
            }
        }
        // \p{N}{1,D}
        if kind & NUMBER != 0 {
            let mut end = i + n;
            for _ in 1..self.digits {
                match char_at(s, end) {
                    Some((c2, n2)) if self.kind(c2) & NUMBER != 0 => end += n2,
                    _ => break,
                }
            }
            return end;
        }
        //  ?[^\s\p{L}\p{N}]++[\r\n]*
        let punct_start = if kind == 0 {
            Some(i)
        } else if c == ' ' {
            char_at(s, i + 1).filter(|&(c2, _)| self.kind(c2) == 0).map(|_| i + 1)
        } else {
            None
        };
        if let Some(p) = punct_start {
            let end = self.run_other(s, p);
            return self.run(s, end, CRLF);
        }
        // Whitespace from here on.
        let end = self.run(s, i, SPACE);
        // \s*[\r\n]: backtrack to just after the last newline of the run.
        if let Some(last_nl) = s.as_bytes()[i..end].iter().rposition(|&b| b == b'\r' || b == b'\n') {
            return i + last_nl + 1;
        }
        // \s+(?!\S): the whole run at the end of the text, else all but its last character.
        if end == s.len() {
            return end;
        }
        let last_start = (i..end).rev().find(|&j| s.is_char_boundary(j)).unwrap_or(i);
        if last_start > i {
            return last_start;
        }
        // \s+
        end
    }
}

/// The character at byte offset `i` of `s` and its length in bytes.
#[inline]
fn char_at(s: &str, i: usize) -> Option<(char, usize)> {
    let b = *s.as_bytes().get(i)?;
    if b < 0x80 {
        return Some((b as char, 1));
    }
    let c = s.get(i..)?.chars().next()?;
    Some((c, c.len_utf8()))
}
