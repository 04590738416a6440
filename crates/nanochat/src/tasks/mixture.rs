//! Combining tasks: [`Subset`] (a slice `start..stop` by `step`, or a seeded shuffle),
//! [`TaskSequence`] (one task after another) and [`TaskMixture`] (all examples of several tasks,
//! interleaved in a seeded random order, so a training run sees every kind of data throughout).
//!
//! Tasks are shared as `Arc<dyn Task>`: listing the same task twice in a mixture oversamples it
//! (the original does this with its identity conversations) without loading it twice.

use std::sync::Arc;

use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::{check_index, EvalType, Example, Task};

/// The eval type the tasks share, or `None` when they differ (a mixture is then training data).
fn common_eval_type(tasks: &[Arc<dyn Task>]) -> Option<EvalType> {
    let first = tasks.first()?.eval_type();
    tasks.iter().all(|t| t.eval_type() == first).then_some(first).flatten()
}

/// Some examples of a task, in a chosen order.
pub struct Subset {
    inner: Arc<dyn Task>,
    name: String,
    indices: Vec<usize>,
}

impl Subset {
    /// The examples `start, start + step, …` below `stop` (the task's end when `None`; clipped to it),
    /// as Python's `task[start:stop:step]`.
    pub fn slice(inner: Arc<dyn Task>, start: usize, stop: Option<usize>, step: usize) -> Result<Subset> {
        if step == 0 {
            bail!("a task slice needs a step of at least 1");
        }
        let stop = stop.unwrap_or(usize::MAX).min(inner.len());
        let name = format!("{}[{start}:{stop}:{step}]", inner.name());
        let indices = (start..stop).step_by(step).collect();
        Ok(Subset { inner, name, indices })
    }

    /// All examples in an order fixed by `seed`.
    pub fn shuffled(inner: Arc<dyn Task>, seed: u64) -> Subset {
        let mut indices: Vec<usize> = (0..inner.len()).collect();
        indices.shuffle(&mut StdRng::seed_from_u64(seed));
        let name = format!("{}(shuffled {seed})", inner.name());
        Subset { inner, name, indices }
    }
}

impl Task for Subset {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn len(&self) -> usize {
        self.indices.len()
    }

    fn get(&self, index: usize) -> Result<Example> {
        check_index(&self.name, index, self.indices.len())?;
        self.inner.get(self.indices[index])
    }

    fn eval_type(&self) -> Option<EvalType> {
        self.inner.eval_type()
    }
}

/// The tasks' examples one task after another.
pub struct TaskSequence {
    tasks: Vec<Arc<dyn Task>>,
    /// `ends[k]` is one past the last index of task `k` in the sequence.
    ends: Vec<usize>,
}

impl TaskSequence {
    pub fn new(tasks: Vec<Arc<dyn Task>>) -> TaskSequence {
        let ends = tasks
            .iter()
            .scan(0, |end, task| {
                *end += task.len();
                Some(*end)
            })
            .collect();
        TaskSequence { tasks, ends }
    }
}

impl Task for TaskSequence {
    fn name(&self) -> String {
        format!("sequence({})", self.tasks.iter().map(|t| t.name()).collect::<Vec<_>>().join(", "))
    }

    fn len(&self) -> usize {
        self.ends.last().copied().unwrap_or(0)
    }

    fn get(&self, index: usize) -> Result<Example> {
        check_index("task sequence", index, self.len())?;
        let k = self.ends.partition_point(|&end| end <= index);
        let start = if k == 0 { 0 } else { self.ends[k - 1] };
        self.tasks[k].get(index - start)
    }

    fn eval_type(&self) -> Option<EvalType> {
        common_eval_type(&self.tasks)
    }
}

/// Every example of every task, shuffled together by `seed`: the length is the sum of the tasks'
/// lengths, and each task's examples spread evenly over the whole mixture rather than in blocks.
pub struct TaskMixture {
    tasks: Vec<Arc<dyn Task>>,
    /// `(task, index within the task)` for each position of the mixture.
    order: Vec<(usize, usize)>,
}

impl TaskMixture {
    pub fn new(tasks: Vec<Arc<dyn Task>>, seed: u64) -> TaskMixture {
        let mut order: Vec<(usize, usize)> =
            tasks.iter().enumerate().flat_map(|(k, task)| (0..task.len()).map(move |i| (k, i))).collect();
        order.shuffle(&mut StdRng::seed_from_u64(seed));
        TaskMixture { tasks, order }
    }
}

impl Task for TaskMixture {
    fn name(&self) -> String {
        format!("mixture({})", self.tasks.iter().map(|t| t.name()).collect::<Vec<_>>().join(", "))
    }

    fn len(&self) -> usize {
        self.order.len()
    }

    fn get(&self, index: usize) -> Result<Example> {
        check_index("task mixture", index, self.order.len())?;
        let (k, i) = self.order[index];
        self.tasks[k].get(i)
    }

    fn eval_type(&self) -> Option<EvalType> {
        common_eval_type(&self.tasks)
    }
}
