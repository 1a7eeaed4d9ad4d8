//! The 32 classes of the Universal Model and their prompts.

/// The prompt template of the official class embeddings.
pub const TEMPLATE: &str = "A computerized tomography of a {}";

/// One universal class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UniversalClass {
    /// Class index, 1-based (= output channel + 1).
    pub index: usize,
    /// The name used for outputs (the official `ORGAN_NAME`, with its 'Celiac Truck' spelling).
    pub name: &'static str,
    /// The exact string put into the template when the official embedding was made.
    pub prompt_name: &'static str,
}

/// The 32 classes in channel order. The official embedding (`txt_encoding.pth`) was computed
/// from the names in `prompt_name`, which keep two legacy spellings: 'Arota' (class 8, the
/// aorta) and 'Celiac Truck' (class 25, the celiac trunk). They are kept as data, not fixed,
/// so that recomputing the embedding reproduces the official file.
pub const UNIVERSAL_CLASSES: [UniversalClass; 32] = [
    c(1, "Spleen", "Spleen"),
    c(2, "Right Kidney", "Right Kidney"),
    c(3, "Left Kidney", "Left Kidney"),
    c(4, "Gall Bladder", "Gall Bladder"),
    c(5, "Esophagus", "Esophagus"),
    c(6, "Liver", "Liver"),
    c(7, "Stomach", "Stomach"),
    c(8, "Aorta", "Arota"),
    c(9, "Postcava", "Postcava"),
    c(
        10,
        "Portal Vein and Splenic Vein",
        "Portal Vein and Splenic Vein",
    ),
    c(11, "Pancreas", "Pancreas"),
    c(12, "Right Adrenal Gland", "Right Adrenal Gland"),
    c(13, "Left Adrenal Gland", "Left Adrenal Gland"),
    c(14, "Duodenum", "Duodenum"),
    c(15, "Hepatic Vessel", "Hepatic Vessel"),
    c(16, "Right Lung", "Right Lung"),
    c(17, "Left Lung", "Left Lung"),
    c(18, "Colon", "Colon"),
    c(19, "Intestine", "Intestine"),
    c(20, "Rectum", "Rectum"),
    c(21, "Bladder", "Bladder"),
    c(22, "Prostate", "Prostate"),
    c(23, "Left Head of Femur", "Left Head of Femur"),
    c(24, "Right Head of Femur", "Right Head of Femur"),
    c(25, "Celiac Truck", "Celiac Truck"),
    c(26, "Kidney Tumor", "Kidney Tumor"),
    c(27, "Liver Tumor", "Liver Tumor"),
    c(28, "Pancreas Tumor", "Pancreas Tumor"),
    c(29, "Hepatic Vessel Tumor", "Hepatic Vessel Tumor"),
    c(30, "Lung Tumor", "Lung Tumor"),
    c(31, "Colon Tumor", "Colon Tumor"),
    c(32, "Kidney Cyst", "Kidney Cyst"),
];

const fn c(index: usize, name: &'static str, prompt_name: &'static str) -> UniversalClass {
    UniversalClass {
        index,
        name,
        prompt_name,
    }
}

/// The prompt for a class name: the template filled with `name` as given.
pub fn prompt(name: &str) -> String {
    TEMPLATE.replace("{}", name)
}

/// The 32 official prompts, in channel order, with the legacy spellings.
pub fn universal_prompts() -> Vec<String> {
    UNIVERSAL_CLASSES
        .iter()
        .map(|c| prompt(c.prompt_name))
        .collect()
}

/// Finds a universal class by name (case-insensitive; accepts 'Aorta'/'Arota' and
/// 'Celiac Trunk'/'Celiac Truck', spaces or underscores).
pub fn find_class(name: &str) -> Option<&'static UniversalClass> {
    let norm = |s: &str| s.to_ascii_lowercase().replace('_', " ");
    let n = norm(name);
    let n = match n.as_str() {
        "celiac trunk" => "celiac truck".to_string(),
        _ => n,
    };
    UNIVERSAL_CLASSES
        .iter()
        .find(|c| norm(c.name) == n || norm(c.prompt_name) == n)
}
