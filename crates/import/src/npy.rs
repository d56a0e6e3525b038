//! A small, strict reader of NumPy `.npy` arrays (format versions 1.0, 2.0, 3.0) and `.npz`
//! archives (a zip of `.npy` members, stored or deflated), for integer routing arrays.
//!
//! Accepted dtypes: little-endian or single-byte signed integers (`<i8`, `<i4`, `<i2`, `|i1`),
//! C order only. Every size is checked before anything is allocated: the header is at most
//! [`MAX_HEADER`] bytes, at most [`MAX_NDIM`] dimensions, the element count times the item size
//! must not overflow and must equal the bytes that follow the header exactly (a truncated or
//! over-long file is an error), and an array is at most [`MAX_ARRAY_BYTES`] bytes.

use std::io::Read;
use std::path::Path;

use crate::{ImportError, Result};

/// Largest accepted header (the format allows 4 GiB; real headers are < 200 bytes).
pub const MAX_HEADER: usize = 1 << 16;
/// Most dimensions accepted.
pub const MAX_NDIM: usize = 8;
/// Largest accepted array payload.
pub const MAX_ARRAY_BYTES: u64 = 4 << 30;
/// Most members accepted in an `.npz`.
pub const MAX_NPZ_MEMBERS: usize = 1 << 20;

/// An integer array, values widened to i64, C order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntArray {
    pub shape: Vec<usize>,
    pub data: Vec<i64>,
}

/// Parses a whole `.npy` file held in memory. Errors are plain messages; callers add the file
/// and record.
pub fn parse_npy(bytes: &[u8]) -> std::result::Result<IntArray, String> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    if bytes.len() < MAGIC.len() + 2 || &bytes[..MAGIC.len()] != MAGIC {
        return Err("not an .npy file (missing \\x93NUMPY magic)".into());
    }
    let major = bytes[6];
    let (hlen, hstart): (usize, usize) = match major {
        1 => {
            if bytes.len() < 10 {
                return Err("truncated .npy header".into());
            }
            (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10)
        }
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated .npy header".into());
            }
            let n = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
            (usize::try_from(n).unwrap_or(usize::MAX), 12)
        }
        v => return Err(format!("unsupported .npy format version {v}")),
    };
    if hlen > MAX_HEADER {
        return Err(format!(
            ".npy header of {hlen} bytes exceeds the limit of {MAX_HEADER}"
        ));
    }
    let hend = hstart
        .checked_add(hlen)
        .ok_or_else(|| "header length overflows".to_string())?;
    if bytes.len() < hend {
        return Err(format!(
            "truncated .npy header: {hlen} header bytes announced, {} present",
            bytes.len() - hstart
        ));
    }
    let header = std::str::from_utf8(&bytes[hstart..hend])
        .map_err(|_| "the .npy header is not text".to_string())?;
    let h = parse_header(header)?;
    if h.fortran_order {
        return Err("Fortran-order arrays are not supported (save with C order)".into());
    }
    let item = match h.descr.as_str() {
        "<i8" => 8,
        "<i4" => 4,
        "<i2" => 2,
        "|i1" | "<i1" => 1,
        d => {
            return Err(format!(
                "dtype {d:?} is not supported (expected a little-endian signed integer, e.g. '<i4')"
            ))
        }
    };
    let mut count: u64 = 1;
    for &d in &h.shape {
        count = count
            .checked_mul(d as u64)
            .ok_or_else(|| "array size overflows".to_string())?;
    }
    let nbytes = count
        .checked_mul(item)
        .ok_or_else(|| "array size overflows".to_string())?;
    if nbytes > MAX_ARRAY_BYTES {
        return Err(format!(
            "array of {nbytes} bytes exceeds the limit of {MAX_ARRAY_BYTES}"
        ));
    }
    let payload = &bytes[hend..];
    if (payload.len() as u64) < nbytes {
        return Err(format!(
            "truncated .npy data: shape {:?} needs {nbytes} bytes, {} present",
            h.shape,
            payload.len()
        ));
    }
    if (payload.len() as u64) > nbytes {
        return Err(format!(
            "{} trailing bytes after the .npy data of shape {:?}",
            payload.len() as u64 - nbytes,
            h.shape
        ));
    }
    let data: Vec<i64> = match item {
        8 => payload
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(crate::exact_bytes(c)))
            .collect(),
        4 => payload
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(crate::exact_bytes(c)) as i64)
            .collect(),
        2 => payload
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]) as i64)
            .collect(),
        _ => payload.iter().map(|&b| b as i8 as i64).collect(),
    };
    Ok(IntArray {
        shape: h.shape,
        data,
    })
}

struct Header {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// Parses the header's Python dict literal: exactly the keys `descr` (string), `fortran_order`
/// (True/False) and `shape` (tuple of non-negative integers).
fn parse_header(s: &str) -> std::result::Result<Header, String> {
    let mut p = Lexer {
        s: s.trim_end_matches(['\n', ' ', '\0']).as_bytes(),
        i: 0,
    };
    let bad = |what: &str| format!("malformed .npy header ({what}): {s:?}");
    p.ws();
    if !p.eat(b'{') {
        return Err(bad("expected '{'"));
    }
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    loop {
        p.ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string().ok_or_else(|| bad("expected a quoted key"))?;
        p.ws();
        if !p.eat(b':') {
            return Err(bad("expected ':'"));
        }
        p.ws();
        match key.as_str() {
            "descr" if descr.is_none() => {
                descr = Some(p.string().ok_or_else(|| bad("descr"))?);
            }
            "fortran_order" if fortran.is_none() => {
                fortran = Some(if p.word(b"True") {
                    true
                } else if p.word(b"False") {
                    false
                } else {
                    return Err(bad("fortran_order"));
                });
            }
            "shape" if shape.is_none() => {
                shape = Some(p.tuple().ok_or_else(|| bad("shape"))?);
            }
            _ => return Err(bad(&format!("unexpected or repeated key {key:?}"))),
        }
        p.ws();
        if p.eat(b',') {
            continue;
        }
        p.ws();
        if p.eat(b'}') {
            break;
        }
        return Err(bad("expected ',' or '}'"));
    }
    p.ws();
    if p.i != p.s.len() {
        return Err(bad("text after '}'"));
    }
    let shape: Vec<usize> = shape.ok_or_else(|| bad("missing shape"))?;
    if shape.len() > MAX_NDIM {
        return Err(format!(
            "{} dimensions exceed the limit of {MAX_NDIM}",
            shape.len()
        ));
    }
    Ok(Header {
        descr: descr.ok_or_else(|| bad("missing descr"))?,
        fortran_order: fortran.ok_or_else(|| bad("missing fortran_order"))?,
        shape,
    })
}

struct Lexer<'a> {
    s: &'a [u8],
    i: usize,
}

impl Lexer<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn word(&mut self, w: &[u8]) -> bool {
        if self.s[self.i..].starts_with(w) {
            self.i += w.len();
            true
        } else {
            false
        }
    }
    fn string(&mut self) -> Option<String> {
        let q = *self.s.get(self.i)?;
        if q != b'\'' && q != b'"' {
            return None;
        }
        let start = self.i + 1;
        let len = self.s[start..].iter().position(|&c| c == q)?;
        let out = std::str::from_utf8(&self.s[start..start + len]).ok()?;
        if out.contains('\\') {
            return None;
        }
        self.i = start + len + 1;
        Some(out.to_string())
    }
    fn tuple(&mut self) -> Option<Vec<usize>> {
        if !self.eat(b'(') {
            return None;
        }
        let mut v = Vec::new();
        loop {
            self.ws();
            if self.eat(b')') {
                return Some(v);
            }
            if v.len() > MAX_NDIM {
                return None;
            }
            let start = self.i;
            while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                self.i += 1;
            }
            if start == self.i || self.i - start > 19 {
                return None;
            }
            let n: u64 = std::str::from_utf8(&self.s[start..self.i])
                .ok()?
                .parse()
                .ok()?;
            v.push(usize::try_from(n).ok()?);
            self.ws();
            if !self.eat(b',') {
                self.ws();
                if self.eat(b')') {
                    return Some(v);
                }
                return None;
            }
        }
    }
}

/// Reads a whole file, refusing files larger than `limit` bytes (checked before reading).
pub fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path).map_err(|e| ImportError::io(path, e))?;
    let len = f.metadata().map_err(|e| ImportError::io(path, e))?.len();
    if len > limit {
        return Err(ImportError::invalid_file(
            path,
            format!("file of {len} bytes exceeds the limit of {limit}"),
        ));
    }
    let mut buf = Vec::with_capacity(len as usize);
    f.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|e| ImportError::io(path, e))?;
    Ok(buf)
}

/// Reads one `.npy` file.
pub fn read_npy(path: &Path) -> Result<IntArray> {
    let bytes = read_bounded(path, MAX_ARRAY_BYTES + MAX_HEADER as u64 + 16)?;
    parse_npy(&bytes).map_err(|m| ImportError::invalid_file(path, m))
}

/// Reads every `<name>.npy` member of an `.npz`, in archive order. Member names without the
/// `.npy` suffix, directories, duplicates and oversized members are errors.
pub fn read_npz(path: &Path) -> Result<Vec<(String, IntArray)>> {
    let mut out = Vec::new();
    for_each_npz(path, |name, arr| {
        out.push((name, arr));
        Ok(())
    })?;
    Ok(out)
}

/// Calls `f(name, array)` for every `<name>.npy` member of an `.npz`, one member in memory at a
/// time, in archive order.
pub fn for_each_npz(path: &Path, mut f: impl FnMut(String, IntArray) -> Result<()>) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| ImportError::io(path, e))?;
    let mut z = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| ImportError::invalid_file(path, format!("not a valid .npz (zip): {e}")))?;
    if z.len() > MAX_NPZ_MEMBERS {
        return Err(ImportError::invalid_file(
            path,
            format!("{} members exceed the limit of {MAX_NPZ_MEMBERS}", z.len()),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for i in 0..z.len() {
        let mut m = z
            .by_index(i)
            .map_err(|e| ImportError::invalid_file(path, format!("member {i}: {e}")))?;
        let name = m
            .name()
            .map_err(|e| ImportError::invalid_file(path, format!("member {i}: {e}")))?
            .into_owned();
        let rec = format!("member {name:?}");
        let key = name
            .strip_suffix(".npy")
            .filter(|k| !k.is_empty() && !m.is_dir())
            .ok_or_else(|| ImportError::invalid(path, &rec, "not an .npy member"))?
            .to_string();
        if !seen.insert(key.clone()) {
            return Err(ImportError::invalid(path, &rec, "duplicate member"));
        }
        let limit = MAX_ARRAY_BYTES + MAX_HEADER as u64 + 16;
        if m.size() > limit {
            return Err(ImportError::invalid(
                path,
                &rec,
                format!("{} bytes exceed the limit of {limit}", m.size()),
            ));
        }
        let mut buf = Vec::with_capacity(m.size().min(1 << 26) as usize);
        (&mut m)
            .take(limit + 1)
            .read_to_end(&mut buf)
            .map_err(|e| ImportError::invalid(path, &rec, format!("cannot read: {e}")))?;
        drop(m);
        let arr = parse_npy(&buf).map_err(|msg| ImportError::invalid(path, &rec, msg))?;
        drop(buf);
        f(key, arr)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn npy_bytes(descr: &str, shape: &[usize], payload: &[u8]) -> Vec<u8> {
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        let shape_s = if shape.len() == 1 {
            format!("({},)", dims[0])
        } else {
            format!("({})", dims.join(", "))
        };
        let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_s}, }}");
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(h.len() as u16).to_le_bytes());
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn i32s(v: &[i32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let base = npy_bytes("<i4", &[2, 2], &i32s(&[1, 2, 3, 4]));
        let mut x: u64 = 99;
        for _ in 0..5000 {
            let mut b = base.clone();
            for _ in 0..(x % 4 + 1) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let i = (x >> 33) as usize % b.len();
                b[i] = (x >> 17) as u8;
            }
            let cut = (x >> 40) as usize % (b.len() + 1);
            let _ = parse_npy(&b[..cut]);
            let _ = parse_npy(&b);
        }
    }

    #[test]
    fn parses_int32_3d() {
        let b = npy_bytes("<i4", &[2, 1, 2], &i32s(&[1, -1, 3, 70000]));
        let a = parse_npy(&b).unwrap();
        assert_eq!(a.shape, vec![2, 1, 2]);
        assert_eq!(a.data, vec![1, -1, 3, 70000]);
    }

    #[test]
    fn parses_other_widths_and_scalar_shapes() {
        let b = npy_bytes("<i8", &[1], &(-5i64).to_le_bytes());
        assert_eq!(parse_npy(&b).unwrap().data, vec![-5]);
        let b = npy_bytes("<i2", &[2], &[1, 0, 0xff, 0xff]);
        assert_eq!(parse_npy(&b).unwrap().data, vec![1, -1]);
        let b = npy_bytes("<i4", &[0, 3, 2], &[]);
        assert_eq!(parse_npy(&b).unwrap().shape, vec![0, 3, 2]);
    }

    #[test]
    fn rejects_truncated_overlong_and_odd_headers() {
        let full = npy_bytes("<i4", &[2, 2], &i32s(&[1, 2, 3, 4]));
        for cut in [0, 5, 9, 20, full.len() - 1, full.len() - 4] {
            let e = parse_npy(&full[..cut]).unwrap_err();
            assert!(e.contains("truncated") || e.contains("magic"), "{cut}: {e}");
        }
        let mut long = full.clone();
        long.push(0);
        assert!(parse_npy(&long).unwrap_err().contains("trailing"));
        for (descr, needle) in [(">i4", "dtype"), ("<f4", "dtype"), ("<u4", "dtype")] {
            let b = npy_bytes(descr, &[1], &[0, 0, 0, 0]);
            assert!(parse_npy(&b).unwrap_err().contains(needle), "{descr}");
        }
        let mut f = npy_bytes("<i4", &[1], &[0; 4]);
        let at = f.windows(5).position(|w| w == b"False").unwrap();
        f[at..at + 5].copy_from_slice(b"True ");
        assert!(parse_npy(&f).unwrap_err().contains("Fortran"));
        // Absurd shape: overflow is caught before any allocation.
        let b = npy_bytes("<i8", &[usize::MAX / 2, 4], &[]);
        assert!(parse_npy(&b).unwrap_err().contains("overflow"));
        let b = npy_bytes("<i4", &[1 << 40], &[]);
        assert!(parse_npy(&b).unwrap_err().contains("limit"));
    }
}
