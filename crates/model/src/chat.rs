//! Chat templates from `tokenizer_config.json`, rendered with minijinja the way transformers'
//! `apply_chat_template` renders them (jinja2 with `trim_blocks` and `lstrip_blocks`, a
//! `raise_exception` function, `bos_token` / `eos_token` in the context).

use std::path::{Path, PathBuf};

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;
use serde_json::Value;

use crate::error::{ModelError, Result};

/// One chat message.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A chat template plus the special tokens it refers to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    path: PathBuf,
    source: String,
    bos_token: String,
    eos_token: String,
}

fn token_string(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(m)) => m
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// Reads `chat_template` from `<dir>/tokenizer_config.json` (or `<dir>/chat_template.jinja`,
    /// where recent transformers save it).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::invalid(&path, format!("invalid JSON: {e}")))?;
        let jinja = dir.join("chat_template.jinja");
        let (source, src_path) = match v.get("chat_template") {
            Some(Value::String(s)) => (s.clone(), path.clone()),
            Some(Value::Array(list)) => {
                // [{name, template}, ...]: use the "default" one.
                let t = list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        ModelError::invalid(&path, "chat_template list has no `default` template")
                    })?;
                (t.to_string(), path.clone())
            }
            _ if jinja.exists() => (
                std::fs::read_to_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?,
                jinja.clone(),
            ),
            _ => {
                return Err(ModelError::ChatTemplate {
                    path: path.clone(),
                    message: "no `chat_template` in tokenizer_config.json".into(),
                })
            }
        };
        let t = ChatTemplate {
            path: src_path,
            source,
            bos_token: token_string(v.get("bos_token")),
            eos_token: token_string(v.get("eos_token")),
        };
        // Compile once now so a broken template fails before any work is done.
        t.env()?;
        Ok(t)
    }

    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let t = ChatTemplate {
            path: PathBuf::from("<inline>"),
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        };
        t.env()?;
        Ok(t)
    }

    fn err(&self, e: Error) -> ModelError {
        ModelError::ChatTemplate {
            path: self.path.clone(),
            message: format!("{e:#}"),
        }
    }

    fn env(&self) -> Result<Environment<'_>> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template("chat", &self.source)
            .map_err(|e| self.err(e))?;
        Ok(env)
    }

    /// Renders the conversation; `add_generation_prompt` appends the assistant header.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let env = self.env()?;
        let tmpl = env.get_template("chat").map_err(|e| self.err(e))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| self.err(e))
    }

    /// A single user turn followed by the generation prompt.
    pub fn render_user(&self, content: &str) -> Result<String> {
        self.render(
            &[Message {
                role: "user".into(),
                content: content.into(),
            }],
            true,
        )
    }
}
