//! Renders the report and every figure in headless Chromium, as a person would see them: checks
//! the DOM (every figure's <svg> is there) and that screenshots are not blank.
//!
//! Chromium is looked up at /usr/bin/chromium or as `chromium` on PATH. When it is missing the
//! test fails if the environment variable CI is set (CI installs it, see .ci/run) and otherwise
//! prints a skip message and returns. Set MOE_XRAY_REPORT_SCREENSHOT=path.png to keep the full
//! report screenshot (docs/report-screenshot.png is made this way).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The routing-health section of `fixtures/health/run_a` (records with probs: every health
/// figure available).
fn health_section() -> moe_xray_report::HealthSection {
    use moe_xray_health::{accumulate_run, resolve_run, HealthOptions};
    let dir = moe_xray_test_support::fixture("health/run_a");
    let run = resolve_run(&dir).unwrap();
    let acc = accumulate_run(&run, None, HealthOptions::default()).unwrap();
    moe_xray_report::HealthSection::new(&acc, acc.report(), None, 2)
}

fn find_chromium() -> Option<PathBuf> {
    let fixed = Path::new("/usr/bin/chromium");
    if fixed.is_file() {
        return Some(fixed.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("chromium"))
            .find(|p| p.is_file())
    })
}

fn chromium_or_skip() -> Option<PathBuf> {
    match find_chromium() {
        Some(p) => Some(p),
        None if std::env::var_os("CI").is_some() => {
            panic!("chromium not found (/usr/bin/chromium or on PATH) but CI is set: install it (apt-get install chromium)")
        }
        None => {
            eprintln!("SKIP browser test: chromium not found (/usr/bin/chromium or on PATH); install it with `apt-get install chromium`");
            None
        }
    }
}

/// Runs chromium headless with `args` on `url`; returns stdout. Kills it after 120 s.
fn run_chromium(bin: &Path, profile: &Path, args: &[String], url: &str) -> String {
    let out_path = profile.join(format!("stdout-{}.txt", args.len()));
    let out_file = std::fs::File::create(&out_path).unwrap();
    let mut child = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
        ])
        .arg(format!(
            "--user-data-dir={}",
            profile.join("profile").display()
        ))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(out_file)
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium starts");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "chromium exited with {status}");
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::read_to_string(&out_path).unwrap_or_default()
}

struct Image {
    width: usize,
    height: usize,
    rgb: Vec<[u8; 3]>,
}

fn decode_png(path: &Path) -> Image {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut dec = png::Decoder::new(std::io::Cursor::new(bytes));
    dec.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let ch = match info.color_type {
        png::ColorType::Rgba => 4,
        png::ColorType::Rgb => 3,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Grayscale => 1,
        png::ColorType::Indexed => panic!("unexpanded palette"),
    };
    let (w, h) = (info.width as usize, info.height as usize);
    let mut rgb = Vec::with_capacity(w * h);
    for y in 0..h {
        let row = &buf[y * info.line_size..y * info.line_size + w * ch];
        for px in row.chunks(ch) {
            rgb.push(if ch >= 3 {
                [px[0], px[1], px[2]]
            } else {
                [px[0], px[0], px[0]]
            });
        }
    }
    Image {
        width: w,
        height: h,
        rgb,
    }
}

/// Share of pixels in the region that are saturated colours (max − min channel > 60): data
/// marks (bars, points, heatmap cells, lines), never axes, grid or text, which are grey.
fn coloured_share(img: &Image, x0: usize, y0: usize, x1: usize, y1: usize) -> f64 {
    let mut n = 0usize;
    let mut total = 0usize;
    for y in y0..y1.min(img.height) {
        for x in x0..x1.min(img.width) {
            let p = img.rgb[y * img.width + x];
            total += 1;
            let (mx, mn) = (*p.iter().max().unwrap(), *p.iter().min().unwrap());
            if mx - mn > 60 {
                n += 1;
            }
        }
    }
    n as f64 / total.max(1) as f64
}

/// (share of pixels that are not near-white, number of distinct colours quantised to 4 bits).
fn region_stats(img: &Image, x0: usize, y0: usize, x1: usize, y1: usize) -> (f64, usize) {
    let mut ink = 0usize;
    let mut total = 0usize;
    let mut colours = BTreeSet::new();
    for y in y0..y1.min(img.height) {
        for x in x0..x1.min(img.width) {
            let p = img.rgb[y * img.width + x];
            total += 1;
            if p.iter().any(|c| *c < 235) {
                ink += 1;
            }
            colours.insert((p[0] >> 4, p[1] >> 4, p[2] >> 4));
        }
    }
    (ink as f64 / total.max(1) as f64, colours.len())
}

fn has_colour_near(img: &Image, rgb: [u8; 3], min_pixels: usize) -> bool {
    img.rgb
        .iter()
        .filter(|p| {
            p.iter()
                .zip(rgb)
                .all(|(a, b)| (*a as i32 - b as i32).abs() <= 12)
        })
        .count()
        >= min_pixels
}

/// Adds a `windows` section (the reference values of `fixtures/windows/planted_w4.json`) and a
/// `random_router_control` section to the results.
fn with_windows_and_control(input: &mut moe_xray_report::ReportInput) {
    use moe_xray_stats::results::{RandomRouterControl, RoutingWindows, Section};
    let path = moe_xray_test_support::fixture("windows").join("planted_w4.json");
    let w: RoutingWindows = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let a = &mut input.results.analysis;
    let mut similarity = a.similarity;
    similarity.cohens_d /= 2.0;
    a.windows = Some(Section::Done(w));
    a.random_router_control = Some(Section::Done(RandomRouterControl {
        method: "permute_entries".into(),
        seed: 0,
        dir: "control".into(),
        num_prompts: a.num_prompts,
        similarity,
        classifier: Section::skipped("not computed"),
    }));
}

#[test]
fn report_renders_in_headless_chromium() {
    let Some(bin) = chromium_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut input = common::input();
    input.health = Some(health_section());
    with_windows_and_control(&mut input);
    common::with_confounds(&mut input.results.analysis);
    input.ablation = Some(common::ablation());
    let report = moe_xray_report::write_report(dir.path().join("out"), &input).unwrap();
    let url = format!("file://{}", report.display());

    // 1. DOM: every figure's <svg> is in the parsed document, the <script> prompt is text.
    let dom = run_chromium(&bin, dir.path(), &["--dump-dom".to_string()], &url);
    assert!(
        dom.contains("<main>"),
        "DOM dump looks wrong: {}",
        &dom[..dom.len().min(300)]
    );
    let mut figs =
        moe_xray_report::render_figures(&input.results_with_categories(), input.usage.as_ref());
    assert_eq!(figs.len(), 7);
    // the routing-health figures are drawn with the same toolkit and checked the same way
    let health_figs = &input.health.as_ref().unwrap().figures;
    assert_eq!(health_figs.len(), 2);
    assert!(health_figs.iter().all(|f| f.available));
    figs.extend(health_figs.iter().cloned());
    for f in &figs {
        let needle = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"{}\"", f.id);
        assert!(
            dom.contains(&needle),
            "figure {} missing from the DOM",
            f.id
        );
    }
    assert!(
        !dom.contains("<script>alert"),
        "the prompt's <script> became an element"
    );
    assert!(
        dom.contains("&lt;script&gt;alert("),
        "escaped prompt text missing in the DOM"
    );
    assert!(
        !dom.contains("random-weight"),
        "real-model fixture must not get the synthetic warning"
    );

    assert!(
        dom.contains(
            "<tr class=\"group\"><th colspan=\"3\" scope=\"rowgroup\">Load balance</th></tr>"
        ),
        "grouped health table missing from the DOM"
    );
    // Routing over time and the random-router control (issue 19): sections, figure, sentence.
    for needle in [
        "<section id=\"routing-over-time\">",
        "<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"fig-windows-task-information\"",
        "<section id=\"random-router-control\">",
        "under a random router",
        // Expert ablation (issue 19): section, effect matrix, dose-response, table.
        "<section id=\"expert-ablation\">",
        "<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"fig-ablation-matrix\"",
        "<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"fig-ablation-dose\"",
        "<table class=\"ablation\">",
        // Confound controls (issue 19): lexical baseline and token-matched d as a figure.
        "<section id=\"confound-controls\">",
        "<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"fig-confound-controls\"",
    ] {
        assert!(dom.contains(needle), "{needle} missing from the DOM");
    }

    // 2. Full-page screenshot (1200 × 3000): not blank, the figures' colours are painted.
    let shot = dir.path().join("report.png");
    run_chromium(
        &bin,
        dir.path(),
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1200,3000".to_string(),
        ],
        &url,
    );
    let img = decode_png(&shot);
    assert_eq!((img.width, img.height), (1200, 3000));
    let (ink, colours) = region_stats(&img, 0, 0, img.width, img.height);
    eprintln!(
        "report screenshot: {:.1} % non-white pixels, {colours} colours",
        ink * 100.0
    );
    assert!(ink > 0.05, "screenshot nearly blank ({ink})");
    assert!(colours > 50, "too few colours ({colours})");
    // the page's central column has content all the way down to the figures
    for band in 0..3 {
        let (ink, _) = region_stats(&img, 100, band * 1000, 1100, band * 1000 + 1000);
        assert!(ink > 0.02, "band {band} of the screenshot is blank ({ink})");
    }
    // Okabe–Ito blue (within bar, scatter points) and viridis ends (heatmap cells) are painted
    assert!(
        has_colour_near(&img, [0x00, 0x72, 0xB2], 200),
        "no Okabe–Ito blue in the screenshot"
    );
    assert!(
        has_colour_near(&img, [0x44, 0x01, 0x54], 50)
            || has_colour_near(&img, [0xfd, 0xe7, 0x25], 50),
        "no heatmap colours in the screenshot"
    );
    if let Some(keep) = std::env::var_os("MOE_XRAY_REPORT_SCREENSHOT") {
        std::fs::copy(&shot, &keep).unwrap();
        eprintln!("kept screenshot at {}", PathBuf::from(keep).display());
    }

    // 3. Each figure file on its own: the plot region is painted with several colours.
    for f in &figs {
        let svg_path = dir
            .path()
            .join("out")
            .join("figures")
            .join(format!("{}.svg", f.id));
        let h: f64 = f
            .svg
            .split("viewBox=\"0 0 640.00 ")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let png_path = dir.path().join(format!("{}.png", f.id));
        run_chromium(
            &bin,
            dir.path(),
            &[
                format!("--screenshot={}", png_path.display()),
                format!("--window-size=640,{}", h.ceil() as usize),
            ],
            &format!("file://{}", svg_path.display()),
        );
        let img = decode_png(&png_path);
        // plot region: below the title, inside the margins
        assert_eq!(img.width, 640);
        let (ink, colours) = region_stats(&img, 40, 40, 600, img.height - 20);
        let data = coloured_share(&img, 40, 40, 600, img.height - 20);
        eprintln!(
            "{}: {:.1} % ink, {:.2} % data colour, {colours} colours",
            f.id,
            ink * 100.0,
            data * 100.0
        );
        assert!(
            ink > 0.03,
            "{}: figure region is (nearly) blank: {ink}",
            f.id
        );
        assert!(data > 0.004, "{}: no data marks painted: {data}", f.id);
        assert!(colours >= 6, "{}: only {colours} colours", f.id);
        // the title row is drawn
        let (title_ink, _) = region_stats(&img, 0, 5, 640, 30);
        assert!(title_ink > 0.01, "{}: no title", f.id);
    }
}

/// The cross-model `report.html` (`compare-models --out DIR`) in headless Chromium: every
/// section and figure is in the DOM, and the page is painted with the figures' colours.
#[test]
fn crossmodel_report_renders_in_headless_chromium() {
    let Some(bin) = chromium_or_skip() else {
        return;
    };
    use moe_xray_report::crossmodel::{figures, render_html, CrossModelPage};
    let dir = tempfile::tempdir().unwrap();
    let (r, a, b, w) = common::crossmodel(true);
    let page = CrossModelPage {
        report: &r,
        sim_a: &a,
        sim_b: &b,
        within: &w,
        command: "moe-xray compare-models runs/a runs/b --out cmp",
    };
    let path = dir.path().join("report.html");
    std::fs::write(&path, render_html(&page)).unwrap();
    let url = format!("file://{}", path.display());

    let dom = run_chromium(&bin, dir.path(), &["--dump-dom".to_string()], &url);
    assert!(dom.contains("<main>"), "DOM dump looks wrong");
    for id in [
        "models",
        "similarity",
        "per-layer",
        "task-separation",
        "expert-matching",
        "reproduce",
    ] {
        let needle = format!("<section id=\"{id}\">");
        assert!(dom.contains(&needle), "{needle} missing from the DOM");
    }
    let figs = figures(&r, &a, &b, &w);
    assert_eq!(figs.len(), 3);
    for f in &figs {
        let needle = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"{}\"", f.id);
        assert!(
            dom.contains(&needle),
            "figure {} missing from the DOM",
            f.id
        );
    }
    for needle in [
        "<table class=\"separation\">",
        "<table class=\"matching\">",
        "<table class=\"drift\">",
        "story &lt;&amp;&gt;",
    ] {
        assert!(dom.contains(needle), "{needle} missing from the DOM");
    }
    // the matched-drift figure inside the matching section
    assert!(
        dom.contains(&format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"{}\"",
            moe_xray_report::crossmodel::DRIFT_ID
        )),
        "matched-drift figure missing from the DOM"
    );

    let shot = dir.path().join("crossmodel.png");
    run_chromium(
        &bin,
        dir.path(),
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1200,3000".to_string(),
        ],
        &url,
    );
    let img = decode_png(&shot);
    assert_eq!((img.width, img.height), (1200, 3000));
    let (ink, colours) = region_stats(&img, 0, 0, img.width, img.height);
    eprintln!(
        "cross-model report screenshot: {:.1} % non-white pixels, {colours} colours",
        ink * 100.0
    );
    assert!(ink > 0.03, "screenshot nearly blank ({ink})");
    assert!(colours > 50, "too few colours ({colours})");
    if let Some(keep) = std::env::var_os("MOE_XRAY_CROSSMODEL_SCREENSHOT") {
        std::fs::copy(&shot, &keep).unwrap();
    }
    // the scatter's within-category points (Okabe–Ito blue) and across ones (orange) are painted
    assert!(
        has_colour_near(&img, [0x00, 0x72, 0xB2], 30),
        "no Okabe–Ito blue in the screenshot"
    );
    assert!(
        has_colour_near(&img, [0xE6, 0x9F, 0x00], 30),
        "no Okabe–Ito orange in the screenshot"
    );
    // the per-layer CKA heatmap's viridis cells
    assert!(
        has_colour_near(&img, [0x44, 0x01, 0x54], 50)
            || has_colour_near(&img, [0xfd, 0xe7, 0x25], 50),
        "no heatmap colours in the screenshot"
    );
}

/// The N-run cross-model `report.html` (`compare-models R1 R2 R3 --out DIR`) in headless
/// Chromium: every section, both N × N matrix figures, one section per pair with the
/// matched-drift figure of the same-architecture pair, and the matrices' colours painted.
#[test]
fn crossmodel_multi_report_renders_in_headless_chromium() {
    let Some(bin) = chromium_or_skip() else {
        return;
    };
    use moe_xray_report::crossmodel_multi::{figures, pair_drift_id, render_html, MultiModelPage};
    let dir = tempfile::tempdir().unwrap();
    let r = common::crossmodel_multi();
    let path = dir.path().join("report.html");
    std::fs::write(
        &path,
        render_html(&MultiModelPage {
            report: &r,
            command: "moe-xray compare-models a b c --out cmp",
        }),
    )
    .unwrap();
    let url = format!("file://{}", path.display());
    let dom = run_chromium(&bin, dir.path(), &["--dump-dom".to_string()], &url);
    assert!(dom.contains("<main>"), "DOM dump looks wrong");
    for id in [
        "models",
        "matrices",
        "task-separation",
        "pairs",
        "pair-1-2",
        "pair-1-3",
        "pair-2-3",
        "reproduce",
    ] {
        let needle = format!("<section id=\"{id}\">");
        assert!(dom.contains(&needle), "{needle} missing from the DOM");
    }
    let figs = figures(&r);
    assert_eq!(figs.len(), 2);
    for id in figs
        .iter()
        .map(|f| f.id.clone())
        .chain([pair_drift_id(0, 1)])
    {
        let needle = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"{id}\"");
        assert!(dom.contains(&needle), "figure {id} missing from the DOM");
    }
    assert!(
        dom.contains("<table class=\"pairs\">") && dom.contains("<table class=\"separation\">")
    );
    let shot = dir.path().join("crossmodel_multi.png");
    run_chromium(
        &bin,
        dir.path(),
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1200,3000".to_string(),
        ],
        &url,
    );
    let img = decode_png(&shot);
    let (ink, colours) = region_stats(&img, 0, 0, img.width, img.height);
    assert!(ink > 0.03, "screenshot nearly blank ({ink})");
    assert!(colours > 50, "too few colours ({colours})");
    if let Some(keep) = std::env::var_os("MOE_XRAY_CROSSMODEL_MULTI_SCREENSHOT") {
        std::fs::copy(&shot, &keep).unwrap();
    }
    // the CKA matrix's viridis cells and the drift bars (Okabe–Ito orange)
    assert!(
        has_colour_near(&img, [0x44, 0x01, 0x54], 60)
            || has_colour_near(&img, [0xfd, 0xe7, 0x25], 60)
            || has_colour_near(&img, [0x21, 0x91, 0x8c], 60),
        "no CKA matrix colours in the screenshot"
    );
    assert!(
        has_colour_near(&img, [0xE6, 0x9F, 0x00], 30),
        "no Okabe–Ito orange in the screenshot"
    );
}
