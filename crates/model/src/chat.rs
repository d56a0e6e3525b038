//! Chat templates from `tokenizer_config.json`, rendered with minijinja the way transformers'
//! `apply_chat_template` renders them (jinja2 with `trim_blocks` and `lstrip_blocks`, a
//! `raise_exception` function, `bos_token` / `eos_token` in the context).
//!
//! Templates come from checkpoint files and are treated as hostile: a rendering may execute at
//! most [`TEMPLATE_FUEL`] minijinja instructions (nested loops cannot hang) and write at most
//! [`MAX_RENDERED_BASE`] bytes plus four times the messages' text (a template cannot build a huge
//! prompt); either limit fails with an error naming the template's file. minijinja itself caps
//! `string * n` at 100 MB and `range()` at 100,000 items.
//!
//! Fuel cannot bound memory: within its budget a template can still build a huge *intermediate*
//! string (doubling with `~` in a namespace loop or a recursive macro, `center(10**12)`, `replace`
//! chains, ...), and an allocation failure aborts a Rust process. [`ChatTemplate::render`] is the
//! in-process core; [`ChatTemplate::render_all_sandboxed`] renders a whole batch of conversations
//! in ONE child process (the `moe-xray` executable run with the hidden subcommand
//! [`RENDER_SUBCOMMAND`], which calls [`serve_render_request`]): the parent sends the template and
//! every conversation as JSON on the child's stdin; the child limits its own address space
//! (`RLIMIT_AS`, [`sandbox_memory_limit`]: 1 GiB + 16 × the input's bytes, at most 8 GiB), renders
//! with the same code and limits as in-process, and writes one JSON line per rendering to stdout.
//! The parent kills the child after [`sandbox_time_limit`] (30 s + 10 ms per conversation + 1 s
//! per MiB of input) and turns a child that ran out of memory, ran out of time, died of a signal or
//! failed into one error naming the template's file and the reason ("memory limit", "time limit",
//! or the child's own message). Template errors (fuel, output size, `raise_exception`, ...) come
//! back with exactly the in-process message, and valid templates render byte-identically.

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ModelError, Result};

/// minijinja instructions one rendering may execute (real chat templates need a few hundred per
/// message).
pub const TEMPLATE_FUEL: u64 = 2_000_000;

/// Bytes a rendering may write on top of four times the total length of the messages' contents.
pub const MAX_RENDERED_BASE: usize = 1 << 20;

/// A writer that refuses to grow beyond `limit` bytes.
struct Bounded {
    buf: Vec<u8>,
    limit: usize,
}

impl Write for Bounded {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len().saturating_add(data.len()) > self.limit {
            return Err(std::io::Error::other("rendered output size limit"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One chat message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
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
    ///
    /// For a `.gguf` file: its `tokenizer.chat_template` metadata, else the
    /// `tokenizer_config.json` beside it.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if crate::gguf::is_gguf(dir) {
            if let Some((source, bos_token, eos_token)) =
                crate::gguf::GgufFile::open(dir)?.chat_template()?
            {
                let t = ChatTemplate {
                    path: dir.to_path_buf(),
                    source,
                    bos_token,
                    eos_token,
                };
                t.env()?;
                return Ok(t);
            }
            return Self::from_dir(dir.parent().unwrap_or_else(|| Path::new(".")));
        }
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
        env.set_fuel(Some(TEMPLATE_FUEL));
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
        self.render_in(&env, messages, add_generation_prompt)
    }

    /// [`ChatTemplate::render`] with an environment compiled once (the sandboxed renderer renders
    /// many conversations with one).
    fn render_in(
        &self,
        env: &Environment<'_>,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tmpl = env.get_template("chat").map_err(|e| self.err(e))?;
        let content: usize = messages
            .iter()
            .fold(0usize, |a, m| a.saturating_add(m.content.len()));
        let limit = MAX_RENDERED_BASE.saturating_add(content.saturating_mul(4));
        let mut out = Bounded {
            buf: Vec::new(),
            limit,
        };
        let ctx = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        };
        if let Err(e) = tmpl.render_captured_to(ctx, &mut out) {
            let message = match e.kind() {
                ErrorKind::OutOfFuel => format!(
                    "rendering needs more than {TEMPLATE_FUEL} template instructions (fuel); \
                     the template loops too long"
                ),
                ErrorKind::WriteFailure => format!(
                    "rendered output exceeds the limit of {limit} bytes \
                     ({MAX_RENDERED_BASE} + 4 × the messages' text)"
                ),
                _ => format!("{e:#}"),
            };
            return Err(ModelError::ChatTemplate {
                path: self.path.clone(),
                message,
            });
        }
        String::from_utf8(out.buf).map_err(|e| ModelError::ChatTemplate {
            path: self.path.clone(),
            message: format!("rendered text is not UTF-8: {e}"),
        })
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

// ---------------------------------------------------------------------------------------------
// Sandboxed rendering: one child process with an address-space limit and a wall-time limit.
// ---------------------------------------------------------------------------------------------

/// The hidden subcommand of the `moe-xray` executable that serves one render request
/// ([`serve_render_request`]) on stdin / stdout.
pub const RENDER_SUBCOMMAND: &str = "__render-chat-template";

/// Address space the sandboxed renderer may use whatever the input (its own code, libraries and
/// heap included).
pub const SANDBOX_MEMORY_BASE: u64 = 1 << 30;

/// Extra address space per byte of input (template source + messages' roles and contents).
pub const SANDBOX_MEMORY_PER_INPUT_BYTE: u64 = 16;

/// The sandboxed renderer's address space never exceeds this, whatever the input.
pub const SANDBOX_MEMORY_MAX: u64 = 8 << 30;

/// Wall time the sandboxed renderer may take whatever the input.
pub const SANDBOX_TIME_BASE: Duration = Duration::from_secs(30);

/// Extra wall time per conversation rendered.
pub const SANDBOX_TIME_PER_CONVERSATION: Duration = Duration::from_millis(10);

/// Extra wall time per MiB of input.
pub const SANDBOX_TIME_PER_MIB: Duration = Duration::from_secs(1);

/// Bytes of the child's stderr kept for the error message (the rest is read and dropped).
const CHILD_STDERR_KEEP: usize = 64 << 10;

/// The address-space limit (`RLIMIT_AS`, bytes) of a renderer whose input (template source and
/// the messages' roles and contents) has `input_bytes` bytes:
/// `min(1 GiB + 16 × input_bytes, 8 GiB)`.
pub fn sandbox_memory_limit(input_bytes: u64) -> u64 {
    SANDBOX_MEMORY_BASE
        .saturating_add(input_bytes.saturating_mul(SANDBOX_MEMORY_PER_INPUT_BYTE))
        .min(SANDBOX_MEMORY_MAX)
}

/// The wall-time limit of a renderer of `conversations` conversations whose input has
/// `input_bytes` bytes: 30 s + 10 ms per conversation + 1 s per MiB of input.
pub fn sandbox_time_limit(conversations: usize, input_bytes: u64) -> Duration {
    let per_conv = SANDBOX_TIME_PER_CONVERSATION
        .saturating_mul(u32::try_from(conversations).unwrap_or(u32::MAX));
    let mib = u32::try_from(input_bytes >> 20).unwrap_or(u32::MAX);
    SANDBOX_TIME_BASE
        .saturating_add(per_conv)
        .saturating_add(SANDBOX_TIME_PER_MIB.saturating_mul(mib))
}

/// Where and how [`ChatTemplate::render_all_sandboxed`] runs the renderer.
#[derive(Debug, Clone)]
pub struct Sandbox {
    exe: PathBuf,
    memory: Option<u64>,
    time: Option<Duration>,
}

impl Sandbox {
    /// The renderer is `exe`, which must implement [`RENDER_SUBCOMMAND`] (the `moe-xray` binary);
    /// limits from [`sandbox_memory_limit`] and [`sandbox_time_limit`].
    pub fn with_exe(exe: impl Into<PathBuf>) -> Self {
        Sandbox {
            exe: exe.into(),
            memory: None,
            time: None,
        }
    }

    /// The renderer is the running executable (`std::env::current_exe()`).
    pub fn current_exe() -> Result<Self> {
        let exe = std::env::current_exe().map_err(|e| ModelError::ChatTemplate {
            path: PathBuf::from("<sandbox>"),
            message: format!("cannot find the running executable for the sandboxed renderer: {e}"),
        })?;
        Ok(Self::with_exe(exe))
    }

    /// Overrides the address-space limit (bytes; still at most [`SANDBOX_MEMORY_MAX`]).
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.memory = Some(bytes.min(SANDBOX_MEMORY_MAX));
        self
    }

    /// Overrides the wall-time limit.
    pub fn time_limit(mut self, time: Duration) -> Self {
        self.time = Some(time);
        self
    }
}

/// What the parent sends on the child's stdin.
#[derive(Serialize)]
struct RequestOut<'a> {
    path: &'a Path,
    source: &'a str,
    bos_token: &'a str,
    eos_token: &'a str,
    add_generation_prompt: bool,
    memory_limit: u64,
    conversations: &'a [Vec<Message>],
}

/// What the child reads from its stdin.
#[derive(Deserialize)]
struct RequestIn {
    path: PathBuf,
    source: String,
    bos_token: String,
    eos_token: String,
    add_generation_prompt: bool,
    memory_limit: u64,
    conversations: Vec<Vec<Message>>,
}

/// One line of the child's stdout: a rendering, or the template error that stopped the batch.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply {
    Rendered(String),
    Error(String),
}

/// Lowers this process's address-space limit to `bytes` (never above the hard limit).
#[cfg(unix)]
fn limit_address_space(bytes: u64) -> std::io::Result<()> {
    use rlimit::Resource;
    let (soft, hard) = rlimit::getrlimit(Resource::AS)?;
    let target = bytes.min(hard).min(soft);
    rlimit::setrlimit(Resource::AS, target, hard)
}

/// `bytes`, or this process's own address-space limit when that is lower (the child inherits it).
#[cfg(unix)]
fn effective_memory_limit(bytes: u64) -> u64 {
    match rlimit::getrlimit(rlimit::Resource::AS) {
        Ok((soft, _)) => bytes.min(soft),
        Err(_) => bytes,
    }
}

#[cfg(not(unix))]
fn effective_memory_limit(bytes: u64) -> u64 {
    bytes
}

#[cfg(not(unix))]
fn limit_address_space(_bytes: u64) -> std::io::Result<()> {
    // No address-space limit on this platform: the wall-time limit still applies.
    Ok(())
}

/// The sandboxed renderer (the child side of [`ChatTemplate::render_all_sandboxed`], run by the
/// `moe-xray` subcommand [`RENDER_SUBCOMMAND`]): limits this process's address space to
/// [`SANDBOX_MEMORY_MAX`], reads one JSON request from `input`, lowers the limit to the request's
/// `memory_limit`, renders every conversation with [`ChatTemplate::render`]'s code and limits, and
/// writes one JSON line per rendering (`{"rendered": "..."}`) to `output`, or a last line
/// `{"error": "..."}` with the message of the template error that stopped it. An allocation that
/// exceeds the limit aborts this process; the parent reports it.
pub fn serve_render_request(mut input: impl Read, output: impl Write) -> Result<()> {
    let stdin_path = PathBuf::from("<stdin>");
    limit_address_space(SANDBOX_MEMORY_MAX).map_err(|e| ModelError::io(&stdin_path, e))?;
    let mut text = Vec::new();
    input
        .read_to_end(&mut text)
        .map_err(|e| ModelError::io(&stdin_path, e))?;
    let req: RequestIn = serde_json::from_slice(&text)
        .map_err(|e| ModelError::invalid(&stdin_path, format!("invalid render request: {e}")))?;
    drop(text);
    limit_address_space(req.memory_limit).map_err(|e| ModelError::io(&stdin_path, e))?;
    render_request(req, output)
}

/// Renders a parsed request onto `output` (the part of [`serve_render_request`] after the limits).
fn render_request(req: RequestIn, output: impl Write) -> Result<()> {
    let t = ChatTemplate {
        path: req.path,
        source: req.source,
        bos_token: req.bos_token,
        eos_token: req.eos_token,
    };
    let stdout_path = PathBuf::from("<stdout>");
    let mut out = std::io::BufWriter::new(output);
    let write = |out: &mut std::io::BufWriter<_>, reply: &Reply| -> Result<()> {
        serde_json::to_writer(&mut *out, reply)
            .map_err(|e| ModelError::io(&stdout_path, e.into()))?;
        out.write_all(b"\n")
            .map_err(|e| ModelError::io(&stdout_path, e))
    };
    match t.env() {
        Ok(env) => {
            for conv in &req.conversations {
                match t.render_in(&env, conv, req.add_generation_prompt) {
                    Ok(s) => write(&mut out, &Reply::Rendered(s))?,
                    Err(e) => {
                        write(&mut out, &Reply::Error(template_message(e)))?;
                        break;
                    }
                }
            }
        }
        Err(e) => write(&mut out, &Reply::Error(template_message(e)))?,
    }
    out.flush().map_err(|e| ModelError::io(&stdout_path, e))
}

/// The message of a template error (without the "chat template (path):" prefix, which the parent
/// adds back).
fn template_message(e: ModelError) -> String {
    match e {
        ModelError::ChatTemplate { message, .. } => message,
        other => other.to_string(),
    }
}

/// Reads at most `keep` bytes of `r`; the rest is read and dropped when `drain`, otherwise
/// reading stops (closing the pipe). Returns the bytes and whether there was more.
fn read_bounded(r: impl Read, keep: u64, drain: bool) -> (Vec<u8>, bool) {
    let mut buf = Vec::new();
    let mut limited = r.take(keep);
    // A read error ends the stream like EOF; the exit status tells what happened.
    let _ = limited.read_to_end(&mut buf);
    let mut r = limited.into_inner();
    let mut probe = [0u8; 1];
    let more = matches!(r.read(&mut probe), Ok(n) if n > 0);
    if more && drain {
        let _ = std::io::copy(&mut r, &mut std::io::sink());
    }
    (buf, more)
}

/// How the child ended.
enum Ended {
    Exited(ExitStatus),
    TimedOut,
}

impl ChatTemplate {
    fn sandbox_error(&self, message: String) -> ModelError {
        ModelError::ChatTemplate {
            path: self.path.clone(),
            message,
        }
    }

    /// Renders every conversation as [`ChatTemplate::render`] does, in ONE child process with an
    /// address-space limit and a wall-time limit (see the module documentation). A template that
    /// exhausts either, or any other failure of the child, gives one error naming the template's
    /// file and the reason; template errors carry the in-process message.
    pub fn render_all_sandboxed(
        &self,
        conversations: &[Vec<Message>],
        add_generation_prompt: bool,
        sandbox: &Sandbox,
    ) -> Result<Vec<String>> {
        if conversations.is_empty() {
            return Ok(Vec::new());
        }
        let input_bytes = conversations
            .iter()
            .flatten()
            .fold(self.source.len() as u64, |a, m| {
                a.saturating_add(m.content.len() as u64)
                    .saturating_add(m.role.len() as u64)
            });
        let memory = effective_memory_limit(
            sandbox
                .memory
                .unwrap_or_else(|| sandbox_memory_limit(input_bytes)),
        );
        let time = sandbox
            .time
            .unwrap_or_else(|| sandbox_time_limit(conversations.len(), input_bytes));
        let request = serde_json::to_vec(&RequestOut {
            path: &self.path,
            source: &self.source,
            bos_token: &self.bos_token,
            eos_token: &self.eos_token,
            add_generation_prompt,
            memory_limit: memory,
            conversations,
        })
        .map_err(|e| self.sandbox_error(format!("cannot encode the render request: {e}")))?;

        let mut child = Command::new(&sandbox.exe)
            .arg(RENDER_SUBCOMMAND)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                self.sandbox_error(format!(
                    "cannot start the sandboxed renderer {}: {e}",
                    sandbox.exe.display()
                ))
            })?;
        let (Some(mut stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(self.sandbox_error("the sandboxed renderer has no pipes".into()));
        };
        // The parent keeps at most as many bytes of renderings as the child may hold.
        let out_limit = memory;
        let (ended, (out, out_overflow), (err, _)) = std::thread::scope(|s| {
            s.spawn(move || {
                // A child that dies early closes the pipe; its exit status says why.
                let _ = stdin.write_all(&request);
            });
            let out = s.spawn(move || read_bounded(stdout, out_limit, false));
            let err = s.spawn(move || read_bounded(stderr, CHILD_STDERR_KEEP as u64, true));
            // No deadline only for a limit beyond the clock's range.
            let deadline = Instant::now().checked_add(time);
            let mut pause = Duration::from_millis(1);
            let ended = loop {
                match child.try_wait() {
                    Ok(Some(status)) => break Ok(Ended::Exited(status)),
                    Ok(None) => {}
                    Err(e) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break Err(e);
                    }
                }
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    let _ = child.kill();
                    let _ = child.wait();
                    break Ok(Ended::TimedOut);
                }
                let left = deadline.map_or(pause, |d| d.saturating_duration_since(now));
                std::thread::sleep(pause.min(left));
                pause = (pause * 2).min(Duration::from_millis(20));
            };
            let out = out.join().unwrap_or_default();
            let err = err.join().unwrap_or_default();
            (ended, out, err)
        });
        let status = match ended {
            Ok(Ended::Exited(status)) => status,
            Ok(Ended::TimedOut) => {
                return Err(self.sandbox_error(format!(
                    "rendering takes longer than the time limit of {:.1} s (the sandboxed \
                     renderer was stopped); the template runs too long",
                    time.as_secs_f64()
                )))
            }
            Err(e) => {
                return Err(
                    self.sandbox_error(format!("cannot wait for the sandboxed renderer: {e}"))
                )
            }
        };
        if out_overflow {
            return Err(self.sandbox_error(format!(
                "the renderings exceed {out_limit} bytes in total (the sandboxed renderer's \
                 memory limit)"
            )));
        }
        if !status.success() {
            return Err(self.sandbox_error(child_failure(status, &err, memory)));
        }
        let mut rendered = Vec::with_capacity(conversations.len());
        for line in out.lines() {
            let line = line.map_err(|e| {
                self.sandbox_error(format!("the sandboxed renderer wrote invalid text: {e}"))
            })?;
            match serde_json::from_str::<Reply>(&line) {
                Ok(Reply::Rendered(s)) => rendered.push(s),
                Ok(Reply::Error(message)) => return Err(self.sandbox_error(message)),
                Err(e) => {
                    return Err(self.sandbox_error(format!(
                        "the sandboxed renderer wrote an invalid reply: {e}"
                    )))
                }
            }
        }
        if rendered.len() != conversations.len() {
            return Err(self.sandbox_error(format!(
                "the sandboxed renderer returned {} of {} renderings",
                rendered.len(),
                conversations.len()
            )));
        }
        Ok(rendered)
    }

    /// [`ChatTemplate::render_user`] for each of `contents`, in one sandboxed child process
    /// ([`ChatTemplate::render_all_sandboxed`]).
    pub fn render_users_sandboxed(
        &self,
        contents: &[&str],
        sandbox: &Sandbox,
    ) -> Result<Vec<String>> {
        let conversations: Vec<Vec<Message>> = contents
            .iter()
            .map(|c| {
                vec![Message {
                    role: "user".into(),
                    content: (*c).into(),
                }]
            })
            .collect();
        self.render_all_sandboxed(&conversations, true, sandbox)
    }
}

/// The reason a renderer that did not exit successfully gives, from its status and stderr.
fn child_failure(status: ExitStatus, stderr: &[u8], memory: u64) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    let memory_text = format!(
        "rendering needs more memory than the memory limit of the sandboxed renderer ({} MiB); \
         the template builds a huge string",
        memory >> 20
    );
    if text.contains("memory allocation of") || text.contains("capacity overflow") {
        return memory_text;
    }
    if text.contains("has overflowed its stack") {
        return "the template recurses too deeply (stack overflow in the sandboxed renderer)"
            .into();
    }
    // The last lines of the child's own message (its `error: ...` line).
    let tail: String = {
        let chars: Vec<char> = text.chars().collect();
        chars[chars.len().saturating_sub(2000)..].iter().collect()
    };
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return format!(
                "the sandboxed renderer was killed by signal {sig}{}{}",
                if sig == 9 {
                    " (the system may have run out of memory)"
                } else {
                    ""
                },
                if tail.is_empty() {
                    String::new()
                } else {
                    format!(": {tail}")
                }
            );
        }
    }
    match status.code() {
        Some(code) if !tail.is_empty() => {
            format!("the sandboxed renderer failed (exit code {code}): {tail}")
        }
        Some(code) => format!("the sandboxed renderer failed (exit code {code})"),
        None => format!("the sandboxed renderer failed ({status})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(source: &str, contents: &[&str]) -> RequestIn {
        RequestIn {
            path: PathBuf::from("dir/tokenizer_config.json"),
            source: source.into(),
            bos_token: "<s>".into(),
            eos_token: "</s>".into(),
            add_generation_prompt: true,
            memory_limit: SANDBOX_MEMORY_BASE,
            conversations: contents
                .iter()
                .map(|c| {
                    vec![Message {
                        role: "user".into(),
                        content: (*c).into(),
                    }]
                })
                .collect(),
        }
    }

    fn replies(req: RequestIn) -> Vec<String> {
        let mut out = Vec::new();
        render_request(req, &mut out).unwrap();
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn limits_follow_the_documented_formulas() {
        assert_eq!(sandbox_memory_limit(0), 1 << 30);
        assert_eq!(sandbox_memory_limit(1 << 20), (1 << 30) + (16 << 20));
        assert_eq!(sandbox_memory_limit(1 << 40), 8 << 30);
        assert_eq!(sandbox_memory_limit(u64::MAX), 8 << 30);
        assert_eq!(sandbox_time_limit(0, 0), Duration::from_secs(30));
        assert_eq!(
            sandbox_time_limit(100, 3 << 20),
            Duration::from_secs(30) + Duration::from_secs(1) + Duration::from_secs(3)
        );
        assert!(sandbox_time_limit(usize::MAX, u64::MAX) > Duration::from_secs(1 << 30));
        assert_eq!(
            Sandbox::with_exe("x").memory_limit(u64::MAX).memory,
            Some(SANDBOX_MEMORY_MAX)
        );
    }

    #[test]
    fn the_child_writes_one_line_per_rendering_or_stops_at_the_first_error() {
        let src = "{{ bos_token }}{% for m in messages %}[{{ m.content }}]{% endfor %}\
                   {% if messages[0].content == 'bad' %}{{ raise_exception('no bad') }}{% endif %}";
        let lines = replies(request(src, &["a", "b\n\"c\"", ""]));
        assert_eq!(
            lines,
            [
                r#"{"rendered":"<s>[a]"}"#,
                r#"{"rendered":"<s>[b\n\"c\"]"}"#,
                r#"{"rendered":"<s>[]"}"#
            ]
        );
        let lines = replies(request(src, &["a", "bad", "c"]));
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], r#"{"rendered":"<s>[a]"}"#);
        let Ok(Reply::Error(m)) = serde_json::from_str::<Reply>(&lines[1]) else {
            panic!("{}", lines[1]);
        };
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let in_process = t.render_user("bad").unwrap_err();
        assert_eq!(template_message(in_process), m);
        // A template that does not compile is one error line.
        let lines = replies(request("{% if %}", &["a"]));
        assert_eq!(lines.len(), 1);
        assert!(lines[0].starts_with(r#"{"error":"#), "{}", lines[0]);
    }

    #[test]
    fn read_bounded_keeps_the_limit_and_reports_more() {
        let data = vec![7u8; 100];
        assert_eq!(read_bounded(&data[..], 100, false), (data.clone(), false));
        assert_eq!(read_bounded(&data[..], 1000, true), (data.clone(), false));
        let (kept, more) = read_bounded(&data[..], 10, true);
        assert_eq!((kept.len(), more), (10, true));
    }

    #[cfg(unix)]
    #[test]
    fn child_failures_name_the_reason() {
        use std::os::unix::process::ExitStatusExt;
        let abort = ExitStatus::from_raw(6); // killed by SIGABRT
        let m = child_failure(
            abort,
            b"memory allocation of 2147483648 bytes failed\n",
            1 << 30,
        );
        assert!(m.contains("memory limit") && m.contains("1024 MiB"), "{m}");
        let m = child_failure(
            abort,
            b"\nthread 'main' has overflowed its stack\nfatal runtime error: stack overflow\n",
            1 << 30,
        );
        assert!(m.contains("recurses too deeply"), "{m}");
        let m = child_failure(ExitStatus::from_raw(9), b"", 1 << 30);
        assert!(m.contains("signal 9"), "{m}");
        let m = child_failure(
            ExitStatus::from_raw(1 << 8),
            b"error: <stdin>: bad\n",
            1 << 30,
        );
        assert_eq!(
            m,
            "the sandboxed renderer failed (exit code 1): error: <stdin>: bad"
        );
    }
}
