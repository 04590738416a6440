//! `nanochat bench gemm`: the rates this machine's GEMMs reach at the shapes of the training step,
//! f32 (the `gemm` crate, which candle and the fused kernels use) and bf16 (the AVX-512 BF16 kernel,
//! when the CPU has it). They are the measured peak that the step's achieved GFLOP/s is held
//! against (issue 10): a step cannot beat its products run back to back at these rates.

use std::time::Instant;

use anyhow::Result;
use clap::Args;
use rand::{Rng, SeedableRng};

use super::{median, ModelShape};
use crate::model::fused::{self, Mat};

#[derive(Args, Debug)]
pub struct GemmBenchArgs {
    #[command(flatten)]
    pub shape: ModelShape,
    /// Rows per step (the products have batch × seq_len tokens).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Timed runs of each product (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
}

/// One product of the step: C (m × n) = A (m × k) · B (k × n), each operand row-major or, when
/// `transposed`, stored as its transpose, as the step stores it.
struct Product {
    name: &'static str,
    m: usize,
    n: usize,
    k: usize,
    a_transposed: bool,
    b_transposed: bool,
}

fn view(data: &[f32], rows: usize, cols: usize, transposed: bool) -> Mat<'_> {
    if transposed {
        Mat { data, rs: 1, cs: rows }
    } else {
        Mat { data, rs: cols, cs: 1 }
    }
}

pub fn run(args: &GemmBenchArgs) -> Result<()> {
    anyhow::ensure!(args.runs > 0 && args.batch > 0, "--runs and --batch must be at least 1");
    let (t, c, v) = (args.batch * args.shape.seq_len, args.shape.n_embd, args.shape.vocab);
    let products = [
        Product { name: "lm_head logits x·Wᵀ", m: t, n: v, k: c, a_transposed: false, b_transposed: true },
        Product { name: "lm_head dx = G·W", m: t, n: c, k: v, a_transposed: false, b_transposed: false },
        Product { name: "lm_head dW = Gᵀ·x", m: v, n: c, k: t, a_transposed: true, b_transposed: false },
        Product { name: "MLP c_fc x·Wᵀ", m: t, n: 4 * c, k: c, a_transposed: false, b_transposed: true },
        Product { name: "MLP c_proj h·Wᵀ", m: t, n: c, k: 4 * c, a_transposed: false, b_transposed: true },
        Product { name: "MLP c_fc dW = dyᵀ·x", m: 4 * c, n: c, k: t, a_transposed: true, b_transposed: false },
    ];
    let bf16 = fused::bf16_supported();
    eprintln!(
        "bench gemm: {t} tokens, n_embd {c}, vocab {v}, {} threads, bf16 GEMM {}",
        rayon::current_num_threads(),
        if bf16 { "available (AVX-512 BF16)" } else { "not available on this CPU" }
    );
    eprintln!("{:<22} {:>22} {:>12} {:>12}", "product", "m x n x k", "f32 GFLOP/s", "bf16 GFLOP/s");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut rows = Vec::new();
    for p in &products {
        let a: Vec<f32> = (0..p.m * p.k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let b: Vec<f32> = (0..p.k * p.n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut dst = vec![0f32; p.m * p.n];
        let (av, bv) = (view(&a, p.m, p.k, p.a_transposed), view(&b, p.k, p.n, p.b_transposed));
        let flops = 2.0 * (p.m * p.n * p.k) as f64;
        let mut rate = |use_bf16: bool| -> Result<f64> {
            let mut times = Vec::with_capacity(args.runs);
            for run in 0..=args.runs {
                let start = Instant::now();
                if use_bf16 {
                    fused::gemm_bf16(p.m, p.n, p.k, &mut dst, p.n, av, bv, 1.0, false)?;
                } else {
                    fused::gemm_parallel(p.m, p.n, p.k, &mut dst, p.n, av, bv, 1.0)?;
                }
                if run > 0 {
                    times.push(start.elapsed().as_secs_f64());
                }
            }
            Ok(flops / median(&mut times) / 1e9)
        };
        let f32_rate = rate(false)?;
        let bf16_rate = if bf16 { Some(rate(true)?) } else { None };
        let dims = format!("{} x {} x {}", p.m, p.n, p.k);
        let shown = bf16_rate.map_or("-".to_string(), |r| format!("{r:.1}"));
        eprintln!("{:<22} {:>22} {:>12.1} {:>12}", p.name, dims, f32_rate, shown);
        rows.push(serde_json::json!({ "product": p.name, "m": p.m, "n": p.n, "k": p.k,
            "f32_gflops": f32_rate, "bf16_gflops": bf16_rate }));
    }
    println!("{}", serde_json::json!({ "bench": "gemm", "threads": rayon::current_num_threads(), "products": rows }));
    Ok(())
}
