//! Read-only memory maps of checkpoint files (`memmap2`), behind a safe type.
//!
//! Why `Mmap::map` is `unsafe`: the mapped bytes are shared with the file, so if another process
//! truncates or rewrites the file while it is mapped, reads may see changed bytes or fault
//! (SIGBUS). Safety argument: moe-xray maps only model checkpoints, read-only and privately, and
//! — like every mmap-based loader (safetensors, candle, llama.cpp) — requires that they are not
//! modified while a model is loaded (stated in docs/DESIGN.md's crate table). The bytes are only read as plain data (integers and floats, no
//! invalid bit patterns), so changed bytes give wrong numbers, not undefined behaviour in Rust
//! code; a truncated file ends the process with SIGBUS.

use std::fs::File;
use std::ops::Range;

/// A read-only memory map of a whole file.
#[derive(Debug)]
pub struct ReadOnlyMap {
    map: memmap2::Mmap,
}

impl ReadOnlyMap {
    /// Maps `file` read-only. The file must not be modified while the map exists (see the
    /// module docs).
    pub fn map(file: &File) -> std::io::Result<Self> {
        // SAFETY: read-only, private mapping of a checkpoint that, by the documented contract
        // of this module, no process modifies while it is mapped; the bytes are read as plain
        // data only.
        let map = unsafe { memmap2::Mmap::map(file) }?;
        Ok(ReadOnlyMap { map })
    }

    /// The mapped bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Asks the kernel to read `range` ahead (it will be needed soon). Failures and
    /// out-of-range requests are ignored: only speed is affected.
    pub fn will_need(&self, range: Range<usize>) {
        if range.start >= range.end || range.end > self.map.len() {
            return;
        }
        #[cfg(unix)]
        {
            let _ = self.map.advise_range(
                memmap2::Advice::WillNeed,
                range.start,
                range.end - range.start,
            );
        }
    }

    /// Releases the resident pages of `range` (they are read again from the file if touched),
    /// so that a copied-out tensor does not occupy memory twice. Out-of-range requests and
    /// failures are ignored: only memory use is affected.
    pub fn release(&self, range: Range<usize>) {
        if range.start >= range.end || range.end > self.map.len() {
            return;
        }
        #[cfg(unix)]
        {
            // SAFETY: the mapping is private and read-only, so MADV_DONTNEED cannot lose data:
            // dropped pages are faulted in again from the file on the next access; no reference
            // into the range observes anything but the same file bytes. The range is inside
            // the map (checked above).
            let _ = unsafe {
                self.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    range.start,
                    range.end - range.start,
                )
            };
        }
    }
}

impl std::ops::Deref for ReadOnlyMap {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn maps_and_releases_pages_without_changing_bytes() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..3 * 4096).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        f.flush().unwrap();
        let m = ReadOnlyMap::map(f.as_file()).unwrap();
        assert_eq!(m.bytes(), &data[..]);
        m.will_need(0..8192);
        m.release(4096..8192);
        m.release(0..usize::MAX); // out of range: ignored
        assert_eq!(&m[..], &data[..]);
    }
}
