"""Tests for contrastlab.losses.

Each loss is checked against a deliberately naive reference written here from the formula
(Python loops over anchors / positives / patches on float64 scalars, so autograd through the
reference also gives reference gradients), plus closed forms and edge cases.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from contrastlab.losses import (
    emp_ssl_loss,
    info_nce_loss,
    nt_xent_loss,
    supcon_loss,
    total_coding_rate,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
F64 = torch.float64
RTOL = ATOL = 1e-5  # float64 inputs: a naive loop vs. the vectorised code


def _randn(*shape: int, seed: int, device: str = "cpu", dtype: torch.dtype = F64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).to(device=device, dtype=dtype)


def _leaf(x: Tensor) -> Tensor:
    return x.detach().clone().requires_grad_(True)


def _grad(x: Tensor) -> Tensor:
    assert x.grad is not None
    return x.grad


# --------------------------------------------------------------------------------------------
# Naive references (float64, loops).
# --------------------------------------------------------------------------------------------


def _unit(v: Tensor) -> Tensor:
    return v / torch.sqrt((v * v).sum())


def ref_supcon(
    z: Tensor, labels: list[int] | None, temperature: float, base_temperature: float | None = None
) -> Tensor:
    """L_out SupCon: mean over anchors with positives of -1/|P| sum_p log softmax_{a != i}."""
    n_views, batch, _ = z.shape
    rows = [_unit(z[v, b]) for v in range(n_views) for b in range(batch)]
    ys = [(labels[b] if labels is not None else b) for _ in range(n_views) for b in range(batch)]
    n = len(rows)
    total = (z * 0.0).sum()  # zero that stays on the graph when no anchor has a positive
    n_anchors = 0
    for i in range(n):
        denom = z.new_zeros(())
        for a in range(n):
            if a != i:
                denom = denom + torch.exp(torch.dot(rows[i], rows[a]) / temperature)
        positives = [p for p in range(n) if p != i and ys[p] == ys[i]]
        if not positives:
            continue
        acc = z.new_zeros(())
        for p in positives:
            acc = acc + torch.dot(rows[i], rows[p]) / temperature - torch.log(denom)
        total = total - acc / len(positives)
        n_anchors += 1
    loss = total / n_anchors if n_anchors else total
    if base_temperature is not None:
        loss = loss * temperature / base_temperature
    return loss


def ref_info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    total = q.new_zeros(())
    for n in range(q.shape[0]):
        qn, kn = _unit(q[n]), _unit(k[n])
        pos = torch.dot(qn, kn) / temperature
        denom = torch.exp(pos)
        for j in range(queue.shape[0]):
            denom = denom + torch.exp(torch.dot(qn, queue[j]) / temperature)
        total = total - (pos - torch.log(denom))
    return total / q.shape[0]


def ref_tcr_dxd(z: Tensor, eps: float) -> Tensor:
    """1/2 logdet(I_D + D/(B eps) Z^T Z) via LU (slogdet), independent of the Cholesky path."""
    b, d = z.shape
    m = torch.eye(d, dtype=z.dtype, device=z.device) + d / (b * eps) * (z.T @ z)
    sign, logabsdet = torch.linalg.slogdet(m)
    assert sign.item() == 1.0
    return 0.5 * logabsdet


def ref_tcr_bxb(z: Tensor, eps: float) -> Tensor:
    """Same quantity through Sylvester's identity: 1/2 logdet(I_B + D/(B eps) Z Z^T)."""
    b, d = z.shape
    m = torch.eye(b, dtype=z.dtype, device=z.device) + d / (b * eps) * (z @ z.T)
    return 0.5 * torch.linalg.slogdet(m)[1]


def ref_emp_ssl(
    z: Tensor, eps: float, invariance_weight: float, tcr_weight: float
) -> tuple[Tensor, Tensor, Tensor]:
    n_patch, batch, _ = z.shape
    zn = [[_unit(z[p, b]) for b in range(batch)] for p in range(n_patch)]
    tcr = z.new_zeros(())
    for p in range(n_patch):
        tcr = tcr + ref_tcr_dxd(torch.stack(zn[p]), eps)
    tcr = tcr / n_patch
    inv = z.new_zeros(())
    for b in range(batch):
        mean_b = torch.zeros_like(zn[0][b])
        for p in range(n_patch):
            mean_b = mean_b + zn[p][b]
        mean_b = mean_b / n_patch  # not detached, as upstream
        for p in range(n_patch):
            inv = inv + torch.dot(zn[p][b], mean_b) / torch.sqrt((mean_b * mean_b).sum())
    inv = inv / (n_patch * batch)
    return -tcr_weight * tcr - invariance_weight * inv, tcr, inv


def _labels(batch: int, n_classes: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_classes, (batch,), generator=g).tolist()


# --------------------------------------------------------------------------------------------
# SupCon / NT-Xent
# --------------------------------------------------------------------------------------------

SUPCON_SHAPES = [(1, 5, 3), (2, 4, 8), (2, 7, 5), (3, 5, 7), (4, 3, 5), (3, 6, 2), (2, 1, 4)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SUPCON_SHAPES)
@pytest.mark.parametrize("labelled", [True, False])
def test_supcon_matches_reference(device: str, shape: tuple[int, int, int], labelled: bool) -> None:
    v, b, d = shape
    labels = _labels(b, n_classes=3, seed=b) if labelled else None
    z = _randn(v, b, d, seed=sum(shape))
    z_ref, z_dev = _leaf(z), _leaf(z.to(device))
    expected = ref_supcon(z_ref, labels, temperature=0.3)
    lab = None if labels is None else torch.tensor(labels, device=device)
    got = supcon_loss(z_dev, lab, temperature=0.3)
    torch.testing.assert_close(got.cpu(), expected.detach(), rtol=RTOL, atol=ATOL)
    expected.backward()
    got.backward()
    torch.testing.assert_close(_grad(z_dev).cpu(), _grad(z_ref), rtol=RTOL, atol=ATOL)


@settings(max_examples=30, deadline=None)
@given(
    v=st.integers(1, 4),
    b=st.integers(1, 6),
    d=st.integers(1, 6),
    n_classes=st.integers(1, 4),
    temperature=st.floats(0.1, 2.0),
    labelled=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_supcon_matches_reference_random_shapes(
    v: int, b: int, d: int, n_classes: int, temperature: float, labelled: bool, seed: int
) -> None:
    z = _randn(v, b, d, seed=seed)
    labels = _labels(b, n_classes, seed) if labelled else None
    lab = None if labels is None else torch.tensor(labels)
    got = supcon_loss(z, lab, temperature)
    torch.testing.assert_close(got, ref_supcon(z, labels, temperature), rtol=RTOL, atol=ATOL)
    assert torch.isfinite(got)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 3, 4), (2, 8, 16), (3, 5, 7), (4, 4, 3), (2, 1, 5)])
def test_nt_xent_matches_reference(device: str, shape: tuple[int, int, int]) -> None:
    z = _randn(*shape, seed=7 + sum(shape))
    got = nt_xent_loss(z.to(device), temperature=0.5)
    torch.testing.assert_close(got.cpu(), ref_supcon(z, None, 0.5), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("v,b", [(2, 1), (2, 5), (2, 16), (3, 4), (4, 2)])
@pytest.mark.parametrize("temperature", [0.07, 0.5, 1.0])
def test_nt_xent_identical_embeddings_closed_form(
    device: str, v: int, b: int, temperature: float
) -> None:
    # All similarities are 1, so every log-probability is -log(V*B - 1), whatever T is;
    # for V == 2 that is SimCLR's -log(1 / (2n - 1)).
    z = _randn(1, 1, 6, seed=0, device=device).expand(v, b, 6) * 3.0
    got = nt_xent_loss(z, temperature)
    assert got.item() == pytest.approx(math.log(v * b - 1), abs=1e-9)
    if v == 2:
        assert got.item() == pytest.approx(-math.log(1.0 / (2 * b - 1)), abs=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 6, 5), (3, 4, 8), (4, 5, 3)])
def test_supcon_unlabelled_and_distinct_labels_equal_nt_xent(
    device: str, shape: tuple[int, int, int]
) -> None:
    z = _randn(*shape, seed=3, device=device)
    expected = nt_xent_loss(z, 0.2)
    torch.testing.assert_close(supcon_loss(z, None, 0.2), expected, rtol=1e-12, atol=1e-12)
    # Any labelling with all-distinct labels gives the same positives as "same sample".
    distinct = torch.randperm(shape[1], generator=torch.Generator().manual_seed(1)) * 7 - 3
    got = supcon_loss(z, distinct.to(device), 0.2)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("labelled", [True, False])
def test_supcon_base_temperature_scales_exactly(device: str, labelled: bool) -> None:
    z = _randn(2, 6, 4, seed=11, device=device)
    labels = torch.tensor([0, 1, 0, 2, 1, 1], device=device) if labelled else None
    plain = supcon_loss(z, labels, temperature=0.1)
    scaled = supcon_loss(z, labels, temperature=0.1, base_temperature=0.07)
    torch.testing.assert_close(scaled, plain * (0.1 / 0.07), rtol=1e-12, atol=0.0)
    # base_temperature == temperature is the identity.
    same = supcon_loss(z, labels, temperature=0.1, base_temperature=0.1)
    torch.testing.assert_close(same, plain, rtol=1e-12, atol=0.0)
    # And the reference agrees with the rescaled value.
    expected = ref_supcon(z.cpu(), None if labels is None else labels.tolist(), 0.1, 0.07)
    torch.testing.assert_close(scaled.cpu(), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_supcon_anchor_without_positive_is_skipped_and_finite(device: str) -> None:
    # V == 1: anchors 0 ("a" seen once) and 4 ("d" seen once) have no positive.
    labels = [0, 1, 1, 2, 3, 2]
    z = _randn(1, 6, 5, seed=5)
    z_ref, z_dev = _leaf(z), _leaf(z.to(device))
    got = supcon_loss(z_dev, torch.tensor(labels, device=device), 0.1)
    expected = ref_supcon(z_ref, labels, 0.1)
    got.backward()
    expected.backward()
    assert torch.isfinite(got)
    assert torch.isfinite(_grad(z_dev)).all()
    torch.testing.assert_close(got.cpu(), expected.detach(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(_grad(z_dev).cpu(), _grad(z_ref), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape,labels",
    [((1, 5, 3), [4, 0, 2, 1, 3]), ((1, 5, 3), None), ((1, 1, 3), [0]), ((1, 1, 3), None)],
)
def test_supcon_no_positive_anywhere_is_zero_with_graph(
    device: str, shape: tuple[int, int, int], labels: list[int] | None
) -> None:
    z = _leaf(_randn(*shape, seed=2, device=device))
    lab = None if labels is None else torch.tensor(labels, device=device)
    loss = supcon_loss(z, lab, 0.1)
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert torch.isfinite(_grad(z)).all()
    assert (_grad(z) == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_supcon_small_temperature_is_stable(device: str) -> None:
    # exp(1/0.01) overflows float32; the log-sum-exp formulation must not.
    z = _randn(2, 6, 4, seed=8)
    labels = [0, 0, 1, 1, 2, 3]
    z32 = _leaf(z.to(device=device, dtype=torch.float32) * 100.0)
    loss = supcon_loss(z32, torch.tensor(labels, device=device), temperature=0.01)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(_grad(z32)).all()
    expected = ref_supcon(z, labels, 0.01)
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-4, atol=1e-4)


def test_supcon_input_validation() -> None:
    with pytest.raises(ValueError):
        supcon_loss(torch.randn(4, 3), None, 0.1)
    with pytest.raises(ValueError):
        supcon_loss(torch.randn(2, 4, 3), torch.arange(3), 0.1)
    with pytest.raises(ValueError):
        supcon_loss(torch.randn(2, 4, 3), None, 0.0)
    with pytest.raises(ValueError):
        nt_xent_loss(torch.randn(1, 4, 3), 0.1)


# --------------------------------------------------------------------------------------------
# MoCo InfoNCE
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,k,d", [(1, 1, 3), (4, 7, 5), (5, 16, 8), (3, 0, 4), (6, 9, 2)])
def test_info_nce_matches_reference(device: str, n: int, k: int, d: int) -> None:
    q = _randn(n, d, seed=n)
    key = _randn(n, d, seed=n + 100)
    queue = F.normalize(_randn(k, d, seed=k + 200), dim=1)
    q_ref, q_dev = _leaf(q), _leaf(q.to(device))
    expected = ref_info_nce(q_ref, key, queue, 0.2)
    loss, logits = info_nce_loss(q_dev, key.to(device), queue.to(device), 0.2)
    torch.testing.assert_close(loss.cpu(), expected.detach(), rtol=RTOL, atol=ATOL)
    expected.backward()
    loss.backward()
    torch.testing.assert_close(_grad(q_dev).cpu(), _grad(q_ref), rtol=RTOL, atol=ATOL)
    # Logits by hand: positive first, then the queue in order.
    qn, kn = F.normalize(q, dim=1), F.normalize(key, dim=1)
    want = torch.cat([(qn * kn).sum(1, keepdim=True), qn @ queue.T], dim=1) / 0.2
    assert logits.shape == (n, 1 + k)
    torch.testing.assert_close(logits.detach().cpu(), want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
def test_info_nce_orthogonal_queue_closed_form(device: str, temperature: float) -> None:
    # q == k lives in the first 4 coordinates, the queue in the last 4: logits are
    # [1/T, 0, ..., 0], so the loss is -1/T + log(exp(1/T) + K) = log(1 + K exp(-1/T)).
    n, k_size = 5, 6
    q = torch.zeros(n, 8, dtype=F64)
    q[:, :4] = _randn(n, 4, seed=1)
    queue = torch.zeros(k_size, 8, dtype=F64)
    queue[:, 4:] = _randn(k_size, 4, seed=2)
    queue = F.normalize(queue, dim=1)
    loss, logits = info_nce_loss(q.to(device), q.to(device), queue.to(device), temperature)
    expected = math.log1p(k_size * math.exp(-1.0 / temperature))
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(logits[:, 0].cpu(), torch.full((n,), 1.0 / temperature, dtype=F64))
    torch.testing.assert_close(logits[:, 1:].cpu(), torch.zeros(n, k_size, dtype=F64))


@pytest.mark.parametrize("device", DEVICES)
def test_info_nce_shapes_positive_index_and_no_grad_into_keys(device: str) -> None:
    n, k_size, d = 4, 10, 6
    q = _leaf(_randn(n, d, seed=1, device=device, dtype=torch.float32))
    key = _leaf(_randn(n, d, seed=2, device=device, dtype=torch.float32))
    queue = _leaf(F.normalize(_randn(k_size, d, seed=3, device=device, dtype=torch.float32)))
    loss, logits = info_nce_loss(q, key, queue, 0.1)
    assert loss.shape == ()
    assert logits.shape == (n, 1 + k_size)
    cos = F.cosine_similarity(q.detach(), key.detach(), dim=1)
    torch.testing.assert_close(logits[:, 0].detach(), cos / 0.1)
    # Target is index 0: the loss is the mean of -log_softmax at column 0.
    torch.testing.assert_close(loss.detach(), -F.log_softmax(logits.detach(), 1)[:, 0].mean())
    loss.backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    assert key.grad is None
    assert queue.grad is None


def test_info_nce_input_validation() -> None:
    with pytest.raises(ValueError):
        info_nce_loss(torch.randn(4, 3), torch.randn(5, 3), torch.randn(7, 3), 0.1)
    with pytest.raises(ValueError):
        info_nce_loss(torch.randn(4, 3), torch.randn(4, 3), torch.randn(7, 2), 0.1)


# --------------------------------------------------------------------------------------------
# Total coding rate
# --------------------------------------------------------------------------------------------

TCR_SHAPES = [(1, 1), (3, 7), (7, 3), (5, 5), (16, 4), (4, 16), (9, 13)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,d", TCR_SHAPES)
@pytest.mark.parametrize("eps", [0.01, 0.2, 1.5])
def test_tcr_matches_both_reference_forms(device: str, b: int, d: int, eps: float) -> None:
    z = _randn(b, d, seed=b * 31 + d)
    dxd, bxb = ref_tcr_dxd(z, eps), ref_tcr_bxb(z, eps)
    # Sylvester's identity: the two forms agree, and the implementation (which picks the
    # smaller one) agrees with both, whichever branch the shape selects.
    torch.testing.assert_close(dxd, bxb, rtol=1e-10, atol=1e-10)
    got = total_coding_rate(z.to(device), eps)
    assert got.shape == ()
    torch.testing.assert_close(got.cpu(), dxd, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got.cpu(), bxb, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,d", [(1, 4), (3, 8), (5, 5), (2, 17)])
@pytest.mark.parametrize("eps", [0.05, 0.5])
def test_tcr_orthonormal_rows_closed_form(device: str, b: int, d: int, eps: float) -> None:
    # Z Z^T = I_B, so logdet(I_B + c I_B) = B log(1 + c) with c = D / (B eps).
    qmat, _ = torch.linalg.qr(_randn(d, b, seed=b + d))
    z = qmat.T.contiguous()
    torch.testing.assert_close(z @ z.T, torch.eye(b, dtype=F64))
    expected = 0.5 * b * math.log1p(d / (b * eps))
    assert total_coding_rate(z.to(device), eps).item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,d", [(4, 1), (8, 3), (17, 2)])
def test_tcr_orthonormal_columns_closed_form(device: str, b: int, d: int) -> None:
    # Z^T Z = I_D, so R = D/2 log(1 + D / (B eps)); exercises the D x D branch.
    qmat, _ = torch.linalg.qr(_randn(b, d, seed=b * d))
    expected = 0.5 * d * math.log1p(d / (b * 0.3))
    assert total_coding_rate(qmat.to(device), 0.3).item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_tcr_batched_equals_stacked(device: str) -> None:
    z = _randn(3, 2, 5, 4, seed=4, device=device)
    got = total_coding_rate(z, 0.2)
    assert got.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            torch.testing.assert_close(got[i, j], total_coding_rate(z[i, j], 0.2))


def test_tcr_input_validation() -> None:
    with pytest.raises(ValueError):
        total_coding_rate(torch.randn(5), 0.2)
    with pytest.raises(ValueError):
        total_coding_rate(torch.randn(5, 3), 0.0)


# --------------------------------------------------------------------------------------------
# EMP-SSL
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p,b,d", [(1, 3, 4), (2, 4, 3), (4, 5, 6), (3, 3, 9), (5, 2, 2)])
def test_emp_ssl_matches_reference(device: str, p: int, b: int, d: int) -> None:
    z = _randn(p, b, d, seed=p * 100 + b * 10 + d)
    z_ref, z_dev = _leaf(z), _leaf(z.to(device))
    exp_loss, exp_tcr, exp_inv = ref_emp_ssl(z_ref, 0.2, invariance_weight=200.0, tcr_weight=1.5)
    loss, metrics = emp_ssl_loss(z_dev, 0.2, invariance_weight=200.0, tcr_weight=1.5)
    torch.testing.assert_close(loss.cpu(), exp_loss.detach(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(metrics["tcr"].cpu(), exp_tcr.detach(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(metrics["invariance"].cpu(), exp_inv.detach(), rtol=RTOL, atol=ATOL)
    # Gradients too. (The reference keeps the patch mean attached, as upstream; for unit-norm
    # patches the gradient through the mean is zero anyway, see the test below.)
    exp_loss.backward()
    loss.backward()
    torch.testing.assert_close(_grad(z_dev).cpu(), _grad(z_ref), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_emp_ssl_identical_patches_invariance_is_one(device: str) -> None:
    base = _randn(1, 6, 5, seed=9, device=device)
    scales = torch.tensor([1.0, 0.5, 3.0, 7.0], dtype=F64, device=device).view(4, 1, 1)
    z = base * scales  # same direction in every patch, different norms
    loss, metrics = emp_ssl_loss(z, 0.2, invariance_weight=200.0, tcr_weight=1.0)
    assert metrics["invariance"].item() == pytest.approx(1.0, abs=1e-12)
    # Every patch group is the same normalised [B, D] matrix, so tcr is its coding rate.
    expected_tcr = total_coding_rate(F.normalize(base[0], dim=-1), 0.2)
    torch.testing.assert_close(metrics["tcr"], expected_tcr)
    torch.testing.assert_close(loss, -expected_tcr - 200.0)


@pytest.mark.parametrize("device", DEVICES)
def test_emp_ssl_loss_composition_and_detached_metrics(device: str) -> None:
    z = _leaf(_randn(3, 4, 5, seed=12, device=device))
    loss, metrics = emp_ssl_loss(z, 0.5, invariance_weight=3.0, tcr_weight=0.25)
    assert set(metrics) == {"tcr", "invariance"}
    assert not metrics["tcr"].requires_grad and not metrics["invariance"].requires_grad
    torch.testing.assert_close(loss.detach(), -0.25 * metrics["tcr"] - 3.0 * metrics["invariance"])
    # Weights are the only scaling: zero weights give zero loss.
    zero, _ = emp_ssl_loss(z, 0.5, invariance_weight=0.0, tcr_weight=0.0)
    assert zero.item() == 0.0


def test_emp_ssl_mean_detached_or_not_gives_same_gradient() -> None:
    # The patch-mean direction maximises the summed cosine, so its own gradient vanishes:
    # following upstream (attached) vs. detaching is a no-op. Pinned so a change is noticed.
    z = _randn(4, 5, 6, seed=13)
    zn = F.normalize(_leaf(z), dim=-1)

    def inv(detach: bool) -> Tensor:
        mean = zn.mean(0, keepdim=True)
        return F.cosine_similarity(zn, mean.detach() if detach else mean, dim=-1).mean()

    (g_attached,) = torch.autograd.grad(inv(False), zn)
    (g_detached,) = torch.autograd.grad(inv(True), zn)
    torch.testing.assert_close(g_attached, g_detached, rtol=0.0, atol=1e-12)


def test_emp_ssl_input_validation() -> None:
    with pytest.raises(ValueError):
        emp_ssl_loss(torch.randn(4, 3), 0.2, 1.0, 1.0)


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


def test_gradcheck_supcon() -> None:
    z = _leaf(_randn(2, 3, 4, seed=1))
    labels = torch.tensor([0, 1, 0])
    assert torch.autograd.gradcheck(lambda x: supcon_loss(x, labels, 0.5), (z,))
    assert torch.autograd.gradcheck(lambda x: supcon_loss(x, None, 0.5, 0.07), (z,))
    z3 = _leaf(_randn(3, 2, 3, seed=2))
    assert torch.autograd.gradcheck(lambda x: nt_xent_loss(x, 0.3), (z3,))


def test_gradcheck_info_nce() -> None:
    q = _leaf(_randn(3, 4, seed=1))
    key = _randn(3, 4, seed=2)
    queue = F.normalize(_randn(5, 4, seed=3), dim=1)
    assert torch.autograd.gradcheck(lambda x: info_nce_loss(x, key, queue, 0.2)[0], (q,))


@pytest.mark.parametrize("b,d", [(5, 3), (3, 5)])  # D x D and B x B branches
def test_gradcheck_total_coding_rate(b: int, d: int) -> None:
    z = _leaf(_randn(b, d, seed=b + d))
    assert torch.autograd.gradcheck(lambda x: total_coding_rate(x, 0.2), (z,))


def test_gradcheck_emp_ssl() -> None:
    z = _leaf(_randn(3, 2, 3, seed=6))
    assert torch.autograd.gradcheck(lambda x: emp_ssl_loss(x, 0.2, 2.0, 1.0)[0], (z,))


@pytest.mark.parametrize("device", DEVICES)
def test_all_losses_have_finite_gradients_fp32(device: str) -> None:
    def grad_of(fn, *shape: int) -> Tensor:
        x = _leaf(_randn(*shape, seed=sum(shape), device=device, dtype=torch.float32) * 10.0)
        fn(x).backward()
        return _grad(x)

    labels = torch.tensor([0, 1, 1, 2, 0, 3, 3, 2], device=device)
    queue = F.normalize(_randn(32, 16, seed=0, device=device, dtype=torch.float32), dim=1)
    key = _randn(8, 16, seed=1, device=device, dtype=torch.float32)
    grads = [
        grad_of(lambda x: supcon_loss(x, labels, 0.05), 2, 8, 16),
        grad_of(lambda x: supcon_loss(x, labels[:4], 0.05), 1, 4, 16),
        grad_of(lambda x: nt_xent_loss(x, 0.05), 4, 8, 16),
        grad_of(lambda x: info_nce_loss(x, key, queue, 0.05)[0], 8, 16),
        grad_of(lambda x: total_coding_rate(x, 0.01), 8, 16),
        grad_of(lambda x: total_coding_rate(x, 0.01), 16, 8),
        grad_of(lambda x: emp_ssl_loss(x, 0.2, 200.0, 1.0)[0], 4, 8, 16),
    ]
    for g in grads:
        assert g is not None and torch.isfinite(g).all()


# --------------------------------------------------------------------------------------------
# bfloat16
# --------------------------------------------------------------------------------------------

# bf16 keeps 8 mantissa bits (~4e-3 relative per element). The losses promote their
# log-sum-exp / Cholesky stages to float32, so the remaining error comes from rounding the
# inputs (and, for the contrastive losses, the bf16 similarity matmul), which largely averages
# out in the scalar loss: observed relative errors on CPU are <= 3e-4 at these sizes, so 5e-3
# (an order of magnitude of headroom, about one bf16 ulp) is the stated bound.
BF16_RTOL = 5e-3


def _bf16_cases(device: str) -> list[tuple[str, Callable[[Tensor], Tensor], tuple[int, ...]]]:
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 0, 1, 4, 5, 6, 7, 1, 2], device=device)
    key = _randn(16, 32, seed=21, device=device, dtype=torch.float32)
    queue = F.normalize(_randn(64, 32, seed=22, device=device, dtype=torch.float32), dim=1)

    def info_nce(x: Tensor) -> Tensor:
        return info_nce_loss(x, key.to(x.dtype), queue.to(x.dtype), 0.2)[0]

    return [
        ("supcon", lambda x: supcon_loss(x, labels, 0.1), (2, 16, 32)),
        ("nt_xent", lambda x: nt_xent_loss(x, 0.2), (3, 16, 32)),
        ("info_nce", info_nce, (16, 32)),
        ("tcr_dxd", lambda x: total_coding_rate(x, 0.2), (64, 16)),
        ("tcr_bxb", lambda x: total_coding_rate(x, 0.2), (16, 64)),
        ("emp_ssl", lambda x: emp_ssl_loss(x, 0.2, 200.0, 1.0)[0], (4, 16, 32)),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["bf16_tensors", "autocast"])
def test_bf16_close_to_fp32(device: str, mode: str) -> None:
    for name, fn, shape in _bf16_cases(device):
        x = _randn(*shape, seed=len(name), device=device, dtype=torch.float32)
        ref = fn(x)
        if mode == "bf16_tensors":
            got = fn(x.to(torch.bfloat16))
        else:
            with torch.autocast(device_type=device, dtype=torch.bfloat16):
                got = fn(x)
        # The loss itself comes back in float32 (the reductions were promoted).
        assert got.dtype == torch.float32, name
        assert torch.isfinite(got), name
        torch.testing.assert_close(got, ref, rtol=BF16_RTOL, atol=0.0, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_tcr_bf16_backward_is_finite(device: str) -> None:
    z = _leaf(_randn(32, 16, seed=3, device=device, dtype=torch.bfloat16))
    total_coding_rate(z, 0.2).backward()
    assert _grad(z).dtype == torch.bfloat16
    assert torch.isfinite(_grad(z)).all()
