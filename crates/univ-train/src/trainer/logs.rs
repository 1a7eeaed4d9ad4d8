//! The run's logs: `log.csv` (one row per step), `validation.csv`, `curves.png`, and their
//! truncation when a run resumes from an earlier checkpoint.

use std::io::Write;
use std::path::Path;

use super::{StepLog, Trainer, ValidationLog};
use crate::error::{Error, Result};
use crate::io::write_atomic;

impl Trainer {
    pub(super) fn append_log(&self, log: &StepLog) -> Result<()> {
        let classes: Vec<String> = log
            .per_class
            .iter()
            .map(|(c, l)| format!("{c}:{l:.6}"))
            .collect();
        append_csv(
            &self.out().join("log.csv"),
            "step,epoch,lr,loss,bce,dice,seconds,data_wait,class_losses",
            &format!(
                "{},{},{:.6e},{:.6},{:.6},{:.6},{:.3},{:.3},{}",
                log.step,
                log.epoch,
                log.lr,
                log.loss,
                log.bce,
                log.dice,
                log.seconds,
                log.data_wait,
                classes.join(";")
            ),
        )
    }

    pub(super) fn append_validation(&mut self, v: &ValidationLog) -> Result<()> {
        self.val_history.push((v.step, v.mean));
        let classes: Vec<String> = v
            .per_class
            .iter()
            .map(|(c, d)| format!("{c}:{d:.4}"))
            .collect();
        append_csv(
            &self.out().join("validation.csv"),
            "step,epoch,mean_dice,class_dice",
            &format!("{},{},{:.4},{}", v.step, v.epoch, v.mean, classes.join(";")),
        )
    }

    pub(super) fn truncate_logs(&mut self, step: u64) -> Result<()> {
        for (file, is_val) in [("log.csv", false), ("validation.csv", true)] {
            let path = self.out().join(file);
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let mut kept = String::new();
            for (i, line) in text.lines().enumerate() {
                let s: Option<u64> = line.split(',').next().and_then(|s| s.parse().ok());
                let cols: Vec<&str> = line.split(',').collect();
                if i == 0 || s.is_some_and(|s| s <= step) {
                    kept.push_str(line);
                    kept.push('\n');
                    if i > 0 {
                        if is_val {
                            if let (Some(s), Some(m)) =
                                (s, cols.get(2).and_then(|m| m.parse().ok()))
                            {
                                self.val_history.push((s, m));
                            }
                        } else if let (Some(s), Some(l)) =
                            (s, cols.get(3).and_then(|m| m.parse().ok()))
                        {
                            self.history.push((s, l));
                        }
                    }
                }
            }
            if self.is_main() {
                write_atomic(&path, kept.as_bytes())?;
            }
        }
        Ok(())
    }

    /// Draws `curves.png`: training loss per step (with a moving average) and validation
    /// mean Dice.
    ///
    /// # Errors
    /// I/O errors.
    pub fn write_curves(&self) -> Result<()> {
        let path = self.out().join("curves.png");
        let png = crate::plot::curves(&self.history, &self.val_history)
            .encode_png()
            .map_err(|e| Error::file(&path, e))?;
        write_atomic(&path, &png)
    }
}

/// Appends one row to a CSV file, writing the header first when the file is new.
fn append_csv(path: &Path, header: &str, row: &str) -> Result<()> {
    let new = !path.exists();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::file(path, e))?;
    let text = if new {
        format!("{header}\n{row}\n")
    } else {
        format!("{row}\n")
    };
    f.write_all(text.as_bytes())
        .map_err(|e| Error::file(path, e))
}
