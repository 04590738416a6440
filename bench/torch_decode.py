"""PyTorch reference for `nanochat bench decode`: inference speed of nanochat v0's GPT with its
KV cache, on the CPU in fp32 (or bf16 with --dtype bfloat16), for a side-by-side comparison with the Rust port.

The model and the generation loop are a minimal, faithful copy of the original `gpt.py` and
`engine.py` (DESIGN.md §4): parameter-free RMSNorm via F.rms_norm, rotary embeddings (base 10,000,
halves rotated, bf16 tables), QK-norm after rotary, GQA attention through
F.scaled_dot_product_attention, ReLU² MLP, untied embedding and lm_head, logits softcapped at 15;
the KV cache is one preallocated (layers, 2, B, H, T, D) tensor written in place; the prompt is
prefilled once at batch 1 (logits of every position, as the original computes them), copied into a
batch-N cache, and every step feeds one token per row and takes the argmax (temperature 0).

Measured, each as the median of --runs runs after one warm-up:
- time to first token for prompts of 100 and 512 tokens: prefill + argmax of the last position;
- decode tokens/s at batch 1 and 8 after a 100-token prompt: --new-tokens steps, B tokens each.

    /work/venv-ref/bin/python bench/torch_decode.py [--runs 5] [--new-tokens 128] [--threads 2]
    /work/venv-ref/bin/python bench/torch_decode.py --preset d20            # the original's model sizes
    /work/venv-ref/bin/python bench/torch_decode.py --preset d32 --impl transformers [--hf DIR]

`--preset d20|d32` sets the shape of the original's released models (as `nanochat bench decode --preset`).
`--impl transformers` measures transformers' `NanoChatForCausalLM` instead, at the same shape with random
weights or, with `--hf DIR`, an exported model (`nanochat export --format hf DIR`): time to first token is
one forward pass over the prompt, and decode tokens/s comes from `generate` (greedy, its own KV cache) as
the difference between --new-tokens steps and one step.

Prints per-measurement lines to stderr and one JSON line to stdout.
"""

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x, cos, sin):
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], 3).to(x.dtype)


class KVCache:
    """The original's cache: one buffer for every layer, keys and values, written in place."""

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers):
        self.kv_shape = (num_layers, 2, batch_size, num_heads, seq_len, head_dim)
        self.kv_cache = None
        self.pos = 0

    def prefill(self, other):
        # copy a batch-1 prefill into this (batch-N) cache, broadcasting over the batch
        self.kv_cache = torch.empty(self.kv_shape, dtype=other.kv_cache.dtype)
        self.kv_cache[:, :, :, :, : other.pos, :] = other.kv_cache[:, :, :, :, : other.pos, :]
        self.pos = other.pos

    def insert_kv(self, layer_idx, k, v):
        if self.kv_cache is None:
            self.kv_cache = torch.empty(self.kv_shape, dtype=k.dtype, device=k.device)
        t0, t1 = self.pos, self.pos + k.size(2)
        assert t1 <= self.kv_cache.size(4), "kv cache full"
        self.kv_cache[layer_idx, 0, :, :, t0:t1] = k
        self.kv_cache[layer_idx, 1, :, :, t0:t1] = v
        if layer_idx == self.kv_cache.size(0) - 1:
            self.pos = t1
        return self.kv_cache[layer_idx, 0, :, :, :t1], self.kv_cache[layer_idx, 1, :, :, :t1]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = cfg["n_head"], cfg["n_kv_head"]
        self.head_dim = cfg["n_embd"] // cfg["n_head"]
        c = cfg["n_embd"]
        self.c_q = nn.Linear(c, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(c, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(c, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(c, c, bias=False)

    def forward(self, x, cos_sin, kv_cache):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        Tq, Tk = q.size(2), k.size(2)
        gqa = self.n_head != self.n_kv_head
        if kv_cache is None or Tq == Tk:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif Tq == 1:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=gqa)
        else:
            # a chunk after a prefix: the prefix is visible, causal inside the chunk
            mask = torch.zeros((Tq, Tk), dtype=torch.bool)
            prefix = Tk - Tq
            mask[:, :prefix] = True
            mask[:, prefix:] = torch.tril(torch.ones((Tq, Tq), dtype=torch.bool))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c = cfg["n_embd"]
        self.c_fc = nn.Linear(c, 4 * c, bias=False)
        self.c_proj = nn.Linear(4 * c, c, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.mlp = MLP(cfg)

    def forward(self, x, cos_sin, kv_cache):
        x = x + self.attn(norm(x), cos_sin, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        c = cfg["n_embd"]
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(cfg["vocab_size"], c),
                "h": nn.ModuleList([Block(cfg, i) for i in range(cfg["n_layer"])]),
            }
        )
        self.lm_head = nn.Linear(c, cfg["vocab_size"], bias=False)
        head_dim = c // cfg["n_head"]
        self.rotary_seq_len = cfg["sequence_len"] * 10
        cos, sin = self._precompute_rotary(self.rotary_seq_len, head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def init_weights(self):
        # v0: embedding N(0, 1); lm_head and every c_proj zero; other linears scaled by fan in/out
        for name, p in self.named_parameters():
            if name == "transformer.wte.weight":
                nn.init.normal_(p, 0.0, 1.0)
            elif name == "lm_head.weight" or name.endswith("c_proj.weight"):
                nn.init.zeros_(p)
            else:
                fan_out, fan_in = p.shape
                std = 1.0 / fan_in**0.5 * min(1.0, (fan_out / fan_in) ** 0.5)
                nn.init.normal_(p, 0.0, std)

    @staticmethod
    def _precompute_rotary(seq_len, head_dim, base=10000):
        channel_range = torch.arange(0, head_dim, 2, dtype=torch.float32)
        inv_freq = 1.0 / (base ** (channel_range / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        cos, sin = freqs.cos().bfloat16(), freqs.sin().bfloat16()
        return cos[None, :, None, :], sin[None, :, None, :]

    def forward(self, idx, kv_cache=None):
        B, T = idx.size()
        T0 = 0 if kv_cache is None else kv_cache.pos
        cos_sin = self.cos[:, T0 : T0 + T], self.sin[:, T0 : T0 + T]
        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache)
        x = norm(x)
        logits = self.lm_head(x)
        return 15 * torch.tanh(logits / 15)


def prefill(model, prompt):
    """The original engine's prefill: batch 1, logits of every position, the last one sampled."""
    cfg = model.cfg
    hd = cfg["n_embd"] // cfg["n_head"]
    cache = KVCache(1, cfg["n_kv_head"], len(prompt), hd, cfg["n_layer"])
    ids = torch.tensor([prompt], dtype=torch.long)
    logits = model(ids, kv_cache=cache)[:, -1, :]
    return cache, torch.argmax(logits, dim=-1)


def decode(model, prompt, batch, new_tokens):
    """Prefill, copy into a batch cache, then time `new_tokens` greedy steps; returns seconds."""
    cfg = model.cfg
    hd = cfg["n_embd"] // cfg["n_head"]
    cache1, first = prefill(model, prompt)
    cache = KVCache(batch, cfg["n_kv_head"], len(prompt) + new_tokens, hd, cfg["n_layer"])
    cache.prefill(cache1)
    ids = first.expand(batch).reshape(batch, 1).clone()
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        logits = model(ids, kv_cache=cache)[:, -1, :]
        ids = torch.argmax(logits, dim=-1, keepdim=True)
    return time.perf_counter() - t0


PRESETS = {
    # depth, width, heads; vocabulary 65,536 and context 2,048 (the original's tokenizer and speedrun)
    "d20": (20, 1280, 10),
    "d32": (32, 2048, 16),
}


def transformers_model(cfg, hf_dir, dtype):
    """transformers' NanoChatForCausalLM: the exported model in `hf_dir`, or random weights at `cfg`."""
    from transformers import AutoModelForCausalLM, NanoChatConfig, NanoChatForCausalLM

    if hf_dir:
        return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()
    config = NanoChatConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["n_embd"],
        intermediate_size=4 * cfg["n_embd"],
        num_hidden_layers=cfg["n_layer"],
        num_attention_heads=cfg["n_head"],
        num_key_value_heads=cfg["n_kv_head"],
        max_position_embeddings=cfg["sequence_len"],
    )
    return NanoChatForCausalLM(config).to(dtype).eval()


def hf_ttft(model, prompt):
    t0 = time.perf_counter()
    logits = model(torch.tensor([prompt]), use_cache=True).logits[:, -1, :]
    torch.argmax(logits, dim=-1)
    return time.perf_counter() - t0


def hf_generate(model, prompt, batch, new_tokens):
    x = torch.tensor([prompt] * batch)
    t0 = time.perf_counter()
    model.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return time.perf_counter() - t0


def median_of(runs, f):
    f()  # warm-up
    return statistics.median(f() for _ in range(runs))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="one of the original's sizes")
    ap.add_argument("--impl", choices=("original", "transformers"), default="original")
    ap.add_argument("--hf", default=None, help="with --impl transformers: an exported model directory")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-kv-head", type=int, default=None, help="default: n_head")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="weights and activations (bfloat16: the like-for-like reference for `--weights bf16`)",
    )
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.preset:
        depth, width, heads = PRESETS[args.preset]
        args.n_layer, args.n_embd, args.n_head, args.n_kv_head = depth, width, heads, heads
        args.vocab, args.seq_len = 65536, 2048
    cfg = {
        "sequence_len": args.seq_len,
        "vocab_size": args.vocab,
        "n_layer": args.n_layer,
        "n_head": args.n_head,
        "n_kv_head": args.n_kv_head or args.n_head,
        "n_embd": args.n_embd,
    }
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    if args.impl == "transformers":
        model = transformers_model(cfg, args.hf, dtype)
        if args.hf:
            c = model.config
            cfg.update(vocab_size=c.vocab_size, n_layer=c.num_hidden_layers, n_head=c.num_attention_heads,
                       n_kv_head=c.num_key_value_heads, n_embd=c.hidden_size, sequence_len=c.max_position_embeddings)
            args.vocab = c.vocab_size
    else:
        model = GPT(cfg)
        model.init_weights()
        model.eval()
        model = model.to(dtype)
    gen = torch.Generator().manual_seed(args.seed)
    prompt = lambda n: torch.randint(0, args.vocab, (n,), generator=gen).tolist()  # noqa: E731

    result = {
        "impl": "pytorch" if args.impl == "original" else "transformers",
        "torch": torch.__version__,
        "threads": args.threads,
        "dtype": args.dtype,
        "config": cfg,
    }
    hf = args.impl == "transformers"
    with torch.inference_mode():
        for n in (100, 512):
            p = prompt(n)

            def ttft(p=p):
                if hf:
                    return hf_ttft(model, p)
                t0 = time.perf_counter()
                prefill(model, p)
                return time.perf_counter() - t0

            ms = 1e3 * median_of(args.runs, ttft)
            result[f"ttft_ms_{n}"] = round(ms, 2)
            print(f"time to first token, {n}-token prompt: {ms:.1f} ms", file=sys.stderr)
        p = prompt(100)
        for batch in (1, 8):
            if hf:
                # generate's steps after the first, without its prefill
                full = median_of(args.runs, lambda: hf_generate(model, p, batch, args.new_tokens))
                first = median_of(args.runs, lambda: hf_generate(model, p, batch, 1))
                secs = max(full - first, 1e-9) * args.new_tokens / max(args.new_tokens - 1, 1)
            else:
                secs = median_of(args.runs, lambda: decode(model, p, batch, args.new_tokens))
            tps = batch * args.new_tokens / secs
            result[f"decode_tok_s_b{batch}"] = round(tps, 1)
            print(f"decode at batch {batch}: {tps:.1f} tok/s", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
