//! The calculator tool: the engine runs the text the model writes between `<|python_start|>` and
//! `<|python_end|>` through [`calculate`] and forces the answer in as `<|output_start|>` ...
//! `<|output_end|>`.
//!
//! The original hands the text to Python's `eval`; this module instead parses the only two
//! shapes the original lets through and reproduces what CPython 3.11 would print for them,
//! `None` standing for every case where the original returns `None` (syntax error, exception):
//! - arithmetic over `0-9 + - * / . ( )` and spaces (commas are dropped first, `**` is refused):
//!   arbitrary-precision ints, IEEE floats, `/` always a float rounded exactly like CPython's
//!   int/int division, `//` flooring, int→float conversion that overflows gives `None`, float
//!   `str()` as CPython's shortest round-trip repr, plus the odd values that character set can
//!   spell: `()` (an empty tuple, which can be added and repeated) and `...` (`Ellipsis`);
//! - `'text'.count('x')` (either quote), with the original's character set and word blocklist.
//!   Everything else the original's `eval` would accept in that branch is refused.
//!
//! Limits, so that every call is fast and shallow by construction (the original relies on a 3 s
//! alarm instead): input over [`MAX_INPUT_BYTES`] is refused; parentheses nest at most 200 deep and
//! deep unary chains are refused at the same points where CPython 3.11's parser gives up, so the
//! recursion is bounded too. The input cap also caps ints: no operator here yields more digits
//! than its operands' together plus one, so a result has about as many digits as the input has
//! characters at most, under CPython's 4,300-digit `str()` limit; no separate digit cap is needed.

use num_bigint::{BigInt, BigUint, Sign};

/// Longest input accepted, in bytes, before commas are stripped. Generous for any calculation a
/// model writes, and small enough that no result gets big or slow.
pub const MAX_INPUT_BYTES: usize = 1000;

/// Evaluates a calculator call and returns what the original would inject: `str()` of the result
/// of `eval`, or `None` where it returns `None`.
pub fn calculate(expr: &str) -> Option<String> {
    if expr.len() > MAX_INPUT_BYTES {
        return None;
    }
    let expr = expr.replace(',', "");
    if expr.bytes().all(|b| b"0123456789*+-/.() ".contains(&b)) {
        if expr.contains("**") {
            return None;
        }
        let tokens = tokenize(&expr)?;
        let mut parser = Parser { tokens, pos: 0 };
        let value = parser.sum(Nesting::default())?;
        if parser.pos != parser.tokens.len() {
            return None;
        }
        return value.to_python_str();
    }
    count_occurrences(&expr).map(|n| n.to_string())
}

/// Substrings (case-insensitive) that make the original refuse a string expression.
const BLOCKED_WORDS: [&str; 17] = [
    "__",
    "import",
    "exec",
    "eval",
    "compile",
    "open",
    "file",
    "input",
    "raw_input",
    "globals",
    "locals",
    "vars",
    "dir",
    "getattr",
    "setattr",
    "delattr",
    "hasattr",
];

/// The string branch: the original's checks, then only `'hay'.count('needle')` with optional
/// spaces between tokens (as Python's tokenizer allows), counted like `str.count`.
fn count_occurrences(expr: &str) -> Option<usize> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b" '\"()._".contains(&b);
    if !expr.bytes().all(allowed) {
        return None;
    }
    let lower = expr.to_ascii_lowercase();
    if BLOCKED_WORDS.iter().any(|word| lower.contains(word)) {
        return None;
    }
    // The original requires this exact substring, so `'a'.count ('a')` is refused there too.
    if !expr.contains(".count(") {
        return None;
    }
    let mut rest = expr;
    let haystack = string_literal(&mut rest)?;
    for punct in [".", "count", "("] {
        rest = rest.trim_start_matches(' ').strip_prefix(punct)?;
    }
    let needle = string_literal(&mut rest)?;
    rest = rest.trim_start_matches(' ').strip_prefix(')')?;
    if !rest.trim_start_matches(' ').is_empty() {
        return None;
    }
    // `str::matches` finds non-overlapping matches left to right and, for an empty needle, one
    // per char boundary: exactly `str.count`.
    Some(haystack.matches(needle).count())
}

/// Takes a quoted literal off the front of `rest`. The allowed characters exclude backslashes,
/// so the literal simply ends at the next matching quote.
fn string_literal<'a>(rest: &mut &'a str) -> Option<&'a str> {
    let s = rest.trim_start_matches(' ');
    let quote = s.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let body = &s[1..];
    let end = body.find(quote)?;
    *rest = &body[end + 1..];
    Some(&body[..end])
}

enum Token {
    Int(BigInt),
    Float(f64),
    Ellipsis,
    Plus,
    Minus,
    Star,
    Slash,
    DoubleSlash,
    Open,
    Close,
}

/// Splits arithmetic into tokens the way Python's tokenizer does for this character set;
/// `None` for what it would reject (a lone `.`, an int literal with leading zeros).
fn tokenize(expr: &str) -> Option<Vec<Token>> {
    let bytes = expr.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let next = bytes.get(i + 1).copied();
        let (token, len) = match bytes[i] {
            b' ' => {
                i += 1;
                continue;
            }
            b'+' => (Token::Plus, 1),
            b'-' => (Token::Minus, 1),
            b'*' => (Token::Star, 1),
            b'/' if next == Some(b'/') => (Token::DoubleSlash, 2),
            b'/' => (Token::Slash, 1),
            b'(' => (Token::Open, 1),
            b')' => (Token::Close, 1),
            b'.' if !next.is_some_and(|b| b.is_ascii_digit()) => {
                // `...` is Ellipsis; any other dot would start an attribute name, which this
                // character set cannot spell.
                if bytes.get(i..i + 3) == Some(b"...") {
                    (Token::Ellipsis, 3)
                } else {
                    return None;
                }
            }
            _ => number(&expr[i..])?,
        };
        tokens.push(token);
        i += len;
    }
    Some(tokens)
}

/// Reads the number at the start of `s` (which starts with a digit, or a dot and a digit): an
/// int, or a float when there is a dot, with its length.
fn number(s: &str) -> Option<(Token, usize)> {
    let digits = |from: usize| s[from..].bytes().take_while(u8::is_ascii_digit).count();
    let int_len = digits(0);
    if s.as_bytes().get(int_len) == Some(&b'.') {
        let len = int_len + 1 + digits(int_len + 1);
        // Rust parses `1.` and `.5` and rounds long literals correctly, overflowing to
        // infinity, all as Python does.
        return Some((Token::Float(s[..len].parse().ok()?), len));
    }
    let literal = &s[..int_len];
    // Python 3 refuses `007` (old octal syntax) but accepts `0` and `00`.
    if literal.starts_with('0') && literal.bytes().any(|b| b != b'0') {
        return None;
    }
    Some((Token::Int(literal.parse().ok()?), int_len))
}

/// Where the parser is, in the units of CPython 3.11's parser limits.
#[derive(Clone, Copy, Default)]
struct Nesting {
    parens: u32,
    unary: u32,
}

/// CPython's tokenizer refuses the 201st nested parenthesis.
const MAX_PARENS: u32 = 200;

impl Nesting {
    /// CPython 3.11's parser fails (MemoryError) once its rule stack passes 6,000 levels; probing
    /// it shows each open parenthesis costs 28 levels, each enclosing unary sign 1, on top of 25.
    fn within_limits(self) -> bool {
        self.parens <= MAX_PARENS && 25 + 28 * self.parens + self.unary <= 6000
    }
}

enum Value {
    Int(BigInt),
    Float(f64),
    /// Commas are stripped before parsing, so the only tuple anyone can write is `()`.
    EmptyTuple,
    Ellipsis,
}

/// Recursive descent over Python's grammar for sums, products, unary signs and atoms,
/// evaluating as it goes: any syntax or runtime error gives `None`, like the original.
struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn sum(&mut self, nesting: Nesting) -> Option<Value> {
        let mut acc = self.term(nesting)?;
        loop {
            let op = match self.peek() {
                Some(Token::Plus) => Value::add,
                Some(Token::Minus) => Value::sub,
                _ => return Some(acc),
            };
            self.pos += 1;
            acc = op(acc, self.term(nesting)?)?;
        }
    }

    fn term(&mut self, nesting: Nesting) -> Option<Value> {
        let mut acc = self.factor(nesting)?;
        loop {
            let op = match self.peek() {
                Some(Token::Star) => Value::mul,
                Some(Token::Slash) => Value::div,
                Some(Token::DoubleSlash) => Value::floor_div,
                _ => return Some(acc),
            };
            self.pos += 1;
            acc = op(acc, self.factor(nesting)?)?;
        }
    }

    /// Unary signs are counted in a loop, not by recursion, so long chains cost no stack.
    fn factor(&mut self, mut nesting: Nesting) -> Option<Value> {
        let mut negations = Vec::new();
        while let Some(Token::Plus | Token::Minus) = self.peek() {
            negations.push(matches!(self.peek(), Some(Token::Minus)));
            self.pos += 1;
            nesting.unary += 1;
            if !nesting.within_limits() {
                return None;
            }
        }
        let mut value = self.primary(nesting)?;
        for negate in negations.into_iter().rev() {
            value = value.unary(negate)?;
        }
        Some(value)
    }

    fn primary(&mut self, nesting: Nesting) -> Option<Value> {
        let value = self.atom(nesting)?;
        // `x(...)` is either a syntax error or a call, and no value here is callable.
        if let Some(Token::Open) = self.peek() {
            return None;
        }
        Some(value)
    }

    fn atom(&mut self, mut nesting: Nesting) -> Option<Value> {
        let token = self.tokens.get(self.pos)?;
        self.pos += 1;
        match token {
            Token::Int(n) => Some(Value::Int(n.clone())),
            Token::Float(x) => Some(Value::Float(*x)),
            Token::Ellipsis => Some(Value::Ellipsis),
            Token::Open => {
                nesting.parens += 1;
                if !nesting.within_limits() {
                    return None;
                }
                if let Some(Token::Close) = self.peek() {
                    self.pos += 1;
                    return Some(Value::EmptyTuple);
                }
                let value = self.sum(nesting)?;
                match self.peek() {
                    Some(Token::Close) => {
                        self.pos += 1;
                        Some(value)
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }
}

impl Value {
    /// Python's `str()` of the value.
    fn to_python_str(&self) -> Option<String> {
        match self {
            Value::Int(n) => Some(n.to_string()),
            Value::Float(x) => float_repr(*x),
            Value::EmptyTuple => Some("()".to_string()),
            Value::Ellipsis => Some("Ellipsis".to_string()),
        }
    }

    fn unary(self, negate: bool) -> Option<Value> {
        match self {
            Value::Int(n) if negate => Some(Value::Int(-n)),
            Value::Float(x) if negate => Some(Value::Float(-x)),
            Value::Int(_) | Value::Float(_) => Some(self),
            Value::EmptyTuple | Value::Ellipsis => None,
        }
    }

    fn add(self, rhs: Value) -> Option<Value> {
        match (self, rhs) {
            (Value::Int(a), Value::Int(b)) => Some(Value::Int(a + b)),
            (Value::EmptyTuple, Value::EmptyTuple) => Some(Value::EmptyTuple),
            (a, b) => float_op(a, b, |x, y| Some(x + y)),
        }
    }

    fn sub(self, rhs: Value) -> Option<Value> {
        match (self, rhs) {
            (Value::Int(a), Value::Int(b)) => Some(Value::Int(a - b)),
            (a, b) => float_op(a, b, |x, y| Some(x - y)),
        }
    }

    fn mul(self, rhs: Value) -> Option<Value> {
        match (self, rhs) {
            (Value::Int(a), Value::Int(b)) => Some(Value::Int(a * b)),
            // Repeating a tuple needs a count that fits a C `Py_ssize_t`, else OverflowError.
            (Value::EmptyTuple, Value::Int(n)) | (Value::Int(n), Value::EmptyTuple) => {
                i64::try_from(&n).ok().map(|_| Value::EmptyTuple)
            }
            (a, b) => float_op(a, b, |x, y| Some(x * y)),
        }
    }

    fn div(self, rhs: Value) -> Option<Value> {
        match (self, rhs) {
            (Value::Int(a), Value::Int(b)) => {
                if b.sign() == Sign::NoSign {
                    return None;
                }
                ratio_to_f64(&a, &b).map(Value::Float)
            }
            (a, b) => float_op(a, b, |x, y| (y != 0.0).then_some(x / y)),
        }
    }

    fn floor_div(self, rhs: Value) -> Option<Value> {
        match (self, rhs) {
            (Value::Int(a), Value::Int(b)) => {
                if b.sign() == Sign::NoSign {
                    return None;
                }
                // BigInt division truncates toward zero; Python floors.
                let quotient = &a / &b;
                let remainder = &a % &b;
                if remainder.sign() != Sign::NoSign && remainder.sign() != b.sign() {
                    Some(Value::Int(quotient - 1))
                } else {
                    Some(Value::Int(quotient))
                }
            }
            (a, b) => float_op(a, b, float_floor_div),
        }
    }
}

/// A binary op on two numbers of which at least one is a float: the int side is converted the
/// way Python does (OverflowError, so `None`, when it is too large); tuples and Ellipsis are a
/// TypeError.
fn float_op(a: Value, b: Value, op: impl FnOnce(f64, f64) -> Option<f64>) -> Option<Value> {
    let x = as_float(a)?;
    let y = as_float(b)?;
    op(x, y).map(Value::Float)
}

fn as_float(value: Value) -> Option<f64> {
    match value {
        Value::Float(x) => Some(x),
        Value::Int(n) => ratio_to_f64(&n, &BigInt::from(1)),
        Value::EmptyTuple | Value::Ellipsis => None,
    }
}

/// CPython's `float.__floordiv__` (`_float_div_mod`), step for step, so that signed zeros, NaN
/// and infinities come out the same.
fn float_floor_div(vx: f64, wx: f64) -> Option<f64> {
    if wx == 0.0 {
        return None;
    }
    // Rust's `%` on floats is C's `fmod`.
    let rem = vx % wx;
    let mut div = (vx - rem) / wx;
    if rem != 0.0 && (wx < 0.0) != (rem < 0.0) {
        div -= 1.0;
    }
    // Like C's `if (div)`, `!= 0.0` is also true for NaN.
    if div != 0.0 {
        let mut floor = div.floor();
        if div - floor > 0.5 {
            floor += 1.0;
        }
        Some(floor)
    } else {
        Some(0.0f64.copysign(vx / wx))
    }
}

/// `num / den` (den non-zero) correctly rounded to the nearest f64, ties to even, as CPython
/// does for int/int and int→float; `None` when the result overflows, CPython's OverflowError.
fn ratio_to_f64(num: &BigInt, den: &BigInt) -> Option<f64> {
    let magnitude = unsigned_ratio_to_f64(num.magnitude(), den.magnitude())?;
    // The sign follows the operands even for a zero result: `0/-5` is `-0.0` in Python.
    let negative = (num.sign() == Sign::Minus) != (den.sign() == Sign::Minus);
    Some(if negative { -magnitude } else { magnitude })
}

fn unsigned_ratio_to_f64(num: &BigUint, den: &BigUint) -> Option<f64> {
    if num.bits() == 0 {
        return Some(0.0);
    }
    // Scale so that the integer quotient has 55 or 56 bits: the 53 kept, a rounding bit and at
    // least one more, with the remainder as a sticky bit below them.
    let num_bits = i64::try_from(num.bits()).ok()?;
    let den_bits = i64::try_from(den.bits()).ok()?;
    let shift = 55 - (num_bits - den_bits);
    let (n, d) = if shift >= 0 {
        (num << shift.unsigned_abs(), den.clone())
    } else {
        (num.clone(), den << shift.unsigned_abs())
    };
    let quotient = &n / &d;
    let sticky = (&n % &d).bits() != 0;
    let q = quotient.iter_u64_digits().next()?;
    let q_bits = i64::from(64 - q.leading_zeros());
    // The value is (q + sticky) * 2^-shift, with its leading bit at 2^exponent.
    let exponent = q_bits - 1 - shift;
    if exponent > 1023 {
        return None;
    }
    // Below 2^-1022 (subnormals) fewer than 53 bits are kept.
    let precision = 53 - (-1022 - exponent).max(0);
    let dropped = q_bits - precision;
    if dropped > q_bits {
        return Some(0.0);
    }
    let mut mantissa = q >> dropped;
    let rest = q & ((1u64 << dropped) - 1);
    let half = 1u64 << (dropped - 1);
    if rest > half || (rest == half && (sticky || mantissa & 1 == 1)) {
        mantissa += 1;
    }
    // A normal mantissa carries its implicit leading bit into the exponent field (hence 1022),
    // and a rounding carry moves into the exponent by the same addition; subnormals have field 0.
    let field = u64::try_from(exponent.max(-1022) + 1022).ok()?;
    let bits = (field << 52) + mantissa;
    let result = f64::from_bits(bits);
    result.is_finite().then_some(result)
}

/// Python's `repr`/`str` of a float: the shortest digits that round-trip, in positional notation
/// when the decimal exponent is in [-4, 16), scientific (`1e+16`, `1e-05`) otherwise.
fn float_repr(x: f64) -> Option<String> {
    if x.is_nan() {
        return Some("nan".to_string());
    }
    let sign = if x.is_sign_negative() { "-" } else { "" };
    if x.is_infinite() {
        return Some(format!("{sign}inf"));
    }
    let (digits, exponent) = shortest_digits(x.abs())?;
    let body = if !(-4..16).contains(&exponent) {
        let (first, rest) = digits.split_at(1);
        let dot = if rest.is_empty() { "" } else { "." };
        let exp_sign = if exponent < 0 { '-' } else { '+' };
        format!("{first}{dot}{rest}e{exp_sign}{:02}", exponent.unsigned_abs())
    } else if exponent < 0 {
        let zeros = "0".repeat(exponent.unsigned_abs() as usize - 1);
        format!("0.{zeros}{digits}")
    } else {
        let int_len = exponent.unsigned_abs() as usize + 1;
        if int_len >= digits.len() {
            format!("{digits}{}.0", "0".repeat(int_len - digits.len()))
        } else {
            format!("{}.{}", &digits[..int_len], &digits[int_len..])
        }
    };
    Some(format!("{sign}{body}"))
}

/// The shortest significant digits that read back as `x` (finite, non-negative) and the decimal
/// exponent of the first, choosing among equally short candidates the nearest to `x`, a tie going
/// to the even last digit, as CPython's `repr` does.
fn shortest_digits(x: f64) -> Option<(String, i32)> {
    // Rust's `{:e}` finds the shortest length but may break a tie upward where CPython goes to
    // even (97752156662751.125 prints as ...751.13 against CPython's ...751.12).
    let (shortest, exponent) = split_scientific(&format!("{x:e}"))?;
    // So round the exact expansion (never more than 767 significant digits) to that length
    // ourselves and keep the result when it reads back as `x`.
    let (exact, mut nearest_exponent) = split_scientific(&format!("{x:.800e}"))?;
    let (head, tail) = exact.split_at(shortest.len().min(exact.len()));
    let mut nearest = head.as_bytes().to_vec();
    let last_is_odd = nearest.last().is_some_and(|d| d % 2 == 1);
    let round_up = match tail.as_bytes().first() {
        Some(b'6'..=b'9') => true,
        Some(b'5') => last_is_odd || tail.bytes().skip(1).any(|d| d != b'0'),
        _ => false,
    };
    if round_up {
        match nearest.iter().rposition(|&d| d != b'9') {
            Some(i) => {
                nearest[i] += 1;
                nearest.truncate(i + 1);
            }
            None => {
                nearest = vec![b'1'];
                nearest_exponent += 1;
            }
        }
    }
    while nearest.len() > 1 && nearest.last() == Some(&b'0') {
        nearest.pop();
    }
    let nearest = String::from_utf8(nearest).ok()?;
    let (first, rest) = nearest.split_at(1);
    let reads_back = format!("{first}.{rest}0e{nearest_exponent}").parse::<f64>() == Ok(x);
    Some(if reads_back { (nearest, nearest_exponent) } else { (shortest, exponent) })
}

/// Splits Rust's `d.ddde<exp>` into its digits and exponent.
fn split_scientific(s: &str) -> Option<(String, i32)> {
    let (mantissa, exponent) = s.split_once('e')?;
    Some((mantissa.replace('.', ""), exponent.parse().ok()?))
}
