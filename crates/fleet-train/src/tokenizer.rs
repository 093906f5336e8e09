//! Text to token ids with the `tokenizers` crate: the model directory's `tokenizer.json` (or its
//! `vocab.txt`), or, when training from scratch, a WordPiece vocabulary built deterministically
//! from the training text.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{
    NormalizedString, Normalizer, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer,
    Tokenizer, TruncationParams,
};

const SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenize(String),
}

pub struct TextEncoder {
    tokenizer: Tokenizer,
    pad_id: i64,
}

impl TextEncoder {
    /// The tokenizer of a Hugging Face model directory: tokenizer.json, else vocab.txt.
    pub fn load(dir: &Path, max_len: usize) -> Result<TextEncoder, TokenizerError> {
        let json = dir.join("tokenizer.json");
        let vocab = dir.join("vocab.txt");
        let tokenizer = if json.exists() {
            Tokenizer::from_file(&json).map_err(|e| TokenizerError::File {
                path: json,
                message: e.to_string(),
            })?
        } else if vocab.exists() {
            let words = std::fs::read_to_string(&vocab).map_err(|e| TokenizerError::File {
                path: vocab.clone(),
                message: e.to_string(),
            })?;
            let words: Vec<String> = words.lines().map(str::to_string).collect();
            bert_tokenizer(words, lowercase_of(dir), &vocab)?
        } else {
            return Err(TokenizerError::File {
                path: dir.into(),
                message: "has neither tokenizer.json nor vocab.txt".into(),
            });
        };
        Self::with_max_len(tokenizer, max_len)
    }

    /// A lowercasing WordPiece tokenizer whose vocabulary is the special tokens, every character
    /// seen (alone and as a continuation), and the most frequent words, ties broken by the word:
    /// the same text always gives the same vocabulary.
    pub fn build(
        texts: &[String],
        vocab_size: usize,
        max_len: usize,
    ) -> Result<TextEncoder, TokenizerError> {
        let normalizer = normalizer(true);
        let mut words: HashMap<String, u64> = HashMap::new();
        let mut chars: HashMap<char, u64> = HashMap::new();
        for text in texts {
            let mut normalized = NormalizedString::from(text.as_str());
            normalizer
                .normalize(&mut normalized)
                .map_err(tokenize_error)?;
            let mut split = PreTokenizedString::from(normalized);
            BertPreTokenizer
                .pre_tokenize(&mut split)
                .map_err(tokenize_error)?;
            for (word, _, _) in split.get_splits(OffsetReferential::Original, OffsetType::Byte) {
                for c in word.chars() {
                    *chars.entry(c).or_default() += 1;
                }
                *words.entry(word.to_string()).or_default() += 1;
            }
        }
        let budget = vocab_size.saturating_sub(SPECIALS.len()).max(2);
        let mut chars: Vec<(char, u64)> = chars.into_iter().collect();
        chars.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        chars.truncate(budget / 2);
        chars.sort();
        let mut vocab: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
        vocab.extend(chars.iter().map(|(c, _)| c.to_string()));
        vocab.extend(chars.iter().map(|(c, _)| format!("##{c}")));
        let mut words: Vec<(String, u64)> = words
            .into_iter()
            .filter(|(w, n)| *n >= 2 && w.chars().count() > 1)
            .collect();
        words.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let room = vocab_size.saturating_sub(vocab.len());
        vocab.extend(words.into_iter().take(room).map(|(w, _)| w));
        let tokenizer = bert_tokenizer(vocab, true, Path::new("(built vocabulary)"))?;
        Self::with_max_len(tokenizer, max_len)
    }

    fn with_max_len(
        mut tokenizer: Tokenizer,
        max_len: usize,
    ) -> Result<TextEncoder, TokenizerError> {
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(tokenize_error)?;
        tokenizer.with_padding(None);
        let pad_id = tokenizer.token_to_id("[PAD]").unwrap_or(0).into();
        Ok(TextEncoder { tokenizer, pad_id })
    }

    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Token ids of each text, with [CLS] and [SEP], cut to the maximum length.
    pub fn encode_all(&self, texts: &[String]) -> Result<Vec<Vec<i64>>, TokenizerError> {
        let inputs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let encodings = self
            .tokenizer
            .encode_batch(inputs, true)
            .map_err(tokenize_error)?;
        Ok(encodings
            .iter()
            .map(|e| e.get_ids().iter().map(|&id| i64::from(id)).collect())
            .collect())
    }

    pub fn save(&self, path: &Path) -> Result<(), TokenizerError> {
        self.tokenizer
            .save(path, false)
            .map_err(|e| TokenizerError::File {
                path: path.into(),
                message: e.to_string(),
            })
    }
}

fn normalizer(lowercase: bool) -> BertNormalizer {
    // Accents are kept: stripping them decomposes Hangul syllables into jamo.
    BertNormalizer::new(true, true, Some(false), lowercase)
}

fn bert_tokenizer(
    vocab: Vec<String>,
    lowercase: bool,
    origin: &Path,
) -> Result<Tokenizer, TokenizerError> {
    let ids: HashMap<String, u32> = vocab
        .iter()
        .enumerate()
        .map(|(i, w)| (w.clone(), i as u32))
        .collect();
    let id = |token: &str| {
        ids.get(token).copied().ok_or_else(|| TokenizerError::File {
            path: origin.into(),
            message: format!("the vocabulary has no {token}"),
        })
    };
    let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
    id("[UNK]")?;
    let table = WordPiece::read_bytes(vocab.join("\n").as_bytes()).map_err(tokenize_error)?;
    let model = WordPiece::builder()
        .vocab(table)
        .unk_token("[UNK]".into())
        .build()
        .map_err(tokenize_error)?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_normalizer(Some(normalizer(lowercase)))
        .with_pre_tokenizer(Some(BertPreTokenizer))
        .with_post_processor(Some(BertProcessing::new(
            ("[SEP]".into(), sep),
            ("[CLS]".into(), cls),
        )));
    Ok(tokenizer)
}

/// tokenizer_config.json's do_lower_case; BERT's default (true) when absent.
fn lowercase_of(dir: &Path) -> bool {
    std::fs::read(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|config| {
            config
                .get("do_lower_case")
                .and_then(serde_json::Value::as_bool)
        })
        .unwrap_or(true)
}

fn tokenize_error(error: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Tokenize(error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_vocabulary_is_deterministic_and_covers_korean() {
        let texts: Vec<String> = [
            "학습 데이터 좋은 영화",
            "좋은 영화 great movie",
            "great movie 학습",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let a = TextEncoder::build(&texts, 100, 16).unwrap();
        let b = TextEncoder::build(&texts, 100, 16).unwrap();
        let ids = a.encode_all(&texts).unwrap();
        assert_eq!(ids, b.encode_all(&texts).unwrap());
        let unk = i64::from(a.tokenizer.token_to_id("[UNK]").unwrap());
        assert!(ids.iter().flatten().all(|&id| id != unk), "{ids:?}");
        assert_eq!(
            ids[0][0],
            i64::from(a.tokenizer.token_to_id("[CLS]").unwrap())
        );
        let long = a.encode_all(&["영화 ".repeat(100)]).unwrap();
        assert_eq!(long[0].len(), 16);
    }
}
