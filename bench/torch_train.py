"""PyTorch reference for `nanochat bench train`: training-step throughput of nanochat v0's GPT
on random tokens, on the CPU in fp32, for a side-by-side comparison with the Rust port.

The model is a minimal, faithful copy of the original `gpt.py` (DESIGN.md §4): parameter-free
RMSNorm via F.rms_norm, rotary embeddings (base 10,000, halves rotated, bf16-rounded tables),
QK-norm after rotary, GQA causal attention through F.scaled_dot_product_attention, ReLU² MLP,
untied embedding and lm_head, logits softcapped at 15, cross-entropy with ignore_index -1.

Optimizer (--opt, default muon): the same split as the Rust benchmark and v0 base_train: Muon
(Nesterov momentum, 5 quintic Newton-Schulz steps in fp32) for the block matrices, AdamW (betas
(0.8, 0.95), eps 1e-10) for the embedding and lm_head, gradient clipping at 1.0. --opt adamw
uses AdamW for everything (cheaper optimizer step).

--dtype bfloat16 is the like-for-like reference for `nanochat bench train --bf16`: the forward pass
and the loss run under CPU autocast to bfloat16 (every matmul in bf16, fp32 master weights and
optimizer state, as the original trains on GPUs) and Muon's Newton-Schulz iteration runs in bf16,
as v0's does.

The model and loss run under torch.compile unless --eager; when compiling fails the script falls
back to eager and says so in its JSON line ("compiled": false, "compile_error": ...). The
first steps are warm-up (compilation happens there). Prints per-step times to stderr and one JSON
line to stdout.

    /work/venv-ref/bin/python bench/torch_train.py [--steps 5] [--warmup 3] [--threads 2] [--dtype bfloat16]
"""

import argparse
import json
import math
import resource
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
    return torch.cat([y1, y2], 3)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, n_kv_head):
        super().__init__()
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.head_dim = n_embd // n_head
        self.c_q = nn.Linear(n_embd, n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(n_embd, n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(n_embd, n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_head != self.n_kv_head)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, n_embd, n_head, n_kv_head):
        super().__init__()
        self.attn = CausalSelfAttention(n_embd, n_head, n_kv_head)
        self.mlp = MLP(n_embd)

    def forward(self, x, cos, sin):
        x = x + self.attn(norm(x), cos, sin)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, n_layer, n_embd, n_head, n_kv_head, vocab, seq_len):
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab, n_embd),
                h=nn.ModuleList([Block(n_embd, n_head, n_kv_head) for _ in range(n_layer)]),
            )
        )
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        head_dim = n_embd // n_head
        rotary_len = seq_len * 10
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(rotary_len, dtype=torch.float32), inv_freq)
        # v0 keeps the tables in bf16; fp32 * bf16 promotes to fp32, so bf16-rounded fp32 is the same
        cos = freqs.cos().bfloat16().float()[None, :, None, :]
        sin = freqs.sin().bfloat16().float()[None, :, None, :]
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        # v0: embedding N(0, 1); lm_head and every c_proj zero; other linears scaled by fan in/out
        nn.init.normal_(self.transformer.wte.weight, 0.0, 1.0)
        for name, p in self.named_parameters():
            if name == "lm_head.weight" or name.endswith("c_proj.weight"):
                p.zero_()
            elif name != "transformer.wte.weight":
                fan_out, fan_in = p.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        T = idx.size(1)
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos, sin)
        x = norm(x)
        logits = self.lm_head(x)
        logits = 15 * torch.tanh(logits / 15)
        logits = logits.float()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def zeropower_via_newtonschulz5(G, steps=5, dtype=torch.float32):
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.to(dtype)
    if G.size(-2) > G.size(-1):
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if G.size(-2) > G.size(-1):
        X = X.mT
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    """v0's single-device Muon: Nesterov momentum, orthogonalised update, scaled for tall shapes."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, ns_dtype=torch.float32):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - group["momentum"])
                g = g.lerp_(buf, group["momentum"]) if group["nesterov"] else buf
                g = zeropower_via_newtonschulz5(g, steps=group["ns_steps"], dtype=self.ns_dtype)
                p.add_(g, alpha=-group["lr"] * max(1, p.size(-2) / p.size(-1)) ** 0.5)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-kv-head", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--opt", choices=["muon", "adamw"], default="muon")
    ap.add_argument("--eager", action="store_true", help="do not torch.compile")
    ap.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="bfloat16: forward and loss under CPU autocast, Muon's Newton-Schulz in bf16",
    )
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = GPT(args.n_layer, args.n_embd, args.n_head, args.n_kv_head, args.vocab, args.seq_len)
    n_params = sum(p.numel() for p in model.parameters())
    scale = (args.n_embd / 768) ** -0.5
    adam_groups = [
        dict(params=[model.lm_head.weight], lr=0.004 * scale),
        dict(params=[model.transformer.wte.weight], lr=0.2 * scale),
    ]
    matrices = [p for n, p in model.named_parameters() if n.startswith("transformer.h.")]
    if args.opt == "muon":
        ns_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        optimizers = [
            torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0),
            Muon(matrices, ns_dtype=ns_dtype),
        ]
    else:
        adam_groups.append(dict(params=matrices, lr=0.02))
        optimizers = [torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)]

    compiled, compile_error = not args.eager, None
    step_fn = torch.compile(model) if compiled else model
    B, T = args.batch, args.seq_len
    gen = torch.Generator().manual_seed(args.seed)
    times = []
    loss_val = float("nan")
    for step in range(args.warmup + args.steps):
        rows = torch.randint(0, args.vocab, (B, T + 1), generator=gen)
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        t0 = time.perf_counter()
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
                loss = step_fn(x, y)
        except Exception as e:  # noqa: BLE001 - any compile failure falls back to eager
            if not compiled:
                raise
            compiled, compile_error = False, f"{type(e).__name__}: {e}"[:300]
            print(f"torch.compile failed, falling back to eager: {compile_error}", file=sys.stderr)
            step_fn = model
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
                loss = step_fn(x, y)
        loss_val = loss.item()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        timed = step >= args.warmup
        total = t3 - t0
        print(
            f"{'timed ' if timed else 'warmup'} step {step:3d}: {total:7.3f} s (forward {t1 - t0:.3f}, "
            f"backward {t2 - t1:.3f}, optimizer {t3 - t2:.3f})  loss {loss_val:.4f}  {B * T / total:8.1f} tok/s",
            file=sys.stderr,
        )
        if timed:
            times.append((total, t1 - t0, t2 - t1, t3 - t2))

    med = statistics.median(t[0] for t in times)
    result = dict(
        bench="train",
        impl="pytorch-" + ("compiled" if compiled else "eager"),
        torch=torch.__version__,
        compiled=compiled,
        compile_error=compile_error,
        opt=args.opt,
        dtype=args.dtype,
        n_params=n_params,
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=args.n_head,
        n_kv_head=args.n_kv_head,
        seq_len=T,
        batch=B,
        vocab=args.vocab,
        threads=torch.get_num_threads(),
        steps=args.steps,
        median_step_s=med,
        forward_s=statistics.median(t[1] for t in times),
        backward_s=statistics.median(t[2] for t in times),
        optimizer_s=statistics.median(t[3] for t in times),
        tokens_per_s=B * T / med,
        # ru_maxrss is in KiB on Linux
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        final_loss=loss_val,
    )
    print(
        f"median {result['tokens_per_s']:.1f} tokens/s, step {med:.3f} s, peak RSS {result['peak_rss_mb']:.0f} MB",
        file=sys.stderr,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
