//! `cargo run --release -p moe-xray-kernels --example round_bf16_exhaustive`: checks
//! `matmul::round_bf16` against the `half` crate's conversion on all 2³² f32 bit patterns (≈ 20 s;
//! too slow for the test suite, whose `round_bf16_equals_half` samples the patterns). Exits
//! non-zero on the first difference.

use half::bf16;
use moe_xray_kernels::matmul::round_bf16;

fn main() {
    for b in 0..=u32::MAX {
        let x = f32::from_bits(b);
        let (got, want) = (
            round_bf16(x).to_bits(),
            bf16::from_f32(x).to_f32().to_bits(),
        );
        if got != want {
            eprintln!("{b:#010x}: round_bf16 {got:#010x}, half {want:#010x}");
            std::process::exit(1);
        }
    }
    println!("round_bf16 equals half on all 2^32 bit patterns");
}
