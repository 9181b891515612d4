//! Safetensors files read tensor by tensor with positioned reads.
//!
//! Why not a memory map: the pages of a mapped file count in the process's resident memory as
//! soon as they are read, and stay counted while the mapping lives, so converting a mapped
//! checkpoint to f32 peaks at the converted model plus the whole file (1.5x for bf16, 2x for
//! f32). Reading each tensor into a buffer of its own size, converting it and dropping the
//! buffer keeps the peak at the final model plus one tensor: no double peak at load. Only the small JSON header is held for the life of the source.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};

/// Headers larger than this are refused as corrupt (real ones are kilobytes to a few MB).
const MAX_HEADER: u64 = 100 << 20;

#[derive(Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// Where one tensor lies.
#[derive(Clone, Debug)]
struct Place {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
}

/// `buf.len()` bytes of `file` from `offset`.
fn read_at(mut file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(buf)
}

/// One or more safetensors files (the shards of an index), opened, headers parsed.
pub struct TensorFiles {
    files: Vec<(PathBuf, File)>,
    places: BTreeMap<String, Place>,
}

fn dtype_of(name: &str) -> Option<DType> {
    Some(match name {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "U8" => DType::U8,
        "U32" => DType::U32,
        "I64" => DType::I64,
        _ => return None,
    })
}

impl TensorFiles {
    /// Opens `paths` and reads their headers; a missing, truncated or malformed file is named.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut places = BTreeMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(|err| match err.kind() {
                std::io::ErrorKind::NotFound => Error::NotFound { path: path.clone() },
                _ => Error::bad_file(path, format!("cannot read ({err})")),
            })?;
            let corrupt = |what: String| {
                Error::bad_file(path, format!("corrupt or truncated safetensors ({what})"))
            };
            let size = file
                .metadata()
                .map_err(|err| Error::bad_file(path, format!("cannot read ({err})")))?
                .len();
            let mut len = [0u8; 8];
            read_at(&file, &mut len, 0).map_err(|_| corrupt("no header".into()))?;
            let header_len = u64::from_le_bytes(len);
            if header_len > MAX_HEADER || 8 + header_len > size {
                return Err(corrupt(format!("header of {header_len} bytes")));
            }
            let mut header = vec![0u8; header_len as usize];
            read_at(&file, &mut header, 8).map_err(|err| corrupt(err.to_string()))?;
            let mut entries: BTreeMap<String, serde_json::Value> =
                serde_json::from_slice(&header).map_err(|err| corrupt(format!("header: {err}")))?;
            entries.remove("__metadata__");
            let data_start = 8 + header_len;
            for (name, value) in entries {
                let entry: Entry = serde_json::from_value(value)
                    .map_err(|err| corrupt(format!("tensor `{name}`: {err}")))?;
                let dtype = dtype_of(&entry.dtype).ok_or_else(|| {
                    Error::bad_file(
                        path,
                        format!("tensor `{name}` has the unsupported dtype {}", entry.dtype),
                    )
                })?;
                let (a, b) = entry.data_offsets;
                let bytes =
                    entry.shape.iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64;
                if b < a || b - a != bytes || data_start + b > size {
                    return Err(corrupt(format!(
                        "tensor `{name}`: bytes {a}..{b} of {} after the header",
                        size - data_start
                    )));
                }
                places.insert(
                    name,
                    Place {
                        file: i,
                        dtype,
                        shape: entry.shape,
                        start: data_start + a,
                        end: data_start + b,
                    },
                );
            }
            files.push((path.clone(), file));
        }
        Ok(Self { files, places })
    }

    /// Whether a tensor of this name is stored.
    pub fn contains(&self, name: &str) -> bool {
        self.places.contains_key(name)
    }

    /// The stored dtype of the first tensor (by name), for display.
    pub fn first_dtype(&self) -> Option<DType> {
        self.places.values().next().map(|p| p.dtype)
    }

    /// The stored dtype and shape of tensor `name`, when stored.
    pub fn describe(&self, name: &str) -> Option<(DType, &[usize])> {
        self.places.get(name).map(|p| (p.dtype, p.shape.as_slice()))
    }

    /// The stored bytes of tensor `name` (little-endian, row-major); `None` when not stored.
    pub fn read_bytes(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let Some(place) = self.places.get(name) else {
            return Ok(None);
        };
        let (path, file) = &self.files[place.file];
        let mut bytes = vec![0u8; (place.end - place.start) as usize];
        read_at(file, &mut bytes, place.start).map_err(|err| {
            Error::bad_file(path, format!("tensor `{name}`: cannot read ({err})"))
        })?;
        Ok(Some(bytes))
    }

    /// Reads tensor `name` onto the CPU in its stored dtype; `None` when it is not stored.
    pub fn read(&self, name: &str) -> Result<Option<Tensor>> {
        let Some(place) = self.places.get(name) else {
            return Ok(None);
        };
        let (path, _) = &self.files[place.file];
        let Some(bytes) = self.read_bytes(name)? else {
            return Ok(None);
        };
        let tensor = Tensor::from_raw_buffer(&bytes, place.dtype, &place.shape, &Device::Cpu)
            .map_err(|err| Error::bad_file(path, format!("tensor `{name}`: {err}")))?;
        Ok(Some(tensor))
    }

    /// A file of the set, for messages.
    pub fn path(&self) -> Option<&Path> {
        self.files.first().map(|f| f.0.as_path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, tensors: &[(&str, Tensor)]) -> PathBuf {
        let path = dir.join("model.safetensors");
        let map: Vec<(&str, Tensor)> = tensors.to_vec();
        candle_core::safetensors::save(&map.into_iter().collect(), &path).expect("save");
        path
    }

    #[test]
    fn reads_what_candle_wrote_in_every_float_dtype() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let base = Tensor::arange(0f32, 12.0, &Device::Cpu)?.reshape((3, 4))?;
        let tensors = [
            ("a", base.clone()),
            ("b", base.to_dtype(DType::BF16)?),
            ("c", base.to_dtype(DType::F16)?),
        ];
        let path = write(dir.path(), &tensors);
        let files = TensorFiles::open(&[path])?;
        for (name, t) in &tensors {
            let read = files.read(name)?.expect("stored");
            assert_eq!(read.dtype(), t.dtype());
            assert_eq!(read.dims(), &[3, 4]);
            let back = read.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(back, base.flatten_all()?.to_vec1::<f32>()?);
        }
        assert!(files.contains("b") && !files.contains("z"));
        assert!(files.read("z")?.is_none());
        Ok(())
    }

    #[test]
    fn corrupt_headers_and_short_data_are_named() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let t = Tensor::zeros((8, 8), DType::F32, &Device::Cpu)?;
        let path = write(dir.path(), &[("w", t)]);
        let bytes = std::fs::read(&path)?;
        let cases: [(&str, Vec<u8>); 3] = [
            ("truncated", bytes[..bytes.len() - 10].to_vec()),
            ("header", b"\xff\xff\xff\xff\xff\xff\xff\x7fxx".to_vec()),
            ("short", bytes[..4].to_vec()),
        ];
        for (what, content) in cases {
            std::fs::write(&path, content)?;
            let err = TensorFiles::open(std::slice::from_ref(&path))
                .err()
                .unwrap_or_else(|| panic!("{what} opens"))
                .to_string();
            assert!(err.contains("model.safetensors"), "{what}: {err}");
            assert!(err.contains("corrupt or truncated"), "{what}: {err}");
            assert_eq!(err.lines().count(), 1, "{what}: {err}");
        }
        Ok(())
    }
}
