//! The calculator against the original's recorded results (parity fixture), against CPython
//! answers recorded here, at its limits, against an independent i128 evaluator, and fuzzed with
//! arbitrary bytes.

mod common;

use nanochat::calculator::{calculate, MAX_INPUT_BYTES};
use num_bigint::BigUint;
use proptest::prelude::*;
use serde_json::Value;
use std::time::Instant;

fn fixture() -> Value {
    let path = common::parity("calculator/calculator.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("calculator.json is JSON")
}

/// `head_result` is `null` or `{type, str, repr}`; the engine injects `str`.
fn expected_str(case: &Value) -> Option<String> {
    let result = &case["head_result"];
    if result.is_null() {
        None
    } else {
        Some(result["str"].as_str().expect("head_result.str").to_string())
    }
}

fn check_fixture_section(section: &str, expected_len: usize) {
    let fixture = fixture();
    let cases = fixture[section].as_array().expect("fixture section");
    assert_eq!(cases.len(), expected_len);
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|case| {
            let expr = case["expr"].as_str().expect("expr");
            let want = expected_str(case);
            let got = calculate(expr);
            (got != want).then(|| format!("{expr:?}: got {got:?}, want {want:?}"))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn matches_the_original_on_every_math_fixture_case() {
    check_fixture_section("math", 46);
}

#[test]
fn matches_head_on_every_string_count_fixture_case() {
    check_fixture_section("string_count_head_only", 11);
}

fn check_table(table: &[(&str, Option<&str>)]) {
    let failures: Vec<String> = table
        .iter()
        .filter(|(expr, want)| calculate(expr).as_deref() != *want)
        .map(|(expr, want)| format!("{expr:?}: got {:?}, want {want:?}", calculate(expr)))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Expected values produced by CPython 3.11.7 (`str(eval(expr))` after the original's checks,
/// `None` for an exception), the version that made the fixture.
#[test]
fn matches_cpython_on_arithmetic_edge_cases() {
    check_table(&[
        // Precedence and unary signs.
        ("2+3*4-5", Some("9")),
        ("(2+3)*(4-5)", Some("-5")),
        ("2*3+4*5", Some("26")),
        ("10-2-3", Some("5")),
        ("100/10/2", Some("5.0")),
        ("2*-3", Some("-6")),
        ("-2*3", Some("-6")),
        ("- 2 * - 3", Some("6")),
        ("1 - - 1", Some("2")),
        ("1---1", Some("0")),
        ("1+-+-1", Some("2")),
        ("+5", Some("5")),
        ("-(-(5))", Some("5")),
        ("8//3*3", Some("6")),
        ("7-7//2*2", Some("1")),
        ("2*(3+4)*5", Some("70")),
        // True division, int/float mixing, signed zeros.
        ("1/3", Some("0.3333333333333333")),
        ("2/3", Some("0.6666666666666666")),
        ("10/3", Some("3.3333333333333335")),
        ("1/7", Some("0.14285714285714285")),
        ("22/7", Some("3.142857142857143")),
        ("9007199254740993/1", Some("9007199254740992.0")),
        ("9007199254740993+0.0", Some("9007199254740992.0")),
        ("9007199254740995*1.0", Some("9007199254740996.0")),
        ("1/10", Some("0.1")),
        ("3/10", Some("0.3")),
        ("7/7", Some("1.0")),
        ("-7/2", Some("-3.5")),
        ("0/-5", Some("-0.0")),
        ("-0/5", Some("0.0")),
        ("0.0/-5", Some("-0.0")),
        ("-0.0", Some("-0.0")),
        ("0*-1.0", Some("-0.0")),
        ("0.0-0.0", Some("0.0")),
        ("-0.0-0.0", Some("-0.0")),
        ("-0.0+0.0", Some("0.0")),
        // Floor division: the result rounds toward minus infinity, for ints and floats.
        ("7//2", Some("3")),
        ("-7//2", Some("-4")),
        ("7//-2", Some("-4")),
        ("-7//-2", Some("3")),
        ("0//-5", Some("0")),
        ("7.5//2", Some("3.0")),
        ("-7.5//2", Some("-4.0")),
        ("7.5//-2", Some("-4.0")),
        ("-7.5//-2", Some("3.0")),
        ("1.5//0.4", Some("3.0")),
        ("-1.5//0.4", Some("-4.0")),
        ("0.0//1", Some("0.0")),
        ("-0.0//1", Some("-0.0")),
        ("0.0//-1", Some("-0.0")),
        ("5//0.0", None),
        ("5.0//0", None),
        ("1//0", None),
        ("6//3.0", Some("2.0")),
        // `%` is outside the original's character set.
        ("7 % 3", None),
        // Integers and literals.
        ("0", Some("0")),
        ("00", Some("0")),
        ("000", Some("0")),
        ("007", None),
        ("0 7", None),
        ("-0", Some("0")),
        ("999999999999999999999999999999 + 1", Some("1000000000000000000000000000000")),
        ("123456789 * 987654321", Some("121932631112635269")),
        // The empty tuple and Ellipsis.
        ("()", Some("()")),
        ("( )", Some("()")),
        ("(())", Some("()")),
        ("()+()", Some("()")),
        ("()*3", Some("()")),
        ("3*()", Some("()")),
        ("()*-1", Some("()")),
        ("()*0", Some("()")),
        ("()*9223372036854775807", Some("()")),
        ("()*9223372036854775808", None),
        ("()*-9223372036854775808", Some("()")),
        ("()*-9223372036854775809", None),
        ("()*1.5", None),
        ("()-()", None),
        ("-()", None),
        ("()()", None),
        ("()//2", None),
        ("1+()", None),
        ("...", Some("Ellipsis")),
        ("(...)", Some("Ellipsis")),
        ("...+1", None),
        ("-...", None),
        ("....", None),
        ("1...", None),
        ("1..2", None),
        (". 5", None),
        ("(...)(...)", None),
        // Syntax.
        ("", None),
        (" ", None),
        ("  1+1", Some("2")),
        ("1+1  ", Some("2")),
        ("+", None),
        ("-", None),
        ("1+", None),
        ("*1", None),
        ("1*", None),
        ("/1", None),
        ("1//", None),
        ("1///2", None),
        ("1/ /2", None),
        ("1 //2", Some("0")),
        ("1 2", None),
        ("(1 2)", None),
        ("(1)(2)", None),
        ("1(2)", None),
        ("(1+2", None),
        ("1+2)", None),
        (")(", None),
        ("2* *3", None),
        ("2**3", None),
        // Commas vanish before anything else.
        ("1,000,000/3", Some("333333.3333333333")),
        ("(1,2)+3", Some("15")),
        (",", None),
        ("1,,2", Some("12")),
    ]);
}

/// Python prints floats as the shortest string that reads back to the same double, switching to
/// scientific notation below 1e-4 and from 1e16. Expected values produced by CPython 3.11.7.
#[test]
fn prints_floats_like_cpython() {
    check_table(&[
        ("0.1+0.2", Some("0.30000000000000004")),
        ("1.1*1.1", Some("1.2100000000000002")),
        ("100.0", Some("100.0")),
        ("1000000000000000.0", Some("1000000000000000.0")),
        ("10000000000000000.0", Some("1e+16")),
        ("123456789012345678.0", Some("1.2345678901234568e+17")),
        ("9999999999999998.0", Some("9999999999999998.0")),
        ("0.0001", Some("0.0001")),
        ("0.00001", Some("1e-05")),
        ("0.000123", Some("0.000123")),
        ("0.0000123", Some("1.23e-05")),
        ("1/1024", Some("0.0009765625")),
        ("1/1048576", Some("9.5367431640625e-07")),
        ("2/3*1000000000000000000000", Some("6.666666666666666e+20")),
        ("1.5", Some("1.5")),
        ("1.", Some("1.0")),
        (".5", Some("0.5")),
        ("00.", Some("0.0")),
        ("007.5", Some("7.5")),
        ("0.30000000000000004", Some("0.30000000000000004")),
        ("100000000000000000000000000000000.0", Some("1e+32")),
        ("1/100000000000000000000000000000000", Some("1e-32")),
        ("12345678901234567890 / 3", Some("4.1152263004115226e+18")),
        ("3.0.1", None),
        // Two equally short candidates, equally near: CPython takes the even last digit.
        ("97752156662751.12", Some("97752156662751.12")),
        ("715929437680496.2", Some("715929437680496.2")),
        ("11-(7+18)*5873022612097/16", Some("-9176597831390.562")),
    ]);
}

fn pow2(n: usize) -> BigUint {
    BigUint::from(1u8) << n
}

/// Rounding at the ends of the float range, infinities and NaN (reachable through a 400-digit
/// literal). Expected values produced by CPython 3.11.7.
#[test]
fn rounds_and_overflows_like_cpython() {
    let p = |n: usize| pow2(n).to_string();
    let max_below_overflow = (pow2(1024) - pow2(970) - 1u8).to_string();
    let rounds_to_overflow = (pow2(1024) - pow2(970)).to_string();
    let inf = format!("1{}.0", "0".repeat(400));
    let big = format!("1{}", "0".repeat(400));
    let cases: Vec<(String, Option<&str>)> = vec![
        (format!("1/{}", p(1074)), Some("5e-324")),
        (format!("1/{}", p(1075)), Some("0.0")),
        (format!("3/{}", p(1075)), Some("1e-323")),
        (format!("-1/{}", p(1075)), Some("-0.0")),
        (format!("1/{}", p(1076)), Some("0.0")),
        (format!("{}/1", p(1024)), None),
        (format!("{rounds_to_overflow}/1"), None),
        (format!("{max_below_overflow}/1"), Some("1.7976931348623157e+308")),
        (format!("{max_below_overflow}+0.0"), Some("1.7976931348623157e+308")),
        (format!("{}+0.0", p(1024)), None),
        (format!("{}/{}", pow2(1100) + 1u8, p(1000)), Some("1.2676506002282294e+30")),
        (format!("{}//{}", p(1000), p(999)), Some("2")),
        (inf.clone(), Some("inf")),
        (format!("-{inf}"), Some("-inf")),
        (format!("{inf}-{inf}"), Some("nan")),
        (format!("{inf}*0"), Some("nan")),
        (format!("{inf}//1"), Some("nan")),
        (format!("1//{inf}"), Some("0.0")),
        (format!("-1//{inf}"), Some("-1.0")),
        (format!("1/{inf}"), Some("0.0")),
        (format!("-1/{inf}"), Some("-0.0")),
        (format!("{inf}+{big}"), None),
        (format!("{inf}+1"), Some("inf")),
        (format!("{inf}/0"), None),
        (format!("{inf}/{inf}"), Some("nan")),
        (format!("{big}/1"), None),
        (format!("1/{big}"), Some("0.0")),
    ];
    let table: Vec<(&str, Option<&str>)> = cases.iter().map(|(e, w)| (e.as_str(), *w)).collect();
    check_table(&table);
    // Python floors negative big quotients too: -2^1000 // 3 = -(2^1000 // 3) - 1.
    let floor = calculate(&format!("-{}//3", p(1000)));
    let want = format!("-{}", pow2(1000) / 3u8 + 1u8);
    assert_eq!(floor.as_deref(), Some(want.as_str()));
}

#[test]
fn counts_substrings_like_str_count() {
    check_table(&[
        ("'strawberry'.count('r')", Some("3")),
        ("\"banana\".count(\"an\")", Some("2")),
        ("'aaaa'.count('aa')", Some("2")),
        ("'abc'.count('')", Some("4")),
        ("''.count('')", Some("1")),
        ("''.count('a')", Some("0")),
        ("'it\"s'.count('\"')", Some("1")),
        ("  'a b' .count( 'b' )  ", Some("1")),
        ("'x.count(y'.count('x')", Some("1")),
        // The original requires the exact substring `.count(`.
        ("'abc'.count ('a')", None),
        // The original evaluates these; this calculator only knows the plain form.
        ("('abc').count('a')", None),
        ("'a' 'b'.count('a')", None),
        ("'abc'.count(('a'))", None),
        ("r'abc'.count('a')", None),
        ("'abc'.count('a').real", None),
        ("'abc'.count('a') if 1 else 0", None),
        // Malformed.
        ("'abc.count('a')", None),
        ("'abc'.count('a'", None),
        ("'abc'.count('a'))", None),
        ("'abc'.counts('a')", None),
        ("'abc'.count('a')'", None),
    ]);
}

#[test]
fn refuses_hostile_input() {
    for expr in [
        "__import__('os')",
        "__import__('os').system('ls')",
        "'a'.count('a') + open('x')",
        "'a'.count('a') and open('x')",
        "open('x').read().count('a')",
        "'a'.count('a')or exec('1')",
        "eval('1')",
        "exit()",
        "quit()",
        "print('a'.count('a'))",
        "len('abc')",
        "x",
        "True",
        "None",
        "lambda: 1",
        "().__class__",
        "'__'.count('_')",
        "'IMPORT'.count('I')",
        "'directory'.count('d')",
        "'profile'.count('f')",
        "'a'.count(chr(97))",
        "'a'.count('a')\n'b'",
        "'a'.count('a');1",
        "1+1\n",
        "1\t+1",
        "１+１",
        "1_000",
        "0x10",
        "1e3",
        "1j",
        "[1]",
        "{}",
        "2^3",
        "2 ** 3",
        "sqrt(16)",
    ] {
        assert_eq!(calculate(expr), None, "{expr:?}");
    }
}

/// CPython 3.11 refuses the 201st nested parenthesis, and its parser gives up once unary signs
/// and parentheses on one path pass its stack limit (`"(" * 200 + "-" * 375 + "1"` is the
/// deepest accepted at 200 parentheses). These boundaries were measured on CPython 3.11.7.
#[test]
fn nesting_limits_match_cpython_and_cost_no_stack() {
    let nested = |open: &str, n: usize, inner: &str| format!("{}{inner}{}", open.repeat(n), ")".repeat(n));
    assert_eq!(calculate(&nested("(", 200, "1")).as_deref(), Some("1"));
    assert_eq!(calculate(&nested("(", 201, "1")), None);
    assert_eq!(calculate(&nested("(", 200, "")).as_deref(), Some("()"));
    assert_eq!(calculate(&nested("(", 201, "")), None);
    let unary_inside = |n: usize| nested("(", 200, &format!("{}1", "-".repeat(n)));
    assert_eq!(calculate(&unary_inside(375)).as_deref(), Some("-1"));
    assert_eq!(calculate(&unary_inside(376)), None);
    // Each `(-` costs one level more than a bare parenthesis; 25 + 29*199 + 175 = 5971 is fine.
    assert_eq!(calculate(&nested("(-", 199, &format!("{}1", "-".repeat(175)))).as_deref(), Some("1"));
    assert_eq!(calculate(&nested("(-", 199, &format!("{}1", "-".repeat(205)))), None);
    // Far past every limit: refused at once, with no deep recursion.
    let start = Instant::now();
    assert_eq!(calculate(&nested("(", 100_000, "1")), None);
    assert_eq!(calculate(&"(".repeat(100_000)), None);
    assert_eq!(calculate(&"-".repeat(100_000)), None);
    assert!(start.elapsed().as_secs() < 1);
}

#[test]
fn refuses_input_over_the_length_limit() {
    assert_eq!(MAX_INPUT_BYTES, 1000);
    let sum = format!("{}1", "1+".repeat(499));
    assert_eq!(sum.len(), 999);
    assert_eq!(calculate(&sum).as_deref(), Some("500"));
    assert_eq!(calculate(&format!("{sum} ")).as_deref(), Some("500"));
    assert_eq!(calculate(&format!("{sum}  ")), None);
    // Commas count: the limit applies to what the model wrote.
    assert_eq!(calculate(&format!("{sum} ,")), None);
    let count = format!("'{}'.count('a')", "a".repeat(MAX_INPUT_BYTES - 13));
    assert_eq!(count.len(), MAX_INPUT_BYTES);
    assert_eq!(calculate(&count), Some((MAX_INPUT_BYTES - 13).to_string()));
    assert_eq!(calculate(&format!("{count} ")), None);
}

/// The longest int the input limit allows comes from one product; it is computed at once.
#[test]
fn largest_products_are_exact_and_fast() {
    let start = Instant::now();
    let expr = format!("{}*{}", "9".repeat(499), "9".repeat(500));
    // (10^499 - 1)(10^500 - 1) = 10^999 - 10^500 - 10^499 + 1
    let want = format!("{}89{}1", "9".repeat(498), "0".repeat(498));
    assert_eq!(calculate(&expr).as_deref(), Some(want.as_str()));
    let chain = format!("{}9", "9*".repeat(499));
    let result = calculate(&chain).expect("a product of nines");
    assert_eq!(result.len(), 478); // 9^500 has 478 digits
    assert!(start.elapsed().as_secs() < 1);
}

/// A tiny arithmetic tree, printed as Python source and evaluated by an independent reference.
#[derive(Clone, Debug)]
enum Expr {
    Lit(u32),
    Neg(Box<Expr>),
    Pos(Box<Expr>),
    Paren(Box<Expr>),
    Bin(Box<Expr>, Op, Box<Expr>),
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Add,
    Sub,
    Mul,
    FloorDiv,
    Div,
}

#[derive(Clone, Copy)]
enum Num {
    Int(i128),
    Float(f64),
}

impl Expr {
    /// Python source; binary operands are parenthesized when precedence needs it.
    fn source(&self) -> String {
        match self {
            Expr::Lit(n) => n.to_string(),
            Expr::Neg(e) => format!("-{}", e.operand_source()),
            Expr::Pos(e) => format!("+ {}", e.operand_source()),
            Expr::Paren(e) => format!("({})", e.source()),
            Expr::Bin(a, op, b) => {
                let symbol = match op {
                    Op::Add => " + ",
                    Op::Sub => "-",
                    Op::Mul => "*",
                    Op::FloorDiv => " // ",
                    Op::Div => "/",
                };
                format!("{}{symbol}{}", a.operand_source(), b.operand_source())
            }
        }
    }

    fn operand_source(&self) -> String {
        match self {
            Expr::Bin(..) => format!("({})", self.source()),
            _ => self.source(),
        }
    }

    /// What CPython would give, as far as the reference can tell: `Some(None)` is an exception,
    /// `None` means the reference cannot judge (an int too large for it).
    fn eval(&self) -> Option<Option<Num>> {
        Some(match self {
            Expr::Lit(n) => Some(Num::Int(i128::from(*n))),
            Expr::Paren(e) | Expr::Pos(e) => e.eval()?,
            Expr::Neg(e) => match e.eval()? {
                Some(Num::Int(n)) => Some(Num::Int(n.checked_neg()?)),
                Some(Num::Float(x)) => Some(Num::Float(-x)),
                None => None,
            },
            Expr::Bin(a, op, b) => {
                let (Some(x), Some(y)) = (a.eval()?, b.eval()?) else {
                    return Some(None);
                };
                binary(x, *op, y)?
            }
        })
    }
}

/// Integers up to 2^53 convert to floats exactly; beyond that the reference declines.
fn exact_float(n: Num) -> Option<f64> {
    match n {
        Num::Float(x) => Some(x),
        Num::Int(i) if i.unsigned_abs() <= 1 << 53 => Some(i as f64),
        Num::Int(_) => None,
    }
}

fn binary(x: Num, op: Op, y: Num) -> Option<Option<Num>> {
    if let (Num::Int(a), Num::Int(b)) = (x, y) {
        let int = |v: Option<i128>| v.map(|v| Some(Num::Int(v)));
        match op {
            Op::Add => return int(a.checked_add(b)),
            Op::Sub => return int(a.checked_sub(b)),
            Op::Mul => return int(a.checked_mul(b)),
            Op::FloorDiv => {
                if b == 0 {
                    return Some(None);
                }
                let q = a.checked_div(b)?;
                let floored = if a.checked_rem(b)? != 0 && ((a < 0) != (b < 0)) { q - 1 } else { q };
                return Some(Some(Num::Int(floored)));
            }
            Op::Div => {}
        }
    }
    let (a, b) = (exact_float(x)?, exact_float(y)?);
    Some(match op {
        Op::Add => Some(Num::Float(a + b)),
        Op::Sub => Some(Num::Float(a - b)),
        Op::Mul => Some(Num::Float(a * b)),
        Op::Div if b == 0.0 => None,
        Op::Div => Some(Num::Float(a / b)),
        // Float floor division is checked against CPython in the tables above.
        Op::FloorDiv => return None,
    })
}

fn arb_expr() -> impl Strategy<Value = Expr> {
    let leaf = prop_oneof![0u32..10, 0u32..100_000].prop_map(Expr::Lit);
    leaf.prop_recursive(6, 48, 2, |inner| {
        let op = prop_oneof![Just(Op::Add), Just(Op::Sub), Just(Op::Mul), Just(Op::FloorDiv), Just(Op::Div),];
        prop_oneof![
            inner.clone().prop_map(|e| Expr::Neg(Box::new(e))),
            inner.clone().prop_map(|e| Expr::Pos(Box::new(e))),
            inner.clone().prop_map(|e| Expr::Paren(Box::new(e))),
            (inner.clone(), op, inner).prop_map(|(a, op, b)| Expr::Bin(Box::new(a), op, Box::new(b))),
        ]
    })
}

proptest! {
    #[test]
    fn agrees_with_an_i128_reference(expr in arb_expr()) {
        let source = expr.source();
        let got = calculate(&source);
        if let Some(want) = expr.eval() {
            match want {
                None => prop_assert_eq!(got, None, "{}", source),
                Some(Num::Int(n)) => prop_assert_eq!(got, Some(n.to_string()), "{}", source),
                Some(Num::Float(x)) => {
                    let printed = got.unwrap_or_default();
                    let parsed: f64 = printed.parse().map_err(|_| {
                        TestCaseError::fail(format!("{source}: {printed:?} is not a float"))
                    })?;
                    // Python prints every float with a dot or an exponent (or as inf/nan).
                    prop_assert!(printed.contains(['.', 'e', 'n']), "{}: {}", source, printed);
                    prop_assert!(
                        parsed.to_bits() == x.to_bits() || (parsed.is_nan() && x.is_nan()),
                        "{}: got {}, want {:?}", source, printed, x
                    );
                }
            }
        }
    }
}

/// Whether `input` lies inside the calculator's grammar as an independent, coarse oracle reads it:
/// at most the length limit; then, commas dropped, either only arithmetic characters and no `**`,
/// or the shape `'text'.count('x')` over the allowed characters (spaces between tokens allowed).
fn inside_the_grammar(input: &str) -> bool {
    if input.len() > MAX_INPUT_BYTES {
        return false;
    }
    let expr = input.replace(',', "");
    if expr.bytes().all(|b| b"0123456789*+-/.() ".contains(&b)) {
        return !expr.contains("**");
    }
    let literal = r#"(?:'[A-Za-z0-9 ._()"]*'|"[A-Za-z0-9 ._()']*")"#;
    let count = format!(r"^ *{literal} *\. *count *\( *{literal} *\) *$");
    fancy_regex::Regex::new(&count).unwrap().is_match(&expr).unwrap()
}

/// Bytes drawn mostly from the characters one branch of the calculator reacts to (arithmetic, or
/// string counting), so that fuzzing reaches deep into both, mixed with arbitrary bytes.
fn calculator_bytes() -> impl Strategy<Value = Vec<u8>> {
    let from = |alphabet: &'static [u8]| {
        let byte = prop_oneof![20 => prop::sample::select(alphabet.to_vec()), 1 => any::<u8>()];
        prop::collection::vec(byte, 0..1200)
    };
    prop_oneof![from(b"0123456789+-*/.() ,"), from(b" '\".count()ab_x.imp")]
}

#[test]
fn the_fuzz_oracle_tells_the_grammar_apart() {
    for inside in ["1+2", "(3.5*-2)//1,000", "'abc'.count('a')", "\"a b\".count( 'b' ) "] {
        assert!(inside_the_grammar(inside), "{inside}");
        assert!(calculate(inside).is_some(), "{inside}");
    }
    for outside in ["2**8", "__import__('os')", "'a'.upper()", "x+1", "'a'.count('a');1"] {
        assert!(!inside_the_grammar(outside), "{outside}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn arbitrary_bytes_never_panic_hang_or_escape_the_grammar(bytes in calculator_bytes()) {
        let input = String::from_utf8_lossy(&bytes);
        let start = std::time::Instant::now();
        let result = calculate(&input);
        let elapsed = start.elapsed();
        prop_assert!(elapsed.as_millis() < 500, "{:?} took {:?}", input, elapsed);
        if result.is_some() {
            prop_assert!(inside_the_grammar(&input), "evaluated input outside the grammar: {:?}", input);
        }
    }
}
