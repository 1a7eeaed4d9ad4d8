"""univ: the CLIP-Driven Universal Model for CT segmentation, from Python.

The Rust engine of the ``univ`` command line, one ``pip install`` away::

    import univ
    model = univ.Model.load()                      # the demo model; "unet" for the official one
    seg = model.segment("ct.nii.gz")               # or an array (HU) with its 4x4 RAS affine
    seg.label_map, seg.affine, seg.mask("liver"), seg.report["classes"]
    seg.save("out")                                # the files of `univ segment`

See docs/python.md for nibabel, MONAI and 3D Slicer.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _univ
from . import clip

__all__ = ["Model", "Segmentation", "Error", "read_volume", "evaluate", "clip", "__version__"]
__version__: str = _univ.__version__

#: Every error of univ that is neither a missing file (``FileNotFoundError``) nor a bad
#: argument (``ValueError``); its message is the Rust error with its causes.
Error = _univ.Error

PathLike = Union[str, "os.PathLike[str]"]


def _grid(flat: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    # univ's volumes are stored first axis fastest (NIfTI's order): a view, no copy.
    return flat.reshape(tuple(shape), order="F")


def _is_path(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


class Segmentation:
    """The result of :meth:`Model.segment`, on the input's grid."""

    def __init__(self, inner: Any) -> None:
        self._s = inner
        flat, self._shape = inner.label_map()
        #: The label map (uint8, indexed like the input): class ids, 0 elsewhere; tumours and
        #: cysts over their organ.
        self.label_map: np.ndarray = _grid(flat, self._shape)
        #: The 4x4 voxel-to-RAS affine (mm) of the label map: the input's.
        self.affine: np.ndarray = inner.affine()
        #: The computed classes: id, name, slug, kind, voxels, volume_ml.
        self.classes: List[Dict[str, Any]] = json.loads(inner.classes_json())
        self._report: Optional[Dict[str, Any]] = None

    def mask(self, name_or_id: Union[str, int]) -> np.ndarray:
        """One class's mask (bool, on the input's grid), by name (``"liver"``) or id (6)."""
        return _grid(self._s.mask(name_or_id), self._shape)

    def probabilities(self, name_or_id: Union[str, int]) -> np.ndarray:
        """One class's probabilities (float32 in 0..1, steps of 1/255); needs
        ``segment(..., probabilities=True)``."""
        return _grid(self._s.probabilities(name_or_id), self._shape)

    @property
    def report(self) -> Dict[str, Any]:
        """The content of ``report.json``: per class voxels, volume (mL), mean and median HU
        and bounding box; lesions; checkpoint, settings and timings."""
        if self._report is None:
            self._report = json.loads(self._s.report_json())
        return self._report

    def save(
        self,
        folder: PathLike,
        per_class: bool = False,
        dicom_seg: bool = False,
        overwrite: bool = False,
    ) -> None:
        """Writes the files of ``univ segment`` into ``folder`` (which must not exist, be
        empty, or hold an earlier univ result with ``overwrite``): ``segmentation.nii.gz``,
        ``classes.json``, ``report.json``, ``preview.png``; ``masks/`` with ``per_class``,
        ``probabilities/`` when they were kept, ``segmentation.dcm`` with ``dicom_seg`` (a
        DICOM series input). The folder appears only when complete."""
        self._s.save(os.fspath(folder), per_class, dicom_seg, overwrite)

    def __repr__(self) -> str:
        return f"Segmentation(shape={tuple(self._shape)}, classes={len(self.classes)})"


class Model:
    """A Universal Model (U-Net or Swin UNETR backbone with the text-driven head)."""

    def __init__(self, inner: Any) -> None:
        self._m = inner
        #: The class table: id, name, slug, kind, and whether the checkpoint was trained on it.
        self.classes: List[Dict[str, Any]] = json.loads(inner.classes_json())
        path, sha, demo = inner.checkpoint()
        #: The checkpoint file, its SHA-256, and whether it is a demonstration model.
        self.checkpoint: str = path
        self.sha256: str = sha
        self.demo: bool = demo

    @staticmethod
    def load(
        checkpoint: Optional[PathLike] = None,
        device: str = "cpu",
        threads: Optional[int] = None,
    ) -> "Model":
        """Loads a model: ``None`` is the small demo model (not for clinical use),
        ``"unet"`` / ``"swinunetr"`` the official checkpoints (the hf-hub cache the command
        line uses, downloaded on first use), else a ``.pth`` / ``.safetensors`` path.
        ``threads``: worker threads for this model (default: every core)."""
        ck = None if checkpoint is None else os.fspath(checkpoint)
        return Model(_univ.Model.load(ck, device, threads))

    def segment(
        self,
        input: Union[PathLike, np.ndarray],
        affine: Optional[np.ndarray] = None,
        classes: Optional[Sequence[Union[str, int]]] = None,
        overlap: float = 0.5,
        postprocess: bool = True,
        probabilities: bool = False,
        progress: Optional[Callable[[int, int], Any]] = None,
    ) -> Segmentation:
        """Segments a CT: ``input`` is a path (NIfTI file or DICOM series folder), or a 3-D
        array in HU with its 4x4 voxel-to-RAS ``affine`` (as nibabel gives them). ``classes``
        limits the classes (names or ids); ``progress(done, total)`` is called after each
        window. Runs without the GIL; Ctrl-C stops it at the next window."""
        names = None if classes is None else ",".join(str(c) for c in classes)
        if _is_path(input):
            arg: Any = os.fspath(input)
        else:
            arg = np.asarray(input)
            if arg.ndim != 3:
                raise ValueError(f"input: expected a 3-D array, got {arg.ndim} dimensions")
            if arg.dtype.kind not in "fiu":
                raise ValueError(f"input: expected numbers (HU), got dtype {arg.dtype}")
            if affine is not None:
                affine = np.asarray(affine, dtype=np.float64)
        return Segmentation(
            self._m.segment(arg, affine, names, overlap, postprocess, probabilities, progress)
        )

    def __repr__(self) -> str:
        return f"Model({self.checkpoint!r}, classes={len(self.classes)}, demo={self.demo})"


def read_volume(path: PathLike) -> Tuple[np.ndarray, np.ndarray]:
    """Reads a NIfTI file or DICOM series: (voxels in HU as float32, 4x4 voxel-to-RAS
    affine), indexed like nibabel's ``img.get_fdata()``."""
    flat, shape, affine = _univ.read_volume(os.fspath(path))
    return _grid(flat, shape), affine


def evaluate(
    pred: Union[PathLike, np.ndarray],
    gt: Union[PathLike, np.ndarray],
    spacing: Optional[Sequence[float]] = None,
) -> Dict[str, Any]:
    """The metrics of ``univ evaluate`` between two label maps (paths, or arrays of one
    shape with ``spacing`` in mm, default 1 mm): per label Dice, official Dice, NSD at 1 and
    3 mm and HD95 (inf and NaN as strings, as in the JSON)."""

    def arg(x: Any) -> Any:
        return os.fspath(x) if _is_path(x) else np.asarray(x)

    sp = None if spacing is None else [float(s) for s in spacing]
    return json.loads(_univ.evaluate(arg(pred), arg(gt), sp))
