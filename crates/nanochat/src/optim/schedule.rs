//! Schedules of v0 `base_train`: the learning-rate multiplier (optional linear warmup, constant,
//! then linear warmdown to a final fraction) and Muon's momentum warm-up.

/// Learning-rate multiplier over a run of `num_iterations` steps. v0 defaults: no warmup,
/// warmdown over the last 20% of the steps, down to 0.
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    pub num_iterations: usize,
    pub warmup_ratio: f64,
    pub warmdown_ratio: f64,
    pub final_lr_frac: f64,
}

impl LrSchedule {
    /// v0's defaults for a run of `num_iterations` steps.
    pub fn new(num_iterations: usize) -> Self {
        Self { num_iterations, warmup_ratio: 0.0, warmdown_ratio: 0.2, final_lr_frac: 0.0 }
    }

    /// The multiplier of every group's initial learning rate at step `it` (0-based).
    pub fn multiplier(&self, it: usize) -> f64 {
        let n = self.num_iterations as f64;
        // Python's round() rounds half to even; the iteration counts must match the original's.
        let warmup = (self.warmup_ratio * n).round_ties_even() as usize;
        let warmdown = (self.warmdown_ratio * n).round_ties_even() as usize;
        if it < warmup {
            (it + 1) as f64 / warmup as f64
        } else if warmdown == 0 || it + warmdown <= self.num_iterations {
            1.0
        } else {
            let progress = self.num_iterations.saturating_sub(it) as f64 / warmdown as f64;
            progress + (1.0 - progress) * self.final_lr_frac
        }
    }
}

/// Muon's momentum at step `it`: ramps linearly from 0.85 to 0.95 over the first 300 steps.
pub fn muon_momentum(it: usize) -> f64 {
    let frac = (it as f64 / 300.0).min(1.0);
    (1.0 - frac) * 0.85 + frac * 0.95
}
