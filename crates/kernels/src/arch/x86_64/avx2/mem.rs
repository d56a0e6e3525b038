//! Loads and stores of whole arrays (exactly 16 or 32 bytes) to and from SSE / AVX registers.
//! The array type carries the length, so the unaligned load or store is always in bounds.

use std::arch::x86_64::{
    __m128i, __m256i, _mm256_loadu_si256, _mm256_storeu_si256, _mm_loadu_si128, _mm_storeu_si128,
};

/// Plain-old-data arrays of exactly 32 bytes (every bit pattern valid).
pub(crate) trait Bytes32: Copy {}
impl Bytes32 for [u8; 32] {}
impl Bytes32 for [i16; 16] {}
impl Bytes32 for [u32; 8] {}
impl Bytes32 for [i32; 8] {}
impl Bytes32 for [u64; 4] {}
impl Bytes32 for [i64; 4] {}

/// Plain-old-data arrays of exactly 16 bytes (every bit pattern valid).
pub(crate) trait Bytes16: Copy {}
impl Bytes16 for [u16; 8] {}
impl Bytes16 for [i16; 8] {}
impl Bytes16 for [i32; 4] {}

#[inline]
#[target_feature(enable = "avx")]
pub(crate) fn load256<T: Bytes32>(a: &T) -> __m256i {
    // SAFETY: `a` is 32 readable bytes (`Bytes32`); `loadu` has no alignment requirement.
    unsafe { _mm256_loadu_si256((a as *const T).cast::<__m256i>()) }
}

#[inline]
#[target_feature(enable = "avx")]
pub(crate) fn store256<T: Bytes32>(a: &mut T, v: __m256i) {
    // SAFETY: `a` is 32 writable bytes of a type without invalid bit patterns (`Bytes32`);
    // `storeu` has no alignment requirement.
    unsafe { _mm256_storeu_si256((a as *mut T).cast::<__m256i>(), v) }
}

#[inline]
#[target_feature(enable = "avx")]
pub(crate) fn load128<T: Bytes16>(a: &T) -> __m128i {
    // SAFETY: `a` is 16 readable bytes (`Bytes16`); `loadu` has no alignment requirement.
    unsafe { _mm_loadu_si128((a as *const T).cast::<__m128i>()) }
}

#[inline]
#[target_feature(enable = "avx")]
#[allow(dead_code)]
pub(crate) fn store128<T: Bytes16>(a: &mut T, v: __m128i) {
    // SAFETY: `a` is 16 writable bytes of a type without invalid bit patterns (`Bytes16`).
    unsafe { _mm_storeu_si128((a as *mut T).cast::<__m128i>(), v) }
}

/// The array `N` elements at `i` of `s` (bounds-checked).
#[inline(always)]
pub(crate) fn arr<T, const N: usize>(s: &[T], i: usize) -> &[T; N] {
    #[allow(clippy::expect_used)] // the slice has exactly N elements
    s[i..i + N].try_into().expect("N elements")
}

/// The mutable array `N` elements at `i` of `s` (bounds-checked).
#[inline(always)]
pub(crate) fn arr_mut<T, const N: usize>(s: &mut [T], i: usize) -> &mut [T; N] {
    #[allow(clippy::expect_used)] // the slice has exactly N elements
    (&mut s[i..i + N]).try_into().expect("N elements")
}
