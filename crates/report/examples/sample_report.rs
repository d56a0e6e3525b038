//! Writes the sample report of the test fixture (tests/data/) into the folder given as the first
//! argument (default `sample-report`): `cargo run -p moe-xray-report --example sample_report -- DIR`.
//! A second argument `synthetic` or `planted` marks the model as such (to see those
//! interpretation boxes).

#[path = "../tests/common/mod.rs"]
mod common;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| "sample-report".into());
    let mut input = common::input();
    match args.next().as_deref() {
        Some("synthetic") => input.synthetic = Some(moe_xray_report::SyntheticKind::Random),
        Some("planted") => input.synthetic = Some(moe_xray_report::SyntheticKind::Planted),
        _ => {}
    }
    let path = moe_xray_report::write_report(&dir, &input)?;
    println!("{}", path.display());
    Ok(())
}
