//! Preprocessing of `../shared/data/ct/example_ct.nii.gz` (122×101×112 at 3 mm → 243×201×223 at
//! 1.5 mm, cropped to 243×193×223): reading, the whole pipeline, and its inversion.
//!
//! `cargo bench -p univ-io --bench preprocess`

use std::path::PathBuf;

use criterion::{Criterion, criterion_group, criterion_main};
use univ_io::{Interpolation, PreprocessOptions, preprocess, read_image};

fn ct_path() -> Option<PathBuf> {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/ct/example_ct.nii.gz");
    p.exists().then_some(p)
}

fn bench(c: &mut Criterion) {
    let Some(path) = ct_path() else {
        eprintln!("skipping: ../shared/data/ct/example_ct.nii.gz not found");
        return;
    };
    let image = read_image(&path).expect("read example_ct");
    let opts = PreprocessOptions::universal_model();
    let mut g = c.benchmark_group("example_ct");
    g.sample_size(20);
    g.bench_function("read_nii_gz", |b| b.iter(|| read_image(&path).unwrap()));
    g.bench_function("preprocess", |b| {
        b.iter(|| preprocess(image.clone(), None, &opts).unwrap())
    });
    let pre = preprocess(image.clone(), None, &opts).unwrap();
    let mask = pre.image.map(|v| u8::from(v > 0.5));
    g.bench_function("invert_label", |b| {
        b.iter(|| pre.record.invert(&mask, Interpolation::Nearest).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
