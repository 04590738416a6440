//! Parity of Muon and AdamW with nanochat v0, against `tests/fixtures/parity/optim/` (two steps each,
//! computed by the original in float32 on CPU), plus the schedules, gradient clipping, the
//! parameter split of `setup_optimizers` and the optimizer state round trip.

mod common;

use std::collections::HashMap;

use anyhow::{ensure, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use nanochat::model::{GPTConfig, Kernels, GPT};
use nanochat::optim::muon::{momentum_update, zeropower_via_newtonschulz5};
use nanochat::optim::{
    clip_grad_norm, muon_momentum, setup_optimizers, AdamW, LrSchedule, Muon, OptimConfig, ParamGroup,
};

fn load(file: &str) -> Result<HashMap<String, Tensor>> {
    let path = common::parity(file);
    candle_core::safetensors::load(&path, &Device::Cpu).with_context(|| format!("loading {}", path.display()))
}

fn get<'a>(map: &'a HashMap<String, Tensor>, key: &str) -> Result<&'a Tensor> {
    map.get(key).with_context(|| format!("fixture has no tensor {key}"))
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Asserts `ours` is within `atol` of `want` (same shape); prints the max differences.
fn check(what: &str, ours: &Tensor, want: &Tensor, atol: f32) -> Result<f32> {
    ensure!(ours.dims() == want.dims(), "{what}: shape {:?} != {:?}", ours.dims(), want.dims());
    let (a, b) = (flat(ours)?, flat(want)?);
    let max_abs = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0f32, f32::max).max(f32::MIN_POSITIVE);
    println!("{what:<32} max|diff| {max_abs:.3e}  relative to max|ref| {:.3e}", max_abs / scale);
    ensure!(max_abs <= atol, "{what}: max |diff| {max_abs:e} > {atol:e}");
    Ok(max_abs)
}

fn grads_for(var: &Var, g: &Tensor) -> GradStore {
    let mut grads = GradStore::default();
    grads.insert(var.as_tensor(), g.clone());
    grads
}

#[test]
fn muon_fp32_matches_v0() -> Result<()> {
    let f = load("optim/muon.safetensors")?;
    let var = Var::from_tensor(get(&f, "p0")?)?;
    let mut muon = Muon::new(ParamGroup::new(vec![("w".to_string(), var.clone())], 0.02));
    let mut buf = get(&f, "p0")?.zeros_like()?;
    for k in 1..=2 {
        let g = get(&f, &format!("g{k}"))?;
        // The pieces: momentum buffer, Nesterov blend, orthogonalisation.
        let (new_buf, gn) = momentum_update(&buf, g, 0.95, true)?;
        check(&format!("buf{k}"), &new_buf, get(&f, &format!("buf{k}"))?, 1e-8)?;
        check(&format!("gn{k}"), &gn, get(&f, &format!("gn{k}"))?, 1e-8)?;
        let update = zeropower_via_newtonschulz5(get(&f, &format!("gn{k}"))?, 5, Kernels::default())?;
        check(&format!("fp32.update{k}"), &update, get(&f, &format!("fp32.update{k}"))?, 2e-6)?;
        buf = new_buf;
        // The optimizer end to end.
        muon.step(&grads_for(&var, g))?;
        check(&format!("fp32.p{k}"), var.as_tensor(), get(&f, &format!("fp32.p{k}"))?, 1e-7)?;
        let state = muon.state_dict()?;
        check(&format!("state buf{k}"), get(&state, "w.momentum_buffer")?, get(&f, &format!("buf{k}"))?, 1e-8)?;
    }
    // bf16 is v0 on the GPU; our f32 iteration stays within the documented fp32-vs-bf16 gap.
    check("fp32.p2 vs bf16.p2", var.as_tensor(), get(&f, "bf16.p2")?, 5e-4)?;
    Ok(())
}

#[test]
fn muon_tall_matrices_are_transposed_and_scaled() -> Result<()> {
    let f = load("optim/muon.safetensors")?;
    let (p0, g1) = (get(&f, "p0")?.t()?.contiguous()?, get(&f, "g1")?.t()?.contiguous()?);
    // NS5 of the transpose is the transpose of NS5.
    let update = get(&f, "fp32.update1")?.t()?;
    check(
        "NS5(gn1^T) vs update1^T",
        &zeropower_via_newtonschulz5(&get(&f, "gn1")?.t()?, 5, Kernels::default())?,
        &update,
        2e-6,
    )?;
    // A tall matrix, 4 rows per column, steps max(1, 4)^0.5 = 2 times further.
    let var = Var::from_tensor(&p0)?;
    let mut muon = Muon::new(ParamGroup::new(vec![("w".to_string(), var.clone())], 0.02));
    muon.step(&grads_for(&var, &g1))?;
    check("tall p1", var.as_tensor(), &(&p0 + update.affine(-0.04, 0.0)?)?, 1e-7)?;
    // A zero gradient orthogonalises to zero: the parameter does not move.
    let zero = Var::from_tensor(&p0)?;
    let mut muon = Muon::new(ParamGroup::new(vec![("z".to_string(), zero.clone())], 0.02));
    muon.step(&grads_for(&zero, &p0.zeros_like()?))?;
    ensure!(flat(zero.as_tensor())? == flat(&p0)?, "zero gradient moved the parameter");
    Ok(())
}

/// Indices of the rows of `g` (rows, cols) that are entirely zero.
fn zero_rows(g: &Tensor) -> Result<Vec<usize>> {
    Ok(g.to_vec2::<f32>()?.iter().enumerate().filter(|(_, r)| r.iter().all(|&x| x == 0.0)).map(|(i, _)| i).collect())
}

#[test]
fn adamw_matches_torch_fused() -> Result<()> {
    let f = load("optim/adamw.safetensors")?;
    let p0 = get(&f, "p0")?;
    let var = Var::from_tensor(p0)?;
    let lr = 0.2 * (64.0f64 / 768.0).powf(-0.5);
    ensure!((lr - 0.692820323027551).abs() < 1e-12);
    let mut adamw =
        AdamW::new(vec![ParamGroup::new(vec![("wte".to_string(), var.clone())], lr)], (0.8, 0.95), 1e-10, 0.0);
    let (g1, g2) = (get(&f, "g1")?, get(&f, "g2")?);
    let (z1, z2) = (zero_rows(g1)?, zero_rows(g2)?);
    // as many as the original counted when it made the fixture
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(common::parity("optim/meta.json"))?)?;
    let counted = &meta["adamw"]["rows_zero_grad"];
    ensure!(
        Some(z1.len() as u64) == counted["g1"].as_u64() && Some(z2.len() as u64) == counted["g2"].as_u64(),
        "fixture rows with zero gradient: {} {}, the original counted {counted}",
        z1.len(),
        z2.len()
    );
    let p0_rows = p0.to_vec2::<f32>()?;

    adamw.step(&grads_for(&var, g1))?;
    check("fused.p1", var.as_tensor(), get(&f, "fused.p1")?, 1e-6)?;
    let p1_rows = var.as_tensor().to_vec2::<f32>()?;
    ensure!(z1.iter().all(|&i| p1_rows[i] == p0_rows[i]), "a row with zero gradient moved at step 1");

    adamw.step(&grads_for(&var, g2))?;
    check("fused.p2", var.as_tensor(), get(&f, "fused.p2")?, 1e-6)?;
    let p2_rows = var.as_tensor().to_vec2::<f32>()?;
    let never = z1.iter().filter(|i| z2.contains(i)).copied().collect::<Vec<_>>();
    ensure!(!never.is_empty());
    ensure!(never.iter().all(|&i| p2_rows[i] == p0_rows[i]), "a row never touched moved");
    // Rows touched at step 1 keep moving on momentum at step 2, as torch does.
    let moved = z2.iter().filter(|i| !z1.contains(i)).filter(|&&i| p2_rows[i] != p1_rows[i]).count();
    ensure!(moved > 0);

    // The state round-trips through its tensor map: a restored optimizer on a copy of the
    // parameter takes exactly the step the original takes (a fresh one would not).
    let state = adamw.state_dict()?;
    ensure!(get(&state, "wte.step")?.to_scalar::<i64>()? == 2);
    let copy = Var::from_tensor(&var.as_tensor().copy()?)?;
    let fresh = Var::from_tensor(&var.as_tensor().copy()?)?;
    let new_adamw = |v: &Var| {
        let group = ParamGroup::new(vec![("wte".to_string(), v.clone())], lr);
        AdamW::new(vec![group], (0.8, 0.95), 1e-10, 0.0)
    };
    let mut restored = new_adamw(&copy);
    restored.load_state_dict(&state)?;
    adamw.step(&grads_for(&var, g1))?;
    restored.step(&grads_for(&copy, g1))?;
    new_adamw(&fresh).step(&grads_for(&fresh, g1))?;
    ensure!(flat(copy.as_tensor())? == flat(var.as_tensor())?, "restored state stepped differently");
    ensure!(flat(fresh.as_tensor())? != flat(var.as_tensor())?, "state made no difference");
    Ok(())
}

#[test]
fn schedules_match_v0() {
    let s = LrSchedule::new(100);
    assert_eq!(s.multiplier(0), 1.0);
    assert_eq!(s.multiplier(80), 1.0);
    assert!((s.multiplier(90) - 0.5).abs() < 1e-12);
    assert!((s.multiplier(99) - 0.05).abs() < 1e-12);
    assert_eq!(s.multiplier(100), 0.0);
    let s = LrSchedule { warmup_ratio: 0.1, final_lr_frac: 0.1, ..LrSchedule::new(100) };
    assert!((s.multiplier(0) - 0.1).abs() < 1e-12);
    assert_eq!(s.multiplier(9), 1.0);
    assert!((s.multiplier(100) - 0.1).abs() < 1e-12);
    // v0 counts steps with Python's round(), half to even: round(0.25 * 10) = round(2.5) = 2.
    let s = LrSchedule { warmdown_ratio: 0.25, ..LrSchedule::new(10) };
    assert_eq!(s.multiplier(8), 1.0);
    assert!((s.multiplier(9) - 0.5).abs() < 1e-12);
    assert_eq!(muon_momentum(0), 0.85);
    assert!((muon_momentum(150) - 0.90).abs() < 1e-12);
    assert!((muon_momentum(300) - 0.95).abs() < 1e-12);
    assert!((muon_momentum(5000) - 0.95).abs() < 1e-12);
}

#[test]
fn clip_grad_norm_scales_only_above_the_limit() -> Result<()> {
    let dev = Device::Cpu;
    let (a, b) = (Var::zeros(2, DType::F32, &dev)?, Var::zeros(1, DType::F32, &dev)?);
    let mut grads = GradStore::default();
    grads.insert(a.as_tensor(), Tensor::new(&[3.0f32, 0.0], &dev)?);
    grads.insert(b.as_tensor(), Tensor::new(&[4.0f32], &dev)?);
    let norm = clip_grad_norm([&a, &b], &mut grads, 10.0)?;
    ensure!((norm - 5.0).abs() < 1e-9);
    ensure!(grads.get(&a).context("grad a")?.to_vec1::<f32>()? == vec![3.0, 0.0]);
    let norm = clip_grad_norm([&a, &b], &mut grads, 1.0)?;
    ensure!((norm - 5.0).abs() < 1e-9);
    let coef = (1.0 / (5.0 + 1e-6)) as f32;
    ensure!(grads.get(&b).context("grad b")?.to_vec1::<f32>()? == vec![4.0 * coef]);
    Ok(())
}

#[test]
fn setup_optimizers_splits_like_v0_and_trains() -> Result<()> {
    let cfg = GPTConfig {
        sequence_len: 64,
        vocab_size: 1024,
        n_layer: 2,
        n_head: 4,
        n_kv_head: 2,
        n_embd: 64,
        rotary: Default::default(),
    };
    let (model, varmap) = GPT::init(&cfg, 0, &Device::Cpu)?;
    let mut opt = setup_optimizers(&model, &varmap, &OptimConfig::default())?;
    let lrs: Vec<(Vec<String>, f64)> =
        opt.adamw.groups.iter().map(|g| (g.params.iter().map(|(n, _)| n.clone()).collect(), g.lr)).collect();
    ensure!(lrs[0].0 == ["lm_head.weight"] && (lrs[0].1 - 0.013856406460551019).abs() < 1e-15);
    ensure!(lrs[1].0 == ["transformer.wte.weight"] && (lrs[1].1 - 0.692820323027551).abs() < 1e-12);
    ensure!(opt.muon.group.params.len() == 6 * cfg.n_layer && opt.muon.group.lr == 0.02);
    ensure!(opt.muon.group.params.iter().all(|(n, _)| n.starts_with("transformer.h.")));
    ensure!(opt.vars().count() == cfg.params().len());

    // A few steps on one batch: the loss goes down from ln V, and the schedule is applied.
    let batch = load("model/batch.safetensors")?;
    let (idx, targets) = (get(&batch, "idx")?, get(&batch, "targets")?);
    let mut losses = Vec::new();
    for step in 0..4 {
        let loss = model.forward(idx, Some(targets))?;
        losses.push(loss.to_scalar::<f32>()?);
        let mut grads = loss.backward()?;
        let vars: Vec<Var> = opt.vars().cloned().collect();
        clip_grad_norm(vars.iter(), &mut grads, 1.0)?;
        opt.set_lr_multiplier(LrSchedule::new(4).multiplier(step));
        opt.set_muon_momentum(muon_momentum(step));
        opt.step(&grads)?;
    }
    println!("losses {losses:?}");
    ensure!(losses[3] < losses[0] - 0.1, "loss did not go down: {losses:?}");
    let state = opt.state_dict()?;
    ensure!(state.keys().any(|k| k == "adamw.lm_head.weight.exp_avg"));
    ensure!(state.keys().any(|k| k == "muon.transformer.h.1.mlp.c_fc.weight.momentum_buffer"));
    opt.load_state_dict(&state)?;
    Ok(())
}

#[test]
fn adamw_in_place_update_equals_the_composition_bit_for_bit() -> Result<()> {
    // With weight decay and an odd size (chunk remainders); some gradient entries exactly zero.
    let p0 = Tensor::randn(0f32, 1.0, (1001, 37), &Device::Cpu)?;
    let grads: Vec<Tensor> = (0..3)
        .map(|i| {
            let g = Tensor::randn(0f32, 1e-2 * (i + 1) as f32, (1001, 37), &Device::Cpu)?;
            let keep = Tensor::rand(0f32, 1.0, (1001, 37), &Device::Cpu)?.ge(0.2)?.to_dtype(DType::F32)?;
            g.mul(&keep)
        })
        .collect::<candle_core::Result<_>>()?;
    let run = |fused: bool| -> Result<(Vec<f32>, HashMap<String, Tensor>)> {
        let var = Var::from_tensor(&p0.copy()?)?;
        let mut adamw =
            AdamW::new(vec![ParamGroup::new(vec![("w".to_string(), var.clone())], 0.03)], (0.8, 0.95), 1e-10, 0.1);
        adamw.kernels = Kernels { fused, ..Kernels::default() };
        for g in &grads {
            adamw.step(&grads_for(&var, g))?;
        }
        Ok((flat(var.as_tensor())?, adamw.state_dict()?))
    };
    let (fused, fused_state) = run(true)?;
    let (composed, composed_state) = run(false)?;
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    ensure!(bits(&fused) == bits(&composed), "the in-place update differs from the composition");
    for key in ["w.exp_avg", "w.exp_avg_sq"] {
        ensure!(bits(&flat(get(&fused_state, key)?)?) == bits(&flat(get(&composed_state, key)?)?), "{key} differs");
    }
    ensure!(bits(&fused) != bits(&flat(&p0)?), "the parameter did not move");
    Ok(())
}

#[test]
fn muon_in_place_pieces_equal_the_composition_bit_for_bit() -> Result<()> {
    use nanochat::optim::muon::{add_scaled_in_place, momentum_in_place};
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let buf0 = Tensor::randn(0f32, 1e-2, (97, 33), &Device::Cpu)?;
    let g = Tensor::randn(0f32, 1e-2, (97, 33), &Device::Cpu)?;
    // both branches of torch's lerp: weights below and above one half
    for (momentum, nesterov) in [(0.95, true), (0.85, false), (0.3, true)] {
        let (want_buf, want_blend) = momentum_update(&buf0, &g, momentum, nesterov)?;
        let buf = buf0.copy()?;
        let blended = momentum_in_place(&buf, &g, momentum, nesterov)?;
        ensure!(bits(&flat(&buf)?) == bits(&flat(&want_buf)?), "buffer differs at momentum {momentum}");
        ensure!(bits(&blended) == bits(&flat(&want_blend)?), "blended gradient differs at momentum {momentum}");
    }
    let p = Tensor::randn(0f32, 1.0, (97, 33), &Device::Cpu)?;
    let want = (&p + g.affine(-0.04, 0.0)?)?;
    let got = p.copy()?;
    add_scaled_in_place(&got, &g, -0.04)?;
    ensure!(bits(&flat(&got)?) == bits(&flat(&want)?), "the in-place update differs from p + alpha u");
    ensure!(add_scaled_in_place(&got, &g.narrow(0, 0, 5)?.contiguous()?, 1.0).is_err(), "a size mismatch must fail");
    // the state handed out is a snapshot: the next in-place step leaves it alone
    let var = Var::from_tensor(&p.copy()?)?;
    let mut muon = Muon::new(ParamGroup::new(vec![("w".to_string(), var.clone())], 0.02));
    muon.step(&grads_for(&var, &g))?;
    let snapshot = flat(get(&muon.state_dict()?, "w.momentum_buffer")?)?;
    muon.step(&grads_for(&var, &g))?;
    ensure!(flat(get(&muon.state_dict()?, "w.momentum_buffer")?)? != snapshot, "the buffer did not move");
    ensure!(bits(&snapshot) == bits(&flat(&(g.affine(0.05, 0.0)?))?), "the first snapshot changed after the next step");
    Ok(())
}
