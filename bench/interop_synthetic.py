"""A checkpoint in the original nanochat's layout at the size of its released models, with random weights,
for measuring what `nanochat import` and loading the imported model cost in memory and time at real size
(no real d20/d32 checkpoint is at hand offline).

    /work/venv-ref/bin/python bench/interop_synthetic.py --preset d20 --out /tmp/nc-synth
    /usr/bin/time -v target/release/nanochat import /tmp/nc-synth/base_checkpoints/d20   # "Maximum resident set size"

Writes `OUT/base_checkpoints/<preset>/model_000001.pt` (as v0 saves it: the embedding in bf16, the blocks in
fp32) with `meta_000001.json`, and `OUT/tokenizer/tokenizer.pkl` + `token_bytes.pt`: a tiktoken Encoding of
65,536 tokens (the 256 bytes, then arbitrary distinct byte strings standing in for merges, then the nine
chat specials), pickled as v0's tokenizer saves it. The script itself holds the whole state dict, as
torch.save needs it (2.2 GB for d20, 7 GB for d32).
"""

import argparse
import json
import pickle
from pathlib import Path

import tiktoken
import torch

PRESETS = {"d20": (20, 1280, 10), "d32": (32, 2048, 16)}
VOCAB = 65536
SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="d20")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    depth, width, heads = PRESETS[args.preset]

    tok_dir = args.out / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    n = VOCAB - len(SPECIALS)
    ranks = {bytes([b]): b for b in range(256)}
    i = 0
    while len(ranks) < n:
        ranks.setdefault(f" t{i}".encode(), len(ranks))
        i += 1
    enc = tiktoken.Encoding(name="rustbpe", pat_str=PATTERN, mergeable_ranks=ranks,
                            special_tokens={s: n + j for j, s in enumerate(SPECIALS)})
    with open(tok_dir / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)
    lengths = [len(enc.decode([t]).encode("utf-8")) for t in range(n)] + [0] * len(SPECIALS)
    torch.save(torch.tensor(lengths, dtype=torch.int32), tok_dir / "token_bytes.pt")

    ckpt = args.out / "base_checkpoints" / args.preset
    ckpt.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    c = width
    shapes = [("transformer.wte.weight", (VOCAB, c), torch.bfloat16)]
    for layer in range(depth):
        h = f"transformer.h.{layer}"
        shapes += [(f"{h}.attn.c_q.weight", (c, c), torch.float32), (f"{h}.attn.c_k.weight", (c, c), torch.float32),
                   (f"{h}.attn.c_v.weight", (c, c), torch.float32), (f"{h}.attn.c_proj.weight", (c, c), torch.float32),
                   (f"{h}.mlp.c_fc.weight", (4 * c, c), torch.float32),
                   (f"{h}.mlp.c_proj.weight", (c, 4 * c), torch.float32)]
    shapes.append(("lm_head.weight", (VOCAB, c), torch.float32))
    state = {name: (torch.randn(shape, generator=gen) * shape[1] ** -0.5).to(dtype) for name, shape, dtype in shapes}
    torch.save(state, ckpt / "model_000001.pt")
    config = dict(sequence_len=2048, vocab_size=VOCAB, n_layer=depth, n_head=heads, n_kv_head=heads, n_embd=c)
    (ckpt / "meta_000001.json").write_text(json.dumps({"step": 1, "model_config": config}, indent=2))
    print(f"wrote {ckpt} ({sum(v.numel() for v in state.values()) / 1e6:.0f} M parameters)")


if __name__ == "__main__":
    main()
