//! Parity with the original: merges, ranks, encodings, decodings and token lengths computed by
//! nanochat v0 (rustbpe + tiktoken) in `tests/fixtures/tokenizer` (made by `bench/fixtures/`).

mod common;

use common::*;

#[test]
fn pattern_is_the_original() {
    let pattern = std::fs::read_to_string(fixture("pattern.txt")).unwrap();
    assert_eq!(pattern, bpe::DEFAULT_PATTERN);
}

#[test]
fn training_reproduces_the_original_merges_and_ranks() {
    let text = shakespeare_1m();
    let tok = bpe::Tokenizer::train([text.as_str()], 1024, bpe::DEFAULT_PATTERN).unwrap();
    let merges = read_json("merges.json");
    let expected: Vec<(u32, u32)> = merges["merges"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let m = ids(m);
            assert_eq!(m[2], 256 + i as u32);
            (m[0], m[1])
        })
        .collect();
    let got = bpe::learn_merges([text.as_str()], 1024 - 256 - 9, bpe::DEFAULT_PATTERN, &|_| {}).unwrap();
    assert_eq!(got.len(), expected.len());
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(g, e, "merge {i} differs");
    }
    assert_eq!(tok.vocab_size(), 1024);
    let ranks = std::fs::read_to_string(fixture("mergeable_ranks.tiktoken")).unwrap();
    assert_eq!(bpe::format::ranks_to_string(tok.mergeable_tokens()), ranks);
}

#[test]
fn special_token_ids() {
    let tok = fixture_tokenizer();
    let specials = read_json("special_tokens.json");
    for (name, id) in specials["special_tokens"].as_object().unwrap() {
        assert_eq!(tok.special_id(name), Some(id.as_u64().unwrap() as u32), "{name}");
    }
    assert_eq!(tok.bos_id() as u64, specials["bos_id"].as_u64().unwrap());
    assert_eq!(tok.vocab_size(), 1024);
}

#[test]
fn encode_cases_match_the_original() {
    let tok = fixture_tokenizer();
    let cases = read_json("encode_cases.json");
    let cases = cases["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 60);
    let mut texts = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text), ids(&case["ids"]), "encode({text:?})");
        assert_eq!(tok.decode(&ids(&case["ids"])), case["decoded"].as_str().unwrap(), "decode of {text:?}");
        texts.push(text.to_string());
    }
    let batch = tok.batch_encode(&texts);
    for (case, got) in cases.iter().zip(batch) {
        assert_eq!(got, ids(&case["ids"]));
    }
}

#[test]
fn decode_cases_match_the_original() {
    let tok = fixture_tokenizer();
    let cases = read_json("decode_cases.json");
    for case in cases["cases"].as_array().unwrap() {
        assert_eq!(tok.decode(&ids(&case["ids"])), case["decoded"].as_str().unwrap(), "{}", case["name"]);
    }
    for case in cases["id_to_token"].as_array().unwrap() {
        let id = case["id"].as_u64().unwrap() as u32;
        assert_eq!(tok.id_to_token(id), case["token"].as_str().unwrap(), "id {id}");
    }
}

#[test]
fn token_bytes_are_raw_byte_lengths() {
    let tok = fixture_tokenizer();
    let meta = read_json("meta.json");
    let raw = ids(&meta["token_raw_byte_len"]);
    let got = tok.token_bytes();
    assert_eq!(&got[..raw.len()], &raw[..]);
    assert!(got[raw.len()..].iter().all(|&b| b == 0), "specials count 0 bytes");
    assert_eq!(got.len(), 1024);
}

#[test]
fn special_strings_in_text_are_ordinary_unless_asked() {
    let tok = fixture_tokenizer();
    let text = "a<|bos|>b<|assistant_end|><|nope|>";
    let plain = tok.encode(text);
    assert!(plain.iter().all(|&id| id < tok.bos_id()));
    let with = tok.encode_with_special(text);
    let bos = tok.bos_id();
    let end = tok.special_id("<|assistant_end|>").unwrap();
    let mut expected = tok.encode("a");
    expected.push(bos);
    expected.extend(tok.encode("b"));
    expected.push(end);
    expected.extend(tok.encode("<|nope|>"));
    assert_eq!(with, expected);
    assert_eq!(tok.decode(&with), text);
}
