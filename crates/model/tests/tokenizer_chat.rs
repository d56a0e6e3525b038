//! The real OLMo tokenizer (shared data, not committed) and the OLMoE-Instruct (Tulu) template.

use std::path::Path;

use moe_xray_model::chat::{ChatTemplate, Message};
use moe_xray_model::tokenizer::Tokenizer;

/// The real OLMo tokenizer (a byte-identical copy of `shared/data/olmo-tokenizer/tokenizer.json`,
/// committed with its licence because synth-model embeds it).
const OLMO: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/olmo-tokenizer/tokenizer.json"
);

#[test]
fn olmo_tokenizer_round_trip_and_special_ids() {
    let path = Path::new(OLMO);
    let tok = Tokenizer::from_file(path).unwrap();
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(50279));
    assert_eq!(tok.token_to_id("<|padding|>"), Some(1));
    assert_eq!(tok.vocab_size(), 50280);
    for text in [
        "Hello, world!",
        "def fibonacci(n):\n    return n",
        "Ünïcödé ✓ 日本語 — 12345",
        "  leading spaces",
    ] {
        let ids = tok.encode(text, false).unwrap();
        assert!(!ids.is_empty());
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
    let ids = tok.encode("Hello<|endoftext|>", false).unwrap();
    assert_eq!(*ids.last().unwrap(), 50279);
    assert_eq!(tok.decode(&ids, true).unwrap(), "Hello");
}

/// The chat template of allenai/OLMoE-1B-7B-0125-Instruct (Tulu style).
const TULU: &str = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'assistant' %}{% if not loop.last %}{{ '<|assistant|>\n'  + message['content'] + eos_token + '\n' }}{% else %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}";

#[test]
fn tulu_template_renders_generation_prompt() {
    let t = ChatTemplate::new(TULU, "<|endoftext|>", "<|endoftext|>").unwrap();
    assert_eq!(
        t.render_user("Hi").unwrap(),
        "<|endoftext|><|user|>\nHi\n<|assistant|>\n"
    );
    let msgs = vec![
        Message {
            role: "user".into(),
            content: "a".into(),
        },
        Message {
            role: "assistant".into(),
            content: "b".into(),
        },
    ];
    assert_eq!(
        t.render(&msgs, false).unwrap(),
        "<|endoftext|><|user|>\na\n<|assistant|>\nb<|endoftext|>"
    );
    let bad = ChatTemplate::new("{% if %}", "", "")
        .unwrap_err()
        .to_string();
    assert!(bad.contains("chat template"), "{bad}");
    let raising = ChatTemplate::new("{{ raise_exception('no system role') }}", "", "").unwrap();
    assert!(raising
        .render_user("x")
        .unwrap_err()
        .to_string()
        .contains("no system role"));
}
