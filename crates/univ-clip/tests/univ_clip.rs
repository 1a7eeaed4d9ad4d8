//! Integration tests of univ-clip: tokenizer against OpenAI's golden ids, the text model
//! against Hugging Face transformers, and the official class embedding.

#[path = "../../../tests/common/shared.rs"]
mod shared;

use candle_core::{DType, Device, Tensor};
use univ_clip::{ClassEmbeddings, ClipTextConfig, ClipTextModel, ClipTokenizer, Error};

fn golden() -> Option<serde_json::Value> {
    let p = shared::shared_file("data/clip_tokenizer/golden_universal_prompts_tokens.json")?;
    Some(serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
}

/// The 32 official prompts, from the fixture's record of what was embedded.
fn fixture_prompts(fx: &std::path::Path) -> Vec<String> {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("meta.json")).unwrap()).unwrap();
    meta["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn check_tokenizer(tok: &ClipTokenizer, g: &serde_json::Value, what: &str) {
    let mut n = 0;
    for key in [
        "prompts_utils_spelling",
        "prompts_clip_embedding_py_spelling",
    ] {
        for case in g[key].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            assert_eq!(
                tok.encode(text).unwrap(),
                ids(&case["ids_unpadded"]),
                "{what}: {text}"
            );
            assert_eq!(
                tok.encode_padded(text).unwrap(),
                ids(&case["ids_77"]),
                "{what}: {text}"
            );
            n += 1;
        }
    }
    for case in g["extra_cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text).unwrap(),
            ids(&case["ids_unpadded"]),
            "{what}: {text:?}"
        );
        n += 1;
    }
    assert_eq!(n, 70);
}

#[test]
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
fn tokenizer_matches_openai_on_every_golden_prompt() {
    let (Some(g), Some(dir)) = (golden(), shared::shared_dir()) else {
        return;
    };
    let d = dir.join("data/clip_tokenizer");
    let from_files =
        ClipTokenizer::from_files(d.join("derived_vocab.json"), d.join("derived_merges.txt"))
            .unwrap();
    check_tokenizer(&from_files, &g, "vocab.json + merges.txt");
    let from_gz = ClipTokenizer::from_bpe_gz(d.join("bpe_simple_vocab_16e6.txt.gz")).unwrap();
    check_tokenizer(&from_gz, &g, "bpe_simple_vocab_16e6.txt.gz");
    let from_json =
        ClipTokenizer::from_tokenizer_json(dir.join("fixtures/clip_text/tokenizer.json")).unwrap();
    check_tokenizer(&from_json, &g, "tokenizer.json");
    // A tokenizer.json we save reloads to the same ids.
    let tmp = tempfile::tempdir().unwrap();
    let saved = tmp.path().join("tokenizer.json");
    from_gz.inner().save(&saved, false).unwrap();
    check_tokenizer(
        &ClipTokenizer::from_tokenizer_json(&saved).unwrap(),
        &g,
        "saved tokenizer.json",
    );
}

#[test]
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
fn long_prompts_padding_and_truncation() {
    let Some(dir) = shared::shared_dir() else {
        return;
    };
    let d = dir.join("data/clip_tokenizer");
    let tok = ClipTokenizer::from_files(d.join("derived_vocab.json"), d.join("derived_merges.txt"))
        .unwrap();
    let long = "liver ".repeat(100);
    match tok.encode(&long) {
        Err(Error::PromptTooLong {
            tokens, context, ..
        }) => {
            assert_eq!(tokens, 102);
            assert_eq!(context, 77);
        }
        other => panic!("{other:?}"),
    }
    let t = tok.clone().with_truncation(true).encode(&long).unwrap();
    assert_eq!(t.len(), 77);
    assert_eq!(t[0], 49406);
    assert_eq!(t[76], 49407);
    let hf = tok
        .clone()
        .with_pad_id(49407)
        .encode_padded("a photo of a cat")
        .unwrap();
    assert_eq!(&hf[5..9], &[2368, 49407, 49407, 49407]);
    let batch = tok.encode_batch(&["a", "b c"], &Device::Cpu).unwrap();
    assert_eq!(batch.dims(), &[2, 77]);
    // Missing files are typed errors naming the file.
    let e =
        ClipTokenizer::from_files(d.join("nope.json"), d.join("derived_merges.txt")).unwrap_err();
    assert!(e.to_string().contains("nope.json"), "{e}");
    let e = ClipTokenizer::from_dir(dir.join("data")).unwrap_err();
    assert!(matches!(e, Error::File { .. }), "{e}");
}

fn close(name: &str, a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "{name}");
    let av = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let bv = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut worst = 0f32;
    for (x, y) in av.iter().zip(&bv) {
        let d = (x - y).abs();
        assert!(d <= 1e-4 + 1e-4 * y.abs(), "{name}: {x} vs {y}");
        worst = worst.max(d);
    }
    worst
}

#[test]
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
fn text_model_matches_hugging_face_transformers() {
    let Some(dir) = shared::shared_dir() else {
        return;
    };
    let fx = dir.join("fixtures/clip_text");
    let model = ClipTextModel::from_dir(fx.join("model"), &Device::Cpu).unwrap();
    let cfg = model.config();
    assert_eq!(
        (cfg.hidden_size, cfg.num_hidden_layers, cfg.projection_dim),
        (32, 2, 16)
    );
    let inputs =
        candle_core::safetensors::load(fx.join("inputs.safetensors"), &Device::Cpu).unwrap();
    let exp =
        candle_core::safetensors::load(fx.join("expected.safetensors"), &Device::Cpu).unwrap();
    let out = model.forward(&inputs["input_ids"]).unwrap();
    let dh = close(
        "last_hidden_state",
        &out.last_hidden_state,
        &exp["last_hidden_state"],
    );
    let dp = close("pooled", &out.pooled, &exp["pooled"]);
    let de = close("text_embeds", &out.text_embeds, &exp["text_embeds"]);
    println!("max |Δ| hidden {dh:.2e} pooled {dp:.2e} embeds {de:.2e}");

    // Our tokenizer on the same prompts gives the fixture's input ids.
    let prompts = fixture_prompts(&fx);
    let tok = ClipTokenizer::from_tokenizer_json(fx.join("tokenizer.json")).unwrap();
    let ours = tok
        .encode_batch(&prompts, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap();
    let want = inputs["input_ids"].to_dtype(DType::I64).unwrap();
    assert_eq!(
        ours.to_vec2::<i64>().unwrap(),
        want.to_vec2::<i64>().unwrap()
    );
    // End-token padding (Hugging Face style) pools at the same token: the same embeddings.
    let hf_ids = tok
        .clone()
        .with_pad_id(49407)
        .encode_batch(&prompts, &Device::Cpu)
        .unwrap();
    let e2 = model.encode_text(&hf_ids).unwrap();
    assert!(close("end-token padding", &e2, &out.text_embeds) < 1e-5);

    // Weights that do not fit the configuration are a typed error naming the file.
    let mut wrong = ClipTextConfig::from_hf_config(fx.join("model/config.json")).unwrap();
    wrong.hidden_size = 64;
    wrong.num_attention_heads = 4;
    let e = ClipTextModel::from_safetensors(
        &[fx.join("model/model.safetensors")],
        &wrong,
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(matches!(e, Error::Weights { .. }), "{e}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

#[test]
fn presets_have_the_published_sizes() {
    let b = ClipTextConfig::vit_b_32();
    assert_eq!(
        (
            b.hidden_size,
            b.num_hidden_layers,
            b.num_attention_heads,
            b.projection_dim
        ),
        (512, 12, 8, 512)
    );
    let l = ClipTextConfig::vit_l_14();
    assert_eq!(
        (
            l.hidden_size,
            l.num_hidden_layers,
            l.num_attention_heads,
            l.projection_dim
        ),
        (768, 12, 12, 768)
    );
    // A full-size random ViT-B/32 text tower builds and embeds.
    let varmap = candle_nn::VarMap::new();
    let m = ClipTextModel::new(
        candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        &b,
    )
    .unwrap();
    let ids = Tensor::new(&[[49406u32, 320, 1125, 49407, 0]], &Device::Cpu).unwrap();
    assert_eq!(m.encode_text(&ids).unwrap().dims(), &[1, 512]);
    let params: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
    // 63,428,096 with the projection, as candle's own CLIP text model.
    assert_eq!(params, 63_428_096);
}

#[test]
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
fn official_class_embedding_loads_with_its_sanity_values() {
    let Some(dir) = shared::shared_dir() else {
        return;
    };
    let um = dir.join("data/universal_model");
    let e = ClassEmbeddings::load(um.join("txt_encoding.pth")).unwrap();
    assert_eq!(e.tensor().dims(), &[32, 512]);
    // The sanity values recorded with the official file (the sum of its 16,384 values and the
    // norm of row 0, computed with PyTorch); below, every value against its f32 dump.
    let sum = e.tensor().sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert!((sum - 272.9728).abs() < 1e-3, "{sum}");
    assert!((e.norms().unwrap()[0] - 8.8561).abs() < 1e-3);
    // The file stores no names: rows are numbered (univ names them from its class table).
    assert_eq!(e.names[7], "class_8");
    assert!(e.prompts.iter().all(String::is_empty));
    // Identical to the f32 dump.
    let raw = std::fs::read(um.join("txt_encoding_f32_32x512.bin")).unwrap();
    let want: Vec<f32> = raw
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(
        e.tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        want
    );
    // The continual-learning 38-class file (f32) loads too.
    let e38 =
        ClassEmbeddings::load(um.join("word_embedding_38class_ContinualLearning.pth")).unwrap();
    assert_eq!(e38.tensor().dims(), &[38, 512]);

    // Save with provenance, reload, append a class, similarities.
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("emb.safetensors");
    let mut e = e;
    e.provenance.insert(
        "encoder".into(),
        "openai ViT-B/32 encode_text (official file)".into(),
    );
    e.save_safetensors(&p).unwrap();
    let back = ClassEmbeddings::load(&p).unwrap();
    assert_eq!(back.names, e.names);
    assert_eq!(back.prompts, e.prompts);
    assert_eq!(
        back.provenance["encoder"],
        "openai ViT-B/32 encode_text (official file)"
    );
    assert_eq!(back.provenance["sha256"], e.sha256().unwrap());
    assert_eq!(
        back.tensor().to_vec2::<f32>().unwrap(),
        e.tensor().to_vec2::<f32>().unwrap()
    );
    let row = e38.tensor().get(35).unwrap();
    let mut grown = back;
    grown
        .push(
            "Kidney_LtRV",
            "A computerized tomography of a Kidney_LtRV",
            &row,
        )
        .unwrap();
    assert_eq!(grown.len(), 33);
    let sim = grown.cosine_similarity().unwrap();
    assert!((sim[32][32] - 1.0).abs() < 1e-5);
    assert!((sim[1][2] - sim[2][1]).abs() < 1e-6);
    assert!(
        grown
            .push(
                "bad",
                "bad",
                &Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap()
            )
            .is_err()
    );
    // Not a torch file.
    std::fs::write(tmp.path().join("x.pth"), b"nope").unwrap();
    assert!(matches!(
        ClassEmbeddings::load(tmp.path().join("x.pth")),
        Err(Error::File { .. })
    ));
}

#[test]
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
fn embedding_trims_padding_without_changing_the_result() {
    let Some(dir) = shared::shared_dir() else {
        return;
    };
    let fx = dir.join("fixtures/clip_text");
    let enc = univ_clip::ClipTextEncoder {
        tokenizer: ClipTokenizer::from_tokenizer_json(fx.join("tokenizer.json")).unwrap(),
        model: ClipTextModel::from_dir(fx.join("model"), &Device::Cpu).unwrap(),
    };
    let prompts = fixture_prompts(&fx);
    let got = enc.embed(&prompts).unwrap();
    let exp =
        candle_core::safetensors::load(fx.join("expected.safetensors"), &Device::Cpu).unwrap();
    assert!(close("trimmed", &got, &exp["text_embeds"]) < 1e-5);
}

#[test]
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
fn clip_folder_resolves_from_the_hf_cache_offline() {
    let Some(dir) = shared::shared_dir() else {
        return;
    };
    let fx = dir.join("fixtures/clip_text");
    let tmp = tempfile::tempdir().unwrap();
    let cache = hf_hub::Cache::new(tmp.path().to_path_buf());
    let e =
        univ_clip::hub::resolve_repo_in("openai/clip-vit-base-patch32", &cache, false).unwrap_err();
    assert!(e.to_string().contains("config.json"), "{e}");
    // Lay the files out as hf-hub does, then load the encoder from the snapshot folder.
    let repo = cache.model("openai/clip-vit-base-patch32".to_string());
    let hash = "fedcba9876543210fedcba9876543210fedcba98";
    repo.create_ref(hash).unwrap();
    let snap = repo.pointer_path(hash);
    std::fs::create_dir_all(&snap).unwrap();
    let d = dir.join("data/clip_tokenizer");
    for (from, to) in [
        (fx.join("model/config.json"), "config.json"),
        (fx.join("model/model.safetensors"), "model.safetensors"),
        (d.join("derived_vocab.json"), "vocab.json"),
        (d.join("derived_merges.txt"), "merges.txt"),
    ] {
        std::fs::copy(from, snap.join(to)).unwrap();
    }
    let folder =
        univ_clip::hub::resolve_repo_in("openai/clip-vit-base-patch32", &cache, false).unwrap();
    assert_eq!(folder, snap);
    let enc = univ_clip::ClipTextEncoder::from_dir(&folder, &Device::Cpu).unwrap();
    let got = enc.embed(&fixture_prompts(&fx)).unwrap();
    let exp =
        candle_core::safetensors::load(fx.join("expected.safetensors"), &Device::Cpu).unwrap();
    assert!(close("from cache", &got, &exp["text_embeds"]) < 1e-5);
}

#[test]
fn npy_embeddings_load() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("e.npy");
    let t = Tensor::arange(0f32, 12.0, &Device::Cpu)
        .unwrap()
        .reshape((3, 4))
        .unwrap();
    t.write_npy(&p).unwrap();
    let e = ClassEmbeddings::load(&p).unwrap();
    assert_eq!(e.names, vec!["class_1", "class_2", "class_3"]);
    assert_eq!(
        e.tensor().to_vec2::<f32>().unwrap(),
        t.to_vec2::<f32>().unwrap()
    );
    let e = ClassEmbeddings::load(tmp.path().join("e.bin")).unwrap_err();
    assert!(e.to_string().contains(".pth, .safetensors or .npy"), "{e}");
    // Shapes that overflow or ask for more than the file holds: typed errors, no panic, no
    // allocation. (A version 1.0 header as numpy writes it, padded to 64 bytes.)
    let npy = |shape: &str, data: usize| -> Vec<u8> {
        let mut h = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(h.len() as u16).to_le_bytes());
        b.extend_from_slice(h.as_bytes());
        b.extend(std::iter::repeat_n(0u8, data));
        b
    };
    let q = tmp.path().join("ok.npy");
    std::fs::write(&q, npy("(3, 4)", 48)).unwrap();
    assert_eq!(ClassEmbeddings::load(&q).unwrap().len(), 3);
    for shape in [
        "(99999999999999999999, 4)",
        "(4294967296, 4294967296)",
        "(3, 5)",
    ] {
        let q = tmp.path().join("bad.npy");
        std::fs::write(&q, npy(shape, 48)).unwrap();
        let e = ClassEmbeddings::load(&q).unwrap_err().to_string();
        assert!(e.contains("needs") && e.contains("bad.npy"), "{shape}: {e}");
    }
    // A key given twice (found by fuzzing): candle's reader takes the last one, so the check
    // must not look at the first.
    let q = tmp.path().join("twice.npy");
    std::fs::write(&q, npy("(3, 4), 'shape': (99999999999, 99999999)", 48)).unwrap();
    let e = ClassEmbeddings::load(&q).unwrap_err().to_string();
    assert!(e.contains("\"shape\" twice"), "{e}");
}

#[test]
fn hostile_embedding_files_are_refused_before_they_cost_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, pickle: &[u8]| {
        let p = tmp.path().join(name);
        let mut z = zip::ZipWriter::new(std::fs::File::create(&p).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        z.start_file("archive/data.pkl", opts).unwrap();
        std::io::Write::write_all(&mut z, pickle).unwrap();
        z.finish().unwrap();
        p
    };
    // A list memoized, then a tuple of two references to it, 44 times over: 2^44 copies.
    let mut bomb = vec![0x80, 2, b']', b'q', 0];
    for i in 0..44u8 {
        bomb.extend_from_slice(&[b'(', b'h', i, b'h', i, b't', b'q', i + 1]);
    }
    bomb.push(b'.');
    let start = std::time::Instant::now();
    let e = ClassEmbeddings::load(write("bomb.pth", &bomb))
        .unwrap_err()
        .to_string();
    assert!(e.contains("memo bomb"), "{e}");
    assert!(start.elapsed().as_secs_f64() < 5.0);
    let mut deep = vec![0x80, 2];
    deep.extend(std::iter::repeat_n(b'(', 200_000));
    deep.push(b')');
    deep.extend(std::iter::repeat_n(b't', 200_000));
    deep.push(b'.');
    let e = ClassEmbeddings::load(write("deep.pth", &deep))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nested too deeply"), "{e}");
}
