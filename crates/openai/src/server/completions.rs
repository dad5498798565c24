//! `POST /v1/completions`: one prompt or a list of them in, text per choice out; streamed as
//! `text_completion` objects carrying the new text.

use safetune_model::backend::{GenOutput, Prompt};

use super::handlers::{Common, Endpoint, Generation, Meta};
use super::routes::{parse_body, HttpError};
use super::Shared;
use crate::protocol::*;

/// `max_tokens` when a request gives none, as in OpenAI's API.
const DEFAULT_MAX_TOKENS: usize = 16;

pub(super) struct Completions;

impl Endpoint for Completions {
    const ID_PREFIX: &'static str = "cmpl";
    type Choice = CompletionChoice;
    type Chunk = CompletionResponse;
    type Response = CompletionResponse;

    fn parse(body: &[u8], shared: &Shared) -> Result<Generation, HttpError> {
        let req: CompletionRequest = parse_body(body)?;
        if req.echo {
            return Err(HttpError::invalid("echo is not supported", Some("echo")));
        }
        let prompts = match req.prompt {
            PromptInput::One(p) => vec![p],
            PromptInput::Many(v) if v.is_empty() => {
                return Err(HttpError::invalid(
                    "prompt must not be an empty list",
                    Some("prompt"),
                ))
            }
            PromptInput::Many(v) => v,
        };
        let common = Common {
            max_tokens: req.max_tokens,
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            n: req.n,
            seed: req.seed,
            stop: req.stop,
            stream: req.stream,
            stream_options: req.stream_options,
        };
        let prompts = prompts.into_iter().map(Prompt::Text).collect();
        let mut g = common.generation(prompts, "prompt", DEFAULT_MAX_TOKENS, shared)?;
        g.model = req.model;
        Ok(g)
    }

    fn chunk(
        meta: &Meta,
        choices: Vec<CompletionChoice>,
        usage: Option<Usage>,
    ) -> CompletionResponse {
        CompletionResponse {
            id: meta.id.clone(),
            object: "text_completion".into(),
            created: meta.created,
            model: meta.model.clone(),
            choices,
            usage,
        }
    }

    fn piece(index: u32, text: String) -> CompletionChoice {
        choice(index, text, None)
    }

    fn finished(index: u32, out: &GenOutput) -> CompletionChoice {
        let finish_reason = Some(out.finish_reason.as_str().into());
        choice(index, String::new(), finish_reason)
    }

    fn response(meta: Meta, outs: Vec<GenOutput>, usage: Usage) -> CompletionResponse {
        let choices = outs
            .into_iter()
            .enumerate()
            .map(|(i, o)| {
                let finish_reason = Some(o.finish_reason.as_str().into());
                choice(i as u32, o.text, finish_reason)
            })
            .collect();
        Self::chunk(&meta, choices, Some(usage))
    }
}

fn choice(index: u32, text: String, finish_reason: Option<String>) -> CompletionChoice {
    CompletionChoice {
        index,
        text,
        finish_reason,
        logprobs: None,
    }
}
