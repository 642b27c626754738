//! The data loader of training and validation: tokenised examples padded into batches, shuffled
//! per epoch from `(seed, epoch)` so that a resumed run sees the same order; the epoch and the
//! number of batches to skip (resume) are set by the training strategy through shared counters.
//! For data-parallel training the loader hands out each global batch as consecutive parts of
//! `batch_size / devices` examples, part `k` on device `k mod devices` ([`TaskLoader::sharded`]).

use crate::data;
use crate::task::{Batch, Encoded, make_batch};
use burn::data::dataloader::{DataLoader, DataLoaderIterator, Progress};
use burn::tensor::backend::Backend;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Batches over tokenised examples, shuffled per epoch by `(seed, epoch)`; the epoch and the
/// number of leading batches to skip (resume) are set by the strategy through shared counters.
#[derive(Clone)]
pub struct TaskLoader<B: Backend> {
    items: Arc<Vec<Encoded>>,
    batch_size: usize,
    pad: u32,
    /// Where batch `k` is made: `devices[k % devices.len()]`.
    devices: Vec<B::Device>,
    shuffle_seed: Option<u64>,
    pub(crate) epoch: Arc<AtomicUsize>,
    pub(crate) skip: Arc<AtomicUsize>,
}

impl<B: Backend> TaskLoader<B> {
    /// A loader over `items`.
    pub fn new(
        items: Arc<Vec<Encoded>>,
        batch_size: usize,
        pad: u32,
        device: B::Device,
        shuffle_seed: Option<u64>,
    ) -> Self {
        Self {
            items,
            batch_size: batch_size.max(1),
            pad,
            devices: vec![device],
            shuffle_seed,
            epoch: Arc::new(AtomicUsize::new(1)),
            skip: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The same examples in batches of `batch_size / devices.len()` (which the caller checked to
    /// divide), made round-robin on `devices`: each run of `devices.len()` consecutive batches is
    /// one batch of the original loader, split in order.
    pub fn sharded(mut self, devices: &[B::Device]) -> Self {
        if devices.len() > 1 {
            self.batch_size = (self.batch_size / devices.len()).max(1);
            self.devices = devices.to_vec();
        }
        self
    }

    /// Batches per epoch.
    pub fn batches(&self) -> usize {
        self.items.len().div_ceil(self.batch_size)
    }

    fn order(&self) -> Vec<usize> {
        match self.shuffle_seed {
            Some(seed) => {
                let epoch = self.epoch.load(Ordering::SeqCst) as u64;
                data::permutation(self.items.len(), seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            }
            None => (0..self.items.len()).collect(),
        }
    }
}

struct TaskLoaderIter<'a, B: Backend> {
    loader: &'a TaskLoader<B>,
    order: Vec<usize>,
    next_batch: usize,
}

impl<B: Backend> Iterator for TaskLoaderIter<'_, B> {
    type Item = Batch<B>;
    fn next(&mut self) -> Option<Batch<B>> {
        let bs = self.loader.batch_size;
        let start = self.next_batch * bs;
        if start >= self.order.len() {
            return None;
        }
        let end = (start + bs).min(self.order.len());
        let items: Vec<&Encoded> = self.order[start..end].iter().map(|&i| &self.loader.items[i]).collect();
        self.next_batch += 1;
        let devices = &self.loader.devices;
        Some(make_batch(&items, self.loader.pad, &devices[(self.next_batch - 1) % devices.len()]))
    }
}

impl<B: Backend> DataLoaderIterator<Batch<B>> for TaskLoaderIter<'_, B> {
    fn progress(&self) -> Progress {
        Progress {
            items_processed: (self.next_batch * self.loader.batch_size).min(self.order.len()),
            items_total: self.order.len(),
        }
    }
}

impl<B: Backend> DataLoader<B, Batch<B>> for TaskLoader<B> {
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<Batch<B>> + 'a> {
        let skip = self.skip.swap(0, Ordering::SeqCst);
        Box::new(TaskLoaderIter { loader: self, order: self.order(), next_batch: skip })
    }
    fn num_items(&self) -> usize {
        self.items.len()
    }
    fn to_device(&self, device: &B::Device) -> Arc<dyn DataLoader<B, Batch<B>>> {
        let mut l = self.clone();
        l.devices = vec![device.clone()];
        Arc::new(l)
    }
    fn slice(&self, start: usize, end: usize) -> Arc<dyn DataLoader<B, Batch<B>>> {
        let mut l = self.clone();
        l.items = Arc::new(self.items[start.min(end)..end.min(self.items.len())].to_vec());
        Arc::new(l)
    }
}
