//! GGUF files: header and metadata through candle's `gguf_file`, the resolved [`Config`] from
//! `llama.*` / `qwen2.*` keys, and tensors under their Hugging Face names.
//!
//! llama.cpp's converter renames tensors (`model.layers.0.self_attn.q_proj.weight` becomes
//! `blk.0.attn_q.weight`) and, for the `llama` architecture, permutes the rows of the q and k
//! projections so that RoPE rotates interleaved pairs. We undo both here, so the decoder (and
//! later LoRA adapters) see exactly the Hugging Face layout.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::{gguf_file, GgmlDType, QStorage, QTensor};
use candle_core::Device;

use crate::config::{Arch, Config, RopeScaling};
use crate::error::{ModelError, Result};

pub use gguf_file::Value;

/// An open GGUF file: its parsed header and a reader for tensor data.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: gguf_file::Content,
    reader: Mutex<BufReader<File>>,
    /// `general.architecture` (`llama`, `qwen2`, ...): the prefix of the model keys.
    pub architecture: String,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("architecture", &self.architecture)
            .finish()
    }
}

impl GgufFile {
    /// Opens and parses the header. A missing, truncated or non-GGUF file is an error naming it.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let file_len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
        let mut reader = BufReader::new(file);
        prescan(path, &mut reader, file_len)?;
        let content = gguf_file::Content::read(&mut reader)
            .map_err(|e| ModelError::format(path, format!("not a readable GGUF file: {e}")))?;
        let architecture = match content.metadata.get("general.architecture") {
            Some(Value::String(s)) => s.clone(),
            _ => "llama".to_string(),
        };
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
            reader: Mutex::new(reader),
            architecture,
        })
    }

    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn arch_key(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.architecture)
    }

    fn get_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(v) => value_to_u64(v).map(|x| Some(x as usize)).ok_or_else(|| {
                ModelError::format(
                    &self.path,
                    format!("metadata `{key}` is not an integer: {v:?}"),
                )
            }),
        }
    }

    fn require_usize(&self, key: &str) -> Result<usize> {
        self.get_usize(key)?.ok_or_else(|| {
            ModelError::format(&self.path, format!("metadata key `{key}` is missing"))
        })
    }

    fn get_f64(&self, key: &str) -> Option<f64> {
        match self.metadata(key)? {
            Value::F32(x) => Some(*x as f64),
            Value::F64(x) => Some(*x),
            v => value_to_u64(v).map(|x| x as f64),
        }
    }

    pub fn get_string(&self, key: &str) -> Option<&str> {
        match self.metadata(key)? {
            Value::String(s) => Some(s.as_str()),
            _ => None,
        }
    }

    pub fn has_tensor(&self, gguf_name: &str) -> bool {
        self.content.tensor_infos.contains_key(gguf_name)
    }

    /// The resolved decoder configuration from `<arch>.*` metadata.
    pub fn config(&self) -> Result<Config> {
        let arch = Arch::from_model_type(&self.architecture).ok_or_else(|| {
            ModelError::format(
                &self.path,
                format!(
                    "unsupported general.architecture {:?} (supported: llama, mistral, qwen2)",
                    self.architecture
                ),
            )
        })?;
        let hidden_size = self.require_usize(&self.arch_key("embedding_length"))?;
        let num_heads = self.require_usize(&self.arch_key("attention.head_count"))?;
        if num_heads == 0 {
            return Err(ModelError::format(&self.path, "attention.head_count is 0"));
        }
        let num_kv = self
            .get_usize(&self.arch_key("attention.head_count_kv"))?
            .unwrap_or(num_heads);
        if num_kv == 0 || !num_heads.is_multiple_of(num_kv) {
            return Err(ModelError::format(
                &self.path,
                format!(
                    "metadata `{}` is {num_kv}; it must divide attention.head_count {num_heads}",
                    self.arch_key("attention.head_count_kv")
                ),
            ));
        }
        let head_dim = self
            .get_usize(&self.arch_key("attention.key_length"))?
            .or(self.get_usize(&self.arch_key("rope.dimension_count"))?)
            .unwrap_or(hidden_size / num_heads);
        let vocab_size = match self.get_usize(&self.arch_key("vocab_size"))? {
            Some(v) => v,
            None => match self.metadata("tokenizer.ggml.tokens") {
                Some(Value::Array(a)) => a.len(),
                _ => match self.content.tensor_infos.get("token_embd.weight") {
                    Some(info) if !info.shape.dims().is_empty() => info.shape.dims()[0],
                    _ => {
                        return Err(ModelError::format(
                            &self.path,
                            "cannot tell the vocabulary size",
                        ))
                    }
                },
            },
        };
        let rope_scaling = if self.has_tensor("rope_freqs.weight") {
            let t = self.qtensor_raw("rope_freqs.weight")?;
            let v = t
                .dequantize(&Device::Cpu)
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                .map_err(|e| {
                    ModelError::format(&self.path, format!("tensor `rope_freqs.weight`: {e}"))
                })?;
            Some(RopeScaling::Factors(v))
        } else {
            None
        };
        let eos = self
            .get_usize("tokenizer.ggml.eos_token_id")?
            .map(|x| x as u32);
        let eot = self
            .get_usize("tokenizer.ggml.eot_token_id")?
            .map(|x| x as u32);
        let mut eos_token_ids: Vec<u32> = eos.into_iter().collect();
        if let Some(e) = eot {
            if !eos_token_ids.contains(&e) {
                eos_token_ids.push(e);
            }
        }
        let cfg = Config {
            arch,
            hidden_size,
            intermediate_size: self.require_usize(&self.arch_key("feed_forward_length"))?,
            num_hidden_layers: self.require_usize(&self.arch_key("block_count"))?,
            num_attention_heads: num_heads,
            num_key_value_heads: num_kv,
            head_dim,
            vocab_size,
            rms_norm_eps: self
                .get_f64(&self.arch_key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            rope_theta: self
                .get_f64(&self.arch_key("rope.freq_base"))
                .unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: self
                .get_usize(&self.arch_key("context_length"))?
                .unwrap_or(4096),
            tie_word_embeddings: !self.has_tensor("output.weight"),
            attention_bias: self.has_tensor("blk.0.attn_q.bias"),
            mlp_bias: self.has_tensor("blk.0.ffn_up.bias"),
            sliding_window: self.get_usize(&self.arch_key("attention.sliding_window"))?,
            bos_token_id: self
                .get_usize("tokenizer.ggml.bos_token_id")?
                .map(|x| x as u32),
            eos_token_ids,
        };
        cfg.check().map_err(|(field, message)| {
            ModelError::format(&self.path, format!("metadata for `{field}`: {message}"))
        })?;
        Ok(cfg)
    }

    fn qtensor_raw(&self, gguf_name: &str) -> Result<QTensor> {
        let mut reader = self
            .reader
            .lock()
            .map_err(|_| ModelError::Other("GGUF reader lock poisoned".into()))?;
        self.content
            .tensor(&mut *reader, gguf_name, &Device::Cpu)
            .map_err(|e| ModelError::format(&self.path, format!("tensor `{gguf_name}`: {e}")))
    }

    /// Loads a tensor by its Hugging Face name, in Hugging Face row order, still quantized.
    /// `heads` is `(num_attention_heads, num_key_value_heads)`, needed to undo the q/k permutation.
    pub fn qtensor(&self, hf_name: &str, heads: (usize, usize)) -> Result<QTensor> {
        let gguf_name = hf_to_gguf_name(hf_name).ok_or_else(|| ModelError::MissingTensor {
            path: self.path.clone(),
            tensor: hf_name.to_string(),
            hint: " (no GGUF name is known for it)".into(),
        })?;
        if !self.has_tensor(&gguf_name) {
            return Err(ModelError::MissingTensor {
                path: self.path.clone(),
                tensor: format!("{gguf_name} (for {hf_name})"),
                hint: String::new(),
            });
        }
        let t = self.qtensor_raw(&gguf_name)?;
        // llama.cpp permutes q/k rows only for the `llama` architecture (mistral GGUFs use it too).
        if self.architecture == "llama" {
            let n_head = if hf_name.contains("self_attn.q_proj.") {
                Some(heads.0)
            } else if hf_name.contains("self_attn.k_proj.") {
                Some(heads.1)
            } else {
                None
            };
            if let Some(n_head) = n_head {
                return unpermute_rows(&t, n_head).map_err(|e| {
                    ModelError::format(&self.path, format!("tensor `{gguf_name}`: {e}"))
                });
            }
        }
        Ok(t)
    }

    /// `(shape, dtype)` of a tensor by its Hugging Face name, without reading it.
    pub fn tensor_info(&self, hf_name: &str) -> Option<(Vec<usize>, GgmlDType)> {
        let info = self.content.tensor_infos.get(&hf_to_gguf_name(hf_name)?)?;
        Some((info.shape.dims().to_vec(), info.ggml_dtype))
    }
}

/// `(block size, bytes per block)` of a ggml type id, for the types candle reads.
fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// Deepest nesting of metadata arrays the pre-scan follows (candle's reader stops at the same).
const MAX_VALUE_DEPTH: usize = 64;
/// Most dimensions a GGUF tensor may have (ggml's limit).
const MAX_TENSOR_DIMS: u32 = 4;

/// A bounded reader for [`prescan`]: every length it reads is checked against the bytes left in
/// the file before anything is skipped or allocated.
struct Scan<'a> {
    r: &'a mut BufReader<File>,
    path: &'a Path,
    pos: u64,
    len: u64,
    /// GGUF v1 writes lengths and counts as u32, later versions as u64.
    v1: bool,
}

impl Scan<'_> {
    fn err(&self, message: impl std::fmt::Display) -> ModelError {
        ModelError::format(self.path, format!("not a readable GGUF file: {message}"))
    }

    fn left(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        use std::io::Read;
        let mut b = [0u8; N];
        if self.left() < N as u64 {
            return Err(self.err(format!("the file ends inside {what} (offset {})", self.pos)));
        }
        self.r
            .read_exact(&mut b)
            .map_err(|e| ModelError::io(self.path, e))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes::<4>(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes::<8>(what)?))
    }

    fn length(&mut self, what: &str) -> Result<u64> {
        if self.v1 {
            self.u32(what).map(u64::from)
        } else {
            self.u64(what)
        }
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<()> {
        if n > self.left() {
            return Err(self.err(format!(
                "{what} needs {n} bytes at offset {}, the file has {} left",
                self.pos,
                self.left()
            )));
        }
        let step = i64::try_from(n).map_err(|_| self.err(format!("{what} is too long")))?;
        self.r
            .seek_relative(step)
            .map_err(|e| ModelError::io(self.path, e))?;
        self.pos += n;
        Ok(())
    }

    /// A length-prefixed string, read only when it is short (keys), else skipped.
    fn string(&mut self, what: &str, keep: bool) -> Result<Option<String>> {
        use std::io::Read;
        let n = self.length(what)?;
        if n > self.left() {
            return Err(self.err(format!(
                "{what} claims {n} bytes at offset {}, the file has {} left",
                self.pos,
                self.left()
            )));
        }
        if !keep || n > 4096 {
            self.skip(n, what)?;
            return Ok(None);
        }
        let mut v = vec![0u8; n as usize];
        self.r
            .read_exact(&mut v)
            .map_err(|e| ModelError::io(self.path, e))?;
        self.pos += n;
        Ok(Some(
            String::from_utf8_lossy(&v)
                .trim_end_matches('\0')
                .to_string(),
        ))
    }

    /// Skips one value of GGUF type `ty`; returns integers (for `general.alignment`).
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Option<i128>> {
        let what = format!("metadata `{key}`");
        let fixed = |ty: u32| -> Option<u64> {
            match ty {
                0 | 1 | 7 => Some(1),
                2 | 3 => Some(2),
                4..=6 => Some(4),
                10..=12 => Some(8),
                _ => None,
            }
        };
        match ty {
            0 => Ok(Some(self.bytes::<1>(&what)?[0] as i128)),
            1 => Ok(Some(self.bytes::<1>(&what)?[0] as i8 as i128)),
            2 => Ok(Some(u16::from_le_bytes(self.bytes::<2>(&what)?) as i128)),
            3 => Ok(Some(i16::from_le_bytes(self.bytes::<2>(&what)?) as i128)),
            4 => Ok(Some(self.u32(&what)? as i128)),
            5 => Ok(Some(self.u32(&what)? as i32 as i128)),
            10 => Ok(Some(self.u64(&what)? as i128)),
            11 => Ok(Some(self.u64(&what)? as i64 as i128)),
            6 | 7 | 12 => {
                self.skip(fixed(ty).unwrap_or(1), &what)?;
                Ok(None)
            }
            8 => {
                self.string(&what, false)?;
                Ok(None)
            }
            9 => {
                if depth >= MAX_VALUE_DEPTH {
                    return Err(self.err(format!(
                        "{what}: arrays nested deeper than {MAX_VALUE_DEPTH}"
                    )));
                }
                let elem = self.u32(&what)?;
                let n = self.length(&what)?;
                match fixed(elem) {
                    Some(size) => {
                        let bytes = n.checked_mul(size).ok_or_else(|| {
                            self.err(format!("{what}: array length {n} is absurd"))
                        })?;
                        self.skip(bytes, &what)?;
                    }
                    None => {
                        // Strings and arrays take at least 4 bytes each.
                        if n > self.left() / 4 {
                            return Err(self.err(format!(
                                "{what}: array of {n} elements cannot fit in the {} bytes left",
                                self.left()
                            )));
                        }
                        for _ in 0..n {
                            self.value(elem, key, depth + 1)?;
                        }
                    }
                }
                Ok(None)
            }
            other => Err(self.err(format!("{what} has unknown value type {other}"))),
        }
    }
}

/// Reads the header once with every count, length, alignment and tensor size checked, before
/// candle's reader sees it: candle divides by `general.alignment` (0 panics) and multiplies
/// tensor dimensions unchecked. Errors name the file and the key or tensor.
fn prescan(path: &Path, reader: &mut BufReader<File>, len: u64) -> Result<()> {
    let mut s = Scan {
        r: reader,
        path,
        pos: 0,
        len,
        v1: false,
    };
    let magic = s.u32("the magic number")?;
    if magic != 0x4655_4747 && magic != 0x4747_5546 {
        return Err(s.err(format!(
            "unknown magic 0x{magic:08x} (a GGUF file starts with `GGUF`)"
        )));
    }
    let version = s.u32("the version")?;
    if !(1..=3).contains(&version) {
        return Err(s.err(format!("unsupported GGUF version {version}")));
    }
    s.v1 = version == 1;
    let tensor_count = s.length("the tensor count")?;
    let kv_count = s.length("the metadata count")?;
    // A metadata entry takes at least a key length, a type and one byte; a tensor entry at
    // least a name length, a dimension count, one dimension, a type and an offset.
    let prefix: u64 = if s.v1 { 4 } else { 8 };
    if kv_count > s.left() / (prefix + 5) || tensor_count > s.left() / (2 * prefix + 12) {
        return Err(s.err(format!(
            "the header claims {kv_count} metadata entries and {tensor_count} tensors, more than \
             the {len}-byte file can hold"
        )));
    }
    let mut alignment = gguf_file::DEFAULT_ALIGNMENT;
    for _ in 0..kv_count {
        let key = s.string("a metadata key", true)?.unwrap_or_default();
        let ty = s.u32(&format!("the type of metadata `{key}`"))?;
        let v = s.value(ty, &key, 0)?;
        if key == "general.alignment" {
            // candle uses the value of the u8..u32 and i8..i32 types only.
            if let (Some(a), 0..=5) = (v, ty) {
                if a < 0 {
                    continue;
                }
                if a == 0 || !(a as u64).is_power_of_two() {
                    return Err(ModelError::format(
                        path,
                        format!("metadata `general.alignment` is {a}; it must be a power of two"),
                    ));
                }
                alignment = a as u64;
            }
        }
    }
    let mut tensors: Vec<(String, u64, u64)> = Vec::new();
    for _ in 0..tensor_count {
        let name = s
            .string("a tensor name", true)?
            .unwrap_or_else(|| "<long name>".into());
        let what = format!("tensor `{name}`");
        let n_dims = s.u32(&what)?;
        if n_dims == 0 || n_dims > MAX_TENSOR_DIMS {
            return Err(ModelError::format(
                path,
                format!(
                    "{what} has {n_dims} dimensions (GGUF tensors have 1 to {MAX_TENSOR_DIMS})"
                ),
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(s.length(&what)?);
        }
        let ty = s.u32(&what)?;
        let offset = s.u64(&what)?;
        let dtype = ggml_dtype(ty).ok_or_else(|| {
            ModelError::format(path, format!("{what} has unknown ggml type {ty}"))
        })?;
        let elems = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| usize::try_from(n).is_ok())
            .ok_or_else(|| {
                ModelError::format(path, format!("{what} has absurd dimensions {dims:?}"))
            })?;
        let block = dtype.block_size() as u64;
        if !dims[0].is_multiple_of(block) {
            return Err(ModelError::format(
                path,
                format!(
                    "{what}: its rows of {} values are not whole {dtype:?} blocks of {block}",
                    dims[0]
                ),
            ));
        }
        // The truncation check below holds every size to the file's length.
        let bytes = (elems / block)
            .checked_mul(dtype.type_size() as u64)
            .ok_or_else(|| {
                ModelError::format(path, format!("{what} has absurd dimensions {dims:?}"))
            })?;
        tensors.push((name, offset, bytes));
    }
    let data_start = s.pos.div_ceil(alignment).saturating_mul(alignment);
    // Every tensor's data must lie inside the file, so a truncated download is reported here,
    // with the first tensor it cuts, rather than halfway through loading.
    let mut first_cut: Option<(u64, &str, u64)> = None;
    for (name, offset, bytes) in &tensors {
        let start = data_start.saturating_add(*offset);
        let end = start.saturating_add(*bytes);
        if end > len && first_cut.is_none_or(|(s, _, _)| start < s) {
            first_cut = Some((start, name, end));
        }
    }
    if let Some((_, name, end)) = first_cut {
        return Err(ModelError::format(
            path,
            format!(
                "file is truncated: tensor `{name}` needs bytes up to {end}, the file has {len} \
                 (hint: download it again)"
            ),
        ));
    }
    use std::io::Seek;
    s.r.rewind().map_err(|e| ModelError::io(path, e))?;
    Ok(())
}

/// Integer metadata of any width.
pub fn value_to_u64(v: &Value) -> Option<u64> {
    Some(match v {
        Value::U8(x) => *x as u64,
        Value::I8(x) => u64::try_from(*x).ok()?,
        Value::U16(x) => *x as u64,
        Value::I16(x) => u64::try_from(*x).ok()?,
        Value::U32(x) => *x as u64,
        Value::I32(x) => u64::try_from(*x).ok()?,
        Value::U64(x) => *x,
        Value::I64(x) => u64::try_from(*x).ok()?,
        _ => return None,
    })
}

/// Maps a Hugging Face tensor name to llama.cpp's GGUF name.
pub fn hf_to_gguf_name(hf: &str) -> Option<String> {
    let fixed: HashMap<&str, &str> = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ]
    .into_iter()
    .collect();
    if let Some(g) = fixed.get(hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?; // kind: weight | bias
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// Undoes llama.cpp's q/k permutation. The converter maps Hugging Face row
/// `h*d + j*(d/2) + i` to GGUF row `h*d + 2*i + j` (head `h`, half `j`, pair `i`, head size `d`).
/// Rows of a quantized tensor are whole blocks, so this moves bytes and works for any dtype.
/// A bias (one dimension) is permuted the same way.
fn unpermute_rows(t: &QTensor, n_head: usize) -> candle_core::Result<QTensor> {
    let dims = t.shape().dims().to_vec();
    let Some((&rows, rest)) = dims.split_first() else {
        candle_core::bail!("cannot un-permute a tensor without dimensions");
    };
    let row_elems: usize = rest.iter().product::<usize>().max(1);
    if !row_elems.is_multiple_of(t.dtype().block_size()) {
        candle_core::bail!("rows of {row_elems} values are not whole blocks");
    }
    if n_head == 0 || !rows.is_multiple_of(n_head) || !(rows / n_head).is_multiple_of(2) {
        candle_core::bail!("cannot un-permute {rows} rows into {n_head} heads");
    }
    let dtype = t.dtype();
    let row_bytes = row_elems / dtype.block_size() * dtype.type_size();
    let data = t.data()?;
    let d = rows / n_head;
    let mut out = vec![0u8; data.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..d / 2 {
                let hf_row = h * d + j * (d / 2) + i;
                let gguf_row = h * d + 2 * i + j;
                out[hf_row * row_bytes..(hf_row + 1) * row_bytes]
                    .copy_from_slice(&data[gguf_row * row_bytes..(gguf_row + 1) * row_bytes]);
            }
        }
    }
    let storage = QStorage::from_data(Cow::Owned(out), &Device::Cpu, dtype)?;
    QTensor::new(storage, dims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_llama_cpp() {
        assert_eq!(
            hf_to_gguf_name("model.layers.12.self_attn.q_proj.weight").unwrap(),
            "blk.12.attn_q.weight"
        );
        assert_eq!(
            hf_to_gguf_name("model.layers.0.mlp.down_proj.weight").unwrap(),
            "blk.0.ffn_down.weight"
        );
        assert_eq!(
            hf_to_gguf_name("model.layers.3.self_attn.k_proj.bias").unwrap(),
            "blk.3.attn_k.bias"
        );
        assert_eq!(hf_to_gguf_name("lm_head.weight").unwrap(), "output.weight");
        assert!(hf_to_gguf_name("model.layers.x.foo").is_none());
    }

    #[test]
    fn unpermute_inverts_the_converter_permutation() {
        // 2 heads of size 4, rows of 2 f32 values: row r holds [r, r].
        let n_head = 2;
        let d = 4;
        let hf: Vec<f32> = (0..8).flat_map(|r| [r as f32, r as f32]).collect();
        // Apply the converter's permutation: gguf row h*d + 2i + j = hf row h*d + j*d/2 + i.
        let mut gguf = vec![0f32; 16];
        for h in 0..n_head {
            for j in 0..2 {
                for i in 0..d / 2 {
                    let (g, f) = (h * d + 2 * i + j, h * d + j * (d / 2) + i);
                    gguf[g * 2..g * 2 + 2].copy_from_slice(&hf[f * 2..f * 2 + 2]);
                }
            }
        }
        let t = candle_core::Tensor::from_vec(gguf, (8, 2), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
        let back = unpermute_rows(&q, n_head)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), hf);
    }

    #[test]
    fn missing_and_truncated_files_are_clear_errors() {
        let err = GgufFile::open(Path::new("/nonexistent/model.gguf"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/model.gguf"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("junk.gguf");
        std::fs::write(&p, b"GGUF\x03\x00\x00\x00\x01").unwrap();
        let err = GgufFile::open(&p).unwrap_err().to_string();
        assert!(err.contains("junk.gguf") && err.contains("GGUF"), "{err}");
    }
}
