//! Embedding the 32 class prompts with a ViT-B/32-shaped text encoder (random weights) on the
//! CPU: tokenization and the forward pass.
//!
//! `cargo bench -p univ-clip --bench embed`

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use criterion::{Criterion, criterion_group, criterion_main};
use univ_clip::{ClipTextConfig, ClipTextModel, ClipTokenizer};

fn bench(c: &mut Criterion) {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/clip_tokenizer");
    if !dir.join("derived_vocab.json").exists() {
        eprintln!("skipping: ../shared/data/clip_tokenizer not found");
        return;
    }
    let tok = ClipTokenizer::from_files(
        dir.join("derived_vocab.json"),
        dir.join("derived_merges.txt"),
    )
    .unwrap();
    let varmap = VarMap::new();
    let model = ClipTextModel::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        &ClipTextConfig::vit_b_32(),
    )
    .unwrap();
    // The 32 official prompts, as the fixture records them.
    let meta = dir.join("../../fixtures/clip_text/meta.json");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(meta).unwrap()).unwrap();
    let prompts: Vec<String> = meta["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let mut g = c.benchmark_group("clip_vit_b_32");
    g.sample_size(10);
    g.bench_function("tokenize_32_prompts", |b| {
        b.iter(|| tok.encode_batch(&prompts, &Device::Cpu).unwrap())
    });
    let ids = tok.encode_batch(&prompts, &Device::Cpu).unwrap();
    g.bench_function("encode_32_prompts_77_tokens", |b| {
        b.iter(|| model.encode_text(&ids).unwrap())
    });
    // What `ClipTextEncoder::embed` runs: the ids cut after the longest prompt (16 tokens).
    let cut = ids.narrow(1, 0, 16).unwrap();
    g.bench_function("encode_32_prompts_16_tokens", |b| {
        b.iter(|| model.encode_text(&cut).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
