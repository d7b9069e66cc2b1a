"""Reading one NIfTI file eagerly, turning every way it can be broken into a :class:`CaseError`."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from multitalent.rawio.cases import CaseError

GZIP_MAGIC = b"\x1f\x8b"


def _gzip_fault(path: Path) -> str | None:
    """Why a gzip file does not decompress, or ``None`` when the whole stream reads cleanly."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    except EOFError:
        return "truncated file: the compressed stream ends early"
    except (OSError, zlib.error) as e:
        return f"truncated or corrupt file: {e}"
    return None


def _format_fault(path: Path, error: Exception) -> str:
    """The reason behind a header that nibabel could not read."""
    size = path.stat().st_size
    if size == 0:
        return "not a NIfTI file: empty (0 bytes)"
    with path.open("rb") as f:
        head = f.read(16)
    if path.name.endswith(".gz"):
        if not head.startswith(GZIP_MAGIC):
            return f"not a NIfTI file: named .gz but not gzip-compressed (starts with {head[:8]!r})"
        fault = _gzip_fault(path)
        if fault is not None:
            return fault
    return f"not a NIfTI file ({error})"


def _gunzip(data: bytes) -> bytes:
    """Decompress every gzip member of ``data`` with ISA-L's inflate (python-isal; several times
    faster than zlib's on the same format)."""
    from isal import isal_zlib

    out: list[bytes] = []
    while data:
        d = isal_zlib.decompressobj(wbits=31)
        out.append(d.decompress(data))
        if not d.eof:
            raise EOFError("compressed stream ends early")
        data = d.unused_data
    return b"".join(out)


def _load_fast(path: Path) -> object | None:
    loaded = _load_fast_raw(path)
    return None if loaded is None else loaded[0]


def _unscaled_view(img: Any, raw: bytes, shape: tuple[int, ...]) -> np.ndarray | None:
    """The voxels as a read-only view of the decompressed bytes, when the header asks for no scaling."""
    proxy = img.dataobj  # nibabel's ArrayProxy: where and how the voxels sit in the file
    if float(proxy.slope) != 1.0 or float(proxy.inter) != 0.0 or getattr(proxy, "order", "F") != "F":
        return None
    dtype, offset, count = np.dtype(proxy.dtype), int(proxy.offset), int(np.prod(shape))
    if offset + count * dtype.itemsize > len(raw):
        return None  # truncated: nibabel's path names the fault
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape, order="F")


def _load_fast_raw(path: Path) -> tuple[Any, bytes] | None:
    """The image decompressed in one go from memory (gzip) or ``None`` to take nibabel's own path.

    nibabel streams ``.nii.gz`` through Python's ``gzip`` module, which dominates reading the
    sparse per-structure masks of the TotalSegmentator layout. Any problem here falls back to
    ``nib.load``, whose errors carry the reasons.
    """
    import nibabel as nib

    if not path.name.endswith(".gz"):
        return None
    try:
        raw = _gunzip(path.read_bytes())
        if len(raw) < 4:
            return None
        sizeof_hdr = int.from_bytes(raw[:4], "little")
        klass = nib.Nifti2Image if sizeof_hdr in (540, 469893120) else nib.Nifti1Image
        return klass.from_bytes(raw), raw
    except Exception:
        return None


def read_volume(path: Path, *, what: str = "image", writeable: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3-D NIfTI volume eagerly.

    Returns ``(array_ijk, affine)``: the voxel array in stored order with the header's scaling
    applied (dtype as nibabel gives it) and the 4x4 float64 affine. A 4th or higher axis is
    squeezed only when all trailing axes are singleton. With ``writeable=False`` an unscaled
    ``.nii.gz`` comes back as a read-only view of its decompressed bytes (no copy; the
    TotalSegmentator masks are read this way).

    Raises:
        CaseError: missing file, not NIfTI, truncated/corrupt data, or not 3-D. ``what`` names the
            role of the file in the message ("image", "label", "mask 'liver'").
    """
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError

    path = Path(path)
    if not path.is_file():
        raise CaseError(path, f"missing {what} file")
    fast = _load_fast_raw(path)
    img: Any = None if fast is None else fast[0]
    if img is None:
        try:
            img = nib.load(path)
        except (ImageFileError, HeaderDataError, EOFError, OSError, zlib.error, ValueError) as e:
            raise CaseError(path, _format_fault(path, e)) from None
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image is a subclass
        raise CaseError(path, f"not a NIfTI file (nibabel reads it as {type(img).__name__})")

    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3:
        raise CaseError(path, f"{len(shape)}-D {what} of shape {shape}; expected 3-D")
    if len(shape) > 3 and any(s != 1 for s in shape[3:]):
        raise CaseError(
            path,
            f"{len(shape)}-D {what} of shape {shape}; expected 3-D "
            "(only singleton axes after the third are accepted)",
        )
    if fast is not None and not writeable:
        view = _unscaled_view(img, fast[1], shape)
        if view is not None:
            return view.reshape(shape[:3], order="F"), np.asarray(img.affine, dtype=np.float64)
    try:
        array = np.asarray(img.dataobj)
    except (EOFError, OSError, zlib.error, ValueError) as e:
        if isinstance(e, EOFError):
            raise CaseError(path, "truncated file: the compressed stream ends early") from None
        raise CaseError(path, f"truncated or corrupt file: {e}") from None
    return array.reshape(shape[:3]), np.asarray(img.affine, dtype=np.float64)
