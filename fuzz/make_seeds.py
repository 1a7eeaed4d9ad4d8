#!/usr/bin/env python3
"""Seeds for the fuzz targets.

    python3 fuzz/make_seeds.py crafted tests/fuzz   # small inputs made here (committed)
    python3 fuzz/make_seeds.py shared  fuzz/corpus  # from ../shared/data, at run time only

`crafted` writes inputs made from nothing but this script (ours, committed under tests/fuzz).
`shared` copies or derives seeds from the real files in ../shared/data: the pydicom and
TotalSegmentator files could be committed by their licences but are large; the Universal
Model's own files (CC BY-NC-ND) must never be, so all of them stay in the ignored fuzz/corpus.
Needs numpy and pydicom (pip install numpy pydicom).
"""
import gzip
import io
import json
import os
import pickle
import struct
import sys
import types
import zipfile

import numpy as np

SEP = b"=UNIV-NEXT-SLICE="


def put(root, target, name, data):
    d = os.path.join(root, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def nifti1(shape, dtype_code, bitpix, data, qform=True, sform=False, slope=0.0, ext=b""):
    """A NIfTI-1 single file (.nii): header, optional extension, voxels."""
    h = bytearray(348)
    struct.pack_into("<i", h, 0, 348)
    dims = [len(shape)] + list(shape) + [1] * (7 - len(shape))
    struct.pack_into("<8h", h, 40, *dims)
    struct.pack_into("<h", h, 70, dtype_code)
    struct.pack_into("<h", h, 72, bitpix)
    struct.pack_into("<8f", h, 76, 1.0, 1.5, 2.0, 3.0, 1.0, 1.0, 1.0, 1.0)
    offset = 352 + len(ext)
    struct.pack_into("<f", h, 108, float(offset))
    struct.pack_into("<f", h, 112, slope)
    struct.pack_into("<f", h, 116, -1024.0 if slope else 0.0)
    struct.pack_into("<h", h, 252, 1 if qform else 0)
    struct.pack_into("<h", h, 254, 1 if sform else 0)
    # qform: a 90° turn about z (b = c = 0, d = sin 45°), offsets.
    struct.pack_into("<6f", h, 256, 0.0, 0.0, 0.7071068, -10.0, 20.0, 30.0)
    struct.pack_into("<4f", h, 280, -1.5, 0.0, 0.0, 5.0)
    struct.pack_into("<4f", h, 296, 0.0, -2.0, 0.0, 6.0)
    struct.pack_into("<4f", h, 312, 0.0, 0.0, 3.0, 7.0)
    h[344:348] = b"n+1\0"
    extension = (b"\1\0\0\0" + ext) if ext else b"\0\0\0\0"
    return bytes(h) + extension + data


def crafted(root):
    rng = np.random.default_rng(0)
    ct = rng.integers(-1000, 1500, size=(6, 5, 4), dtype=np.int16)
    niis = {
        "int16_qform.nii": nifti1((6, 5, 4), 4, 16, ct.tobytes(order="F")),
        "float32_sform.nii": nifti1(
            (6, 5, 4), 16, 32, ct.astype("<f4").tobytes(order="F"), qform=False, sform=True
        ),
        "uint8_scaled.nii": nifti1(
            (4, 4, 4), 2, 8, rng.integers(0, 4, 64, dtype=np.uint8).tobytes(), slope=2.0
        ),
        "channels_4d.nii": nifti1(
            (3, 3, 2, 2), 2, 8, rng.integers(0, 2, 36, dtype=np.uint8).tobytes()
        ),
        "extension.nii": nifti1(
            (2, 2, 2), 512, 16, np.arange(8, dtype="<u2").tobytes(), ext=b"\x10\0\0\0\0\0\0\0univ-ext"
        ),
        "float64.nii": nifti1((2, 3, 2), 64, 64, np.linspace(-1, 1, 12).astype("<f8").tobytes()),
    }
    for name, data in niis.items():
        put(root, "nifti", name, data)
        put(root, "nifti_gz", name + ".gz", gzip.compress(data, mtime=0))

    for name, data in dicom_slices(8, 3).items():
        put(root, "dicom_file", name, data)
    put(root, "dicom_series", "three_slices", SEP.join(dicom_slices(8, 3).values()))
    put(root, "dicom_series", "two_slices_implicit", SEP.join(dicom_slices(4, 2, implicit=True).values()))

    put(root, "pth", "state_dict.pth", torch_zip({"net": {"a.weight": np.ones((2, 3), "<f4"),
                                                           "a.bias": np.arange(4, dtype="<f2")}}))
    put(root, "pth", "tensor.pth", torch_zip(np.linspace(0, 1, 12, dtype="<f4").reshape(3, 4)))

    put(root, "safetensors", "state_dict.safetensors", safetensors_file(
        {"backbone.conv.weight": np.ones((2, 1, 3, 3, 3), "<f4"), "organ_embedding": np.zeros((3, 8), "<f4")},
        {"univ.classes": json.dumps(["Spleen", "Liver", "Aorta"]), "univ.trained_classes": "[1, 2]"},
    ))
    put(root, "safetensors", "embeddings.safetensors", safetensors_file(
        {"embeddings": np.eye(3, 4, dtype="<f4")},
        {"names": json.dumps(["a", "b", "c"]), "prompts": json.dumps(["p a", "p b", "p c"])},
    ))

    for name, arr in {"f4.npy": np.eye(3, 5, dtype="<f4"), "f2.npy": np.ones((2, 4), "<f2"),
                      "f8.npy": np.arange(6, dtype="<f8").reshape(2, 3)}.items():
        b = io.BytesIO()
        np.save(b, arr)
        put(root, "npy", name, b.getvalue())

    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("train.toml", "extend.toml"):
        with open(os.path.join(here, "..", "models", "demo", name), "rb") as f:
            put(root, "train_toml", name, f.read())
    put(root, "label_map", "map.json", b'{"1": 1, "2": 6, "27": 27}')
    put(root, "label_map", "empty.json", b"{}")


def dicom_slices(n, count, implicit=False):
    """`count` n×n CT slices of one series, 2 mm apart, as DICOM files (pydicom)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    out = {}
    for k in range(count):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = f"1.2.3.4.{k + 1}"
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = "1.2.3"
        ds.SeriesInstanceUID = "1.2.3.4"
        ds.Modality = "CT"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-10.0, -20.0, 2.0 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.75, 0.75]
        ds.SliceThickness = 2.0
        ds.Rows = ds.Columns = n
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (np.arange(n * n, dtype="<i2") * (k + 1)).tobytes()
        b = io.BytesIO()
        pydicom.dcmwrite(b, ds, enforce_file_format=True)
        out[f"slice{k}.dcm"] = b.getvalue()
    return out


class _Storage:
    def __init__(self, key, kind, numel):
        self.key, self.kind, self.numel = key, kind, numel


def torch_zip(obj):
    """A torch-style zip (archive/data.pkl + archive/data/N) pickled without torch: fake
    `torch` modules give the pickler the globals torch's own files name."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    collections_mod = __import__("collections")
    torch._utils = utils
    sys.modules["torch"], sys.modules["torch._utils"] = torch, utils

    def _rebuild_tensor_v2(*a):
        raise RuntimeError("never called")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    kinds = {}
    for dt, name in (("<f4", "FloatStorage"), ("<f2", "HalfStorage")):
        cls = type(name, (), {"__module__": "torch"})
        setattr(torch, name, cls)
        kinds[np.dtype(dt)] = cls
    storages = []

    class Tensor:
        def __init__(self, arr):
            self.arr = np.ascontiguousarray(arr)

        def __reduce__(self):
            key = str(len(storages))
            storages.append(self.arr.tobytes())
            st = _Storage(key, kinds[self.arr.dtype], self.arr.size)
            stride = tuple(s // self.arr.itemsize for s in self.arr.strides)
            return (_rebuild_tensor_v2, (st, 0, self.arr.shape, stride, False,
                                         collections_mod.OrderedDict()))

    def wrap(o):
        if isinstance(o, dict):
            return collections_mod.OrderedDict((k, wrap(v)) for k, v in o.items())
        return Tensor(o)

    class P(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _Storage):
                return ("storage", o.kind, o.key, "cpu", o.numel)
            return None

    b = io.BytesIO()
    P(b, protocol=2).dump(wrap(obj))
    z = io.BytesIO()
    with zipfile.ZipFile(z, "w", zipfile.ZIP_STORED) as zf:
        def entry(name, data):  # a fixed date, so that the file is the same on every run
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)

        entry("archive/data.pkl", b.getvalue())
        entry("archive/version", "3\n")
        for i, s in enumerate(storages):
            entry(f"archive/data/{i}", s)
    del sys.modules["torch"], sys.modules["torch._utils"]
    return z.getvalue()


def safetensors_file(tensors, metadata):
    header, data, off = {"__metadata__": metadata}, b"", 0
    for k, a in tensors.items():
        raw = np.ascontiguousarray(a).tobytes()
        header[k] = {"dtype": {"<f4": "F32", "<f2": "F16"}[a.dtype.str], "shape": list(a.shape),
                     "data_offsets": [off, off + len(raw)]}
        data += raw
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def shared(root):
    here = os.path.dirname(os.path.abspath(__file__))
    data = os.path.join(here, "..", "..", "shared", "data")
    if not os.path.isdir(data):
        sys.exit(f"{data} not found: the shared seeds need ../shared beside the repository")
    import pydicom

    def read(*p):
        with open(os.path.join(data, *p), "rb") as f:
            return f.read()

    put(root, "nifti_gz", "example_ct_sm.nii.gz", read("ct", "example_ct_sm.nii.gz"))
    seg = gzip.decompress(read("ct", "example_seg.nii.gz"))
    put(root, "nifti", "example_seg.nii", seg)
    small = read("dicom", "CT_small.dcm")
    put(root, "dicom_file", "CT_small.dcm", small)
    j2k = sorted(os.listdir(os.path.join(data, "dicom", "example_ct_dicom_j2k")))
    put(root, "dicom_file", "j2k_slice", read("dicom", "example_ct_dicom_j2k", j2k[0]))
    # A two-slice series from CT_small: the second slice moved one thickness along the normal.
    slices = []
    for k in range(2):
        ds = pydicom.dcmread(io.BytesIO(small))
        ds.ImagePositionPatient = [float(v) for v in ds.ImagePositionPatient[:2]] + [
            float(ds.ImagePositionPatient[2]) + 5.0 * k]
        ds.InstanceNumber = k + 1
        ds.SOPInstanceUID = ds.SOPInstanceUID + f".{k + 1}"
        b = io.BytesIO()
        ds.save_as(b)
        slices.append(b.getvalue())
    put(root, "dicom_series", "CT_small_twice", SEP.join(slices))
    for name in ("txt_encoding.pth", "word_embedding_38class_ContinualLearning.pth"):
        put(root, "pth", name, read("universal_model", name))
    put(root, "safetensors", "preprocess_coords.safetensors",
        read("..", "fixtures", "preprocess", "example_ct_spacing_src_coords.safetensors"))
    with open(os.path.join(data, "universal_model", "txt_encoding_f32_32x512.bin"), "rb") as f:
        emb = np.frombuffer(f.read(), "<f4").reshape(32, 512)
    b = io.BytesIO()
    np.save(b, emb[:4])
    put(root, "npy", "official_rows.npy", b.getvalue())
    for name in ("universal_model_classes_and_ts_mapping.json",):
        put(root, "label_map", name, read("labels", name))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("crafted", "shared"):
        sys.exit(__doc__)
    {"crafted": crafted, "shared": shared}[sys.argv[1]](sys.argv[2])
