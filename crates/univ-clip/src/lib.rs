#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod embeddings;
pub mod error;
pub mod hub;
pub mod model;
pub mod tokenizer;

pub use embeddings::ClassEmbeddings;
pub use error::{Error, Result};
pub use model::{ClipTextConfig, ClipTextModel, ClipTextOutput};
pub use tokenizer::ClipTokenizer;

/// A tokenizer and text encoder together: prompts in, embeddings out.
#[derive(Debug, Clone)]
pub struct ClipTextEncoder {
    /// The tokenizer.
    pub tokenizer: ClipTokenizer,
    /// The text model.
    pub model: ClipTextModel,
}

impl ClipTextEncoder {
    /// Loads both from a folder holding `config.json`, safetensors weights and tokenizer files
    /// (`tokenizer.json`, or `vocab.json` + `merges.txt`, or `bpe_simple_vocab_16e6.txt.gz`).
    ///
    /// # Errors
    /// Missing or invalid files.
    pub fn from_dir(
        dir: impl AsRef<std::path::Path>,
        device: &candle_core::Device,
    ) -> Result<Self> {
        Ok(ClipTextEncoder {
            tokenizer: ClipTokenizer::from_dir(dir.as_ref())?,
            model: ClipTextModel::from_dir(dir.as_ref(), device)?,
        })
    }

    /// Embeds prompts as given: `(N, projection_dim)`, raw `encode_text` output (not
    /// normalised).
    ///
    /// # Errors
    /// Prompts too long for the context; tensor errors.
    pub fn embed(&self, prompts: &[impl AsRef<str>]) -> Result<candle_core::Tensor> {
        let ids = self
            .tokenizer
            .encode_batch(prompts, self.model.token_device())?;
        // Only the tokens up to the longest prompt's end token matter: with the causal mask,
        // later (padding) positions cannot change the hidden state at the end token.
        let mut longest = 1;
        for p in prompts {
            longest = longest.max(self.tokenizer.encode(p.as_ref())?.len());
        }
        self.model.encode_text(&ids.narrow(1, 0, longest)?)
    }
}
