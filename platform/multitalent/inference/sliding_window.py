"""Sliding-window prediction over a preprocessed volume, with mirroring test-time augmentation.

The network is any callable ``f(x_bczyx) -> logits_bkzyx`` (a list/tuple output, e.g. deep
supervision, is read at its first, full-resolution entry); nothing here knows training.

* Windows have the network's patch size and start every ``step * patch`` voxels, spread evenly so
  that the first window starts at 0 and the last ends at the volume's end (nnU-Net's rule). A
  volume smaller than the patch along an axis is padded (centred) with ``pad_value``; for body-
  cropped CT that is the normalised air value, what lies outside the crop.
* Overlapping windows are blended with a Gaussian importance map: a separable Gaussian centred on
  the patch with sigma ``sigma_scale * patch`` (1/8), floored at 1e-3 so the border voxels that
  only one window covers keep a weight. It is MONAI's ``compute_importance_map(mode="gaussian")``;
  the stitched value is ``sum_w w * y / sum_w w``.
* Mirroring: every subset of ``mirror_axes`` flips the window, the prediction is flipped back (and,
  for flips of the left-right axis x, its channels permuted by ``lr_permutation`` so that a left
  structure's channel receives the left structure), passed through the sigmoid and averaged: 8
  forward passes for all three axes. ``sigmoid(x) > 0.5 <=> x > 0`` only holds for one pass, so the
  averaging is over probabilities.

Memory: windows go z-slowest, and the blend is kept only for the rows windows still write to, a
ring of ``patch_z`` rows (``K * patch_z * y * x`` in ``accumulate_dtype``: float32, or float16 as
nnU-Net accumulates on the GPU). Finished slabs go to a sink (:func:`stitch`): the dense
:func:`sliding_window` concatenates them; the predictor keeps them as
:class:`~multitalent.inference.probability_store.SparseProbabilities`, each class only inside the
box where it is not ~0, so the full ``(K, z, y, x)`` volume is never held.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

Network = Callable[[torch.Tensor], object]
Shape3 = tuple[int, int, int]
IMPORTANCE_FLOOR = 1e-3


# ------------------------------------------------------------------------------------ geometry
def window_starts(size: int, patch: int, step: float) -> list[int]:
    """Start offsets of the windows along one axis (nnU-Net's ``compute_steps_for_sliding_window``).

    ``ceil((size - patch) / (step * patch)) + 1`` windows, evenly spread over ``[0, size - patch]``
    (rounded). ``size`` must be at least ``patch`` (pad first).
    """
    if not 0 < step <= 1:
        raise ValueError(f"step must lie in (0, 1], got {step}")
    if size < patch:
        raise ValueError(f"axis of {size} voxels is smaller than the patch ({patch}); pad it first")
    n = math.ceil((size - patch) / (step * patch)) + 1
    if n == 1:
        return [0]
    actual = (size - patch) / (n - 1)
    return [round(actual * i) for i in range(n)]


def window_slices(shape_zyx: Sequence[int], patch_zyx: Sequence[int], step: float) -> list[tuple[slice, ...]]:
    """Every window of a (padded) volume, z slowest, as ``(slice_z, slice_y, slice_x)``."""
    per_axis = [window_starts(int(n), int(p), step) for n, p in zip(shape_zyx, patch_zyx)]
    return [
        tuple(slice(s, s + int(p)) for s, p in zip(starts, patch_zyx))
        for starts in itertools.product(*per_axis)
    ]


def padding_for(shape_zyx: Sequence[int], patch_zyx: Sequence[int]) -> list[tuple[int, int]]:
    """``(before, after)`` per axis that brings each axis to at least the patch, centred."""
    pads = []
    for n, p in zip(shape_zyx, patch_zyx):
        diff = max(int(p) - int(n), 0)
        pads.append((diff // 2, diff - diff // 2))
    return pads


@lru_cache(maxsize=8)
def _gaussian_cpu(patch_zyx: Shape3, sigma_scale: float) -> torch.Tensor:
    out = torch.ones((), dtype=torch.float64)
    for p in patch_zyx:
        x = torch.arange(p, dtype=torch.float64) - (p - 1) / 2.0
        g = torch.exp(-(x**2) / (2.0 * (sigma_scale * p) ** 2))
        out = out.unsqueeze(-1) * g
    floor = max(float(out.min()), IMPORTANCE_FLOOR)
    return out.clamp_(min=floor).to(torch.float32)


def gaussian_importance_map(
    patch_zyx: Sequence[int], *, sigma_scale: float = 0.125, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``(z, y, x)`` float32 blending weights: ``prod_a exp(-d_a^2 / (2 (sigma_scale p_a)^2))`` with
    ``d_a`` the distance to the patch centre ``(p_a - 1) / 2``, floored at 1e-3 (cached per patch)."""
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    patch = (int(patch_zyx[0]), int(patch_zyx[1]), int(patch_zyx[2]))
    return _gaussian_cpu(patch, float(sigma_scale)).to(device)


def mirror_combinations(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``mirror_axes`` (spatial axes 0=z, 1=y, 2=x), the empty one first."""
    axes = sorted({int(a) for a in mirror_axes})
    if any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"mirror axes must be spatial axes 0 (z), 1 (y), 2 (x), got {list(mirror_axes)}")
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


# ----------------------------------------------------------------------------- window predictors
def _first_output(y: object) -> torch.Tensor:
    if isinstance(y, list | tuple):
        y = y[0]
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"the network returned {type(y).__name__}, expected a tensor (or a list of them)")
    return y


def mirrored_probabilities(
    network: Network,
    *,
    mirror_axes: Sequence[int] = (0, 1, 2),
    lr_permutation: Sequence[int] | None = None,
    channels: Sequence[int] | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A window predictor: mean over the flips of ``mirror_axes`` of ``sigmoid(network(flip(x)))``.

    Args:
        network: ``x_bczyx -> logits_bkzyx`` (or a list whose first entry is that).
        mirror_axes: spatial axes to mirror (0=z, 1=y, 2=x); empty for no mirroring.
        lr_permutation: optional ``(K,)`` channel permutation applied to a prediction flipped back
            along x (left-right): ``fixed[:, k] = pred[:, lr_permutation[k]]``; indexes the network's
            channels, before ``channels`` selects.
        channels: the output channels to keep (default all).
    """
    combos = mirror_combinations(mirror_axes)
    perm = None if lr_permutation is None else torch.as_tensor(list(lr_permutation), dtype=torch.long)
    keep = None if channels is None else torch.as_tensor(list(channels), dtype=torch.long)

    def predict(x_bczyx: torch.Tensor) -> torch.Tensor:
        # one copy of the window's output at a time beside the running total: with 164 classes at
        # the paper's patch, each copy is 2.3 GB per window
        total: torch.Tensor | None = None
        for combo in combos:
            dims = [2 + a for a in combo]
            x = torch.flip(x_bczyx, dims) if dims else x_bczyx
            y = _first_output(network(x))
            if dims:
                y = torch.flip(y, dims)
            if perm is not None and 2 in combo:
                if perm.numel() != y.shape[1]:
                    raise ValueError(f"lr_permutation has {perm.numel()} entries, the network {y.shape[1]}")
                y = y.index_select(1, perm.to(y.device))
            if keep is not None and not _is_identity(keep, y.shape[1]):
                y = y.index_select(1, keep.to(y.device))
            y = y.float()
            p = _sigmoid_of_owned(y, x_bczyx, x)
            if total is None:
                total = p
            else:
                total.add_(p)
            del y, p
        assert total is not None
        return total.div_(len(combos))

    return predict


def _sigmoid_of_owned(y: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """``sigmoid(y)``, in place when ``y`` is a temporary of ours (not an input, not in a graph)."""
    storage = y.untyped_storage().data_ptr()
    if y.requires_grad or any(t.untyped_storage().data_ptr() == storage for t in inputs):
        return torch.sigmoid(y)
    return y.sigmoid_()


def _is_identity(index: torch.Tensor, n: int) -> bool:
    return index.numel() == n and bool((index == torch.arange(n)).all())


def _autocast(device: torch.device, precision: str) -> torch.autocast | _NoCast:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return _NoCast()


class _NoCast:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# -------------------------------------------------------------------------------- sliding window
@dataclass(frozen=True)
class SlidingWindowSettings:
    """How to tile a volume (see the module docstring).

    ``precision``: ``"fp32"`` or ``"bf16"`` (autocast of the network; bf16 is meant for GPUs).
    ``out_device``/``accumulate_dtype``: where and in which dtype the stitched volume lives.
    """

    patch_zyx: Shape3
    step: float = 0.5
    sigma_scale: float = 0.125
    batch_size: int = 2
    pad_value: float = 0.0
    precision: str = "fp32"
    out_device: str | None = None  # None: the input's device
    accumulate_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if len(self.patch_zyx) != 3 or min(self.patch_zyx) < 1:
            raise ValueError(f"patch_zyx must be three positive sizes, got {self.patch_zyx}")
        if not 0 < self.step <= 1:
            raise ValueError(f"step must lie in (0, 1], got {self.step}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")


def _batches(items: list[tuple[slice, ...]], n: int) -> Iterator[list[tuple[slice, ...]]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


# A finished slab: ``sink(z0, sums, weights)`` for rows ``[z0, z0 + dz)`` of the unpadded volume, with
# ``sums`` the blended ``(K, dz, y, x)`` (accumulation dtype) and ``weights`` the ``(dz, y, x)`` float32
# sum of the Gaussian weights: the prediction is ``sums / weights``. Both are views of the ring, valid
# during the call only (the sink divides what it keeps, e.g. class by class: no copy of all classes).
SlabSink = Callable[[int, torch.Tensor, torch.Tensor], None]


class _Band:
    """The rows of the stitched volume that windows still write to: a ring of ``patch_z`` rows.

    Windows go z-slowest; once every window starting at row ``z`` has been added, the rows below the
    next start are final and leave the ring. Memory is ``K * patch_z * y * x`` in the accumulation
    dtype instead of ``K * z * y * x``.
    """

    def __init__(self, k: int, height: int, yx: tuple[int, int], *, dtype: torch.dtype, device: torch.device):
        self.height = height
        self.values = torch.zeros((k, height, *yx), dtype=dtype, device=device)
        self.weights = torch.zeros((height, *yx), dtype=torch.float32, device=device)
        self.z0 = 0  # the first row the ring holds

    def _pieces(self, z_from: int, z_to: int) -> list[tuple[slice, slice]]:
        """``(ring rows, offsets into [z_from, z_to))``: at most two pieces (the ring wraps)."""
        out = []
        z = z_from
        while z < z_to:
            r = z % self.height
            n = min(z_to - z, self.height - r)
            out.append((slice(r, r + n), slice(z - z_from, z - z_from + n)))
            z += n
        return out

    def add(self, y_kzyx: torch.Tensor, window: tuple[slice, ...], gauss_zyx: torch.Tensor) -> None:
        zs, ys, xs = window
        for ring, local in self._pieces(int(zs.start), int(zs.stop)):
            region = self.values[:, ring, ys, xs]
            g = gauss_zyx[local]
            if region.dtype == torch.float32:
                region.addcmul_(y_kzyx[:, local], g)  # no temporary
            else:  # a float32 temporary of 16 channels at a time, not of all of them
                for k0 in range(0, region.shape[0], 16):
                    region[k0 : k0 + 16] += (y_kzyx[k0 : k0 + 16, local] * g).to(region.dtype)

    def add_weights(self, z_start: int, row_weights: torch.Tensor) -> None:
        """The summed Gaussians of one row of windows (every row tiles y, x alike), once per row."""
        for ring, local in self._pieces(z_start, z_start + row_weights.shape[0]):
            self.weights[ring] += row_weights[local]

    def release(self, z_to: int, emit: Callable[[int, torch.Tensor, torch.Tensor], None]) -> None:
        """Hand rows ``[z0, z_to)`` to ``emit(z_from, sums (K, dz, y, x), weights (dz, y, x))`` as views
        of the ring (one or two pieces), then zero them for the rows to come."""
        for ring, local in self._pieces(self.z0, z_to):
            emit(self.z0 + local.start, self.values[:, ring], self.weights[ring])
            self.values[:, ring] = 0
            self.weights[ring] = 0
        self.z0 = z_to


def divide_slab(sums: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sums / weights`` as a new tensor of ``sums``' dtype (half precision: 16 channels at a time)."""
    sums = sums.clone(memory_format=torch.contiguous_format)
    if sums.dtype == torch.float32:
        return sums.div_(weights)
    # half precision: divide in chunks of channels, no float32 copy of the whole slab
    for k0 in range(0, sums.shape[0], 16):
        chunk = sums[k0 : k0 + 16]
        chunk.copy_((chunk.float() / weights).to(sums.dtype))
    return sums


@torch.inference_mode()
def stitch(
    predict: Callable[[torch.Tensor], torch.Tensor] | Network,
    image_czyx: torch.Tensor,
    settings: SlidingWindowSettings,
    *,
    sink: SlabSink,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Stitch ``predict`` over windows of ``image_czyx`` and hand each finished z-slab to ``sink``.

    Windows go z-slowest; the blend lives in a ring of ``patch_z`` rows (:class:`_Band`), so the
    working memory is that ring, whatever the volume's depth. Slabs arrive in order, cropped to the
    unpadded volume, on ``out_device`` (see :data:`SlabSink`).
    Returns the number of output channels.
    """
    if image_czyx.ndim != 4:
        raise ValueError(f"image must be (C, z, y, x), got shape {tuple(image_czyx.shape)}")
    device = image_czyx.device
    out_device = torch.device(settings.out_device) if settings.out_device else device
    patch = settings.patch_zyx
    shape = tuple(int(s) for s in image_czyx.shape[1:])
    pads = padding_for(shape, patch)
    x = image_czyx
    if any(a or b for a, b in pads):
        flat = [v for a, b in reversed(pads) for v in (a, b)]
        x = torch.nn.functional.pad(x, flat, mode="constant", value=settings.pad_value)
    padded = tuple(int(s) for s in x.shape[1:])
    windows = window_slices(padded, patch, settings.step)
    gauss = gaussian_importance_map(patch, sigma_scale=settings.sigma_scale, device=out_device)
    crop_yx = tuple(slice(a, a + n) for (a, _), n in zip(pads[1:], shape[1:]))
    z_lo, z_hi = pads[0][0], pads[0][0] + shape[0]

    def emit(z_from: int, sums: torch.Tensor, weights: torch.Tensor) -> None:
        a, b = max(z_from, z_lo), min(z_from + sums.shape[1], z_hi)
        if b <= a:
            return
        rows = slice(a - z_from, b - z_from)
        sink(a - z_lo, sums[:, rows, crop_yx[0], crop_yx[1]], weights[rows, *crop_yx])

    rows: dict[int, list[tuple[slice, ...]]] = {}
    for w in windows:
        rows.setdefault(int(w[0].start), []).append(w)
    # every row of windows covers y, x the same way: its summed weights are computed once
    row_weights = torch.zeros((patch[0], padded[1], padded[2]), dtype=torch.float32, device=out_device)
    for w in rows[0]:
        row_weights[:, w[1], w[2]] += gauss
    band: _Band | None = None
    done = 0
    for z_start in sorted(rows):
        if band is not None and z_start > band.z0:
            band.release(z_start, emit)
        for batch in _batches(rows[z_start], settings.batch_size):
            xb = torch.stack([x[(slice(None), *w)] for w in batch])
            with _autocast(device, settings.precision):
                yb = _first_output(predict(xb))
            yb = yb.to(out_device, torch.float32)
            if band is None:
                band = _Band(
                    int(yb.shape[1]),
                    patch[0],
                    (padded[1], padded[2]),
                    dtype=settings.accumulate_dtype,
                    device=out_device,
                )
            if batch[0] is rows[z_start][0]:
                band.add_weights(z_start, row_weights)
            for y, w in zip(yb, batch):
                band.add(y, w, gauss)
            del xb, yb, y  # not alive while the next slab is released
            done += len(batch)
            if progress is not None:
                progress(done, len(windows))
    assert band is not None
    band.release(padded[0], emit)
    return int(band.values.shape[0])


def sliding_window(
    predict: Callable[[torch.Tensor], torch.Tensor] | Network,
    image_czyx: torch.Tensor,
    settings: SlidingWindowSettings,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Stitch ``predict`` over windows of ``image_czyx``: ``(K, z, y, x)`` of the input's spatial shape.

    Args:
        predict: ``(B, C, *patch) -> (B, K, *patch)``: a network (logits are blended) or
            :func:`mirrored_probabilities` of one (probabilities are blended).
        image_czyx: the normalised preprocessed image ``(C, z, y, x)``, on the device the network
            runs on.
        settings: patch, step, Gaussian, batch, padding, precision and output placement.
        progress: called with ``(windows done, windows in all)`` after each batch.

    Returns:
        The Gaussian-weighted mean prediction, ``settings.accumulate_dtype`` on ``out_device``.
        For many classes use :func:`stitch` with a compact sink (``SparseProbabilities``) instead.
    """
    shape = tuple(int(n) for n in image_czyx.shape[1:])
    out: torch.Tensor | None = None

    def into_volume(z0: int, sums: torch.Tensor, weights: torch.Tensor) -> None:
        # each finished slab is divided straight into the output: no copy of the volume afterwards
        nonlocal out
        if out is None:
            out = torch.empty((sums.shape[0], *shape), dtype=sums.dtype, device=sums.device)
        dst = out[:, z0 : z0 + sums.shape[1]]
        if sums.dtype == torch.float32:
            torch.div(sums, weights, out=dst)
            return
        for k0 in range(0, sums.shape[0], 16):
            dst[k0 : k0 + 16] = (sums[k0 : k0 + 16].float() / weights).to(sums.dtype)

    stitch(predict, image_czyx, settings, sink=into_volume, progress=progress)
    assert out is not None
    return out
