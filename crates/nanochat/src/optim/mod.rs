//! The optimizers of v0 `base_train`: Muon for the 2-D matrices of the transformer blocks, AdamW
//! for the embedding and the lm_head (each parameter's group comes from the model's parameter
//! table, [`OptimGroup`]), the learning-rate and momentum schedules, and gradient clipping by
//! global norm. They update candle `Var`s in place from a `GradStore`, on the model's [`Kernels`].
//! Across several ranks their state is sharded (ZeRO-2, [`Optimizers::shard`]): each rank keeps
//! and updates its own parameters only.

pub mod adamw;
mod in_place;
pub mod muon;
pub mod schedule;

use std::collections::{HashMap, HashSet};

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use candle_nn::VarMap;

pub use adamw::AdamW;
pub use muon::Muon;
pub use schedule::{muon_momentum, LrSchedule};

use crate::dist::{Communicator, Shards, SingleProcess};
use crate::model::{named_vars, Kernels, OptimGroup, GPT};

/// Named parameters sharing a learning rate. `initial_lr` is what the schedule multiplies.
pub struct ParamGroup {
    pub params: Vec<(String, Var)>,
    pub lr: f64,
    pub initial_lr: f64,
}

impl ParamGroup {
    pub fn new(params: Vec<(String, Var)>, lr: f64) -> Self {
        Self { params, lr, initial_lr: lr }
    }

    pub fn set_lr_multiplier(&mut self, multiplier: f64) {
        self.lr = self.initial_lr * multiplier;
    }
}

/// Learning rates of v0 `base_train`. The AdamW ones are for a width of 768 and get scaled by
/// `(n_embd / 768)^-0.5`; Muon's is not scaled.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimConfig {
    pub unembedding_lr: f64,
    pub embedding_lr: f64,
    pub matrix_lr: f64,
    pub weight_decay: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self { unembedding_lr: 0.004, embedding_lr: 0.2, matrix_lr: 0.02, weight_decay: 0.0 }
    }
}

/// Both optimizers of a GPT, stepped together.
pub struct Optimizers {
    pub adamw: AdamW,
    pub muon: Muon,
    /// Which rank owns each of [`Optimizers::vars`] when the state is sharded across ranks.
    shards: Option<Shards>,
}

/// v0 `setup_optimizers` for `model`, whose parameters `varmap` holds: AdamW (betas (0.8,
/// 0.95), eps 1e-10) with one group for the unembedding and one for the embedding, Muon for the
/// matrices, each parameter where its [`OptimGroup`] says; both on the model's [`Kernels`]. A
/// variable of `varmap` that the parameter table does not list is an error (no optimizer would
/// update it).
pub fn setup_optimizers(model: &GPT, varmap: &VarMap, hp: &OptimConfig) -> Result<Optimizers> {
    let config = model.config();
    let dmodel_lr_scale = (config.n_embd as f64 / 768.0).powf(-0.5);
    let (mut embedding, mut lm_head, mut matrices) = (Vec::new(), Vec::new(), Vec::new());
    for (spec, named) in config.params().into_iter().zip(named_vars(config, varmap)?) {
        match spec.group {
            OptimGroup::Embedding => embedding.push(named),
            OptimGroup::Unembedding => lm_head.push(named),
            OptimGroup::Matrix if spec.shape.len() == 2 => matrices.push(named),
            OptimGroup::Matrix => candle_core::bail!("{} is not a matrix: Muon updates 2-D parameters only", spec.name),
        }
    }
    let adam_groups = vec![
        ParamGroup::new(lm_head, hp.unembedding_lr * dmodel_lr_scale),
        ParamGroup::new(embedding, hp.embedding_lr * dmodel_lr_scale),
    ];
    let mut optimizers = Optimizers {
        adamw: AdamW::new(adam_groups, (0.8, 0.95), 1e-10, hp.weight_decay),
        muon: Muon::new(ParamGroup::new(matrices, hp.matrix_lr)),
        shards: None,
    };
    optimizers.set_kernels(model.kernels());
    Ok(optimizers)
}

impl Optimizers {
    /// Updates every parameter that has a gradient in `grads` (with sharded state: give it this
    /// rank's own gradients only, so that it updates its own parameters).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.adamw.step(grads)?;
        self.muon.step(grads)
    }

    /// Shards the state across `world_size` ranks (ZeRO-2, as the original's DistMuon and
    /// DistAdamW): each of [`Optimizers::vars`] gets one owner, balanced by size and the same on
    /// every rank ([`Shards::balanced`]), and this rank, `rank`, keeps the state of its own
    /// parameters only, now and after [`Optimizers::load_state_dict`]. A single rank keeps all.
    pub fn shard(&mut self, rank: usize, world_size: usize) {
        self.shards = (world_size > 1).then(|| {
            let sizes: Vec<usize> = self.vars().map(|v| v.elem_count()).collect();
            Shards::balanced(&sizes, rank, world_size)
        });
        self.drop_others_state();
    }

    /// The ownership of [`Optimizers::vars`], when sharded.
    pub fn shards(&self) -> Option<&Shards> {
        self.shards.as_ref()
    }

    /// Drops the state of the parameters another rank owns.
    fn drop_others_state(&mut self) {
        let Some(shards) = &self.shards else { return };
        let own: HashSet<String> = self
            .named_params()
            .enumerate()
            .filter(|(i, _)| shards.owns(*i))
            .map(|(_, (name, _))| name.clone())
            .collect();
        self.adamw.retain_state(|name| own.contains(name));
        self.muon.retain_state(|name| own.contains(name));
    }

    /// Sets every group's learning rate to its initial one times `multiplier` (the schedule).
    pub fn set_lr_multiplier(&mut self, multiplier: f64) {
        self.adamw.groups.iter_mut().for_each(|g| g.set_lr_multiplier(multiplier));
        self.muon.group.set_lr_multiplier(multiplier);
    }

    pub fn set_muon_momentum(&mut self, momentum: f64) {
        self.muon.momentum = momentum;
    }

    /// Runs both optimizers on `kernels` (those of the model they update).
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.adamw.kernels = kernels;
        self.muon.kernels = kernels;
    }

    /// Every parameter of both optimizers.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.named_params().map(|(_, v)| v)
    }

    fn named_params(&self) -> impl Iterator<Item = &(String, Var)> {
        let adam = self.adamw.groups.iter().flat_map(|g| g.params.iter());
        adam.chain(self.muon.group.params.iter())
    }

    /// Both optimizers' state, keys prefixed `adamw.` and `muon.` (with sharded state, this
    /// rank's parameters only).
    pub fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        let adam = self.adamw.state_dict()?.into_iter().map(|(k, v)| (format!("adamw.{k}"), v));
        let muon = self.muon.state_dict()?.into_iter().map(|(k, v)| (format!("muon.{k}"), v));
        Ok(adam.chain(muon).collect())
    }

    /// Restores the state of [`Optimizers::state_dict`] (of one process, or of every rank's
    /// together); with sharded state, this rank keeps its own parameters' only. The state must
    /// be complete and hold nothing else (a renamed or missing entry would otherwise quietly
    /// restart that parameter's state); an empty one, saved before the first step, starts fresh.
    pub fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        if let Some(key) = state.keys().find(|k| !k.starts_with("adamw.") && !k.starts_with("muon.")) {
            candle_core::bail!("the optimizer state has an entry {key} of neither optimizer");
        }
        let strip = |prefix: &str| -> HashMap<String, Tensor> {
            state.iter().filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone()))).collect()
        };
        let (adamw, muon) = (strip("adamw."), strip("muon."));
        if !state.is_empty() && (adamw.is_empty() || muon.is_empty()) {
            let missing = if adamw.is_empty() { "AdamW" } else { "Muon" };
            candle_core::bail!("the optimizer state has no {missing} entries, but the other optimizer's");
        }
        self.adamw.load_state_dict(&adamw)?;
        self.muon.load_state_dict(&muon)?;
        self.drop_others_state();
        Ok(())
    }
}

/// torch's `clip_grad_norm_`: scales every gradient by `max_norm / (total_norm + 1e-6)` when that
/// is below 1, where `total_norm` is the L2 norm of all gradients together. Returns `total_norm`.
pub fn clip_grad_norm<'a>(
    vars: impl IntoIterator<Item = &'a Var>,
    grads: &mut GradStore,
    max_norm: f64,
) -> Result<f64> {
    clip_grad_norm_on(&SingleProcess, vars, grads, max_norm)
}

/// [`clip_grad_norm`] when each rank of `comm` holds its own part of the gradients (sharded
/// state: its own parameters'): the squared norms are added across the ranks, so that every rank
/// clips by the global norm, with the same coefficient.
pub fn clip_grad_norm_on<'a>(
    comm: &dyn Communicator,
    vars: impl IntoIterator<Item = &'a Var>,
    grads: &mut GradStore,
    max_norm: f64,
) -> Result<f64> {
    let vars: Vec<&Var> = vars.into_iter().collect();
    let mut sum_sq = [0.0f64];
    for var in &vars {
        if let Some(g) = grads.get(var) {
            sum_sq[0] += g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        }
    }
    comm.all_reduce_sum_f64(&mut sum_sq).map_err(candle_core::Error::wrap)?;
    let total_norm = sum_sq[0].sqrt();
    let coef = max_norm / (total_norm + 1e-6);
    if coef < 1.0 {
        for var in &vars {
            if let Some(g) = grads.remove(var) {
                grads.insert(var, g.affine(coef, 0.0)?);
            }
        }
    }
    Ok(total_norm)
}
