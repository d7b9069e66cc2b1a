"""Per-(sample, class) voxel sums of the partial-label loss, computed in chunks with a hand-written backward.

Autograd through the plain expressions would keep the masked logits, ``sigmoid(x)`` and the float targets
alive until the backward pass (three extra copies of the (B, K, z, y, x) logits, ~1.2 GB each at the
reference patch with 47 classes) and materialise several more transients at once. Here the forward keeps
nothing but references to its inputs, and both passes work on chunks of rows, so the loss costs about one
logits-sized gradient plus small chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from multitalent.losses.label_targets import LabelTargets

# Elements per chunk: 2**25 float32 values = 128 MiB per transient.
DEFAULT_CHUNK_ELEMENTS = 2**25
# True: every row is computed and the non-annotated ones masked, as before the annotated-rows-only pass
# (what torch.compile always does); for benchmarks that compare the two (bench/gpu_levers.py).
VISIT_ALL_ROWS = False


class TargetRows(Protocol):
    """The flattened ``(B*K, N)`` targets, row ranges on demand (:class:`LabelTargets`, or a dense
    tensor); ``annotated_r``: the annotated flags on the host, when the caller has them. ``to_saved`` /
    ``from_saved`` split it into tensors (kept by autograd's ``save_for_backward``, so released after the
    backward and checked for in-place changes) and the rest."""

    @property
    def annotated_r(self) -> tuple[bool, ...] | None: ...

    def rows(self, start: int, end: int, dtype: torch.dtype) -> Tensor: ...

    def to_saved(self) -> tuple[tuple[Tensor, ...], Any]: ...

    @classmethod
    def from_saved(cls, tensors: Sequence[Tensor], meta: Any) -> TargetRows: ...


class _DenseRows:
    annotated_r: tuple[bool, ...] | None = None

    def __init__(self, y_rn: Tensor) -> None:
        self.y_rn = y_rn

    def rows(self, start: int, end: int, dtype: torch.dtype) -> Tensor:
        return self.y_rn[start:end].to(dtype)

    def to_saved(self) -> tuple[tuple[Tensor, ...], Any]:
        return (self.y_rn,), None

    @classmethod
    def from_saved(cls, tensors: Sequence[Tensor], meta: Any) -> _DenseRows:
        return cls(tensors[0])


class _VoxelSums(torch.autograd.Function):
    """``sums_r3 = [sum_v p*y, sum_v p, sum_v bce(x, y)]`` per row ``r = (b, k)`` with ``p = sigmoid(x)``,
    computed only for the rows where ``a_r`` is True: the other rows' sums are 0 and their gradient is
    exactly 0, whatever their logits hold (NaN/Inf included), and no arithmetic is spent on them (in a
    multi-dataset batch most rows are not annotated: 3/4 and more with the 13 datasets). ``aux_r4 =
    [sum_v y, tp_hard, sum_v (x > 0), 0]`` likewise, not differentiable (hard counts are zero unless
    requested)."""

    @staticmethod
    def forward(
        ctx: Any,
        x_rn: Tensor,
        y_rn: TargetRows,
        a_r: Tensor,
        compute_dtype: torch.dtype,
        rows_per_chunk: int,
        hard: bool,
    ) -> tuple[Tensor, Tensor]:
        n_rows = x_rn.shape[0]
        sums = x_rn.new_zeros((n_rows, 3), dtype=compute_dtype)
        aux = x_rn.new_zeros((n_rows, 4), dtype=compute_dtype)
        # Under torch.compile, reading ``a_r`` on the host would break the graph: visit every row and
        # mask instead (the statistics mask the non-annotated rows' sums; their gradient is 0 either way).
        masked = VISIT_ALL_ROWS or torch.compiler.is_compiling()
        chunks = (
            [(s, min(n_rows, s + rows_per_chunk)) for s in range(0, n_rows, rows_per_chunk)]
            if masked
            else annotated_chunks(a_r if y_rn.annotated_r is None else y_rn.annotated_r, rows_per_chunk)
        )
        for s, e in chunks:
            x, y = _rows(x_rn, y_rn, a_r if masked else None, s, e, compute_dtype)
            p = torch.sigmoid(x)
            sums[s:e, 0] = (p * y).sum(1)
            sums[s:e, 1] = p.sum(1)
            sums[s:e, 2] = F.binary_cross_entropy_with_logits(x, y, reduction="none").sum(1)
            aux[s:e, 0] = y.sum(1)
            if hard:
                pred = x > 0
                aux[s:e, 1] = (pred & (y > 0.5)).sum(1).to(compute_dtype)
                aux[s:e, 2] = pred.sum(1).to(compute_dtype)
        target_tensors, ctx.target_meta = y_rn.to_saved()
        ctx.save_for_backward(x_rn, a_r, *target_tensors)
        ctx.target_type = type(y_rn)
        ctx.compute_dtype = compute_dtype
        ctx.chunks, ctx.masked = chunks, masked
        ctx.mark_non_differentiable(aux)
        return sums, aux

    @staticmethod
    def backward(ctx: Any, g_sums: Tensor, g_aux: Tensor) -> tuple[Tensor | None, ...]:
        x_rn, a_r, *target_tensors = ctx.saved_tensors
        y_rn = ctx.target_type.from_saved(target_tensors, ctx.target_meta)
        cd, mask = ctx.compute_dtype, a_r if ctx.masked else None
        grad = torch.zeros_like(x_rn)
        g = g_sums.to(cd)
        for s, e in ctx.chunks:
            x, y = _rows(x_rn, y_rn, mask, s, e, cd)
            p = torch.sigmoid(x)
            g_tp, g_sp, g_bce = g[s:e, 0:1], g[s:e, 1:2], g[s:e, 2:3]
            # d(p y)/dx = y p (1-p), dp/dx = p (1-p), d bce(x, y)/dx = p - y
            gx = p * (1 - p) * (g_tp * y + g_sp) + g_bce * (p - y)
            grad[s:e] = (gx if mask is None else torch.where(mask[s:e, None], gx, 0.0)).to(grad.dtype)
        return grad, None, None, None, None, None


def _rows(
    x_rn: Tensor, y_rn: TargetRows, mask_r: Tensor | None, s: int, e: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Rows ``[s, e)`` in the compute dtype; with ``mask_r``, non-annotated logits are replaced by 0 before
    any arithmetic, so NaN/Inf there cannot leak anywhere."""
    x = x_rn[s:e].to(dtype)
    if mask_r is not None:
        x = torch.where(mask_r[s:e, None], x, 0.0)
    return x, y_rn.rows(s, e, dtype)


def annotated_chunks(a_r: Tensor | Sequence[bool], rows_per_chunk: int) -> list[tuple[int, int]]:
    """``[start, end)`` row ranges covering exactly the True rows of ``a_r``, each at most
    ``rows_per_chunk`` long (a sample's annotated classes are one run when its dataset's classes are
    adjacent in the catalog, so a batch is a few ranges, read as views without copies). A tensor ``a_r``
    costs one host read (B*K booleans); host flags none."""
    flags = a_r.detach().to("cpu", torch.bool).tolist() if isinstance(a_r, Tensor) else list(a_r)
    chunks: list[tuple[int, int]] = []
    start = None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            chunks += [(s, min(i, s + rows_per_chunk)) for s in range(start, i, rows_per_chunk)]
            start = None
    return chunks


def voxel_sums(
    logits_bkzyx: Tensor,
    target_bkzyx: Tensor | LabelTargets,
    annotated_bk: Tensor,
    *,
    hard: bool,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """Per-(b, k) sums over the voxels: ``(sums_bk3, aux_bk4)`` (see :class:`_VoxelSums`).

    Computed in float32 (float64 for float64 logits); ``sums`` is differentiable w.r.t. the logits.
    ``target_bkzyx``: dense, or :class:`LabelTargets` (rows made as the pass reaches them).
    """
    b, k = logits_bkzyx.shape[:2]
    compute_dtype = torch.float64 if logits_bkzyx.dtype == torch.float64 else torch.float32
    x_rn = logits_bkzyx.reshape(b * k, -1)
    y_rn: TargetRows
    if isinstance(target_bkzyx, LabelTargets):
        y_rn = target_bkzyx
    else:
        y_rn = _DenseRows(target_bkzyx.reshape(b * k, -1))
    rows = max(1, chunk_elements // max(1, x_rn.shape[1]))
    sums, aux = _VoxelSums.apply(x_rn, y_rn, annotated_bk.reshape(b * k), compute_dtype, rows, hard)
    return sums.reshape(b, k, 3), aux.reshape(b, k, 4)
