//! Validated `.safetensors` reading: header-only scans and memory-mapped tensor access.
//!
//! Everything read from the file is treated as hostile: the header length is capped, the JSON
//! must parse, every tensor's byte range must sit inside the data area, match its dtype × shape
//! and not overlap another tensor. Pickle/zip formats (`.ckpt`, `.pt`, `.pth`, `.bin`) are refused
//! outright because loading them can execute code.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::{EngineError, Result};

/// Largest header we accept. Real checkpoints have headers of a few hundred KB.
pub const MAX_HEADER_LEN: u64 = 100 * 1024 * 1024;

/// Element types a safetensors file may declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F16,
    Bf16,
    F32,
    F64,
    F8E4M3,
    F8E5M2,
}

impl Dtype {
    fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "BOOL" => Dtype::Bool,
            "U8" => Dtype::U8,
            "I8" => Dtype::I8,
            "I16" => Dtype::I16,
            "U16" => Dtype::U16,
            "I32" => Dtype::I32,
            "U32" => Dtype::U32,
            "I64" => Dtype::I64,
            "U64" => Dtype::U64,
            "F16" => Dtype::F16,
            "BF16" => Dtype::Bf16,
            "F32" => Dtype::F32,
            "F64" => Dtype::F64,
            "F8_E4M3" => Dtype::F8E4M3,
            "F8_E5M2" => Dtype::F8E5M2,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
            Dtype::F16 => "F16",
            Dtype::Bf16 => "BF16",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E4M3 | Dtype::F8E5M2 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::U64 | Dtype::F64 => 8,
        }
    }
}

/// One tensor's entry in the header. `data_offsets` are relative to the data area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data_offsets: (usize, usize),
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parsed, validated safetensors header.
#[derive(Debug, Clone, Default)]
pub struct Header {
    pub tensors: BTreeMap<String, TensorInfo>,
    /// The optional `__metadata__` string map.
    pub metadata: BTreeMap<String, String>,
    /// Absolute file offset where the data area starts (8 + header length).
    pub data_start: usize,
}

impl Header {
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Tensor names starting with `prefix`, in sorted order.
    pub fn names_with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.tensors
            .range(prefix.to_string()..)
            .map(|(k, _)| k.as_str())
            .take_while(move |k| k.starts_with(prefix))
    }

    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.names_with_prefix(prefix).next().is_some()
    }

    /// Shape of `name`, or an error naming the missing tensor.
    pub fn require_shape(&self, name: &str) -> Result<&[usize]> {
        self.shape(name)
            .ok_or_else(|| EngineError::UnknownModel(format!("missing tensor {name}")))
    }
}

fn invalid(msg: impl Into<String>) -> EngineError {
    EngineError::InvalidSafetensors(msg.into())
}

/// Refuse formats that can run code when loaded, judged by extension first.
fn check_extension(path: &Path) -> Result<()> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    if let Some(ext) = ext {
        if matches!(
            ext.as_str(),
            "ckpt" | "pt" | "pth" | "bin" | "pkl" | "pickle"
        ) {
            return Err(EngineError::UnsafeFormat(format!(
                "{}: .{ext} files are PyTorch pickles, which can run arbitrary code when loaded; \
                 only .safetensors is supported (convert the file to safetensors first)",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Refuse by content: zip archives (`torch.save` since 1.6) and raw pickles.
fn check_magic(path: &Path, first: &[u8]) -> Result<()> {
    // A safetensors header length can also start with 0x80 (e.g. 640 bytes), but then byte 8
    // opens the JSON header; a pickle never has `{` there in practice.
    let looks_safetensors = first.len() >= 9 && first[8] == b'{';
    let what = if first.starts_with(b"PK\x03\x04") {
        Some("a zip archive (PyTorch checkpoint)")
    } else if !looks_safetensors
        && first.len() >= 2
        && first[0] == 0x80
        && (1..=5).contains(&first[1])
    {
        Some("a Python pickle")
    } else {
        None
    };
    match what {
        Some(what) => Err(EngineError::UnsafeFormat(format!(
            "{} is {what}, which can run arbitrary code when loaded; only .safetensors is supported",
            path.display()
        ))),
        None => Ok(()),
    }
}

/// Parse and validate a header given the file's first `8 + n` bytes (at least) and its length.
pub fn parse_header(bytes: &[u8], file_len: u64) -> Result<Header> {
    if bytes.len() < 8 || file_len < 8 {
        return Err(invalid("file is shorter than the 8-byte header length"));
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&bytes[..8]);
    let n = u64::from_le_bytes(len_bytes);
    if n > MAX_HEADER_LEN {
        return Err(invalid(format!(
            "header length {n} exceeds the {MAX_HEADER_LEN}-byte cap"
        )));
    }
    if n < 2 || 8 + n > file_len {
        return Err(invalid(format!(
            "header length {n} does not fit in a {file_len}-byte file"
        )));
    }
    // n <= 100 MB, so it fits in usize everywhere we run.
    let n = n as usize;
    let json = bytes
        .get(8..8 + n)
        .ok_or_else(|| invalid("header is truncated"))?;
    let value: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| invalid(format!("header is not JSON: {e}")))?;
    let obj = value
        .as_object()
        .ok_or_else(|| invalid("header is not a JSON object"))?;

    let data_start = 8 + n;
    let data_len = (file_len - data_start as u64) as usize;
    let mut header = Header {
        data_start,
        ..Header::default()
    };
    for (name, entry) in obj {
        if name == "__metadata__" {
            let meta = entry
                .as_object()
                .ok_or_else(|| invalid("__metadata__ is not an object"))?;
            for (k, v) in meta {
                let v = v.as_str().ok_or_else(|| {
                    invalid(format!("__metadata__ value for {k:?} is not a string"))
                })?;
                header.metadata.insert(k.clone(), v.to_string());
            }
            continue;
        }
        let info = parse_entry(name, entry)?;
        let (start, end) = info.data_offsets;
        if start > end || end > data_len {
            return Err(invalid(format!(
                "tensor {name:?}: offsets {start}..{end} outside the {data_len}-byte data area"
            )));
        }
        let expected = info
            .shape
            .iter()
            .try_fold(info.dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| invalid(format!("tensor {name:?}: shape overflows")))?;
        if end - start != expected {
            return Err(invalid(format!(
                "tensor {name:?}: {} bytes for {:?} {:?} (expected {expected})",
                end - start,
                info.dtype.as_str(),
                info.shape
            )));
        }
        header.tensors.insert(name.clone(), info);
    }

    // Overlap check: sort non-empty ranges by start; each must begin at or after the previous end.
    let mut ranges: Vec<(usize, usize, &str)> = header
        .tensors
        .iter()
        .filter(|(_, t)| t.data_offsets.1 > t.data_offsets.0)
        .map(|(k, t)| (t.data_offsets.0, t.data_offsets.1, k.as_str()))
        .collect();
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(invalid(format!(
                "tensors {:?} and {:?} overlap",
                w[0].2, w[1].2
            )));
        }
    }
    Ok(header)
}

fn parse_entry(name: &str, entry: &serde_json::Value) -> Result<TensorInfo> {
    let bad = |what: &str| invalid(format!("tensor {name:?}: {what}"));
    let obj = entry
        .as_object()
        .ok_or_else(|| bad("entry is not an object"))?;
    let dtype_s = obj
        .get("dtype")
        .and_then(|d| d.as_str())
        .ok_or_else(|| bad("missing dtype"))?;
    let dtype = Dtype::parse(dtype_s).ok_or_else(|| bad(&format!("unknown dtype {dtype_s:?}")))?;
    let shape = obj
        .get("shape")
        .and_then(|s| s.as_array())
        .ok_or_else(|| bad("missing shape"))?
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| bad("shape is not a list of non-negative integers"))?;
    let offs = obj
        .get("data_offsets")
        .and_then(|s| s.as_array())
        .ok_or_else(|| bad("missing data_offsets"))?;
    if offs.len() != 2 {
        return Err(bad("data_offsets must have two entries"));
    }
    let off = |i: usize| {
        offs[i]
            .as_u64()
            .and_then(|d| usize::try_from(d).ok())
            .ok_or_else(|| bad("data_offsets are not non-negative integers"))
    };
    Ok(TensorInfo {
        dtype,
        shape,
        data_offsets: (off(0)?, off(1)?),
    })
}

/// Read and validate only the header (cheap; used for model scanning).
pub fn read_header(path: &Path) -> Result<Header> {
    check_extension(path)?;
    let mut f = File::open(path)?;
    let file_len = f.metadata()?.len();
    let mut first = [0u8; 9];
    let mut got = 0;
    while got < 9 {
        let n = f.read(&mut first[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    check_magic(path, &first[..got])?;
    if got < 8 {
        return Err(invalid("file is shorter than the 8-byte header length"));
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&first[..8]);
    let n = u64::from_le_bytes(len_bytes);
    if !(2..=MAX_HEADER_LEN).contains(&n) || 8 + n > file_len {
        // Let parse_header phrase the error.
        return parse_header(&first[..8], file_len);
    }
    let mut buf = vec![0u8; 8 + n as usize];
    buf[..got].copy_from_slice(&first[..got]);
    f.read_exact(&mut buf[got..])
        .map_err(|e| invalid(format!("header is truncated: {e}")))?;
    parse_header(&buf, file_len)
}

/// A validated, memory-mapped safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    header: Header,
    mmap: memmap2::Mmap,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.header.tensors.len())
            .finish()
    }
}

/// Open and validate a safetensors file, memory-mapping its contents.
pub fn open(path: &Path) -> Result<SafetensorsFile> {
    check_extension(path)?;
    let file = File::open(path)?;
    // SAFETY: the mapping is read-only. If another process truncates the file while it is
    // mapped, reads could fault; that is the accepted trade-off of mmap-based loading (the
    // model library only hands us files it owns).
    let mmap = unsafe { memmap2::Mmap::map(&file)? };
    check_magic(path, &mmap[..mmap.len().min(9)])?;
    let header = parse_header(&mmap, mmap.len() as u64)?;
    Ok(SafetensorsFile {
        path: path.to_path_buf(),
        header,
        mmap,
    })
}

impl SafetensorsFile {
    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Raw little-endian bytes of a tensor.
    pub fn raw(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        let info = self
            .header
            .get(name)
            .ok_or_else(|| EngineError::UnknownModel(format!("missing tensor {name}")))?;
        let (s, e) = info.data_offsets;
        let start = self.header.data_start + s;
        let end = self.header.data_start + e;
        // Validated at open; `get` keeps this panic-free regardless.
        let bytes = self
            .mmap
            .get(start..end)
            .ok_or_else(|| invalid(format!("tensor {name:?} outside the file")))?;
        Ok((info, bytes))
    }

    /// A tensor as f32 on the CPU (f16/bf16/f64/integers converted).
    pub fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        let (data, shape) = self.values_f32(name)?;
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
    }

    /// [`SafetensorsFile::tensor_f32`] as a plain vector and its shape (for callers that
    /// modify the values before building a tensor, e.g. LoRA patching).
    pub fn values_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let (info, bytes) = self.raw(name)?;
        let data = bytes_to_f32(info.dtype, bytes).ok_or_else(|| {
            invalid(format!(
                "tensor {name:?}: dtype {} is not numeric",
                info.dtype.as_str()
            ))
        })?;
        self.release(info);
        Ok((data, info.shape.clone()))
    }

    /// Tell the kernel we no longer need these pages, so converting a checkpoint to f32 does
    /// not also keep the whole file resident (that would double peak RSS while loading).
    fn release(&self, info: &TensorInfo) {
        #[cfg(unix)]
        {
            let start = self.header.data_start + info.data_offsets.0;
            let len = info.data_offsets.1 - info.data_offsets.0;
            if len >= 1 << 20 {
                // SAFETY: the mapping is a private read-only file mapping; MADV_DONTNEED only
                // drops cached pages, which are re-read from the file on the next access.
                let _ = unsafe {
                    self.mmap
                        .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len)
                };
            }
        }
        #[cfg(not(unix))]
        let _ = info;
    }

    /// A `VarBuilder` over the whole file yielding f32 CPU tensors.
    pub fn var_builder(&self) -> VarBuilder<'_> {
        VarBuilder::from_backend(
            Box::new(FileBackend { file: self }),
            DType::F32,
            Device::Cpu,
        )
    }
}

/// Convert little-endian bytes of any numeric dtype to f32.
pub fn bytes_to_f32(dtype: Dtype, b: &[u8]) -> Option<Vec<f32>> {
    fn conv<const N: usize>(b: &[u8], f: impl Fn([u8; N]) -> f32) -> Vec<f32> {
        b.chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                f(a)
            })
            .collect()
    }
    Some(match dtype {
        Dtype::F32 => conv::<4>(b, f32::from_le_bytes),
        Dtype::F16 => conv::<2>(b, |a| half::f16::from_le_bytes(a).to_f32()),
        Dtype::Bf16 => conv::<2>(b, |a| half::bf16::from_le_bytes(a).to_f32()),
        Dtype::F64 => conv::<8>(b, |a| f64::from_le_bytes(a) as f32),
        Dtype::I64 => conv::<8>(b, |a| i64::from_le_bytes(a) as f32),
        Dtype::U64 => conv::<8>(b, |a| u64::from_le_bytes(a) as f32),
        Dtype::I32 => conv::<4>(b, |a| i32::from_le_bytes(a) as f32),
        Dtype::U32 => conv::<4>(b, |a| u32::from_le_bytes(a) as f32),
        Dtype::I16 => conv::<2>(b, |a| i16::from_le_bytes(a) as f32),
        Dtype::U16 => conv::<2>(b, |a| u16::from_le_bytes(a) as f32),
        Dtype::I8 => b.iter().map(|&x| x as i8 as f32).collect(),
        Dtype::U8 | Dtype::Bool => b.iter().map(|&x| x as f32).collect(),
        Dtype::F8E4M3 | Dtype::F8E5M2 => return None,
    })
}

struct FileBackend<'a> {
    file: &'a SafetensorsFile,
}

fn to_candle(e: EngineError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl SimpleBackend for FileBackend<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!(
                "tensor {name}: checkpoint has shape {:?}, model expects {:?}",
                t.dims(),
                s.dims()
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.file.tensor_f32(name).map_err(to_candle)?;
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.file.header.contains(name)
    }
}

/// Serialise tensors into safetensors bytes (used by tiny checkpoints and tests).
/// `tensors` are (name, dtype, shape, little-endian bytes).
pub fn serialize(
    tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let m: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(m));
    }
    let mut offset = 0usize;
    for (name, dtype, shape, bytes) in tensors {
        let numel: usize = shape.iter().product();
        if numel * dtype.size() != bytes.len() {
            return Err(invalid(format!(
                "serialize: tensor {name:?} has the wrong byte length"
            )));
        }
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype.as_str(),
                "shape": shape,
                "data_offsets": [offset, offset + bytes.len()],
            }),
        );
        offset += bytes.len();
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header))
        .map_err(|e| invalid(e.to_string()))?;
    // Pad so the data area is 8-byte aligned, as the reference writer does.
    while (8 + json.len()) % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for (_, _, _, bytes) in tensors {
        out.extend_from_slice(bytes);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).expect("write");
        p
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn sample() -> Vec<u8> {
        let f16: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
        let bf16: Vec<u8> = [0.25f32, 3.0, -1.0]
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        serialize(
            &[
                (
                    "a".into(),
                    Dtype::F32,
                    vec![2, 2],
                    f32_bytes(&[1.0, 2.0, 3.0, 4.0]),
                ),
                ("b".into(), Dtype::F16, vec![2], f16),
                ("c".into(), Dtype::Bf16, vec![3, 1], bf16),
            ],
            &meta,
        )
        .expect("serialize")
    }

    #[test]
    fn roundtrip_and_convert() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write(dir.path(), "m.safetensors", &sample());
        let h = read_header(&p).expect("header");
        assert_eq!(h.tensors.len(), 3);
        assert_eq!(h.metadata.get("format").map(String::as_str), Some("pt"));
        assert_eq!(h.shape("c"), Some(&[3usize, 1][..]));
        let f = open(&p).expect("open");
        let a = f.tensor_f32("a").expect("a");
        assert_eq!(
            a.to_vec2::<f32>().expect("v"),
            vec![vec![1.0, 2.0], vec![3.0, 4.0]]
        );
        let b = f.tensor_f32("b").expect("b");
        assert_eq!(b.to_vec1::<f32>().expect("v"), vec![1.5, -2.0]);
        let c = f.tensor_f32("c").expect("c").flatten_all().expect("f");
        assert_eq!(c.to_vec1::<f32>().expect("v"), vec![0.25, 3.0, -1.0]);
        let vb = f.var_builder();
        assert!(vb.get((2, 2), "a").is_ok());
        assert!(vb.get((4,), "a").is_err(), "shape mismatch must fail");
        assert!(vb.get((2,), "missing").is_err());
    }

    #[test]
    fn truncated_file_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let full = sample();
        for cut in [0, 3, 8, 20, full.len() - 1] {
            let p = write(dir.path(), &format!("t{cut}.safetensors"), &full[..cut]);
            assert!(
                matches!(read_header(&p), Err(EngineError::InvalidSafetensors(_))),
                "cut {cut}"
            );
            assert!(
                matches!(open(&p), Err(EngineError::InvalidSafetensors(_))),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn bad_header_length_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut bytes = sample();
        bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        let p = write(dir.path(), "huge.safetensors", &bytes);
        assert!(matches!(
            read_header(&p),
            Err(EngineError::InvalidSafetensors(_))
        ));
        assert!(matches!(open(&p), Err(EngineError::InvalidSafetensors(_))));
        let mut bytes = sample();
        bytes[..8].copy_from_slice(&(MAX_HEADER_LEN + 1).to_le_bytes());
        let p = write(dir.path(), "cap.safetensors", &bytes);
        assert!(matches!(
            read_header(&p),
            Err(EngineError::InvalidSafetensors(_))
        ));
        // Not JSON.
        let mut bad = 4u64.to_le_bytes().to_vec();
        bad.extend_from_slice(b"{{{{");
        let p = write(dir.path(), "json.safetensors", &bad);
        assert!(matches!(
            read_header(&p),
            Err(EngineError::InvalidSafetensors(_))
        ));
    }

    fn with_header(json: &str, data_len: usize) -> Vec<u8> {
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v.extend(std::iter::repeat_n(0u8, data_len));
        v
    }

    #[test]
    fn overlapping_and_bad_offsets_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let overlap = r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                          "y":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
        let p = write(dir.path(), "o.safetensors", &with_header(overlap, 12));
        let e = open(&p).expect_err("overlap");
        assert!(e.to_string().contains("overlap"), "{e}");
        let outside = r#"{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        let p = write(dir.path(), "out.safetensors", &with_header(outside, 8));
        assert!(matches!(open(&p), Err(EngineError::InvalidSafetensors(_))));
        let wrong_len = r#"{"x":{"dtype":"F16","shape":[3],"data_offsets":[0,8]}}"#;
        let p = write(dir.path(), "len.safetensors", &with_header(wrong_len, 8));
        assert!(matches!(open(&p), Err(EngineError::InvalidSafetensors(_))));
        let dtype = r#"{"x":{"dtype":"Q4","shape":[2],"data_offsets":[0,2]}}"#;
        let p = write(dir.path(), "dt.safetensors", &with_header(dtype, 2));
        assert!(matches!(open(&p), Err(EngineError::InvalidSafetensors(_))));
        let overflow =
            r#"{"x":{"dtype":"F32","shape":[18446744073709551615,4],"data_offsets":[0,2]}}"#;
        let p = write(dir.path(), "ovf.safetensors", &with_header(overflow, 2));
        assert!(matches!(open(&p), Err(EngineError::InvalidSafetensors(_))));
    }

    #[test]
    fn pickle_and_zip_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write(dir.path(), "model.ckpt", &sample());
        assert!(matches!(read_header(&p), Err(EngineError::UnsafeFormat(_))));
        assert!(matches!(open(&p), Err(EngineError::UnsafeFormat(_))));
        let p = write(dir.path(), "m.pt", b"PK\x03\x04rest");
        assert!(matches!(open(&p), Err(EngineError::UnsafeFormat(_))));
        // Content sniffing catches renamed pickles and zips.
        let p = write(
            dir.path(),
            "renamed.safetensors",
            b"\x80\x02}q\x00(X\x05\x00\x00\x00",
        );
        let e = read_header(&p).expect_err("pickle");
        assert!(matches!(e, EngineError::UnsafeFormat(_)));
        assert!(e.to_string().contains("pickle"), "{e}");
        let p = write(
            dir.path(),
            "zip.safetensors",
            b"PK\x03\x04\x14\x00\x00\x00\x08\x00",
        );
        assert!(matches!(open(&p), Err(EngineError::UnsafeFormat(_))));
    }
}
