"""Contrastive and coding-rate losses as pure functions on tensors.

Every function here is a plain, differentiable function of its tensor arguments:

* no module state, no device guessing (masks and targets are built on the input's device),
* no ``torch.distributed`` calls (a caller that wants cross-worker negatives gathers first),
* no hidden hyperparameters (every constant that changes the result is an argument).

Precision: the reductions that are sensitive to rounding (log-sum-exp / cross-entropy over the
similarity logits, Cholesky log-determinants) run in at least float32 even when the inputs are
bfloat16 or the call happens under ``torch.autocast``; the large matrix products of the
contrastive losses stay in the caller's precision. float64 inputs stay float64.

Reference implementations the semantics follow (read, not copied):

* ``supcon_loss`` / ``nt_xent_loss``: HobbitLong/SupContrast ``losses.py`` (``SupConLoss``,
  ``contrast_mode='all'``) and lightly ``lightly/loss/ntx_ent_loss.py``.
* ``info_nce_loss``: facebookresearch/moco ``moco/builder.py`` (``MoCo.forward``).
* ``total_coding_rate`` / ``emp_ssl_loss``: tsb0601/EMP-SSL ``loss.py`` (``TotalCodingRate``)
  and ``main.py`` (``Similarity_Loss``, ``cal_TCR``, ``chunk_avg``), cross-checked against
  lightly ``lightly/loss/emp_ssl_loss.py``.
* ``nce_logits`` / ``nce_loss`` / ``nce_log_partition`` / ``instance_softmax_loss`` /
  ``proximal_loss``: zhirongw/lemniscate.pytorch ``lib/NCEAverage.py``, ``lib/NCECriterion.py``,
  ``lib/LinearAverage.py`` and the InstDisc paper (arXiv:1805.01978, Sec. 3.2-3.3).
* ``invaspread_loss``: mangye16/Unsupervised_Embedding_Learning ``BatchAverage.py``
  (``BatchAverage`` + ``BatchCriterion`` with ``negM = 1``) and arXiv:1904.03436.
* ``cmc_loss``: the two-view objective of Tian et al. 2019 (``L(V1, V2) = L_{V1}^{V2} +
  L_{V2}^{V1}``, "core" and "full" graphs for more views), HobbitLong/CMC ``train_CMC.py``
  (``l_loss + ab_loss``), with in-batch negatives instead of its NCE memory bank.
* ``cpc_loss``: the InfoNCE of CPC v2 (Henaff et al. 2019, appendix pseudo-code ``CPC``) and
  Lightning-Universe/lightning-bolts ``CPCTask.compute_loss_h``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "cmc_loss",
    "cmc_view_pairs",
    "cpc_loss",
    "emp_ssl_loss",
    "info_nce_loss",
    "instance_softmax_loss",
    "invaspread_loss",
    "nce_log_partition",
    "nce_logits",
    "nce_loss",
    "nt_xent_loss",
    "proximal_loss",
    "supcon_loss",
    "total_coding_rate",
]


def _at_least_fp32(x: Tensor) -> Tensor:
    """Casts half/bfloat16 tensors up to float32; float32 and float64 are left untouched."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def supcon_loss(
    z: Tensor,
    labels: Tensor | None,
    temperature: float,
    base_temperature: float | None = None,
) -> Tensor:
    """Supervised contrastive loss (SupCon, ``L_out`` form); SimCLR's NT-Xent when unlabelled.

    The ``V * B`` embeddings are flattened view-major (row ``v * B + b`` is view ``v`` of sample
    ``b``) and L2-normalised. Every row ``i`` is an anchor. With ``s_ij = z_i . z_j / T``, the set
    ``A(i)`` of all rows except ``i`` and the positives ``P(i) = {p in A(i): y_p == y_i}``::

        l_i = -1/|P(i)| * sum_{p in P(i)} [ s_ip - log sum_{a in A(i)} exp(s_ia) ]

    When ``labels`` is None, ``y`` is the sample index, so the positives of an anchor are exactly
    the other views of the same sample (SimCLR / NT-Xent; with ``V > 2`` that is the multi-view
    generalisation used by SupContrast).

    Differences from SupContrast's ``SupConLoss`` (``contrast_mode='all'``):

    * the input is view-major ``[V, B, D]`` rather than ``[B, V, D]``;
    * the embeddings are L2-normalised here, not by the caller;
    * the mean runs over anchors that have at least one positive only. SupContrast averages over
      all anchors and produces NaN (0/0) for an anchor without a positive; here such anchors
      contribute nothing, and if no anchor has a positive the loss is exactly 0 (still attached
      to the graph, so ``backward()`` works and yields zero gradients);
    * the ``temperature / base_temperature`` rescaling is off unless ``base_temperature`` is
      given (SupContrast always applies it, with ``base_temperature=0.07``);
    * SupContrast's ``1e-9`` inside the log is not needed: the denominator is a log-sum-exp.

    Args:
        z: ``[V, B, D]`` embeddings, ``V`` views of ``B`` samples, view-major. Any float dtype;
            the logits are promoted to at least float32 before the log-softmax.
        labels: ``[B]`` integer class labels, on ``z``'s device, or None for the unsupervised
            (SimCLR) positives. Labels are compared for equality only.
        temperature: softmax temperature ``T`` (> 0).
        base_temperature: if given, the loss is multiplied by ``temperature / base_temperature``
            (SupContrast's rescaling made explicit). None means no rescaling.

    Returns:
        Scalar loss (dtype at least float32): mean of ``l_i`` over anchors with ``|P(i)| > 0``.

    Raises:
        ValueError: on malformed shapes or a non-positive temperature.
    """
    if z.ndim != 3:
        raise ValueError(f"z must be [V, B, D], got shape {tuple(z.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if base_temperature is not None and base_temperature <= 0:
        raise ValueError(f"base_temperature must be > 0, got {base_temperature}")
    n_views, batch, dim = z.shape
    n = n_views * batch

    feats = F.normalize(z.reshape(n, dim), dim=-1)
    # The N x N product is the expensive part and stays in the caller's precision (or autocast's);
    # the log-softmax below is done in >= float32 because bf16 log-sum-exp is visibly lossy.
    logits = _at_least_fp32(feats @ feats.T) / temperature

    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    if labels is None:
        # Positives are the other views of the same sample.
        same = torch.eye(batch, dtype=torch.bool, device=z.device)
    else:
        if labels.shape != (batch,):
            raise ValueError(f"labels must have shape [{batch}], got {tuple(labels.shape)}")
        same = labels[:, None] == labels[None, :]
    # Tile the [B, B] relation to all view pairs, then drop the anchor itself.
    pos_mask = same.repeat(n_views, n_views) & ~self_mask

    # The anchor is excluded from its own denominator by sending its logit to -inf; logsumexp
    # subtracts the row max internally, so this is stable for small temperatures.
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)

    # torch.where (not mask * log_prob) so the -inf on the diagonal never meets a 0 (NaN in the
    # value and in the gradient).
    pos_count = pos_mask.sum(dim=1)
    pos_log_prob = torch.where(pos_mask, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    # clamp_min(1): anchors without positives have a 0 numerator and must not divide by 0.
    per_anchor = -pos_log_prob / pos_count.clamp_min(1)
    # Mean over anchors that have positives, computed without a host sync; 0 if there are none.
    n_valid = (pos_count > 0).sum().clamp_min(1)
    loss = per_anchor.sum() / n_valid

    if base_temperature is not None:
        loss = loss * (temperature / base_temperature)
    return loss


def nt_xent_loss(z: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent (normalised temperature-scaled cross-entropy) for ``V >= 2`` views.

    Exactly ``supcon_loss(z, None, temperature)``: each of the ``V * B`` embeddings is an anchor,
    its positives are the ``V - 1`` other views of the same sample, and its denominator runs over
    all ``V * B - 1`` other embeddings. For ``V == 2`` this is the loss of SimCLR / lightly's
    ``NTXentLoss`` without a memory bank (mean over the ``2B`` anchors).

    Args:
        z: ``[V, B, D]`` embeddings, view-major, ``V >= 2``. L2-normalised inside.
        temperature: softmax temperature (> 0).

    Returns:
        Scalar loss (dtype at least float32).

    Raises:
        ValueError: if ``z`` is not ``[V, B, D]`` with ``V >= 2``.
    """
    if z.ndim != 3 or z.shape[0] < 2:
        raise ValueError(f"z must be [V, B, D] with V >= 2, got shape {tuple(z.shape)}")
    return supcon_loss(z, None, temperature)


def info_nce_loss(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """MoCo's InfoNCE loss with a queue of negative keys.

    For query ``q_n`` (normalised), its key ``k_n`` (normalised, detached) and the queued keys
    ``u_1..u_K``::

        logits_n = [q_n . k_n, q_n . u_1, ..., q_n . u_K] / T
        loss     = mean_n  cross_entropy(logits_n, target=0)

    As in ``moco/builder.py``, neither the keys nor the queue receive gradients: ``k`` and
    ``queue`` are detached here (upstream computes ``k`` under ``no_grad`` and detaches the queue).
    Updating the queue (enqueue / dequeue) is the caller's job.

    Args:
        q: ``[N, D]`` queries. L2-normalised inside.
        k: ``[N, D]`` positive keys for the queries. L2-normalised and detached inside.
        queue: ``[K, D]`` negative keys, assumed already L2-normalised (the queue stores
            normalised keys), so it is not renormalised. ``K == 0`` is allowed.
        temperature: softmax temperature ``T`` (> 0).

    Returns:
        ``(loss, logits)``: scalar loss and ``[N, 1 + K]`` logits with the positive at index 0,
        both with dtype at least float32.

    Raises:
        ValueError: on mismatched shapes or a non-positive temperature.
    """
    if q.ndim != 2 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [N, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    if queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"queue must be [K, {q.shape[1]}], got {tuple(queue.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    l_pos = (q * k).sum(dim=1, keepdim=True)  # [N, 1]
    l_neg = q @ queue.detach().T  # [N, K]
    # Cross-entropy in >= float32: under CPU autocast the matmul above comes back in bf16.
    logits = torch.cat([_at_least_fp32(l_pos), _at_least_fp32(l_neg)], dim=1) / temperature
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    loss = F.cross_entropy(logits, target)
    return loss, logits


def total_coding_rate(z: Tensor, eps: float) -> Tensor:
    """Total coding rate ``R(Z) = 1/2 logdet(I_D + D / (B * eps) * Z^T Z)`` (EMP-SSL / MCR^2).

    Matches ``TotalCodingRate.compute_discrimn_loss`` in tsb0601/EMP-SSL ``loss.py`` (which works
    on ``W = Z^T``): ``eps`` enters linearly. The papers write ``eps^2``; the official code, and
    this function, do not square it, so ``eps`` values from EMP-SSL configs carry over unchanged.
    This is the coding rate itself (to be maximised); EMP-SSL's criterion returns its negative.

    Implementation:

    * computed in float32 (float64 stays float64) even for bf16 / fp16 input or under autocast:
      a log-determinant via a bf16 Gram matrix / Cholesky is not reliable. The result therefore
      has dtype at least float32.
    * Sylvester's identity ``logdet(I_D + c Z^T Z) = logdet(I_B + c Z Z^T)`` lets us factor
      whichever Gram matrix is smaller (``D x D`` if ``D <= B``, else ``B x B``).
    * the matrix is ``I + PSD``, hence symmetric positive definite with eigenvalues >= 1, so its
      log-determinant is ``2 * sum(log(diag(cholesky(M))))``: cheaper and more stable than LU.
      ``cholesky_ex`` is used without error checking to avoid a device sync; non-finite inputs
      propagate to a non-finite result rather than raising.

    Args:
        z: ``[B, D]`` embeddings (rows are samples), or ``[..., B, D]`` for a batch of
            independent coding rates (used by ``emp_ssl_loss``). Not normalised here.
        eps: distortion ``eps`` (> 0) as in the EMP-SSL code (not squared).

    Returns:
        ``R(Z)``: a scalar for ``[B, D]`` input, ``[...]`` for batched input.

    Raises:
        ValueError: if ``z`` has fewer than 2 dims or ``eps <= 0``.
    """
    if z.ndim < 2:
        raise ValueError(f"z must be [B, D] or [..., B, D], got shape {tuple(z.shape)}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    batch, dim = z.shape[-2], z.shape[-1]
    scale = dim / (batch * eps)

    # Autocast would silently cast the Gram product back to bf16: switch it off for this block.
    with torch.autocast(device_type=z.device.type, enabled=False):
        zf = _at_least_fp32(z)
        # [..., D, D] Gram matrix if D <= B, else the [..., B, B] one (same logdet).
        gram = zf.mT @ zf if dim <= batch else zf @ zf.mT
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        chol, _ = torch.linalg.cholesky_ex(eye + scale * gram)
        # 1/2 logdet(M) = 1/2 * 2 * sum(log diag(L)).
        return torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(dim=-1)


def emp_ssl_loss(
    z: Tensor, eps: float, invariance_weight: float, tcr_weight: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """EMP-SSL loss: total coding rate per patch group plus patch-to-mean invariance.

    With ``z`` L2-normalised along ``D`` and ``zbar_b = mean_p z[p, b]``::

        tcr        = mean_p total_coding_rate(z[p], eps)          # z[p] is [B, D]
        invariance = mean_{p, b} cos(z[p, b], zbar_b)
        loss       = -tcr_weight * tcr - invariance_weight * invariance

    Choices, following the official code (tsb0601/EMP-SSL ``main.py``: ``chunk_avg`` with
    ``normalize=False``, ``Similarity_Loss``, ``cal_TCR``; the encoder L2-normalises its output):

    * the patch mean ``zbar_b`` is *not* detached, as upstream (which recomputes the mean from
      the live patch embeddings). This is immaterial for value and gradient: for unit-norm
      patches, ``sum_p cos(z[p, b], u) = P * zbar_b . u / |u|`` is maximised over directions
      ``u`` at ``u = zbar_b``, so the gradient through the mean is exactly zero (up to rounding);
      detaching would only save a little backward work.
    * ``zbar_b`` is not renormalised; it only enters through a cosine similarity, which is scale
      invariant, so renormalising would change neither the value nor the gradient.
    * in upstream, the weights are ``--tcr`` (default 1) and ``--patch_sim`` (default 200), and
      ``eps`` is ``--eps`` (default 0.2), not squared (see :func:`total_coding_rate`).

    The invariance term is computed in at least float32 like the coding rate, so bf16 inputs
    give the same loss up to the rounding of the inputs themselves.

    Args:
        z: ``[P, B, D]`` projections of ``P`` patches of ``B`` images (patch-major).
            L2-normalised inside.
        eps: coding-rate distortion (> 0), not squared.
        invariance_weight: weight of the invariance term (EMP-SSL's ``patch_sim``).
        tcr_weight: weight of the coding-rate term (EMP-SSL's ``tcr``).

    Returns:
        ``(loss, metrics)``: scalar loss (dtype at least float32) and detached scalars
        ``{"tcr": tcr, "invariance": invariance}``.

    Raises:
        ValueError: if ``z`` is not ``[P, B, D]`` or ``eps <= 0``.
    """
    if z.ndim != 3:
        raise ValueError(f"z must be [P, B, D], got shape {tuple(z.shape)}")
    z = F.normalize(_at_least_fp32(z), dim=-1)

    # Batched over the P patch groups: P independent [B, D] coding rates, then their mean.
    tcr = total_coding_rate(z, eps).mean()

    # [1, B, D]; kept attached like upstream (its gradient contribution is zero, see above).
    z_mean = z.mean(dim=0, keepdim=True)
    invariance = F.cosine_similarity(z, z_mean, dim=-1).mean()

    loss = -tcr_weight * tcr - invariance_weight * invariance
    return loss, {"tcr": tcr.detach(), "invariance": invariance.detach()}


# --------------------------------------------------------------------------- InstDisc


def nce_logits(f: Tensor, positives: Tensor, noise: Tensor, temperature: float) -> Tensor:
    """InstDisc's memory-bank scores ``v . f / T`` for NCE: the own row first, then the noise.

    Args:
        f: ``[B, D]`` features of the current step. L2-normalised inside.
        positives: ``[B, D]`` memory-bank row of each image (``v_i^(t-1)``), assumed
            L2-normalised (the bank stores normalised rows). Detached inside.
        noise: ``[B, K, D]`` noise rows drawn from the bank for each image, assumed normalised.
            Detached inside.
        temperature: ``T`` (> 0).

    Returns:
        ``[B, 1 + K]`` logits (dtype at least float32), the image's own row at index 0.

    Raises:
        ValueError: on mismatched shapes or a non-positive temperature.
    """
    if f.ndim != 2 or positives.shape != f.shape:
        raise ValueError(
            f"f and positives must both be [B, D], got {tuple(f.shape)}, {tuple(positives.shape)}"
        )
    if noise.ndim != 3 or noise.shape[0] != f.shape[0] or noise.shape[2] != f.shape[1]:
        raise ValueError(f"noise must be [{f.shape[0]}, K, {f.shape[1]}], got {tuple(noise.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    f = F.normalize(f, dim=1)
    l_pos = (f * positives.detach()).sum(dim=1, keepdim=True)  # [B, 1]
    l_neg = torch.bmm(noise.detach(), f.unsqueeze(2)).squeeze(2)  # [B, K]
    return torch.cat([_at_least_fp32(l_pos), _at_least_fp32(l_neg)], dim=1) / temperature


def nce_log_partition(noise_logits: Tensor, num_data: int) -> Tensor:
    """Monte Carlo estimate of InstDisc's normaliser, ``log Z``, from uniform noise samples.

    ``Z = sum_j exp(v_j . f / T)`` over all ``n`` bank rows is approximated, as in the paper
    (Sec. 3.2), by ``n`` times the mean of ``exp(v_j . f / T)`` over the sampled noise rows of
    every image of the batch::

        log Z = log n + logsumexp(noise_logits) - log(B * K)

    computed in log space (``exp`` of a logit overflows float32 for small temperatures).
    Upstream (``NCEAverage.py``) averages over the positive column too; the paper's estimator,
    used here, averages over the noise samples only. The result is not detached: callers that
    treat Z as a constant (everyone) detach it.

    Args:
        noise_logits: ``[B, K]`` logits of the noise samples (columns ``1:`` of ``nce_logits``).
        num_data: ``n``, the number of bank rows (training images).

    Returns:
        Scalar ``log Z``.
    """
    if noise_logits.ndim != 2 or noise_logits.numel() == 0:
        raise ValueError(
            f"noise_logits must be a non-empty [B, K], got {tuple(noise_logits.shape)}"
        )
    x = _at_least_fp32(noise_logits)
    return math.log(num_data) + torch.logsumexp(x.flatten(), dim=0) - math.log(x.numel())


def nce_loss(logits: Tensor, log_z: Tensor | float, num_data: int) -> Tensor:
    """InstDisc's NCE loss (paper Sec. 3.2, upstream ``NCECriterion``) with uniform noise.

    With ``P(j | f) = exp(logits_j) / Z``, noise density ``P_n = 1 / n`` and ``K`` noise
    samples, the posterior that a pair came from the data is ``h = P / (P + K * P_n)``::

        loss = -1/B * sum_b [ log h(pos_b) + sum_{k=1..K} log(1 - h(noise_bk)) ]

    Evaluated in log space, ``log h = s - logaddexp(s, log(K / n))`` and
    ``log(1 - h) = log(K / n) - logaddexp(s, log(K / n))`` with ``s = logit - log Z``. That is
    exact and needs no ``eps``; upstream adds ``1e-7`` to each denominator, a change of the
    value by about ``1e-7 * n / K`` relative.

    Args:
        logits: ``[B, 1 + K]`` from :func:`nce_logits` (positive at index 0), ``K >= 1``.
        log_z: ``log Z``, a constant (a float or a scalar tensor, detached inside).
        num_data: ``n``, the number of training images (bank rows).

    Returns:
        Scalar loss (dtype at least float32).

    Raises:
        ValueError: if there is no noise column or ``num_data < 1``.
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be [B, 1 + K] with K >= 1, got {tuple(logits.shape)}")
    if num_data < 1:
        raise ValueError(f"num_data must be >= 1, got {num_data}")
    k = logits.shape[1] - 1
    if isinstance(log_z, Tensor):
        log_z = log_z.detach()
    s = _at_least_fp32(logits) - log_z  # [B, 1 + K] log P(j | f)
    log_kpn = torch.full_like(s, math.log(k / num_data))  # log(K * P_n)
    log_denom = torch.logaddexp(s, log_kpn)  # log(P + K * P_n)
    log_h_pos = s[:, 0] - log_denom[:, 0]  # [B]
    log_1m_h_noise = log_kpn[:, 1:] - log_denom[:, 1:]  # [B, K]
    return -(log_h_pos.sum() + log_1m_h_noise.sum()) / logits.shape[0]


def instance_softmax_loss(
    f: Tensor, bank: Tensor, index: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """InstDisc's exact non-parametric softmax over the whole memory bank (paper Sec. 3.1).

    ``P(i | f) = exp(v_i . f / T) / sum_j exp(v_j . f / T)`` over all ``n`` rows; the loss is
    ``-mean_b log P(index_b | f_b)``. The bank is detached (it is not a parameter: upstream's
    ``LinearAverage`` returns no gradient for it).

    Args:
        f: ``[B, D]`` features. L2-normalised inside.
        bank: ``[n, D]`` memory bank, assumed L2-normalised.
        index: ``[B]`` bank row of each image (the target class).
        temperature: ``T`` (> 0).

    Returns:
        ``(loss, logits)``: scalar loss and ``[B, n]`` logits, dtype at least float32.
    """
    if f.ndim != 2 or bank.ndim != 2 or bank.shape[1] != f.shape[1]:
        raise ValueError(
            f"f must be [B, D] and bank [n, D], got {tuple(f.shape)}, {tuple(bank.shape)}"
        )
    if index.shape != (f.shape[0],):
        raise ValueError(f"index must have shape [{f.shape[0]}], got {tuple(index.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = _at_least_fp32(F.normalize(f, dim=1) @ bank.detach().T) / temperature  # [B, n]
    return F.cross_entropy(logits, index), logits


def proximal_loss(f: Tensor, previous: Tensor) -> Tensor:
    """InstDisc's proximal term ``mean_b ||f_b - v_b||^2`` (paper Sec. 3.3, without lambda).

    ``v_b`` is the image's memory-bank row from before this step (``v_i^(t-1)``), so the term
    pulls the new feature towards it; it is detached. For unit vectors it equals
    ``2 - 2 f_b . v_b``.

    Args:
        f: ``[B, D]`` features. L2-normalised inside.
        previous: ``[B, D]`` bank rows of the same images, assumed L2-normalised.

    Returns:
        Scalar (dtype at least float32).
    """
    if f.ndim != 2 or previous.shape != f.shape:
        raise ValueError(
            f"f and previous must both be [B, D], got {tuple(f.shape)}, {tuple(previous.shape)}"
        )
    diff = _at_least_fp32(F.normalize(f, dim=1)) - _at_least_fp32(previous.detach())
    return diff.pow(2).sum(dim=1).mean()


# --------------------------------------------------------------------------- InvaSpread


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate at both ends (Maechler 2012)."""
    # Each branch only sees inputs from its own side of -log 2, so the branch torch.where
    # discards never produces an inf whose zero gradient would turn into NaN.
    cut = -math.log(2.0)
    near_zero = torch.log(-torch.expm1(x.clamp(min=cut)))
    far = torch.log1p(-torch.exp(x.clamp(max=cut)))
    return torch.where(x > cut, near_zero, far)


def invaspread_loss(z: Tensor, temperature: float, detach_other: bool = True) -> Tensor:
    """Invariant and spreading instance feature loss (Ye et al. 2019), every view an anchor.

    The ``2B`` embeddings are flattened view-major (row ``v * B + b``) and L2-normalised. For
    anchor ``i`` with positive ``p(i)`` (the other view of the same image) and the softmax over
    every other embedding of the batch::

        P_ij = exp(f_i . f_j / T) / sum_{k != i} exp(f_i . f_k / T)
        loss = -1/(2B) * sum_i [ log P_i,p(i) + sum_{j not in {i, p(i)}} log(1 - P_ij) ]

    Following upstream ``BatchAverage`` / ``BatchCriterion`` (``negM = 1``): every one of the
    ``2B`` rows is an anchor, its denominator runs over all ``2B - 1`` others (both views of
    the other images and its positive), and the sum is divided by ``2B``. (The paper writes
    the softmaxes over the ``B`` features of the un-augmented images only, with the augmented
    view as the only anchor of the positive term; upstream, and this function, symmetrise.)
    ``log(1 - P)`` is evaluated as ``log1mexp(log P)``, without upstream's cancellation when
    ``P`` is near 1.

    ``detach_other``: upstream computes every product ``f_i . f_j`` against ``feat.data``, so
    gradient reaches only the anchor side ``f_i`` of each similarity; ``False`` lets it reach
    both sides (the loss value is the same, the gradient is not).

    Args:
        z: ``[2, B, D]`` embeddings of two views of ``B`` images, view-major, ``B >= 2``.
        temperature: softmax temperature ``T`` (> 0).
        detach_other: stop the gradient through the non-anchor side (upstream behaviour).

    Returns:
        Scalar loss (dtype at least float32).

    Raises:
        ValueError: if ``z`` is not ``[2, B, D]`` with ``B >= 2``, or ``temperature <= 0``.
    """
    if z.ndim != 3 or z.shape[0] != 2 or z.shape[1] < 2:
        raise ValueError(f"z must be [2, B, D] with B >= 2, got shape {tuple(z.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch = z.shape[1]
    n = 2 * batch
    feats = F.normalize(z.reshape(n, -1), dim=1)
    other = feats.detach() if detach_other else feats
    logits = _at_least_fp32(feats @ other.T) / temperature  # [2B, 2B], row i = anchor i
    rows = torch.arange(n, device=z.device)
    self_mask = rows[:, None] == rows[None, :]
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # [2B, 2B], -inf on diagonal
    pos = (rows + batch) % n  # the other view of the same image
    log_p_pos = log_p[rows, pos]  # [2B]
    neg_mask = ~self_mask
    neg_mask[rows, pos] = False
    # Diagonal entries are -inf; replace them before log1mexp so no inf meets the gradient.
    safe = torch.where(neg_mask, log_p, torch.full_like(log_p, -1.0))
    log_1m_p = torch.where(neg_mask, _log1mexp(safe), torch.zeros_like(log_p))
    return -(log_p_pos.sum() + log_1m_p.sum()) / n


def cmc_view_pairs(n_views: int, graph: str) -> list[tuple[int, int]]:
    """The view pairs CMC contrasts: ``"full"`` all ``i < j``, ``"core"`` ``(0, j)`` for ``j >= 1``.

    Raises:
        ValueError: on an unknown graph or fewer than 2 views.
    """
    if n_views < 2:
        raise ValueError(f"CMC needs at least 2 views, got {n_views}")
    if graph == "full":
        return [(i, j) for i in range(n_views) for j in range(i + 1, n_views)]
    if graph == "core":
        return [(0, j) for j in range(1, n_views)]
    raise ValueError(f"graph must be 'full' or 'core', got {graph!r}")


def cmc_loss(z: Tensor, temperature: float, graph: str = "full") -> tuple[Tensor, Tensor]:
    """Contrastive Multiview Coding loss with in-batch negatives.

    ``z[v, n]`` is the embedding of view ``v`` of sample ``n`` (L2-normalised here). For a view
    pair ``(i, j)``, sample ``n`` of view ``i`` is an anchor whose candidates are all ``B``
    embeddings of view ``j``, the positive being ``z[j, n]``, and symmetrically::

        s_nm      = z[i, n] . z[j, m] / T
        L_i^j     = mean_n [ -s_nn + log sum_m exp(s_nm) ]         (anchors from view i)
        L(i, j)   = L_i^j + L_j^i
        loss      = sum_{(i, j) in pairs} L(i, j)

    with pairs from :func:`cmc_view_pairs` (``"full"``: all pairs, ``"core"``: view 0 against
    each other view). As in the paper (and upstream's ``l_loss + ab_loss``) the two directions
    and the pairs are summed, not averaged: with 2 views both graphs give ``L_0^1 + L_1^0``.
    Negatives come from the other view only (as with CMC's per-view memory banks), never from
    the anchor's own view.

    Args:
        z: ``[V, B, D]`` embeddings, ``V >= 2`` views of ``B`` samples, view-major.
        temperature: softmax temperature ``T`` (> 0).
        graph: ``"full"`` or ``"core"``.

    Returns:
        ``(loss, accuracy)``: scalar loss (dtype at least float32) and the detached fraction of
        (anchor, direction, pair) triples whose most similar candidate is the positive.

    Raises:
        ValueError: on malformed shapes, a non-positive temperature or an unknown graph.
    """
    if z.ndim != 3:
        raise ValueError(f"z must be [V, B, D], got shape {tuple(z.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    pairs = cmc_view_pairs(z.shape[0], graph)
    z = F.normalize(z, dim=-1)
    target = torch.arange(z.shape[1], device=z.device)
    loss = z.new_zeros((), dtype=torch.promote_types(z.dtype, torch.float32))
    correct = torch.zeros((), device=z.device)
    for i, j in pairs:
        logits = _at_least_fp32(z[i] @ z[j].T) / temperature  # [B, B]: rows view i, cols view j
        loss = loss + F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)
        correct = correct + (logits.argmax(dim=1) == target).float().mean()
        correct = correct + (logits.argmax(dim=0) == target).float().mean()
    return loss, (correct / (2 * len(pairs))).detach()


def cpc_loss(
    preds: Tensor,
    targets: Tensor,
    steps: Sequence[int],
    temperature: float,
    normalize: bool = False,
    first: int = 0,
) -> tuple[Tensor, Tensor]:
    """CPC's InfoNCE over a grid of patch encodings: predict the rows below, contrast against
    every patch of every image.

    ``targets[n, r, c]`` is the target encoding of the patch at row ``r``, column ``c`` of image
    ``n``. ``preds[i, b, r, c]`` predicts, from the context at ``(r, c)`` of local image ``b``,
    the target ``k = steps[i]`` rows below: ``targets[first + b, r + k, c]``. Positions with
    ``r + k >= H`` have no target and are skipped. For each remaining prediction ``p``::

        s_t      = p . t / temperature            for every target t (all N * H * W of them)
        l(p)     = -s_positive + log sum_t exp(s_t)
        loss_k   = mean of l(p) over the predictions of step k
        loss     = mean_k loss_k

    The negatives are all other patches in ``targets``: other positions of the same image and
    every position of the other images (CPC v2). The steps are averaged, where CPC v2 sums
    them, so that the loss scale does not grow with the number of steps (v2 predicts a single
    step, where both agree). With ``normalize`` the vectors are L2-normalised first (cosine
    logits); CPC v2 uses raw dot products scaled by ``emb_scale = 1 / temperature``.

    Under DDP, ``targets`` holds every worker's images (gathered, differentiable) and ``preds``
    only the local ones, which start at row ``first`` of ``targets``.

    Args:
        preds: ``[K, B, H, W, D]`` predictions for each of the ``K`` steps.
        targets: ``[N, H, W, D]`` target encodings, ``N >= first + B``.
        steps: ``K`` row offsets, each in ``1 .. H - 1``.
        temperature: logits are divided by it (> 0).
        normalize: L2-normalise ``preds`` and ``targets`` along ``D`` first.
        first: row of ``targets`` holding local image 0 (``rank * B`` under DDP).

    Returns:
        ``(loss, accuracy)``: scalar loss (dtype at least float32) and the detached fraction of
        predictions whose highest-scoring target is the positive.

    Raises:
        ValueError: on malformed shapes or steps, or a non-positive temperature.
    """
    if preds.ndim != 5 or targets.ndim != 4 or preds.shape[2:] != targets.shape[1:]:
        raise ValueError(
            f"preds must be [K, B, H, W, D] and targets [N, H, W, D], got "
            f"{tuple(preds.shape)} and {tuple(targets.shape)}"
        )
    n_steps, batch, rows, cols, dim = preds.shape
    if len(steps) != n_steps or any(not 1 <= k < rows for k in steps):
        raise ValueError(f"steps must be {n_steps} offsets in 1..{rows - 1}, got {list(steps)}")
    if not 0 <= first <= targets.shape[0] - batch:
        raise ValueError(f"first={first} leaves no room for {batch} images in {targets.shape[0]}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if normalize:
        preds, targets = F.normalize(preds, dim=-1), F.normalize(targets, dim=-1)
    flat = targets.reshape(-1, dim)  # [N*H*W, D], row (n * H + r) * W + c
    b = torch.arange(first, first + batch, device=preds.device).view(-1, 1, 1)
    c = torch.arange(cols, device=preds.device).view(1, 1, -1)
    losses, correct, count = [], torch.zeros((), device=preds.device), 0
    for i, k in enumerate(steps):
        q = preds[i, :, : rows - k].reshape(-1, dim)  # [B*(H-k)*W, D]
        r = torch.arange(k, rows, device=preds.device).view(1, -1, 1)  # target rows
        label = ((b * rows + r) * cols + c).reshape(-1)
        logits = _at_least_fp32(q @ flat.T) / temperature  # [B*(H-k)*W, N*H*W]
        losses.append(F.cross_entropy(logits, label))
        correct = correct + (logits.argmax(dim=1) == label).sum()
        count += label.numel()
    return torch.stack(losses).mean(), (correct / count).detach()
