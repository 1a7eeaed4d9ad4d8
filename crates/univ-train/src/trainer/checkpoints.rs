//! Checkpoints: the weights under the official key names (what `univ segment` reads), the
//! optimiser state beside them, and resuming from the newest pair bit for bit.

use std::collections::HashMap;
use std::path::PathBuf;

use super::Trainer;
use crate::error::{Error, Result};
use crate::io::{load_safetensors, save_safetensors, write_atomic};

/// Fields that may change between a run and its resumption: the run's length (a run may be
/// continued for more steps), where files are (locations, not contents), how often it
/// checkpoints and validates, and how many threads load data (batches depend only on the
/// seed and the step).
pub(crate) const RESUME_FREE: [(&str, &str); 10] = [
    ("train", "steps"),
    ("train", "epochs"),
    ("train", "schedule_length"),
    ("train", "output"),
    ("train", "checkpoint_every"),
    ("train", "validate_every"),
    ("data", "manifest"),
    ("data", "cache"),
    ("data", "workers"),
    ("model", "init"),
];

/// The resume key of a configuration (see [`Trainer::resume_key`]).
pub(crate) fn resume_key(cfg: &crate::config::TrainConfig) -> String {
    let mut v = serde_json::to_value(cfg).unwrap_or_default();
    for (section, field) in RESUME_FREE {
        if let Some(s) = v.get_mut(section).and_then(|s| s.as_object_mut()) {
            s.remove(field);
        }
    }
    if let Some(m) = v.get_mut("model").and_then(|s| s.as_object_mut()) {
        // The embedding file's location; its content is the organ_embedding tensor.
        m.remove("embeddings");
    }
    v.to_string()
}

const STATE_SUFFIX: &str = ".state.safetensors";

impl Trainer {
    fn model_metadata(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        m.insert("format".into(), "univ-train".into());
        m.insert("step".into(), self.step.to_string());
        m.insert(
            "model".into(),
            serde_json::to_string(&self.cfg.model).unwrap_or_default(),
        );
        let names: Vec<&str> = self.classes.iter().map(|c| c.name.as_str()).collect();
        m.insert(
            univ_model::checkpoint::CLASS_NAMES_KEY.into(),
            serde_json::to_string(&names).unwrap_or_default(),
        );
        m.insert(
            univ_model::checkpoint::TRAINED_CLASSES_KEY.into(),
            serde_json::to_string(&self.classes.trained_ids()).unwrap_or_default(),
        );
        m
    }

    /// What a checkpoint must share with the configuration to be resumed from: the whole
    /// configuration except [`RESUME_FREE`], so that a new field that changes training also
    /// changes the key (no resume across the change).
    pub(super) fn resume_key(&self) -> String {
        resume_key(&self.cfg)
    }

    /// Writes a checkpoint (weights, optimiser state) and `model.safetensors`; returns the
    /// weights file.
    ///
    /// # Errors
    /// I/O and tensor errors.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let dir = self.out().join("checkpoints");
        std::fs::create_dir_all(&dir).map_err(|e| Error::file(&dir, e))?;
        let name = format!("step_{:08}", self.step);
        let weights = dir.join(format!("{name}.safetensors"));
        let state = dir.join(format!("{name}{STATE_SUFFIX}"));
        let tensors = self.store.tensors();
        save_safetensors(&weights, &tensors, self.model_metadata())?;
        let (moments, step) = self.opt.state();
        let mut meta = HashMap::new();
        meta.insert("step".into(), step.to_string());
        meta.insert("seed".into(), self.cfg.train.seed.to_string());
        meta.insert("resume_key".into(), self.resume_key());
        save_safetensors(&state, &moments, meta)?;
        save_safetensors(
            &self.out().join("model.safetensors"),
            &tensors,
            self.model_metadata(),
        )?;
        let latest = serde_json::json!({ "step": self.step, "weights": format!("{name}.safetensors"),
            "state": format!("{name}{STATE_SUFFIX}") });
        write_atomic(&dir.join("latest.json"), latest.to_string().as_bytes())?;
        Ok(weights)
    }

    /// Continues from the newest checkpoint in the output folder; returns its step, or `None`
    /// when there is none. Log rows after that step (from a run that went further before it
    /// stopped) are dropped, so the log matches the resumed run.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] when the checkpoint does not fit this configuration.
    pub fn resume(&mut self) -> Result<Option<u64>> {
        let dir = self.out().join("checkpoints");
        let latest = dir.join("latest.json");
        if !latest.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&latest).map_err(|e| Error::file(&latest, e))?;
        let bad = |reason: String| Error::Checkpoint {
            path: latest.clone(),
            reason,
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("unreadable: {e}")))?;
        let (Some(wname), Some(sname)) = (v["weights"].as_str(), v["state"].as_str()) else {
            return Err(bad("no weights/state entries".into()));
        };
        let (weights, _) = load_safetensors(&dir.join(wname), &self.device)?;
        let (state, meta) = load_safetensors(&dir.join(sname), &self.device)?;
        let step: u64 = meta
            .get("step")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("the state file has no step".into()))?;
        if meta.get("resume_key") != Some(&self.resume_key()) {
            return Err(bad(format!(
                "the configuration changed since this checkpoint (saved: {}, now: {})",
                meta.get("resume_key").cloned().unwrap_or_default(),
                self.resume_key()
            )));
        }
        self.store.set_all(&weights).map_err(bad)?;
        self.opt.load_state(&state, step)?;
        self.step = step;
        self.truncate_logs(step)?;
        Ok(Some(step))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra_train: &str) -> crate::config::TrainConfig {
        let text = format!(
            "[model]\nbackbone = \"unet\"\nwidth = 4\n\n[data]\nmanifest = \"d.toml\"\n\n\
             [train]\noutput = \"run\"\nsteps = 2\n{extra_train}\n"
        );
        crate::config::TrainConfig::parse(&text, std::path::Path::new("."), "t.toml".as_ref())
            .unwrap()
    }

    #[test]
    fn the_resume_key_covers_every_field_that_changes_training() {
        let base = resume_key(&config(""));
        // What may change between a run and its resumption leaves the key alone ...
        assert_eq!(base, resume_key(&config("checkpoint_every = 7")));
        let mut longer = config("");
        longer.train.steps = Some(5);
        longer.data.workers = 9;
        assert_eq!(base, resume_key(&longer));
        // ... and everything else changes it, field by field, without a list of the fields:
        // every leaf of the serialised configuration outside RESUME_FREE is in the key.
        let value = serde_json::to_value(config("")).unwrap();
        let key: serde_json::Value = serde_json::from_str(&base).unwrap();
        for (section, fields) in value.as_object().unwrap() {
            for field in fields.as_object().unwrap().keys() {
                let free = RESUME_FREE.contains(&(section.as_str(), field.as_str()))
                    || (section == "model" && field == "embeddings");
                assert_eq!(
                    key[section].get(field).is_some(),
                    !free,
                    "{section}.{field}"
                );
            }
        }
        assert_ne!(base, resume_key(&config("lr = 0.5")));
        assert_ne!(base, resume_key(&config("schedule_unit = \"step\"")));
    }
}
