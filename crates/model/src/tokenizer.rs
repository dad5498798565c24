//! Tokenizers: a Hugging Face `tokenizer.json` through the `tokenizers` crate, or the vocabulary
//! and merges embedded in a GGUF file turned into an equivalent byte-level BPE `tokenizer.json`.
//! [`Tok`] also knows the special tokens generation needs (bos, eos, end-of-turn).

use std::path::Path;

use serde_json::{json, Value as Json};

use crate::error::{ModelError, Result};
use crate::gguf::{value_to_u64, GgufFile, Value};

/// Tokens that end an assistant turn in common chat formats; any that the vocabulary has are
/// stop tokens for generation.
pub const END_OF_TURN_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
];

/// A tokenizer with the special tokens generation needs.
#[derive(Clone)]
pub struct Tok {
    pub inner: tokenizers::Tokenizer,
    /// Beginning-of-sequence token text and id, when the model has one.
    pub bos: Option<(String, u32)>,
    /// End-of-sequence token text and id.
    pub eos: Option<(String, u32)>,
    /// Every token id that ends generation.
    pub stop_ids: Vec<u32>,
    /// The Jinja chat template, if the model ships one.
    pub chat_template: Option<String>,
}

impl std::fmt::Debug for Tok {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tok")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("stop_ids", &self.stop_ids)
            .finish()
    }
}

fn tk_err(context: impl std::fmt::Display) -> impl FnOnce(tokenizers::Error) -> ModelError {
    move |e| ModelError::Tokenizer(format!("{context}: {e}"))
}

/// A token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_text(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// Builds a tokenizer from a file's JSON. The tokenizers crate panics on some malformed
/// tokenizer JSON (a decoder it cannot read); that panic becomes an error naming `path`.
pub(crate) fn read_tokenizer(
    path: &Path,
    build: impl FnOnce() -> tokenizers::Result<tokenizers::Tokenizer>,
) -> Result<tokenizers::Tokenizer> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(build)) {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(ModelError::format(path, e.to_string())),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown error".into());
            Err(ModelError::format(
                path,
                format!("not a readable tokenizer: {msg}"),
            ))
        }
    }
}

impl Tok {
    /// Builds from a tokenizers `Tokenizer`, finding stop tokens in its vocabulary.
    pub fn new(
        inner: tokenizers::Tokenizer,
        bos: Option<String>,
        eos: Option<String>,
        extra_eos_ids: &[u32],
        chat_template: Option<String>,
    ) -> Tok {
        let with_id = |t: Option<String>| t.and_then(|t| inner.token_to_id(&t).map(|id| (t, id)));
        let bos = with_id(bos);
        let eos = with_id(eos);
        let mut stop_ids: Vec<u32> = Vec::new();
        let mut push = |id: u32| {
            if !stop_ids.contains(&id) {
                stop_ids.push(id)
            }
        };
        if let Some((_, id)) = &eos {
            push(*id);
        }
        for id in extra_eos_ids {
            push(*id);
        }
        for t in END_OF_TURN_TOKENS {
            if let Some(id) = inner.token_to_id(t) {
                push(id);
            }
        }
        Tok {
            inner,
            bos,
            eos,
            stop_ids,
            chat_template,
        }
    }

    /// `tokenizer.json` and, if present, `tokenizer_config.json` (special tokens, chat template)
    /// of a Hugging Face model directory. `eos_ids` are the config's `eos_token_id`s.
    pub fn from_hf_dir(dir: &Path, eos_ids: &[u32]) -> Result<Tok> {
        let tj = dir.join("tokenizer.json");
        if !tj.is_file() {
            return Err(ModelError::io(
                &tj,
                std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
            ));
        }
        let inner = read_tokenizer(&tj, || tokenizers::Tokenizer::from_file(&tj))?;
        let tc = dir.join("tokenizer_config.json");
        let (bos, eos, template) = if tc.is_file() {
            let text = std::fs::read_to_string(&tc).map_err(|e| ModelError::io(&tc, e))?;
            let cfg: Json = serde_json::from_str(&text).map_err(|e| ModelError::Json {
                path: tc.clone(),
                source: e,
            })?;
            let template = config_chat_template(&cfg);
            (
                token_text(cfg.get("bos_token")),
                token_text(cfg.get("eos_token")),
                template,
            )
        } else {
            (None, None, None)
        };
        let template = match template {
            Some(t) => Some(t),
            None => jinja_chat_template(dir)?,
        };
        Ok(Tok::new(inner, bos, eos, eos_ids, template))
    }

    /// The tokenizer embedded in a GGUF file (`tokenizer.ggml.*`, model `gpt2`: byte-level BPE).
    pub fn from_gguf(g: &GgufFile) -> Result<Tok> {
        let model = g.get_string("tokenizer.ggml.model").unwrap_or("");
        if model != "gpt2" {
            return Err(ModelError::format(
                &g.path,
                format!("tokenizer.ggml.model {model:?} is not supported (supported: gpt2 byte-level BPE)"),
            ));
        }
        let tokens = string_array(g, "tokenizer.ggml.tokens")?;
        let merges = string_array(g, "tokenizer.ggml.merges")?;
        let types: Vec<u64> = match g.metadata("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a.iter().map(|v| value_to_u64(v).unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        let id_of = |key: &str| g.metadata(key).and_then(value_to_u64).map(|x| x as u32);
        let bos_id = id_of("tokenizer.ggml.bos_token_id");
        let eos_id = id_of("tokenizer.ggml.eos_token_id");
        let eot_id = id_of("tokenizer.ggml.eot_token_id");
        let add_bos = matches!(
            g.metadata("tokenizer.ggml.add_bos_token"),
            Some(Value::Bool(true))
        );
        let pre = g.get_string("tokenizer.ggml.pre").unwrap_or("gpt2");
        // Control (3) and user-defined (4) tokens are matched before BPE, like added tokens.
        let mut specials: Vec<(u32, String, bool)> = Vec::new();
        for (i, (t, ty)) in tokens.iter().zip(types.iter()).enumerate() {
            let id = i as u32;
            let is_named = Some(id) == bos_id || Some(id) == eos_id || Some(id) == eot_id;
            if *ty == 3 || is_named {
                specials.push((id, t.clone(), true));
            } else if *ty == 4 {
                specials.push((id, t.clone(), false));
            }
        }
        let bos = bos_id.and_then(|id| tokens.get(id as usize).cloned());
        let eos = eos_id.and_then(|id| tokens.get(id as usize).cloned());
        let json = byte_level_bpe_json(
            &tokens,
            &merges,
            &specials,
            pre,
            if add_bos { bos.as_deref() } else { None },
        );
        let bytes = serde_json::to_vec(&json).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let inner =
            read_tokenizer(&g.path, || tokenizers::Tokenizer::from_bytes(bytes)).map_err(|e| {
                match e {
                    ModelError::Format { path, message } => ModelError::Format {
                        path,
                        message: format!("embedded tokenizer: {message}"),
                    },
                    e => e,
                }
            })?;
        let template = g.get_string("tokenizer.chat_template").map(str::to_string);
        Ok(Tok::new(
            inner,
            bos,
            eos,
            &eot_id.into_iter().collect::<Vec<_>>(),
            template,
        ))
    }

    /// Token ids of `text`; `add_special` adds what the post-processor adds (e.g. bos).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, add_special)
            .map_err(tk_err("encode"))?
            .get_ids()
            .to_vec())
    }

    /// Text of `ids`; `skip_special` drops special tokens (bos, end-of-turn, ...).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(tk_err("decode"))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// The `chat_template` of a tokenizer_config.json; of a list of named templates, "default".
pub(crate) fn config_chat_template(cfg: &Json) -> Option<String> {
    match cfg.get("chat_template") {
        Some(Json::String(s)) => Some(s.clone()),
        Some(Json::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or(list.first())
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// `chat_template.jinja` of a model directory, where transformers 4.43+ may keep the template.
pub(crate) fn jinja_chat_template(dir: &Path) -> Result<Option<String>> {
    let p = dir.join("chat_template.jinja");
    if p.is_file() {
        Ok(Some(
            std::fs::read_to_string(&p).map_err(|e| ModelError::io(&p, e))?,
        ))
    } else {
        Ok(None)
    }
}

fn string_array(g: &GgufFile, key: &str) -> Result<Vec<String>> {
    match g.metadata(key) {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(ModelError::format(
                    &g.path,
                    format!("`{key}` has a non-string element {other:?}"),
                )),
            })
            .collect(),
        Some(_) => Err(ModelError::format(
            &g.path,
            format!("`{key}` is not an array"),
        )),
        None => Err(ModelError::format(
            &g.path,
            format!("metadata key `{key}` is missing"),
        )),
    }
}

const REGEX_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const REGEX_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A byte-level BPE `tokenizer.json` (as a JSON value) from a vocabulary, merges (`"a b"`),
/// added tokens `(id, text, special)`, llama.cpp's pre-tokenizer name (`tokenizer.ggml.pre`) and
/// an optional bos token to prepend when special tokens are added.
pub fn byte_level_bpe_json(
    tokens: &[String],
    merges: &[String],
    added: &[(u32, String, bool)],
    pre: &str,
    prepend_bos: Option<&str>,
) -> Json {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    let (normalizer, pre_tokenizer) = match pre {
        "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" | "dbrx" => (
            Json::Null,
            json!({"type": "Sequence", "pretokenizers": [split(REGEX_LLAMA3), byte_level(false)]}),
        ),
        "qwen2" | "deepseek-r1-qwen" => (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [split(REGEX_QWEN2), byte_level(false)]}),
        ),
        // SmolLM: every digit alone, then GPT-2's split.
        "smollm" => (
            Json::Null,
            json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        ),
        _ => (Json::Null, byte_level(true)),
    };
    let post_processor = match prepend_bos {
        Some(bos) => {
            let id = tokens.iter().position(|t| t == bos).unwrap_or(0);
            json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [id], "tokens": [bos]}}})
        }
        None => Json::Null,
    };
    let vocab: serde_json::Map<String, Json> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added_tokens: Vec<Json> = added
        .iter()
        .map(|(id, t, special)| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": special})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    })
}

/// GPT-2's byte-to-unicode map: the 256 single-character tokens of a byte-level vocabulary,
/// in byte order.
pub fn byte_level_alphabet() -> Vec<String> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut pairs: Vec<(u32, u32)> = printable.into_iter().zip(chars).collect();
    pairs.sort();
    pairs
        .into_iter()
        .map(|(_, c)| char::from_u32(c).map(String::from).unwrap_or_default())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_has_256_distinct_tokens() {
        let a = byte_level_alphabet();
        assert_eq!(a.len(), 256);
        assert_eq!(a[b' ' as usize], "\u{120}");
        assert_eq!(a[b'A' as usize], "A");
        let set: std::collections::HashSet<_> = a.iter().collect();
        assert_eq!(set.len(), 256);
    }

    #[test]
    fn tiny_byte_level_tokenizer_round_trips() {
        let mut tokens = byte_level_alphabet();
        tokens.push("he".into());
        tokens.push("<|im_end|>".into());
        let json = byte_level_bpe_json(
            &tokens,
            &["h e".to_string()],
            &[(257, "<|im_end|>".into(), true)],
            "smollm",
            None,
        );
        let t = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&json).unwrap()).unwrap();
        let tok = Tok::new(t, None, None, &[], None);
        let ids = tok.encode("hello 123 ünï 😀<|im_end|>", false).unwrap();
        assert_eq!(ids[0], 256, "merge h e applies");
        assert_eq!(*ids.last().unwrap(), 257, "special token matched whole");
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            "hello 123 ünï 😀<|im_end|>"
        );
        assert_eq!(tok.decode(&ids, true).unwrap(), "hello 123 ünï 😀");
        assert_eq!(tok.stop_ids, vec![257]);
    }
}
