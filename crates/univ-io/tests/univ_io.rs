//! Integration tests of univ-io: MONAI parity on a real CT, NIfTI round trips and data types,
//! and every kind of bad input the reader must refuse with a typed error.

#![allow(clippy::needless_range_loop)]

#[path = "../../../tests/common/shared.rs"]
mod shared;

use std::path::{Path, PathBuf};

use univ_io::geometry::{self, Affine};
use univ_io::{
    CropBox, Error, Interpolation, Limits, PreprocessOptions, ReadOptions, Volume, WriteOptions,
    preprocess, read_header, read_image, read_image_and_label, read_label, write_nifti,
};

// ---------------------------------------------------------------------------------------------
// A hand-made NIfTI-1 writer for crafting test files, good and bad.

struct RawNii {
    header: Vec<u8>,
    data: Vec<u8>,
}

impl RawNii {
    fn new(dims: &[u16], datatype: i16, bitpix: i16, data: Vec<u8>) -> Self {
        let mut h = vec![0u8; 352];
        h[0..4].copy_from_slice(&348i32.to_le_bytes());
        let mut dim = [1u16; 8];
        dim[0] = dims.len() as u16;
        dim[1..=dims.len()].copy_from_slice(dims);
        for (i, d) in dim.iter().enumerate() {
            h[40 + 2 * i..42 + 2 * i].copy_from_slice(&d.to_le_bytes());
        }
        h[70..72].copy_from_slice(&datatype.to_le_bytes());
        h[72..74].copy_from_slice(&bitpix.to_le_bytes());
        let mut r = RawNii { header: h, data };
        r.set_f32s(76, &[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
        r.set_f32s(108, &[352.0, 1.0, 0.0]); // vox_offset, scl_slope, scl_inter
        r.header[344..348].copy_from_slice(b"n+1\0");
        r
    }

    fn set_f32s(&mut self, off: usize, v: &[f32]) -> &mut Self {
        for (i, x) in v.iter().enumerate() {
            self.header[off + 4 * i..off + 4 * i + 4].copy_from_slice(&x.to_le_bytes());
        }
        self
    }

    fn set_i16(&mut self, off: usize, v: i16) -> &mut Self {
        self.header[off..off + 2].copy_from_slice(&v.to_le_bytes());
        self
    }

    fn pixdim(&mut self, p: [f32; 3]) -> &mut Self {
        self.set_f32s(80, &p)
    }

    fn scaling(&mut self, slope: f32, inter: f32) -> &mut Self {
        self.set_f32s(112, &[slope, inter])
    }

    fn sform(&mut self, a: &Affine) -> &mut Self {
        self.set_i16(254, 1);
        for r in 0..3 {
            let row: Vec<f32> = a[r].iter().map(|v| *v as f32).collect();
            self.set_f32s(280 + 16 * r, &row);
        }
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = self.header.clone();
        b.extend_from_slice(&self.data);
        b
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        let bytes = self.bytes();
        if name.ends_with(".gz") {
            use std::io::Write;
            let f = std::fs::File::create(&p).unwrap();
            let mut enc = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
            enc.write_all(&bytes).unwrap();
            enc.finish().unwrap();
        } else {
            std::fs::write(&p, bytes).unwrap();
        }
        p
    }
}

fn le_bytes<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|x| f(*x)).collect()
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

// ---------------------------------------------------------------------------------------------
// Parity with MONAI on a real CT (../shared/fixtures/preprocess).

fn json_affine(v: &serde_json::Value) -> Affine {
    let mut a = [[0.0; 4]; 4];
    for r in 0..4 {
        for c in 0..4 {
            a[r][c] = v[r][c].as_f64().unwrap();
        }
    }
    a
}

fn json_shape(v: &serde_json::Value) -> [usize; 3] {
    [0, 1, 2].map(|i| v[i].as_u64().unwrap() as usize)
}

#[test]
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
fn preprocess_matches_monai_on_example_ct() {
    let Some(shared) = shared::shared_dir() else {
        return;
    };
    let fx = shared.join("fixtures/preprocess");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("meta.json")).unwrap()).unwrap();
    let case = &meta["cases"]["example_ct"];

    let (image, label) = read_image_and_label(
        shared.join("data/ct/example_ct.nii.gz"),
        shared.join("data/ct/derived_example_ct_seg_fast_um32.nii.gz"),
    )
    .unwrap();
    assert_eq!(image.shape(), json_shape(&case["input_shape"]));
    assert!(geometry::max_abs_diff(image.affine(), &json_affine(&case["input_affine"])) < 1e-9);
    assert_eq!(image.axcodes(), case["input_axcodes"].as_str().unwrap());

    let pre = preprocess(
        image,
        Some(label.clone()),
        &PreprocessOptions::universal_model(),
    )
    .unwrap();
    let rec = &pre.record;

    // Shapes, crop box and affines.
    assert_eq!(
        rec.resampled_shape,
        json_shape(&case["resampled_shape_before_crop"])
    );
    assert!(
        geometry::max_abs_diff(
            &rec.resampled_affine,
            &json_affine(&case["resampled_affine_before_crop"])
        ) < 1e-4
    );
    assert_eq!(
        rec.crop,
        Some(CropBox {
            start: json_shape(&case["crop_start"]),
            end: json_shape(&case["crop_end_exclusive"]),
        })
    );
    assert_eq!(pre.image.shape(), json_shape(&case["output_shape"]));
    assert!(
        geometry::max_abs_diff(pre.image.affine(), &json_affine(&case["output_affine"])) < 1e-4
    );

    // Image values within 1e-4 of MONAI's.
    let golden = read_image(fx.join("example_ct_image.nii.gz")).unwrap();
    assert_eq!(golden.shape(), pre.image.shape());
    assert!(geometry::max_abs_diff(golden.affine(), pre.image.affine()) < 1e-4);
    let max_diff = golden
        .data()
        .iter()
        .zip(pre.image.data())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max_diff <= 1e-4, "image differs from MONAI by {max_diff}");
    let sum: f64 = pre.image.data().iter().map(|v| f64::from(*v)).sum();
    let want_sum = case["image_stats"]["sum"].as_f64().unwrap();
    assert!(
        (sum - want_sum).abs() / want_sum < 1e-6,
        "sum {sum} vs {want_sum}"
    );

    // Labels identical except at the nearest-neighbour ties the fixture marks.
    let golden_label = read_label(fx.join("example_ct_label.nii.gz")).unwrap();
    let ties = read_label(fx.join("example_ct_label_tie_ambiguous.nii.gz")).unwrap();
    let ours = pre.label.as_ref().unwrap();
    let mut outside_ties = 0usize;
    let mut at_ties = 0usize;
    for ((a, b), t) in ours.data().iter().zip(golden_label.data()).zip(ties.data()) {
        if a != b {
            if *t == 0 {
                outside_ties += 1;
            } else {
                at_ties += 1;
            }
        }
    }
    assert_eq!(
        outside_ties, 0,
        "label voxels differ outside tie voxels ({at_ties} at ties)"
    );
    println!("label: 0 differences outside ties, {at_ties} at tie voxels");

    // The inverse mapping of MONAI's preprocessed label equals MONAI's Invertd voxel for voxel,
    // and lands on the input grid with the input's geometry.
    let inverted = rec.invert(&golden_label, Interpolation::Nearest).unwrap();
    let golden_inv = read_label(fx.join("example_ct_label_inverted.nii.gz")).unwrap();
    assert_eq!(inverted.shape(), golden_inv.shape());
    assert_eq!(inverted.affine(), label.affine());
    assert!(
        inverted.data() == golden_inv.data(),
        "inverted label differs from Invertd"
    );
    // Our own preprocessed label maps back onto the original label exactly.
    let round = rec.invert(ours, Interpolation::Nearest).unwrap();
    assert!(round.data() == label.data(), "label round trip differs");

    // Written back, it keeps the input file's sform and qform exactly.
    let dir = tmp();
    let out = dir.path().join("inverted.nii.gz");
    write_nifti(&out, &inverted, &WriteOptions::default()).unwrap();
    let h_in = read_header(shared.join("data/ct/example_ct.nii.gz"), &Limits::default()).unwrap();
    let h_out = read_header(&out, &Limits::default()).unwrap();
    assert_eq!(h_in.geometry, h_out.geometry);
    assert_eq!(h_out.datatype, "uint8");
}

#[test]
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
fn resampling_coordinates_match_monai() {
    // MONAI's float64 source coordinate per output index, for the 3 mm -> 1.5 mm grid.
    let Some(p) =
        shared::shared_file("fixtures/preprocess/example_ct_spacing_src_coords.safetensors")
    else {
        return;
    };
    let bytes = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let image = read_image(shared::shared_file("data/ct/example_ct.nii.gz").unwrap()).unwrap();
    let (shape, out_aff) =
        univ_io::transforms::spatial::spacing_grid(image.shape(), image.affine(), [1.5; 3])
            .unwrap();
    let t = geometry::matmul(&geometry::inverse(image.affine()).unwrap(), &out_aff);
    for (ax, name) in ["u_x", "u_y", "u_z"].iter().enumerate() {
        let view = st.tensor(name).unwrap();
        let coords: Vec<f64> = view
            .data()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(coords.len(), shape[ax]);
        for (j, u) in coords.iter().enumerate() {
            let ours = t[ax][ax] * j as f64 + t[ax][3];
            assert!(
                (ours - u).abs() < 1e-12,
                "axis {ax} index {j}: {ours} vs {u}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading: data types, scaling, geometry sources.

#[test]
fn reads_every_integer_and_float_type_with_scaling() {
    let dir = tmp();
    let dims = [3u16, 2, 2];
    let vals: Vec<f64> = (0..12).map(|i| i as f64).collect();
    let cases: Vec<(&str, i16, i16, Vec<u8>)> = vec![
        ("u8", 2, 8, vals.iter().map(|v| *v as u8).collect()),
        (
            "i8",
            256,
            8,
            vals.iter().map(|v| (*v as i8) as u8).collect(),
        ),
        (
            "u16",
            512,
            16,
            le_bytes(
                &vals.iter().map(|v| *v as u16).collect::<Vec<_>>(),
                u16::to_le_bytes,
            ),
        ),
        (
            "i16",
            4,
            16,
            le_bytes(
                &vals.iter().map(|v| *v as i16).collect::<Vec<_>>(),
                i16::to_le_bytes,
            ),
        ),
        (
            "u32",
            768,
            32,
            le_bytes(
                &vals.iter().map(|v| *v as u32).collect::<Vec<_>>(),
                u32::to_le_bytes,
            ),
        ),
        (
            "i32",
            8,
            32,
            le_bytes(
                &vals.iter().map(|v| *v as i32).collect::<Vec<_>>(),
                i32::to_le_bytes,
            ),
        ),
        (
            "f32",
            16,
            32,
            le_bytes(
                &vals.iter().map(|v| *v as f32).collect::<Vec<_>>(),
                f32::to_le_bytes,
            ),
        ),
        ("f64", 64, 64, le_bytes(&vals, f64::to_le_bytes)),
    ];
    for (name, code, bitpix, data) in cases {
        let mut raw = RawNii::new(&dims, code, bitpix, data);
        raw.scaling(2.0, -1000.0);
        for file in [format!("{name}.nii"), format!("{name}.nii.gz")] {
            let p = raw.write(dir.path(), &file);
            let v = read_image(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(v.shape(), [3, 2, 2], "{name}");
            let want: Vec<f32> = vals.iter().map(|x| (x * 2.0 - 1000.0) as f32).collect();
            assert_eq!(v.data(), &want[..], "{name}");
        }
    }
    // A zero slope means "no scaling" in NIfTI.
    let mut raw = RawNii::new(&dims, 2, 8, (0..12).collect());
    raw.scaling(0.0, 5.0);
    let v = read_image(raw.write(dir.path(), "noscale.nii")).unwrap();
    assert_eq!(v.data()[11], 11.0);
}

#[test]
fn affine_comes_from_sform_then_qform_then_pixdim() {
    let dir = tmp();
    let data = vec![0u8; 24];
    // pixdim only: nibabel's base affine (x flipped, centred).
    let mut raw = RawNii::new(&[4, 3, 2], 2, 8, data.clone());
    raw.pixdim([2.0, 3.0, 4.0]);
    let info = read_header(raw.write(dir.path(), "base.nii"), &Limits::default()).unwrap();
    assert_eq!(info.affine_source, "pixdim");
    let want = [
        [-2.0, 0.0, 0.0, 3.0],
        [0.0, 3.0, 0.0, -3.0],
        [0.0, 0.0, 4.0, -2.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    assert_eq!(info.affine, want);
    assert_eq!(info.axcodes, "LAS");

    // qform: a 90° rotation about z with qfac = -1.
    let h = std::f32::consts::FRAC_1_SQRT_2;
    raw.set_i16(252, 1)
        .set_f32s(256, &[0.0, 0.0, h, 10.0, 20.0, 30.0]);
    raw.set_f32s(76, &[-1.0]);
    let info = read_header(raw.write(dir.path(), "q.nii"), &Limits::default()).unwrap();
    assert_eq!(info.affine_source, "qform");
    let want = [
        [0.0, -3.0, 0.0, 10.0],
        [2.0, 0.0, 0.0, 20.0],
        [0.0, 0.0, -4.0, 30.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    assert!(
        geometry::max_abs_diff(&info.affine, &want) < 1e-6,
        "{:?}",
        info.affine
    );

    // sform wins over qform.
    let s = [
        [1.0, 0.0, 0.0, -5.0],
        [0.0, 1.0, 0.0, -6.0],
        [0.0, 0.0, 1.0, -7.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    raw.sform(&s);
    let p = raw.write(dir.path(), "s.nii");
    let info = read_header(&p, &Limits::default()).unwrap();
    assert_eq!(info.affine_source, "sform");
    assert_eq!(info.affine, s);
    assert_eq!(read_image(&p).unwrap().affine(), &s);
}

#[test]
fn four_d_with_a_singleton_axis_reads_as_3d() {
    let dir = tmp();
    let raw = RawNii::new(&[2, 2, 3, 1], 2, 8, (0..12).collect());
    let v = read_image(raw.write(dir.path(), "t1.nii.gz")).unwrap();
    assert_eq!(v.shape(), [2, 2, 3]);
    assert_eq!(v.get([1, 1, 2]), 11.0);
    // A 2-D image is a volume with one slice.
    let raw = RawNii::new(&[2, 3], 2, 8, (0..6).collect());
    assert_eq!(
        read_image(raw.write(dir.path(), "2d.nii")).unwrap().shape(),
        [2, 3, 1]
    );
}

// ---------------------------------------------------------------------------------------------
// Writing.

#[test]
fn write_read_round_trip_of_f32_u8_i16_keeps_geometry() {
    let dir = tmp();
    let ang: f64 = 0.2;
    let (s, c) = ang.sin_cos();
    let affine = [
        [0.8 * c, -0.8 * s, 0.0, -100.0],
        [0.8 * s, 0.8 * c, 0.0, 50.0],
        [0.0, 0.0, 2.5, 30.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    let shape = [5, 4, 3];
    let f = Volume::from_vec(
        (0..60).map(|i| i as f32 * 0.25 - 3.0).collect(),
        shape,
        affine,
    )
    .unwrap();
    for name in ["f.nii", "f.nii.gz"] {
        let p = dir.path().join(name);
        write_nifti(&p, &f, &WriteOptions::default()).unwrap();
        let back = read_image(&p).unwrap();
        assert_eq!(back.data(), f.data());
        assert!(geometry::max_abs_diff(back.affine(), &affine) < 1e-5);
        let h = read_header(&p, &Limits::default()).unwrap();
        assert_eq!(h.datatype, "float32");
        assert_eq!((h.geometry.sform_code, h.geometry.qform_code), (2, 2));
        // The qform describes the same grid as the sform.
        let q = geometry::QuaternionForm {
            b: f64::from(h.geometry.quatern[0]),
            c: f64::from(h.geometry.quatern[1]),
            d: f64::from(h.geometry.quatern[2]),
            offset: h.geometry.qoffset.map(f64::from),
            pixdim: [1, 2, 3].map(|i| f64::from(h.geometry.pixdim[i])),
            qfac: f64::from(h.geometry.pixdim[0]),
        };
        assert!(geometry::max_abs_diff(&geometry::quaternion_to_affine(&q), &affine) < 1e-5);
        // Re-writing what was read keeps every geometry field bit for bit.
        let p2 = dir.path().join(format!("again-{name}"));
        write_nifti(&p2, &back, &WriteOptions::default()).unwrap();
        assert_eq!(
            read_header(&p2, &Limits::default()).unwrap().geometry,
            h.geometry
        );
    }
    let u = f.map(|v| (v.abs() * 4.0) as u8);
    let p = dir.path().join("u.nii.gz");
    write_nifti(&p, &u, &WriteOptions::default()).unwrap();
    assert_eq!(read_label(&p).unwrap().data(), u.data());
    let i = f.map(|v| (v * -100.0) as i16);
    let p = dir.path().join("i.nii");
    write_nifti(&p, &i, &WriteOptions::default()).unwrap();
    assert_eq!(
        read_header(&p, &Limits::default()).unwrap().datatype,
        "int16"
    );
    assert_eq!(read_image(&p).unwrap().data(), i.map(f32::from).data());
    // No temporary files are left behind.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(names.iter().all(|n| !n.contains("-tmp-")), "{names:?}");
}

#[test]
fn write_refuses_bad_names_and_leaves_nothing_on_failure() {
    let dir = tmp();
    let v = Volume::filled(1u8, [2, 2, 2], geometry::IDENTITY).unwrap();
    assert!(matches!(
        write_nifti(dir.path().join("x.png"), &v, &WriteOptions::default()),
        Err(Error::InvalidParameter { .. })
    ));
    let missing = dir.path().join("no/such/folder/x.nii.gz");
    let err = write_nifti(&missing, &v, &WriteOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("x.nii.gz"));
}

// ---------------------------------------------------------------------------------------------
// Bad input: one test each, a typed error naming the file, never a panic.

fn good_raw() -> RawNii {
    RawNii::new(&[4, 4, 4], 4, 16, le_bytes(&[7i16; 64], i16::to_le_bytes))
}

fn assert_names_file(e: &Error, p: &Path) {
    let msg = e.to_string();
    assert!(
        msg.contains(&p.display().to_string()),
        "message does not name the file: {msg}"
    );
}

#[test]
fn bad_truncated_gz() {
    let dir = tmp();
    // Poorly compressible voxels, so that cutting the file cuts into the voxel data.
    let vals: Vec<i16> = (0..32768u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 16) as i16)
        .collect();
    let big = RawNii::new(&[32, 32, 32], 4, 16, le_bytes(&vals, i16::to_le_bytes));
    let p = big.write(dir.path(), "big.nii.gz");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = read_image(&p).unwrap_err();
    assert!(matches!(e, Error::Truncated { .. }), "{e}");
    assert_names_file(&e, &p);
    // A tiny file cut so short that even the header cannot be decoded.
    let p = good_raw().write(dir.path(), "t.nii.gz");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 30]).unwrap();
    let e = read_image(&p).unwrap_err();
    assert!(matches!(e, Error::Truncated { .. }), "{e}");
    assert_names_file(&e, &p);
}

#[test]
fn bad_truncated_uncompressed() {
    let dir = tmp();
    let mut raw = good_raw();
    raw.data.truncate(100);
    let p = raw.write(dir.path(), "t.nii");
    let e = read_image(&p).unwrap_err();
    assert!(matches!(e, Error::Truncated { .. }), "{e}");
    assert!(e.to_string().contains("128 bytes"), "{e}");
}

#[test]
fn bad_corrupt_gz() {
    let dir = tmp();
    let p = good_raw().write(dir.path(), "c.nii.gz");
    let mut bytes = std::fs::read(&p).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 8] {
        *b ^= 0xA5;
    }
    std::fs::write(&p, &bytes).unwrap();
    let e = read_image(&p).unwrap_err();
    assert!(
        matches!(e, Error::Truncated { .. } | Error::InvalidNifti { .. }),
        "{e}"
    );
    assert_names_file(&e, &p);
    // Not gzip at all, though named .gz.
    std::fs::write(&p, b"this is not gzip data at all, just text").unwrap();
    let e = read_image(&p).unwrap_err();
    assert!(matches!(e, Error::InvalidNifti { .. }), "{e}");
    assert!(e.to_string().contains("gzip"), "{e}");
}

#[test]
fn bad_gzip_crc_trailing_data_and_bombs() {
    let dir = tmp();
    // A flipped bit in the gzip CRC (the 4 bytes before the length at the end): refused.
    let p = good_raw().write(dir.path(), "crc.nii.gz");
    let mut bytes = std::fs::read(&p).unwrap();
    let n = bytes.len();
    bytes[n - 8] ^= 0x01;
    std::fs::write(&p, &bytes).unwrap();
    let e = read_image(&p).unwrap_err();
    assert!(matches!(e, Error::Truncated { .. }), "{e}");
    assert!(
        e.to_string().to_lowercase().contains("crc") || e.to_string().contains("checksum"),
        "{e}"
    );
    // Data after the voxels the header announces: refused, compressed or not.
    let mut raw = good_raw();
    raw.data.extend_from_slice(&[1, 2, 3]);
    for name in ["trail.nii", "trail.nii.gz"] {
        let p = raw.write(dir.path(), name);
        let e = read_image(&p).unwrap_err();
        assert!(e.to_string().contains("data follows"), "{name}: {e}");
    }
    // A 1024³ volume of zeros compresses to about 1 MB: refused from its header before any
    // voxel is inflated (2³⁰ voxels is over the default limit of 2²⁹).
    let header_only = RawNii::new(&[1024, 1024, 1024], 2, 8, Vec::new());
    let p = dir.path().join("bomb.nii.gz");
    {
        use std::io::Write;
        let f = std::fs::File::create(&p).unwrap();
        let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        gz.write_all(&header_only.header).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            gz.write_all(&zeros).unwrap();
        }
        gz.finish().unwrap();
    }
    assert!(std::fs::metadata(&p).unwrap().len() < 8 << 20);
    let e = read_image(&p).unwrap_err();
    assert!(matches!(e, Error::LimitExceeded { .. }), "{e}");
}

#[test]
fn bad_qform_quaternion_is_refused_as_nibabel_does() {
    let dir = tmp();
    let mut raw = good_raw();
    raw.set_f32s(76, &[1.0, 3.0, 3.0, 3.0, 1.0, 1.0, 1.0, 1.0]);
    raw.header[252..254].copy_from_slice(&1i16.to_le_bytes()); // qform_code
    // b² + c² + d² = 1.47: not a rotation.
    raw.set_f32s(256, &[0.7, 0.7, 0.7, 0.0, 0.0, 0.0]);
    let p = raw.write(dir.path(), "q.nii");
    let e = read_image(&p).unwrap_err();
    assert!(e.to_string().contains("not a rotation"), "{e}");
    assert_names_file(&e, &p);
    // Within rounding of a unit quaternion (here exactly 1, a = 0): read, 3 mm voxels.
    raw.set_f32s(256, &[1.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    let p = raw.write(dir.path(), "q1.nii");
    let v = read_image(&p).unwrap();
    assert!(
        v.spacing().iter().all(|s| (s - 3.0).abs() < 1e-6),
        "{:?}",
        v.spacing()
    );
}

#[test]
fn bad_magic() {
    let dir = tmp();
    let mut raw = good_raw();
    raw.header[344..348].copy_from_slice(b"abc\0");
    let p = raw.write(dir.path(), "m.nii");
    let e = read_image(&p).unwrap_err();
    assert!(matches!(e, Error::InvalidNifti { .. }), "{e}");
    assert!(e.to_string().contains("magic"), "{e}");
    assert_names_file(&e, &p);
    // Too short to hold a header.
    std::fs::write(&p, b"short").unwrap();
    assert!(matches!(
        read_image(&p).unwrap_err(),
        Error::InvalidNifti { .. }
    ));
}

#[test]
fn bad_zero_or_negative_pixdim() {
    let dir = tmp();
    for (name, v) in [("zero", 0.0f32), ("negative", -1.5), ("nan", f32::NAN)] {
        let mut raw = good_raw();
        raw.pixdim([1.0, v, 1.0]);
        let p = raw.write(dir.path(), &format!("{name}.nii.gz"));
        let e = read_image(&p).unwrap_err();
        match &e {
            Error::BadHeader { field, .. } => assert_eq!(*field, "pixdim[2]"),
            other => panic!("{name}: {other}"),
        }
        assert_names_file(&e, &p);
    }
}

#[test]
fn bad_dimensions_overflow_or_exceed_the_limit() {
    let dir = tmp();
    // 32767^3 voxels of f64 overflows any budget (and 32-bit usize); nothing is allocated.
    let raw = RawNii::new(&[32767, 32767, 32767], 64, 64, vec![]);
    let p = raw.write(dir.path(), "huge.nii");
    let e = read_image(&p).unwrap_err();
    assert!(matches!(e, Error::LimitExceeded { .. }), "{e}");
    assert_names_file(&e, &p);
    let e = ReadOptions::new()
        .limits(Limits::unlimited())
        .read_image(&p)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::LimitExceeded { .. } | Error::OutOfMemory { .. } | Error::Truncated { .. }
        ),
        "{e}"
    );
    // A small volume over a small configured limit.
    let p = good_raw().write(dir.path(), "small.nii");
    let e = ReadOptions::new()
        .limits(Limits::default().max_voxels(63))
        .read_image(&p)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::LimitExceeded {
                what: "voxel count",
                requested: 64,
                ..
            }
        ),
        "{e}"
    );
    let e = ReadOptions::new()
        .limits(Limits::default().max_alloc(100))
        .read_image(&p)
        .unwrap_err();
    assert!(matches!(e, Error::LimitExceeded { .. }), "{e}");
    // Negative (as i16) and zero sizes.
    let mut raw = good_raw();
    raw.header[42..44].copy_from_slice(&(-4i16).to_le_bytes());
    let e = read_image(raw.write(dir.path(), "neg.nii")).unwrap_err();
    assert!(
        matches!(
            e,
            Error::BadHeader {
                field: "dim[1]",
                ..
            }
        ),
        "{e}"
    );
    let mut raw = good_raw();
    raw.header[44..46].copy_from_slice(&0u16.to_le_bytes());
    let e = read_image(raw.write(dir.path(), "zero.nii")).unwrap_err();
    assert!(
        matches!(
            e,
            Error::BadHeader {
                field: "dim[2]",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn bad_real_4d_data() {
    let dir = tmp();
    let raw = RawNii::new(&[2, 2, 2, 3], 2, 8, vec![0; 24]);
    let p = raw.write(dir.path(), "4d.nii.gz");
    let e = read_image(&p).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    assert!(e.to_string().contains("dim[4] = 3"), "{e}");
    assert_names_file(&e, &p);
    // Read on purpose as channels: one volume per entry of the 4th axis.
    let raw = RawNii::new(&[2, 2, 2, 3], 2, 8, (0..24).collect());
    let p = raw.write(dir.path(), "4d-channels.nii");
    let ch = ReadOptions::new().read_channels(&p).unwrap();
    assert_eq!(ch.len(), 3);
    assert_eq!(ch[2].get([0, 0, 0]), 16.0);
    assert_eq!(ch[1].get([1, 1, 1]), 15.0);
    // 5-D data is still refused.
    let raw = RawNii::new(&[2, 2, 2, 1, 2], 2, 8, vec![0; 16]);
    let e = ReadOptions::new()
        .read_channels(raw.write(dir.path(), "5d.nii"))
        .unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
}

#[test]
fn bad_nan_voxels() {
    let dir = tmp();
    let mut vals = vec![1.0f32; 8];
    vals[5] = f32::NAN;
    vals[6] = f32::INFINITY;
    let raw = RawNii::new(&[2, 2, 2], 16, 32, le_bytes(&vals, f32::to_le_bytes));
    let p = raw.write(dir.path(), "nan.nii");
    let e = read_image(&p).unwrap_err();
    match &e {
        Error::NonFinite { count, first, .. } => {
            assert_eq!(*count, 2);
            assert_eq!(*first, [1, 0, 1]);
        }
        other => panic!("{other}"),
    }
    assert_names_file(&e, &p);
    // Allowed on request; preprocessing still refuses it.
    let v = ReadOptions::new()
        .allow_non_finite(true)
        .read_image(&p)
        .unwrap();
    let e = preprocess(v, None, &PreprocessOptions::default()).unwrap_err();
    assert!(matches!(e, Error::NonFinite { .. }), "{e}");
}

#[test]
fn bad_label_grid_differs_from_image() {
    let dir = tmp();
    let img = good_raw().write(dir.path(), "img.nii.gz");
    // Same shape, shifted origin.
    let mut raw = RawNii::new(&[4, 4, 4], 2, 8, vec![1; 64]);
    let mut a = geometry::IDENTITY;
    a[0][3] = 12.0;
    raw.sform(&a);
    let lab = raw.write(dir.path(), "lab.nii.gz");
    let e = read_image_and_label(&img, &lab).unwrap_err();
    assert!(matches!(e, Error::GridMismatch { .. }), "{e}");
    assert_names_file(&e, &img);
    assert_names_file(&e, &lab);
    // Other shape.
    let lab2 = RawNii::new(&[4, 4, 5], 2, 8, vec![1; 80]).write(dir.path(), "lab2.nii.gz");
    let e = read_image_and_label(&img, &lab2).unwrap_err();
    assert!(e.to_string().contains("shape"), "{e}");
    // And through preprocess with volumes in memory.
    let e = preprocess(
        read_image(&img).unwrap(),
        Some(read_label(&lab).unwrap()),
        &PreprocessOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::GridMismatch { .. }), "{e}");
}

#[test]
fn bad_label_values() {
    let dir = tmp();
    let vals = [0.0f32, 1.0, 2.5, 3.0, 0.0, 0.0, 0.0, 0.0];
    let p = RawNii::new(&[2, 2, 2], 16, 32, le_bytes(&vals, f32::to_le_bytes))
        .write(dir.path(), "l.nii");
    let e = read_label(&p).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidLabel {
                index: [0, 1, 0],
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn bad_missing_file_and_bitpix() {
    let dir = tmp();
    let p = dir.path().join("nope.nii.gz");
    let e = read_image(&p).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert_names_file(&e, &p);
    let mut raw = good_raw();
    raw.set_i16(72, 8);
    let e = read_image(raw.write(dir.path(), "bitpix.nii")).unwrap_err();
    assert!(
        matches!(
            e,
            Error::BadHeader {
                field: "bitpix",
                ..
            }
        ),
        "{e}"
    );
    let mut raw = good_raw();
    raw.set_i16(70, 1792); // complex128
    raw.set_i16(72, 256);
    let e = read_image(raw.write(dir.path(), "complex.nii")).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
}

#[test]
fn preprocess_of_a_non_ct_volume_is_an_empty_foreground_error() {
    let v = Volume::filled(-1000f32, [8, 8, 8], geometry::IDENTITY).unwrap();
    let e = preprocess(v, None, &PreprocessOptions::default()).unwrap_err();
    assert!(matches!(e, Error::EmptyForeground { .. }), "{e}");
}

#[test]
fn preprocess_inverse_on_an_oblique_lps_volume() {
    // An LPS volume with 0.8 x 0.8 x 2 mm voxels, slightly rotated: after preprocessing and
    // inversion, every label voxel comes back (1.5 mm is coarser, so compare a blocky label).
    let ang: f64 = 0.05;
    let (s, c) = ang.sin_cos();
    let affine = [
        [-0.8 * c, 0.8 * s, 0.0, 90.0],
        [-0.8 * s, -0.8 * c, 0.0, 120.0],
        [0.0, 0.0, 2.0, -50.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    let shape = [60, 50, 20];
    let mut img = Volume::filled(-1000f32, shape, affine).unwrap();
    let mut lab = Volume::filled(0u8, shape, affine).unwrap();
    for z in 4..16 {
        for y in 10..40 {
            for x in 15..45 {
                let i = img.index([x, y, z]);
                img.data_mut()[i] = 60.0;
                lab.data_mut()[i] = 1 + u8::from(x >= 30);
            }
        }
    }
    assert_eq!(img.axcodes(), "LPS");
    // At the input's own voxel size the resampled grid is the oriented input grid, so the
    // round trip is exact.
    let same = PreprocessOptions {
        pixdim: [0.8, 0.8, 2.0],
        ..PreprocessOptions::default()
    };
    let pre = preprocess(img.clone(), Some(lab.clone()), &same).unwrap();
    let back = pre
        .record
        .invert(pre.label.as_ref().unwrap(), Interpolation::Nearest)
        .unwrap();
    assert!(back.data() == lab.data(), "exact round trip failed");
    let back_img = pre
        .record
        .invert(&pre.image, Interpolation::Linear)
        .unwrap();
    assert!(
        back_img
            .data()
            .iter()
            .all(|v| *v == 0.0 || *v == 1.0 || (*v - 235.0 / 425.0).abs() < 1e-6)
    );

    let pre = preprocess(img, Some(lab.clone()), &PreprocessOptions::default()).unwrap();
    assert_eq!(pre.image.axcodes(), "RAS");
    assert!(pre.image.spacing().iter().all(|s| (s - 1.5).abs() < 1e-9));
    let back = pre
        .record
        .invert(pre.label.as_ref().unwrap(), Interpolation::Nearest)
        .unwrap();
    assert_eq!(back.shape(), shape);
    assert_eq!(back.affine(), &affine);
    let same = back
        .data()
        .iter()
        .zip(lab.data())
        .filter(|(a, b)| a == b)
        .count();
    let frac = same as f64 / lab.len() as f64;
    // 0.8 mm -> 1.5 mm -> 0.8 mm loses only voxels at the blocks' borders.
    assert!(frac > 0.95, "only {frac} of voxels survive the round trip");
    // The record survives JSON.
    let json = serde_json::to_string(&pre.record).unwrap();
    let rec: univ_io::PreprocessRecord = serde_json::from_str(&json).unwrap();
    assert_eq!(rec, pre.record);
}

// ---------------------------------------------------------------------------------------------
// DICOM series.

#[cfg(feature = "dicom")]
mod dicom {
    use super::shared;
    use univ_io::dicom::{DicomReadOptions, read_dicom_series};
    use univ_io::{OrientTransform, read_label};

    /// Inputs the fuzzer found (or that were crafted after its findings), committed under
    /// `tests/fuzz/`: each is refused with a message, before dicom-rs allocates or recurses.
    #[test]
    fn hostile_dicom_files_found_by_fuzzing_are_refused_up_front() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fuzz");
        let opts = DicomReadOptions::default();
        let read = |rel: &str| {
            let dir = tempfile::tempdir().unwrap();
            let data = std::fs::read(root.join(rel)).unwrap();
            let f = dir.path().join("x.dcm");
            std::fs::write(&f, data).unwrap();
            let start = std::time::Instant::now();
            let e = read_dicom_series(&f, &opts).unwrap_err().to_string();
            assert!(start.elapsed().as_secs_f64() < 2.0, "{rel}: slow");
            e
        };
        let e = read("dicom_file/finding-oom-pixel-data-declares-3gb");
        assert!(e.contains("(7FE0,0010) declares 3000000000 bytes"), "{e}");
        // An unknown VR is read as UN, whose length has 4 bytes (after 2 reserved ones).
        let e = read("dicom_file/finding-oom-unknown-vr-has-a-4-byte-length");
        assert!(e.contains("(0010,5000) declares 4026531840 bytes"), "{e}");
        let e = read("dicom_file/finding-deep-sequence-nesting");
        assert!(e.contains("nest more than 64 deep"), "{e}");
        // Bits Stored 0 in one slice of a series: dicom-pixeldata asserts on it; refused first.
        let dir = tempfile::tempdir().unwrap();
        let data = std::fs::read(root.join("dicom_series/finding-panic-bits-stored-zero")).unwrap();
        let sep = b"=UNIV-NEXT-SLICE=";
        let mut rest = &data[..];
        for i in 0.. {
            let at = rest.windows(sep.len()).position(|w| w == sep);
            let part = &rest[..at.unwrap_or(rest.len())];
            std::fs::write(dir.path().join(format!("s{i}.dcm")), part).unwrap();
            match at {
                Some(a) => rest = &rest[a + sep.len()..],
                None => break,
            }
        }
        let e = read_dicom_series(dir.path(), &opts)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Bits Stored 0") && e.contains("s1.dcm"), "{e}");
        // The seed it came from reads.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.dcm");
        std::fs::copy(root.join("dicom_file/slice0.dcm"), &f).unwrap();
        assert_eq!(
            read_dicom_series(&f, &opts).unwrap().volume.shape(),
            [8, 8, 1]
        );
    }

    #[test]
    #[ignore = "needs ../shared (real CT data and golden fixtures)"]
    fn the_j2k_and_uncompressed_series_give_one_volume_on_the_reference_grid() {
        let Some(shared) = shared::shared_dir() else {
            return;
        };
        let d = shared.join("data/dicom");
        let opts = DicomReadOptions::default();
        let j2k = read_dicom_series(&d.join("example_ct_dicom_j2k"), &opts).unwrap();
        let raw = read_dicom_series(&d.join("example_ct_dicom_uncompressed"), &opts).unwrap();
        assert_eq!(j2k.volume.shape(), [512, 512, 20]);
        assert_eq!(
            j2k.volume.data(),
            raw.volume.data(),
            "decoded voxels differ"
        );
        assert_eq!(j2k.volume.affine(), raw.volume.affine());
        assert_eq!(j2k.slices.len(), 20);
        assert_eq!(j2k.modality, "CT");
        assert!(
            j2k.transfer_syntax.starts_with("1.2.840.10008.1.2.4.90"),
            "{}",
            j2k.transfer_syntax
        );
        let gaps = j2k.slice_gap_range;
        assert!(
            (gaps[0] - 2.0).abs() < 1e-3 && (gaps[1] - 2.0).abs() < 1e-3,
            "{gaps:?}"
        );
        // The reference segmentation made on this series: same grid after orienting both.
        let seg = read_label(shared.join("data/ct/example_seg_dicom.nii.gz")).unwrap();
        let to_ras = |shape, affine| OrientTransform::to_axcodes(affine, shape, "RAS").unwrap();
        let a = to_ras(j2k.volume.shape(), j2k.volume.affine());
        let b = to_ras(seg.shape(), seg.affine());
        assert_eq!(a.out_shape(), b.out_shape());
        let (fa, fb) = (
            a.out_affine(j2k.volume.affine()),
            b.out_affine(seg.affine()),
        );
        for r in 0..3 {
            for c in 0..4 {
                assert!(
                    (fa[r][c] - fb[r][c]).abs() < 1e-3,
                    "affine differs at [{r}][{c}]: {fa:?} vs {fb:?}"
                );
            }
        }
        // The liver (TotalSegmentator id 5) lands on liver-range HU.
        let vol = a.apply(j2k.volume.clone()).unwrap();
        let seg = b.apply(seg).unwrap();
        let liver: Vec<f32> = vol
            .data()
            .iter()
            .zip(seg.data())
            .filter(|(_, l)| **l == 5)
            .map(|(v, _)| *v)
            .collect();
        assert!(liver.len() > 10_000, "{} liver voxels", liver.len());
        let mut sorted = liver.clone();
        sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let median = sorted[sorted.len() / 2];
        assert!((20.0..=200.0).contains(&median), "liver median {median} HU");
    }

    #[test]
    #[ignore = "needs ../shared (real CT data and golden fixtures)"]
    fn a_single_file_reads_as_one_slice_in_hounsfield_units() {
        let Some(shared) = shared::shared_dir() else {
            return;
        };
        let s = read_dicom_series(
            &shared.join("data/dicom/CT_small.dcm"),
            &DicomReadOptions::default(),
        )
        .unwrap();
        assert_eq!(s.volume.shape(), [128, 128, 1]);
        let (lo, hi) = s.volume.min_max();
        assert!(lo < -500.0 && hi > 500.0 && hi < 4000.0, "{lo}..{hi}");
        // One slice: its spacing is the header's (Spacing Between Slices, 5 mm in
        // CT_small.dcm), not the pixel spacing (0.66 mm), and a warning says where it came from.
        let sp = s.volume.spacing();
        assert!((sp[2] - 5.0).abs() < 1e-9, "{sp:?}");
        assert!(
            s.warnings
                .iter()
                .any(|w| w.contains("5 mm") && w.contains("Spacing Between")),
            "{:?}",
            s.warnings
        );
    }

    /// Copies the uncompressed series into a scratch folder, editing files with `edit`.
    fn scratch_series(
        shared: &std::path::Path,
        edit: impl Fn(usize, &std::path::Path, &std::path::Path),
    ) -> tempfile::TempDir {
        let src = shared.join("data/dicom/example_ct_dicom_uncompressed");
        let dir = tempfile::tempdir().unwrap();
        let mut files: Vec<_> = std::fs::read_dir(&src)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for (i, f) in files.iter().enumerate() {
            let dst = dir.path().join(f.file_name().unwrap());
            edit(i, f, &dst);
        }
        dir
    }

    fn set_str(
        src: &std::path::Path,
        dst: &std::path::Path,
        tag: dicom_core::Tag,
        vr: dicom_core::VR,
        v: &str,
    ) {
        let mut obj = dicom_object::open_file(src).unwrap();
        obj.put_str(tag, vr, v);
        obj.write_to_file(dst).unwrap();
    }

    #[test]
    #[ignore = "needs ../shared (real CT data and golden fixtures)"]
    fn bad_series_get_errors_or_warnings_that_name_the_files() {
        use dicom_core::VR;
        use dicom_dictionary_std::tags;
        let Some(shared) = shared::shared_dir() else {
            return;
        };
        let opts = DicomReadOptions::default();
        let copy = |_: usize, s: &std::path::Path, d: &std::path::Path| {
            std::fs::copy(s, d).unwrap();
        };
        // A missing slice: the gap is named with its two neighbours.
        let dir = scratch_series(&shared, |i, s, d| {
            if i != 7 {
                copy(i, s, d)
            }
        });
        let e = read_dicom_series(dir.path(), &opts)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("uneven slice spacing") && e.contains("1 slice(s) missing"),
            "{e}"
        );
        // A duplicated slice position.
        let dir = scratch_series(&shared, copy);
        let first = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::copy(&first, dir.path().join("zz_copy.dcm")).unwrap();
        let e = read_dicom_series(dir.path(), &opts)
            .unwrap_err()
            .to_string();
        assert!(e.contains("duplicate slice position"), "{e}");
        // Two series: refused unless one is chosen, then the other is skipped with a warning.
        let dir = scratch_series(&shared, |i, s, d| {
            if i < 5 {
                set_str(
                    s,
                    d,
                    tags::SERIES_INSTANCE_UID,
                    VR::UI,
                    "1.2.826.0.1.3680043.99.1",
                );
            } else {
                copy(i, s, d)
            }
        });
        let e = read_dicom_series(dir.path(), &opts)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("holds 2 series") && e.contains("1.2.826.0.1.3680043.99.1"),
            "{e}"
        );
        let one = DicomReadOptions {
            series: Some("1.2.826.0.1.3680043.99.1".into()),
            ..DicomReadOptions::default()
        };
        let s = read_dicom_series(dir.path(), &one).unwrap();
        assert_eq!(s.slices.len(), 5);
        assert!(
            s.warnings.iter().any(|w| w.contains("skipped 15 file(s)")),
            "{:?}",
            s.warnings
        );
        // Not CT: read, with a warning.
        let dir = scratch_series(&shared, |_, s, d| {
            set_str(s, d, tags::MODALITY, VR::CS, "MR")
        });
        let s = read_dicom_series(dir.path(), &opts).unwrap();
        assert!(
            s.warnings.iter().any(|w| w.contains("not CT")),
            "{:?}",
            s.warnings
        );
        // A stray non-DICOM file is skipped with a warning naming it.
        let dir = scratch_series(&shared, copy);
        std::fs::write(dir.path().join("notes.txt"), b"not dicom").unwrap();
        let s = read_dicom_series(dir.path(), &opts).unwrap();
        assert_eq!(s.slices.len(), 20);
        assert!(
            s.warnings.iter().any(|w| w.contains("notes.txt")),
            "{:?}",
            s.warnings
        );
        // A truncated slice: refused, naming it; left out only when asked, and then a slice
        // missing in the middle leaves a gap that names its neighbours.
        let truncated = |at: usize| {
            scratch_series(&shared, move |i, s, d| {
                if i == at {
                    let b = std::fs::read(s).unwrap();
                    std::fs::write(d, &b[..200]).unwrap();
                } else {
                    std::fs::copy(s, d).unwrap();
                }
            })
        };
        let skip = DicomReadOptions {
            skip_unreadable: true,
            ..DicomReadOptions::default()
        };
        let dir = truncated(3);
        let e = read_dicom_series(dir.path(), &opts)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--skip-unreadable"), "{e}");
        let e = read_dicom_series(dir.path(), &skip)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing"), "{e}");
        // The first slice unreadable: refused (it would silently shorten the volume); with
        // skip_unreadable read without it, with a warning naming it.
        let dir = truncated(0);
        let e = read_dicom_series(dir.path(), &opts)
            .unwrap_err()
            .to_string();
        assert!(e.contains("looks like DICOM"), "{e}");
        let s = read_dicom_series(dir.path(), &skip).unwrap();
        assert_eq!(s.slices.len(), 19);
        assert!(
            s.warnings.iter().any(|w| w.contains("skipped")),
            "{:?}",
            s.warnings
        );
        // NaN in the orientation or position: a typed error naming the file, not a panic.
        for (tag, value) in [
            (tags::IMAGE_ORIENTATION_PATIENT, "1\\0\\0\\0\\NaN\\0"),
            (tags::IMAGE_POSITION_PATIENT, "0\\NaN\\0"),
        ] {
            let dir = scratch_series(&shared, |i, s, d| {
                if i == 4 {
                    set_str(s, d, tag, VR::DS, value);
                } else {
                    copy(i, s, d)
                }
            });
            let e = read_dicom_series(dir.path(), &opts)
                .unwrap_err()
                .to_string();
            assert!(e.contains("non-finite"), "{e}");
        }
        // Gantry tilt: positions shifted sideways in proportion to the slice index.
        let dir = scratch_series(&shared, |i, s, d| {
            let obj = dicom_object::open_file(s).unwrap();
            let p = obj
                .element(tags::IMAGE_POSITION_PATIENT)
                .unwrap()
                .to_multi_float64()
                .unwrap();
            let z = p[2];
            let _ = i;
            // Shift y by 0.2 mm per mm of z: a tilt of about 11°.
            let v = format!("{}\\{}\\{}", p[0], p[1] + 0.2 * z, p[2]);
            set_str(s, d, tags::IMAGE_POSITION_PATIENT, VR::DS, &v);
        });
        let e = read_dicom_series(dir.path(), &opts)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("gantry tilt") && e.contains("--allow-tilt"),
            "{e}"
        );
        let tilted = DicomReadOptions {
            allow_tilt: true,
            ..DicomReadOptions::default()
        };
        assert_eq!(
            read_dicom_series(dir.path(), &tilted).unwrap().slices.len(),
            20
        );
        // An empty folder and a folder of non-DICOM files.
        let empty = tempfile::tempdir().unwrap();
        assert!(read_dicom_series(empty.path(), &opts).is_err());
        std::fs::write(empty.path().join("a.txt"), b"x").unwrap();
        let e = read_dicom_series(empty.path(), &opts)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no DICOM image files"), "{e}");
    }

    /// Writes a DICOM-SEG of the reference segmentation of the series (put onto the series'
    /// grid), reads it back and rebuilds every mask from its frames.
    pub(crate) fn write_reference_seg(
        shared: &std::path::Path,
        out: &std::path::Path,
    ) -> (univ_io::dicom::DicomSeries, Vec<(u8, Vec<bool>)>) {
        use univ_io::dicom_seg::{Code, SegOptions, Segment, write_dicom_seg};
        let series = read_dicom_series(
            &shared.join("data/dicom/example_ct_dicom_j2k"),
            &DicomReadOptions::default(),
        )
        .unwrap();
        let lab = read_label(shared.join("data/ct/derived_example_seg_dicom_um32.nii.gz")).unwrap();
        let lab = univ_io::align_label_to(lab, &series.volume).unwrap();
        let mut ids: Vec<u8> = lab.data().iter().copied().filter(|v| *v > 0).collect();
        ids.sort_unstable();
        ids.dedup();
        let masks: Vec<(u8, Vec<bool>)> = ids
            .iter()
            .map(|id| (*id, lab.data().iter().map(|v| v == id).collect()))
            .collect();
        let segments: Vec<Segment> = masks
            .iter()
            .map(|(id, m)| Segment {
                label: format!("class {id}"),
                category: Code::new("123037004", "SCT", "Anatomical Structure"),
                property: Code::new(&format!("UNIV{id:03}"), "99UNIV", &format!("class {id}")),
                colour: [200, 100, 50],
                mask: univ_io::ClassMask::from_bools(m, series.volume.shape()),
            })
            .collect();
        let (n, frames) = write_dicom_seg(out, &series, &segments, &SegOptions::default()).unwrap();
        assert_eq!(n, masks.len());
        assert!(frames >= n);
        (series, masks)
    }

    #[test]
    #[ignore = "needs ../shared (real CT data and golden fixtures)"]
    fn dicom_seg_round_trips_the_masks_and_references_the_source() {
        use dicom_dictionary_std::tags;
        let Some(shared) = shared::shared_dir() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("segmentation.dcm");
        let (series, masks) = write_reference_seg(&shared, &path);
        if let Some(keep) = std::env::var_os("UNIV_KEEP_SEG") {
            std::fs::copy(&path, keep).unwrap();
        }
        let obj = dicom_object::open_file(&path).unwrap();
        let text = |e: &dicom_object::InMemDicomObject, t| {
            e.element(t).unwrap().to_str().unwrap().to_string()
        };
        assert_eq!(
            obj.meta().media_storage_sop_class_uid(),
            "1.2.840.10008.5.1.4.1.1.66.4"
        );
        assert_eq!(text(&obj, tags::MODALITY), "SEG");
        assert_eq!(
            text(&obj, tags::FRAME_OF_REFERENCE_UID),
            series.frame_of_reference_uid
        );
        // This anonymised series has no Study Instance UID: the SEG makes one up.
        assert!(series.study_uid.is_empty());
        assert!(text(&obj, tags::STUDY_INSTANCE_UID).starts_with("2.25."));
        assert!(series.slices.iter().all(|s| !s.sop_instance_uid.is_empty()));
        let segs = obj
            .element(tags::SEGMENT_SEQUENCE)
            .unwrap()
            .items()
            .unwrap();
        assert_eq!(segs.len(), masks.len());
        let frames = obj
            .element(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
            .unwrap()
            .items()
            .unwrap();
        let n: usize = text(&obj, tags::NUMBER_OF_FRAMES).trim().parse().unwrap();
        assert_eq!(frames.len(), n);
        let [cols, rows, nsl] = series.volume.shape();
        let plane = rows * cols;
        let bits = obj.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap();
        let mut rebuilt = vec![vec![false; plane * nsl]; masks.len()];
        let sop_of: std::collections::HashMap<String, usize> = series
            .slices
            .iter()
            .enumerate()
            .map(|(k, s)| (s.sop_instance_uid.clone(), k))
            .collect();
        for (f, item) in frames.iter().enumerate() {
            let seg_no: usize = item
                .element(tags::SEGMENT_IDENTIFICATION_SEQUENCE)
                .unwrap()
                .items()
                .unwrap()[0]
                .element(tags::REFERENCED_SEGMENT_NUMBER)
                .unwrap()
                .to_int::<u16>()
                .unwrap() as usize;
            // The frame's slice, from the source image it references.
            let der = &item
                .element(tags::DERIVATION_IMAGE_SEQUENCE)
                .unwrap()
                .items()
                .unwrap()[0];
            let src = &der
                .element(tags::SOURCE_IMAGE_SEQUENCE)
                .unwrap()
                .items()
                .unwrap()[0];
            let k = sop_of[&text(src, tags::REFERENCED_SOP_INSTANCE_UID)];
            for p in 0..plane {
                let bit = f * plane + p;
                if bits[bit / 8] >> (bit % 8) & 1 == 1 {
                    rebuilt[seg_no - 1][k * plane + p] = true;
                }
            }
        }
        for (i, (id, m)) in masks.iter().enumerate() {
            let a = rebuilt[i].iter().filter(|v| **v).count();
            let b = m.iter().filter(|v| **v).count();
            let both = rebuilt[i].iter().zip(m).filter(|(x, y)| **x && **y).count();
            assert!(
                rebuilt[i] == *m,
                "class {id} differs after the round trip: {a} vs {b} voxels, {both} shared; {} bytes",
                bits.len()
            );
        }
    }
}
