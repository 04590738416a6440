//! A world of one process: every collective is the identity (the default, and what tests use).

use super::{check_gather_counts, check_root, check_scatter_counts, Communicator, DistError};

/// A world of one: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<(), DistError> {
        Ok(())
    }

    fn reduce_scatter_sum(&self, buf: &[f32], counts: &[usize]) -> Result<Vec<f32>, DistError> {
        check_scatter_counts(counts, 1, buf.len())?;
        Ok(buf.to_vec())
    }

    fn all_gather(&self, mine: &[f32], counts: &[usize]) -> Result<Vec<f32>, DistError> {
        check_gather_counts(counts, 1, 0, mine.len())?;
        Ok(mine.to_vec())
    }

    fn broadcast(&self, _buf: &mut [f32], root: usize) -> Result<(), DistError> {
        check_root(root, 1)
    }

    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, DistError> {
        Ok(vec![mine.to_vec()])
    }

    fn barrier(&self) -> Result<(), DistError> {
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}
