//! A `DataLoader` for image folders: seeded shuffling, worker threads that decode and augment in
//! parallel, bounded prefetch, and batches as tch tensors.
use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use super::image_folder::{load_rgb, ImageFolder};
use super::transforms::{Compose, ImageTensor, Sample, Transform};
use crate::error::{Error, Result};

/// One batch: images `[n, 3, h, w]` (f32) and labels `[n]` (i64).
pub type Batch = (Tensor, Tensor);

/// Batches of an [`ImageFolder`] through a transform, like PyTorch's `DataLoader`.
///
/// Each call of [`iter`](Self::iter) is one epoch; with `shuffle`, epoch `e` visits the samples
/// in an order drawn from `(seed, e)`, and sample `k` of epoch `e` is augmented with a random
/// stream drawn from `(seed, e, k)`: the same seed gives the same batches whatever the number
/// of workers. The last, partial batch is kept.
///
/// In distributed training ([`set_shard`](Self::set_shard), which `train_ch13` calls under a
/// process group) each rank reads its share of every batch of that one order, as
/// `torch.chunk` would split it, with the same random streams: the ranks together see exactly
/// the batches one process would.
pub struct DataLoader {
    dataset: Arc<ImageFolder>,
    transform: Arc<Compose>,
    batch_size: usize,
    shuffle: bool,
    seed: u64,
    num_workers: usize,
    prefetch: usize,
    pin_memory: bool,
    epoch: AtomicU64,
    /// (rank, world size): this process's share of each batch.
    shard: Mutex<(usize, usize)>,
}

impl DataLoader {
    /// A loader with one batch of `batch_size` after another, in order, no workers (PyTorch's
    /// defaults); change it with the builder methods.
    pub fn new(dataset: ImageFolder, transform: Compose, batch_size: usize) -> Result<DataLoader> {
        if batch_size == 0 {
            return Err(Error::arg("DataLoader", "batch_size must be at least 1"));
        }
        Ok(DataLoader {
            dataset: Arc::new(dataset),
            transform: Arc::new(transform),
            batch_size,
            shuffle: false,
            seed: 0,
            num_workers: 0,
            prefetch: 2,
            pin_memory: false,
            epoch: AtomicU64::new(0),
            shard: Mutex::new((0, 1)),
        })
    }

    /// Reshuffle every epoch (PyTorch's `shuffle=True`).
    pub fn shuffle(mut self, shuffle: bool) -> Self {
        self.shuffle = shuffle;
        self
    }

    /// The seed for shuffling and augmentation.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Threads that decode and augment, sharing each batch's samples; 0 does it on the calling
    /// thread.
    pub fn num_workers(mut self, n: usize) -> Self {
        self.num_workers = n;
        self
    }

    /// Batches a worker may have ready ahead of use (PyTorch's `prefetch_factor`, default 2): the
    /// workers together stay at most `prefetch * num_workers` batches ahead.
    pub fn prefetch(mut self, n: usize) -> Self {
        self.prefetch = n.max(1);
        self
    }

    /// Put batches in page-locked memory, for fast, non-blocking copies to a GPU. Ignored
    /// without CUDA.
    pub fn pin_memory(mut self, pin: bool) -> Self {
        self.pin_memory = pin;
        self
    }

    /// Read only rank `rank`'s share of each batch, of `world` ranks (distributed training):
    /// batch `b` is split into `world` chunks as `torch.chunk` splits it, and this rank gets
    /// chunk `rank` (empty when a small last batch has fewer chunks). `(0, 1)` reads it all.
    pub fn set_shard(&self, rank: usize, world: usize) -> Result<()> {
        if world == 0 || rank >= world {
            return Err(Error::arg(
                "DataLoader::set_shard",
                format!("rank {rank} is outside a world of {world}"),
            ));
        }
        *lock(&self.shard) = (rank, world);
        Ok(())
    }

    /// (rank, world size) of [`set_shard`](Self::set_shard).
    pub fn shard(&self) -> (usize, usize) {
        *lock(&self.shard)
    }

    /// The epoch the next [`iter`](Self::iter) reads (its shuffle and augmentations are
    /// keyed by the seed, this epoch and each image's position).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// The seed of the shuffle and the augmentations.
    pub fn seed_value(&self) -> u64 {
        self.seed
    }

    /// Start counting epochs from `epoch` (to resume a run).
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::SeqCst);
    }

    /// Whether each epoch reads the images in a new random order.
    pub fn is_shuffled(&self) -> bool {
        self.shuffle
    }

    pub fn dataset(&self) -> &ImageFolder {
        &self.dataset
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Batches an epoch: `ceil(len / batch_size)`.
    pub fn len(&self) -> usize {
        self.dataset.len().div_ceil(self.batch_size)
    }

    pub fn is_empty(&self) -> bool {
        self.dataset.is_empty()
    }

    /// One epoch of batches.
    pub fn iter(&self) -> Batches {
        crate::train::keep_freed_memory();
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst);
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        if self.shuffle {
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(
                self.seed,
                epoch,
                u64::MAX,
            )));
        }
        let (rank, world) = self.shard();
        let (order, keys, bounds) = shard(order, self.batch_size, rank, world);
        let plan = Arc::new(Plan {
            dataset: self.dataset.clone(),
            transform: self.transform.clone(),
            order,
            keys,
            bounds,
            seed: self.seed,
            epoch,
            pin_memory: self.pin_memory && tch::Cuda::is_available(),
        });
        let num_batches = self.len();
        let num_workers = self.num_workers.min(plan.order.len());
        let workers =
            (num_workers > 0).then(|| Workers::start(plan.clone(), num_workers, self.prefetch));
        Batches {
            plan,
            next: 0,
            num_batches,
            workers,
        }
    }
}

impl IntoIterator for &DataLoader {
    type Item = Result<Batch>;
    type IntoIter = Batches;
    fn into_iter(self) -> Batches {
        self.iter()
    }
}

/// This rank's part of an epoch's `order`: the samples it reads, their positions in the whole
/// order (which key their random streams), and where each batch starts among them
/// (`bounds[b]..bounds[b + 1]`, one entry a batch of the whole epoch, plus the end).
fn shard(
    order: Vec<usize>,
    batch_size: usize,
    rank: usize,
    world: usize,
) -> (Vec<usize>, Option<Vec<usize>>, Vec<usize>) {
    let n = order.len();
    let num_batches = n.div_ceil(batch_size);
    if world <= 1 {
        let mut bounds: Vec<usize> = (0..num_batches).map(|b| b * batch_size).collect();
        bounds.push(n);
        return (order, None, bounds);
    }
    let (mut mine, mut keys, mut bounds) = (Vec::new(), Vec::new(), Vec::new());
    for b in 0..num_batches {
        let (start, end) = (b * batch_size, ((b + 1) * batch_size).min(n));
        // torch.chunk: chunks of ceil(len / world); the last ones may be short or missing.
        let chunk = (end - start).div_ceil(world);
        let from = (start + rank * chunk).min(end);
        let to = (from + chunk).min(end);
        bounds.push(mine.len());
        mine.extend_from_slice(&order[from..to]);
        keys.extend(from..to);
    }
    bounds.push(mine.len());
    (mine, Some(keys), bounds)
}

/// What one epoch reads, shared by its workers.
struct Plan {
    dataset: Arc<ImageFolder>,
    transform: Arc<Compose>,
    /// The samples this process reads, in order.
    order: Vec<usize>,
    /// Each one's position in the whole epoch's order (`None`: the same as in `order`).
    keys: Option<Vec<usize>>,
    /// Where batch `b` starts in `order`; the last entry is the end.
    bounds: Vec<usize>,
    seed: u64,
    epoch: u64,
    pin_memory: bool,
}

impl Plan {
    /// The samples of batch `b`: positions in `order`.
    fn positions(&self, b: usize) -> std::ops::Range<usize> {
        self.bounds[b]..self.bounds[b + 1]
    }

    /// The batch that position `k` of `order` is in.
    fn batch_of(&self, k: usize) -> usize {
        self.bounds.partition_point(|&start| start <= k) - 1
    }

    /// Sample `k` of the epoch, decoded and transformed, with its label. A panic in decoding or
    /// in a transform becomes an error for the sample's batch, on every thread alike.
    fn sample(&self, k: usize) -> Result<(ImageTensor, i64)> {
        let (path, label) = &self.dataset.samples()[self.order[k]];
        let key = self.keys.as_ref().map_or(k, |keys| keys[k]);
        let mut rng = ChaCha8Rng::seed_from_u64(mix(self.seed, self.epoch, key as u64));
        let transformed = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.transform
                .apply(Sample::Image(load_rgb(path)?), &mut rng)
        }))
        .unwrap_or_else(|_| {
            Err(Error::Dataset {
                path: path.clone(),
                msg: "decoding or a transform panicked (its message is above)".into(),
            })
        })?;
        match transformed {
            Sample::Tensor(t) => Ok((t, *label)),
            Sample::Image(_) => Err(Error::arg(
                "DataLoader",
                "the transform must end with ToTensor (it returned an image)",
            )),
        }
    }

    /// Batch `b` on the calling thread: decode, transform and stack its samples.
    fn batch(&self, b: usize) -> Result<Batch> {
        let positions = self.positions(b);
        let mut images: Vec<ImageTensor> = Vec::with_capacity(positions.len());
        let mut labels = Vec::with_capacity(positions.len());
        for k in positions {
            let (t, label) = self.sample(k)?;
            if let Some(first) = images.first() {
                self.check_size(k, &t, (first.height, first.width))?;
            }
            images.push(t);
            labels.push(label);
        }
        let x = stack(&images)?; // [n, 3, h, w]
        self.finish(x, &labels)
    }

    /// An error unless sample `k` has the size of `other`, an image of the same batch.
    fn check_size(&self, k: usize, t: &ImageTensor, other: (usize, usize)) -> Result<()> {
        if (t.height, t.width) == other {
            return Ok(());
        }
        Err(Error::Dataset {
            path: self.dataset.samples()[self.order[k]].0.clone(),
            msg: format!(
                "transformed to {}x{}, but another image of its batch is {}x{}: \
                 end the transform with a fixed-size crop or resize",
                t.height, t.width, other.0, other.1
            ),
        })
    }

    /// The batch's labels as a tensor, both pinned if asked.
    fn finish(&self, x: Tensor, labels: &[i64]) -> Result<Batch> {
        let y = Tensor::f_from_slice(labels)?; // [n]
        if self.pin_memory {
            return Ok((
                x.f_pin_memory(Device::Cuda(0))?,
                y.f_pin_memory(Device::Cuda(0))?,
            ));
        }
        Ok((x, y))
    }
}

/// Worker threads for one epoch. They take the epoch's samples one at a time, in order, and
/// write each into its batch's tensor, so that all of them work on the first batch at the start
/// of an epoch (a worker a batch would make the first batch wait for one thread to decode all of
/// it). The thread that completes a batch pins it and sends it; `Batches` puts batches back in
/// order. Workers stay at most `prefetch * workers` batches ahead of the consumer.
struct Workers {
    shared: Arc<Shared>,
    rx: Receiver<(usize, Result<Batch>)>,
    done: BTreeMap<usize, Result<Batch>>,
    handles: Vec<JoinHandle<()>>,
}

struct Shared {
    plan: Arc<Plan>,
    /// The next sample to take.
    next_sample: AtomicUsize,
    /// Batches being filled.
    slots: Mutex<HashMap<usize, Slot>>,
    /// Batches handed out so far, and the wake-up for workers waiting on it.
    consumed: Mutex<usize>,
    wake: Condvar,
    ahead: usize,
    stop: AtomicBool,
}

/// A batch being filled by several workers.
struct Slot {
    /// `[n, 3, h, w]`, allocated by the first sample to arrive, with its `(h, w)`.
    x: Option<(Tensor, (usize, usize))>,
    labels: Vec<i64>,
    filled: usize,
    error: Option<Error>,
}

impl Slot {
    /// Records the label of sample `k` (row `row` of the batch) and returns where its pixels go,
    /// the address of the batch's data, with the pixels; `None` once the batch has failed.
    fn reserve(
        &mut self,
        plan: &Plan,
        k: usize,
        row: usize,
        sample: Result<(ImageTensor, i64)>,
    ) -> Result<Option<(usize, ImageTensor)>> {
        let (t, label) = sample?;
        if self.error.is_some() {
            return Ok(None);
        }
        self.labels[row] = label;
        if self.x.is_none() {
            let n = self.labels.len() as i64;
            let x = Tensor::f_empty(
                [n, 3, t.height as i64, t.width as i64],
                (Kind::Float, Device::Cpu),
            )?;
            self.x = Some((x, (t.height, t.width)));
        }
        let (x, size) = self.x.as_ref().expect("allocated above");
        plan.check_size(k, &t, *size)?;
        Ok(Some((x.data_ptr() as usize, t)))
    }
}

impl Workers {
    fn start(plan: Arc<Plan>, n: usize, prefetch: usize) -> Workers {
        let (tx, rx) = channel();
        let shared = Arc::new(Shared {
            plan,
            next_sample: AtomicUsize::new(0),
            slots: Mutex::new(HashMap::new()),
            consumed: Mutex::new(0),
            wake: Condvar::new(),
            ahead: prefetch * n,
            stop: AtomicBool::new(false),
        });
        let handles = (0..n)
            .map(|_| {
                let (shared, tx) = (shared.clone(), tx.clone());
                std::thread::spawn(move || shared.work(&tx))
            })
            .collect();
        Workers {
            shared,
            rx,
            done: BTreeMap::new(),
            handles,
        }
    }

    /// Batch `b`, waiting for it if needed; then lets the workers move on.
    fn take(&mut self, b: usize) -> Result<Batch> {
        let batch = loop {
            if let Some(batch) = self.done.remove(&b) {
                break batch;
            }
            match self.rx.recv() {
                Ok((i, batch)) => {
                    self.done.insert(i, batch);
                }
                Err(_) => {
                    break Err(Error::Loader {
                        batch: b,
                        msg: "the workers stopped before it was ready".into(),
                    })
                }
            }
        };
        *lock(&self.shared.consumed) = b + 1;
        self.shared.wake.notify_all();
        batch
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            // Under the lock, so that no worker misses the wake-up between its check and its wait.
            let _consumed = lock(&self.shared.consumed);
            self.shared.wake.notify_all();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

impl Shared {
    fn work(&self, tx: &Sender<(usize, Result<Batch>)>) {
        let plan = &self.plan;
        loop {
            let k = self.next_sample.fetch_add(1, Ordering::SeqCst);
            if k >= plan.order.len() || self.stop.load(Ordering::SeqCst) {
                return;
            }
            let b = plan.batch_of(k);
            {
                let mut consumed = lock(&self.consumed);
                while b >= *consumed + self.ahead && !self.stop.load(Ordering::SeqCst) {
                    consumed = self
                        .wake
                        .wait(consumed)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                }
            }
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            if let Some((b, batch)) = self.place(k, b, plan.sample(k)) {
                if tx.send((b, batch)).is_err() {
                    return; // the epoch was dropped
                }
            }
        }
    }

    /// Writes sample `k` into batch `b`; returns the batch if this completed it.
    fn place(
        &self,
        k: usize,
        b: usize,
        sample: Result<(ImageTensor, i64)>,
    ) -> Option<(usize, Result<Batch>)> {
        let plan = &self.plan;
        let positions = plan.positions(b);
        let (n, row) = (positions.len(), k - positions.start);
        // Under the lock: find (or allocate) the batch's tensor and this sample's place in it.
        let dst = {
            let mut slots = lock(&self.slots);
            let slot = slots.entry(b).or_insert_with(|| Slot {
                x: None,
                labels: vec![0; n],
                filled: 0,
                error: None,
            });
            match slot.reserve(plan, k, row, sample) {
                Ok(dst) => dst,
                Err(e) => {
                    slot.error.get_or_insert(e);
                    None
                }
            }
        };
        // Outside the lock: copy the pixels into this sample's row.
        if let Some((ptr, t)) = dst {
            let len = t.data.len();
            // SAFETY: `ptr` is the data of the slot's contiguous f32 tensor `[n, 3, h, w]`, which
            // the slot keeps alive until every row is filled (`filled` counts this row only
            // below); `t` has `3 * h * w` values (checked against the slot's size), and row
            // `row` is written by this thread alone.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    t.data.as_ptr(),
                    (ptr as *mut f32).add(row * len),
                    len,
                );
            }
        }
        let finished = {
            let mut slots = lock(&self.slots);
            let slot = slots.get_mut(&b)?;
            slot.filled += 1;
            if slot.filled < n {
                return None;
            }
            slots.remove(&b)?
        };
        let batch = match (finished.error, finished.x) {
            (Some(e), _) => Err(e),
            (None, Some((x, _))) => plan.finish(x, &finished.labels),
            (None, None) => Err(Error::Loader {
                batch: b,
                msg: "it is empty".into(),
            }),
        };
        Some((b, batch))
    }
}

/// A mutex's data, also after a thread panicked while holding it (the data stay consistent: each
/// critical section here finishes its updates before anything can panic).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A batch of no samples: `[0, 3, 0, 0]` images and `[0]` labels.
fn empty_batch() -> Result<Batch> {
    Ok((
        Tensor::f_zeros([0, 3, 0, 0], (Kind::Float, Device::Cpu))?,
        Tensor::f_zeros([0], (Kind::Int64, Device::Cpu))?,
    ))
}

/// Stacks `[3, h, w]` images of one size into a `[n, 3, h, w]` tensor with a single copy.
fn stack(images: &[ImageTensor]) -> Result<Tensor> {
    let (h, w) = images.first().map_or((0, 0), |t| (t.height, t.width));
    let x = Tensor::f_empty(
        [images.len() as i64, 3, h as i64, w as i64],
        (Kind::Float, Device::Cpu),
    )?;
    let len = images.len() * 3 * h * w;
    // SAFETY: `x` is a new, contiguous f32 tensor of exactly `len` values on the CPU, owned here;
    // nothing else can read or write it while this slice lives.
    let dst = unsafe { std::slice::from_raw_parts_mut(x.data_ptr() as *mut f32, len) };
    for (chunk, t) in dst.chunks_exact_mut((3 * h * w).max(1)).zip(images) {
        chunk.copy_from_slice(&t.data);
    }
    Ok(x)
}

/// A seed from (seed, epoch, index): SplitMix64 steps, so nearby inputs give unrelated streams.
fn mix(seed: u64, epoch: u64, index: u64) -> u64 {
    let mut z = seed;
    for v in [epoch, index] {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15).wrapping_add(v);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    z
}

/// The batches of one epoch, in order.
pub struct Batches {
    plan: Arc<Plan>,
    next: usize,
    num_batches: usize,
    workers: Option<Workers>,
}

impl Batches {
    /// Batches left in this epoch.
    pub fn remaining(&self) -> usize {
        self.num_batches - self.next
    }
}

impl Iterator for Batches {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.next >= self.num_batches {
            return None;
        }
        let b = self.next;
        self.next += 1;
        if self.plan.positions(b).is_empty() {
            // A rank's share of a last batch too small to reach it (distributed training).
            return Some(empty_batch());
        }
        Some(match &mut self.workers {
            Some(workers) => workers.take(b),
            None => self.plan.batch(b),
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining(), Some(self.remaining()))
    }
}

impl ExactSizeIterator for Batches {}
