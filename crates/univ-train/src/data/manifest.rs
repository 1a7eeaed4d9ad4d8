//! The dataset manifest: a TOML file listing datasets, where their cases are, and how their
//! label ids map onto the universal classes.
//!
//! ```toml
//! [[dataset]]
//! name = "btcv"
//! preset = "01"                 # label conventions (see `presets`); default "universal"
//! root = "/data/01_Multi-Atlas_Labeling"   # relative paths start at the manifest's folder
//! images = "img/img*.nii.gz"    # one '*' in the file name; labels use the same capture
//! labels = "label/label*.nii.gz"
//!
//! [[dataset]]
//! name = "paot"
//! preset = "official"           # per case, from its label path (the official key rule)
//! root = "/data"
//! list = "PAOT_123457891213_train.txt"   # official list file: image<TAB>label per line
//!
//! [[dataset]]
//! name = "held-out"
//! role = "validation"           # used for validation Dice only
//! root = "cases"
//! cases = [["ct.nii.gz", "seg.nii.gz"]]
//! classes = [1, 2, 3, 6]        # supervised classes (default: the preset's)
//! ```
//!
//! Optional per dataset: `label_map` (raw id r → class `label_map[r-1]`), `split` (organs to
//! split into right/left), `tumours` (`[{ raw = 2, class = 27, merge_into = 6 }]`), `crop`
//! (`"pos_neg"` or `"label_classes"`), `zoom` (bool).

use std::path::{Path, PathBuf};

use crate::data::case::LabelRules;
use crate::data::presets::{self, CropRule, TumourRule};
use crate::error::{Error, Result};

/// What a dataset is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Training cases.
    #[default]
    Train,
    /// Held-out cases for validation Dice.
    Validation,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataset {
    name: String,
    #[serde(default)]
    preset: Option<String>,
    #[serde(default)]
    root: Option<PathBuf>,
    #[serde(default)]
    images: Option<String>,
    #[serde(default)]
    labels: Option<String>,
    #[serde(default)]
    list: Option<PathBuf>,
    #[serde(default)]
    cases: Option<Vec<(PathBuf, PathBuf)>>,
    #[serde(default)]
    role: Role,
    #[serde(default)]
    classes: Option<Vec<usize>>,
    #[serde(default)]
    label_map: Option<Vec<usize>>,
    #[serde(default)]
    split: Option<Vec<usize>>,
    #[serde(default)]
    tumours: Option<Vec<TumourRule>>,
    #[serde(default)]
    crop: Option<CropRule>,
    #[serde(default)]
    zoom: Option<bool>,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    #[serde(default, rename = "dataset")]
    datasets: Vec<RawDataset>,
}

/// One case's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseFiles {
    /// `dataset/image file name`.
    pub id: String,
    /// The image.
    pub image: PathBuf,
    /// Its label map.
    pub label: PathBuf,
}

/// A dataset with its cases found and its rules resolved.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Name (for `preset = "official"`, `name/key`).
    pub name: String,
    /// The preset it started from.
    pub preset: String,
    /// Train or validation.
    pub role: Role,
    /// Label rules.
    pub rules: LabelRules,
    /// Cases.
    pub cases: Vec<CaseFiles>,
}

/// All datasets of a manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The file it was read from (empty when parsed from a string).
    pub path: PathBuf,
    /// Datasets in file order.
    pub datasets: Vec<Dataset>,
}

fn class_ok(c: usize) -> bool {
    (1..=255).contains(&c)
}

/// Lists `root/pattern` where the file name holds one `*`: (captured text, path), sorted.
fn expand(root: &Path, pattern: &str, mpath: &Path) -> Result<Vec<(String, PathBuf)>> {
    let full = root.join(pattern);
    let dir = full.parent().unwrap_or(Path::new(".")).to_path_buf();
    let name = full
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Some((pre, post)) = name.split_once('*') else {
        return Ok(vec![(String::new(), full)]);
    };
    if post.contains('*') || dir.to_string_lossy().contains('*') {
        return Err(Error::config(
            mpath,
            format!("pattern {pattern:?}: only one '*', in the file name, is supported"),
        ));
    }
    let rd = std::fs::read_dir(&dir).map_err(|e| Error::file(&dir, e))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::file(&dir, e))?;
        let n = entry.file_name().to_string_lossy().into_owned();
        if n.len() >= pre.len() + post.len() && n.starts_with(pre) && n.ends_with(post) {
            out.push((n[pre.len()..n.len() - post.len()].to_string(), entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

fn rules_from(preset: &presets::DatasetPreset, d: &RawDataset) -> LabelRules {
    LabelRules {
        label_map: d
            .label_map
            .clone()
            .unwrap_or_else(|| preset.label_map.to_vec()),
        supervised: d
            .classes
            .clone()
            .unwrap_or_else(|| preset.supervised.to_vec()),
        rl_split: d.split.clone().unwrap_or_else(|| preset.rl_split.to_vec()),
        tumours: d.tumours.clone().unwrap_or_else(|| preset.tumours.to_vec()),
        crop: d.crop.unwrap_or(preset.crop),
        zoom: d.zoom.unwrap_or(preset.zoom),
    }
}

fn check_rules(rules: &LabelRules, name: &str, mpath: &Path) -> Result<()> {
    let bad = |what: String| Error::config(mpath, format!("dataset {name}: {what}"));
    if rules.supervised.is_empty() {
        return Err(bad("no supervised classes".into()));
    }
    if let Some(c) = rules
        .supervised
        .iter()
        .chain(&rules.label_map)
        .chain(&rules.rl_split)
        .find(|c| !class_ok(**c) && **c != 0)
    {
        return Err(bad(format!("class {c} is out of range")));
    }
    if rules.supervised.contains(&0) || rules.rl_split.contains(&0) {
        return Err(bad("class 0 is background, not a class".into()));
    }
    for t in &rules.tumours {
        if !class_ok(t.class) || t.merge_into.is_some_and(|m| !class_ok(m)) || t.raw == 0 {
            return Err(bad(format!("tumour rule {t:?} is out of range")));
        }
    }
    Ok(())
}

impl Manifest {
    /// Reads a manifest file; relative roots start at its folder.
    ///
    /// # Errors
    /// [`Error::Config`] for TOML errors, unknown presets, classes out of range, missing
    /// files (named), or a dataset without cases.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
        let base = path.parent().unwrap_or(Path::new("")).to_path_buf();
        Self::parse(&text, &base, path)
    }

    /// Parses manifest text; relative roots start at `base`; `path` is used in messages.
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn parse(text: &str, base: &Path, path: &Path) -> Result<Self> {
        let raw: RawManifest =
            toml::from_str(text).map_err(|e| Error::config(path, e.to_string()))?;
        if raw.datasets.is_empty() {
            return Err(Error::config(path, "no [[dataset]] entries"));
        }
        let mut datasets: Vec<Dataset> = Vec::new();
        for d in &raw.datasets {
            let root = base.join(d.root.clone().unwrap_or_default());
            let preset_name = d.preset.clone().unwrap_or_else(|| "universal".into());
            let sources = [d.images.is_some(), d.list.is_some(), d.cases.is_some()]
                .iter()
                .filter(|b| **b)
                .count();
            if sources != 1 {
                return Err(Error::config(
                    path,
                    format!(
                        "dataset {}: give exactly one of images/labels, list, cases",
                        d.name
                    ),
                ));
            }
            // (official name for key detection, files)
            let mut found: Vec<(String, CaseFiles)> = Vec::new();
            let mk_id = |img: &Path| {
                format!(
                    "{}/{}",
                    d.name,
                    img.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                )
            };
            if let Some(ip) = &d.images {
                let lp = d.labels.as_ref().ok_or_else(|| {
                    Error::config(path, format!("dataset {}: images without labels", d.name))
                })?;
                let imgs = expand(&root, ip, path)?;
                let labels = expand(&root, lp, path)?;
                for (cap, img) in imgs {
                    let label = labels
                        .iter()
                        .find(|(c, _)| *c == cap)
                        .map(|(_, l)| l.clone())
                        .ok_or_else(|| {
                            Error::config(
                                path,
                                format!(
                                    "dataset {}: no label matches {} (pattern {lp:?})",
                                    d.name,
                                    img.display()
                                ),
                            )
                        })?;
                    found.push((
                        String::new(),
                        CaseFiles {
                            id: mk_id(&img),
                            image: img,
                            label,
                        },
                    ));
                }
            } else if let Some(list) = &d.list {
                let lpath = base.join(list);
                let text = std::fs::read_to_string(&lpath).map_err(|e| Error::file(&lpath, e))?;
                for (n, line) in text.lines().enumerate() {
                    let mut parts = line.split_whitespace();
                    let (Some(img), Some(lab)) = (parts.next(), parts.next()) else {
                        if line.trim().is_empty() {
                            continue;
                        }
                        return Err(Error::config(
                            &lpath,
                            format!("line {}: expected `image<TAB>label`", n + 1),
                        ));
                    };
                    let name = lab.split('.').next().unwrap_or(lab).to_string();
                    found.push((
                        name,
                        CaseFiles {
                            id: mk_id(Path::new(img)),
                            image: root.join(img),
                            label: root.join(lab),
                        },
                    ));
                }
            } else if let Some(cases) = &d.cases {
                for (img, lab) in cases {
                    found.push((
                        String::new(),
                        CaseFiles {
                            id: mk_id(img),
                            image: root.join(img),
                            label: root.join(lab),
                        },
                    ));
                }
            }
            if found.is_empty() {
                return Err(Error::config(
                    path,
                    format!(
                        "dataset {}: no cases found under {}",
                        d.name,
                        root.display()
                    ),
                ));
            }
            for (_, c) in &found {
                for p in [&c.image, &c.label] {
                    if !p.exists() {
                        return Err(Error::config(
                            path,
                            format!(
                                "dataset {}, case {}: {} does not exist",
                                d.name,
                                c.id,
                                p.display()
                            ),
                        ));
                    }
                }
            }
            if preset_name == "official" {
                // Group by the official key of each label path.
                let mut groups: Vec<(String, Vec<CaseFiles>)> = Vec::new();
                for (name, c) in found {
                    let key = presets::template_key(&name)
                        .filter(|k| presets::preset(k).is_some())
                        .ok_or_else(|| {
                            Error::config(
                                path,
                                format!(
                                    "dataset {}, case {}: no official dataset key in {name:?}",
                                    d.name, c.id
                                ),
                            )
                        })?;
                    match groups.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, v)) => v.push(c),
                        None => groups.push((key, vec![c])),
                    }
                }
                for (key, cases) in groups {
                    let p = presets::preset(&key).expect("checked above");
                    let rules = rules_from(p, d);
                    let name = format!("{}/{key}", d.name);
                    check_rules(&rules, &name, path)?;
                    datasets.push(Dataset {
                        name,
                        preset: key,
                        role: d.role,
                        rules,
                        cases,
                    });
                }
            } else {
                let p = presets::preset(&preset_name).ok_or_else(|| {
                    let known: Vec<&str> = presets::PRESETS.iter().map(|p| p.key).collect();
                    Error::config(
                        path,
                        format!(
                            "dataset {}: unknown preset {preset_name:?} (known: official, {})",
                            d.name,
                            known.join(", ")
                        ),
                    )
                })?;
                let rules = rules_from(p, d);
                check_rules(&rules, &d.name, path)?;
                datasets.push(Dataset {
                    name: d.name.clone(),
                    preset: preset_name,
                    role: d.role,
                    rules,
                    cases: found.into_iter().map(|(_, c)| c).collect(),
                });
            }
        }
        Ok(Manifest {
            path: path.to_path_buf(),
            datasets,
        })
    }
}
