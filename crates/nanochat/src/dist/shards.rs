//! ZeRO-2 over any [`Communicator`]: which rank owns which parameter ([`Shards`]), gradients
//! reduced to their owners, updated parameters gathered back to every rank, and the start-of-run
//! broadcast that puts the ranks in step.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use super::{Communicator, DistError};

/// The tensors as one f32 buffer, in order.
fn flatten<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> candle_core::Result<Vec<f32>> {
    let mut flat = Vec::new();
    for t in tensors {
        flat.extend(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(flat)
}

/// The piece of `flat` at `*offset` shaped, typed and placed like `like`; advances `offset`.
fn unflatten(flat: &[f32], offset: &mut usize, like: &Tensor) -> candle_core::Result<Tensor> {
    let n = like.elem_count();
    let t = Tensor::from_slice(&flat[*offset..*offset + n], like.shape(), like.device())?.to_dtype(like.dtype())?;
    *offset += n;
    Ok(t)
}

/// Which rank owns each of a list of parameters (ZeRO-2): the owner alone receives the parameter's
/// averaged gradient, keeps its optimizer state and computes its update. Every rank computes the
/// same ownership from the same sizes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shards {
    /// This process's rank.
    rank: usize,
    world_size: usize,
    /// The owner of each parameter, in the list's order.
    owners: Vec<usize>,
}

impl Shards {
    /// Ownership of parameters of `sizes` elements balanced by size: largest first, each to the
    /// rank with the fewest elements so far (the lowest such rank on ties), as the optimizer
    /// work and state of a parameter grow with its size. Deterministic, so the same on every rank.
    pub fn balanced(sizes: &[usize], rank: usize, world_size: usize) -> Shards {
        let world_size = world_size.max(1);
        let mut order: Vec<usize> = (0..sizes.len()).collect();
        // A stable sort: parameters of equal size keep their order.
        order.sort_by_key(|&i| std::cmp::Reverse(sizes[i]));
        let mut load = vec![0usize; world_size];
        let mut owners = vec![0; sizes.len()];
        for i in order {
            let lightest = (0..world_size).min_by_key(|&r| (load[r], r)).unwrap_or(0);
            owners[i] = lightest;
            load[lightest] += sizes[i];
        }
        Shards { rank, world_size, owners }
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The owner of each parameter, in the list's order.
    pub fn owners(&self) -> &[usize] {
        &self.owners
    }

    /// Whether this rank owns parameter `i`.
    pub fn owns(&self, i: usize) -> bool {
        self.owners.get(i) == Some(&self.rank)
    }

    /// The parameters grouped by owner, rank 0's first, each group in list order: the layout of
    /// the flat buffers of [`reduce_grads_to_owners`] and [`all_gather_vars`].
    fn by_owner(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.owners.len()).collect();
        order.sort_by_key(|&i| self.owners[i]);
        order
    }

    fn check(&self, vars: &[Var]) -> Result<(), DistError> {
        if vars.len() == self.owners.len() {
            Ok(())
        } else {
            Err(DistError::NotSharded { vars: vars.len(), owned: self.owners.len() })
        }
    }
}

/// The first half of a ZeRO-2 step: each gradient of `vars` is summed over the ranks onto its
/// owner alone (one reduce-scatter of all of them) and divided by the number of ranks, so that the
/// owner holds the gradient of the mean loss over every rank's batches, which is what one process
/// with the same global batch computes, up to the order of additions. Returns this rank's own
/// gradients; the others' are dropped. Which vars have a gradient depends on the model only, so
/// it is the same on every rank.
pub fn reduce_grads_to_owners(
    comm: &dyn Communicator,
    vars: &[Var],
    shards: &Shards,
    grads: &GradStore,
) -> anyhow::Result<GradStore> {
    shards.check(vars)?;
    let present: Vec<(usize, Tensor)> =
        shards.by_owner().into_iter().filter_map(|i| Some((i, grads.get(&vars[i])?.clone()))).collect();
    let mut counts = vec![0; shards.world_size];
    for (i, g) in &present {
        counts[shards.owners[*i]] += g.elem_count();
    }
    let mut mine = comm.reduce_scatter_sum(&flatten(present.iter().map(|(_, g)| g))?, &counts)?;
    let scale = 1.0 / shards.world_size as f32;
    mine.iter_mut().for_each(|x| *x *= scale);
    let mut own = GradStore::default();
    let mut offset = 0;
    for (i, g) in present.iter().filter(|(i, _)| shards.owns(*i)) {
        own.insert(&vars[*i], unflatten(&mine, &mut offset, g)?);
    }
    Ok(own)
}

/// The second half of a ZeRO-2 step: every rank gets the values of `vars` that their owners
/// hold, the parameters each just updated (one all-gather), so that all ranks hold the same
/// weights again.
pub fn all_gather_vars(comm: &dyn Communicator, vars: &[Var], shards: &Shards) -> anyhow::Result<()> {
    shards.check(vars)?;
    let order = shards.by_owner();
    let mut counts = vec![0; shards.world_size];
    for &i in &order {
        counts[shards.owners[i]] += vars[i].elem_count();
    }
    let mine = flatten(order.iter().filter(|&&i| shards.owns(i)).map(|&i| vars[i].as_tensor()))?;
    let all = comm.all_gather(&mine, &counts)?;
    let mut offset = 0;
    for i in order {
        if shards.owns(i) {
            offset += vars[i].elem_count();
        } else {
            vars[i].set(&unflatten(&all, &mut offset, vars[i].as_tensor())?)?;
        }
    }
    Ok(())
}

/// Gives every rank rank 0's values of `vars` (as PyTorch's DDP does at the start), so that the
/// ranks start in step whatever their initialisation or the checkpoint file they read.
pub fn broadcast_vars(comm: &dyn Communicator, vars: &[Var]) -> anyhow::Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let mut flat = flatten(vars.iter().map(|v| v.as_tensor()))?;
    comm.broadcast(&mut flat, 0)?;
    let mut offset = 0;
    for var in vars {
        var.set(&unflatten(&flat, &mut offset, var.as_tensor())?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::{check_gather_counts, check_scatter_counts, Communicator, DistError};

    #[test]
    fn flat_buffers_round_trip_tensors_of_any_shape_and_dtype() {
        let dev = candle_core::Device::Cpu;
        let a = Tensor::arange(0f32, 6.0, &dev).unwrap().reshape((2, 3)).unwrap();
        let b = Tensor::new(&[7f32, 8.0], &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let flat = flatten([&a, &b]).unwrap();
        assert_eq!(flat, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 8.0]);
        let mut offset = 0;
        let a2 = unflatten(&flat, &mut offset, &a).unwrap();
        let b2 = unflatten(&flat, &mut offset, &b).unwrap();
        assert_eq!(offset, 8);
        assert_eq!((a2.dims(), b2.dtype()), (a.dims(), DType::BF16));
        assert_eq!(a2.to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        assert_eq!(b2.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(), [7.0, 8.0]);
    }

    /// W ranks as threads of one process, to test the users of the collectives without MPI: every
    /// collective is an exchange of each rank's contribution through shared slots, and the sums
    /// add the ranks in order, as MPI's reductions of two ranks do.
    struct Threads {
        rank: usize,
        size: usize,
        shared: std::sync::Arc<(std::sync::Mutex<Vec<Vec<f64>>>, std::sync::Barrier)>,
    }

    impl Threads {
        fn world(size: usize) -> Vec<Threads> {
            let shared =
                std::sync::Arc::new((std::sync::Mutex::new(vec![Vec::new(); size]), std::sync::Barrier::new(size)));
            (0..size).map(|rank| Threads { rank, size, shared: shared.clone() }).collect()
        }

        /// Every rank's contribution, on every rank.
        fn exchange(&self, mine: Vec<f64>) -> Vec<Vec<f64>> {
            let (slots, barrier) = &*self.shared;
            slots.lock().unwrap()[self.rank] = mine;
            barrier.wait();
            let all = slots.lock().unwrap().clone();
            // No rank overwrites its slot (next collective) before every rank has read them all.
            barrier.wait();
            all
        }

        fn sum_f32(&self, buf: &[f32]) -> Vec<f32> {
            let all = self.exchange(buf.iter().map(|&x| f64::from(x)).collect());
            (0..buf.len()).map(|j| all.iter().fold(0f32, |acc, r| acc + r[j] as f32)).collect()
        }
    }

    impl Communicator for Threads {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.size
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), DistError> {
            let all = self.exchange(buf.to_vec());
            for (j, x) in buf.iter_mut().enumerate() {
                *x = all.iter().map(|r| r[j]).sum();
            }
            Ok(())
        }
        fn reduce_scatter_sum(&self, buf: &[f32], counts: &[usize]) -> Result<Vec<f32>, DistError> {
            check_scatter_counts(counts, self.size, buf.len())?;
            let start: usize = counts[..self.rank].iter().sum();
            Ok(self.sum_f32(buf)[start..start + counts[self.rank]].to_vec())
        }
        fn all_gather(&self, mine: &[f32], counts: &[usize]) -> Result<Vec<f32>, DistError> {
            check_gather_counts(counts, self.size, self.rank, mine.len())?;
            Ok(self.exchange(mine.iter().map(|&x| f64::from(x)).collect()).concat().iter().map(|&x| x as f32).collect())
        }
        fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), DistError> {
            let all = self.exchange(buf.iter().map(|&x| f64::from(x)).collect());
            buf.iter_mut().zip(&all[root]).for_each(|(x, &y)| *x = y as f32);
            Ok(())
        }
        fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, DistError> {
            let all = self.exchange(mine.iter().map(|&b| f64::from(b)).collect());
            Ok(all.iter().map(|r| r.iter().map(|&b| b as u8).collect()).collect())
        }
        fn barrier(&self) -> Result<(), DistError> {
            self.exchange(Vec::new());
            Ok(())
        }
        fn abort(&self, code: i32) -> ! {
            panic!("rank {} aborted with {code}", self.rank)
        }
    }

    #[test]
    fn ownership_balances_elements_the_same_way_every_time() {
        // Largest first to the lightest rank: 10 -> 0, 8 -> 1, 3 -> 1, 2 -> 0, 2 -> 1 (12 vs 13).
        let sizes = [10, 3, 8, 2, 2];
        let shards = Shards::balanced(&sizes, 1, 2);
        assert_eq!(shards.owners(), [0, 1, 1, 0, 1]);
        assert_eq!((0..5).filter(|&i| shards.owns(i)).collect::<Vec<_>>(), [1, 2, 4]);
        assert_eq!(Shards::balanced(&sizes, 0, 2).owners(), shards.owners());
        assert_eq!(Shards::balanced(&sizes, 0, 1).owners(), [0; 5]);
        // More ranks than parameters: the spare ranks own nothing.
        assert_eq!(Shards::balanced(&[4, 4], 0, 3).owners(), [0, 1]);
    }

    #[test]
    fn gradients_reach_their_owners_averaged_and_updates_reach_every_rank() {
        let shapes: [&[usize]; 3] = [&[2, 3], &[4], &[5]];
        let results = std::thread::scope(|scope| {
            let handles: Vec<_> = Threads::world(2)
                .into_iter()
                .map(|comm| {
                    scope.spawn(move || {
                        let dev = candle_core::Device::Cpu;
                        // Every rank has its own copy of the parameters, with its own gradients.
                        let r = comm.rank() as f32;
                        let vars: Vec<Var> = shapes
                            .iter()
                            .map(|&s| Var::from_tensor(&Tensor::zeros(s, DType::F32, &dev)?))
                            .collect::<candle_core::Result<_>>()?;
                        let mut grads = GradStore::default();
                        for (i, v) in vars.iter().enumerate() {
                            grads.insert(
                                v,
                                (Tensor::ones(v.shape(), DType::F32, &dev)? * (10.0 * i as f64 + f64::from(r)))?,
                            );
                        }
                        let sizes: Vec<usize> = vars.iter().map(|v| v.elem_count()).collect();
                        let shards = Shards::balanced(&sizes, comm.rank(), 2);
                        let own = reduce_grads_to_owners(&comm, &vars, &shards, &grads)?;
                        let mut seen = Vec::new();
                        for (i, v) in vars.iter().enumerate() {
                            let mean = own.get(v).map(|g| g.flatten_all()?.to_vec1::<f32>()).transpose()?;
                            seen.push(mean);
                            if shards.owns(i) {
                                // The owner's update: a value that says who made it.
                                v.set(
                                    &(Tensor::ones(v.shape(), DType::F32, &dev)?
                                        * (100.0 * f64::from(r + 1.0) + i as f64))?,
                                )?;
                            }
                        }
                        all_gather_vars(&comm, &vars, &shards)?;
                        let after: Vec<Vec<f32>> = vars
                            .iter()
                            .map(|v| v.flatten_all()?.to_vec1::<f32>())
                            .collect::<candle_core::Result<_>>()?;
                        anyhow::Ok((shards.owners().to_vec(), seen, after))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect::<Vec<_>>()
        });
        let owners = &results[0].0;
        // Sizes 6, 4, 5: rank 0 owns the first, rank 1 the other two (9 elements against 6).
        assert_eq!(owners, &[0, 1, 1]);
        for (rank, (_, seen, after)) in results.iter().enumerate() {
            for (i, grad) in seen.iter().enumerate() {
                let n = shapes[i].iter().product();
                // Ranks' gradients 10 i and 10 i + 1: the mean is 10 i + 0.5, on the owner only.
                let expected = (owners[i] == rank).then(|| vec![10.0 * i as f32 + 0.5; n]);
                assert_eq!(grad, &expected, "rank {rank}, parameter {i}");
                assert_eq!(
                    after[i],
                    vec![100.0 * (owners[i] as f32 + 1.0) + i as f32; n],
                    "rank {rank}, parameter {i}"
                );
            }
        }
    }
}
