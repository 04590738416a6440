//! Property tests: the hand-written pre-tokenizer against `fancy-regex`, lossless round trips,
//! encoding against `tiktoken-rs` built from the same ranks and pattern, batch against sequential.

mod common;

use rustc_hash::FxHashMap as HashMap;
use std::sync::OnceLock;

use proptest::prelude::*;

/// Characters that exercise every branch of the pattern: contractions (including the case-folded
/// long s `ſ`), letters and numbers of several scripts, Unicode whitespace, CR/LF, combining
/// marks (neither letter nor number), emoji, punctuation.
const TRICKY: &[char] = &[
    'a',
    'Z',
    's',
    'S',
    't',
    'd',
    'm',
    'l',
    'L',
    'v',
    'e',
    'E',
    'r',
    'R',
    'ſ',
    'K',
    '\'',
    '\u{2019}',
    '0',
    '7',
    '²',
    '½',
    'Ⅻ',
    '٣',
    '𝟙',
    ' ',
    ' ',
    ' ',
    '\t',
    '\r',
    '\n',
    '\u{0b}',
    '\u{0c}',
    '\u{85}',
    '\u{a0}',
    '\u{2003}',
    '\u{3000}',
    '\u{2028}',
    '.',
    ',',
    '!',
    '-',
    '(',
    '"',
    '<',
    '|',
    '>',
    '_',
    '€',
    'é',
    'ß',
    'Ω',
    'ж',
    '中',
    '字',
    'ー',
    'ا',
    'ह',
    '\u{301}',
    '\u{200d}',
    '😀',
    '👍',
    '\u{1f3fb}',
    '\0',
    '\u{10ffff}',
    '𐍈',
];

fn tricky_string() -> impl Strategy<Value = String> {
    prop::collection::vec(prop_oneof![4 => prop::sample::select(TRICKY), 1 => any::<char>()], 0..64)
        .prop_map(|chars| chars.into_iter().collect())
}

fn trained() -> &'static bpe::Tokenizer {
    static TOK: OnceLock<bpe::Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let text: String = common::shakespeare_1m().chars().take(200_000).collect();
        let extra = "Unicode: café naïve 日本語のテキスト Ελληνικά русский 😀👍 1234567 ½ ſ \u{a0}\u{3000}";
        bpe::Tokenizer::train([text.as_str(), extra], 600, bpe::DEFAULT_PATTERN).expect("train")
    })
}

fn fixture() -> &'static bpe::Tokenizer {
    static TOK: OnceLock<bpe::Tokenizer> = OnceLock::new();
    TOK.get_or_init(common::fixture_tokenizer)
}

fn tiktoken_of(tok: &bpe::Tokenizer) -> tiktoken_rs::CoreBPE {
    let encoder: HashMap<Vec<u8>, u32> =
        tok.mergeable_tokens().iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let specials: HashMap<String, u32> =
        bpe::SPECIAL_TOKENS.iter().map(|s| (s.to_string(), tok.special_id(s).expect("special"))).collect();
    tiktoken_rs::CoreBPE::new(encoder, specials, tok.pattern()).expect("CoreBPE")
}

fn oracle() -> &'static tiktoken_rs::CoreBPE {
    static BPE: OnceLock<tiktoken_rs::CoreBPE> = OnceLock::new();
    BPE.get_or_init(|| tiktoken_of(trained()))
}

fn check_split(pattern: &str, text: &str) -> Result<(), TestCaseError> {
    let fast = bpe::Splitter::new(pattern).expect("fast");
    let reference = bpe::Splitter::regex(pattern).expect("regex");
    let got: Vec<&str> = fast.pieces(text).collect();
    let want: Vec<&str> = reference.pieces(text).collect();
    prop_assert_eq!(got, want, "text {:?}", text);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn scanner_matches_fancy_regex(text in tricky_string()) {
        check_split(bpe::DEFAULT_PATTERN, &text)?;
        check_split(bpe::GPT4_PATTERN, &text)?;
    }

    #[test]
    fn decode_inverts_encode(text in tricky_string()) {
        let tok = trained();
        prop_assert_eq!(tok.decode(&tok.encode(&text)), text.clone());
        let fixture = fixture();
        prop_assert_eq!(fixture.decode(&fixture.encode(&text)), text);
    }

    #[test]
    fn encode_matches_tiktoken(text in tricky_string()) {
        prop_assert_eq!(trained().encode(&text), oracle().encode_ordinary(&text));
    }

    #[test]
    fn batch_encode_equals_sequential(texts in prop::collection::vec(tricky_string(), 0..12)) {
        let tok = trained();
        let seq: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t)).collect();
        prop_assert_eq!(tok.batch_encode(&texts), seq);
    }
}

/// Real text of several kinds (WikiText-2 too, from the full data mirror when there is one): every
/// line and the whole text encode as tiktoken does.
#[test]
fn real_text_matches_tiktoken_and_regex() {
    let mut texts = vec![common::shakespeare_1m().chars().skip(500_000).take(100_000).collect::<String>()];
    if let Some(mirror) = common::full_mirror("real_text_matches_tiktoken_and_regex") {
        let wiki = std::fs::read_to_string(mirror.join("pretrain/wikitext-2/valid.txt")).expect("wikitext");
        texts.push(wiki.chars().take(200_000).collect());
    }
    texts.push(include_str!("properties.rs").to_string());
    let tok = trained();
    for text in &texts {
        assert_eq!(tok.encode(text), oracle().encode_ordinary(text));
        let fast = bpe::Splitter::new(bpe::DEFAULT_PATTERN).unwrap();
        let reference = bpe::Splitter::regex(bpe::DEFAULT_PATTERN).unwrap();
        assert!(fast.pieces(text).eq(reference.pieces(text)));
        assert_eq!(tok.decode(&tok.encode(text)), *text);
    }
}

/// Long pieces take the heap path; it must give tiktoken's ids too.
#[test]
fn long_pieces_match_tiktoken() {
    let tok = trained();
    let words = ["the", "king", "and", "queen", "thou", "art", "xyzzy", "é"];
    for n in [127, 128, 129, 500, 3000] {
        let mut s = String::new();
        let mut i = 0usize;
        while s.len() < n {
            s.push_str(words[i % words.len()]);
            i = i.wrapping_mul(31).wrapping_add(7);
        }
        assert_eq!(tok.encode(&s), oracle().encode_ordinary(&s), "length {}", s.len());
    }
}
