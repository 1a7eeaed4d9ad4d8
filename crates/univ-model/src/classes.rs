//! The classes of the Universal Model, in one table: id, name, file-safe slug, kind, host
//! organs, SNOMED CT code, colour and the official prompt string.
//!
//! The 32 universal classes are the output channels of the released models, in channel order
//! (id = channel + 1): 25 organs, 6 tumour types and the kidney cyst. A model extended with new
//! classes (`univ train --extend`) has more rows; their names come from the checkpoint's
//! metadata or its embedding file, and [`ClassTable::for_model`] adds them after the 32.
//!
//! The official class embedding (`txt_encoding.pth`) was computed from the prompts
//! `"A computerized tomography of a {name}"` with two legacy spellings, 'Arota' (class 8, the
//! aorta) and 'Celiac Truck' (class 25, the celiac trunk). They are kept as data
//! ([`ClassInfo::prompt_name`]) so that recomputing the embedding reproduces the official file;
//! the display names are spelled correctly, and both spellings are accepted by
//! [`ClassTable::find`].

use std::fmt;

/// The prompt template of the official class embeddings (`{}` is the class's prompt name).
pub const PROMPT_TEMPLATE: &str = "A computerized tomography of a {}";

/// The prompt for a class name: [`PROMPT_TEMPLATE`] filled with `name` as given.
pub fn prompt(name: &str) -> String {
    PROMPT_TEMPLATE.replace("{}", name)
}

/// What a class is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClassKind {
    /// An organ or vessel: one structure, post-processed to its largest connected component.
    Organ,
    /// A tumour: lesions reported one by one, counted by case-level detection.
    Tumour,
    /// A cyst: lesions reported one by one, but not a tumour.
    Cyst,
}

impl ClassKind {
    /// `true` for tumours and cysts, whose connected components are reported as lesions.
    pub fn is_lesion(self) -> bool {
        matches!(self, ClassKind::Tumour | ClassKind::Cyst)
    }

    /// `"organ"`, `"tumour"` or `"cyst"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ClassKind::Organ => "organ",
            ClassKind::Tumour => "tumour",
            ClassKind::Cyst => "cyst",
        }
    }
}

impl fmt::Display for ClassKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A SNOMED CT concept: code value and meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snomed {
    /// The code value (`"10200004"`).
    pub code: &'static str,
    /// The code meaning (`"Liver"`).
    pub meaning: &'static str,
}

/// One class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassInfo {
    /// The class id: 1-based output channel.
    pub id: usize,
    /// The display name (`"Celiac Trunk"`).
    pub name: String,
    /// The file-safe name used for per-class files (`"celiac_trunk"`).
    pub slug: String,
    /// What the class is.
    pub kind: ClassKind,
    /// The organs a lesion class lies in (empty for organs).
    pub hosts: Vec<usize>,
    /// The segmented property's SNOMED CT concept, where one is well known.
    pub snomed: Option<Snomed>,
    /// The colour of outlines and DICOM segments.
    pub colour: [u8; 3],
    /// The exact string put into [`PROMPT_TEMPLATE`] when the class's embedding was made
    /// (`"Celiac Truck"` for the official file); `None` when unknown (a learned encoding).
    pub prompt_name: Option<String>,
    /// Other spellings [`ClassTable::find`] accepts.
    pub aliases: Vec<String>,
    /// `true` when the checkpoint was trained on this class (its masks mean something); a
    /// checkpoint that does not say is taken as trained on all its classes, as the official
    /// files are.
    pub trained: bool,
}

impl ClassInfo {
    /// The prompt of the class's embedding, when its prompt name is known.
    pub fn prompt(&self) -> Option<String> {
        self.prompt_name.as_deref().map(prompt)
    }

    /// `true` for tumours and cysts.
    pub fn is_lesion(&self) -> bool {
        self.kind.is_lesion()
    }

    /// `true` when `given` names this class: its id (`"6"`), name, slug, prompt name or an
    /// alias, ignoring case, spaces, underscores and dashes.
    pub fn matches(&self, given: &str) -> bool {
        let g = given.trim();
        if let Ok(id) = g.parse::<usize>() {
            return id == self.id;
        }
        let n = norm(g);
        norm(&self.name) == n
            || self.slug == n
            || self.prompt_name.as_deref().is_some_and(|p| norm(p) == n)
            || self.aliases.iter().any(|a| norm(a) == n)
    }
}

/// One row of the static table.
struct Def {
    name: &'static str,
    kind: ClassKind,
    hosts: &'static [usize],
    snomed: Option<(&'static str, &'static str)>,
    colour: [u8; 3],
    prompt_name: &'static str,
}

const fn organ(name: &'static str, snomed: (&'static str, &'static str), colour: [u8; 3]) -> Def {
    Def {
        name,
        kind: ClassKind::Organ,
        hosts: &[],
        snomed: Some(snomed),
        colour,
        prompt_name: name,
    }
}

const fn lesion(
    name: &'static str,
    kind: ClassKind,
    hosts: &'static [usize],
    colour: [u8; 3],
) -> Def {
    let snomed = match kind {
        ClassKind::Cyst => ("441457006", "Cyst"),
        _ => ("108369006", "Neoplasm"),
    };
    Def {
        name,
        kind,
        hosts,
        snomed: Some(snomed),
        colour,
        prompt_name: name,
    }
}

use ClassKind::{Cyst, Tumour};

/// The 32 universal classes in channel order. Names are the official `ORGAN_NAME` list with
/// the two legacy spellings corrected (the prompt names keep them); SNOMED CT codes are those
/// of the segmented property types (laterality is in the meaning where SNOMED has no
/// lateralised concept of its own: the adrenal glands and femoral heads share one code, as do
/// all neoplasms); colours are 32 distinguishable ones (a Kelly/Trubetskoy-style palette).
const UNIVERSAL: [Def; 32] = [
    organ("Spleen", ("78961009", "Spleen"), [230, 25, 75]),
    organ("Right Kidney", ("9846003", "Right kidney"), [60, 180, 75]),
    organ("Left Kidney", ("18639004", "Left kidney"), [255, 225, 25]),
    organ("Gall Bladder", ("28231008", "Gallbladder"), [0, 130, 200]),
    organ("Esophagus", ("32849002", "Esophagus"), [245, 130, 48]),
    organ("Liver", ("10200004", "Liver"), [145, 30, 180]),
    organ("Stomach", ("69695003", "Stomach"), [70, 240, 240]),
    Def {
        prompt_name: "Arota",
        ..organ("Aorta", ("15825003", "Aorta"), [240, 50, 230])
    },
    organ(
        "Postcava",
        ("64131007", "Inferior vena cava"),
        [210, 245, 60],
    ),
    Def {
        snomed: None,
        ..organ("Portal Vein and Splenic Vein", ("", ""), [250, 190, 212])
    },
    organ("Pancreas", ("15776009", "Pancreas"), [0, 128, 128]),
    organ(
        "Right Adrenal Gland",
        ("23451007", "Adrenal gland"),
        [220, 190, 255],
    ),
    organ(
        "Left Adrenal Gland",
        ("23451007", "Adrenal gland"),
        [170, 110, 40],
    ),
    organ("Duodenum", ("38848004", "Duodenum"), [255, 250, 200]),
    Def {
        snomed: None,
        ..organ("Hepatic Vessel", ("", ""), [128, 0, 0])
    },
    organ("Right Lung", ("3341006", "Right lung"), [170, 255, 195]),
    organ("Left Lung", ("44029006", "Left lung"), [128, 128, 0]),
    organ("Colon", ("71854001", "Colon"), [255, 215, 180]),
    organ(
        "Intestine",
        ("113276009", "Intestinal structure"),
        [0, 0, 128],
    ),
    organ("Rectum", ("34402009", "Rectum"), [128, 128, 128]),
    organ("Bladder", ("89837001", "Urinary bladder"), [255, 255, 255]),
    organ("Prostate", ("41216001", "Prostate"), [255, 99, 71]),
    organ(
        "Left Head of Femur",
        ("68367000", "Head of femur"),
        [64, 224, 208],
    ),
    organ(
        "Right Head of Femur",
        ("68367000", "Head of femur"),
        [218, 112, 214],
    ),
    Def {
        prompt_name: "Celiac Truck",
        ..organ("Celiac Trunk", ("57850000", "Celiac trunk"), [255, 0, 0])
    },
    lesion("Kidney Tumor", Tumour, &[2, 3], [255, 255, 0]),
    lesion("Liver Tumor", Tumour, &[6], [0, 255, 0]),
    lesion("Pancreas Tumor", Tumour, &[11], [0, 255, 255]),
    // Hepatic vessel tumours (MSD Task08) lie in the liver, along its vessels.
    lesion("Hepatic Vessel Tumor", Tumour, &[6], [255, 0, 255]),
    lesion("Lung Tumor", Tumour, &[16, 17], [255, 128, 0]),
    lesion("Colon Tumor", Tumour, &[18], [128, 255, 0]),
    lesion("Kidney Cyst", Cyst, &[2, 3], [0, 128, 255]),
];

/// Number of universal classes.
pub const UNIVERSAL_COUNT: usize = UNIVERSAL.len();

/// Colours for classes beyond the universal 32, cycled.
const EXTRA_COLOURS: [[u8; 3]; 8] = [
    [255, 160, 122],
    [127, 255, 212],
    [186, 85, 211],
    [255, 215, 0],
    [100, 149, 237],
    [244, 164, 96],
    [154, 205, 50],
    [199, 21, 133],
];

/// A file-name slug: `Liver Tumor` → `liver_tumor` (ASCII letters and digits, lower case,
/// runs of anything else as one `_`).
pub fn slug(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    s.split('_')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("_")
}

/// A normalised spelling for name comparisons (case, spaces, underscores and dashes ignored).
fn norm(s: &str) -> String {
    slug(s)
}

/// Errors of [`ClassTable::parse_list`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClassError {
    /// A name or id that is not one of the table's classes.
    #[error("unknown class {given:?}: the model's classes are {known}")]
    Unknown {
        /// What was given.
        given: String,
        /// The table's classes, listed.
        known: String,
    },
    /// An empty list.
    #[error("no class given")]
    Empty,
}

/// The classes of a model, one per output channel in channel order. A whole model's classes
/// have ids 1..=K; a model restricted to some classes ([`crate::UniversalModel::select_classes`])
/// keeps their ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassTable {
    classes: Vec<ClassInfo>,
}

impl ClassTable {
    /// The 32 universal classes.
    pub fn universal() -> Self {
        let classes = UNIVERSAL
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let mut aliases = Vec::new();
                if d.prompt_name != d.name {
                    aliases.push(d.prompt_name.to_string());
                }
                ClassInfo {
                    id: i + 1,
                    name: d.name.to_string(),
                    slug: slug(d.name),
                    kind: d.kind,
                    hosts: d.hosts.to_vec(),
                    snomed: d.snomed.map(|(code, meaning)| Snomed { code, meaning }),
                    colour: d.colour,
                    prompt_name: Some(d.prompt_name.to_string()),
                    aliases,
                    trained: true,
                }
            })
            .collect();
        ClassTable { classes }
    }

    /// The table of a model with `k` class rows: the universal classes for the first 32 (or
    /// fewer), then one organ-kind class per extra row, named by `names[id - 1]` where given
    /// (from the checkpoint or its embedding file), else `Class <id>`. A name given for a
    /// universal row that is not one of its spellings (a model trained with another class
    /// order) replaces the row: its kind is then read from the name (tumour, cyst or organ),
    /// and it has no SNOMED code, host or prompt.
    pub fn for_model(k: usize, names: Option<&[String]>) -> Self {
        let mut t = Self::universal();
        t.classes.truncate(k);
        for id in t.classes.len() + 1..=k {
            let name = format!("Class {id}");
            t.classes.push(ClassInfo {
                id,
                slug: slug(&name),
                name,
                kind: ClassKind::Organ,
                hosts: Vec::new(),
                snomed: None,
                colour: EXTRA_COLOURS[(id - 1) % EXTRA_COLOURS.len()],
                prompt_name: None,
                aliases: Vec::new(),
                trained: true,
            });
        }
        for (c, given) in t.classes.iter_mut().zip(names.unwrap_or(&[])) {
            let given = given.trim();
            if given.is_empty() || norm(given) == norm(&c.name) {
                continue;
            }
            if c.aliases.iter().any(|a| norm(a) == norm(given)) {
                continue;
            }
            *c = ClassInfo {
                id: c.id,
                name: given.to_string(),
                slug: slug(given),
                kind: guess_kind(given),
                hosts: Vec::new(),
                snomed: None,
                colour: c.colour,
                prompt_name: None,
                aliases: Vec::new(),
                trained: c.trained,
            };
        }
        t
    }

    /// The number of classes.
    pub fn len(&self) -> usize {
        self.classes.len()
    }

    /// `true` when the table has no class.
    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }

    /// Every class, by id.
    pub fn iter(&self) -> impl Iterator<Item = &ClassInfo> {
        self.classes.iter()
    }

    /// A table of these classes (in channel order).
    ///
    /// # Panics
    /// When two classes share an id.
    pub fn from_classes(classes: Vec<ClassInfo>) -> Self {
        for (i, c) in classes.iter().enumerate() {
            assert!(
                classes[..i].iter().all(|d| d.id != c.id),
                "class id {} appears twice",
                c.id
            );
        }
        ClassTable { classes }
    }

    /// The class of an id.
    pub fn get(&self, id: usize) -> Option<&ClassInfo> {
        self.classes.iter().find(|c| c.id == id)
    }

    /// The class of channel `row` (0-based).
    pub fn row(&self, row: usize) -> Option<&ClassInfo> {
        self.classes.get(row)
    }

    /// The channel (0-based) of an id.
    pub fn row_of(&self, id: usize) -> Option<usize> {
        self.classes.iter().position(|c| c.id == id)
    }

    /// The ids, in channel order.
    pub fn ids(&self) -> Vec<usize> {
        self.classes.iter().map(|c| c.id).collect()
    }

    /// The classes of the given channels (0-based), in that order.
    ///
    /// # Panics
    /// A channel out of range.
    pub fn select_rows(&self, rows: &[usize]) -> Self {
        Self::from_classes(rows.iter().map(|r| self.classes[*r].clone()).collect())
    }

    /// The kind of an id (`None` when the table does not have it).
    pub fn kind(&self, id: usize) -> Option<ClassKind> {
        self.get(id).map(|c| c.kind)
    }

    /// The display name of an id; `class_<id>` for an id the table does not have.
    pub fn name(&self, id: usize) -> String {
        self.get(id)
            .map_or_else(|| format!("class_{id}"), |c| c.name.clone())
    }

    /// The slug of an id; `class_<id>` for an id the table does not have.
    pub fn slug(&self, id: usize) -> String {
        self.get(id)
            .map_or_else(|| format!("class_{id}"), |c| c.slug.clone())
    }

    /// The table with only `ids` marked as trained (every other class untrained).
    pub fn with_trained(mut self, ids: &[usize]) -> Self {
        for c in &mut self.classes {
            c.trained = ids.contains(&c.id);
        }
        self
    }

    /// The ids of the classes the checkpoint was trained on, in channel order.
    pub fn trained_ids(&self) -> Vec<usize> {
        self.iter().filter(|c| c.trained).map(|c| c.id).collect()
    }

    /// The ids of one kind, in id order.
    pub fn ids_of(&self, kind: ClassKind) -> Vec<usize> {
        self.iter()
            .filter(|c| c.kind == kind)
            .map(|c| c.id)
            .collect()
    }

    /// The ids of the lesion classes (tumours and cysts), in id order.
    pub fn lesion_ids(&self) -> Vec<usize> {
        self.iter()
            .filter(|c| c.is_lesion())
            .map(|c| c.id)
            .collect()
    }

    /// Finds a class by id (`"6"`), name, slug, prompt name or alias, ignoring case, spaces,
    /// underscores and dashes (`liver`, `Liver Tumor`, `liver_tumor`, `Arota`, `celiac-trunk`).
    pub fn find(&self, given: &str) -> Option<&ClassInfo> {
        self.iter().find(|c| c.matches(given))
    }

    /// Parses a comma-separated list of names or ids (`liver,spleen` or `6,1`) into ids, in
    /// the order given, without repeats.
    ///
    /// # Errors
    /// [`ClassError::Unknown`] naming the first unknown entry, [`ClassError::Empty`].
    pub fn parse_list(&self, spec: &str) -> Result<Vec<usize>, ClassError> {
        let mut out = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let c = self.find(part).ok_or_else(|| ClassError::Unknown {
                given: part.to_string(),
                known: self.describe(),
            })?;
            if !out.contains(&c.id) {
                out.push(c.id);
            }
        }
        if out.is_empty() {
            return Err(ClassError::Empty);
        }
        Ok(out)
    }

    /// `1 spleen, 2 right_kidney, …`: the ids and slugs, for messages.
    pub fn describe(&self) -> String {
        self.iter()
            .map(|c| format!("{} {}", c.id, c.slug))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The official prompts of the classes, in id order (`None` where unknown).
    pub fn prompts(&self) -> Vec<Option<String>> {
        self.iter().map(ClassInfo::prompt).collect()
    }
}

/// A kind for a class known only by its name: a tumour when the name says tumour (or tumor,
/// neoplasm, cancer, lesion, metastasis), a cyst when it says cyst, else an organ.
fn guess_kind(name: &str) -> ClassKind {
    let n = name.to_ascii_lowercase();
    if n.contains("cyst") {
        ClassKind::Cyst
    } else if ["tumor", "tumour", "neoplasm", "cancer", "lesion", "metasta"]
        .iter()
        .any(|w| n.contains(w))
    {
        ClassKind::Tumour
    } else {
        ClassKind::Organ
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn universal_table_has_the_official_layout() {
        let t = ClassTable::universal();
        assert_eq!(t.len(), 32);
        assert_eq!(t.ids_of(ClassKind::Organ), (1..=25).collect::<Vec<_>>());
        assert_eq!(t.ids_of(ClassKind::Tumour), (26..=31).collect::<Vec<_>>());
        assert_eq!(t.ids_of(ClassKind::Cyst), vec![32]);
        assert_eq!(t.lesion_ids(), (26..=32).collect::<Vec<_>>());
        assert_eq!(t.name(25), "Celiac Trunk");
        assert_eq!(
            t.get(25).unwrap().prompt_name.as_deref(),
            Some("Celiac Truck")
        );
        assert_eq!(
            t.get(8).unwrap().prompt().unwrap(),
            "A computerized tomography of a Arota"
        );
        assert_eq!(t.slug(10), "portal_vein_and_splenic_vein");
        let colours: std::collections::HashSet<[u8; 3]> = t.iter().map(|c| c.colour).collect();
        assert_eq!(colours.len(), 32, "colours are distinct");
    }

    #[test]
    fn find_accepts_ids_names_slugs_and_legacy_spellings() {
        let t = ClassTable::universal();
        for (given, id) in [
            ("6", 6),
            ("liver", 6),
            ("Liver Tumor", 27),
            ("liver_tumor", 27),
            ("Arota", 8),
            ("aorta", 8),
            ("Celiac Truck", 25),
            ("celiac-trunk", 25),
        ] {
            assert_eq!(t.find(given).map(|c| c.id), Some(id), "{given}");
        }
        assert!(t.find("33").is_none());
        assert!(t.find("brain").is_none());
        assert_eq!(t.parse_list("liver, spleen,6").unwrap(), vec![6, 1]);
        let e = t.parse_list("liver,brain").unwrap_err();
        assert!(e.to_string().contains("\"brain\""), "{e}");
        assert_eq!(t.parse_list(" , ").unwrap_err(), ClassError::Empty);
    }

    #[test]
    fn extended_tables_name_new_rows() {
        let names: Vec<String> = (1..=32)
            .map(|i| ClassTable::universal().name(i))
            .chain(["Bone Lesion".to_string()])
            .collect();
        let t = ClassTable::for_model(33, Some(&names));
        assert_eq!(t.len(), 33);
        let c = t.get(33).unwrap();
        assert_eq!(
            (c.name.as_str(), c.slug.as_str()),
            ("Bone Lesion", "bone_lesion")
        );
        assert_eq!(c.kind, ClassKind::Tumour);
        assert_eq!(t.parse_list("bone_lesion,liver").unwrap(), vec![33, 6]);
        // The universal rows keep what they know (the legacy spellings count as the same name).
        assert_eq!(t.get(25), ClassTable::universal().get(25));
        // Unnamed extra rows, and smaller models.
        let t = ClassTable::for_model(34, None);
        assert_eq!(t.name(34), "Class 34");
        assert_eq!(ClassTable::for_model(20, None).len(), 20);
    }
}
