"""Tests of the univ Python package, against the command line and the shared data.

Run by .ci/run in a fresh virtual environment where the wheel was installed:
``UNIV_BIN=target/release/univ pytest crates/univ-python/tests``. The shared data folder is
``$UNIV_SHARED_DIR`` or ``shared/`` beside the repository; without it the tests skip with the
reason, and fail when ``CI=true``.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import struct
import subprocess
import threading
import time

import numpy as np
import pytest

import univ
import univ.clip

ROOT = pathlib.Path(__file__).resolve().parents[3]
SHARED = pathlib.Path(os.environ.get("UNIV_SHARED_DIR", ROOT.parent / "shared"))
UNIV_BIN = pathlib.Path(os.environ.get("UNIV_BIN", ROOT / "target" / "release" / "univ"))


def shared(rel: str) -> pathlib.Path:
    p = SHARED / rel
    if not p.exists():
        msg = f"the shared data folder is missing ({p}): set UNIV_SHARED_DIR"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return p


@pytest.fixture(scope="module")
def ct_sm() -> pathlib.Path:
    return shared("data/ct/example_ct_sm.nii.gz")


@pytest.fixture(scope="module")
def fixture_unet() -> pathlib.Path:
    return shared("fixtures/model_unet/model.safetensors")


@pytest.fixture(scope="module")
def model(fixture_unet: pathlib.Path) -> univ.Model:
    return univ.Model.load(fixture_unet, threads=2)


@pytest.fixture(scope="module")
def seg_path(model: univ.Model, ct_sm: pathlib.Path) -> univ.Segmentation:
    return model.segment(ct_sm)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    if not UNIV_BIN.exists():
        pytest.fail(f"the univ binary {UNIV_BIN} is missing: build it (cargo build --release)")
    return subprocess.run([str(UNIV_BIN), *args], capture_output=True, text=True)


def strip_run_specific(report: dict) -> dict:
    r = dict(report)
    for k in ("timings_s", "peak_resident_mb_after"):
        r.pop(k, None)
    return r


def test_the_package_imports_and_names_its_api() -> None:
    assert univ.__version__
    for name in ("Model", "Segmentation", "Error", "read_volume", "evaluate"):
        assert hasattr(univ, name), name
    assert issubclass(univ.Error, Exception)
    assert hasattr(univ.clip, "TextEncoder")


def test_results_are_those_of_the_command_line(
    seg_path: univ.Segmentation, ct_sm: pathlib.Path, fixture_unet: pathlib.Path, tmp_path
) -> None:
    out = tmp_path / "cli"
    p = run_cli("segment", str(ct_sm), "-o", str(out), "--checkpoint", str(fixture_unet), "--quiet")
    assert p.returncode == 0, p.stderr
    cli_labels, cli_affine = univ.read_volume(out / "segmentation.nii.gz")
    assert seg_path.label_map.dtype == np.uint8
    assert seg_path.label_map.shape == cli_labels.shape
    assert np.array_equal(seg_path.label_map, cli_labels.astype(np.uint8))
    assert np.allclose(seg_path.affine, cli_affine, atol=1e-5)
    classes = json.loads((out / "classes.json").read_text())["classes"]
    assert [(c["label"], c["name"]) for c in classes] == [
        (c["id"], c["name"]) for c in seg_path.classes
    ]
    cli_report = json.loads((out / "report.json").read_text())
    assert strip_run_specific(seg_path.report) == strip_run_specific(cli_report)
    liver = seg_path.mask("liver")
    assert liver.dtype == np.bool_ and liver.shape == seg_path.label_map.shape
    assert liver.sum() == next(c for c in seg_path.classes if c["name"] == "Liver")["voxels"]
    assert np.array_equal(seg_path.mask(6), liver)


def test_a_nibabel_array_gives_the_label_map_of_the_path(
    model: univ.Model, seg_path: univ.Segmentation, ct_sm: pathlib.Path
) -> None:
    nib = pytest.importorskip("nibabel")
    img = nib.load(str(ct_sm))
    data = img.get_fdata()  # float64, Fortran order
    seen = []
    seg = model.segment(data, img.affine, progress=lambda d, t: seen.append((d, t)))
    assert np.array_equal(seg.label_map, seg_path.label_map)
    assert np.allclose(seg.affine, img.affine)
    assert seen and seen[-1][0] == seen[-1][1] == seg.report["windows"]
    # The same voxels in C order and as int16 (3D Slicer's arrays, transposed, are C order):
    # read through their strides, the same label map.
    seg_c = model.segment(np.ascontiguousarray(data.astype(np.int16)), img.affine)
    assert np.array_equal(seg_c.label_map, seg_path.label_map)
    # univ.read_volume reads what nibabel reads.
    arr, affine = univ.read_volume(ct_sm)
    assert arr.dtype == np.float32 and arr.shape == data.shape
    assert np.array_equal(arr, data.astype(np.float32))
    assert np.allclose(affine, img.affine, atol=1e-5)


def test_save_writes_the_files_of_the_command_line_on_the_inputs_grid(
    seg_path: univ.Segmentation, ct_sm: pathlib.Path, tmp_path
) -> None:
    nib = pytest.importorskip("nibabel")
    out = tmp_path / "res"
    seg_path.save(out, per_class=True)
    for f in ("segmentation.nii.gz", "classes.json", "report.json", "preview.png", "masks/liver.nii.gz"):
        assert (out / f).is_file(), f
    src = nib.load(str(ct_sm))
    lab = nib.load(str(out / "segmentation.nii.gz"))
    assert lab.shape == src.shape
    assert np.allclose(lab.affine, src.affine, atol=1e-5)
    assert np.array_equal(np.asarray(lab.dataobj).astype(np.uint8), seg_path.label_map)
    with pytest.raises(univ.Error, match="--overwrite|overwrite"):
        seg_path.save(out)
    seg_path.save(out, overwrite=True)
    with pytest.raises(ValueError, match="DICOM"):
        seg_path.save(tmp_path / "dcm", dicom_seg=True)


def test_bad_inputs_raise_the_right_exceptions(
    model: univ.Model, seg_path: univ.Segmentation, tmp_path
) -> None:
    with pytest.raises(FileNotFoundError):
        model.segment(tmp_path / "missing.nii.gz")
    with pytest.raises(FileNotFoundError):
        univ.Model.load(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError):
        univ.read_volume(tmp_path / "missing.nii")
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file")
    with pytest.raises(univ.Error, match="broken.nii.gz"):
        model.segment(broken)
    bad_ckpt = tmp_path / "bad.safetensors"
    bad_ckpt.write_bytes(b"\x00" * 16)
    with pytest.raises(univ.Error):
        univ.Model.load(bad_ckpt)
    with pytest.raises(ValueError, match="3-D"):
        model.segment(np.zeros((4, 4)), np.eye(4))
    with pytest.raises(ValueError, match="affine"):
        model.segment(np.zeros((8, 8, 8)))
    with pytest.raises(ValueError, match="affine"):
        model.segment(np.zeros((8, 8, 8)), np.eye(3))
    with pytest.raises(ValueError, match="overlap"):
        model.segment(np.zeros((8, 8, 8)), np.eye(4), overlap=1.5)
    with pytest.raises(ValueError, match="classes"):
        model.segment(np.zeros((8, 8, 8)), np.eye(4), classes=["brain"])
    with pytest.raises(ValueError, match="device"):
        univ.Model.load(device="tpu")
    with pytest.raises(ValueError, match="not computed"):
        seg_path.mask("no such class")
    with pytest.raises(ValueError, match="probabilities=True"):
        seg_path.probabilities("liver")


def test_progress_exceptions_and_ctrl_c_stop_the_work(model: univ.Model, ct_sm: pathlib.Path) -> None:
    calls = []

    def stop(done: int, total: int) -> None:
        calls.append(done)
        raise RuntimeError("enough")

    with pytest.raises(RuntimeError, match="enough"):
        model.segment(ct_sm, progress=stop)
    assert calls == [1], "the work went on after the callback raised"

    # Ctrl-C (SIGINT) during the windows: KeyboardInterrupt, soon. (Python's own handler is
    # installed for the test: a process started in the background inherits SIGINT ignored.)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT))
    start = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            model.segment(ct_sm)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - start < 20, "Ctrl-C was not honoured before the end"


def test_probabilities_and_evaluate(model: univ.Model, seg_path: univ.Segmentation, ct_sm, tmp_path) -> None:
    seg = model.segment(ct_sm, classes=["liver", 1], probabilities=True, postprocess=False)
    assert [c["id"] for c in seg.classes] == [6, 1], "the classes in the order asked for"
    p = seg.probabilities("liver")
    assert p.dtype == np.float32 and p.shape == seg.label_map.shape
    assert 0.0 <= p.min() and p.max() <= 1.0
    assert np.array_equal(p > 0.5, seg.mask("liver"))
    # Identical maps: Dice 1 for every label; arrays and paths give the same.
    out = tmp_path / "o"
    seg_path.save(out)
    by_path = univ.evaluate(out / "segmentation.nii.gz", out / "segmentation.nii.gz")
    assert by_path["labels"] and all(r["dice"] == 1.0 for r in by_path["labels"])
    lm = seg_path.label_map
    lab = int(np.unique(lm[lm > 0])[0])
    other = lm.copy()
    other[other == lab] = 0
    e = univ.evaluate(lm, other, spacing=(3.0, 3.0, 3.0))
    row = next(r for r in e["labels"] if r["label"] == lab)
    assert row["dice"] == 0.0 and row["voxels_gt"] == 0 and row["voxels_pred"] > 0
    assert e["spacing_mm"] == [3.0, 3.0, 3.0]
    with pytest.raises(ValueError, match="shape"):
        univ.evaluate(lm, lm[:-1])
    with pytest.raises(ValueError, match="label id"):
        univ.evaluate(lm.astype(np.float32) + 0.5, lm)


def read_safetensors(path: pathlib.Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        dtype = {"F32": np.float32, "I64": np.int64, "I32": np.int32}[t["dtype"]]
        out[name] = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype=dtype).reshape(t["shape"])
    return out


def test_the_text_encoder_alone_matches_the_reference(tmp_path) -> None:
    fix = shared("fixtures/clip_text")
    d = tmp_path / "clip"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        (d / f).write_bytes((fix / "model" / f).read_bytes())
    (d / "tokenizer.json").write_bytes((fix / "tokenizer.json").read_bytes())
    meta = json.loads((fix / "meta.json").read_text())
    prompts = meta.get("prompts") or [f"A computerized tomography of a {n}" for n in meta["names"]]
    enc = univ.clip.TextEncoder.load(d)
    emb = enc.embed(prompts)
    expected = read_safetensors(fix / "expected.safetensors")["text_embeds"]
    assert emb.shape == expected.shape and emb.dtype == np.float32
    assert np.allclose(emb, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError):
        enc.embed([])
    with pytest.raises(univ.Error):
        univ.clip.TextEncoder.load(tmp_path / "nowhere")
