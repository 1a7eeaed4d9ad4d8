//! OpenAI's CLIP BPE tokenizer through the `tokenizers` crate.
//!
//! The pipeline reproduces OpenAI's `simple_tokenizer.py` (and Hugging Face's `CLIPTokenizer`):
//! NFC, whitespace runs → one space, lower-casing; the CLIP split pattern; byte-level BPE with
//! `</w>` word ends; `<|startoftext|>` (49406) first and `<|endoftext|>` (49407) last; a context of
//! 77 tokens padded with 0 as `clip.tokenize` pads (or with another id, as Hugging Face does).
//! (OpenAI also runs `ftfy.fix_text` and `html.unescape`, no-ops for plain ASCII prompts.)

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::{Device, Tensor};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormSeq};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};

/// Id of `<|startoftext|>`.
pub const START_OF_TEXT: u32 = 49406;
/// Id of `<|endoftext|>`.
pub const END_OF_TEXT: u32 = 49407;
/// CLIP's context length.
pub const CONTEXT_LENGTH: usize = 77;
/// OpenAI's split pattern.
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The CLIP tokenizer with OpenAI's padding and truncation rules.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    context: usize,
    pad_id: u32,
    truncate: bool,
}

/// GPT-2's reversible byte → printable character map, in its canonical order.
fn bytes_to_unicode() -> Vec<(u8, char)> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.into_iter()
        .zip(cs)
        .map(|(b, c)| (b as u8, char::from_u32(c).expect("valid code point")))
        .collect()
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl ClipTokenizer {
    /// Builds the tokenizer from a vocabulary (token → id) and merges (pairs, in rank order).
    ///
    /// # Errors
    /// [`Error::Tokenizer`] when the pieces are inconsistent.
    pub fn from_vocab_and_merges(
        vocab: HashMap<String, u32>,
        merges: Vec<(String, String)>,
    ) -> Result<Self> {
        let bpe = BPE::builder()
            .vocab_and_merges(
                vocab
                    .into_iter()
                    .collect::<tokenizers::models::bpe::Vocab>(),
                merges,
            )
            .unk_token("<|endoftext|>".to_string())
            .end_of_word_suffix("</w>".to_string())
            .build()
            .map_err(tok_err)?;
        let mut tk = Tokenizer::new(bpe);
        tk.with_normalizer(Some(NormSeq::new(vec![
            NFC.into(),
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                " ",
            )
            .map_err(tok_err)?
            .into(),
            Lowercase.into(),
        ])))
        .map_err(tok_err)?;
        let split = Split::new(
            SplitPattern::Regex(CLIP_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(tok_err)?;
        tk.with_pre_tokenizer(Some(PreSeq::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])));
        tk.with_post_processor(Some(
            RobertaProcessing::new(
                ("<|endoftext|>".into(), END_OF_TEXT),
                ("<|startoftext|>".into(), START_OF_TEXT),
            )
            .trim_offsets(false)
            .add_prefix_space(false),
        ));
        tk.add_special_tokens([
            AddedToken::from("<|startoftext|>", true).normalized(true),
            AddedToken::from("<|endoftext|>", true).normalized(false),
        ])
        .map_err(tok_err)?;
        Ok(Self::wrap(tk))
    }

    fn wrap(inner: Tokenizer) -> Self {
        ClipTokenizer {
            inner,
            context: CONTEXT_LENGTH,
            pad_id: 0,
            truncate: false,
        }
    }

    /// Reads Hugging Face's `vocab.json` and `merges.txt`.
    ///
    /// # Errors
    /// [`Error::File`] for unreadable or malformed files.
    pub fn from_files(vocab: impl AsRef<Path>, merges: impl AsRef<Path>) -> Result<Self> {
        let (vp, mp) = (vocab.as_ref(), merges.as_ref());
        let text = std::fs::read_to_string(vp).map_err(|e| Error::file(vp, e))?;
        let vocab: HashMap<String, u32> = serde_json::from_str(&text)
            .map_err(|e| Error::file(vp, format!("not a vocabulary: {e}")))?;
        let text = std::fs::read_to_string(mp).map_err(|e| Error::file(mp, e))?;
        let mut merges = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.starts_with("#version") || line.trim().is_empty() {
                continue;
            }
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
                _ => {
                    return Err(Error::file(
                        mp,
                        format!("line {}: expected two symbols", i + 1),
                    ));
                }
            }
        }
        Self::from_vocab_and_merges(vocab, merges)
    }

    /// Reads OpenAI's `bpe_simple_vocab_16e6.txt.gz` and derives the vocabulary and merges from
    /// it as `simple_tokenizer.py` does: 256 byte symbols, the same with `</w>`, the first
    /// 48,894 merges, then the two special tokens (49,408 entries).
    ///
    /// # Errors
    /// [`Error::File`] for an unreadable or truncated file.
    pub fn from_bpe_gz(path: impl AsRef<Path>) -> Result<Self> {
        let p = path.as_ref();
        let f = std::fs::File::open(p).map_err(|e| Error::file(p, e))?;
        let mut text = String::new();
        flate2::read::GzDecoder::new(f)
            .read_to_string(&mut text)
            .map_err(|e| Error::file(p, format!("not a gzip text file: {e}")))?;
        let lines: Vec<&str> = text.split('\n').collect();
        let n_merges = 49152 - 256 - 2;
        if lines.len() < n_merges + 1 {
            return Err(Error::file(
                p,
                format!("{} lines, expected at least {}", lines.len(), n_merges + 1),
            ));
        }
        let merges: Vec<(String, String)> = lines[1..=n_merges]
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let mut it = l.split(' ');
                match (it.next(), it.next()) {
                    (Some(a), Some(b)) => Ok((a.to_string(), b.to_string())),
                    _ => Err(Error::file(p, format!("merge {} is malformed", i + 1))),
                }
            })
            .collect::<Result<_>>()?;
        let mut vocab_list: Vec<String> = bytes_to_unicode()
            .iter()
            .map(|(_, c)| c.to_string())
            .collect();
        let with_end: Vec<String> = vocab_list.iter().map(|s| format!("{s}</w>")).collect();
        vocab_list.extend(with_end);
        vocab_list.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab_list.push("<|startoftext|>".into());
        vocab_list.push("<|endoftext|>".into());
        let vocab = vocab_list
            .into_iter()
            .enumerate()
            .map(|(i, s)| (s, i as u32))
            .collect();
        Self::from_vocab_and_merges(vocab, merges)
    }

    /// Reads a Hugging Face `tokenizer.json` (padding and truncation are ours, not the file's).
    ///
    /// # Errors
    /// [`Error::File`] for an unreadable or invalid file.
    pub fn from_tokenizer_json(path: impl AsRef<Path>) -> Result<Self> {
        let p = path.as_ref();
        let mut tk = Tokenizer::from_file(p).map_err(|e| Error::file(p, e))?;
        tk.with_padding(None);
        tk.with_truncation(None).map_err(tok_err)?;
        Ok(Self::wrap(tk))
    }

    /// Reads the tokenizer from a folder holding `tokenizer.json`, or `vocab.json` and
    /// `merges.txt`, or `bpe_simple_vocab_16e6.txt.gz` (in that order of preference).
    ///
    /// # Errors
    /// [`Error::File`] when none of them is there.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let d = dir.as_ref();
        if d.join("tokenizer.json").exists() {
            Self::from_tokenizer_json(d.join("tokenizer.json"))
        } else if d.join("vocab.json").exists() && d.join("merges.txt").exists() {
            Self::from_files(d.join("vocab.json"), d.join("merges.txt"))
        } else if d.join("bpe_simple_vocab_16e6.txt.gz").exists() {
            Self::from_bpe_gz(d.join("bpe_simple_vocab_16e6.txt.gz"))
        } else {
            Err(Error::file(
                d,
                "no tokenizer.json, vocab.json + merges.txt, or bpe_simple_vocab_16e6.txt.gz",
            ))
        }
    }

    /// Sets the id used for padding (0, as OpenAI, by default; 49407 pads as Hugging Face).
    pub fn with_pad_id(mut self, id: u32) -> Self {
        self.pad_id = id;
        self
    }

    /// Truncates over-long prompts to the context, keeping the end token last (default: refuse
    /// them with [`Error::PromptTooLong`], as `clip.tokenize(truncate=False)`).
    pub fn with_truncation(mut self, truncate: bool) -> Self {
        self.truncate = truncate;
        self
    }

    /// The underlying `tokenizers` tokenizer (for saving it as `tokenizer.json`, say).
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Token ids with the start and end tokens, unpadded.
    ///
    /// # Errors
    /// [`Error::PromptTooLong`] (unless truncation is on), [`Error::Tokenizer`].
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(tok_err)?;
        let mut ids = enc.get_ids().to_vec();
        if ids.len() > self.context {
            if !self.truncate {
                return Err(Error::PromptTooLong {
                    prompt: text.to_string(),
                    tokens: ids.len(),
                    context: self.context,
                });
            }
            ids.truncate(self.context);
            ids[self.context - 1] = END_OF_TEXT;
        }
        Ok(ids)
    }

    /// Token ids padded to the context length.
    ///
    /// # Errors
    /// As [`encode`](Self::encode).
    pub fn encode_padded(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(text)?;
        ids.resize(self.context, self.pad_id);
        Ok(ids)
    }

    /// A batch of padded ids as a `(N, 77)` `u32` tensor.
    ///
    /// # Errors
    /// As [`encode`](Self::encode).
    pub fn encode_batch(&self, texts: &[impl AsRef<str>], device: &Device) -> Result<Tensor> {
        let mut all = Vec::with_capacity(texts.len() * self.context);
        for t in texts {
            all.extend(self.encode_padded(t.as_ref())?);
        }
        Ok(Tensor::from_vec(all, (texts.len(), self.context), device)?)
    }
}
