//! Shards on disk: building them from local files, reading the mirrors' real shards, and the
//! errors a user sees for an empty directory, a corrupt file or a shard without `text`.

mod common;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use nanochat::data::dataset::{build, list_shards, split_shards, write_shard, BuildOptions, Shard, Split};
use nanochat::data::loader::{Loader, LoaderConfig};

fn tiny_tokenizer() -> bpe::Tokenizer {
    let text = ["a small corpus for a small tokenizer", "with a few words, and numbers 12 34"];
    bpe::Tokenizer::train(text.iter().cycle().take(50), 300, bpe::DEFAULT_PATTERN).expect("train")
}

fn all_docs(dir: &Path) -> Vec<String> {
    let mut docs = Vec::new();
    for path in list_shards(dir).unwrap() {
        let shard = Shard::open(&path).unwrap();
        for g in 0..shard.num_row_groups() {
            docs.extend(shard.read_texts(g).unwrap());
        }
    }
    docs
}

fn error_of(dir: &Path) -> String {
    let cfg = LoaderConfig::new(dir.to_path_buf(), Split::Train, 2, 8);
    let tok = tiny_tokenizer();
    match Loader::new(&tok, &cfg, None) {
        Err(e) => format!("{e:#}"),
        Ok(loader) => match loader.filter_map(Result::err).next() {
            Some(e) => format!("{e:#}"),
            None => panic!("expected an error"),
        },
    }
}

#[test]
fn build_writes_train_and_validation_shards_from_txt_jsonl_gz_and_parquet() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in");
    std::fs::create_dir_all(&inputs).unwrap();
    let txt = inputs.join("book.txt");
    std::fs::write(
        &txt,
        "First paragraph here.\r\n\r\nSecond one.\n\n\n\nThird, a much longer paragraph of many words.",
    )
    .unwrap();
    let jsonl = inputs.join("web.jsonl");
    std::fs::write(&jsonl, "{\"text\": \"json doc one\"}\n\n{\"text\": \"json doc two\", \"id\": 3}\n").unwrap();
    let gz = inputs.join("more.jsonl.gz");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(b"{\"text\": \"gz doc\"}\n").unwrap();
    std::fs::write(&gz, enc.finish().unwrap()).unwrap();
    let pq = inputs.join("old.parquet");
    let pq_docs: Vec<String> = (0..1030).map(|i| format!("parquet doc {i}")).collect();
    write_shard(&pq, &pq_docs).unwrap();

    let out = tmp.path().join("out");
    let opts = BuildOptions { out: out.clone(), shard_chars: 6_000, val_every: 10, max_doc_chars: 40 };
    let summary = build(&[txt, jsonl, gz, pq], &opts).unwrap();

    let mut input_docs: Vec<String> = vec![
        "First paragraph here.\n\nSecond one.".into(),
        "Third, a much longer paragraph of many".into(),
        "words.".into(),
    ];
    input_docs.extend(["json doc one", "json doc two", "gz doc"].map(String::from));
    input_docs.extend(pq_docs);
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (i, d) in input_docs.into_iter().enumerate() {
        if (i + 1) % 10 == 0 {
            val.push(d)
        } else {
            train.push(d)
        }
    }
    let shards = list_shards(&out).unwrap();
    assert_eq!(shards.len(), summary.train_shards + 1);
    assert!(summary.train_shards >= 2, "6,000-char shards should split the input");
    assert_eq!((summary.train_docs, summary.val_docs), (train.len(), val.len()));
    assert_eq!(all_docs(&out)[..train.len()], train[..]);
    let val_shard = split_shards(&out, Split::Val).unwrap();
    let val_docs = Shard::open(&val_shard[0]).unwrap().read_texts(0).unwrap();
    assert_eq!(val_docs, val);
    assert!(std::fs::read_dir(&out).unwrap().all(|e| e.unwrap().path().extension().is_some_and(|x| x == "parquet")));
}

#[test]
fn build_reports_bad_input_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let opts =
        |out: &str| BuildOptions { out: tmp.path().join(out), shard_chars: 1000, val_every: 2, max_doc_chars: 100 };
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"ok\"}\n{\"body\": \"no text\"}\n").unwrap();
    let err = build(&[bad], &opts("a")).unwrap_err();
    assert!(format!("{err:#}").contains("line 2: no string field `text`"), "{err:#}");
    let csv = tmp.path().join("data.csv");
    std::fs::write(&csv, "text\nhello\n").unwrap();
    let err = build(&[csv], &opts("b")).unwrap_err();
    assert!(format!("{err:#}").contains("unsupported input"), "{err:#}");
    let one = tmp.path().join("one.txt");
    std::fs::write(&one, "just one document").unwrap();
    let err = build(std::slice::from_ref(&one), &opts("c")).unwrap_err();
    assert!(format!("{err:#}").contains("lower --val-every"), "{err:#}");
    let two = tmp.path().join("two.txt");
    std::fs::write(&two, "doc one\n\ndoc two").unwrap();
    let mut o = opts("d");
    o.max_doc_chars = 7;
    build(std::slice::from_ref(&two), &o).unwrap();
    let err = build(&[two], &o).unwrap_err();
    assert!(format!("{err:#}").contains("already holds parquet files"), "{err:#}");
}

#[test]
fn empty_or_missing_directory_says_to_download_first() {
    let tmp = tempfile::tempdir().unwrap();
    let err = error_of(tmp.path());
    assert!(err.contains("no parquet shards in") && err.contains("nanochat data download"), "{err}");
    let err = error_of(&tmp.path().join("nope"));
    assert!(err.contains("cannot read shard directory") && err.contains("nanochat data download"), "{err}");
    write_shard(&tmp.path().join("shard_00000.parquet"), &["only"]).unwrap();
    let err = error_of(tmp.path());
    assert!(err.contains("training needs at least two"), "{err}");
}

#[test]
fn corrupt_and_truncated_shards_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.parquet");
    write_shard(&good, &(0..50).map(|i| format!("document {i}")).collect::<Vec<_>>()).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    std::fs::remove_file(&good).unwrap();

    std::fs::write(tmp.path().join("shard_00000.parquet"), b"<html>not found</html>").unwrap();
    std::fs::write(tmp.path().join("shard_00001.parquet"), &bytes).unwrap();
    let err = error_of(tmp.path());
    assert!(err.contains("shard_00000.parquet is not a valid parquet file"), "{err}");

    // A truncated second shard is found when the loader reaches it, and reported by the iterator.
    std::fs::write(tmp.path().join("shard_00000.parquet"), &bytes).unwrap();
    std::fs::write(tmp.path().join("shard_00001.parquet"), &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(tmp.path().join("shard_00002.parquet"), &bytes).unwrap();
    let err = error_of(tmp.path());
    assert!(err.contains("shard_00001.parquet is not a valid parquet file"), "{err}");
}

#[test]
fn shard_without_text_column_is_explained() {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let tmp = tempfile::tempdir().unwrap();
    for name in ["shard_00000.parquet", "shard_00001.parquet"] {
        let schema = parquet::schema::parser::parse_message_type(
            "message schema { REQUIRED BYTE_ARRAY content (STRING); REQUIRED INT32 id; }",
        )
        .unwrap();
        let file = std::fs::File::create(tmp.path().join(name)).unwrap();
        let mut w = SerializedFileWriter::new(file, Arc::new(schema), Arc::new(WriterProperties::default())).unwrap();
        let mut rg = w.next_row_group().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>().write_batch(&[ByteArray::from("hi")], None, None).unwrap();
        col.close().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<parquet::data_type::Int32Type>().write_batch(&[1], None, None).unwrap();
        col.close().unwrap();
        rg.close().unwrap();
        w.close().unwrap();
    }
    let err = error_of(tmp.path());
    assert!(err.contains("has no `text` column (columns: content, id)"), "{err}");
}

/// The Gutenberg shards of the small data mirror, and of the full offline mirror when
/// `NANOCHAT_DATA_MIRROR` names it: one row group of the real data, read sparingly.
#[test]
fn reads_a_row_group_of_the_gutenberg_mirrors() {
    // the small mirror: the first 58 documents of the full one's first row group, 440 k characters
    check_gutenberg(&common::data().join("pretrain/gutenberg"), 1, 58, 400_000..500_000);
    if let Some(full) = common::full_mirror("reads_a_row_group_of_the_gutenberg_mirrors") {
        check_gutenberg(&full.join("pretrain/gutenberg"), 7, 1024, 5_000_000..10_000_000);
    }
}

/// Two training shards and the validation shard 00021; the first training shard has `row_groups`
/// row groups, the first of `docs` documents of about 7,500 characters (`chars` in all).
fn check_gutenberg(mirror: &Path, row_groups: usize, docs: usize, chars: std::ops::Range<usize>) {
    let val = split_shards(mirror, Split::Val).unwrap();
    assert!(val[0].ends_with("shard_00021.parquet"));
    let train = split_shards(mirror, Split::Train).unwrap();
    assert_eq!(train.len(), 2);
    let shard = Shard::open(&train[0]).unwrap();
    assert_eq!(shard.num_row_groups(), row_groups);
    let texts = shard.read_texts(0).unwrap();
    assert_eq!(texts.len(), docs);
    assert!(texts.iter().all(|d| !d.trim().is_empty()), "empty document");
    let total: usize = texts.iter().map(|d| d.chars().count()).sum();
    assert!(chars.contains(&total), "about 7,500 chars per document, got {total} in all");
}
