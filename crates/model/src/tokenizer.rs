//! `tokenizer.json` through the `tokenizers` crate (the same Rust code transformers' fast
//! tokenizers run), so token ids are exactly those of `AutoTokenizer`.

use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

/// A loaded tokenizer.
pub struct Tokenizer {
    path: PathBuf,
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .finish()
    }
}

impl Tokenizer {
    /// Loads `<dir>/tokenizer.json`.
    /// For a `.gguf` file: the `tokenizer.json` beside it.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if crate::gguf::is_gguf(dir) {
            if let Some(beside) = crate::gguf::tokenizer_beside(dir) {
                return Self::from_file(&beside);
            }
            let json = crate::gguf::GgufFile::open(dir)?.tokenizer_json()?;
            let inner = tokenizers::Tokenizer::from_bytes(json.as_bytes()).map_err(|e| {
                ModelError::Tokenizer {
                    path: dir.to_path_buf(),
                    message: format!("tokenizer from the GGUF metadata: {e}"),
                }
            })?;
            return Ok(Tokenizer {
                path: dir.to_path_buf(),
                inner,
            });
        }
        Self::from_file(&dir.join("tokenizer.json"))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let err = |message: String| ModelError::Tokenizer {
            path: path.to_path_buf(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| err(e.to_string()))?;
        Ok(Tokenizer {
            path: path.to_path_buf(),
            inner,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, message: String) -> ModelError {
        ModelError::Tokenizer {
            path: self.path.clone(),
            message,
        }
    }

    /// Encodes text; `add_special_tokens` as in `tokenizer(text)` (true) or after a chat
    /// template (false: the template already wrote them).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| self.err(format!("encode: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids (`skip_special_tokens` as in `tokenizer.decode`).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.err(format!("decode: {e}")))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
