//! Parquet traces and Hive datasets: round trips against the JSONL fixtures (every record equal,
//! the manifest kept), determinism, the dataset layout and escaping, and hostile input (wrong
//! schema, missing column, wrong type, bad values, mixed dimensions across parts, truncated
//! file): one error naming the file and the column, nothing written, no panic.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{Int32Builder, ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, Int32Array, RecordBatch, StringArray};
use arrow_schema::{Field, Schema};
use moe_xray_parquet::dataset::{escape, unescape, write_dataset, HIVE_NULL};
use moe_xray_parquet::trace_io::{
    convert_to_file, install, read_manifest, RecordsWriter, MANIFEST_KEY,
};
use moe_xray_test_support::fixture;
use moe_xray_trace::reader::read_all;
use moe_xray_trace::{read_manifest_beside, Manifest, RoutingRecord, TraceItem, TraceReader};
use parquet::arrow::ArrowWriter;

fn planted() -> PathBuf {
    fixture("stats/planted/trace.jsonl")
}

fn manifest_of(trace: &Path) -> Manifest {
    read_manifest_beside(trace).unwrap().unwrap()
}

fn err_of(path: &Path) -> String {
    install();
    match TraceReader::open(path) {
        Err(e) => e.to_string(),
        Ok(r) => match r.collect::<Result<Vec<_>, _>>() {
            Err(e) => e.to_string(),
            Ok(v) => panic!(
                "{}: read {} items, expected an error",
                path.display(),
                v.len()
            ),
        },
    }
}

#[test]
fn file_round_trip_equals_jsonl_and_keeps_the_manifest() {
    install();
    let d = tempfile::tempdir().unwrap();
    for case in ["planted", "weighted_small", "null"] {
        let src = fixture(format!("stats/{case}/trace.jsonl"));
        let m = manifest_of(&src);
        let out = d.path().join(format!("{case}.parquet"));
        let rows = convert_to_file(std::slice::from_ref(&src), Some(&m), None, &out).unwrap();
        let want = read_all(&src).unwrap();
        assert_eq!(rows as usize, want.len(), "{case}");
        let got = read_all(&out).unwrap();
        assert_eq!(
            got, want,
            "{case}: records differ after the Parquet round trip"
        );
        assert_eq!(read_manifest(&out).unwrap().as_ref(), Some(&m), "{case}");
        // The trace crate reads the manifest from the file's metadata.
        assert_eq!(
            read_manifest_beside(&out).unwrap().as_ref(),
            Some(&m),
            "{case}"
        );
        // Deterministic bytes.
        let again = d.path().join(format!("{case}-again.parquet"));
        convert_to_file(&[src], Some(&m), None, &again).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&again).unwrap());
    }
}

#[test]
fn dataset_round_trip_restores_the_prompt_order() {
    install();
    let d = tempfile::tempdir().unwrap();
    let src = planted();
    let m = manifest_of(&src);
    let out = d.path().join("ds");
    // Small parts: every category spans several part files.
    let s = write_dataset(
        std::slice::from_ref(&src),
        Some(&m),
        None,
        &out,
        "planted/run 1",
        300,
    )
    .unwrap();
    assert_eq!(s.rows, 4380);
    assert_eq!(s.prompts, 40);
    assert_eq!(s.partitions, 4);
    assert!(s.parts > 4, "{s:?}");
    let run = out.join("run=planted%2Frun 1");
    assert!(run.join("category=code/part-0.parquet").is_file());
    assert!(run.join("category=code/part-1.parquet").is_file());
    // Partition columns only in the path.
    let meta = parquet::file::reader::FileReader::metadata(
        &parquet::file::serialized_reader::SerializedFileReader::new(
            std::fs::File::open(run.join("category=code/part-0.parquet")).unwrap(),
        )
        .unwrap(),
    )
    .file_metadata()
    .schema_descr()
    .columns()
    .iter()
    .map(|c| c.path().string())
    .collect::<Vec<_>>();
    assert!(
        !meta.iter().any(|c| c == "category" || c == "run"),
        "{meta:?}"
    );
    // Read back (root and run directory): the same records in the same order.
    let want = read_all(&src).unwrap();
    assert_eq!(read_all(&out).unwrap(), want);
    assert_eq!(read_all(&run).unwrap(), want);
    assert_eq!(read_manifest_beside(&out).unwrap().as_ref(), Some(&m));
    // A single part file gets its category from its path.
    let part = read_all(run.join("category=code/part-0.parquet")).unwrap();
    assert!(part
        .iter()
        .all(|i| matches!(i, TraceItem::Record(r) if r.category.as_deref() == Some("code"))));
}

#[test]
fn dataset_without_categories_uses_the_hive_null_partition() {
    install();
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("t.jsonl");
    std::fs::write(
        &src,
        "{\"prompt_id\":\"a\",\"layer\":0,\"position\":0,\"token_type\":\"prompt\",\"experts\":[1,0]}\n\
         {\"prompt_id\":\"b\",\"layer\":0,\"position\":0,\"token_type\":\"prompt\",\"experts\":[0,1]}\n",
    )
    .unwrap();
    let out = d.path().join("ds");
    write_dataset(std::slice::from_ref(&src), None, None, &out, "r", 10).unwrap();
    assert!(out
        .join(format!("run=r/category={HIVE_NULL}/part-0.parquet"))
        .is_file());
    assert_eq!(read_all(&out).unwrap(), read_all(&src).unwrap());
    // Categories from a prompt map.
    let out2 = d.path().join("ds2");
    let cats = [("a".to_string(), "x=y/z".to_string())]
        .into_iter()
        .collect();
    write_dataset(&[src], None, Some(&cats), &out2, "r", 10).unwrap();
    assert!(out2.join("run=r/category=x%3Dy%2Fz").is_dir());
    let items = read_all(&out2).unwrap();
    let TraceItem::Record(r) = &items[0] else {
        panic!()
    };
    assert_eq!(r.category.as_deref(), Some("x=y/z"));
}

#[test]
fn escaping_round_trips() {
    for v in [
        "plain",
        "a/b",
        "x=1",
        "100%",
        "tab\tq\"'",
        "üñí",
        "[{^}]:?#*\\",
    ] {
        let e = escape(v);
        assert!(!e.contains('/') && !e.contains('='), "{e}");
        assert_eq!(unescape(&e).as_deref(), Some(v));
    }
    assert_eq!(unescape("%zz"), None);
    assert_eq!(unescape("%4"), None);
}

/// Writes a Parquet file with the given columns.
fn write_cols(path: &Path, cols: Vec<(&str, ArrayRef)>, kv: Option<(&str, &str)>) {
    let fields: Vec<Field> = cols
        .iter()
        .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
        .collect();
    let schema = Arc::new(Schema::new(fields));
    let batch =
        RecordBatch::try_new(schema.clone(), cols.into_iter().map(|c| c.1).collect()).unwrap();
    let props = kv.map(|(k, v)| {
        parquet::file::properties::WriterProperties::builder()
            .set_key_value_metadata(Some(vec![parquet::file::metadata::KeyValue::new(
                k.to_string(),
                v.to_string(),
            )]))
            .build()
    });
    let mut w = ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

fn strs(v: &[&str]) -> ArrayRef {
    Arc::new(StringArray::from(v.to_vec()))
}
fn ints(v: &[i32]) -> ArrayRef {
    Arc::new(Int32Array::from(v.to_vec()))
}
fn int_lists(v: &[&[i32]]) -> ArrayRef {
    let mut b = ListBuilder::new(Int32Builder::new());
    for l in v {
        b.values().append_slice(l);
        b.append(true);
    }
    Arc::new(b.finish())
}

fn good_cols() -> Vec<(&'static str, ArrayRef)> {
    vec![
        ("prompt_id", strs(&["a", "a"])),
        ("token_type", strs(&["prompt", "prompt"])),
        ("position", ints(&[0, 1])),
        ("layer", ints(&[0, 0])),
        ("experts", int_lists(&[&[1, 2], &[0, 3]])),
    ]
}

#[test]
fn foreign_file_with_the_required_columns_reads() {
    install();
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("min.parquet");
    write_cols(&p, good_cols(), None);
    let items = read_all(&p).unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(
        items[1],
        TraceItem::Record(RoutingRecord {
            prompt_id: "a".into(),
            category: None,
            layer: 0,
            position: 1,
            token_id: None,
            token_type: moe_xray_trace::TokenType::Prompt,
            experts: vec![0, 3],
            weights: None,
            probs: None,
        })
    );
}

#[test]
fn bad_files_fail_naming_the_file_and_the_column() {
    let d = tempfile::tempdir().unwrap();
    let case = |name: &str, cols: Vec<(&'static str, ArrayRef)>, want: &[&str]| {
        let p = d.path().join(format!("{name}.parquet"));
        write_cols(&p, cols, None);
        let msg = err_of(&p);
        assert!(msg.contains(&*p.to_string_lossy()), "{name}: {msg}");
        for w in want {
            assert!(msg.contains(w), "{name}: `{w}` not in: {msg}");
        }
    };
    let without = |drop: &str| -> Vec<(&'static str, ArrayRef)> {
        good_cols().into_iter().filter(|c| c.0 != drop).collect()
    };
    case(
        "missing_layer",
        without("layer"),
        &["missing column `layer`"],
    );
    case(
        "missing_experts",
        without("experts"),
        &["missing column `experts`"],
    );
    let mut wrong = without("layer");
    wrong.push(("layer", strs(&["0", "1"])));
    case("layer_as_string", wrong, &["column `layer`", "Utf8"]);
    let mut wrong = without("experts");
    wrong.push(("experts", ints(&[1, 2])));
    case("experts_not_a_list", wrong, &["column `experts`", "list"]);
    let mut wrong = without("layer");
    wrong.push(("layer", ints(&[0, -3])));
    case(
        "negative_layer",
        wrong,
        &["column `layer`", "negative value -3"],
    );
    let mut wrong = without("token_type");
    wrong.push(("token_type", strs(&["prompt", "answer"])));
    case("bad_token_type", wrong, &["column `token_type`", "answer"]);
    let mut wrong = without("experts");
    wrong.push(("experts", int_lists(&[&[1, 2], &[3, 3]])));
    case("duplicate_expert", wrong, &["duplicate expert 3"]);
    let mut wrong = without("experts");
    wrong.push(("experts", int_lists(&[&[1, 2], &[3]])));
    case("mixed_top_k", wrong, &["mixed top-k"]);
    let mut wrong = without("prompt_id");
    let mut b = StringBuilder::new();
    b.append_value("a");
    b.append_null();
    wrong.push(("prompt_id", Arc::new(b.finish())));
    case("null_prompt_id", wrong, &["column `prompt_id`", "null"]);
    // A manifest in the metadata that is not valid.
    let p = d.path().join("bad_manifest.parquet");
    write_cols(&p, good_cols(), Some((MANIFEST_KEY, "{\"num_layers\": 0}")));
    let msg = moe_xray_parquet::trace_io::read_manifest(&p)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("bad_manifest.parquet") && msg.contains(MANIFEST_KEY),
        "{msg}"
    );
}

#[test]
fn truncated_and_corrupt_files_fail_cleanly() {
    install();
    let d = tempfile::tempdir().unwrap();
    let full = d.path().join("full.parquet");
    convert_to_file(&[planted()], None, None, &full).unwrap();
    let bytes = std::fs::read(&full).unwrap();
    for cut in [
        4usize,
        100,
        bytes.len() / 2,
        bytes.len() - 9,
        bytes.len() - 1,
    ] {
        let p = d.path().join(format!("cut{cut}.parquet"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let msg = err_of(&p);
        assert!(msg.contains(&format!("cut{cut}.parquet")), "{msg}");
        assert!(msg.contains("truncated or corrupt"), "{msg}");
    }
    // Corrupt page data inside an intact frame: an error, never a panic.
    let mut bad = bytes.clone();
    for b in bad[200..bytes.len() / 2].iter_mut() {
        *b ^= 0x5a;
    }
    let p = d.path().join("corrupt.parquet");
    std::fs::write(&p, &bad).unwrap();
    let msg = err_of(&p);
    assert!(msg.contains("corrupt.parquet"), "{msg}");
}

#[test]
fn dataset_with_mixed_dimensions_fails_naming_the_part() {
    install();
    let d = tempfile::tempdir().unwrap();
    let m = manifest_of(&planted());
    let run = d.path().join("ds/run=r");
    let rec = |id: &str| RoutingRecord {
        prompt_id: id.into(),
        category: None,
        layer: 0,
        position: 0,
        token_id: Some(1),
        token_type: moe_xray_trace::TokenType::Prompt,
        experts: vec![0, 1, 2, 3],
        weights: None,
        probs: None,
    };
    for (cat, layers, idx) in [("a", m.num_layers, 0), ("b", m.num_layers + 1, 1)] {
        let dir = run.join(format!("category={cat}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut mm = m.clone();
        mm.num_layers = layers;
        let mut w = RecordsWriter::create(dir.join("part-0.parquet"), Some(&mm), false).unwrap();
        w.write(idx, &rec(cat)).unwrap();
        w.finish().unwrap();
    }
    let msg = err_of(&d.path().join("ds"));
    assert!(msg.contains("category=b/part-0.parquet"), "{msg}");
    assert!(msg.contains("num_layers"), "{msg}");
    // Two runs under one root: name one.
    std::fs::create_dir_all(d.path().join("ds/run=s/category=a")).unwrap();
    let msg = err_of(&d.path().join("ds"));
    assert!(msg.contains("2 runs") && msg.contains("run=s"), "{msg}");
}

#[test]
fn failed_conversions_write_nothing() {
    install();
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt_id\":\"a\",\"layer\":0,\"position\":0,\"token_type\":\"prompt\",\"experts\":[1]}\n{\"prompt_id\":\"a\",\"layer\":-1}\n",
    )
    .unwrap();
    let out = d.path().join("o.parquet");
    let e = convert_to_file(std::slice::from_ref(&bad), None, None, &out).unwrap_err();
    assert!(e.to_string().contains("bad.jsonl"), "{e}");
    let ds = d.path().join("ds");
    let e = write_dataset(std::slice::from_ref(&bad), None, None, &ds, "r", 10).unwrap_err();
    assert!(e.to_string().contains("bad.jsonl"), "{e}");
    // Flat events do not convert.
    let ev = d.path().join("ev.jsonl");
    std::fs::write(
        &ev,
        "{\"prompt_id\":\"a\",\"layer\":0,\"position\":0,\"token_type\":\"prompt\",\"expert\":1}\n",
    )
    .unwrap();
    let e = convert_to_file(&[ev], None, None, &out).unwrap_err();
    assert!(e.to_string().contains("only routing records"), "{e}");
    let left: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut left = left;
    left.sort();
    assert_eq!(
        left,
        ["bad.jsonl", "ev.jsonl"],
        "temporary files left behind"
    );
    // An existing non-empty dataset directory is refused.
    std::fs::create_dir_all(ds.join("x")).unwrap();
    let e = write_dataset(&[planted()], None, None, &ds, "r", 10).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
}

#[test]
fn random_corruption_never_panics() {
    install();
    let d = tempfile::tempdir().unwrap();
    let full = d.path().join("full.parquet");
    convert_to_file(&[planted()], None, None, &full).unwrap();
    let bytes = std::fs::read(&full).unwrap();
    // A fixed pseudo-random sequence of single-byte and burst corruptions.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let p = d.path().join("c.parquet");
    for _ in 0..300 {
        let mut b = bytes.clone();
        let at = (next() % b.len() as u64) as usize;
        let len = 1 + (next() % 16) as usize;
        for v in b.iter_mut().skip(at).take(len) {
            *v = next() as u8;
        }
        std::fs::write(&p, &b).unwrap();
        // Either reads (the corruption hit unused bytes or kept values valid) or fails cleanly.
        if let Ok(r) = TraceReader::open(&p) {
            for item in r {
                if let Err(e) = item {
                    assert!(e.to_string().contains("c.parquet"), "{e}");
                    break;
                }
            }
        }
    }
}
