//! A hand-fused CPU training step for the SimSkip network.
//!
//! [`FastTrainer`] computes exactly what the candle path of
//! [`SimSkipTrainer::train_step`](crate::train::SimSkipTrainer::train_step) computes — the
//! training-mode forward pass (BatchNorm on batch statistics, updating the running statistics
//! with candle's momentum convention and unbiased running variance; inverted dropout with masks
//! drawn by [`dropout_mask`](crate::augment::dropout_mask)'s rule from the same generator, layer 1
//! then layer 2), the NT-Xent loss, its exact gradient and candle's `AdamW` update — on plain
//! `f32` slices:
//!
//! * every matrix product is one `gemm` call on row-major buffers (transposes are strides);
//! * BatchNorm + ReLU + dropout are one fused pass forward and one backward;
//! * NT-Xent normalises the rows, forms `S = ẑ ẑᵀ` with one gemm, turns each row into its
//!   softmax-gradient row in place ([`nt_xent_row`], shared with the candle op) and needs one
//!   more gemm for `∂L/∂ẑ = (G + Gᵀ) ẑ`;
//! * all buffers are allocated once (grown to the largest batch seen) and reused.
//!
//! The trainer owns the [`Weights`] and updates them in place; its gradients and AdamW moments
//! are flat buffers with the layout of the weights' trained-parameter buffer, so the update is
//! one loop over all parameters.

use gemm::Parallelism;
use rand::rngs::StdRng;
use rayon::prelude::*;

use crate::augment::mask_in_place;
use crate::error::{RefineError, Result};
use crate::loss::{nt_xent_row, symmetrise};
use crate::model::{BN_EPS, BN_MOMENTUM};
use crate::weights::{Param, Weights, PARAMS};

/// AdamW hyper-parameters (candle's `ParamsAdamW` semantics).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// Row-major scratch buffers, sized for `cap` rows.
#[derive(Default)]
struct Workspace {
    cap: usize,
    mask1: Vec<f32>,
    mask2: Vec<f32>,
    // Layer 1: pre-BN (then x̂), BN output (for the ReLU mask), output after dropout.
    xh1: Vec<f32>,
    y1: Vec<f32>,
    h1: Vec<f32>,
    xh2: Vec<f32>,
    y2: Vec<f32>,
    h2: Vec<f32>,
    f: Vec<f32>,
    q: Vec<f32>,
    u: Vec<f32>,
    z: Vec<f32>,
    zn: Vec<f32>,
    norm: Vec<f32>,
    s: Vec<f32>,
    row_loss: Vec<f32>,
    // Gradients of activations.
    dz: Vec<f32>,
    dq: Vec<f32>,
    df: Vec<f32>,
    dh2: Vec<f32>,
    dh1: Vec<f32>,
    // Per-feature BatchNorm statistics and sums.
    mean1: Vec<f32>,
    inv1: Vec<f32>,
    mean2: Vec<f32>,
    inv2: Vec<f32>,
}

impl Workspace {
    fn ensure(&mut self, n: usize, d: usize, h: usize) {
        if n <= self.cap {
            return;
        }
        let grow = |v: &mut Vec<f32>, len: usize| v.resize(len, 0.0);
        for (v, len) in [
            (&mut self.mask1, n * h),
            (&mut self.mask2, n * d),
            (&mut self.xh1, n * h),
            (&mut self.y1, n * h),
            (&mut self.h1, n * h),
            (&mut self.xh2, n * d),
            (&mut self.y2, n * d),
            (&mut self.h2, n * d),
            (&mut self.f, n * d),
            (&mut self.q, n * d),
            (&mut self.u, n * d),
            (&mut self.z, n * d),
            (&mut self.zn, n * d),
            (&mut self.norm, n),
            (&mut self.s, n * n),
            (&mut self.row_loss, n),
            (&mut self.dz, n * d),
            (&mut self.dq, n * d),
            (&mut self.df, n * d),
            (&mut self.dh2, n * d),
            (&mut self.dh1, n * h),
            (&mut self.mean1, h),
            (&mut self.inv1, h),
            (&mut self.mean2, d),
            (&mut self.inv2, d),
        ] {
            grow(v, len);
        }
        self.cap = n;
    }
}

/// The fused trainer: the weights it trains, their gradients and AdamW moments (laid out as
/// [`Weights::trainable`]), and the scratch buffers.
pub struct FastTrainer {
    weights: Weights,
    dim: usize,
    hidden: usize,
    skip: bool,
    dropout: f32,
    inv_tau: f32,
    adam: AdamWParams,
    step_t: usize,
    threads: usize,
    grads: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    ws: Workspace,
    /// FedProx's proximal term, when the local objective has one.
    proximal: Option<Proximal>,
}

/// FedProx's proximal term `mu/2 ||w - w_anchor||²` over the trained parameters (Li et al.
/// 2020): it holds a local copy near the global model it started the round from, which limits
/// client drift on non-identical data.
#[derive(Clone, Debug, PartialEq)]
pub struct Proximal {
    pub mu: f32,
    /// The anchor `w_anchor`, laid out as [`Weights::trainable`].
    pub anchor: Vec<f32>,
}

impl std::fmt::Debug for FastTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastTrainer")
            .field("dim", &self.dim)
            .field("skip", &self.skip)
            .field("step_t", &self.step_t)
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

/// How the matrix products use the threads.
#[derive(Clone, Copy, Debug)]
struct Par {
    threads: usize,
    /// Split the rows of each product over `threads` single-threaded gemm calls (rayon tasks)
    /// rather than let gemm parallelise internally.
    split_rows: bool,
}

/// `dst (m×n) = [dst +] lhs (m×k) · rhs (k×n)`, each operand given as (slice, row stride, column
/// stride). Row-major `dst`.
#[allow(clippy::too_many_arguments)]
fn mm(
    par: Par,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
) {
    let dst = &mut dst[..m * n];
    if par.threads > 1 && par.split_rows && m >= 32 * par.threads {
        let rows = m.div_ceil(par.threads);
        dst.par_chunks_mut(rows * n).enumerate().for_each(|(t, d)| {
            let r0 = t * rows;
            let mr = d.len() / n;
            gemm_1(
                Parallelism::None,
                mr,
                n,
                k,
                d,
                accumulate,
                &lhs[r0 * lhs_rs..],
                lhs_rs,
                lhs_cs,
                rhs,
                rhs_rs,
                rhs_cs,
            );
        });
    } else {
        let p = if par.threads > 1 {
            Parallelism::Rayon(par.threads)
        } else {
            Parallelism::None
        };
        gemm_1(
            p, m, n, k, dst, accumulate, lhs, lhs_rs, lhs_cs, rhs, rhs_rs, rhs_cs,
        );
    }
}

/// One `gemm` call; see [`mm`].
#[allow(clippy::too_many_arguments)]
fn gemm_1(
    par: Parallelism,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
) {
    assert!(dst.len() >= m * n);
    if m > 0 && n > 0 && k > 0 {
        assert!(lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
        assert!(rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    }
    // SAFETY: the asserts above keep every access of the strided operands inside the slices;
    // `dst` is exclusively borrowed and does not alias the shared operands.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// `y (n×dout) = x (n×din) Wᵀ + 1 bᵀ` with `W` row-major `dout × din`.
#[allow(clippy::too_many_arguments)]
fn linear_fwd(
    par: Par,
    n: usize,
    din: usize,
    dout: usize,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    y: &mut [f32],
) {
    for row in y[..n * dout].chunks_exact_mut(dout) {
        row.copy_from_slice(b);
    }
    mm(par, n, dout, din, y, true, x, din, 1, w, 1, din);
}

/// `dW = dYᵀ X` (`dout × din`) and `db = 1ᵀ dY`.
#[allow(clippy::too_many_arguments)]
fn linear_grad_params(
    par: Par,
    n: usize,
    din: usize,
    dout: usize,
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    db: &mut [f32],
) {
    mm(par, dout, din, n, dw, false, dy, 1, dout, x, din, 1);
    db.fill(0.0);
    for row in dy[..n * dout].chunks_exact(dout) {
        for (s, &g) in db.iter_mut().zip(row) {
            *s += g;
        }
    }
}

/// `dX (n×din) = dY (n×dout) W`.
fn linear_grad_input(
    par: Par,
    n: usize,
    din: usize,
    dout: usize,
    dy: &[f32],
    w: &[f32],
    dx: &mut [f32],
) {
    mm(par, n, din, dout, dx, false, dy, dout, 1, w, din, 1);
}

/// Training-mode BatchNorm → ReLU → dropout over `n` rows of `c` features, in place:
/// `xh` holds the pre-activations on entry and `x̂` on exit; `y` gets the BatchNorm output, `h`
/// the layer output. Updates the running statistics like candle's `BatchNorm::forward_train`.
#[allow(clippy::too_many_arguments)]
fn bn_relu_dropout_fwd(
    n: usize,
    c: usize,
    xh: &mut [f32],
    y: &mut [f32],
    h: &mut [f32],
    gamma: &[f32],
    beta: &[f32],
    mask: Option<&[f32]>,
    mean: &mut [f32],
    inv: &mut [f32],
    running_mean: &mut [f32],
    running_var: &mut [f32],
) {
    let xh = &mut xh[..n * c];
    mean.fill(0.0);
    for row in xh.chunks_exact(c) {
        for (s, &v) in mean.iter_mut().zip(row) {
            *s += v;
        }
    }
    let nf = n as f32;
    for s in mean.iter_mut() {
        *s /= nf;
    }
    // `inv` first accumulates the biased variance.
    inv.fill(0.0);
    for row in xh.chunks_exact(c) {
        for ((s, &v), &mu) in inv.iter_mut().zip(row).zip(mean.iter()) {
            let d = v - mu;
            *s += d * d;
        }
    }
    let mom = BN_MOMENTUM;
    let (keep, mom_f) = ((1.0 - mom) as f32, mom as f32);
    let var_w = (mom * n as f64 / (n as f64 - 1.0)) as f32;
    let eps = BN_EPS as f32;
    for j in 0..c {
        let var = inv[j] / nf;
        running_mean[j] = running_mean[j] * keep + mean[j] * mom_f;
        running_var[j] = running_var[j] * keep + var * var_w;
        inv[j] = 1.0 / (var + eps).sqrt();
    }
    let rows = xh
        .chunks_exact_mut(c)
        .zip(y[..n * c].chunks_exact_mut(c))
        .zip(h[..n * c].chunks_exact_mut(c));
    for (r, ((xr, yr), hr)) in rows.enumerate() {
        for j in 0..c {
            let xn = (xr[j] - mean[j]) * inv[j];
            let yv = xn * gamma[j] + beta[j];
            xr[j] = xn;
            yr[j] = yv;
            hr[j] = yv.max(0.0);
        }
        if let Some(mask) = mask {
            for (hv, &mv) in hr.iter_mut().zip(&mask[r * c..(r + 1) * c]) {
                *hv *= mv;
            }
        }
    }
}

/// Backward of [`bn_relu_dropout_fwd`]: `dh` (gradient of the layer output) becomes the gradient
/// of the pre-activations, in place; `dgamma`, `dbeta` are written.
#[allow(clippy::too_many_arguments)]
fn bn_relu_dropout_bwd(
    n: usize,
    c: usize,
    dh: &mut [f32],
    xh: &[f32],
    y: &[f32],
    gamma: &[f32],
    inv: &[f32],
    mask: Option<&[f32]>,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let dh = &mut dh[..n * c];
    dgamma.fill(0.0);
    dbeta.fill(0.0);
    for (r, (dr, (xr, yr))) in dh
        .chunks_exact_mut(c)
        .zip(xh.chunks_exact(c).zip(y.chunks_exact(c)))
        .enumerate()
    {
        // Dropout, then candle's ReLU gradient (`y >= 0`).
        match mask {
            Some(mask) => {
                for ((dv, &yv), &mv) in dr.iter_mut().zip(yr).zip(&mask[r * c..(r + 1) * c]) {
                    *dv = if yv >= 0.0 { *dv * mv } else { 0.0 };
                }
            }
            None => {
                for (dv, &yv) in dr.iter_mut().zip(yr) {
                    *dv = if yv >= 0.0 { *dv } else { 0.0 };
                }
            }
        }
        for (((&dv, &xv), sb), sg) in dr
            .iter()
            .zip(xr)
            .zip(dbeta.iter_mut())
            .zip(dgamma.iter_mut())
        {
            *sb += dv;
            *sg += dv * xv;
        }
    }
    let nf = n as f32;
    for (dr, xr) in dh.chunks_exact_mut(c).zip(xh.chunks_exact(c)) {
        let it = dr.iter_mut().zip(xr).zip(gamma.iter().zip(inv));
        for (((dv, &xv), (&gm, &iv)), (&sb, &sg)) in it.zip(dbeta.iter().zip(dgamma.iter())) {
            *dv = gm * iv / nf * (nf * *dv - sb - xv * sg);
        }
    }
}

impl FastTrainer {
    /// A fast trainer of `weights`, zero AdamW moments. `threads`: 1 runs everything on the
    /// calling thread, more uses gemm's and rayon's parallelism (on rayon's global pool).
    pub fn new(
        weights: Weights,
        skip: bool,
        dropout: f32,
        temperature: f32,
        adam: AdamWParams,
        threads: usize,
    ) -> Self {
        let n = weights.num_trainable();
        Self {
            dim: weights.dim(),
            hidden: weights.hidden(),
            weights,
            skip,
            dropout,
            inv_tau: 1.0 / temperature,
            adam,
            step_t: 0,
            threads: threads.max(1),
            grads: vec![0.0; n],
            m: vec![0.0; n],
            v: vec![0.0; n],
            ws: Workspace::default(),
            proximal: None,
        }
    }

    /// Adds (or with `None` removes) FedProx's proximal term to the objective of every later
    /// step: its value is part of the returned loss and its gradient `mu (w - w_anchor)` part of
    /// [`Self::grads`]. An anchor of the wrong length is refused.
    pub fn set_proximal(&mut self, proximal: Option<Proximal>) -> Result<()> {
        if let Some(p) = &proximal {
            if p.anchor.len() != self.weights.num_trainable() {
                return Err(RefineError::Config(format!(
                    "proximal anchor of {} values for {} trained parameters",
                    p.anchor.len(),
                    self.weights.num_trainable()
                )));
            }
            if !(p.mu >= 0.0 && p.mu.is_finite()) {
                return Err(RefineError::Config(format!(
                    "proximal mu must be finite and >= 0, got {}",
                    p.mu
                )));
            }
        }
        self.proximal = proximal;
        Ok(())
    }

    pub fn proximal(&self) -> Option<&Proximal> {
        self.proximal.as_ref()
    }

    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// The weights, to change in place (finite-difference checks perturb single values).
    pub fn weights_mut(&mut self) -> &mut Weights {
        &mut self.weights
    }

    /// Replace the weights (of the same dimension); the AdamW moments are kept.
    pub fn set_weights(&mut self, weights: Weights) -> Result<()> {
        if weights.dim() != self.dim {
            return Err(RefineError::DimMismatch {
                expected: self.dim,
                found: weights.dim(),
            });
        }
        self.weights = weights;
        Ok(())
    }

    /// AdamW steps taken.
    pub fn steps(&self) -> usize {
        self.step_t
    }

    fn par(&self) -> Par {
        Par {
            threads: self.threads,
            split_rows: true,
        }
    }

    /// Draw the dropout masks for `n` rows from `rng`, in the candle path's order (layer 1, then
    /// layer 2; nothing when dropout is 0).
    pub fn draw_masks(&mut self, n: usize, rng: &mut StdRng) {
        let (d, h) = (self.dim, self.hidden);
        self.ws.ensure(n, d, h);
        if self.dropout > 0.0 {
            let keep = 1.0 / (1.0 - self.dropout);
            for (buf, len) in [(&mut self.ws.mask1, n * h), (&mut self.ws.mask2, n * d)] {
                let buf = &mut buf[..len];
                buf.fill(keep);
                mask_in_place(buf, self.dropout, rng);
            }
        }
    }

    /// Set the dropout masks for `n` rows explicitly (`n·hidden` and `n·dim` values).
    pub fn set_masks(&mut self, n: usize, mask1: &[f32], mask2: &[f32]) {
        let (d, h) = (self.dim, self.hidden);
        self.ws.ensure(n, d, h);
        self.ws.mask1[..n * h].copy_from_slice(&mask1[..n * h]);
        self.ws.mask2[..n * d].copy_from_slice(&mask2[..n * d]);
    }

    /// One full step on the `2N × dim` views: draw the masks, forward, backward, AdamW. Returns
    /// the loss.
    pub fn step(&mut self, views: &[f32], rng: &mut StdRng) -> f32 {
        let n = views.len() / self.dim;
        self.draw_masks(n, rng);
        let loss = self.forward_backward(views);
        self.adam_step();
        loss
    }

    /// Training-mode forward pass and gradient on the `2N × dim` views with the current masks.
    /// Updates the BatchNorm running statistics; leaves the gradients in [`Self::grads`].
    pub fn forward_backward(&mut self, x: &[f32]) -> f32 {
        let (d, h) = (self.dim, self.hidden);
        let n = x.len() / d;
        assert!(
            n >= 2 && n.is_multiple_of(2) && x.len() == n * d,
            "bad views shape"
        );
        self.ws.ensure(n, d, h);
        let par = self.par();
        let threads = self.threads;
        let layout = *self.weights.layout();
        let (params, stats) = self.weights.buffers_mut();
        let params: &[f32] = params;
        let p = move |k: Param| &params[layout.range(k)];
        let g = &mut self.grads;
        let ws = &mut self.ws;
        let (mask1, mask2) = if self.dropout > 0.0 {
            (Some(&ws.mask1[..n * h]), Some(&ws.mask2[..n * d]))
        } else {
            (None, None)
        };

        // ---- forward ----
        linear_fwd(
            par,
            n,
            d,
            h,
            x,
            p(Param::Linear1Weight),
            p(Param::Linear1Bias),
            &mut ws.xh1,
        );
        let (rm1, rv1) = layout.two_mut(stats, Param::Bn1RunningMean, Param::Bn1RunningVar);
        bn_relu_dropout_fwd(
            n,
            h,
            &mut ws.xh1,
            &mut ws.y1,
            &mut ws.h1,
            p(Param::Bn1Weight),
            p(Param::Bn1Bias),
            mask1,
            &mut ws.mean1,
            &mut ws.inv1,
            rm1,
            rv1,
        );
        linear_fwd(
            par,
            n,
            h,
            d,
            &ws.h1,
            p(Param::Linear2Weight),
            p(Param::Linear2Bias),
            &mut ws.xh2,
        );
        let (rm2, rv2) = layout.two_mut(stats, Param::Bn2RunningMean, Param::Bn2RunningVar);
        bn_relu_dropout_fwd(
            n,
            d,
            &mut ws.xh2,
            &mut ws.y2,
            &mut ws.h2,
            p(Param::Bn2Weight),
            p(Param::Bn2Bias),
            mask2,
            &mut ws.mean2,
            &mut ws.inv2,
            rm2,
            rv2,
        );
        linear_fwd(
            par,
            n,
            d,
            d,
            &ws.h2,
            p(Param::OutWeight),
            p(Param::OutBias),
            &mut ws.f,
        );
        if self.skip {
            for (fv, &xv) in ws.f[..n * d].iter_mut().zip(x) {
                *fv += xv;
            }
        }
        linear_fwd(
            par,
            n,
            d,
            d,
            &ws.f,
            p(Param::Projector0Weight),
            p(Param::Projector0Bias),
            &mut ws.q,
        );
        for (uv, &qv) in ws.u[..n * d].iter_mut().zip(&ws.q[..n * d]) {
            *uv = qv.max(0.0);
        }
        linear_fwd(
            par,
            n,
            d,
            d,
            &ws.u,
            p(Param::Projector2Weight),
            p(Param::Projector2Bias),
            &mut ws.z,
        );

        // ---- NT-Xent ----
        for ((zr, znr), nv) in ws.z[..n * d]
            .chunks_exact(d)
            .zip(ws.zn[..n * d].chunks_exact_mut(d))
            .zip(ws.norm[..n].iter_mut())
        {
            let ss: f32 = zr.iter().map(|v| v * v).sum();
            let norm = (ss + 1e-12).sqrt();
            *nv = norm;
            for (a, &b) in znr.iter_mut().zip(zr) {
                *a = b / norm;
            }
        }
        let zn = &ws.zn[..n * d];
        let s = &mut ws.s[..n * n];
        mm(par, n, n, d, s, false, zn, d, 1, zn, 1, d);
        let inv_tau = self.inv_tau;
        let scale = inv_tau / n as f32;
        if threads > 1 {
            s.par_chunks_mut(n)
                .zip(ws.row_loss[..n].par_iter_mut())
                .enumerate()
                .with_min_len(16)
                .for_each(|(i, (row, l))| *l = nt_xent_row(row, i, inv_tau, scale));
        } else {
            for (i, (row, l)) in s
                .chunks_exact_mut(n)
                .zip(ws.row_loss[..n].iter_mut())
                .enumerate()
            {
                *l = nt_xent_row(row, i, inv_tau, scale);
            }
        }
        let total: f64 = ws.row_loss[..n].iter().map(|&l| l as f64).sum();
        let loss = (total / n as f64) as f32;
        symmetrise(s, n);
        // ∂L/∂ẑ = (G + Gᵀ) ẑ, then through the normalisation: (∂ẑ − ẑ (ẑ·∂ẑ)) / ‖z‖.
        mm(par, n, d, n, &mut ws.dz, false, s, n, 1, zn, d, 1);
        for ((dr, znr), &nv) in ws.dz[..n * d]
            .chunks_exact_mut(d)
            .zip(zn.chunks_exact(d))
            .zip(&ws.norm[..n])
        {
            let dot: f32 = dr.iter().zip(znr).map(|(a, b)| a * b).sum();
            for (a, &b) in dr.iter_mut().zip(znr) {
                *a = (*a - b * dot) / nv;
            }
        }

        // ---- backward ----
        let (gw, gb) = layout.two_mut(g, Param::Projector2Weight, Param::Projector2Bias);
        linear_grad_params(par, n, d, d, &ws.u, &ws.dz, gw, gb);
        linear_grad_input(par, n, d, d, &ws.dz, p(Param::Projector2Weight), &mut ws.dq);
        for (dv, &qv) in ws.dq[..n * d].iter_mut().zip(&ws.q[..n * d]) {
            if qv < 0.0 {
                *dv = 0.0;
            }
        }
        let (gw, gb) = layout.two_mut(g, Param::Projector0Weight, Param::Projector0Bias);
        linear_grad_params(par, n, d, d, &ws.f, &ws.dq, gw, gb);
        linear_grad_input(par, n, d, d, &ws.dq, p(Param::Projector0Weight), &mut ws.df);
        // ∂L/∂g = ∂L/∂f (with or without the skip).
        let (gw, gb) = layout.two_mut(g, Param::OutWeight, Param::OutBias);
        linear_grad_params(par, n, d, d, &ws.h2, &ws.df, gw, gb);
        linear_grad_input(par, n, d, d, &ws.df, p(Param::OutWeight), &mut ws.dh2);
        let (gg, gbe) = layout.two_mut(g, Param::Bn2Weight, Param::Bn2Bias);
        bn_relu_dropout_bwd(
            n,
            d,
            &mut ws.dh2,
            &ws.xh2,
            &ws.y2,
            p(Param::Bn2Weight),
            &ws.inv2,
            mask2,
            gg,
            gbe,
        );
        let (gw, gb) = layout.two_mut(g, Param::Linear2Weight, Param::Linear2Bias);
        linear_grad_params(par, n, h, d, &ws.h1, &ws.dh2, gw, gb);
        linear_grad_input(par, n, h, d, &ws.dh2, p(Param::Linear2Weight), &mut ws.dh1);
        let (gg, gbe) = layout.two_mut(g, Param::Bn1Weight, Param::Bn1Bias);
        bn_relu_dropout_bwd(
            n,
            h,
            &mut ws.dh1,
            &ws.xh1,
            &ws.y1,
            p(Param::Bn1Weight),
            &ws.inv1,
            mask1,
            gg,
            gbe,
        );
        let (gw, gb) = layout.two_mut(g, Param::Linear1Weight, Param::Linear1Bias);
        linear_grad_params(par, n, d, h, x, &ws.dh1, gw, gb);
        match &self.proximal {
            None => loss,
            Some(prox) => {
                let mut sq = 0f64;
                for ((gv, &w), &a) in g.iter_mut().zip(params).zip(&prox.anchor) {
                    let diff = w - a;
                    *gv += prox.mu * diff;
                    sq += (diff as f64) * (diff as f64);
                }
                loss + (0.5 * prox.mu as f64 * sq) as f32
            }
        }
    }

    /// One AdamW update from the gradients of the last [`Self::forward_backward`], with the
    /// arithmetic of candle's `AdamW::step` (in `f32`).
    pub fn adam_step(&mut self) {
        self.step_t += 1;
        let a = self.adam;
        let t = self.step_t as i32;
        let b1 = a.beta1 as f32;
        let b2 = a.beta2 as f32;
        let c1 = (1.0 - a.beta1) as f32;
        let c2 = (1.0 - a.beta2) as f32;
        let scale_m = (1.0 / (1.0 - a.beta1.powi(t))) as f32;
        let scale_v = (1.0 / (1.0 - a.beta2.powi(t))) as f32;
        let decay = (1.0 - a.lr * a.weight_decay) as f32;
        let lr = a.lr as f32;
        let eps = a.eps as f32;
        let it = self
            .weights
            .buffers_mut()
            .0
            .iter_mut()
            .zip(&self.grads)
            .zip(self.m.iter_mut().zip(self.v.iter_mut()));
        for ((th, &gv), (mv, vv)) in it {
            let nm = *mv * b1 + gv * c1;
            let nv = *vv * b2 + (gv * gv) * c2;
            let mh = nm * scale_m;
            let vh = nv * scale_v;
            *th = *th * decay - (mh / (vh.sqrt() + eps)) * lr;
            *mv = nm;
            *vv = nv;
        }
    }

    /// Gradients of the last [`Self::forward_backward`], for each trained array in table order.
    pub fn grads(&self) -> impl Iterator<Item = (Param, &[f32])> {
        let layout = self.weights.layout();
        PARAMS
            .iter()
            .filter(|s| s.kind.is_trainable())
            .map(move |s| (s.param, &self.grads[layout.range(s.param)]))
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::SimSkipConfig;
    use rand::{Rng, SeedableRng};

    /// A fast trainer of freshly initialised weights (no zero init, so every layer gets a
    /// gradient), one thread.
    fn trainer(dim: usize, skip: bool, dropout: f32, rng: &mut StdRng) -> FastTrainer {
        let cfg = SimSkipConfig {
            zero_init_residual: false,
            ..SimSkipConfig::default()
        };
        let w = Weights::init(dim, &cfg, rng).unwrap();
        FastTrainer::new(w, skip, dropout, 0.5, adam(), 1)
    }

    fn adam() -> AdamWParams {
        AdamWParams {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }

    /// Central finite differences of the loss against the analytic gradient, on a tiny model
    /// (d = 8, batch 4 → 8 views), with fixed dropout masks, skip and no skip.
    #[test]
    fn gradient_matches_finite_differences() {
        for skip in [true, false] {
            let mut rng = StdRng::seed_from_u64(11);
            let mut t = trainer(8, skip, 0.25, &mut rng);
            let n = 8;
            let x: Vec<f32> = (0..n * 8).map(|_| rng.random_range(-1.0..1.0)).collect();
            t.draw_masks(n, &mut rng);
            let _ = t.forward_backward(&x);
            let analytic: Vec<(Param, Vec<f32>)> =
                t.grads().map(|(p, g)| (p, g.to_vec())).collect();
            let mut checked = 0;
            let mut max_err = 0f32;
            let mut retried = 0;
            for &(param, ref grad) in &analytic {
                let name = param.name();
                for (k, &ga) in grad.iter().enumerate() {
                    // A step may cross a ReLU kink (common in this tiny model, especially
                    // without the skip); then a smaller step must agree. A wrong gradient does
                    // not converge as the step shrinks.
                    let mut errs = Vec::new();
                    for eps in [1e-3f32, 5e-4, 2.5e-4, 1.25e-4] {
                        let orig = t.weights().get(param)[k];
                        t.weights_mut().get_mut(param)[k] = orig + eps;
                        let lp = t.forward_backward(&x);
                        t.weights_mut().get_mut(param)[k] = orig - eps;
                        let lm = t.forward_backward(&x);
                        t.weights_mut().get_mut(param)[k] = orig;
                        let fd = (lp - lm) / (2.0 * eps);
                        errs.push((fd, (fd - ga).abs()));
                        if (fd - ga).abs() < 2e-3 + 2e-2 * ga.abs() {
                            break;
                        }
                    }
                    let (_, err) = *errs.last().unwrap();
                    if errs.len() > 1 {
                        if std::env::var("FD_DEBUG").is_ok() {
                            eprintln!("{skip} {name}[{k}] {ga} {errs:?}");
                        }
                        retried += 1;
                    }
                    max_err = max_err.max(err);
                    assert!(
                        err < 2e-3 + 2e-2 * ga.abs(),
                        "skip {skip} {name}[{k}]: finite differences {errs:?} vs analytic {ga}"
                    );
                    checked += 1;
                }
            }
            assert_eq!(checked, 316);
            assert!(
                retried * 4 < checked,
                "{retried} of {checked} needed smaller steps"
            );
            // The gradient is not trivially zero.
            let big = analytic
                .iter()
                .flat_map(|(_, g)| g.iter())
                .filter(|g| g.abs() > 1e-2)
                .count();
            assert!(big > 50, "only {big} sizeable gradient entries");
            eprintln!("skip {skip}: max |fd - analytic| = {max_err:e}, {retried} retried");
        }
    }

    /// With FedProx's proximal term the gradient still matches finite differences of the loss
    /// (which now includes the term), and it is exactly the contrastive gradient plus
    /// `mu (w - w_anchor)`.
    #[test]
    fn proximal_term_adds_its_gradient_and_value() {
        let mut rng = StdRng::seed_from_u64(13);
        let mut t = trainer(8, true, 0.0, &mut rng);
        let x: Vec<f32> = (0..64).map(|_| rng.random_range(-1.0..1.0)).collect();
        // An anchor away from the weights, so the term is not zero.
        let anchor: Vec<f32> = t
            .weights()
            .trainable()
            .iter()
            .map(|w| w + rng.random_range(-0.5..0.5))
            .collect();
        let plain_loss = t.forward_backward(&x);
        let plain: Vec<f32> = t.grads().flat_map(|(_, g)| g.to_vec()).collect();
        let mu = 0.7;
        t.set_proximal(Some(Proximal {
            mu,
            anchor: anchor.clone(),
        }))
        .unwrap();
        let prox_loss = t.forward_backward(&x);
        let prox: Vec<f32> = t.grads().flat_map(|(_, g)| g.to_vec()).collect();
        let w = t.weights().trainable().to_vec();
        let sq: f32 = w.iter().zip(&anchor).map(|(w, a)| (w - a) * (w - a)).sum();
        assert!((prox_loss - plain_loss - 0.5 * mu * sq).abs() < 1e-3 * sq.max(1.0));
        for k in 0..w.len() {
            let want = plain[k] + mu * (w[k] - anchor[k]);
            assert!((prox[k] - want).abs() < 1e-5, "{k}: {} vs {want}", prox[k]);
        }
        // Finite differences of the whole objective on a few parameters of each layer.
        let layout = *t.weights().layout();
        for param in [Param::Linear1Weight, Param::Bn2Bias, Param::Projector2Bias] {
            let k = layout.range(param).start;
            let ga = prox[k];
            let eps = 1e-3f32;
            let orig = t.weights().get(param)[0];
            t.weights_mut().get_mut(param)[0] = orig + eps;
            let lp = t.forward_backward(&x);
            t.weights_mut().get_mut(param)[0] = orig - eps;
            let lm = t.forward_backward(&x);
            t.weights_mut().get_mut(param)[0] = orig;
            let fd = (lp - lm) / (2.0 * eps);
            assert!(
                (fd - ga).abs() < 2e-3 + 2e-2 * ga.abs(),
                "{param:?}: {fd} vs {ga}"
            );
        }
        // A wrong-sized anchor or a bad mu is refused.
        assert!(t
            .set_proximal(Some(Proximal {
                mu,
                anchor: vec![0.0; 3]
            }))
            .is_err());
        assert!(t
            .set_proximal(Some(Proximal {
                mu: f32::NAN,
                anchor
            }))
            .is_err());
    }

    /// A deliberately wrong gradient is caught by the same check (the test above can fail).
    #[test]
    fn finite_difference_check_detects_a_wrong_gradient() {
        let mut rng = StdRng::seed_from_u64(12);
        let mut t = trainer(8, true, 0.0, &mut rng);
        let x: Vec<f32> = (0..64).map(|_| rng.random_range(-1.0..1.0)).collect();
        let _ = t.forward_backward(&x);
        // A gradient off by a factor of 2 (projector.2.bias, a sizeable entry) fails the check.
        let bias = Param::Projector2Bias;
        let ga = t.grads().find(|(p, _)| *p == bias).unwrap().1[0] * 2.0;
        let eps = 2e-3f32;
        let orig = t.weights().get(bias)[0];
        t.weights_mut().get_mut(bias)[0] = orig + eps;
        let lp = t.forward_backward(&x);
        t.weights_mut().get_mut(bias)[0] = orig - eps;
        let lm = t.forward_backward(&x);
        let fd = (lp - lm) / (2.0 * eps);
        assert!(fd.abs() > 1e-2, "{fd}");
        assert!((fd - ga).abs() >= 2e-3 + 2e-2 * ga.abs());
    }
}
