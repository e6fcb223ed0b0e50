//! Lock-free multi-threaded TransE epochs (Hogwild!, Niu et al. 2011; Fast-TransX trains
//! the same way).
//!
//! The shuffled epoch is cut into one contiguous block of batches per thread. Every thread
//! draws its negatives from its own generator (seeded from the trainer's), copies the rows
//! its batch touches out of the shared tables, computes the batch loss and gradients on that
//! copy with the single-thread code, and writes the lazy-Adam update of each touched row
//! back. Threads do not wait for each other: a row two threads touch at once may mix their
//! updates, as in Hogwild!; updates are sparse, so such collisions are rare on large graphs.
//! Shared values are read and written through relaxed atomics (plain loads and stores on
//! x86 and ARM), so a collision mixes values but is never undefined behaviour.
//!
//! Results are reproducible only with one thread (the trainer then never comes here).

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use simskip_data::{Matrix, Triple};

use crate::linkpred::FilterIndex;
use crate::transe::{
    batch_loss_and_gradients_with, normalize_l2, sample_negatives_with, Gradients, Scratch, TransE,
    TransEConfig,
};

// The atomic views below reinterpret `f32` and `u32` buffers as `AtomicU32`.
const _: () = assert!(std::mem::size_of::<AtomicU32>() == std::mem::size_of::<f32>());
const _: () = assert!(std::mem::align_of::<AtomicU32>() == std::mem::align_of::<f32>());

fn atomic_f32(x: &mut [f32]) -> &[AtomicU32] {
    // SAFETY: AtomicU32 has the size and alignment of f32 (checked above) and every bit
    // pattern is a valid u32; the exclusive borrow guarantees that for its lifetime the
    // buffer is only accessed through the returned atomics.
    unsafe { &*(x as *mut [f32] as *const [AtomicU32]) }
}

fn atomic_u32(x: &mut [u32]) -> &[AtomicU32] {
    // SAFETY: as in `atomic_f32`; AtomicU32 has the same in-memory representation as u32.
    unsafe { &*(x as *mut [u32] as *const [AtomicU32]) }
}

/// One embedding table and its lazy-Adam state, shared by the threads of an epoch.
struct SharedTable<'a> {
    dim: usize,
    rows: &'a [AtomicU32],
    m: &'a [AtomicU32],
    v: &'a [AtomicU32],
    steps: &'a [AtomicU32],
}

impl<'a> SharedTable<'a> {
    fn new(table: &'a mut Matrix, state: (&'a mut [u32], &'a mut [f32], &'a mut [f32])) -> Self {
        let (steps, m, v) = state;
        assert_eq!(m.len(), table.data.len(), "Adam state vs table");
        Self {
            dim: table.cols,
            rows: atomic_f32(&mut table.data),
            m: atomic_f32(m),
            v: atomic_f32(v),
            steps: atomic_u32(steps),
        }
    }

    fn read_row(&self, row: usize, out: &mut [f32]) {
        let src = &self.rows[row * self.dim..(row + 1) * self.dim];
        for (o, s) in out.iter_mut().zip(src) {
            *o = f32::from_bits(s.load(Relaxed));
        }
    }

    /// The lazy-Adam update of [`crate::sparse::SparseAdam::step`] for one row (same
    /// arithmetic), optionally followed by the unit-norm projection; `w` is scratch.
    fn adam_row(&self, row: usize, g: &[f32], hp: &AdamHyper, normalize: bool, w: &mut [f32]) {
        let d = self.dim;
        let t = self.steps[row]
            .fetch_add(1, Relaxed)
            .saturating_add(1)
            .min(i32::MAX as u32) as i32;
        let bc1 = 1.0 - hp.beta1.powi(t);
        let bc2 = 1.0 - hp.beta2.powi(t);
        let step = hp.lr / bc1;
        let inv_sqrt_bc2 = 1.0 / bc2.sqrt();
        let (b1, b2) = (hp.beta1, hp.beta2);
        let range = row * d..(row + 1) * d;
        let (ms, vs, ws) = (
            &self.m[range.clone()],
            &self.v[range.clone()],
            &self.rows[range],
        );
        for k in 0..d {
            let gk = g[k];
            let mk = b1 * f32::from_bits(ms[k].load(Relaxed)) + (1.0 - b1) * gk;
            let vk = b2 * f32::from_bits(vs[k].load(Relaxed)) + (1.0 - b2) * gk * gk;
            ms[k].store(mk.to_bits(), Relaxed);
            vs[k].store(vk.to_bits(), Relaxed);
            w[k] = f32::from_bits(ws[k].load(Relaxed))
                - step * mk / (vk.sqrt() * inv_sqrt_bc2 + hp.eps);
        }
        if normalize {
            normalize_l2(w);
        }
        for (s, &x) in ws.iter().zip(w.iter()) {
            s.store(x.to_bits(), Relaxed);
        }
    }
}

#[derive(Clone, Copy)]
pub(crate) struct AdamHyper {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
}

/// Global row ids of a batch mapped to consecutive local ids (first touch order).
struct LocalIds {
    slot: Vec<u32>,
    global: Vec<u32>,
}

impl LocalIds {
    fn new(n: usize) -> Self {
        Self {
            slot: vec![u32::MAX; n],
            global: Vec::new(),
        }
    }

    fn local(&mut self, g: u32) -> u32 {
        let s = &mut self.slot[g as usize];
        if *s == u32::MAX {
            *s = self.global.len() as u32;
            self.global.push(g);
        }
        *s
    }

    fn clear(&mut self) {
        for &g in &self.global {
            self.slot[g as usize] = u32::MAX;
        }
        self.global.clear();
    }
}

/// What one worker needs besides the shared tables.
pub(crate) struct EpochPlan<'a> {
    pub cfg: &'a TransEConfig,
    pub triples: &'a [Triple],
    pub order: &'a [u32],
    pub known: Option<&'a FilterIndex>,
    pub ent_adam: AdamHyper,
    pub rel_adam: AdamHyper,
}

/// One Hogwild epoch over `plan.order` with `seeds.len()` threads; the model's tables and
/// the Adam states are updated in place. Returns the summed (loss x batch size).
pub(crate) fn parallel_epoch(
    model: &mut TransE,
    ent_state: (&mut [u32], &mut [f32], &mut [f32]),
    rel_state: (&mut [u32], &mut [f32], &mut [f32]),
    plan: &EpochPlan<'_>,
    seeds: &[u64],
) -> f64 {
    let norm = model.norm;
    let (ne, nr) = (model.num_entities(), model.num_relations());
    let ents = SharedTable::new(&mut model.entities, ent_state);
    let rels = SharedTable::new(&mut model.relations, rel_state);
    let bs = plan.cfg.batch_size;
    let batches = plan.order.len().div_ceil(bs);
    let per_thread = batches.div_ceil(seeds.len()) * bs;
    std::thread::scope(|s| {
        let workers: Vec<_> = plan
            .order
            .chunks(per_thread)
            .zip(seeds)
            .map(|(shard, &seed)| {
                let (ents, rels) = (&ents, &rels);
                s.spawn(move || worker(ents, rels, norm, (ne, nr), plan, shard, seed))
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("TransE worker thread panicked"))
            .sum()
    })
}

fn worker(
    ents: &SharedTable<'_>,
    rels: &SharedTable<'_>,
    norm: crate::transe::Norm,
    (ne, nr): (usize, usize),
    plan: &EpochPlan<'_>,
    shard: &[u32],
    seed: u64,
) -> f64 {
    let cfg = plan.cfg;
    let d = cfg.dim;
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut ent_ids, mut rel_ids) = (LocalIds::new(ne), LocalIds::new(nr));
    let mut grads = Gradients::new(ne, nr, d);
    let mut scratch = Scratch::default();
    let mut local = TransE {
        entities: Matrix::zeros(0, d),
        relations: Matrix::zeros(0, d),
        norm,
    };
    let (mut batch, mut negs) = (Vec::new(), Vec::new());
    let (mut lpos, mut lneg) = (Vec::new(), Vec::new());
    let mut w = vec![0.0f32; d];
    let mut total = 0.0f64;
    for chunk in shard.chunks(cfg.batch_size) {
        batch.clear();
        batch.extend(chunk.iter().map(|&i| plan.triples[i as usize]));
        sample_negatives_with(&mut rng, cfg, ne as u32, plan.known, &batch, &mut negs);
        // Gather the touched rows into a small local model.
        ent_ids.clear();
        rel_ids.clear();
        let mut to_local = |t: &Triple| Triple {
            h: ent_ids.local(t.h),
            r: rel_ids.local(t.r),
            t: ent_ids.local(t.t),
        };
        lpos.clear();
        lpos.extend(batch.iter().map(&mut to_local));
        lneg.clear();
        lneg.extend(negs.iter().map(&mut to_local));
        gather(ents, &ent_ids.global, &mut local.entities);
        gather(rels, &rel_ids.global, &mut local.relations);
        let loss =
            batch_loss_and_gradients_with(&local, cfg.loss, &lpos, &lneg, &mut grads, &mut scratch);
        total += loss as f64 * batch.len() as f64;
        for (row, g) in grads.entities.iter() {
            let global = ent_ids.global[row as usize] as usize;
            ents.adam_row(global, g, &plan.ent_adam, cfg.normalize_entities, &mut w);
        }
        for (row, g) in grads.relations.iter() {
            let global = rel_ids.global[row as usize] as usize;
            rels.adam_row(global, g, &plan.rel_adam, false, &mut w);
        }
    }
    total
}

fn gather(table: &SharedTable<'_>, ids: &[u32], out: &mut Matrix) {
    let d = table.dim;
    out.rows = ids.len();
    out.data.resize(ids.len() * d, 0.0);
    for (i, &g) in ids.iter().enumerate() {
        table.read_row(g as usize, &mut out.data[i * d..(i + 1) * d]);
    }
}

/// Seeds for the threads of one epoch, drawn from the trainer's generator.
pub(crate) fn thread_seeds(rng: &mut StdRng, threads: usize) -> Vec<u64> {
    (0..threads).map(|_| rng.random::<u64>()).collect()
}
