"""Independent check of a DICOM-SEG written by univ, with pydicom and highdicom.

Reads SEG (e.g. `univ segment SERIES -o OUT --dicom-seg`, or the file the univ-io test keeps with
UNIV_KEEP_SEG=PATH), the source series and, optionally, a reference label map (NIfTI) on that
series, and checks that highdicom opens the SEG, finds every source instance, and (with the
reference) that every segment's pixels equal the reference class voxel for voxel.

    python -m venv /tmp/segvenv && /tmp/segvenv/bin/pip install highdicom pydicom nibabel numpy
    /tmp/segvenv/bin/python docs/checks/check_dicom_seg.py SEG.dcm SERIES_DIR [REFERENCE.nii.gz]
"""
import glob
import os
import sys

import highdicom as hd
import numpy as np
import pydicom


def main():
    seg_path, series_dir = sys.argv[1], sys.argv[2]
    ref_path = sys.argv[3] if len(sys.argv) > 3 else None
    seg = hd.seg.segread(seg_path)
    src = []
    for p in sorted(glob.glob(os.path.join(series_dir, "*"))):
        ds = pydicom.dcmread(p, stop_before_pixels=True, force=True)
        uid = ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID
        src.append((float(ds.ImagePositionPatient[2]), uid))
    src.sort()
    uids = [u for _, u in src]
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    vol = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids,
        combine_segments=False,
        assert_missing_frames_are_empty=True,
    )  # (slices, rows, cols, segments)
    print(f"{seg_path}: {seg.SegmentationType} SEG, {len(labels)} segments, {int(seg.NumberOfFrames)} frames,"
          f" {len(uids)} source instances found")
    for i, lab in enumerate(labels):
        print(f"  segment {i + 1} {lab!r}: {int(vol[..., i].sum())} voxels")
    if ref_path is None:
        return
    import nibabel as nib

    ref = nib.load(ref_path)
    data = np.asarray(ref.dataobj).astype(np.int32)
    codes = nib.aff2axcodes(ref.affine)
    # Bring the reference to (slice along +S, row along +P, column along +L): DICOM's order.
    data = nib.orientations.apply_orientation(
        data,
        nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(codes), nib.orientations.axcodes2ornt(("L", "P", "S"))),
    )
    data = np.transpose(data, (2, 1, 0))  # (slice, row, col)
    bad = 0
    for i, lab in enumerate(labels):
        cls = int(lab.split()[-1]) if lab.split()[-1].isdigit() else None
        if cls is None:
            continue
        same = np.array_equal(vol[..., i].astype(bool), data == cls)
        bad += not same
        print(f"  segment {i + 1} vs reference class {cls}: {'identical' if same else 'DIFFERENT'}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
