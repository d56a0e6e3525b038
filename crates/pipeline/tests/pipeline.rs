//! The pipeline called as a library (no CLI, no argv): trace → resume → analysis on a committed
//! fixture checkpoint, with progress observed through the `Progress` trait.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;

use moe_xray_pipeline::analyze::{analyze, write_outputs, AnalyzeOptions};
use moe_xray_pipeline::outdir::OutLock;
use moe_xray_pipeline::trace::{trace, Compress, TraceOptions};
use moe_xray_pipeline::{PipelineError, Progress};
use moe_xray_test_support::fixture;
use moe_xray_trace::{read_prompts, GenerationLine};

/// Counts what the pipeline reports.
#[derive(Default)]
struct Recorder {
    begun: Cell<Option<u64>>,
    done: Cell<u64>,
    ended: Cell<bool>,
    messages: RefCell<Vec<String>>,
    warnings: RefCell<Vec<String>>,
}

impl Progress for Recorder {
    fn message(&self, msg: &str) {
        self.messages.borrow_mut().push(msg.to_string());
    }
    fn warn(&self, msg: &str) {
        self.warnings.borrow_mut().push(msg.to_string());
    }
    fn prompts_begin(&self, total: u64) {
        self.begun.set(Some(total));
    }
    fn prompt_done(&self, tokens_per_second: f64) {
        assert!(tokens_per_second.is_finite() && tokens_per_second > 0.0);
        self.done.set(self.done.get() + 1);
    }
    fn prompts_end(&self) {
        self.ended.set(true);
    }
}

fn options(out: PathBuf) -> TraceOptions {
    let mut o = TraceOptions::new(
        fixture("hf/olmoe-tiny-mha-f32"),
        fixture("hf/prompts.jsonl"),
        out,
    );
    o.max_new_tokens = 3;
    o.batch_size = 4;
    // (gzip: each prompt one member, so a resume proves every prompt complete; a plain .jsonl
    // resume redoes the last prompt)
    o.compress = Some(Compress::Gz);
    o
}

#[test]
fn trace_resume_and_analyze_as_a_library() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("traces");
    let n = read_prompts(fixture("hf/prompts.jsonl")).unwrap().len();

    let rec = Recorder::default();
    let s = trace(&options(out.clone()), &rec).unwrap();
    assert_eq!((s.prompts, s.prompts_run, s.prompts_resumed), (n, n, 0));
    assert_eq!(rec.begun.get(), Some(n as u64));
    assert_eq!(rec.done.get(), n as u64);
    assert!(rec.ended.get());
    assert_eq!(s.trace, out.join("trace.jsonl.gz"));
    assert!(s.generated_tokens > 0 && s.generated_tokens <= 3 * n);
    let gens: Vec<GenerationLine> = std::fs::read_to_string(&s.generations)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(gens.len(), n);
    let json = s.to_json();
    assert_eq!(json["prompts_run"], n);
    assert!(s
        .line()
        .starts_with(&format!("traced {n} prompts (0 resumed)")));

    // Without resume the finished run is refused; with it, nothing is run again.
    let err = trace(&options(out.clone()), &rec).unwrap_err();
    assert!(
        matches!(&err, PipelineError::Invalid(m) if m.contains("already exists")),
        "{err}"
    );
    let mut again = options(out.clone());
    again.resume = true;
    let rec2 = Recorder::default();
    let s2 = trace(&again, &rec2).unwrap();
    assert_eq!((s2.prompts_run, s2.prompts_resumed), (0, n));
    assert_eq!(rec2.done.get(), 0);
    // A resumed run with other settings is refused.
    again.max_new_tokens = 4;
    let err = trace(&again, &rec2).unwrap_err().to_string();
    assert!(err.contains("different settings"), "{err}");

    // The analysis on the library's trace, written as one output set.
    let mut a = AnalyzeOptions::new(vec![s.trace.clone()]);
    a.reps = 20;
    a.classifier_perm_reps = 5;
    a.no_tsne = true;
    let outputs = analyze(&a, &rec).unwrap();
    let r = outputs.results();
    assert_eq!(r.num_prompts, n);
    // The manifest beside the trace gives the dimensions: nothing inferred, no warning.
    assert!(rec.warnings.borrow().is_empty(), "{:?}", rec.warnings);
    let res = tmp.path().join("analysis");
    let _lock = OutLock::acquire(&res).unwrap();
    write_outputs(&res, &outputs).unwrap();
    assert!(res.join("results.json").exists() && res.join("signatures.csv").exists());
}

#[test]
fn invalid_options_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("never");
    let mut o = options(out.clone());
    o.batch_size = 0;
    let err = trace(&o, &moe_xray_pipeline::NoProgress).unwrap_err();
    assert_eq!(err.to_string(), "--batch-size must be at least 1");
    let mut o = options(out.clone());
    o.top_p = Some(0.9);
    let err = trace(&o, &moe_xray_pipeline::NoProgress).unwrap_err();
    assert_eq!(err.to_string(), "--top-p needs --temperature");
    let mut o = options(out.clone());
    o.threads = Some(0);
    assert!(trace(&o, &moe_xray_pipeline::NoProgress).is_err());
    assert!(!out.exists());
}
