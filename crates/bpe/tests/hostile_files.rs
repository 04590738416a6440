//! Tokenizer directories nobody should trust: files far too large (or endless, like a device),
//! vocabularies whose tokens are absurdly long, garbage that matches its own checksum. Each is an
//! error naming the file, fast, without reading or allocating without bound.

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bpe::format::{META_FILE, RANKS_FILE};
use bpe::{Error, Tokenizer, DEFAULT_PATTERN, SPECIAL_TOKENS};

/// 64-bit FNV-1a, the checksum `tokenizer.json` records for the ranks file.
fn fnv1a64(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Writes a tokenizer directory with these tokens (rank = position) and a meta that matches it.
fn write_dir(dir: &Path, tokens: &[Vec<u8>]) {
    let ranks = bpe::format::ranks_to_string(tokens);
    std::fs::write(dir.join(RANKS_FILE), &ranks).unwrap();
    let meta = serde_json::json!({
        "format": "nanochat-bpe", "version": 1, "pattern": DEFAULT_PATTERN, "n_mergeable": tokens.len(),
        "special_tokens": SPECIAL_TOKENS, "ranks_fnv1a64": fnv1a64(ranks.as_bytes()),
    });
    std::fs::write(dir.join(META_FILE), meta.to_string()).unwrap();
}

fn bytes_256() -> Vec<Vec<u8>> {
    (0..=255u8).map(|b| vec![b]).collect()
}

/// Loading `dir` fails within a few seconds with an error naming `file`; the message.
fn load_fails(dir: &Path, file: &str) -> String {
    let start = Instant::now();
    let err = Tokenizer::load(dir).err().expect("loading must fail");
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}: {err}", start.elapsed());
    let msg = err.to_string();
    assert!(matches!(err, Error::Corrupt { .. }), "{msg}");
    assert!(msg.contains(file), "the error names {file}: {msg}");
    msg
}

#[test]
fn a_consistent_directory_loads() {
    let dir = tempfile::tempdir().unwrap();
    let mut tokens = bytes_256();
    tokens.push(b"ab".to_vec());
    write_dir(dir.path(), &tokens);
    let tok = Tokenizer::load(dir.path()).unwrap();
    assert_eq!(tok.encode("ab"), vec![256]);
}

#[test]
fn oversized_files_are_refused_without_reading_them() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), &bytes_256());
    // a sparse 4 GiB meta: refused after reading at most its cap
    let meta = std::fs::File::options().write(true).open(dir.path().join(META_FILE)).unwrap();
    meta.set_len(4 << 30).unwrap();
    let msg = load_fails(dir.path(), META_FILE);
    assert!(msg.contains("larger than"), "{msg}");

    // an endless ranks file (a device)
    write_dir(dir.path(), &bytes_256());
    std::fs::remove_file(dir.path().join(RANKS_FILE)).unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.path().join(RANKS_FILE)).unwrap();
    let msg = load_fails(dir.path(), RANKS_FILE);
    assert!(msg.contains("larger than"), "{msg}");
}

#[test]
fn absurdly_long_tokens_are_refused_fast() {
    // 40 tokens of 200 KB each: indexing them would hash 1.6e12 bytes of prefixes
    let dir = tempfile::tempdir().unwrap();
    let mut tokens = bytes_256();
    for i in 0..40u8 {
        tokens.push(vec![b'a' + i % 26; 200_000 + usize::from(i)]);
    }
    write_dir(dir.path(), &tokens);
    let msg = load_fails(dir.path(), RANKS_FILE);
    assert!(msg.contains("too long to index"), "{msg}");
}

#[test]
fn garbage_with_a_matching_checksum_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), &bytes_256());
    let cases: [&[u8]; 5] = [
        b"not base64 at all\n",
        b"AA== 0\nAQ== 7\n",
        b"AA== 99999999999999999999999\n",
        &[0xff, 0xfe, b' ', b'0', b'\n'],
        b"AA== 0\nAA== 1\n",
    ];
    for ranks in cases {
        std::fs::write(dir.path().join(RANKS_FILE), ranks).unwrap();
        let mut meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(META_FILE)).unwrap()).unwrap();
        meta["ranks_fnv1a64"] = fnv1a64(ranks).into();
        std::fs::write(dir.path().join(META_FILE), meta.to_string()).unwrap();
        load_fails(dir.path(), RANKS_FILE);
    }
}

#[test]
fn a_meta_with_a_huge_token_count_allocates_nothing_for_it() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), &bytes_256());
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(META_FILE)).unwrap()).unwrap();
    meta["n_mergeable"] = u64::MAX.into();
    std::fs::write(dir.path().join(META_FILE), meta.to_string()).unwrap();
    let msg = load_fails(dir.path(), RANKS_FILE);
    assert!(msg.contains("256 tokens"), "{msg}");
    // and the base64 of a huge run decodes only as far as the file goes
    let b64 = base64::engine::general_purpose::STANDARD.encode(vec![b'z'; 1000]);
    assert!(bpe::format::parse_ranks(&format!("{b64} 0\n"), Path::new("x")).is_ok());
}
