//! Bad input: a clear error or a correct result, never a panic or a memory blow-up.

mod common;

use bpe::{Error, Tokenizer, DEFAULT_PATTERN};

#[test]
fn empty_corpus_is_an_error() {
    let none: [&str; 0] = [];
    assert!(matches!(Tokenizer::train(none, 1000, DEFAULT_PATTERN), Err(Error::EmptyCorpus)));
    assert!(matches!(Tokenizer::train(["", ""], 1000, DEFAULT_PATTERN), Err(Error::EmptyCorpus)));
}

#[test]
fn vocab_below_bytes_and_specials_is_an_error() {
    let err = Tokenizer::train(["hello"], 264, DEFAULT_PATTERN).err().expect("must fail");
    assert!(matches!(err, Error::VocabTooSmall { min: 265, .. }));
    assert!(err.to_string().contains("at least"), "{err}");
    // Exactly 256 + 9 is valid: no merges at all.
    let tok = Tokenizer::train(["hello"], 265, DEFAULT_PATTERN).unwrap();
    assert_eq!(tok.encode("hello"), b"hello".iter().map(|&b| b as u32).collect::<Vec<_>>());
}

#[test]
fn bad_pattern_is_an_error() {
    assert!(matches!(Tokenizer::train(["x"], 300, "(unclosed"), Err(Error::Pattern(_))));
}

#[test]
fn small_corpus_stops_when_pairs_run_out() {
    // "ab" has a single pair: asking for many merges yields one.
    let tok = Tokenizer::train(["ab"], 400, DEFAULT_PATTERN).unwrap();
    assert_eq!(tok.n_mergeable(), 257);
    assert_eq!(tok.encode("ab"), vec![256]);
}

#[test]
fn nul_bytes_and_control_characters_round_trip() {
    let docs = ["a\0b\0c\0\0\0", "\u{1}\u{2}\u{7f}\r\n\0", "normal text\0 with nul"];
    let tok = Tokenizer::train(docs, 300, DEFAULT_PATTERN).unwrap();
    for d in docs {
        assert_eq!(tok.decode(&tok.encode(d)), d);
    }
}

#[test]
fn invalid_utf8_decodes_without_panic() {
    let tok = common::fixture_tokenizer();
    // Lone continuation bytes, truncated sequences, ids beyond the vocabulary.
    let s = tok.decode(&[0x80, 0xF0, 0x9F, 65, 0xFF, 5000, u32::MAX]);
    assert_eq!(s, "\u{FFFD}\u{FFFD}A\u{FFFD}");
    assert_eq!(tok.decode_bytes(&[0xF0, 0x9F]), vec![0xF0, 0x9F]);
}

#[test]
fn ten_megabyte_word_trains_and_encodes() {
    // One "word" with no spaces is one pre-token of 10 MB.
    let word: String = (0..10_000_000u64).map(|i| (b'a' + ((i * 7 + i / 13) % 26) as u8) as char).collect();
    let tok = Tokenizer::train([word.as_str()], 300, DEFAULT_PATTERN).unwrap();
    assert_eq!(tok.n_mergeable(), 291);
    let ids = tok.encode(&word);
    assert!(ids.len() < word.len());
    assert_eq!(tok.decode_bytes(&ids), word.as_bytes());
}

fn saved(dir: &std::path::Path) -> Tokenizer {
    let tok = common::fixture_tokenizer();
    tok.save(dir).unwrap();
    tok
}

#[test]
fn save_load_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let tok = saved(dir);
    let back = Tokenizer::load(dir).unwrap();
    assert_eq!(back.mergeable_tokens(), tok.mergeable_tokens());
    assert_eq!(back.pattern(), tok.pattern());
    assert_eq!(back.fingerprint(), tok.fingerprint());
    let text = "Round trip: 123 ſ 😀";
    assert_eq!(back.encode(text), tok.encode(text));
    // The ranks file is a plain tiktoken file: identical to the original's.
    let ranks = std::fs::read_to_string(dir.join(bpe::format::RANKS_FILE)).unwrap();
    assert_eq!(ranks, std::fs::read_to_string(common::fixture("mergeable_ranks.tiktoken")).unwrap());
}

#[test]
fn truncated_or_corrupt_files_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    saved(dir);
    let ranks_path = dir.join(bpe::format::RANKS_FILE);
    let meta_path = dir.join(bpe::format::META_FILE);
    let ranks = std::fs::read(&ranks_path).unwrap();
    let meta = std::fs::read(&meta_path).unwrap();
    let expect_corrupt = |what: &str| {
        let err = Tokenizer::load(dir).err().unwrap_or_else(|| panic!("{what}: load must fail"));
        let msg = err.to_string();
        assert!(matches!(err, Error::Corrupt { .. } | Error::Io { .. }), "{what}: {msg}");
        assert!(msg.contains("tokenizer."), "{what}: message names the file: {msg}");
    };

    std::fs::write(&ranks_path, &ranks[..ranks.len() / 2]).unwrap();
    expect_corrupt("truncated ranks");
    let mut flipped = ranks.clone();
    flipped[100] = if flipped[100] == b'A' { b'B' } else { b'A' };
    std::fs::write(&ranks_path, &flipped).unwrap();
    expect_corrupt("flipped byte");
    std::fs::remove_file(&ranks_path).unwrap();
    expect_corrupt("missing ranks");
    std::fs::write(&ranks_path, &ranks).unwrap();

    std::fs::write(&meta_path, &meta[..meta.len() - 10]).unwrap();
    expect_corrupt("truncated json");
    let text = String::from_utf8(meta.clone()).unwrap().replace("\"version\": 1", "\"version\": 99");
    std::fs::write(&meta_path, text).unwrap();
    expect_corrupt("future version");
    std::fs::write(&meta_path, &meta).unwrap();
    assert!(Tokenizer::load(dir).is_ok());
}

#[test]
fn parse_ranks_rejects_garbage() {
    let p = std::path::Path::new("x.tiktoken");
    assert!(bpe::format::parse_ranks("AA== 0\nAQ== 2\n", p).is_err(), "ranks out of order");
    assert!(bpe::format::parse_ranks("!!!! 0\n", p).is_err(), "bad base64");
    assert!(bpe::format::parse_ranks("AA==\n", p).is_err(), "missing rank");
    assert!(bpe::format::parse_ranks(" 0\n", p).is_err(), "empty token");
    // A vocabulary without every single byte cannot encode arbitrary text.
    let tokens = vec![b"a".to_vec(), b"b".to_vec()];
    assert!(Tokenizer::from_tokens(tokens, DEFAULT_PATTERN).is_err());
}
