//! Cohort manifests: a CSV file with a header row, or JSON lines, naming one case per row.
//!
//! Columns (CSV) or keys (JSON lines), in any order; others are ignored, so a manifest may
//! carry its own metadata:
//!
//! * `id` (required): the case's name and the name of its result folder `OUT/<id>`;
//! * `input` (required): a NIfTI file or a DICOM series folder (or file);
//! * `series` (optional): the Series Instance UID to read when the folder holds several;
//! * `reference` (optional): a label map (univ's class ids) to evaluate the result against.
//!
//! Relative paths are relative to the manifest's folder. Empty cells and JSON `null` are
//! absent values. CSV follows RFC 4180: fields may be quoted (`"a, b"`, with `""` for a quote),
//! lines end in LF or CRLF, a UTF-8 byte-order mark is skipped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The names univ itself writes in a cohort's output folder: no case may be called so (compared
/// without regard to case).
pub const RESERVED_NAMES: &[&str] = &[
    super::COHORT_CSV,
    super::COHORT_SUMMARY,
    super::COHORT_PLOT,
    super::LOG_DIR,
    super::MANIFEST_COPY,
];

/// The longest case id accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// The most problems one error message lists.
const MAX_LISTED: usize = 12;

/// One case of a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestCase {
    /// The case id (checked by [`check_case_id`]).
    pub id: String,
    /// The input: a NIfTI file or DICOM series, resolved against the manifest's folder.
    pub input: PathBuf,
    /// The Series Instance UID to read, for a DICOM folder with several series.
    pub series: Option<String>,
    /// A reference label map, resolved against the manifest's folder.
    pub reference: Option<PathBuf>,
    /// The line of the manifest the case is on (1-based).
    pub line: usize,
}

/// A cohort: its cases, in the manifest's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The file it was read from.
    pub path: PathBuf,
    /// The cases.
    pub cases: Vec<ManifestCase>,
}

/// Checks that `id` can name a result folder on any file system: 1 to [`MAX_ID_LEN`] bytes of
/// ASCII letters, digits, `.`, `_` and `-`, beginning with a letter or digit (so never `.`,
/// `..`, a hidden name or an option), and not one of univ's own names ([`RESERVED_NAMES`]).
///
/// # Errors
/// What is wrong with it.
pub fn check_case_id(id: &str) -> std::result::Result<(), String> {
    if id.is_empty() {
        return Err("the id is empty".into());
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!(
            "the id is {} bytes long (at most {MAX_ID_LEN})",
            id.len()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "the id {id:?} holds {c:?}: ids may hold only ASCII letters, digits, '.', '_' and '-' \
             (they name folders)"
        ));
    }
    if !id.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(format!("the id {id:?} must begin with a letter or digit"));
    }
    if RESERVED_NAMES.iter().any(|r| r.eq_ignore_ascii_case(id)) {
        return Err(format!(
            "the id {id:?} is a name univ writes in the output folder ({})",
            RESERVED_NAMES.join(", ")
        ));
    }
    Ok(())
}

/// One row as read: its line and its named values.
struct Row {
    line: usize,
    values: BTreeMap<String, String>,
}

/// Splits CSV text into records of fields, with the line each record begins on.
fn csv_records(text: &str) -> std::result::Result<Vec<(usize, Vec<String>)>, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut records = Vec::new();
    let mut fields: Vec<String> = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut was_quoted = false;
    let mut line = 1;
    let mut start = 1;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                c => {
                    if c == '\n' {
                        line += 1;
                    }
                    field.push(c);
                }
            }
            continue;
        }
        match c {
            '"' if field.is_empty() && !was_quoted => {
                quoted = true;
                was_quoted = true;
            }
            '"' => return Err(format!("line {line}: a quote inside an unquoted field")),
            ',' => {
                fields.push(std::mem::take(&mut field));
                was_quoted = false;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                fields.push(std::mem::take(&mut field));
                was_quoted = false;
                records.push((start, std::mem::take(&mut fields)));
                line += 1;
                start = line;
            }
            c if was_quoted => {
                return Err(format!(
                    "line {line}: {c:?} after a closing quote (expected ',' or the end of the line)"
                ));
            }
            c => field.push(c),
        }
    }
    if quoted {
        return Err(format!("line {start}: a quoted field is not closed"));
    }
    if !field.is_empty() || !fields.is_empty() || was_quoted {
        fields.push(field);
        records.push((start, fields));
    }
    // Blank lines are no records.
    records.retain(|(_, f)| !(f.len() == 1 && f[0].trim().is_empty()));
    Ok(records)
}

/// Rows, and the problems of single rows; `Err` for text that cannot be read at all.
type Rows = std::result::Result<(Vec<Row>, Vec<String>), Vec<String>>;

fn csv_rows(text: &str) -> Rows {
    let records = csv_records(text).map_err(|e| vec![e])?;
    let Some(((_, header), body)) = records.split_first() else {
        return Err(vec![
            "the manifest is empty (it needs a header row: id,input)".into(),
        ]);
    };
    let header: Vec<String> = header
        .iter()
        .map(|h| h.trim().to_ascii_lowercase())
        .collect();
    let mut problems = Vec::new();
    for (i, h) in header.iter().enumerate() {
        if header[..i].contains(h) && !h.is_empty() {
            problems.push(format!("line 1: the column {h:?} appears twice"));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let mut rows = Vec::new();
    for (line, fields) in body {
        if fields.len() != header.len() {
            problems.push(format!(
                "line {line}: {} fields, but the header has {}",
                fields.len(),
                header.len()
            ));
            continue;
        }
        let values = header
            .iter()
            .zip(fields)
            .filter(|(h, v)| !h.is_empty() && !v.trim().is_empty())
            .map(|(h, v)| (h.clone(), v.trim().to_string()))
            .collect();
        rows.push(Row {
            line: *line,
            values,
        });
    }
    Ok((rows, problems))
}

fn jsonl_rows(text: &str) -> Rows {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut rows = Vec::new();
    let mut problems = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let line = i + 1;
        if l.trim().is_empty() {
            continue;
        }
        let obj: serde_json::Map<String, serde_json::Value> = match serde_json::from_str(l) {
            Ok(o) => o,
            Err(e) => {
                problems.push(format!("line {line}: not a JSON object: {e}"));
                continue;
            }
        };
        let mut values = BTreeMap::new();
        let before = problems.len();
        for (k, v) in obj {
            let k = k.to_ascii_lowercase();
            let text = match v {
                serde_json::Value::Null => continue,
                serde_json::Value::String(s) => s,
                // Numeric ids (`"id": 1001`) are common.
                serde_json::Value::Number(n) if k == "id" && n.is_u64() => n.to_string(),
                v if COLUMNS.contains(&k.as_str()) => {
                    problems.push(format!("line {line}: {k:?} must be a string, not {v}"));
                    continue;
                }
                _ => continue,
            };
            if !text.trim().is_empty() {
                values.insert(k, text.trim().to_string());
            }
        }
        if problems.len() == before {
            rows.push(Row { line, values });
        }
    }
    Ok((rows, problems))
}

/// The columns univ reads.
const COLUMNS: &[&str] = &["id", "input", "series", "reference"];

/// `true` when the manifest is JSON lines: by its extension (`.jsonl`, `.ndjson`, `.json`), or,
/// for another extension, when its text begins with `{`.
fn is_jsonl(path: &Path, text: &str) -> bool {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "csv" => false,
        "jsonl" | "ndjson" | "json" => true,
        _ => text
            .trim_start_matches('\u{feff}')
            .trim_start()
            .starts_with('{'),
    }
}

fn manifest_error(path: &Path, problems: Vec<String>) -> Error {
    Error::Manifest {
        path: path.to_path_buf(),
        problems,
    }
}

/// Joins the listed problems into one message, at most [`MAX_LISTED`] of them.
pub(crate) fn list_problems(problems: &[String]) -> String {
    let mut s = problems
        .iter()
        .take(MAX_LISTED)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if problems.len() > MAX_LISTED {
        s.push_str(&format!("; and {} more", problems.len() - MAX_LISTED));
    }
    s
}

impl Manifest {
    /// Reads a manifest (see the module docs) and checks its ids: present, valid
    /// ([`check_case_id`]) and unique, also without regard to case (`Case1` and `case1`
    /// would be one folder on macOS and Windows). Inputs are not looked at: see
    /// [`check_files`](Self::check_files).
    ///
    /// # Errors
    /// [`Error::Manifest`] listing every problem with its line.
    pub fn read(path: &Path) -> Result<Manifest> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| manifest_error(path, vec![format!("cannot read: {e}")]))?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Self::parse(&text, is_jsonl(path, &text), base)
            .map(|cases| Manifest {
                path: path.to_path_buf(),
                cases,
            })
            .map_err(|p| manifest_error(path, p))
    }

    /// Parses manifest text (CSV, or JSON lines when `jsonl`), resolving relative paths
    /// against `base`.
    ///
    /// # Errors
    /// Every problem found, with its line.
    pub fn parse(
        text: &str,
        jsonl: bool,
        base: &Path,
    ) -> std::result::Result<Vec<ManifestCase>, Vec<String>> {
        let (rows, mut problems) = if jsonl {
            jsonl_rows(text)?
        } else {
            csv_rows(text)?
        };
        let mut cases = Vec::new();
        let mut seen: BTreeMap<String, (usize, String)> = BTreeMap::new();
        for r in rows {
            let line = r.line;
            let (Some(id), Some(input)) = (r.values.get("id"), r.values.get("input")) else {
                problems.push(format!(
                    "line {line}: {} is missing (every case needs an id and an input)",
                    if r.values.contains_key("id") {
                        "the input"
                    } else {
                        "the id"
                    }
                ));
                continue;
            };
            if let Err(e) = check_case_id(id) {
                problems.push(format!("line {line}: {e}"));
                continue;
            }
            let key = id.to_ascii_lowercase();
            if let Some((first, other)) = seen.get(&key) {
                problems.push(if other == id {
                    format!("line {line}: the id {id:?} is also on line {first}")
                } else {
                    format!(
                        "line {line}: the id {id:?} differs from {other:?} on line {first} only \
                         in case (one folder on some file systems)"
                    )
                });
                continue;
            }
            seen.insert(key, (line, id.clone()));
            cases.push(ManifestCase {
                id: id.clone(),
                input: base.join(input),
                series: r.values.get("series").cloned(),
                reference: r.values.get("reference").map(|p| base.join(p)),
                line,
            });
        }
        if cases.is_empty() && problems.is_empty() {
            problems.push("the manifest names no case".into());
        }
        // Problems in line order.
        problems.sort_by_key(|p| {
            p.strip_prefix("line ")
                .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(0)
        });
        if problems.is_empty() {
            Ok(cases)
        } else {
            Err(problems)
        }
    }

    /// Checks that every case's input and reference exist, before any inference.
    ///
    /// # Errors
    /// [`Error::Manifest`] listing every case whose files are missing.
    pub fn check_files(&self) -> Result<()> {
        let mut problems = Vec::new();
        for c in &self.cases {
            if !c.input.exists() {
                problems.push(format!(
                    "line {} ({}): the input {} does not exist",
                    c.line,
                    c.id,
                    c.input.display()
                ));
            }
            if let Some(r) = &c.reference
                && !r.is_file()
            {
                problems.push(format!(
                    "line {} ({}): the reference {} is not a file",
                    c.line,
                    c.id,
                    r.display()
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(manifest_error(&self.path, problems))
        }
    }

    /// The manifest as JSON lines with absolute paths, the form univ keeps in a cohort's output
    /// folder ([`MANIFEST_COPY`](super::MANIFEST_COPY)).
    pub fn to_jsonl(&self) -> String {
        let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let mut s = String::new();
        for c in &self.cases {
            let mut o = serde_json::json!({"id": c.id, "input": abs(&c.input)});
            if let Some(v) = &c.series {
                o["series"] = serde_json::json!(v);
            }
            if let Some(r) = &c.reference {
                o["reference"] = serde_json::json!(abs(r));
            }
            s.push_str(&o.to_string());
            s.push('\n');
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_csv(t: &str) -> std::result::Result<Vec<ManifestCase>, Vec<String>> {
        Manifest::parse(t, false, Path::new("/m"))
    }

    #[test]
    fn csv_with_quotes_crlf_extra_columns_and_relative_paths() {
        let t = "\u{feff}ID, input ,age,series\r\n\
                 c1,ct/a.nii.gz,54,\r\n\
                 \r\n\
                 \"c,2\"x,b,1,2\n";
        let e = parse_csv(t).unwrap_err();
        assert!(e[0].contains("after a closing quote"), "{e:?}");
        let t = "id,input,age,series,reference\r\n\
                 c1,ct/a.nii.gz,54,,\r\n\
                 \r\n\
                 c2,\"/data/b, final\",\"5\"\"1\",1.2.3,lab/c2.nii.gz\n\
                 c3,\"multi\nline\",,,";
        let c = parse_csv(t).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c[0].id, "c1");
        assert_eq!(c[0].input, PathBuf::from("/m/ct/a.nii.gz"));
        assert_eq!(
            (c[0].series.as_deref(), c[0].reference.as_deref()),
            (None, None)
        );
        assert_eq!(c[0].line, 2);
        assert_eq!(c[1].input, PathBuf::from("/data/b, final"));
        assert_eq!(c[1].series.as_deref(), Some("1.2.3"));
        assert_eq!(c[1].reference, Some(PathBuf::from("/m/lab/c2.nii.gz")));
        assert_eq!(c[1].line, 4);
        assert_eq!(c[2].input, PathBuf::from("/m/multi\nline"));
    }

    #[test]
    fn every_bad_row_is_reported_with_its_line() {
        let t = "id,input\n\
                 ok,a.nii\n\
                 ../x,b.nii\n\
                 ,c.nii\n\
                 d,\n\
                 OK,e.nii\n\
                 ok,f.nii\n\
                 a b,g.nii\n\
                 cohort.csv,h.nii\n\
                 1,2,3\n\
                 .hidden,i.nii\n";
        let e = parse_csv(t).unwrap_err();
        let all = e.join("\n");
        for needle in [
            "line 3: the id \"../x\" holds '/'",
            "line 4: the id is missing",
            "line 5: the input is missing",
            "line 6: the id \"OK\" differs from \"ok\" on line 2 only in case",
            "line 7: the id \"ok\" is also on line 2",
            "line 8: the id \"a b\" holds ' '",
            "line 9: the id \"cohort.csv\" is a name univ writes",
            "line 10: 3 fields, but the header has 2",
            "line 11: the id \".hidden\" must begin with a letter or digit",
        ] {
            assert!(all.contains(needle), "{needle:?} not in:\n{all}");
        }
        assert_eq!(e.len(), 9, "{all}");
        assert!(parse_csv("").unwrap_err()[0].contains("empty"));
        assert!(parse_csv("id,input\n").unwrap_err()[0].contains("no case"));
        assert!(parse_csv("id,id\n").unwrap_err()[0].contains("twice"));
        assert!(parse_csv("id,input\n\"a,b\n").unwrap_err()[0].contains("not closed"));
        assert!(check_case_id(&"a".repeat(129)).is_err());
        assert!(check_case_id("1.2.840.113619.2.55").is_ok());
    }

    #[test]
    fn json_lines_take_numeric_ids_and_nulls() {
        let t = "{\"id\": 1001, \"input\": \"a.nii.gz\", \"series\": null, \"age\": 3}\n\n\
                 {\"id\": \"b\", \"input\": \"/x/b\", \"reference\": \"r.nii\"}\n";
        let c = Manifest::parse(t, true, Path::new("m")).unwrap();
        assert_eq!(c[0].id, "1001");
        assert_eq!(c[0].input, PathBuf::from("m/a.nii.gz"));
        assert_eq!(c[0].series, None);
        assert_eq!(c[1].line, 3);
        assert_eq!(c[1].reference, Some(PathBuf::from("m/r.nii")));
        let e = Manifest::parse(
            "{\"id\": 1.5, \"input\": \"a\"}\n[1]\n",
            true,
            Path::new("."),
        )
        .unwrap_err();
        assert!(e[0].contains("\"id\" must be a string"), "{e:?}");
        assert!(e[1].starts_with("line 2: not a JSON object"), "{e:?}");
    }

    #[test]
    fn the_format_follows_the_extension_then_the_text() {
        assert!(is_jsonl(Path::new("a.jsonl"), "id,input"));
        assert!(!is_jsonl(Path::new("a.csv"), "{"));
        assert!(is_jsonl(Path::new("a.txt"), "  {\"id\": 1}"));
        assert!(!is_jsonl(Path::new("a"), "id,input"));
    }
}
