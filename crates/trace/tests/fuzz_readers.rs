//! Property tests of every reader of this crate over arbitrary bytes and over structured
//! mutations of valid input (numbers replaced by huge / negative / non-finite values, fields
//! dropped, lines truncated): trace lines (records, flat events, counts lines, plain / gz / zst),
//! `manifest.json`, and prompt files (JSONL and CSV).
//!
//! Each property asserts that the reader does not panic, returns `Ok` or an error naming the file,
//! and allocates a bounded amount of memory: a counting global allocator measures the peak of
//! the bytes live on the test's own thread during the call, which must stay below
//! `MEMORY_BASE + MEMORY_PER_INPUT_BYTE × input length` — a reader that allocated from a claimed
//! size (2^40 layers, a 2^63-entry table) before validating it would fail here (or abort).
//!
//! Default case counts keep the file under a few seconds; `PROPTEST_CASES=N` runs every property
//! with N cases (see docs/trace-format.md, "Robustness").

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::path::{Path, PathBuf};

use moe_xray_trace::limits::{check_dims, MAX_LAYER_EXPERTS};
use moe_xray_trace::manifest::Manifest;
use moe_xray_trace::{
    aggregate_paths, for_each_prompt_counts, read_prompts, AggregateOptions, TraceReader,
};
use proptest::prelude::*;

// ---- per-thread allocation accounting ----

struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn on_alloc(n: usize) {
    let _ = LIVE.try_with(|l| {
        let v = l.get().saturating_add(n);
        l.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

fn on_free(n: usize) {
    let _ = LIVE.try_with(|l| l.set(l.get().saturating_sub(n)));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the counting
// only touches const-initialised thread-locals (no allocation, no panic: `try_with`).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        on_alloc(layout.size());
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        on_alloc(layout.size());
        // SAFETY: the caller's contract for `alloc_zeroed` is passed on unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        on_free(layout.size());
        // SAFETY: `ptr` was allocated by `System` with `layout` (all allocations go through it).
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        on_free(layout.size());
        on_alloc(new_size);
        // SAFETY: as for `dealloc`; the caller's contract for `realloc` is passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const MEMORY_BASE: usize = 24 << 20;
const MEMORY_PER_INPUT_BYTE: usize = 64;

/// Runs `f`, asserting that the memory it allocates at its peak stays bounded by the input size.
fn bounded<T>(what: &str, input_len: usize, f: impl FnOnce() -> T) -> T {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(Cell::get) - base;
    let limit = MEMORY_BASE + MEMORY_PER_INPUT_BYTE * input_len;
    assert!(
        peak <= limit,
        "{what}: peak allocation {peak} bytes for {input_len} input bytes (limit {limit})"
    );
    out
}

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config(default: u32) -> ProptestConfig {
    ProptestConfig {
        cases: cases(default),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn named(err: impl std::fmt::Display, path: &Path) {
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    let msg = err.to_string();
    assert!(msg.contains(&name), "error does not name {name}: {msg}");
}

// ---- trace lines ----

/// Reads `content` as a trace named `name` (optionally with a manifest beside it) with the line
/// reader, the aggregation (known and inferred dimensions, weighted or not) and the streaming
/// aggregation; checks the invariants of every `Ok`.
fn exercise_trace(name: &str, content: &[u8], manifest: Option<&[u8]>) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join(name);
    std::fs::write(&p, content).unwrap();
    if let Some(m) = manifest {
        std::fs::write(d.path().join("manifest.json"), m).unwrap();
    }
    let len = content.len() + manifest.map_or(0, <[u8]>::len);
    bounded("TraceReader", len, || match TraceReader::open(&p) {
        Ok(r) => {
            for item in r {
                if let Err(e) = item {
                    named(e, &p);
                }
            }
        }
        Err(e) => named(e, &p),
    });
    for opts in [
        AggregateOptions::default(),
        AggregateOptions {
            num_layers: Some(2),
            num_experts: Some(4),
            weighted: true,
            ..AggregateOptions::default()
        },
    ] {
        let r = bounded("aggregate_paths", len, || {
            aggregate_paths(std::slice::from_ref(&p), &opts)
        });
        match r {
            Ok(t) => {
                let cells = check_dims(t.num_layers, t.num_experts, t.top_k)
                    .expect("accepted dimensions are within the limits");
                assert!(cells <= MAX_LAYER_EXPERTS);
                for pc in &t.prompts {
                    assert_eq!(pc.counts.len(), cells);
                    assert_eq!(pc.tokens_per_layer.len(), t.num_layers);
                    assert!(pc.counts.iter().all(|x| x.is_finite() && *x >= 0.0));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(name) || msg.contains("manifest.json"),
                    "error names neither the trace nor the manifest: {msg}"
                );
            }
        }
        let r = bounded("for_each_prompt_counts", len, || {
            for_each_prompt_counts(std::slice::from_ref(&p), &opts, |pc| {
                assert!(pc.counts.len() <= MAX_LAYER_EXPERTS);
                Ok(())
            })
        });
        if let Ok((l, e)) = r {
            assert!(check_dims(l, e, None).is_ok());
        }
    }
}

/// Valid lines of the three forms (the mutations start from these).
fn valid_trace_lines() -> Vec<String> {
    vec![
        r#"{"prompt_id":"a","category":"x","layer":0,"position":0,"token_id":5,"token_type":"prompt","experts":[1,2],"weights":[0.5,0.25],"probs":[0.1,0.5,0.25,0.15]}"#.into(),
        r#"{"prompt_id":"a","category":"x","layer":1,"position":3,"token_type":"generation","experts":[3,0],"weights":[0.4,0.3]}"#.into(),
        r#"{"prompt_id":"b","layer":1,"position":2,"expert":3,"token_type":"prompt","weight":0.5,"token_id":7}"#.into(),
        r#"{"prompt_id":"b","layer":1,"position":2,"expert":1,"token_type":"prompt","weight":0.25}"#.into(),
        r#"{"prompt_id":"c","category":"y","token_type":"prompt","num_layers":2,"num_experts":4,"tokens":2,"counts":[1,1,1,1,2,2,0,0],"weighted_counts":[0.5,0.5,0.5,0.5,1,1,0,0]}"#.into(),
        r#"{"prompt_id":"c","category":"y","token_type":"generation","num_layers":2,"num_experts":4,"tokens":0,"counts":[0,0,0,0,0,0,0,0]}"#.into(),
    ]
}

/// Hostile replacements for a number.
const HOSTILE_NUMBERS: [&str; 16] = [
    "-1",
    "-9223372036854775808",
    "2147483648",
    "4294967296",
    "1099511627776",
    "9007199254740993",
    "9223372036854775808",
    "18446744073709551616",
    "1e308",
    "1e999",
    "-1e999",
    "NaN",
    "0.5",
    "0",
    "4096",
    "1048576",
];

/// Byte ranges of the numbers (JSON number tokens) in `s`.
fn number_spans(s: &str) -> Vec<(usize, usize)> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut in_str = false;
    while i < b.len() {
        let c = b[i];
        if in_str {
            if c == b'\\' {
                i += 1;
            } else if c == b'"' {
                in_str = false;
            }
            i += 1;
            continue;
        }
        if c == b'"' {
            in_str = true;
            i += 1;
            continue;
        }
        if c == b'-' || c.is_ascii_digit() {
            let start = i;
            while i < b.len() && matches!(b[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
                i += 1;
            }
            out.push((start, i));
            continue;
        }
        i += 1;
    }
    out
}

#[derive(Debug, Clone)]
enum Mutation {
    /// Replace the i-th number (mod count) by a hostile number.
    Number(usize, usize),
    /// Drop the i-th field (mod count).
    DropField(usize),
    /// Cut the line at byte i (mod length).
    Truncate(usize),
    /// Duplicate the line.
    Repeat,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 0..HOSTILE_NUMBERS.len()).prop_map(|(i, h)| Mutation::Number(i, h)),
        2 => any::<usize>().prop_map(Mutation::DropField),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => Just(Mutation::Repeat),
    ]
}

fn mutate(line: &str, m: &Mutation) -> String {
    match m {
        Mutation::Number(i, h) => {
            let spans = number_spans(line);
            if spans.is_empty() {
                return line.to_string();
            }
            let (a, b) = spans[i % spans.len()];
            format!("{}{}{}", &line[..a], HOSTILE_NUMBERS[*h], &line[b..])
        }
        Mutation::DropField(i) => match serde_json::from_str::<serde_json::Value>(line) {
            Ok(serde_json::Value::Object(mut o)) if !o.is_empty() => {
                let key = o.keys().nth(i % o.len()).cloned().unwrap();
                o.remove(&key);
                serde_json::Value::Object(o).to_string()
            }
            _ => line.to_string(),
        },
        Mutation::Truncate(i) => {
            let mut cut = i % (line.len() + 1);
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line[..cut].to_string()
        }
        Mutation::Repeat => format!("{line}\n{line}"),
    }
}

/// A mutated set of lines of one form (records, events or counts).
fn mutated_trace() -> impl Strategy<Value = String> {
    (
        0usize..3,
        prop::collection::vec((0usize..2, prop::option::of(mutation())), 1..6),
    )
        .prop_map(|(form, picks)| {
            let lines = valid_trace_lines();
            let of_form = &lines[form * 2..form * 2 + 2];
            picks
                .iter()
                .map(|(i, m)| match m {
                    Some(m) => mutate(&of_form[*i], m),
                    None => of_form[*i].clone(),
                })
                .collect::<Vec<_>>()
                .join("\n")
                + "\n"
        })
}

fn valid_manifest() -> String {
    r#"{"model":"m","num_layers":2,"num_experts":4,"top_k":2,"dtype":"f32","generation":{"max_new_tokens":3},"prompt_set_hash":"ab","tool_version":"0.1.0","capture_mode":"events"}"#.into()
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn trace_readers_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        exercise_trace("t.jsonl", &bytes, None);
        exercise_trace("t.jsonl.gz", &gz(&bytes), None);
        let z = zstd::encode_all(&bytes[..], 1).unwrap();
        exercise_trace("t.jsonl.zst", &z, None);
        exercise_trace("cut.jsonl.zst", &z[..z.len() / 2], None);
        exercise_trace("raw.jsonl.gz", &bytes, None);
    }

    #[test]
    fn trace_readers_on_mutated_lines(text in mutated_trace(), with_manifest in any::<bool>(), gzip in any::<bool>()) {
        let m = valid_manifest();
        let manifest = with_manifest.then_some(m.as_bytes());
        if gzip {
            exercise_trace("m.jsonl.gz", &gz(text.as_bytes()), manifest);
        } else {
            exercise_trace("m.jsonl", text.as_bytes(), manifest);
        }
    }

    #[test]
    fn trace_readers_with_a_mutated_manifest(text in mutated_trace(), m in mutation(), m2 in mutation()) {
        let manifest = mutate(&mutate(&valid_manifest(), &m), &m2);
        exercise_trace("t.jsonl", text.as_bytes(), Some(manifest.as_bytes()));
    }
}

// ---- manifest ----

fn exercise_manifest(content: &[u8]) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("manifest.json");
    std::fs::write(&p, content).unwrap();
    match bounded("Manifest::read", content.len(), || Manifest::read(&p)) {
        Ok(m) => {
            assert!(check_dims(m.num_layers, m.num_experts, Some(m.top_k)).is_ok());
        }
        Err(e) => named(e, &p),
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn manifest_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        exercise_manifest(&bytes);
    }

    #[test]
    fn manifest_on_mutations(ms in prop::collection::vec(mutation(), 1..4)) {
        let mut s = valid_manifest();
        for m in &ms {
            s = mutate(&s, m);
        }
        exercise_manifest(s.as_bytes());
    }
}

// ---- prompt files ----

fn exercise_prompts(name: &str, content: &[u8]) -> Option<Vec<moe_xray_trace::Prompt>> {
    let d = tempfile::tempdir().unwrap();
    let p: PathBuf = d.path().join(name);
    std::fs::write(&p, content).unwrap();
    match bounded("read_prompts", content.len(), || read_prompts(&p)) {
        Ok(ps) => {
            assert!(!ps.is_empty());
            let mut ids = std::collections::HashSet::new();
            for x in &ps {
                assert!(!x.id.trim().is_empty() && !x.category.trim().is_empty());
                assert!(!x.text.trim().is_empty());
                assert!(ids.insert(x.id.clone()), "duplicate id accepted");
            }
            Some(ps)
        }
        Err(e) => {
            named(e, &p);
            None
        }
    }
}

/// CSV fragments: plain fields, quoted fields with commas, quotes and newlines, and broken quoting.
fn csv_field() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z ]{1,6}",
        "[a-z]{0,3}".prop_map(|s| format!("\"{s}, \"\"q\"\"\n{s}\"")),
        "[a-z]{0,3}".prop_map(|s| format!("\"{s}")),
        "[a-z]{0,3}".prop_map(|s| format!("\"{s}\"x")),
        "[a-z]{0,3}".prop_map(|s| format!("{s}\"{s}")),
        Just(String::new()),
    ]
}

fn csv_text() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::collection::vec(csv_field(), 1..4), 0..5).prop_map(|rows| {
        let mut s = String::from("id,category,text\n");
        for (i, r) in rows.iter().enumerate() {
            s.push_str(&format!("p{i},"));
            s.push_str(&r.join(","));
            s.push('\n');
        }
        s
    })
}

fn jsonl_prompts() -> impl Strategy<Value = String> {
    let valid = [
        r#"{"id":"a","category":"code","text":"x, y"}"#,
        r#"{"id":7,"category":"math","text":"2+2"}"#,
        r#"{"id":"c","category":"prose","text":"line\nbreak"}"#,
    ];
    prop::collection::vec((0usize..3, prop::option::of(mutation())), 0..5).prop_map(move |picks| {
        picks
            .iter()
            .map(|(i, m)| match m {
                Some(m) => mutate(valid[*i], m),
                None => valid[*i].to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    })
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn prompt_files_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        exercise_prompts("p.jsonl", &bytes);
        exercise_prompts("p.csv", &bytes);
    }

    #[test]
    fn prompt_jsonl_on_mutations(text in jsonl_prompts()) {
        exercise_prompts("p.jsonl", text.as_bytes());
    }

    #[test]
    fn prompt_csv_on_mutations(text in csv_text()) {
        exercise_prompts("p.csv", text.as_bytes());
    }

    /// The unclosed-quote class: plain rows with one field that opens a quote and never closes
    /// it are refused at the line of that quote, instead of the following prompts silently
    /// becoming part of its text.
    #[test]
    fn prompt_csv_with_an_unclosed_quote_is_refused(
        rows in prop::collection::vec(("[a-z]{1,4}", "[a-z ]{1,6}"), 1..6),
        at in any::<prop::sample::Index>(),
        field in 0usize..2,
    ) {
        let bad = at.index(rows.len());
        let mut s = String::from("id,category,text\n");
        for (i, (c, t)) in rows.iter().enumerate() {
            let (mut c, mut t) = (c.clone(), t.clone());
            if i == bad {
                if field == 0 { c.insert(0, '"') } else { t.insert(0, '"') }
            }
            s.push_str(&format!("p{i},{c},{t}\n"));
        }
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("q.csv");
        std::fs::write(&p, &s).unwrap();
        let msg = read_prompts(&p).unwrap_err().to_string();
        prop_assert!(msg.contains(&format!("q.csv:{}: unclosed quote", bad + 2)), "{}", msg);
    }
}

/// The accounting itself: an allocation proportional to a claimed size is caught.
#[test]
fn the_memory_bound_catches_a_large_allocation() {
    let caught = std::panic::catch_unwind(|| {
        bounded("claimed size", 100, || {
            let v = vec![1u8; MEMORY_BASE + (1 << 20)];
            v.len()
        })
    });
    assert!(caught.is_err());
    assert_eq!(bounded("small", 100, || vec![1u8; 1000].len()), 1000);
}
