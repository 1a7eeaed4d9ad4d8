//! Class embeddings: one row per class prompt, with where they came from.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sha2::Digest;

use crate::error::{Error, Result};

/// Class embeddings `(K, D)` with the class names and the exact prompt strings.
#[derive(Debug, Clone)]
pub struct ClassEmbeddings {
    /// Class names, one per row.
    pub names: Vec<String>,
    /// The exact strings that were embedded, one per row.
    pub prompts: Vec<String>,
    embeddings: Tensor,
    /// Free-form provenance (template, encoder, source file, ...), saved as safetensors
    /// metadata.
    pub provenance: BTreeMap<String, String>,
}

/// Largest `data.pkl` of a class-embedding file (a saved tensor's is a few hundred bytes).
const MAX_EMBEDDING_PICKLE: u64 = 1 << 20;

/// Checks the pickle of a saved tensor before it is built: every opcode's argument within the
/// data, and at most 64 memo references and 64 nested marks — a saved tensor needs a few, and a
/// "memo bomb" (a list holding itself twice, over and over) or deep nesting needs many.
fn guard_pickle(data: &[u8]) -> std::result::Result<(), String> {
    const MAX_GETS: usize = 64;
    const MAX_MARKS: usize = 64;
    let (mut pos, mut gets, mut marks) = (0usize, 0usize, 0usize);
    let arg = |pos: &mut usize, n: usize| -> std::result::Result<&[u8], String> {
        let end = pos
            .checked_add(n)
            .filter(|e| *e <= data.len())
            .ok_or("the pickle ends inside an opcode")?;
        let s = &data[*pos..end];
        *pos = end;
        Ok(s)
    };
    loop {
        let op = arg(&mut pos, 1)?[0];
        match op {
            b'.' => return Ok(()),
            b'h' | b'j' => {
                arg(&mut pos, if op == b'h' { 1 } else { 4 })?;
                gets += 1;
                if gets > MAX_GETS {
                    return Err("too many memo references for a saved tensor (a memo bomb?)".into());
                }
            }
            b'(' => {
                marks += 1;
                if marks > MAX_MARKS {
                    return Err("nested too deeply for a saved tensor".into());
                }
            }
            b't' | b'd' | b'e' | b'u' | b'l' => marks = marks.saturating_sub(1),
            0x80 | b'q' | b'K' => {
                arg(&mut pos, 1)?;
            }
            b'M' => {
                arg(&mut pos, 2)?;
            }
            b'r' | b'J' => {
                arg(&mut pos, 4)?;
            }
            b'G' => {
                arg(&mut pos, 8)?;
            }
            b'X' => {
                let n = arg(&mut pos, 4)?;
                let n = u32::from_le_bytes([n[0], n[1], n[2], n[3]]) as usize;
                arg(&mut pos, n)?;
            }
            0x8a => {
                let n = usize::from(arg(&mut pos, 1)?[0]);
                arg(&mut pos, n)?;
            }
            b'c' => {
                for _ in 0..2 {
                    let nl = data[pos..]
                        .iter()
                        .position(|b| *b == b'\n')
                        .ok_or("the pickle ends inside a global name")?;
                    pos += nl + 1;
                }
            }
            b')' | b']' | b'}' | b'N' | 0x88 | 0x89 | 0x85 | 0x86 | 0x87 | b'R' | b'b' | 0x81
            | b'Q' | b'a' | b's' => {}
            other => return Err(format!("unsupported pickle opcode 0x{other:02x}")),
        }
    }
}

/// Reads a tensor saved with `torch.save(tensor)` (a zip holding `data.pkl` and the storage):
/// a bare tensor, or a dict holding exactly one tensor.
///
/// # Errors
/// [`Error::File`] when the file is not such a torch file.
pub fn read_torch_tensor(path: impl AsRef<Path>) -> Result<Tensor> {
    use candle_core::pickle::{Object, Stack};
    let p = path.as_ref();
    let bad = |r: String| Error::file(p, r);
    let f = std::fs::File::open(p).map_err(|e| Error::file(p, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(f))
        .map_err(|e| bad(format!("not a torch zip file: {e}")))?;
    let pkl = (0..zip.len())
        .filter_map(|i| {
            zip.by_index(i)
                .ok()
                .and_then(|f| f.name().ok().map(|n| n.to_string()))
        })
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| bad("no data.pkl inside".into()))?;
    let dir = std::path::PathBuf::from(pkl.strip_suffix(".pkl").unwrap_or(&pkl));
    let obj = {
        let mut entry = zip.by_name(&pkl).map_err(|e| bad(e.to_string()))?;
        if entry.size() > MAX_EMBEDDING_PICKLE {
            return Err(bad(format!(
                "data.pkl is {} bytes: more than a saved tensor needs",
                entry.size()
            )));
        }
        let mut bytes = Vec::new();
        (&mut entry)
            .take(MAX_EMBEDDING_PICKLE + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| bad(format!("cannot read data.pkl: {e}")))?;
        guard_pickle(&bytes).map_err(|e| bad(format!("data.pkl: {e}")))?;
        let mut r = std::io::Cursor::new(bytes);
        let mut stack = Stack::empty();
        stack
            .read_loop(&mut r)
            .map_err(|e| bad(format!("cannot read the pickle: {e}")))?;
        stack
            .finalize()
            .map_err(|e| bad(format!("cannot read the pickle: {e}")))?
    };
    let candidates: Vec<Object> = match obj {
        Object::Dict(kv) => kv.into_iter().map(|(_, v)| v).collect(),
        other => vec![other],
    };
    let mut infos = Vec::new();
    for c in candidates {
        if let Ok(Some(info)) = c.into_tensor_info(Object::Unicode("tensor".into()), &dir) {
            infos.push(info);
        }
    }
    if infos.len() != 1 {
        return Err(bad(format!("expected one tensor, found {}", infos.len())));
    }
    let info = infos.remove(0);
    let mut bytes = Vec::new();
    zip.by_name(&info.path)
        .map_err(|e| bad(format!("missing storage {}: {e}", info.path)))?
        .read_to_end(&mut bytes)
        .map_err(|e| Error::file(p, e))?;
    let layout = &info.layout;
    if !layout.is_contiguous() {
        return Err(bad("non-contiguous tensors are not supported".into()));
    }
    let elem = info.dtype.size_in_bytes();
    let start = layout.start_offset().saturating_mul(elem);
    let len = layout
        .dims()
        .iter()
        .try_fold(elem, |a, d| a.checked_mul(*d))
        .ok_or_else(|| bad(format!("tensor shape {:?} overflows", layout.dims())))?;
    if bytes.len() < start.saturating_add(len) {
        return Err(bad(format!(
            "storage holds {} bytes, the tensor needs {}",
            bytes.len(),
            start + len
        )));
    }
    Ok(Tensor::from_raw_buffer(
        &bytes[start..start + len],
        info.dtype,
        layout.dims(),
        &Device::Cpu,
    )?)
}

/// Checks a `.npy` file's header before it is read: a 2-D shape whose size, at the dtype's item
/// size, is exactly the data that follows (no overflow, no allocation beyond the file).
fn check_npy(p: &Path) -> Result<()> {
    let bad = |r: String| Error::file(p, format!("not a usable .npy file: {r}"));
    let bytes = std::fs::read(p).map_err(|e| Error::file(p, e))?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("no NUMPY magic".into()));
    }
    let (len, start): (usize, usize) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(format!("version {v}"))),
    };
    let header = bytes
        .get(start..start.saturating_add(len))
        .ok_or_else(|| bad("the header runs past the end of the file".into()))?;
    let header = String::from_utf8_lossy(header);
    // The fields as candle's reader will see them: top-level `key: value` parts, the last of
    // a repeated key winning. Repeated keys are refused (the check must see what candle sees).
    let fields = npy_fields(&header).map_err(bad)?;
    let descr = fields
        .get("descr")
        .ok_or_else(|| bad("no descr".into()))?
        .trim_start_matches(['<', '|', '=']);
    let item = match descr {
        "e" | "f2" => 2usize,
        "f" | "f4" => 4,
        "d" | "f8" => 8,
        _ => {
            return Err(bad(format!(
                "dtype {descr:?}: expected little-endian floats"
            )));
        }
    };
    let shape_txt = fields.get("shape").ok_or_else(|| bad("no shape".into()))?;
    let inner = shape_txt.trim_matches(['(', ')', ',']);
    let dims: Vec<u128> = if inner.is_empty() {
        Vec::new()
    } else {
        inner
            .split(',')
            .map(|d| d.trim().parse::<u128>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad(format!("shape {shape_txt:?}: {e}")))?
    };
    if dims.len() != 2 {
        return Err(bad(format!("shape {dims:?}: class embeddings are (K, D)")));
    }
    let need = dims.iter().fold(item as u128, |a, d| a.saturating_mul(*d));
    let have = (bytes.len() - start - len) as u128;
    if need != have {
        return Err(bad(format!(
            "shape {dims:?} of {item}-byte values needs {need} bytes, the file holds {have}"
        )));
    }
    Ok(())
}

/// The `key: value` fields of an `.npy` header dictionary, split at top-level commas as
/// candle's reader splits them; a key given twice is an error.
fn npy_fields(header: &str) -> std::result::Result<BTreeMap<String, String>, String> {
    let body = header.trim_matches(|c: char| c == '{' || c == '}' || c == ',' || c.is_whitespace());
    let mut parts = Vec::new();
    let (mut start, mut depth) = (0usize, 0i64);
    for (i, ch) in body.char_indices() {
        match ch {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&body[start..]);
    let mut fields = BTreeMap::new();
    for part in parts.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        let [key, value] = part.split(':').collect::<Vec<_>>()[..] else {
            return Err(format!("header part {part:?} is not `key: value`"));
        };
        let strip = |t: &str| {
            t.trim_matches(|c: char| c == '\'' || c.is_whitespace())
                .to_string()
        };
        if fields.insert(strip(key), strip(value)).is_some() {
            return Err(format!("the header gives {:?} twice", strip(key)));
        }
    }
    Ok(fields)
}

impl ClassEmbeddings {
    /// Embeddings with names and prompts (their counts must match the rows).
    ///
    /// # Errors
    /// [`Error::Invalid`] for a count mismatch or a tensor that is not 2-D.
    pub fn new(names: Vec<String>, prompts: Vec<String>, embeddings: Tensor) -> Result<Self> {
        let (k, _) = embeddings.dims2().map_err(|_| {
            Error::Invalid(format!(
                "embeddings must be (K, D), got {:?}",
                embeddings.dims()
            ))
        })?;
        if names.len() != k || prompts.len() != k {
            return Err(Error::Invalid(format!(
                "{k} rows but {} names and {} prompts",
                names.len(),
                prompts.len()
            )));
        }
        Ok(ClassEmbeddings {
            names,
            prompts,
            embeddings: embeddings.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
            provenance: BTreeMap::new(),
        })
    }

    /// Rows named `class_1`, `class_2`, ... with unknown prompts (a file that stores no names,
    /// such as the official `txt_encoding.pth`; the caller may set [`names`](Self::names)
    /// and [`prompts`](Self::prompts) from what it knows).
    fn with_default_names(t: Tensor) -> Result<Self> {
        let (k, _) = t
            .dims2()
            .map_err(|_| Error::Invalid(format!("expected (K, D), got {:?}", t.dims())))?;
        Self::new(
            (1..=k).map(|i| format!("class_{i}")).collect(),
            vec![String::new(); k],
            t,
        )
    }

    /// Loads `.pth` (a torch-saved tensor, such as the official `txt_encoding.pth`),
    /// `.safetensors` (tensor `embeddings`, names and prompts from its metadata) or `.npy`.
    ///
    /// # Errors
    /// [`Error::File`] for unreadable files or unknown extensions.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let p = path.as_ref();
        let ext = p
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        let mut out = match ext.as_str() {
            "pth" | "pt" => Self::with_default_names(read_torch_tensor(p)?)?,
            "npy" => {
                check_npy(p)?;
                Self::with_default_names(Tensor::read_npy(p).map_err(|e| Error::file(p, e))?)?
            }
            "safetensors" => {
                let bytes = std::fs::read(p).map_err(|e| Error::file(p, e))?;
                let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
                    .map_err(|e| Error::file(p, format!("not safetensors: {e}")))?;
                let meta: BTreeMap<String, String> = meta
                    .metadata()
                    .clone()
                    .map(|m| m.into_iter().collect())
                    .unwrap_or_default();
                let mut ts = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
                    .map_err(|e| Error::file(p, e))?;
                let t = ts
                    .remove("embeddings")
                    .ok_or_else(|| Error::file(p, "no tensor named `embeddings`"))?;
                let list = |key: &str| -> Option<Vec<String>> {
                    meta.get(key).and_then(|v| serde_json::from_str(v).ok())
                };
                let mut e = match (list("names"), list("prompts")) {
                    (Some(n), Some(pr)) => Self::new(n, pr, t).map_err(|e| Error::file(p, e))?,
                    _ => Self::with_default_names(t)?,
                };
                e.provenance = meta
                    .into_iter()
                    .filter(|(k, _)| k != "names" && k != "prompts")
                    .collect();
                e
            }
            _ => return Err(Error::file(p, "expected a .pth, .safetensors or .npy file")),
        };
        out.provenance
            .entry("source".into())
            .or_insert_with(|| p.display().to_string());
        Ok(out)
    }

    /// The embeddings `(K, D)`, f32 on the CPU.
    pub fn tensor(&self) -> &Tensor {
        &self.embeddings
    }

    /// Number of classes.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// `true` when there is no class.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Width of a row.
    pub fn dim(&self) -> usize {
        self.embeddings.dims()[1]
    }

    /// Appends a class (a new prompt is a new row).
    ///
    /// # Errors
    /// [`Error::Invalid`] when the row's width differs.
    pub fn push(&mut self, name: &str, prompt: &str, row: &Tensor) -> Result<()> {
        let row = row
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .flatten_all()?;
        if row.elem_count() != self.dim() {
            return Err(Error::Invalid(format!(
                "row of {} values, embeddings have {}",
                row.elem_count(),
                self.dim()
            )));
        }
        self.embeddings = Tensor::cat(&[&self.embeddings, &row.unsqueeze(0)?], 0)?;
        self.names.push(name.to_string());
        self.prompts.push(prompt.to_string());
        Ok(())
    }

    /// Euclidean norm of each row.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn norms(&self) -> Result<Vec<f32>> {
        Ok(self.embeddings.sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?)
    }

    /// Cosine similarity between every pair of classes, `(K, K)`.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn cosine_similarity(&self) -> Result<Vec<Vec<f32>>> {
        let n = self.embeddings.sqr()?.sum_keepdim(1)?.sqrt()?;
        let u = self.embeddings.broadcast_div(&n)?;
        Ok(u.matmul(&u.t()?)?.to_vec2::<f32>()?)
    }

    /// SHA-256 (hex) of the embeddings as little-endian f32, row-major.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn sha256(&self) -> Result<String> {
        let v = self.embeddings.flatten_all()?.to_vec1::<f32>()?;
        let mut h = sha2::Sha256::new();
        for x in v {
            h.update(x.to_le_bytes());
        }
        Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Writes safetensors (tensor `embeddings`, f32 `(K, D)`) with metadata: names, prompts
    /// (JSON lists), sha256 of the tensor, and the provenance entries (the prompt template
    /// among them, when the caller recorded it); atomically.
    ///
    /// # Errors
    /// [`Error::File`] when the file cannot be written.
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        let p = path.as_ref();
        let mut meta: std::collections::HashMap<String, String> = self
            .provenance
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        meta.insert(
            "names".into(),
            serde_json::to_string(&self.names).expect("strings"),
        );
        meta.insert(
            "prompts".into(),
            serde_json::to_string(&self.prompts).expect("strings"),
        );
        meta.insert("sha256".into(), self.sha256()?);
        let data: Vec<u8> = self
            .embeddings
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            self.embeddings.dims().to_vec(),
            &data,
        )
        .map_err(|e| Error::Invalid(e.to_string()))?;
        let bytes = safetensors::serialize([("embeddings", view)], Some(meta))
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let dir = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}-tmp-{}", std::process::id()));
        let res = std::fs::write(&tmp, &bytes)
            .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, p));
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::file(p, e));
        }
        Ok(())
    }
}
