"""PyTorch's f32 GEMM (MKL on x86) at the shapes `nanochat bench gemm` measures: GFLOP/s, 2 threads,
best of 5 after a warm-up, one line per product (the reference for our GEMM rates in docs/BENCHMARKS.md).

    /work/venv-ref/bin/python bench/torch_gemm.py
"""
import time, torch
torch.set_num_threads(2)
for name, m, n, k in [("lm_head logits", 4096, 32768, 256), ("lm_head dx", 4096, 256, 32768), ("lm_head dW", 32768, 256, 4096),
                      ("c_fc", 4096, 1024, 256), ("c_proj", 4096, 256, 1024), ("c_fc dW", 1024, 256, 4096)]:
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)
    best = min((lambda t0: (torch.mm(a, b), time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(5))
    print(f"{name:16s} {m}x{n}x{k}: {2*m*n*k/best/1e9:.1f} GFLOP/s")
