//! The result cache of the weight-space analyses: results keyed by a hash of the weights they
//! read and of every setting, stored in the user cache folder, so reopening a model shows them at
//! once. A missing, unreadable or stale entry is simply recomputed; writes are atomic
//! (temporary file, then rename) and a failed write only costs the cache.

use std::hash::Hasher;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::lora::Linear;
use crate::model::Weight;

/// The cache folder: `$TUNELENS_CACHE_DIR`, else `$XDG_CACHE_HOME/tunelens`, else
/// `~/.cache/tunelens`; `None` when none can be determined.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("TUNELENS_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(dir).join("tunelens"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache").join("tunelens"))
}

/// A 128-bit content hash built from tensors and settings.
#[derive(Debug)]
pub struct KeyBuilder {
    a: std::hash::DefaultHasher,
    b: std::hash::DefaultHasher,
}

impl Default for KeyBuilder {
    fn default() -> Self {
        let mut b = std::hash::DefaultHasher::new();
        b.write_u64(0x7475_6e65_6c65_6e73);
        Self {
            a: std::hash::DefaultHasher::new(),
            b,
        }
    }
}

impl KeyBuilder {
    /// Adds bytes.
    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        self.a.write(bytes);
        self.b.write(bytes);
        self
    }

    /// Adds a string (length-prefixed).
    pub fn text(&mut self, text: &str) -> &mut Self {
        self.bytes(&(text.len() as u64).to_le_bytes())
            .bytes(text.as_bytes())
    }

    /// Adds a tensor's shape and values (as f32 on the CPU).
    pub fn tensor(&mut self, t: &Tensor) -> Result<&mut Self> {
        for &d in t.dims() {
            self.bytes(&(d as u64).to_le_bytes());
        }
        let values = t
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut buf = Vec::with_capacity(4 * 16_384);
        for chunk in values.chunks(16_384) {
            buf.clear();
            buf.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
            self.bytes(&buf);
        }
        Ok(self)
    }

    /// Adds a weight matrix's shape and values, the same bytes whether it is dense or kept as
    /// stored (packed rows are expanded a block of rows at a time).
    pub fn weight(&mut self, w: &Weight) -> Result<&mut Self> {
        let Weight::Packed(p) = w else {
            return self.tensor(&w.dense()?);
        };
        let (rows, cols) = p.dims();
        for d in [rows, cols] {
            self.bytes(&(d as u64).to_le_bytes());
        }
        let mut buf = Vec::new();
        for r0 in (0..rows).step_by(256) {
            let values = p.expand_rows(r0, (r0 + 256).min(rows))?;
            buf.clear();
            buf.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            self.bytes(&buf);
        }
        Ok(self)
    }

    /// Adds a linear layer as the analyses read it: its base weight and, when an adapter is
    /// attached, the adapter's `A`, `B` and scale (so "base + adapter" never hits the base's
    /// entry, and two adapters never share one).
    pub fn linear(&mut self, linear: &Linear) -> Result<&mut Self> {
        self.weight(&linear.weight)?;
        match &linear.lora {
            None => {
                self.text("no adapter");
            }
            Some(lora) => {
                self.text("adapter").bytes(&lora.scale.to_le_bytes());
                self.tensor(&lora.a)?.tensor(&lora.b)?;
            }
        }
        Ok(self)
    }

    /// The key, as 32 hex digits.
    pub fn finish(&self) -> String {
        format!("{:016x}{:016x}", self.a.finish(), self.b.finish())
    }
}

/// Path of an entry: `<dir>/<kind>-<key>.<ext>`.
pub fn entry_path(dir: &Path, kind: &str, key: &str, ext: &str) -> PathBuf {
    dir.join(format!("{kind}-{key}.{ext}"))
}

/// Reads a JSON entry; `None` when absent or unreadable (a stale format is not an error).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Option<T> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(value) => Some(value),
        Err(err) => {
            log::warn!("ignoring unreadable cache entry {}: {err}", path.display());
            None
        }
    }
}

/// Writes bytes atomically: a temporary file in the same folder, then a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir).map_err(|err| Error::bad_file(dir, err))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if let Err(err) = std::fs::write(&tmp, bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::bad_file(&tmp, err));
    }
    std::fs::rename(&tmp, path).map_err(|err| {
        let _ = std::fs::remove_file(&tmp);
        Error::bad_file(path, err)
    })
}

/// Writes a JSON entry atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    write_atomic(path, &serde_json::to_vec(value)?)
}

/// Reads raw little-endian f32 values; `None` when absent or not a whole number of values.
pub fn read_f32s(path: &Path) -> Option<Vec<f32>> {
    let bytes = std::fs::read(path).ok()?;
    if bytes.len() % 4 != 0 {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

/// Writes raw little-endian f32 values atomically.
pub fn write_f32s(path: &Path, values: &[f32]) -> Result<()> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_change_with_values_and_settings() -> Result<()> {
        let t = Tensor::from_slice(&[1f32, 2.0, 3.0], 3, &Device::Cpu)?;
        let u = Tensor::from_slice(&[1f32, 2.0, 3.5], 3, &Device::Cpu)?;
        let key = |t: &Tensor, s: &str| -> Result<String> {
            Ok(KeyBuilder::default().tensor(t)?.text(s).finish())
        };
        assert_eq!(key(&t, "k=50")?, key(&t, "k=50")?);
        assert_ne!(key(&t, "k=50")?, key(&u, "k=50")?);
        assert_ne!(key(&t, "k=50")?, key(&t, "k=51")?);
        assert_eq!(key(&t, "")?.len(), 32);
        Ok(())
    }

    #[test]
    fn entries_round_trip_and_bad_ones_are_ignored() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = entry_path(dir.path(), "concepts", "abc", "json");
        write_json(&path, &vec![1.5f64, 2.0])?;
        assert_eq!(read_json::<Vec<f64>>(&path), Some(vec![1.5, 2.0]));
        std::fs::write(&path, "{truncated")?;
        assert_eq!(read_json::<Vec<f64>>(&path), None);
        let raw = entry_path(dir.path(), "concepts", "abc", "f32");
        write_f32s(&raw, &[1.0, -2.5])?;
        assert_eq!(read_f32s(&raw), Some(vec![1.0, -2.5]));
        std::fs::write(&raw, [0u8; 3])?;
        assert_eq!(read_f32s(&raw), None);
        for entry in std::fs::read_dir(dir.path())? {
            assert!(!entry?.file_name().to_string_lossy().contains("tmp"));
        }
        Ok(())
    }
}
