//! The local engine: a loaded model (decoder, tokenizer, chat template) behind the
//! [`Generator`] trait.

use std::path::{Path, PathBuf};

use safetune_data::Message;

use crate::backend::{
    generate_fed_in_batches, BackendError, CancelCheck, FinishReason, GenOutput, GenRequest,
    Generator, Prompt, RequestFeed, TokenSink,
};
use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::generate::{
    generate_batch_cancellable, generate_continuous, SeqFeed, SeqOutput, SeqRequest,
};
use crate::gguf::GgufFile;
use crate::llama::Llama;
use crate::spec::ModelSpec;
use crate::template::{ChatTemplate, CHATML_TEMPLATE};
use crate::tokenizer::Tok;
use crate::weights::{SafetensorsFiles, Weights};

/// How to load a local model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// GGUF only: keep matrices quantized (QMatMul) instead of dequantizing to f32. Faster
    /// decoding at batch 1, a little less exact.
    pub quantized: bool,
    /// The most requests decoded together.
    pub batch_size: usize,
    /// A LoRA adapter directory in the PEFT layout to apply after loading (see [`crate::adapter`]).
    pub adapter: Option<PathBuf>,
    /// Merge the adapter into dense weights at load time (faster decoding); otherwise, and
    /// always for quantized weights, it runs as a separate low-rank path.
    pub merge_adapter: bool,
    /// After loading (and merging the adapter when `merge_adapter`), hold every dense f32
    /// matrix as Q8_0 blocks for the fast decoding kernels, e.g. a safetensors model such as
    /// the aligned model a study merges. Greedy answers stay close to the f32 path's but are
    /// not always identical (`bench/quantize_agreement.sh` measures how close).
    pub quantize_dense: bool,
    /// After loading (and merging the adapter when `merge_adapter`), hold every matrix in bf16
    /// for the AMX kernel ([`crate::bf16`]; a GGUF model is dequantized first, `quantized` is
    /// ignored). Needs AMX-BF16: where [`crate::bf16::bf16_unavailable`] says why not, loading
    /// fails before any file is read (unless the emulated kernel is chosen, for tests). Greedy
    /// answers stay close to the f32 path's but are not always identical.
    pub bf16: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            quantized: false,
            batch_size: 8,
            adapter: None,
            merge_adapter: false,
            quantize_dense: false,
            bf16: false,
        }
    }
}

/// With [`LoadOptions::bf16`], the reason this process cannot run the bf16 kernel
/// ([`crate::bf16::bf16_unavailable`]: no AMX-BF16, or `SAFETUNE_ISA` below AVX-512), checked
/// before anything is read; nothing with the emulated kernel ([`crate::bf16::set_emulated`]).
fn check_bf16(opts: &LoadOptions) -> Result<()> {
    if !opts.bf16 || crate::bf16::kernel() == crate::bf16::Bf16Kernel::Emulated {
        return Ok(());
    }
    match crate::bf16::bf16_unavailable() {
        Some(message) => Err(ModelError::Other(message)),
        None => Ok(()),
    }
}

/// A model loaded in this process.
pub struct LocalEngine {
    pub model: Llama,
    pub tok: Tok,
    pub template: ChatTemplate,
    pub model_id: String,
    pub batch_size: usize,
}

impl std::fmt::Debug for LocalEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalEngine")
            .field("model_id", &self.model_id)
            .field("cfg", &self.model.cfg)
            .finish()
    }
}

impl LocalEngine {
    /// Loads a model named by a spec; `hf:` repositories are downloaded first (see
    /// [`crate::hub`]). `openai:` models are remote: the OpenAI client crate serves them.
    pub fn load(spec: &ModelSpec, opts: &LoadOptions) -> Result<LocalEngine> {
        check_bf16(opts)?;
        let mut e = match spec {
            ModelSpec::Gguf(p) => Self::load_gguf(p, opts)?,
            ModelSpec::HfDir(d) => Self::load_hf_dir(d, opts)?,
            ModelSpec::Hub { repo, revision } => {
                let dir = crate::hub::download_model(repo, revision.as_deref())?;
                Self::load_hf_dir(&dir, opts)?
            }
            ModelSpec::OpenAi { .. } => {
                return Err(ModelError::Spec {
                    spec: spec.to_string(),
                    message: "an openai: model is remote; use the OpenAI-compatible client backend"
                        .into(),
                })
            }
        };
        e.model_id = spec.model_id();
        if let Some(dir) = &opts.adapter {
            let name = std::fs::canonicalize(dir)
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| dir.display().to_string());
            e.model_id = format!("{}+{name}", e.model_id);
        }
        Ok(e)
    }

    /// This model with the LoRA adapter at `dir` attached as a separate low-rank path
    /// (never merged), named `name`. The weights are shared with `self` (tensors are
    /// reference-counted), so each adapter costs only its own matrices. The adapter is read and
    /// checked against this model first: a missing or malformed file, a full checkpoint in
    /// place of an adapter, a layer this model lacks or a shape that does not fit is an error
    /// naming the file. This engine must carry no adapter itself.
    pub fn with_adapter(&self, dir: &Path, name: &str) -> Result<LocalEngine> {
        let adapter = crate::adapter::Adapter::load(dir)?;
        let mut model = self.model.clone();
        if let Some(l) = crate::adapter::linears(&model)
            .into_iter()
            .find(|l| l.lora.is_some())
        {
            return Err(ModelError::Other(format!(
                "`{}` already carries an adapter (layer `{}`); serve adapters on a base without one",
                self.model_id, l.name
            )));
        }
        adapter.apply(&mut model, false)?;
        let template =
            ChatTemplate::new(self.tok.chat_template.as_deref().unwrap_or(CHATML_TEMPLATE))?;
        Ok(LocalEngine {
            model,
            tok: self.tok.clone(),
            template,
            model_id: name.to_string(),
            batch_size: self.batch_size,
        })
    }

    /// A GGUF file: config, tokenizer and template from its metadata.
    pub fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<LocalEngine> {
        check_bf16(opts)?;
        let g = GgufFile::open(path)?;
        let cfg = g.config()?;
        let tok = Tok::from_gguf(&g)?;
        let w = Weights::from_gguf(
            g,
            (cfg.num_attention_heads, cfg.num_key_value_heads),
            opts.quantized && !opts.bf16,
        );
        let model = Llama::load(&w, &cfg)?;
        Self::assemble(model, tok, path, opts)
    }

    /// A Hugging Face directory.
    pub fn load_hf_dir(dir: &Path, opts: &LoadOptions) -> Result<LocalEngine> {
        check_bf16(opts)?;
        let cfg = Config::from_hf_file(&dir.join("config.json"))?;
        let tok = Tok::from_hf_dir(dir, &cfg.eos_token_ids)?;
        let files = SafetensorsFiles::open(&SafetensorsFiles::find_in_dir(dir)?)?;
        let model = Llama::load(&Weights::from_safetensors(files), &cfg)?;
        Self::assemble(model, tok, dir, opts)
    }

    fn assemble(
        mut model: Llama,
        mut tok: Tok,
        path: &Path,
        opts: &LoadOptions,
    ) -> Result<LocalEngine> {
        if let Some(dir) = &opts.adapter {
            crate::adapter::Adapter::load(dir)?.apply(&mut model, opts.merge_adapter)?;
        }
        if opts.quantize_dense {
            for l in crate::adapter::linears_mut(&mut model) {
                let name = l.name.clone();
                l.quantize_q8_0()
                    .map_err(|e| ModelError::Other(format!("quantizing `{name}` to Q8_0: {e}")))?;
            }
        }
        if opts.bf16 {
            for l in crate::adapter::linears_mut(&mut model) {
                let name = l.name.clone();
                l.to_bf16()
                    .map_err(|e| ModelError::Other(format!("holding `{name}` in bf16: {e}")))?;
            }
        }
        for id in &model.cfg.eos_token_ids {
            if !tok.stop_ids.contains(id) {
                tok.stop_ids.push(*id);
            }
        }
        let template = ChatTemplate::new(tok.chat_template.as_deref().unwrap_or(CHATML_TEMPLATE))?;
        let model_id = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(LocalEngine {
            model,
            tok,
            template,
            model_id,
            batch_size: opts.batch_size.max(1),
        })
    }

    /// The prompt text for a chat: the template with the generation prompt appended.
    pub fn render_chat(&self, messages: &[Message]) -> Result<String> {
        let bos = self.tok.bos.as_ref().map(|(t, _)| t.as_str()).unwrap_or("");
        let eos = self.tok.eos.as_ref().map(|(t, _)| t.as_str()).unwrap_or("");
        self.template.render(messages, true, bos, eos)
    }

    /// Token ids of a prompt. A rendered chat already holds its special tokens; raw text gets
    /// what the tokenizer adds (e.g. bos).
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        match prompt {
            Prompt::Chat(messages) => {
                let text = self.render_chat(messages)?;
                let mut ids = self.tok.encode(&text, false)?;
                // Templates that do not write bos themselves rely on the tokenizer adding it.
                if let Some((bos_text, bos_id)) = &self.tok.bos {
                    let adds_bos = self.tok.encode("a", true)?.first() == Some(bos_id);
                    if adds_bos && !text.starts_with(bos_text.as_str()) {
                        ids.insert(0, *bos_id);
                    }
                }
                Ok(ids)
            }
            Prompt::Text(t) => self.tok.encode(t, true),
        }
    }
}

impl LocalEngine {
    /// The checked token-level request of a request: its prompt tokenized (not empty, shorter
    /// than the context), `max_new_tokens` cut to the room left, the sampling settings valid.
    fn seq_request(&self, r: &GenRequest) -> Result<SeqRequest, BackendError> {
        let max_pos = self.model.cfg.max_position_embeddings;
        let ids = self.prompt_ids(&r.prompt).map_err(to_backend)?;
        if ids.is_empty() {
            return Err(BackendError::Invalid("the prompt is empty".into()));
        }
        if ids.len() >= max_pos {
            return Err(BackendError::Invalid(format!(
                "the prompt has {} tokens, the model's context is {max_pos}",
                ids.len()
            )));
        }
        let mut sampling = r.sampling.clone();
        sampling.max_new_tokens = sampling.max_new_tokens.min(max_pos - ids.len());
        let temperature_ok = sampling.temperature.is_finite() && sampling.temperature >= 0.0;
        let top_p_ok = sampling.top_p > 0.0 && sampling.top_p <= 1.0;
        if !temperature_ok || !top_p_ok {
            return Err(BackendError::Invalid(format!(
                "temperature must be >= 0 and top_p in (0, 1], got {} and {}",
                sampling.temperature, sampling.top_p
            )));
        }
        Ok(SeqRequest {
            prompt_ids: ids,
            sampling,
        })
    }
}

fn to_backend(e: ModelError) -> BackendError {
    match e {
        ModelError::Template(_) | ModelError::Tokenizer(_) => BackendError::Invalid(e.to_string()),
        other => BackendError::Other(other.to_string()),
    }
}

impl Generator for LocalEngine {
    fn model_id(&self) -> &str {
        &self.model_id
    }

    fn max_batch(&self) -> usize {
        self.batch_size
    }

    fn prompt_tokens(&self, prompt: &Prompt) -> Option<Result<usize, BackendError>> {
        Some(
            self.prompt_ids(prompt)
                .map(|ids| ids.len())
                .map_err(to_backend),
        )
    }

    fn context_length(&self) -> Option<usize> {
        Some(self.model.cfg.max_position_embeddings)
    }

    fn generate_streaming(
        &self,
        requests: &[GenRequest],
        sink: TokenSink<'_>,
    ) -> Result<Vec<GenOutput>, BackendError> {
        self.generate_cancellable(requests, sink, &|_| false)
    }

    /// Continuous batching over the feed (static batches with `SAFETUNE_BATCHING=static`): a
    /// request that fails its checks (an empty or too long prompt, bad settings) fails alone.
    fn generate_fed(&self, feed: &mut dyn RequestFeed) -> Result<(), BackendError> {
        if !continuous_batching() {
            return generate_fed_in_batches(self, feed);
        }
        let mut fed = Fed {
            engine: self,
            feed,
            prompt_tokens: std::collections::HashMap::new(),
        };
        generate_continuous(&self.model, &self.tok, self.batch_size, &mut fed)
            .map(|_| ())
            .map_err(to_backend)
    }

    fn generate_cancellable(
        &self,
        requests: &[GenRequest],
        sink: TokenSink<'_>,
        cancelled: CancelCheck<'_>,
    ) -> Result<Vec<GenOutput>, BackendError> {
        let mut seqs = Vec::with_capacity(requests.len());
        for (i, r) in requests.iter().enumerate() {
            seqs.push(self.seq_request(r).map_err(|e| match e {
                BackendError::Invalid(m) => BackendError::Invalid(format!("request {i}: {m}")),
                other => other,
            })?);
        }
        // Prompts of similar length start together: less padding in a shared prefill.
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| seqs[i].prompt_ids.len());
        let mut out: Vec<Option<GenOutput>> = vec![None; seqs.len()];
        if !continuous_batching() {
            for chunk in order.chunks(self.batch_size) {
                let batch: Vec<SeqRequest> = chunk.iter().map(|&i| seqs[i].clone()).collect();
                let results = generate_batch_cancellable(
                    &self.model,
                    &self.tok,
                    &batch,
                    &mut |k, piece| sink(chunk[k], piece),
                    &|k| chunk.get(k).is_some_and(|&i| cancelled(i)),
                )
                .map_err(to_backend)?;
                for (k, r) in results.into_iter().enumerate() {
                    let i = chunk[k];
                    out[i] = Some(GenOutput {
                        text: r.text,
                        prompt_tokens: seqs[i].prompt_ids.len(),
                        completion_tokens: r.ids.len(),
                        finish_reason: r.finish_reason,
                    });
                }
            }
        } else {
            let mut feed = VecFeed {
                order: order.into_iter(),
                seqs: &seqs,
                out: &mut out,
                sink,
                cancelled,
            };
            generate_continuous(&self.model, &self.tok, self.batch_size, &mut feed)
                .map_err(to_backend)?;
        }
        Ok(out
            .into_iter()
            .map(|o| {
                o.unwrap_or(GenOutput {
                    text: String::new(),
                    prompt_tokens: 0,
                    completion_tokens: 0,
                    finish_reason: FinishReason::Length,
                })
            })
            .collect())
    }
}

/// Whether the local engine batches continuously (a finished row's slot takes the next prompt
/// at once; the default) or in static batches of `batch_size` prompts, each run until its last
/// row finishes: `SAFETUNE_BATCHING=static`, for benchmarks of the old path.
pub fn continuous_batching() -> bool {
    std::env::var("SAFETUNE_BATCHING").as_deref() != Ok("static")
}

/// A [`RequestFeed`] seen by [`generate_continuous`]: requests checked and tokenized as they are
/// taken, results turned back into [`GenOutput`]s.
struct Fed<'a> {
    engine: &'a LocalEngine,
    feed: &'a mut dyn RequestFeed,
    /// Prompt tokens of every running request, by key.
    prompt_tokens: std::collections::HashMap<usize, usize>,
}

impl SeqFeed for Fed<'_> {
    fn next(&mut self) -> Option<(usize, SeqRequest)> {
        loop {
            let (key, r) = self.feed.next()?;
            match self.engine.seq_request(&r) {
                Ok(seq) => {
                    self.prompt_tokens.insert(key, seq.prompt_ids.len());
                    return Some((key, seq));
                }
                Err(e) => self.feed.done(key, Err(e)),
            }
        }
    }
    fn piece(&mut self, key: usize, piece: &str) {
        self.feed.piece(key, piece)
    }
    fn done(&mut self, key: usize, r: SeqOutput) {
        let prompt_tokens = self.prompt_tokens.remove(&key).unwrap_or(0);
        self.feed.done(
            key,
            Ok(GenOutput {
                text: r.text,
                prompt_tokens,
                completion_tokens: r.ids.len(),
                finish_reason: r.finish_reason,
            }),
        )
    }
    fn cancelled(&self, key: usize) -> bool {
        self.feed.cancelled(key)
    }
}

/// A fixed list of requests fed to [`generate_continuous`] in `order`.
struct VecFeed<'a, 's> {
    order: std::vec::IntoIter<usize>,
    seqs: &'a [SeqRequest],
    out: &'a mut [Option<GenOutput>],
    sink: TokenSink<'s>,
    cancelled: CancelCheck<'s>,
}

impl SeqFeed for VecFeed<'_, '_> {
    fn next(&mut self) -> Option<(usize, SeqRequest)> {
        self.order.next().map(|i| (i, self.seqs[i].clone()))
    }
    fn piece(&mut self, key: usize, piece: &str) {
        (self.sink)(key, piece)
    }
    fn done(&mut self, key: usize, r: SeqOutput) {
        self.out[key] = Some(GenOutput {
            text: r.text,
            prompt_tokens: self.seqs[key].prompt_ids.len(),
            completion_tokens: r.ids.len(),
            finish_reason: r.finish_reason,
        });
    }
    fn cancelled(&self, key: usize) -> bool {
        (self.cancelled)(key)
    }
}
