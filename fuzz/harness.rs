//! What each fuzz target does with one input: write it where a reader expects a file, read it
//! with tight limits, and use what comes back the way the `univ` command would. A reader may
//! refuse an input (an `Err`, reported as `false`); it must never panic, hang or allocate past
//! its limits. Shared by the cargo-fuzz targets and the test that replays the committed inputs
//! (`tests/fuzz_replay.rs`), so a finding is replayed by the very code that found it.

use std::path::{Path, PathBuf};

use univ::io::Limits;

/// The limits the targets read under: 2²² voxels and 256 MiB of buffers, so that an input the
/// readers accept stays far inside libFuzzer's 2 GiB memory cap.
pub fn limits() -> Limits {
    Limits::default().max_voxels(1 << 22).max_alloc(256 << 20)
}

/// The targets' tensor-data budget for checkpoints and embeddings.
pub const MAX_TENSOR_BYTES: u64 = 256 << 20;

/// A scratch folder of this process (and thread), made on first use.
fn scratch() -> PathBuf {
    let dir = std::env::temp_dir()
        .join(format!(
            "univ-fuzz-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ))
        .to_string_lossy()
        .replace(['(', ')'], "");
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

/// Writes `data` to `name` in the scratch folder.
fn put(name: &str, data: &[u8]) -> PathBuf {
    let p = scratch().join(name);
    std::fs::write(&p, data).expect("scratch file");
    p
}

/// Preprocesses a volume as `univ preprocess` does (official settings, the targets' limits)
/// and maps a label back onto its grid, when the volume is small enough to be quick.
fn use_volume(v: univ::io::Volume<f32>) {
    if v.len() > 1 << 16 {
        return;
    }
    let opts = univ::io::PreprocessOptions {
        limits: limits(),
        ..Default::default()
    };
    if let Ok(p) = univ::io::preprocess(v, None, &opts) {
        let label = p.image.map(|x| u8::from(x > 0.5));
        let _ = p.record.invert(&label, univ::io::Interpolation::Nearest);
    }
}

/// Reads a NIfTI file as image, as label map and as channels, and its header alone; the
/// image, else the first channel, else the label map.
fn read_nifti(path: &Path) -> Option<univ::io::Volume<f32>> {
    let opts = univ::io::nii::ReadOptions::new().limits(limits());
    let _ = univ::io::nii::read_header(path, &limits());
    let label = opts.read_label(path).ok();
    let channels = opts.read_channels(path).ok();
    opts.read_image(path)
        .ok()
        .or_else(|| channels.and_then(|c| c.into_iter().next()))
        .or_else(|| label.map(|l| l.map(f32::from)))
}

/// A NIfTI file, read plain (`.nii`) and gzipped (`.nii.gz`, compressed here): both readings
/// must agree, voxel for voxel.
pub fn nifti(data: &[u8]) -> bool {
    let plain = read_nifti(&put("in.nii", data));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, data).expect("gzip");
    let zipped = read_nifti(&put("in.nii.gz", &gz.finish().expect("gzip")));
    match (&plain, &zipped) {
        (Some(a), Some(b)) => {
            assert_eq!(a.shape(), b.shape());
            assert!(
                a.data()
                    .iter()
                    .zip(b.data())
                    .all(|(x, y)| x.to_bits() == y.to_bits())
            );
        }
        (None, None) => {}
        _ => panic!("the plain and the gzipped file read differently"),
    }
    let accepted = plain.is_some();
    if let Some(v) = plain {
        use_volume(v);
    }
    accepted
}

/// Bytes read as a `.nii.gz` file as they are: the gzip layer itself (CRC, trailing data, a
/// stream longer than its header says).
pub fn nifti_gz(data: &[u8]) -> bool {
    read_nifti(&put("raw.nii.gz", data))
        .map(use_volume)
        .is_some()
}

fn dicom_options() -> univ::io::dicom::DicomReadOptions {
    univ::io::dicom::DicomReadOptions {
        limits: limits(),
        ..Default::default()
    }
}

/// One DICOM file: listed as `univ info` does, then read as a one-slice series.
pub fn dicom_file(data: &[u8]) -> bool {
    let p = put("in.dcm", data);
    let _ = univ::io::dicom::list_series(&p);
    univ::io::dicom::read_dicom_series(&p, &dicom_options())
        .map(|s| use_volume(s.volume))
        .is_ok()
}

/// The separator between the files of a series in one fuzz input.
pub const SLICE_SEPARATOR: &[u8] = b"=UNIV-NEXT-SLICE=";

/// A DICOM series: the input split at [`SLICE_SEPARATOR`] into up to 8 files of one folder,
/// listed, then read with and without `skip_unreadable`.
pub fn dicom_series(data: &[u8]) -> bool {
    let dir = scratch().join("series");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("series folder");
    let mut rest = data;
    for i in 0..8 {
        let (part, next) = match find(rest, SLICE_SEPARATOR) {
            Some(at) if i < 7 => (&rest[..at], Some(&rest[at + SLICE_SEPARATOR.len()..])),
            _ => (rest, None),
        };
        std::fs::write(dir.join(format!("slice{i}.dcm")), part).expect("slice");
        match next {
            Some(n) => rest = n,
            None => break,
        }
    }
    let _ = univ::io::dicom::list_series(&dir);
    let skip = univ::io::dicom::DicomReadOptions {
        skip_unreadable: true,
        ..dicom_options()
    };
    let _ = univ::io::dicom::read_dicom_series(&dir, &skip);
    univ::io::dicom::read_dicom_series(&dir, &dicom_options())
        .map(|s| use_volume(s.volume))
        .is_ok()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A checkpoint file: loaded, its metadata read, its configuration detected and (when the
/// weights are few) the model built, as `univ segment --checkpoint` does.
fn checkpoint(path: &Path) -> bool {
    let Ok(c) = univ::model::Checkpoint::load_within(path, MAX_TENSOR_BYTES) else {
        return false;
    };
    let _ = c.class_names();
    let _ = c.trained_classes();
    let _ = c.is_demo();
    if c.detect_config().is_ok() {
        let _ = c.build(&candle_core::Device::Cpu);
    }
    true
}

/// A `.pth` file (zip + pickle) as a checkpoint and as class embeddings; accepted when
/// either reader takes it.
pub fn pth(data: &[u8]) -> bool {
    let p = put("in.pth", data);
    let as_checkpoint = checkpoint(&p);
    univ::clip::ClassEmbeddings::load(&p).is_ok() || as_checkpoint
}

/// A `.safetensors` file as a checkpoint and as class embeddings; accepted when either
/// reader takes it.
pub fn safetensors(data: &[u8]) -> bool {
    let p = put("in.safetensors", data);
    let as_checkpoint = checkpoint(&p);
    univ::clip::ClassEmbeddings::load(&p).is_ok() || as_checkpoint
}

/// A `.npy` file as class embeddings.
pub fn npy(data: &[u8]) -> bool {
    univ::clip::ClassEmbeddings::load(put("in.npy", data)).is_ok()
}

/// A training configuration (TOML), parsed and checked as `univ train` does before it reads
/// any data.
pub fn train_toml(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let base = scratch();
    let Ok(cfg) = univ::train::TrainConfig::parse(text, &base, &base.join("train.toml")) else {
        return false;
    };
    let _ = cfg.model.class_names();
    let _ = cfg.dice_mode();
    true
}

/// A label map for `univ evaluate --label-map` (JSON).
pub fn label_map(data: &[u8]) -> bool {
    let p = put("map.json", data);
    let Ok(map) = univ::evaluate::read_label_map(&p) else {
        return false;
    };
    assert!(map.keys().all(|k| *k > 0));
    true
}

/// A target: takes one input, says whether the reader accepted it.
pub type Target = fn(&[u8]) -> bool;

/// Every target by name, for the replay test. Each returns whether the reader accepted the
/// input (so that the replay can check that the seeds still reach past the first checks).
pub const TARGETS: &[(&str, Target)] = &[
    ("nifti", nifti),
    ("nifti_gz", nifti_gz),
    ("dicom_file", dicom_file),
    ("dicom_series", dicom_series),
    ("pth", pth),
    ("safetensors", safetensors),
    ("npy", npy),
    ("train_toml", train_toml),
    ("label_map", label_map),
];
