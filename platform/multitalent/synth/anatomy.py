"""A small CT-like torso defined in world millimetres (RAS+: +x right, +y anterior, +z superior).

The anatomy is sampled once per case (:func:`sample_anatomy`) and then rendered on any voxel grid
(:func:`render_tissues`), so datasets with different spacings and orientations image the same body.
Rendering yields a tissue map; label maps are lookups of that map (one protocol per dataset, see
``collection.py``) and the CT image is a lookup of HU values plus blur and noise
(:func:`tissues_to_hu`). The torso is about 64 x 48 mm across and 120 mm long: a scaled-down body
whose organs stay many voxels wide at 1-3 mm spacing.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from itertools import product

import numpy as np


class Tissue(IntEnum):
    AIR = 0
    FAT = 1
    SOFT = 2
    LUNG_LEFT = 3
    LUNG_RIGHT = 4
    HEART = 5
    AORTIC_ROOT = 6
    AORTA_THORACIC = 7
    AORTA_ABDOMINAL = 8
    LIVER = 9
    LIVER_TUMOUR = 10
    SPLEEN = 11
    STOMACH = 12
    STOMACH_GAS = 13
    KIDNEY_LEFT = 14
    KIDNEY_RIGHT = 15
    KIDNEY_TUMOUR_LEFT = 16
    KIDNEY_TUMOUR_RIGHT = 17
    BLADDER = 18
    VERTEBRA = 19
    DISC = 20


# (mean HU, texture noise sd HU): a contrast-enhanced, portal-venous-like phase.
TISSUE_HU: dict[Tissue, tuple[float, float]] = {
    Tissue.AIR: (-1000.0, 6.0),
    Tissue.FAT: (-100.0, 12.0),
    Tissue.SOFT: (45.0, 12.0),
    Tissue.LUNG_LEFT: (-850.0, 30.0),
    Tissue.LUNG_RIGHT: (-850.0, 30.0),
    Tissue.HEART: (130.0, 14.0),
    Tissue.AORTIC_ROOT: (200.0, 14.0),
    Tissue.AORTA_THORACIC: (200.0, 14.0),
    Tissue.AORTA_ABDOMINAL: (200.0, 14.0),
    Tissue.LIVER: (105.0, 10.0),
    Tissue.LIVER_TUMOUR: (45.0, 14.0),
    Tissue.SPLEEN: (125.0, 10.0),
    Tissue.STOMACH: (20.0, 8.0),
    Tissue.STOMACH_GAS: (-900.0, 25.0),
    Tissue.KIDNEY_LEFT: (180.0, 14.0),
    Tissue.KIDNEY_RIGHT: (180.0, 14.0),
    Tissue.KIDNEY_TUMOUR_LEFT: (70.0, 14.0),
    Tissue.KIDNEY_TUMOUR_RIGHT: (70.0, 14.0),
    Tissue.BLADDER: (10.0, 8.0),
    Tissue.VERTEBRA: (450.0, 40.0),
    Tissue.DISC: (90.0, 12.0),
}

# Nominal world extent the anatomy lives in (mm), used for the scan field of view.
FOV_MM = {"x": (-36.0, 36.0), "y": (-28.0, 28.0), "z": (-60.0, 60.0)}


@dataclass(frozen=True)
class Blob:
    """An ellipsoid whose radius is modulated by a few low-frequency waves over the direction."""

    centre_mm: tuple[float, float, float]
    semi_axes_mm: tuple[float, float, float]
    waves: tuple[tuple[float, float, float, float, float], ...] = ()  # (kx, ky, kz, amplitude, phase)

    def bounds_mm(self) -> tuple[np.ndarray, np.ndarray]:
        reach = (1.0 + sum(abs(w[3]) for w in self.waves)) * np.asarray(self.semi_axes_mm)
        return np.asarray(self.centre_mm) - reach, np.asarray(self.centre_mm) + reach

    def inside(self, xyz: np.ndarray) -> np.ndarray:
        """``xyz``: (3, ...) world mm -> bool mask of the same spatial shape."""
        shape = xyz.shape[1:]
        u = (xyz.reshape(3, -1) - np.asarray(self.centre_mm)[:, None]) / np.asarray(self.semi_axes_mm)[
            :, None
        ]
        r = np.sqrt((u**2).sum(axis=0))
        reach = 1.0 + sum(abs(w[3]) for w in self.waves)
        mask = r <= reach
        if self.waves:
            # Only points that could be inside pay for the direction-dependent radius.
            idx = np.flatnonzero(mask)
            rc = r[idx]
            n = u[:, idx] / np.maximum(rc, 1e-6)
            bound = np.ones_like(rc)
            for kx, ky, kz, amplitude, phase in self.waves:
                bound += amplitude * np.cos(kx * n[0] + ky * n[1] + kz * n[2] + phase)
            mask[idx] = rc <= bound
        return mask.reshape(shape)


@dataclass(frozen=True)
class Tube:
    """A polyline of constant radius."""

    points_mm: tuple[tuple[float, float, float], ...]
    radius_mm: float

    def bounds_mm(self) -> tuple[np.ndarray, np.ndarray]:
        points = np.asarray(self.points_mm)
        return points.min(axis=0) - self.radius_mm, points.max(axis=0) + self.radius_mm

    def inside(self, xyz: np.ndarray) -> np.ndarray:
        flat = xyz.reshape(3, -1)
        best = np.full(flat.shape[1], np.inf)
        for a, b in zip(np.asarray(self.points_mm)[:-1], np.asarray(self.points_mm)[1:]):
            d = (b - a)[:, None]
            t = np.clip(((flat - a[:, None]) * d).sum(axis=0) / float((d**2).sum()), 0.0, 1.0)
            best = np.minimum(best, ((flat - a[:, None] - t * d) ** 2).sum(axis=0))
        return (best <= self.radius_mm**2).reshape(xyz.shape[1:])


@dataclass(frozen=True)
class Anatomy:
    """One case's body: every shape in world mm."""

    body_semi_axes_mm: tuple[float, float]
    fat_mm: float
    diaphragm_z_mm: float
    organs: dict[Tissue, Blob]
    liver_tumour: Blob | None
    kidney_tumour: Blob | None
    kidney_tumour_side: Tissue
    aorta_descending: Tube  # from the bifurcation up to the arch; split at the diaphragm when rendered
    aorta_arch: Tube  # arch and ascending aorta down to the root
    aortic_root: Tube  # the last centimetre before the heart
    spine_centre_mm: tuple[float, float]
    spine_radius_mm: float
    disc_period_mm: float
    disc_phase_mm: float


def _vec3(v: np.ndarray) -> tuple[float, float, float]:
    return (float(v[0]), float(v[1]), float(v[2]))


def _blob(
    rng: np.random.Generator,
    centre: tuple[float, float, float],
    semi: tuple[float, float, float],
    *,
    jitter_mm: float = 1.5,
    size_range: tuple[float, float] = (0.88, 1.12),
    waviness: float = 0.07,
) -> Blob:
    c = _vec3(np.asarray(centre) + rng.normal(0.0, jitter_mm, 3))
    s = _vec3(np.asarray(semi) * rng.uniform(*size_range, 3))
    waves = []
    for _ in range(3):
        kx, ky, kz = rng.normal(0.0, 2.0, 3)
        waves.append(
            (float(kx), float(ky), float(kz), float(rng.uniform(0.0, waviness)), float(rng.uniform(0, 6.3)))
        )
    return Blob(c, s, tuple(waves))


def sample_anatomy(rng: np.random.Generator, *, force_tumours: bool = False) -> Anatomy:
    """Draw one case: organ positions and sizes vary by a few mm and about +-12 %.

    Tumours appear in ~80 % of cases (always with ``force_tumours``), inside the liver and inside
    one kidney.
    """
    shift = rng.normal(0.0, [1.5, 1.0, 3.0])
    sx, sy = rng.uniform(0.94, 1.06, 2)

    def at(x: float, y: float, z: float) -> tuple[float, float, float]:
        return (float(x * sx + shift[0]), float(y * sy + shift[1]), float(z + shift[2]))

    diaphragm = float(4.0 + shift[2] + rng.normal(0.0, 1.5))
    organs = {
        Tissue.LUNG_RIGHT: _blob(rng, at(16, -2, 32), (10, 14, 26), waviness=0.04),
        Tissue.LUNG_LEFT: _blob(rng, at(-16, -2, 32), (10, 14, 26), waviness=0.04),
        Tissue.LIVER: _blob(rng, at(13, 2, -10), (15, 16, 13)),
        Tissue.SPLEEN: _blob(rng, at(-20, -8, -8), (6, 8, 9)),
        Tissue.STOMACH: _blob(rng, at(-10, 9, -6), (8, 7, 8)),
        Tissue.KIDNEY_RIGHT: _blob(rng, at(15, -11, -26), (5.5, 6, 10), jitter_mm=1.0),
        Tissue.KIDNEY_LEFT: _blob(rng, at(-15, -11, -26), (5.5, 6, 10), jitter_mm=1.0),
        Tissue.BLADDER: _blob(rng, at(0, 4, -46), (9, 8, 7)),
        Tissue.HEART: _blob(rng, at(-3, 6, 20), (12, 10, 10.5), jitter_mm=1.0, waviness=0.04),
    }
    stomach = organs[Tissue.STOMACH]
    gas_centre = np.asarray(stomach.centre_mm) + np.array([0.0, 0.5, 0.55]) * np.asarray(stomach.semi_axes_mm)
    organs[Tissue.STOMACH_GAS] = Blob(_vec3(gas_centre), (4.0, 3.0, 3.0))

    def tumour(host: Blob, radius_range: tuple[float, float]) -> Blob | None:
        if not force_tumours and rng.random() > 0.8:
            return None
        offset = rng.uniform(-0.3, 0.3, 3) * np.asarray(host.semi_axes_mm)
        r = float(rng.uniform(*radius_range))
        return _blob(rng, _vec3(np.asarray(host.centre_mm) + offset), (r, r, r), jitter_mm=0.0)

    liver_tumour = tumour(organs[Tissue.LIVER], (4.5, 7.0))
    side = Tissue.KIDNEY_LEFT if rng.random() < 0.5 else Tissue.KIDNEY_RIGHT
    kidney_tumour = tumour(organs[side], (4.0, 5.5))

    heart = organs[Tissue.HEART]
    heart_top = heart.centre_mm[2] + heart.semi_axes_mm[2]
    ax, ay = float(-6 * sx + shift[0]), float(-6 * sy + shift[1])  # descending aorta, left of the spine
    cx, cy = float(heart.centre_mm[0] + 3.0), float(heart.centre_mm[1] - 1.0)  # ascending aorta
    arch_z = float(heart_top + 16.0)
    radius = float(rng.uniform(4.2, 4.8))
    descending = Tube(((ax, ay, -40.0), (ax, ay, arch_z - 5.0)), radius)  # bifurcates at ~L4
    arch = Tube(
        (
            (ax, ay, arch_z - 5.0),
            ((ax + cx) / 2, (ay + cy) / 2, arch_z + 2.0),
            (cx, cy, arch_z - 3.0),
            (cx, cy, heart_top + 6.0),
        ),
        radius,
    )
    root = Tube(((cx, cy, heart_top + 6.0), (cx - 0.5, cy, heart_top - 3.0)), radius)
    return Anatomy(
        body_semi_axes_mm=(float(32.0 * sx), float(24.0 * sy)),
        fat_mm=float(rng.uniform(2.5, 3.5)),
        diaphragm_z_mm=diaphragm,
        organs=organs,
        liver_tumour=liver_tumour,
        kidney_tumour=kidney_tumour,
        kidney_tumour_side=side,
        aorta_descending=descending,
        aorta_arch=arch,
        aortic_root=root,
        spine_centre_mm=(float(shift[0]), float(-16.0 * sy + shift[1])),
        spine_radius_mm=float(rng.uniform(5.2, 6.0)),
        disc_period_mm=float(rng.uniform(13.0, 15.0)),
        disc_phase_mm=float(rng.uniform(0.0, 14.0)),
    )


def _voxel_box(
    shape_ijk: tuple[int, ...], inverse_affine: np.ndarray, lo_mm: np.ndarray, hi_mm: np.ndarray
) -> tuple[slice, ...]:
    """Voxel slices covering the world box ``[lo, hi]`` (conservative for any affine)."""
    corners = np.array(list(product(*zip(lo_mm, hi_mm)))).T
    ijk = inverse_affine[:3, :3] @ corners + inverse_affine[:3, 3:4]
    first = np.floor(ijk.min(axis=1)).astype(np.int64)
    last = np.ceil(ijk.max(axis=1)).astype(np.int64) + 1
    return tuple(slice(int(max(0, a)), int(min(n, b))) for a, b, n in zip(first, last, shape_ijk))


def render_tissues(anatomy: Anatomy, shape_ijk: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """Tissue map (uint8 :class:`Tissue` values, shape ``shape_ijk``) of the voxel grid ``affine``.

    Later structures are painted over earlier ones, so where shapes touch the priority is:
    body < lungs < abdominal organs < heart < aorta < tumours < spine. Each shape is evaluated only
    inside its bounding box.
    """
    from multitalent.synth.geometry import world_coordinates

    xyz = world_coordinates(shape_ijk, affine)
    inverse = np.linalg.inv(affine)
    x, y, z = xyz
    tissue = np.zeros(shape_ijk, dtype=np.uint8)
    ax, ay = anatomy.body_semi_axes_mm
    body_r = np.sqrt((x / ax) ** 2 + (y / ay) ** 2)
    body = body_r <= 1.0
    tissue[body] = Tissue.SOFT
    tissue[body & (body_r > 1.0 - anatomy.fat_mm / min(ax, ay))] = Tissue.FAT
    diaphragm = anatomy.diaphragm_z_mm

    def paint(
        shape: Blob | Tube,
        value: Tissue,
        *,
        above: float | None = None,
        below: float | None = None,
        only: tuple[Tissue, ...] = (),
    ) -> None:
        box = _voxel_box(shape_ijk, inverse, *shape.bounds_mm())
        if any(b.stop <= b.start for b in box):
            return
        sub = xyz[(slice(None), *box)]
        mask = shape.inside(sub) & body[box]
        if above is not None:
            mask &= sub[2] > above
        if below is not None:
            mask &= sub[2] <= below
        if only:
            mask &= np.isin(tissue[box], only)
        tissue[box][mask] = value

    organs = anatomy.organs
    paint(organs[Tissue.LUNG_LEFT], Tissue.LUNG_LEFT, above=diaphragm)
    paint(organs[Tissue.LUNG_RIGHT], Tissue.LUNG_RIGHT, above=diaphragm)
    for organ in (Tissue.LIVER, Tissue.SPLEEN, Tissue.STOMACH, Tissue.KIDNEY_LEFT, Tissue.KIDNEY_RIGHT):
        paint(organs[organ], organ, below=diaphragm)
    paint(organs[Tissue.STOMACH_GAS], Tissue.STOMACH_GAS, only=(Tissue.STOMACH,))
    paint(organs[Tissue.BLADDER], Tissue.BLADDER)
    paint(organs[Tissue.HEART], Tissue.HEART, above=diaphragm)
    paint(anatomy.aorta_descending, Tissue.AORTA_ABDOMINAL, below=diaphragm)
    paint(anatomy.aorta_descending, Tissue.AORTA_THORACIC, above=diaphragm)
    paint(anatomy.aorta_arch, Tissue.AORTA_THORACIC)
    paint(anatomy.aortic_root, Tissue.AORTIC_ROOT)
    if anatomy.liver_tumour is not None:
        paint(anatomy.liver_tumour, Tissue.LIVER_TUMOUR, only=(Tissue.LIVER,))
    if anatomy.kidney_tumour is not None:
        side = anatomy.kidney_tumour_side
        target = Tissue.KIDNEY_TUMOUR_LEFT if side == Tissue.KIDNEY_LEFT else Tissue.KIDNEY_TUMOUR_RIGHT
        paint(anatomy.kidney_tumour, target, only=(side,))

    sx, sy = anatomy.spine_centre_mm
    column = (x - sx) ** 2 + (y - sy) ** 2 <= anatomy.spine_radius_mm**2
    disc = np.abs(np.mod(z - anatomy.disc_phase_mm, anatomy.disc_period_mm)) < 3.0
    tissue[column & body & ~disc] = Tissue.VERTEBRA
    tissue[column & body & disc] = Tissue.DISC
    return tissue


def tissues_to_hu(
    tissue: np.ndarray,
    rng: np.random.Generator,
    *,
    blur_voxels: float = 0.6,
    noise_hu: float = 6.0,
    hu_offset: float = 0.0,
) -> np.ndarray:
    """CT-like float32 HU image: tissue means blurred (partial volume), plus per-tissue texture noise,
    scanner noise of ``noise_hu`` sd and a calibration offset, clipped to the scanner range."""
    from scipy.ndimage import gaussian_filter

    mean_lut = np.zeros(256, dtype=np.float32)
    sd_lut = np.zeros(256, dtype=np.float32)
    for t, (mean, sd) in TISSUE_HU.items():
        mean_lut[t], sd_lut[t] = mean, sd
    hu = gaussian_filter(mean_lut[tissue], sigma=blur_voxels, mode="nearest")
    # Texture: smoothed noise scaled per tissue, so organs look grainy rather than flat.
    texture = gaussian_filter(rng.standard_normal(tissue.shape).astype(np.float32), sigma=0.8)
    texture *= 1.0 / max(float(texture.std()), 1e-6)
    hu += texture * sd_lut[tissue]
    hu += rng.normal(0.0, noise_hu, tissue.shape).astype(np.float32) + np.float32(hu_offset)
    return np.clip(hu, -1024.0, 3071.0).astype(np.float32)
