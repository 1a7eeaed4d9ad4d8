//! Integration tests of univ-model: layers against naive references and finite differences,
//! networks against the PyTorch golden fixtures.

#![allow(clippy::needless_range_loop)]

// The tests allocate many large tensors; mimalloc reuses freed memory instead of faulting in
// fresh pages each time.
#[global_allocator]
static GLOBAL: univ_model::runtime::MiMalloc = univ_model::runtime::MiMalloc;

#[path = "../../../tests/common/shared.rs"]
mod shared;

use candle_core::{DType, Device, Tensor, Var};
use univ_model::{layers, ops};

fn rand(shape: &[usize], seed: u64) -> Tensor {
    // A small deterministic generator (xorshift), values in [-1, 1).
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
    d.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Direct loop reference of a stride-1 3-D correlation with zero padding.
fn naive_conv3d(x: &Tensor, w: &Tensor, pad: usize) -> Tensor {
    let (n, c, d, h, wd) = x.dims5().unwrap();
    let (o, _, k, _, _) = w.dims5().unwrap();
    let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (od, oh, ow) = (
        d + 2 * pad + 1 - k,
        h + 2 * pad + 1 - k,
        wd + 2 * pad + 1 - k,
    );
    let mut out = vec![0f32; n * o * od * oh * ow];
    for b in 0..n {
        for oc in 0..o {
            for z in 0..od {
                for y in 0..oh {
                    for xx in 0..ow {
                        let mut acc = 0f64;
                        for ci in 0..c {
                            for a in 0..k {
                                for bb in 0..k {
                                    for cc in 0..k {
                                        let (iz, iy, ix) = (z + a, y + bb, xx + cc);
                                        if iz < pad || iy < pad || ix < pad {
                                            continue;
                                        }
                                        let (iz, iy, ix) = (iz - pad, iy - pad, ix - pad);
                                        if iz >= d || iy >= h || ix >= wd {
                                            continue;
                                        }
                                        let xi = (((b * c + ci) * d + iz) * h + iy) * wd + ix;
                                        let wi = (((oc * c + ci) * k + a) * k + bb) * k + cc;
                                        acc += f64::from(xv[xi]) * f64::from(wv[wi]);
                                    }
                                }
                            }
                        }
                        out[(((b * o + oc) * od + z) * oh + y) * ow + xx] = acc as f32;
                    }
                }
            }
        }
    }
    Tensor::from_vec(out, (n, o, od, oh, ow), &Device::Cpu).unwrap()
}

#[test]
fn conv3d_matches_naive_reference() {
    for (shape, o, k, pad) in [
        ([2, 3, 5, 6, 7], 4, 3, 1),
        ([1, 5, 4, 4, 4], 2, 1, 0),
        ([1, 2, 6, 5, 4], 3, 3, 0),
        ([1, 1, 9, 9, 9], 70, 3, 1),
        ([1, 4, 3, 3, 3], 2, 2, 1),
    ] {
        let x = rand(&shape, 1);
        let w = rand(&[o, shape[1], k, k, k], 2);
        let ours = ops::conv3d(&x, &w, [pad; 3]).unwrap();
        let want = naive_conv3d(&x, &w, pad);
        let d = max_abs_diff(&ours, &want);
        assert!(d < 1e-4, "{shape:?} k{k} p{pad}: {d}");
        if k == 3 || k == 1 {
            let composed = ops::conv3d_composed(&x, &w, [pad; 3]).unwrap();
            assert!(max_abs_diff(&composed, &want) < 1e-4);
        }
    }
}

#[test]
fn conv3d_gradients_match_composed_autograd_and_finite_differences() {
    let x = Var::from_tensor(&rand(&[2, 3, 5, 4, 6], 3)).unwrap();
    let w = Var::from_tensor(&rand(&[4, 3, 3, 3, 3], 4)).unwrap();
    let r = rand(&[2, 4, 5, 4, 6], 5);
    let loss = |y: &Tensor| (y * &r).unwrap().sum_all().unwrap();
    let g_ours = loss(&ops::conv3d(&x, &w, [1; 3]).unwrap())
        .backward()
        .unwrap();
    let g_ref = loss(&ops::conv3d_composed(&x, &w, [1; 3]).unwrap())
        .backward()
        .unwrap();
    let (gx, gw) = (g_ours.get(&x).unwrap(), g_ours.get(&w).unwrap());
    assert!(max_abs_diff(gx, g_ref.get(&x).unwrap()) < 1e-4);
    assert!(max_abs_diff(gw, g_ref.get(&w).unwrap()) < 1e-4);
    // Central differences on a few weights (f32, so a coarse step).
    let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let gwv = gw.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for i in [0usize, 17, 55, 100, 323] {
        let eps = 1e-2f32;
        let mut plus = wv.clone();
        plus[i] += eps;
        let mut minus = wv.clone();
        minus[i] -= eps;
        let f = |v: Vec<f32>| {
            let wt = Tensor::from_vec(v, w.dims(), &Device::Cpu).unwrap();
            loss(&ops::conv3d(&x, &wt, [1; 3]).unwrap())
                .to_scalar::<f32>()
                .unwrap()
        };
        let fd = (f(plus) - f(minus)) / (2.0 * eps);
        assert!(
            (fd - gwv[i]).abs() < 2e-2 * (1.0 + fd.abs()),
            "w[{i}]: fd {fd} vs {}",
            gwv[i]
        );
    }
    // Kernel 1 (the residual projections).
    let w1 = Var::from_tensor(&rand(&[4, 3, 1, 1, 1], 6)).unwrap();
    let g1 = loss(&ops::conv3d(&x, &w1, [0; 3]).unwrap())
        .backward()
        .unwrap();
    let g1r = loss(&ops::conv3d_composed(&x, &w1, [0; 3]).unwrap())
        .backward()
        .unwrap();
    assert!(max_abs_diff(g1.get(&x).unwrap(), g1r.get(&x).unwrap()) < 1e-4);
    assert!(max_abs_diff(g1.get(&w1).unwrap(), g1r.get(&w1).unwrap()) < 1e-4);
}

#[test]
fn patchify_and_transposed_conv_match_references() {
    // Kernel-2 stride-2 convolution = a stride-1 convolution sampled at even positions.
    let x = rand(&[1, 2, 4, 6, 8], 6);
    let w = rand(&[3, 2, 2, 2, 2], 7);
    let p = ops::conv3d_patchify(&x, &w).unwrap();
    let full = naive_conv3d(&x, &w, 0);
    let pick = |v: &[u32]| Tensor::new(v, &Device::Cpu).unwrap();
    let sampled = full
        .index_select(&pick(&[0, 2]), 2)
        .unwrap()
        .index_select(&pick(&[0, 2, 4]), 3)
        .unwrap()
        .index_select(&pick(&[0, 2, 4, 6]), 4)
        .unwrap();
    assert!(max_abs_diff(&p, &sampled) < 1e-5);

    // Transposed conv k2 s2: every output voxel gets one input voxel times one tap.
    let x = rand(&[1, 3, 2, 3, 2], 8);
    let w = rand(&[3, 2, 2, 2, 2], 9);
    let y = ops::conv_transpose3d_k_eq_s(&x, &w).unwrap();
    assert_eq!(y.dims(), &[1, 2, 4, 6, 4]);
    let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let yv = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for co in 0..2 {
        for z in 0..4 {
            for yy in 0..6 {
                for xx in 0..4 {
                    let mut acc = 0f32;
                    for ci in 0..3 {
                        let xi = ((ci * 2 + z / 2) * 3 + yy / 2) * 2 + xx / 2;
                        let wi = (((ci * 2 + co) * 2 + z % 2) * 2 + yy % 2) * 2 + xx % 2;
                        acc += xv[xi] * wv[wi];
                    }
                    let got = yv[((co * 4 + z) * 6 + yy) * 4 + xx];
                    assert!((got - acc).abs() < 1e-5);
                }
            }
        }
    }
}

/// Checks autograd against central differences in f64 for a function of one tensor.
fn fd_check(f: impl Fn(&Tensor) -> Tensor, shape: &[usize], seed: u64) {
    let x0 = rand(shape, seed).to_dtype(DType::F64).unwrap();
    let r = rand(f(&x0).dims(), seed + 1).to_dtype(DType::F64).unwrap();
    let loss = |x: &Tensor| (f(x) * &r).unwrap().sum_all().unwrap();
    let x = Var::from_tensor(&x0).unwrap();
    let g = loss(&x).backward().unwrap();
    let gx = g
        .get(&x)
        .expect("a gradient")
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let xv = x0.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let n = xv.len();
    for i in [0, n / 3, n / 2, n - 1] {
        let eps = 1e-6;
        let mut p = xv.clone();
        p[i] += eps;
        let mut m = xv.clone();
        m[i] -= eps;
        let at = |v: Vec<f64>| {
            loss(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap())
                .to_scalar::<f64>()
                .unwrap()
        };
        let fd = (at(p) - at(m)) / (2.0 * eps);
        assert!(
            (fd - gx[i]).abs() < 1e-6 * (1.0 + fd.abs()),
            "x[{i}]: fd {fd} vs autograd {}",
            gx[i]
        );
    }
}

#[test]
fn norms_and_activations_have_correct_gradients() {
    let sh = [2, 4, 3, 3, 2];
    let f64r = |s: &[usize], seed| rand(s, seed).to_dtype(DType::F64).unwrap();
    fd_check(|x| ops::instance_norm(x, 1e-5).unwrap(), &sh, 10);
    let w = f64r(&[4], 11);
    let b = f64r(&[4], 12);
    fd_check(
        |x| ops::group_norm(x, 2, Some(&w), Some(&b), 1e-5).unwrap(),
        &sh,
        13,
    );
    fd_check(
        |x| ops::batch_norm_batch_stats(x, Some(&w), Some(&b), 1e-5).unwrap(),
        &sh,
        14,
    );
    let lw = f64r(&[2], 15);
    fd_check(
        |x| ops::layer_norm(x, Some(&lw), Some(&lw), 1e-5).unwrap(),
        &sh,
        16,
    );
    fd_check(|x| ops::gelu(x).unwrap(), &sh, 17);
    fd_check(|x| ops::leaky_relu(x, 0.01).unwrap(), &sh, 18);
    fd_check(|x| ops::adaptive_avg_pool3d_1(x).unwrap(), &sh, 19);
    let wt = f64r(&[4, 3, 2, 2, 2], 20);
    fd_check(|x| ops::conv_transpose3d_k_eq_s(x, &wt).unwrap(), &sh, 21);
    let wp = f64r(&[3, 4, 1, 1, 2], 22);
    fd_check(|x| ops::conv3d_patchify(x, &wp).unwrap(), &sh, 23);
}

#[test]
fn norms_match_direct_formulas() {
    let x = rand(&[2, 4, 3, 3, 2], 30);
    let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let y = ops::instance_norm(&x, 1e-5)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for row in 0..8 {
        let s = &v[row * 18..(row + 1) * 18];
        let m: f64 = s.iter().map(|a| f64::from(*a)).sum::<f64>() / 18.0;
        let var: f64 = s.iter().map(|a| (f64::from(*a) - m).powi(2)).sum::<f64>() / 18.0;
        for j in 0..18 {
            let want = (f64::from(s[j]) - m) / (var + 1e-5).sqrt();
            assert!((f64::from(y[row * 18 + j]) - want).abs() < 1e-5);
        }
    }
    // Batch statistics pool the batch: channel 0 of both samples.
    let bn = ops::batch_norm_batch_stats(&x, None, None, 1e-5).unwrap();
    let ch0: Vec<f64> = (0..2)
        .flat_map(|b| v[b * 72..b * 72 + 18].iter().map(|a| f64::from(*a)))
        .collect();
    let m = ch0.iter().sum::<f64>() / 36.0;
    let var = ch0.iter().map(|a| (a - m).powi(2)).sum::<f64>() / 36.0;
    let got = bn.flatten_all().unwrap().to_vec1::<f32>().unwrap()[72];
    assert!((f64::from(got) - (ch0[18] - m) / (var + 1e-5).sqrt()).abs() < 1e-5);
}

#[test]
fn max_pool_forward_and_first_max_gradient() {
    let x = rand(&[1, 2, 4, 4, 6], 40);
    let y = ops::max_pool3d_2(&x).unwrap();
    let want = x
        .reshape(vec![1, 2, 2, 2, 2, 2, 3, 2])
        .unwrap()
        .max(7)
        .unwrap()
        .max(5)
        .unwrap()
        .max(3)
        .unwrap();
    assert_eq!(max_abs_diff(&y, &want), 0.0);
    // Ties: a window of equal values sends the whole gradient to its first voxel (PyTorch).
    let z = Var::from_tensor(&Tensor::zeros((1, 1, 2, 2, 2), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let g = ops::max_pool3d_2(&z)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gz = g
        .get(&z)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(gz, vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    let xv = Var::from_tensor(&x).unwrap();
    let g = ops::max_pool3d_2(&xv)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let total = g
        .get(&xv)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(total, 24.0);
}

// ---------------------------------------------------------------------------------------------
// Networks against the PyTorch golden fixtures.

use std::collections::HashMap;
use univ_model::Checkpoint;

fn load_st(path: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// Asserts |a − b| ≤ atol + rtol·|b| everywhere; returns the largest absolute difference.
fn assert_close(name: &str, a: &Tensor, b: &Tensor, atol: f32, rtol: f32) -> f32 {
    assert_eq!(a.dims(), b.dims(), "{name}: shapes");
    let av = a
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let bv = b
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut worst = 0f32;
    for (i, (x, y)) in av.iter().zip(&bv).enumerate() {
        let d = (x - y).abs();
        assert!(
            d <= atol + rtol * y.abs(),
            "{name}[{i}]: {x} vs {y} (|Δ| {d})"
        );
        worst = worst.max(d);
    }
    worst
}

fn subsample(t: &Tensor, idx: [&Tensor; 3]) -> Tensor {
    let mut t = t.clone();
    for (ax, i) in idx.iter().enumerate() {
        let i = i.to_dtype(DType::U32).unwrap();
        t = t.index_select(&i, 2 + ax).unwrap();
    }
    t
}

#[test]
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
fn unet_universal_model_matches_pytorch() {
    let Some(shared) = shared::shared_dir() else {
        return;
    };
    let fx = shared.join("fixtures/model_unet");
    let input = load_st(&fx.join("input.safetensors"))
        .remove("input")
        .unwrap();
    let exp = load_st(&fx.join("expected.safetensors"));
    for file in ["model.safetensors", "model_official.pth"] {
        let ckpt = Checkpoint::load(fx.join(file)).unwrap();
        let cfg = ckpt.detect_config().unwrap();
        assert_eq!(cfg.num_classes, 32);
        let (model, report) = ckpt.build(&Device::Cpu).unwrap();
        assert!(
            report.missing.is_empty() && report.unexpected.is_empty(),
            "{file}: {report}"
        );
        // 7 blocks × 2 convs × (running mean, running var, count) are not read, by design.
        assert_eq!(report.ignored.len(), 42, "{report}");
        let parts = model.forward_parts(&input).unwrap();
        let idx = [&exp["idx3_x"], &exp["idx3_y"], &exp["idx3_z"]];
        let d_deep = assert_close("deep", &parts.deep, &exp["deep"], 1e-4, 0.0);
        let d_dec = assert_close(
            "decoder",
            &subsample(&parts.decoder, idx),
            &exp["decoder_sub3"],
            1e-4,
            0.0,
        );
        let d_pre = assert_close(
            "precls",
            &subsample(&parts.precls, idx),
            &exp["precls_features_sub3"],
            1e-4,
            0.0,
        );
        assert_close("gap", &parts.gap, &exp["gap_vector"], 1e-4, 0.0);
        assert_close(
            "task",
            &parts.task_encoding,
            &exp["task_encoding"],
            1e-4,
            0.0,
        );
        assert_close(
            "controller",
            &parts.controller_params,
            &exp["controller_params"],
            1e-4,
            1e-4,
        );
        let d_log = assert_close("logits", &parts.logits, &exp["logits"], 1e-4, 1e-4);
        println!(
            "{file}: max |Δ| deep {d_deep:.2e} decoder {d_dec:.2e} precls {d_pre:.2e} logits {d_log:.2e}"
        );
    }
}

#[test]
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
fn swin_unetr_universal_model_matches_pytorch() {
    let Some(shared) = shared::shared_dir() else {
        return;
    };
    let fx = shared.join("fixtures/model_swin");
    let input = load_st(&fx.join("input.safetensors"))
        .remove("input")
        .unwrap();
    let exp = load_st(&fx.join("expected.safetensors"));
    for file in ["model.safetensors", "model_released_flat.pth"] {
        let ckpt = Checkpoint::load(fx.join(file)).unwrap();
        let cfg = ckpt.detect_config().unwrap();
        match cfg.backbone {
            univ_model::nets::BackboneConfig::SwinUnetr(c) => {
                assert_eq!(c.feature_size, 6);
                assert_eq!(c.num_heads, [3, 6, 12, 24]);
                assert_eq!(c.depths, [2, 2, 2, 2]);
            }
            other => panic!("{other:?}"),
        }
        let (model, report) = ckpt.build(&Device::Cpu).unwrap();
        assert!(
            report.missing.is_empty() && report.unexpected.is_empty(),
            "{file}: {report}"
        );
        let univ_model::nets::universal::Backbone::SwinUnetr(net) = model.backbone() else {
            panic!("not a Swin UNETR")
        };
        let bp = net.forward_parts(&input).unwrap();
        let mut worst_hs = 0f32;
        for (i, hs) in bp.hidden_states.iter().enumerate() {
            let d = assert_close(
                &format!("hidden_states_out.{i}"),
                hs,
                &exp[&format!("hidden_states_out.{i}")],
                1e-4,
                0.0,
            );
            worst_hs = worst_hs.max(d);
        }
        assert_close("dec4", &bp.dec4, &exp["dec4"], 1e-4, 0.0);
        let parts = model.forward_parts(&input).unwrap();
        let idx = &exp["idx"];
        assert_close("gap", &parts.gap, &exp["gap_vector"], 1e-4, 0.0);
        assert_close(
            "task",
            &parts.task_encoding,
            &exp["task_encoding"],
            1e-4,
            0.0,
        );
        assert_close(
            "controller",
            &parts.controller_params,
            &exp["controller_params"],
            1e-4,
            1e-4,
        );
        let d_pre = assert_close(
            "precls",
            &subsample(&parts.precls, [idx, idx, idx]),
            &exp["precls_features_sub"],
            1e-4,
            1e-4,
        );
        let d_log = assert_close(
            "logits",
            &subsample(&parts.logits, [idx, idx, idx]),
            &exp["logits_sub"],
            1e-4,
            1e-4,
        );
        println!(
            "{file}: max |Δ| hidden states {worst_hs:.2e} precls {d_pre:.2e} logits {d_log:.2e}"
        );
    }
}

#[test]
fn swin_unetr_refuses_sides_not_divisible_by_32() {
    let vb = candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu);
    let cfg = univ_model::nets::SwinUnetrConfig::with_feature_size(6);
    let net = univ_model::nets::SwinUnetr::new(vb, cfg).unwrap();
    let x = Tensor::zeros((1, 1, 32, 48, 32), DType::F32, &Device::Cpu).unwrap();
    let e = net.forward(&x).unwrap_err().to_string();
    assert!(e.contains("divisible by 32") && e.contains("48"), "{e}");
}

#[test]
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
fn full_size_models_have_exactly_the_official_keys_and_shapes() {
    use univ_model::checkpoint::official_layout;
    use univ_model::nets::{BackboneConfig, Encoding, SwinUnetrConfig};
    let Some(p) = shared::shared_file("data/universal_model/state_dict_keys.json") else {
        return;
    };
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let rand_swin = univ_model::UniversalConfig {
        backbone: BackboneConfig::SwinUnetr(SwinUnetrConfig::universal_model()),
        encoding: Encoding::RandEmbedding,
        num_classes: 32,
    };
    for (name, cfg) in [
        (
            "current_code_swinunetr_word_embedding",
            univ_model::UniversalConfig::universal_swin_unetr(),
        ),
        (
            "current_code_unet_word_embedding",
            univ_model::UniversalConfig::universal_unet(),
        ),
        ("current_code_swinunetr_rand_embedding", rand_swin),
    ] {
        let want = &json[name];
        let mut want_keys: Vec<(String, Vec<usize>)> = want["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                let shape = k["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as usize)
                    .collect();
                (k["key"].as_str().unwrap().to_string(), shape)
            })
            .collect();
        want_keys.sort();
        let layout = official_layout(&cfg).unwrap();
        let ours: Vec<(String, Vec<usize>)> = layout
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect();
        assert_eq!(
            ours.len(),
            want["n_keys"].as_u64().unwrap() as usize,
            "{name}"
        );
        assert_eq!(ours, want_keys, "{name}");
        let params: usize = layout
            .iter()
            .filter(|t| t.parameter)
            .map(|t| t.shape.iter().product::<usize>())
            .sum();
        assert_eq!(
            params as u64,
            want["n_param_elements"].as_u64().unwrap(),
            "{name}"
        );
        let buffers: usize = layout
            .iter()
            .filter(|t| !t.parameter)
            .map(|t| t.shape.iter().product::<usize>())
            .sum();
        assert_eq!(
            buffers as u64,
            want["n_buffer_elements"].as_u64().unwrap(),
            "{name}"
        );
    }
}

#[test]
fn named_checkpoints_resolve_from_the_hf_cache_offline() {
    use univ_model::hub::{NamedCheckpoint, OFFICIAL_REPO, resolve_checkpoint_in, sha256_file};
    let dir = tempfile::tempdir().unwrap();
    let cache = hf_hub::Cache::new(dir.path().to_path_buf());
    // Not cached and no download allowed: a clear error.
    let e = resolve_checkpoint_in("unet", &cache, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("clip_driven_universal_unet.pth"), "{e}");
    // Unknown name, missing file.
    let e = resolve_checkpoint_in("resnet", &cache, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a named checkpoint"), "{e}");
    // Populate the cache as hf-hub lays it out, with a small file standing in for the weights.
    let repo = cache.model(OFFICIAL_REPO.to_string());
    let hash = "0123456789abcdef0123456789abcdef01234567";
    repo.create_ref(hash).unwrap();
    let snap = repo.pointer_path(hash);
    std::fs::create_dir_all(&snap).unwrap();
    let file = snap.join(NamedCheckpoint::Unet.filename());
    std::fs::write(&file, b"stand-in bytes").unwrap();
    let r = resolve_checkpoint_in("unet", &cache, false).unwrap();
    assert_eq!(r.path, file);
    assert_eq!(r.named, Some(NamedCheckpoint::Unet));
    assert!(!r.downloaded);
    // sha256 of "stand-in bytes".
    assert_eq!(r.sha256, sha256_file(&file).unwrap());
    assert_eq!(r.sha256.len(), 64);
    // The licence notice is recorded as shown.
    assert!(
        dir.path()
            .join(".univ-licence-shown-clip_driven_universal_unet.pth")
            .exists()
    );
    // A path resolves to itself.
    let r = resolve_checkpoint_in(file.to_str().unwrap(), &cache, false).unwrap();
    assert_eq!(r.named, None);
}

#[test]
fn fused_inference_kernels_match_the_composed_operations() {
    use univ_model::ops::{Act, NormKind, norm_act};
    let x = (rand(&[2, 8, 5, 4, 3], 50) * 3.0).unwrap();
    let w = rand(&[8], 51);
    let b = rand(&[8], 52);
    for kind in [NormKind::Batch, NormKind::Instance, NormKind::Group(4)] {
        for act in [Act::Identity, Act::Relu, Act::LeakyRelu(0.01)] {
            let fused = norm_act(&x, kind, Some(&w), Some(&b), 1e-5, act).unwrap();
            // A tracked input forces the composed, differentiable path.
            let xv = Var::from_tensor(&x).unwrap();
            let composed = norm_act(&xv, kind, Some(&w), Some(&b), 1e-5, act).unwrap();
            assert!(composed.track_op());
            assert!(max_abs_diff(&fused, &composed) < 1e-5, "{kind:?} {act:?}");
        }
    }
    // The dynamic head: fused kernel vs batched matmuls (tracked params force the latter).
    let f = rand(&[2, 8, 3, 5, 7], 53);
    let p = (rand(&[2, 5, 153], 54) * 0.5).unwrap();
    let fused = univ_model::ops::dynamic_head(&f, &p).unwrap();
    let pv = Var::from_tensor(&p).unwrap();
    let composed = univ_model::ops::dynamic_head(&f, &pv).unwrap();
    assert!(max_abs_diff(&fused, &composed) < 1e-5);
    // And the head's explicit per-class formula at one voxel (8→8→8→1, ReLU after the first two
    // layers, the 153 parameters laid out as weights then biases).
    let fv = f.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let pvv = p.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (bi, k, vox, nv) = (1usize, 3usize, 17usize, 105usize);
    let pk = &pvv[(bi * 5 + k) * 153..(bi * 5 + k + 1) * 153];
    let feat: Vec<f32> = (0..8).map(|c| fv[(bi * 8 + c) * nv + vox]).collect();
    let h1: Vec<f32> = (0..8)
        .map(|j| (pk[136 + j] + (0..8).map(|c| pk[8 * j + c] * feat[c]).sum::<f32>()).max(0.0))
        .collect();
    let h2: Vec<f32> = (0..8)
        .map(|j| (pk[144 + j] + (0..8).map(|c| pk[64 + 8 * j + c] * h1[c]).sum::<f32>()).max(0.0))
        .collect();
    let want = pk[152] + (0..8).map(|c| pk[128 + c] * h2[c]).sum::<f32>();
    let got = fused.flatten_all().unwrap().to_vec1::<f32>().unwrap()[(bi * 5 + k) * nv + vox];
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
}

#[test]
fn fused_transposed_conv_matches_the_composed_path() {
    use candle_core::Module;
    let x = rand(&[2, 5, 3, 4, 2], 60);
    let w = rand(&[5, 7, 2, 2, 2], 61);
    let b = rand(&[7], 62);
    let mut ts = HashMap::new();
    ts.insert("weight".to_string(), w.clone());
    ts.insert("bias".to_string(), b.clone());
    let vb = candle_nn::VarBuilder::from_tensors(ts, DType::F32, &Device::Cpu);
    let m = layers::ConvTranspose3d::load(vb, 5, 7, 2, Default::default()).unwrap();
    let fused = m.forward(&x).unwrap();
    let composed = ops::conv_transpose3d_k_eq_s(&x, &w)
        .unwrap()
        .broadcast_add(&b.reshape((1, 7, 1, 1, 1)).unwrap())
        .unwrap();
    assert!(max_abs_diff(&fused, &composed) < 1e-5);
    // Tracked input: the composed path, with gradients.
    let xv = Var::from_tensor(&x).unwrap();
    let y = m.forward(&xv).unwrap();
    assert!(y.track_op());
    assert!(max_abs_diff(&y, &composed) < 1e-5);
}

#[test]
fn strided_conv_module_matches_the_sampled_reference() {
    use candle_core::Module;
    let x = rand(&[1, 2, 7, 6, 5], 70);
    let w = rand(&[3, 2, 3, 3, 3], 71);
    let conv = layers::Conv3d::new(w.clone(), None, conv_cfg(1, 2)).unwrap();
    let y = conv.forward(&x).unwrap();
    // PyTorch: out = floor((n + 2p - k) / s) + 1.
    assert_eq!(y.dims(), &[1, 3, 4, 3, 3]);
    let full = naive_conv3d(&x, &w, 1);
    let pick = |v: &[u32]| Tensor::new(v, &Device::Cpu).unwrap();
    let want = full
        .index_select(&pick(&[0, 2, 4, 6]), 2)
        .unwrap()
        .index_select(&pick(&[0, 2, 4]), 3)
        .unwrap()
        .index_select(&pick(&[0, 2, 4]), 4)
        .unwrap();
    assert!(max_abs_diff(&y, &want) < 1e-4);
    assert!(layers::Conv3d::new(w, None, conv_cfg(3, 2)).is_err());
}

#[test]
fn every_parameter_of_both_networks_gets_a_gradient() {
    use univ_model::nets::{BackboneConfig, Encoding, SwinUnetrConfig, UnetConfig};
    for (cfg, side) in [
        (
            univ_model::UniversalConfig {
                backbone: BackboneConfig::Unet(UnetConfig { base: 4 }),
                encoding: Encoding::WordEmbedding,
                num_classes: 3,
            },
            16,
        ),
        (
            univ_model::UniversalConfig {
                backbone: BackboneConfig::SwinUnetr(SwinUnetrConfig::with_feature_size(6)),
                encoding: Encoding::RandEmbedding,
                num_classes: 2,
            },
            // At 32³ the deepest map is one voxel, where instance norm outputs zeros and the
            // encoder10 weights rightly get no gradient; 64³ leaves 2³ voxels.
            64,
        ),
    ] {
        let varmap = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let model = univ_model::UniversalModel::new(vb, cfg).unwrap();
        let x = rand(&[1, 1, side, side, side], 80)
            .affine(0.5, 0.5)
            .unwrap();
        let logits = model.forward(&x).unwrap();
        let target = rand(logits.dims(), 81)
            .ge(0.0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let loss = candle_nn::loss::binary_cross_entropy_with_logit(&logits, &target).unwrap();
        let grads = loss.backward().unwrap();
        let data = varmap.data().lock().unwrap();
        let mut missing = Vec::new();
        for (name, var) in data.iter() {
            // organ_embedding in word mode is a buffer (CLIP rows), not trained.
            if name == "organ_embedding" {
                continue;
            }
            match grads.get(var) {
                Some(g)
                    if g.abs()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                        > 0.0 => {}
                _ => missing.push(name.clone()),
            }
        }
        assert!(
            missing.is_empty(),
            "{:?}: no gradient for {missing:?}",
            cfg.backbone
        );
    }
}

#[test]
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
fn sliding_window_matches_monai_0_9_on_a_real_ct() {
    use univ_model::inferers::{
        SlidingWindowOptions, sliding_window_inference, volume_to_network_layout,
    };
    let Some(shared) = shared::shared_dir() else {
        return;
    };
    let fx = shared.join("fixtures/sliding_window");
    let vol = univ_io::read_image(fx.join("input_image.nii.gz")).unwrap();
    assert_eq!(vol.shape(), [241, 191, 59]);
    let ckpt = Checkpoint::load(shared.join("fixtures/model_unet/model.safetensors")).unwrap();
    let (model, _) = ckpt.build(&Device::Cpu).unwrap();
    let exp = load_st(&fx.join("logits_selected.safetensors"));
    let channels: Vec<usize> = exp["channels"]
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|c| *c as usize)
        .collect();
    let idx: Vec<Vec<usize>> = ["idx_x", "idx_y", "idx_z"]
        .iter()
        .map(|k| {
            exp[*k]
                .to_vec1::<i64>()
                .unwrap()
                .iter()
                .map(|v| *v as usize)
                .collect()
        })
        .collect();
    let (nx, ny, nz) = (idx[0].len(), idx[1].len(), idx[2].len());
    let mut logits_sub = vec![f32::NAN; channels.len() * nx * ny * nz];
    let mut bits = vec![0u32; nx * ny * nz];
    let mut near = vec![0u32; nx * ny * nz]; // channels whose |logit| < 1e-4 at the voxel
    let input = volume_to_network_layout(&vol);
    let mut windows = 0;
    sliding_window_inference(
        &input,
        vol.shape(),
        &SlidingWindowOptions::default(),
        &Device::Cpu,
        |x| model.forward(x),
        |x0, planes| {
            let n = planes.len() / (32 * 191 * 59);
            for (i, &xi) in idx[0].iter().enumerate() {
                if xi < x0 || xi >= x0 + n {
                    continue;
                }
                for (j, &yj) in idx[1].iter().enumerate() {
                    for (l, &zl) in idx[2].iter().enumerate() {
                        let at = |c: usize| planes[((c * n + xi - x0) * 191 + yj) * 59 + zl];
                        let s = (i * ny + j) * nz + l;
                        for c in 0..32 {
                            let v = at(c);
                            if v > 0.0 {
                                bits[s] |= 1 << c;
                            }
                            if v.abs() < 1e-4 {
                                near[s] |= 1 << c;
                            }
                        }
                        for (ci, &c) in channels.iter().enumerate() {
                            logits_sub[((ci * nx + i) * ny + j) * nz + l] = at(c);
                        }
                    }
                }
            }
            Ok(())
        },
        |_, _| windows += 1,
    )
    .unwrap();
    assert_eq!(windows, 15);
    let ours = Tensor::from_vec(logits_sub, (channels.len(), nx, ny, nz), &Device::Cpu).unwrap();
    let d = assert_close("stitched logits", &ours, &exp["logits_sub"], 2e-3, 1e-3);
    let want_bits = exp["masks_sub_bits"]
        .flatten_all()
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
    let mut mismatched = 0;
    for ((a, b), n) in bits.iter().zip(&want_bits).zip(&near) {
        if (a ^ b) & !n != 0 {
            mismatched += 1;
        }
    }
    assert_eq!(
        mismatched, 0,
        "thresholded masks differ away from |logit| < 1e-4"
    );
    println!("sliding window: 15 windows, stitched logits max |Δ| {d:.2e}, masks identical");
}

#[test]
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
fn organ_post_processing_matches_the_official_function() {
    use univ_model::postprocess::{
        PostprocessOptions, organ_post_process, organ_post_process_masks,
    };
    let Some(shared) = shared::shared_dir() else {
        return;
    };
    let fx = shared.join("fixtures/postprocess");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("meta.json")).unwrap()).unwrap();
    let list = |k: &str| -> Vec<usize> {
        meta["organ_lists"][k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect()
    };
    let read = |name: &str| -> (Vec<Vec<bool>>, [usize; 3]) {
        let ch = univ_io::ReadOptions::new()
            .read_channels(fx.join(name))
            .unwrap();
        let shape = ch[0].shape();
        (
            ch.iter()
                .map(|v| v.data().iter().map(|x| *x > 0.5).collect())
                .collect(),
            shape,
        )
    };
    for s in 0..2 {
        let (pred, shape) = read(&format!("input_s{s}.nii.gz"));
        assert_eq!(pred.len(), 32);
        for (key, file) in [
            ("all", format!("expected_all_s{s}.nii.gz")),
            ("07", format!("expected_07_s{s}.nii.gz")),
        ] {
            let (want, _) = read(&file);
            let (got, notes) =
                organ_post_process(&pred, shape, &list(key), &PostprocessOptions::default());
            // The same rules on compact masks.
            let compact: Vec<univ_model::ClassMask> = pred
                .iter()
                .map(|m| univ_model::ClassMask::from_bools(m, shape))
                .collect();
            let (got_c, notes_c) = organ_post_process_masks(
                &compact,
                shape,
                &list(key),
                &PostprocessOptions::default(),
            );
            assert_eq!(notes, notes_c);
            for c in 0..32 {
                let diff = got[c].iter().zip(&want[c]).filter(|(a, b)| a != b).count();
                assert_eq!(
                    diff,
                    0,
                    "sample {s}, organ list {key}, class {}: {diff} voxels differ ({notes:?})",
                    c + 1
                );
                assert_eq!(got_c[c].to_bools(), want[c], "compact, class {}", c + 1);
            }
        }
    }
}

#[test]
fn convolution_of_a_concatenation_needs_no_copy_and_matches() {
    let a = rand(&[1, 3, 6, 5, 4], 90);
    let b = rand(&[1, 2, 6, 5, 4], 91);
    let w = rand(&[4, 5, 3, 3, 3], 92);
    let cat = Tensor::cat(&[&a, &b], 1).unwrap();
    let want = ops::conv3d(&cat, &w, [1; 3]).unwrap();
    let got = ops::conv3d_concat(&[&a, &b], &w, [1; 3]).unwrap();
    assert!(max_abs_diff(&got, &want) < 1e-5);
    // Tracked inputs take the concatenating, differentiable path.
    let av = Var::from_tensor(&a).unwrap();
    let g = ops::conv3d_concat(&[&av, &b], &w, [1; 3]).unwrap();
    assert!(g.track_op());
    assert!(max_abs_diff(&g, &want) < 1e-5);
    let w1 = rand(&[4, 5, 1, 1, 1], 93);
    let got1 = ops::conv3d_concat(&[&a, &b], &w1, [0; 3]).unwrap();
    assert!(max_abs_diff(&got1, &ops::conv3d(&cat, &w1, [0; 3]).unwrap()) < 1e-5);
}

/// Convolutions whose padded input is made a few planes at a time (a tiny budget forces one
/// or two output planes per block) give the same values as with the whole input padded, for
/// plain, concatenated and up-sampled-then-concatenated inputs.
#[test]
fn convolutions_padded_block_by_block_match() {
    use candle_core::Module;
    use univ_model::nets::unet::up_then_concat_conv;
    use univ_model::runtime::{DEFAULT_SLAB_BYTES, set_slab_bytes};
    let x = rand(&[2, 3, 7, 5, 6], 140);
    let w = rand(&[4, 3, 3, 3, 3], 141);
    let a = rand(&[1, 3, 7, 5, 6], 142);
    let b = rand(&[1, 2, 7, 5, 6], 143);
    let wc = rand(&[4, 5, 3, 3, 3], 144);
    // Up-sampling (3 → 6 channels, ×2) of a (1, 3, 4, 3, 2) map next to a (1, 2, 8, 6, 4) skip.
    let u = rand(&[1, 3, 4, 3, 2], 145);
    let skip = rand(&[1, 2, 8, 6, 4], 146);
    let mut ts = HashMap::new();
    ts.insert("up.weight".to_string(), rand(&[3, 6, 2, 2, 2], 147));
    ts.insert("up.bias".to_string(), rand(&[6], 148));
    ts.insert("conv.weight".to_string(), rand(&[5, 8, 3, 3, 3], 149));
    ts.insert("conv.bias".to_string(), rand(&[5], 150));
    ts.insert("conv1.weight".to_string(), rand(&[5, 8, 1, 1, 1], 151));
    ts.insert("conv1.bias".to_string(), rand(&[5], 152));
    let vb = candle_nn::VarBuilder::from_tensors(ts, DType::F32, &Device::Cpu);
    let up = layers::ConvTranspose3d::load(vb.pp("up"), 3, 6, 2, Default::default()).unwrap();
    let pad1 = layers::Conv3dConfig {
        padding: 1,
        ..Default::default()
    };
    let conv = layers::Conv3d::load(vb.pp("conv"), 8, 5, 3, pad1).unwrap();
    let conv1 = layers::Conv3d::load(vb.pp("conv1"), 8, 5, 1, Default::default()).unwrap();
    let run = || {
        let upsampled = up.forward(&u).unwrap();
        (
            ops::conv3d(&x, &w, [1; 3]).unwrap(),
            ops::conv3d_concat(&[&a, &b], &wc, [1; 3]).unwrap(),
            up_then_concat_conv(&up, &u, &skip, &conv).unwrap().unwrap(),
            up_then_concat_conv(&up, &u, &skip, &conv1)
                .unwrap()
                .unwrap(),
            conv.forward_concat(&[&upsampled, &skip]).unwrap(),
            conv1.forward_concat(&[&upsampled, &skip]).unwrap(),
        )
    };
    let whole = run();
    set_slab_bytes(1);
    let blocks = run();
    set_slab_bytes(DEFAULT_SLAB_BYTES);
    assert!(max_abs_diff(&whole.0, &naive_conv3d(&x, &w, 1)) < 1e-4);
    assert_eq!(max_abs_diff(&whole.0, &blocks.0), 0.0);
    assert_eq!(max_abs_diff(&whole.1, &blocks.1), 0.0);
    assert_eq!(max_abs_diff(&whole.2, &blocks.2), 0.0);
    assert_eq!(max_abs_diff(&whole.3, &blocks.3), 0.0);
    // The fused up-sampling path equals up-sampling, then convolving the concatenation.
    assert!(max_abs_diff(&whole.2, &whole.4) < 1e-5);
    assert!(max_abs_diff(&whole.3, &whole.5) < 1e-5);
    // Tracked inputs are not fused.
    let uv = Var::from_tensor(&u).unwrap();
    assert!(
        up_then_concat_conv(&up, &uv, &skip, &conv)
            .unwrap()
            .is_none()
    );
    // Mismatched skip sizes are a shape error, not a panic.
    let bad = rand(&[1, 2, 8, 6, 5], 153);
    assert!(up_then_concat_conv(&up, &u, &bad, &conv).is_err());
}

/// The fused training operations (used for f32 tensors on the CPU when gradients are needed)
/// against the composed operations in f64.
#[test]
fn fused_training_operations_have_the_composed_gradients() {
    use univ_model::ops::{Act, NormKind};
    let sh = [2usize, 4, 3, 3, 2];
    let max_diff = |a: &Tensor, b: &Tensor| -> f64 {
        let a = a
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let b = b
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    };
    for kind in [NormKind::Batch, NormKind::Instance, NormKind::Group(2)] {
        for act in [Act::Identity, Act::Relu, Act::LeakyRelu(0.01)] {
            let x = Var::from_tensor(&rand(&sh, 40)).unwrap();
            let w = Var::from_tensor(&rand(&[4], 41)).unwrap();
            let b = Var::from_tensor(&rand(&[4], 42)).unwrap();
            let r = rand(&sh, 43);
            let y = ops::norm_act(
                x.as_tensor(),
                kind,
                Some(w.as_tensor()),
                Some(b.as_tensor()),
                1e-5,
                act,
            )
            .unwrap();
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            // Composed reference in f64.
            let to64 = |t: &Tensor| Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap();
            let (x64, w64, b64) = (
                to64(x.as_tensor()),
                to64(w.as_tensor()),
                to64(b.as_tensor()),
            );
            let z = match kind {
                NormKind::Batch => ops::batch_norm_batch_stats(
                    x64.as_tensor(),
                    Some(w64.as_tensor()),
                    Some(b64.as_tensor()),
                    1e-5,
                ),
                NormKind::Instance => ops::instance_norm(x64.as_tensor(), 1e-5).map(|n| {
                    n.broadcast_mul(&w64.as_tensor().reshape((1, 4, 1, 1, 1)).unwrap())
                        .unwrap()
                        .broadcast_add(&b64.as_tensor().reshape((1, 4, 1, 1, 1)).unwrap())
                        .unwrap()
                }),
                NormKind::Group(gr) => ops::group_norm(
                    x64.as_tensor(),
                    gr,
                    Some(w64.as_tensor()),
                    Some(b64.as_tensor()),
                    1e-5,
                ),
            }
            .unwrap();
            let y64 = act.apply_tensor(z).unwrap();
            let r64 = r.to_dtype(DType::F64).unwrap();
            let g64 = (&y64 * &r64)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let what = format!("{kind:?} {act:?}");
            assert!(max_diff(&y, &y64) < 1e-5, "{what}: output");
            for (v, v64, name) in [(&x, &x64, "x"), (&w, &w64, "weight"), (&b, &b64, "bias")] {
                let d = max_diff(
                    g.get(v.as_tensor()).unwrap(),
                    g64.get(v64.as_tensor()).unwrap(),
                );
                assert!(d < 1e-4, "{what}: gradient of {name} differs by {d}");
            }
        }
    }
    // The dynamic head.
    let f = Var::from_tensor(&rand(&[2, 8, 3, 4, 5], 50)).unwrap();
    let p = Var::from_tensor(&rand(&[2, 3, 153], 51)).unwrap();
    let r = rand(&[2, 3, 3, 4, 5], 52);
    let y = univ_model::ops::dynamic_head(f.as_tensor(), p.as_tensor()).unwrap();
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let y2 = univ_model::ops::dynamic_head_composed(f.as_tensor(), p.as_tensor()).unwrap();
    let g2 = (&y2 * &r).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(max_diff(&y, &y2) < 1e-5);
    for (v, name) in [(&f, "features"), (&p, "params")] {
        let d = max_diff(
            g.get(v.as_tensor()).unwrap(),
            g2.get(v.as_tensor()).unwrap(),
        );
        assert!(d < 1e-4, "head: gradient of {name} differs by {d}");
    }
}

/// Convolution + bias, convolution of a concatenation, and the transposed convolution as
/// single training operations: values and gradients equal the composed references.
#[test]
fn fused_training_convolutions_have_the_composed_gradients() {
    use candle_core::Module;
    let max_diff = |a: &Tensor, b: &Tensor| -> f64 {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        a.iter()
            .zip(&b)
            .map(|(x, y)| f64::from((x - y).abs()))
            .fold(0.0, f64::max)
    };
    let bias5 = |b: &Tensor| b.reshape((1, b.elem_count(), 1, 1, 1)).unwrap();
    // Conv3d with bias.
    let x = Var::from_tensor(&rand(&[2, 3, 5, 4, 6], 60)).unwrap();
    let w = Var::from_tensor(&rand(&[4, 3, 3, 3, 3], 61)).unwrap();
    let b = Var::from_tensor(&rand(&[4], 62)).unwrap();
    let conv = layers::Conv3d::new(
        w.as_tensor().clone(),
        Some(b.as_tensor().clone()),
        conv_cfg(1, 1),
    )
    .unwrap();
    let y = conv.forward(x.as_tensor()).unwrap();
    let r = rand(y.dims(), 63);
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let y2 = ops::conv3d_composed(x.as_tensor(), w.as_tensor(), [1; 3])
        .unwrap()
        .broadcast_add(&bias5(b.as_tensor()))
        .unwrap();
    let g2 = (&y2 * &r).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(max_diff(&y, &y2) < 1e-4);
    for (v, name) in [(&x, "x"), (&w, "w"), (&b, "b")] {
        let d = max_diff(
            g.get(v.as_tensor()).unwrap(),
            g2.get(v.as_tensor()).unwrap(),
        );
        assert!(d < 1e-3, "conv+bias: gradient of {name} differs by {d}");
    }
    // Convolution of a concatenation of two tracked tensors.
    let a = Var::from_tensor(&rand(&[2, 2, 4, 5, 3], 64)).unwrap();
    let c = Var::from_tensor(&rand(&[2, 3, 4, 5, 3], 65)).unwrap();
    let wc = Var::from_tensor(&rand(&[4, 5, 3, 3, 3], 66)).unwrap();
    let y = ops::conv3d_concat(&[a.as_tensor(), c.as_tensor()], wc.as_tensor(), [1; 3]).unwrap();
    let r = rand(y.dims(), 67);
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let cat = Tensor::cat(&[a.as_tensor(), c.as_tensor()], 1).unwrap();
    let y2 = ops::conv3d_composed(&cat, wc.as_tensor(), [1; 3]).unwrap();
    let g2 = (&y2 * &r).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(max_diff(&y, &y2) < 1e-4);
    for (v, name) in [(&a, "a"), (&c, "c"), (&wc, "w")] {
        let d = max_diff(
            g.get(v.as_tensor()).unwrap(),
            g2.get(v.as_tensor()).unwrap(),
        );
        assert!(d < 1e-3, "concat conv: gradient of {name} differs by {d}");
    }
    // Transposed convolution (k = s = 2) with bias.
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let up = layers::ConvTranspose3d::load(vb, 3, 4, 2, Default::default()).unwrap();
    let x = Var::from_tensor(&rand(&[2, 3, 3, 2, 4], 68)).unwrap();
    let y = up.forward(x.as_tensor()).unwrap();
    let r = rand(y.dims(), 69);
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let data = varmap.data().lock().unwrap();
    let (wt, bt) = (&data["weight"], &data["bias"]);
    let y2 = ops::conv_transpose3d_k_eq_s(x.as_tensor(), wt.as_tensor())
        .unwrap()
        .broadcast_add(&bias5(bt.as_tensor()))
        .unwrap();
    let g2 = (&y2 * &r).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(max_diff(&y, &y2) < 1e-5);
    for (t, name) in [
        (x.as_tensor(), "x"),
        (wt.as_tensor(), "w"),
        (bt.as_tensor(), "b"),
    ] {
        let d = max_diff(g.get(t).unwrap(), g2.get(t).unwrap());
        assert!(
            d < 1e-4,
            "transposed conv: gradient of {name} differs by {d}"
        );
    }
}

/// A convolution's settings from its padding and stride.
fn conv_cfg(padding: usize, stride: usize) -> layers::Conv3dConfig {
    layers::Conv3dConfig {
        padding,
        stride,
        ..Default::default()
    }
}

/// The class table's official prompts are the strings the official embedding was made from
/// (the fixture records them, legacy spellings included).
#[test]
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
fn class_table_prompts_are_the_official_ones() {
    let Some(dir) = shared::shared_dir() else {
        return;
    };
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("fixtures/clip_text/meta.json")).unwrap(),
    )
    .unwrap();
    let want: Vec<Option<String>> = meta["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Some(p.as_str().unwrap().to_string()))
        .collect();
    assert_eq!(univ_model::ClassTable::universal().prompts(), want);
}

/// A `.pth`-shaped zip holding `pickle` as its `data.pkl`.
fn write_pth(path: &std::path::Path, pickle: &[u8]) {
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", opts).unwrap();
    std::io::Write::write_all(&mut z, pickle).unwrap();
    z.finish().unwrap();
}

#[test]
fn hostile_checkpoints_are_refused_before_they_cost_memory() {
    let dir = tempfile::tempdir().unwrap();
    // A 300-byte "memo bomb": a list that holds itself twice, 44 times over.
    let mut bomb = vec![0x80, 2, b']', b'q', 0];
    for i in 0..44u8 {
        bomb.extend_from_slice(&[b'(', b'h', i, b'h', i, b't', b'q', i + 1]);
    }
    bomb.push(b'.');
    let p = dir.path().join("bomb.pth");
    write_pth(&p, &bomb);
    let start = std::time::Instant::now();
    let e = Checkpoint::load(&p).unwrap_err().to_string();
    assert!(e.contains("memo bomb"), "{e}");
    assert!(start.elapsed().as_secs_f64() < 5.0);
    // 200,000-deep nesting: refused, not a stack overflow.
    let mut deep = vec![0x80, 2];
    deep.extend(std::iter::repeat_n(b'(', 200_000));
    deep.push(b')');
    deep.extend(std::iter::repeat_n(b't', 200_000));
    deep.push(b'.');
    let p = dir.path().join("deep.pth");
    write_pth(&p, &deep);
    let e = Checkpoint::load(&p).unwrap_err().to_string();
    assert!(e.contains("deeper"), "{e}");
}

#[test]
fn checkpoints_are_read_within_a_memory_limit() {
    let dir = tempfile::tempdir().unwrap();
    let t = candle_core::Tensor::zeros((64, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
    let st = dir.path().join("w.safetensors");
    candle_core::safetensors::save(&std::collections::HashMap::from([("w", t)]), &st).unwrap();
    assert!(Checkpoint::load_within(&st, 1 << 20).is_ok());
    let e = Checkpoint::load_within(&st, 1000).unwrap_err().to_string();
    assert!(e.contains("more than the memory limit of 1000"), "{e}");
    // A .pth whose entries declare more than the limit is refused before any is read.
    let p = dir.path().join("w.pth");
    write_pth(&p, &[0x80, 2, b'}', b'.']);
    let e = Checkpoint::load_within(&p, 3).unwrap_err().to_string();
    assert!(e.contains("more than 3 bytes"), "{e}");
}

#[test]
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
fn a_flipped_byte_in_a_checkpoint_is_found_by_its_crc() {
    let Some(dir) = shared::shared_dir() else {
        return;
    };
    let src = dir.join("fixtures/model_unet/model_official.pth");
    let mut bytes = std::fs::read(&src).unwrap();
    // Flip one byte inside the first storage's data (stored, uncompressed).
    let name = b"model_official/data/0";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("the storage's local header");
    // Local header: 30 bytes, the name, then an extra field (the PyTorch writer aligns the
    // data with one); flip a byte well inside the 64 kB of data.
    let flip = at + name.len() + 4096;
    bytes[flip] ^= 0x40;
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("flipped.pth");
    std::fs::write(&p, &bytes).unwrap();
    let e = Checkpoint::load(&p).unwrap_err().to_string();
    assert!(
        e.to_lowercase().contains("crc") || e.contains("checksum"),
        "{e}"
    );
    // The untouched file loads.
    assert!(Checkpoint::load(&src).is_ok());
}

#[test]
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
fn segment_blends_on_the_device_as_on_the_host() {
    // The device-resident sliding window (what runs on a GPU) run on the CPU gives the host
    // blend's masks, probabilities and logits exactly: same windows, same arithmetic.
    use univ_model::inferers::SlidingWindowOptions;
    use univ_model::segment::{SegmentOptions, segment};
    let Some(shared) = shared::shared_dir() else {
        return;
    };
    let fx = shared.join("fixtures/sliding_window");
    let vol = univ_io::read_image(fx.join("input_image.nii.gz")).unwrap();
    let ckpt = Checkpoint::load(shared.join("fixtures/model_unet/model.safetensors")).unwrap();
    let (model, _) = ckpt.build(&Device::Cpu).unwrap();
    let run = |on_device: bool| {
        let opts = SegmentOptions {
            preprocess: None,
            window: SlidingWindowOptions {
                overlap: 0.0,
                blend_on_device: Some(on_device),
                ..Default::default()
            },
            keep_probabilities: true,
            keep_logits: true,
            ..Default::default()
        };
        let mut windows = 0;
        let seg = segment(&vol, &model, &opts, |d, _| windows = d).unwrap();
        assert_eq!(windows, 6);
        seg
    };
    let (host, dev) = (run(false), run(true));
    assert_eq!(host.classes.len(), dev.classes.len());
    let mut voxels = 0;
    for (h, d) in host.classes.iter().zip(&dev.classes) {
        assert_eq!(h.id(), d.id());
        let (hv, dv): (Vec<usize>, Vec<usize>) =
            (h.mask.voxels().collect(), d.mask.voxels().collect());
        assert_eq!(hv, dv, "class {}", h.id());
        voxels += hv.len();
        assert_eq!(
            h.probabilities.as_ref().unwrap().data(),
            d.probabilities.as_ref().unwrap().data(),
            "class {}",
            h.id()
        );
        assert_eq!(h.lesion_probabilities, d.lesion_probabilities);
    }
    assert!(
        voxels > 0,
        "no class has a voxel: the comparison shows nothing"
    );
    assert_eq!(host.label_map.data(), dev.label_map.data());
    assert_eq!(
        host.logits.as_ref().unwrap().data,
        dev.logits.as_ref().unwrap().data
    );
    println!("device blend on the CPU: {voxels} mask voxels, masks/probabilities/logits identical");
}
