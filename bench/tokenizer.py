"""Tokenizer benchmark: nanochat-rs (`nanochat tok bench`) side by side with the original's tools.

The original trains with `rustbpe` and encodes with `tiktoken`. Both run here on the same input
and the same machine as ours, and the outputs are compared for identity:
  - training: the first N characters of the training shards (documents in shard order, the last
    one cut), vocab V (rustbpe gets V - 9: the specials are added after the merges);
  - encoding: every document of the validation shard, one thread and all threads.

Usage (the reference tools live in a virtualenv outside the repo):
  python3 -m venv /work/venv-ref && /work/venv-ref/bin/pip install rustbpe tiktoken pyarrow
  cargo build --release -p nanochat
  /work/venv-ref/bin/python bench/tokenizer.py --data-dir ../shared/data/pretrain/gutenberg
"""

import argparse
import array
import base64
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import pyarrow.parquet as pq
import rustbpe
import tiktoken

PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]


def shards(data_dir):
    return sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir)
                  if f.endswith(".parquet") and not f.startswith("."))


def documents(paths):
    for path in paths:
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            for doc in pf.read_row_group(rg, columns=["text"]).column("text").to_pylist():
                if doc is not None:
                    yield doc


def training_docs(paths, max_chars):
    docs, total = [], 0
    for doc in documents(paths):
        if total + len(doc) >= max_chars:
            docs.append(doc[: max_chars - total])
            return docs
        docs.append(doc)
        total += len(doc)
    return docs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--train-chars", type=int, default=50_000_000)
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--nanochat", default="target/release/nanochat")
    args = ap.parse_args()
    all_shards = shards(args.data_dir)
    train_shards, val_shards = all_shards[:-1], all_shards[-1:]
    threads = os.cpu_count()
    tmp = tempfile.mkdtemp()

    # --- ours (a separate process: its own peak memory) ---
    ours_ranks, ours_ids = os.path.join(tmp, "ours.tiktoken"), os.path.join(tmp, "ours.ids")
    out = subprocess.run([args.nanochat, "tok", "bench", "--shard-dir", args.data_dir,
                          "--train-chars", str(args.train_chars), "--vocab-size", str(args.vocab_size),
                          "--ranks-out", ours_ranks, "--ids-out", ours_ids],
                         check=True, capture_output=True, text=True).stdout
    ours = json.loads(out.strip().splitlines()[-1])

    # --- rustbpe training ---
    docs = training_docs(train_shards, args.train_chars)
    assert sum(len(d) for d in docs) == args.train_chars
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tok = rustbpe.Tokenizer()
    t = time.perf_counter()
    tok.train_from_iterator(iter(docs), args.vocab_size - len(SPECIALS), pattern=PATTERN)
    rustbpe_s = time.perf_counter() - t
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ranks = {bytes(b): r for b, r in tok.get_mergeable_ranks()}
    theirs_lines = "".join(f"{base64.b64encode(b).decode()} {r}\n"
                           for b, r in sorted(ranks.items(), key=lambda kv: kv[1]))
    identical_merges = theirs_lines == open(ours_ranks).read()
    del docs

    # --- tiktoken encoding with rustbpe's ranks ---
    enc = tiktoken.Encoding(name="rustbpe", pat_str=PATTERN, mergeable_ranks=ranks,
                            special_tokens={s: len(ranks) + i for i, s in enumerate(SPECIALS)})
    val = list(documents(val_shards))
    val_bytes = sum(len(d.encode()) for d in val)
    t = time.perf_counter()
    ids = [enc.encode_ordinary(d) for d in val]
    single_s = time.perf_counter() - t
    t = time.perf_counter()
    ids_batch = enc.encode_ordinary_batch(val, num_threads=threads)
    batch_s = time.perf_counter() - t
    assert ids == ids_batch
    flat = array.array("I", (i for doc in ids for i in doc))
    ours_flat = array.array("I")
    with open(ours_ids, "rb") as f:
        ours_flat.frombytes(f.read())
    identical_ids = flat == ours_flat

    result = {
        "machine": {"cpus": threads},
        "train": {"chars": args.train_chars, "vocab_size": args.vocab_size,
                  "rustbpe_s": rustbpe_s, "ours_s": ours["train_seconds"],
                  "speedup": rustbpe_s / ours["train_seconds"], "identical_merges": identical_merges,
                  "python_peak_rss_mb_before_training": rss_before, "python_peak_rss_mb_after_training": rss_after, "ours_peak_rss_mb": ours["peak_rss_mb"]},
        "encode": {"bytes": val_bytes, "tokens": len(flat),
                   "tiktoken_1t_mb_s": val_bytes / single_s / 1e6,
                   "ours_1t_mb_s": ours["encode_single_thread_mb_s"],
                   "tiktoken_all_mb_s": val_bytes / batch_s / 1e6,
                   "ours_all_mb_s": ours["encode_all_threads_mb_s"],
                   "identical_ids": identical_ids},
    }
    result["encode"]["speedup_1t"] = result["encode"]["ours_1t_mb_s"] / result["encode"]["tiktoken_1t_mb_s"]
    result["encode"]["speedup_all"] = result["encode"]["ours_all_mb_s"] / result["encode"]["tiktoken_all_mb_s"]
    print(json.dumps(result, indent=2))
    if not (identical_merges and identical_ids):
        sys.exit("outputs differ from the original's")


if __name__ == "__main__":
    main()
