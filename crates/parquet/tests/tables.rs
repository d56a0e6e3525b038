//! The Parquet analysis and health tables: read back with the parquet crate, their values equal
//! those of results.json / the health JSON; byte-identical files at 1 and 2 threads.

use std::collections::HashMap;
use std::path::PathBuf;

use arrow_array::{
    Array, BooleanArray, Float64Array, Int64Array, ListArray, RecordBatch, StringArray,
};
use moe_xray_parquet::tables::{self, ExactTables, TableFile};
use moe_xray_stats::analyze::{Collector, Outputs, PathChoice};
use moe_xray_stats::input::PromptRow;
use moe_xray_trace::counts::{for_each_prompt_counts_info, AggregateOptions};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::reader::{FileReader, SerializedFileReader};
use serde_json::Value;

fn planted() -> PathBuf {
    moe_xray_test_support::fixture("stats/planted").join("trace.jsonl")
}

/// The analysis of the planted fixture (few repetitions: the tables, not the statistics, are
/// under test) on the given path.
fn analysis(choice: PathChoice) -> Outputs {
    let trace = planted();
    let mut collector: Option<Collector> = None;
    for_each_prompt_counts_info(
        std::slice::from_ref(&trace),
        &AggregateOptions::default(),
        |p| {
            let l = p.tokens_per_layer.len();
            let c = collector
                .get_or_insert_with(|| Collector::new(l, p.counts.len() / l.max(1), choice));
            c.push(PromptRow {
                prompt_id: p.prompt_id,
                category: p.category,
                counts: p.counts,
                tokens_per_layer: p.tokens_per_layer,
            })
            .unwrap();
            Ok(())
        },
    )
    .unwrap();
    let opts = moe_xray_stats::AnalyzeOptions {
        reps: 20,
        perm_reps: 20,
        boot_reps: 20,
        classifier_perm_reps: 5,
        path: choice,
        ..moe_xray_stats::AnalyzeOptions::default()
    };
    collector.unwrap().finish(Some(4), &opts).unwrap()
}

fn files_of(o: &Outputs) -> Vec<TableFile> {
    let exact = match o {
        Outputs::Exact(e) => Some(ExactTables {
            signatures: &e.signatures,
            similarity: &e.similarity,
            categories: &e.prompt_categories,
            oof_probabilities: e.oof_probabilities.as_deref(),
        }),
        Outputs::Gram(_) => None,
    };
    tables::analysis_tables(o.results(), exact).unwrap()
}

fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

/// `bytes` as a (temporary, already deleted) file to read.
fn as_file(bytes: &[u8]) -> std::fs::File {
    use std::io::{Seek, Write};
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(bytes).unwrap();
    f.rewind().unwrap();
    f
}

/// The record batches of a Parquet file, concatenated per column by the caller.
fn read(bytes: &[u8]) -> Vec<RecordBatch> {
    ParquetRecordBatchReaderBuilder::try_new(as_file(bytes))
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect()
}

fn file<'a>(files: &'a [TableFile], path: &str) -> &'a [u8] {
    &files
        .iter()
        .find(|f| f.path == path)
        .unwrap_or_else(|| panic!("{path} not written"))
        .bytes
}

fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> &'a T {
    b.column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"))
        .as_any()
        .downcast_ref::<T>()
        .unwrap_or_else(|| panic!("column {name}: wrong type"))
}

fn f64s(batches: &[RecordBatch], name: &str) -> Vec<Option<f64>> {
    batches
        .iter()
        .flat_map(|b| {
            let c = col::<Float64Array>(b, name);
            (0..c.len())
                .map(|i| c.is_valid(i).then(|| c.value(i)))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn i64s(batches: &[RecordBatch], name: &str) -> Vec<Option<i64>> {
    batches
        .iter()
        .flat_map(|b| {
            let c = col::<Int64Array>(b, name);
            (0..c.len())
                .map(|i| c.is_valid(i).then(|| c.value(i)))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn strings(batches: &[RecordBatch], name: &str) -> Vec<Option<String>> {
    batches
        .iter()
        .flat_map(|b| {
            let c = col::<StringArray>(b, name);
            (0..c.len())
                .map(|i| c.is_valid(i).then(|| c.value(i).to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A JSON number as results.json holds it (`null` for non-finite values).
fn json_f64(v: &Value) -> Option<f64> {
    v.as_f64()
}

#[test]
fn tables_equal_results_json_and_are_thread_invariant() {
    let one = in_pool(1, || analysis(PathChoice::ExactPairs));
    let two = in_pool(2, || analysis(PathChoice::ExactPairs));
    let (f1, f2) = (files_of(&one), files_of(&two));
    // Byte-identical files at 1 and 2 threads (and in a second call: no timestamps).
    assert_eq!(f1, f2);
    assert_eq!(f1, files_of(&one));
    // results.json as JSON values (exact f64s; the file writes them in shortest round-trip
    // form): what the tables must equal.
    let doc: Value = serde_json::to_value(one.results()).unwrap();
    let Outputs::Exact(e) = &one else {
        panic!("exact path expected")
    };
    let r = one.results();
    let (n, l, ex) = (r.prompt_ids.len(), r.num_layers, r.num_experts);
    assert!(n > 10 && l > 1 && ex > 1);

    // created_by is fixed, no key-value metadata besides the Arrow schema
    let meta = SerializedFileReader::new(as_file(file(&f1, "signatures.parquet"))).unwrap();
    assert_eq!(
        meta.metadata().file_metadata().created_by(),
        Some(format!("moe-xray {}", env!("CARGO_PKG_VERSION")).as_str())
    );

    // signatures: one row per (prompt, layer, expert), equal to the signature matrix
    let s = read(file(&f1, "signatures.parquet"));
    let freq = f64s(&s, "frequency");
    assert_eq!(freq.len(), n * l * ex);
    let ids = strings(&s, "prompt_id");
    let layer = i64s(&s, "layer");
    let expert = i64s(&s, "expert");
    let cats = strings(&s, "category");
    for i in 0..n {
        for li in 0..l {
            for ej in 0..ex {
                let row = (i * l + li) * ex + ej;
                assert_eq!(ids[row].as_deref(), Some(r.prompt_ids[i].as_str()));
                assert_eq!(cats[row].as_deref(), Some(e.prompt_categories[i].as_str()));
                assert_eq!(layer[row], Some(li as i64));
                assert_eq!(expert[row], Some(ej as i64));
                assert_eq!(freq[row], Some(e.signatures[i * l * ex + li * ex + ej]));
            }
        }
    }
    // each (prompt, layer) sums to 1
    let sum: f64 = freq[..ex].iter().map(|x| x.unwrap()).sum();
    assert!((sum - 1.0).abs() < 1e-12, "{sum}");

    // prompt similarity: N² rows in row-major order
    let p = read(file(&f1, "prompt_similarity.parquet"));
    let sim = f64s(&p, "similarity");
    assert_eq!(sim.len(), n * n);
    let (a, b) = (strings(&p, "prompt_a"), strings(&p, "prompt_b"));
    for i in 0..n {
        for j in 0..n {
            assert_eq!(sim[i * n + j], Some(e.similarity[i * n + j]));
            assert_eq!(a[i * n + j].as_deref(), Some(r.prompt_ids[i].as_str()));
            assert_eq!(b[i * n + j].as_deref(), Some(r.prompt_ids[j].as_str()));
        }
    }

    // per-layer statistics = results.json's per_layer
    let pl = read(file(&f1, "per_layer.parquet"));
    let jl = doc["per_layer"].as_array().unwrap();
    assert_eq!(i64s(&pl, "layer").len(), jl.len());
    for (k, name) in ["within_mean", "across_mean", "cohens_d"]
        .iter()
        .enumerate()
    {
        let got = f64s(&pl, name);
        for (row, entry) in jl.iter().enumerate() {
            assert_eq!(
                got[row],
                json_f64(&entry[name]),
                "per_layer {k} {name} row {row}"
            );
        }
    }

    // per-prompt table: coordinates and predictions of results.json, probabilities that sum
    // to 1 and whose argmax is the prediction
    let pp = read(file(&f1, "prompts.parquet"));
    let labels: Vec<String> = doc["logreg_5fold"]["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(labels.len() >= 2);
    let pid = strings(&pp, "prompt_id");
    let pca1 = f64s(&pp, "pca_1");
    let pca2 = f64s(&pp, "pca_2");
    let ts1 = f64s(&pp, "tsne_1");
    let ts2 = f64s(&pp, "tsne_2");
    let pred = strings(&pp, "predicted");
    let probs: Vec<Vec<Option<f64>>> = labels
        .iter()
        .map(|c| f64s(&pp, &format!("prob_{c}")))
        .collect();
    let correct: Vec<bool> = pp
        .iter()
        .flat_map(|b| {
            let c = col::<BooleanArray>(b, "correct");
            (0..c.len()).map(|i| c.value(i)).collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(pid.len(), n);
    for i in 0..n {
        assert_eq!(pid[i].as_deref(), doc["prompt_ids"][i].as_str());
        assert_eq!(pca1[i], json_f64(&doc["pca"]["coords"][i][0]));
        assert_eq!(pca2[i], json_f64(&doc["pca"]["coords"][i][1]));
        assert_eq!(ts1[i], json_f64(&doc["tsne"]["coords"][i][0]));
        assert_eq!(ts2[i], json_f64(&doc["tsne"]["coords"][i][1]));
        let predicted = doc["logreg_5fold"]["oof_predictions"][i].as_str();
        assert_eq!(pred[i].as_deref(), predicted);
        assert_eq!(
            correct[i],
            predicted == Some(e.prompt_categories[i].as_str())
        );
        let row: Vec<f64> = probs.iter().map(|c| c[i].unwrap()).collect();
        let total: f64 = row.iter().sum();
        assert!((total - 1.0).abs() < 1e-9, "prompt {i}: {total}");
        let best = (0..row.len())
            .max_by(|&x, &y| row[x].total_cmp(&row[y]))
            .unwrap();
        assert_eq!(
            Some(labels[best].as_str()),
            predicted,
            "prompt {i}: {row:?}"
        );
    }

    // long tables: one per top-level key of results.json, every leaf once, equal to it
    let top = doc.as_object().unwrap();
    let long: Vec<&TableFile> = f1.iter().filter(|f| f.path.starts_with("long/")).collect();
    assert_eq!(long.len(), top.len());
    let known = tables::sections();
    for (section, value) in top {
        assert!(
            known.contains(section),
            "{section} not among the schema's sections"
        );
        let t = read(file(&f1, &tables::long_path(section)));
        check_long(section, value, &t);
    }
    // the labels of a 2-D section: category names of the matrix
    let t = read(file(&f1, "long/category_similarity_matrix.parquet"));
    let keys = strings(&t, "key");
    let (li, lj) = (strings(&t, "label_i"), strings(&t, "label_j"));
    let order = &r.category_similarity_matrix.order;
    let (ii, jj) = (i64s(&t, "i"), i64s(&t, "j"));
    let mut seen = 0;
    for row in 0..keys.len() {
        if keys[row].as_deref() == Some("values") {
            let (i, j) = (ii[row].unwrap() as usize, jj[row].unwrap() as usize);
            assert_eq!(li[row].as_deref(), Some(order[i].as_str()));
            assert_eq!(lj[row].as_deref(), Some(order[j].as_str()));
            seen += 1;
        }
    }
    assert_eq!(seen, order.len() * order.len());
}

/// Every leaf of `value` is one row of the long table `t` (in document order) with its value.
fn check_long(section: &str, value: &Value, t: &[RecordBatch]) {
    let mut leaves = Vec::new();
    fn walk(key: &str, idx: &mut Vec<u64>, v: &Value, out: &mut Vec<(String, Vec<u64>, Value)>) {
        match v {
            Value::Object(m) => {
                let mut entries: Vec<_> = m.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                for (k, c) in entries {
                    let sub = if key.is_empty() {
                        k.clone()
                    } else {
                        format!("{key}.{k}")
                    };
                    walk(&sub, idx, c, out);
                }
            }
            Value::Array(a) => {
                for (n, c) in a.iter().enumerate() {
                    if idx.len() < 2 {
                        idx.push(n as u64);
                        walk(key, idx, c, out);
                        idx.pop();
                    } else {
                        walk(&format!("{key}[{n}]"), idx, c, out);
                    }
                }
            }
            leaf => out.push((key.to_string(), idx.clone(), leaf.clone())),
        }
    }
    walk("", &mut Vec::new(), value, &mut leaves);
    let sec = strings(t, "section");
    let key = strings(t, "key");
    let (i, j) = (i64s(t, "i"), i64s(t, "j"));
    let val = f64s(t, "value");
    let text = strings(t, "text");
    assert_eq!(sec.len(), leaves.len(), "{section}: rows");
    for (row, (k, idx, leaf)) in leaves.iter().enumerate() {
        assert_eq!(sec[row].as_deref(), Some(section));
        assert_eq!(key[row].as_deref(), Some(k.as_str()), "{section} row {row}");
        assert_eq!(i[row], idx.first().map(|&x| x as i64));
        assert_eq!(j[row], idx.get(1).map(|&x| x as i64));
        match leaf {
            Value::Number(num) => {
                assert_eq!(val[row], num.as_f64(), "{section}.{k}");
                if let Some(u) = num.as_u64().filter(|&u| u > 1 << 53) {
                    assert_eq!(text[row], Some(u.to_string()));
                }
            }
            Value::String(s) => {
                assert_eq!(val[row], None);
                assert_eq!(text[row].as_deref(), Some(s.as_str()), "{section}.{k}");
            }
            Value::Bool(b) => assert_eq!(text[row], Some(b.to_string())),
            Value::Null => assert_eq!((val[row], &text[row]), (None, &None)),
            _ => unreachable!(),
        }
    }
}

#[test]
fn gram_path_writes_the_tables_it_has() {
    let o = analysis(PathChoice::GramSums);
    let files = files_of(&o);
    let names: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
    for absent in [
        "signatures.parquet",
        "prompt_similarity.parquet",
        "prompts.parquet",
    ] {
        assert!(!names.contains(&absent), "{absent} on the gram path");
    }
    assert!(names.contains(&"per_layer.parquet"));
    // a skipped section is one row: key "skipped", the reason in `text`
    let t = read(file(&files, "long/tsne.parquet"));
    assert_eq!(strings(&t, "key"), vec![Some("skipped".to_string())]);
    assert!(strings(&t, "text")[0]
        .as_deref()
        .unwrap()
        .contains("gram_sums"));
}

#[test]
fn sections_are_the_schema_properties() {
    let s = tables::sections();
    for k in [
        "schema_version",
        "per_layer",
        "logreg_5fold",
        "lexical_baseline",
        "token_matched",
    ] {
        assert!(s.iter().any(|x| x == k), "{k} missing from {s:?}");
    }
    // every key a results.json of the exact path has is a section
    let o = analysis(PathChoice::ExactPairs);
    let v = serde_json::to_value(o.results()).unwrap();
    for k in v.as_object().unwrap().keys() {
        assert!(s.contains(k), "{k}");
    }
}

#[test]
fn long_rows_label_prompts_and_keep_big_integers_exact() {
    let doc: Value = serde_json::json!({
        "prompt_ids": ["a", "b"],
        "settings": {"seed": 18446744073709551615u64, "weighted": false},
        "pca": {"coords": [[1.5, null], [2.0, -1.0]], "explained_variance_ratio": [0.7, 0.2]},
        "input": {"manifest": {"deep": [[[1, 2]]]}}
    });
    let rows = tables::long_rows("settings", &doc["settings"], &doc);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].key, "seed");
    assert_eq!(rows[0].text.as_deref(), Some("18446744073709551615"));
    assert_eq!(rows[1].text.as_deref(), Some("false"));
    let rows = tables::long_rows("pca", &doc["pca"], &doc);
    let by: HashMap<(String, Option<u64>, Option<u64>), &tables::LongRow> = rows
        .iter()
        .map(|r| ((r.key.clone(), r.i, r.j), r))
        .collect();
    let c = by[&("coords".to_string(), Some(1), Some(0))];
    assert_eq!(
        (c.label_i.as_deref(), c.label_j.as_deref(), c.value),
        (Some("b"), Some("pc1"), Some(2.0))
    );
    let null = by[&("coords".to_string(), Some(0), Some(1))];
    assert_eq!((null.value, null.text.as_deref()), (None, None));
    let ev = by[&("explained_variance_ratio".to_string(), Some(1), None)];
    assert_eq!(ev.label_i.as_deref(), Some("pc2"));
    // a third array level goes into the key
    let rows = tables::long_rows("input", &doc["input"], &doc);
    assert_eq!(rows[1].key, "manifest.deep[1]");
    assert_eq!(
        (rows[1].i, rows[1].j, rows[1].value),
        (Some(0), Some(0), Some(2.0))
    );
}

#[test]
fn health_tables_equal_the_report() {
    let run = moe_xray_health::resolve_traces(&[planted()]).unwrap();
    let acc =
        moe_xray_health::accumulate_run(&run, None, moe_xray_health::HealthOptions::default())
            .unwrap();
    let report = acc.report();
    let json = serde_json::to_value(&report).unwrap();
    let files = tables::health_tables(&report, &acc, &json).unwrap();
    assert_eq!(
        files,
        in_pool(2, || tables::health_tables(&report, &acc, &json).unwrap())
    );
    let names: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(names, tables::HEALTH_FILES);
    let t = read(file(&files, "layers.parquet"));
    let gini = f64s(&t, "gini");
    let dead: Vec<Vec<i64>> = t
        .iter()
        .flat_map(|b| {
            let c = col::<ListArray>(b, "dead_experts");
            (0..c.len())
                .map(|i| {
                    let v = c.value(i);
                    let v = v.as_any().downcast_ref::<Int64Array>().unwrap();
                    v.values().to_vec()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(gini.len(), report.layers.len());
    for (row, l) in report.layers.iter().enumerate() {
        assert_eq!(gini[row], Some(l.gini));
        let want: Vec<i64> = l.dead_experts.iter().map(|&e| e as i64).collect();
        assert_eq!(dead[row], want);
    }
    let load = read(file(&files, "load.parquet"));
    let v = f64s(&load, "load");
    assert_eq!(v.len(), report.layers.len() * report.num_experts);
    for (row, l) in report.layers.iter().enumerate() {
        for e in 0..report.num_experts {
            assert_eq!(v[row * report.num_experts + e], Some(l.load[e]));
        }
    }
    // co-activation diagonal = load
    let c = read(file(&files, "coactivation.parquet"));
    let (i, j, n) = (i64s(&c, "i"), i64s(&c, "j"), i64s(&c, "count"));
    let e = report.num_experts;
    for row in 0..e * e {
        if i[row] == j[row] {
            assert_eq!(
                n[row].unwrap() as f64,
                report.layers[0].load[i[row].unwrap() as usize]
            );
        }
    }
    // the long table holds every top-level key of the report
    let lt = read(file(&files, "long.parquet"));
    let sections: std::collections::BTreeSet<String> =
        strings(&lt, "section").into_iter().flatten().collect();
    for k in json.as_object().unwrap().keys() {
        if !matches!(&json[k], Value::Array(a) if a.is_empty()) {
            assert!(sections.contains(k), "{k}");
        }
    }
}
