"""Spatial part of the batch augmentation: rotation, scaling and mirroring as one affine per sample.

Convention (voxel units, axes z, y, x): output voxel ``p`` reads input position
``q = M (p - c_out) + c_out + offset``, where ``c_out = (out - 1) / 2`` is the centre of the output
patch and ``offset = (in - out) // 2`` places it in the middle of the input patch, so a sample
without rotation or scaling is exactly the integer centre crop. ``M = Q_x Q_y Q_z S F``: ``F`` the
mirroring (applied to the output, as nnU-Net mirrors last), ``S`` the isotropic scaling (nnU-Net's
semantics: it multiplies sampling coordinates) and ``Q_a`` the sampling rotation about axis ``a``.
A rotation by +90° about z equals ``torch.rot90(dims=(y, x))``, about y ``rot90(dims=(x, z))``, about
x ``rot90(dims=(z, y))`` (each from the next axis in the cycle z→y→x→z towards the one after).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from multitalent.data.augment_params import AugmentParams

# (u, v) plane of the rotation about z, y, x: Q[u, u] = cos, Q[u, v] = sin, Q[v, u] = -sin, Q[v, v] = cos
_ROTATION_PLANES = ((1, 2), (2, 0), (0, 1))


def sampling_matrices(params: AugmentParams) -> torch.Tensor:
    """float64 (B, 3, 3): ``M`` of each sample in z, y, x voxel coordinates (see the module docstring)."""
    batch = params.batch_size
    m = torch.eye(3, dtype=torch.float64).repeat(batch, 1, 1)
    flips = 1.0 - 2.0 * params.mirror_b3.to(torch.float64)
    m = m * flips[:, None, :]  # F: flip columns
    m = m * params.scale_factor_b.to(torch.float64)[:, None, None]  # S is isotropic
    for axis, (u, v) in enumerate(_ROTATION_PLANES):
        angle = params.rotation_rad_b3[:, axis].to(torch.float64)
        q = torch.eye(3, dtype=torch.float64).repeat(batch, 1, 1)
        cos, sin = torch.cos(angle), torch.sin(angle)
        q[:, u, u], q[:, u, v], q[:, v, u], q[:, v, v] = cos, sin, -sin, cos
        m = q @ m
    return m


def affine_grid_theta(
    matrices_b33: torch.Tensor, *, in_shape_zyx: tuple[int, ...], out_shape_zyx: tuple[int, ...]
) -> torch.Tensor:
    """float32 (B, 3, 4) for ``F.affine_grid(align_corners=False)``: normalised output x, y, z -> input.

    With normalised coordinates ``u = (2 p + 1) / size - 1`` the voxel map of the module docstring
    becomes ``u_in = diag(1/in) M diag(out) u_out + (out + 2 offset - in) / in``; affine_grid wants
    the axes in x, y, z order, hence the reversal.
    """
    size_in = torch.tensor(in_shape_zyx, dtype=torch.float64)
    size_out = torch.tensor(out_shape_zyx, dtype=torch.float64)
    offset = torch.div(size_in - size_out, 2, rounding_mode="floor")
    a = matrices_b33 * size_out[None, None, :] / size_in[None, :, None]
    t = (size_out + 2 * offset - size_in) / size_in
    theta = torch.empty((matrices_b33.shape[0], 3, 4), dtype=torch.float64)
    theta[:, :, :3] = a.flip(1).flip(2)
    theta[:, :, 3] = t.flip(0)[None, :]
    return theta.float()


def affine_grid(theta_b34: torch.Tensor, *, out_shape_zyx: tuple[int, int, int]) -> torch.Tensor:
    """Same as ``F.affine_grid(theta, (B, 1, *out), align_corners=False)``, (B, Z, Y, X, 3) x-y-z last.

    An affine map is a sum of one term per output axis, so each coordinate is two broadcast adds of
    short vectors instead of a (B, ZYX, 4) @ (4, 3) matmul: 2-3x faster on the CPU.
    """
    n = theta_b34.shape[0]
    depth, height, width = out_shape_zyx
    theta = theta_b34.to(torch.float32)
    device = theta.device
    u_x, u_y, u_z = (
        (2 * torch.arange(s, dtype=torch.float32, device=device) + 1) / s - 1 for s in (width, height, depth)
    )
    grid = torch.empty((n, depth, height, width, 3), dtype=torch.float32, device=device)
    for k in range(3):
        along_z = theta[:, k, 2, None] * u_z[None, :] + theta[:, k, 3, None]
        along_y = theta[:, k, 1, None] * u_y[None, :]
        along_x = theta[:, k, 0, None] * u_x[None, :]
        torch.add(
            (along_z[:, :, None] + along_y[:, None, :])[..., None],
            along_x[:, None, None, :],
            out=grid[..., k],
        )
    return grid


def _axis_aligned_sample(
    image_czyx: torch.Tensor,
    label_zyx: torch.Tensor,
    *,
    scale: float,
    flips: list[bool],
    out_shape_zyx: tuple[int, int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaling (and mirroring) without rotation, one axis at a time.

    A diagonal ``M`` makes trilinear interpolation separable: three 1-D linear passes (two
    gathers and a weighted sum each) give the same numbers as ``grid_sample`` at a fraction
    of the cost, and the volume shrinks after each pass. Labels take the nearest index per axis.
    Outside the input: weight 0 for the image, label 0, as with ``grid_sample(padding_mode="zeros")``.
    """
    device = image_czyx.device
    for axis in range(3):
        size_in, size_out = int(image_czyx.shape[1 + axis]), out_shape_zyx[axis]
        centre = (size_out - 1) / 2
        p = torch.arange(size_out, dtype=torch.float64)
        q = (-scale if flips[axis] else scale) * (p - centre) + centre + (size_in - size_out) // 2
        low = torch.floor(q)
        frac = q - low
        view = [1, 1, 1, 1]
        view[1 + axis] = size_out
        weights = []
        samples = []
        for index, weight in ((low, 1.0 - frac), (low + 1, frac)):
            inside = (index >= 0) & (index <= size_in - 1)
            idx = index.clamp(0, size_in - 1).long().to(device, non_blocking=True)
            # advanced indexing: several times faster than index_select on the CPU (torch 2.x)
            samples.append(image_czyx[(slice(None),) * (1 + axis) + (idx,)])
            weights.append((weight * inside).to(device=device, dtype=image_czyx.dtype, non_blocking=True))
        image_czyx = samples[0].mul_(weights[0].view(view)).addcmul_(samples[1], weights[1].view(view))
        nearest = torch.round(q)
        inside = ((nearest >= 0) & (nearest <= size_in - 1)).to(device, non_blocking=True)
        idx = nearest.clamp(0, size_in - 1).long().to(device, non_blocking=True)
        label_zyx = label_zyx[(slice(None),) * axis + (idx,)] * inside.view(view[1:]).to(label_zyx.dtype)
    return image_czyx, label_zyx


def apply_spatial(
    image_bczyx: torch.Tensor,
    label_bzyx: torch.Tensor,
    params: AugmentParams,
    *,
    out_shape_zyx: tuple[int, int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """New tensors of spatial size ``out_shape_zyx``.

    - rotated samples: one grid and one ``grid_sample`` call per tensor for all of them (image
      trilinear, labels nearest, zeros outside the input);
    - scaled but not rotated: separable 1-D interpolation, same result (:func:`_axis_aligned_sample`);
    - neither: crop (and flip), so identity parameters return the input's centre crop bit for bit.
    """
    batch, channels = image_bczyx.shape[:2]
    in_shape = tuple(int(s) for s in image_bczyx.shape[2:])
    device = image_bczyx.device
    out_image = torch.empty((batch, channels, *out_shape_zyx), dtype=image_bczyx.dtype, device=device)
    out_label = torch.empty((batch, *out_shape_zyx), dtype=label_bzyx.dtype, device=device)

    offsets = [(i - o) // 2 for i, o in zip(in_shape, out_shape_zyx)]
    crop = tuple(slice(off, off + o) for off, o in zip(offsets, out_shape_zyx))
    for b in range(batch):
        if bool(params.rotate_b[b]):
            continue
        flips = [bool(f) for f in params.mirror_b3[b]]
        if bool(params.scale_b[b]):
            img, lab = _axis_aligned_sample(
                image_bczyx[b],
                label_bzyx[b],
                scale=float(params.scale_factor_b[b]),
                flips=flips,
                out_shape_zyx=out_shape_zyx,
            )
            out_image[b], out_label[b] = img, lab
            continue
        # flip of a view is one copy; the label flips the same axes shifted by the missing channel axis
        flip_axes = [a for a in range(3) if flips[a]]
        img = image_bczyx[b][(slice(None), *crop)]
        lab = label_bzyx[b][crop]
        out_image[b] = img.flip([a + 1 for a in flip_axes]) if flip_axes else img
        out_label[b] = lab.flip(flip_axes) if flip_axes else lab

    idx = torch.nonzero(params.rotate_b).flatten()
    if idx.numel() == 0:
        return out_image, out_label
    theta = affine_grid_theta(
        sampling_matrices(params)[idx], in_shape_zyx=in_shape, out_shape_zyx=out_shape_zyx
    ).to(device, non_blocking=True)
    first, n = int(idx[0]), idx.numel()
    contiguous = int(idx[-1]) - first + 1 == n  # a run of the batch: a view, no copy of the inputs
    idx_dev = idx.to(device, non_blocking=True)
    src_image = image_bczyx[first : first + n] if contiguous else image_bczyx[idx_dev]
    src_label = label_bzyx[first : first + n] if contiguous else label_bzyx[idx_dev]
    grid = affine_grid(theta, out_shape_zyx=out_shape_zyx)
    warped = F.grid_sample(src_image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # float32 holds label values exactly (< 2**24); nearest picks one input value per voxel or 0 outside
    warped_label = F.grid_sample(
        src_label[:, None].to(torch.float32), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )[:, 0]
    if contiguous:
        out_image[first : first + n] = warped
        out_label[first : first + n] = warped_label.round_()
    else:
        out_image[idx_dev] = warped
        out_label[idx_dev] = warped_label.round_().to(label_bzyx.dtype)
    return out_image, out_label
