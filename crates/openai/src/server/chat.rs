//! `POST /v1/chat/completions`: messages in, an assistant message per choice out; streamed as
//! `chat.completion.chunk` events, each choice opening with a chunk that names the role.

use safetune_data::{Message, Role};
use safetune_model::backend::{GenOutput, Prompt};

use super::handlers::{Common, Endpoint, Generation, Meta};
use super::routes::{parse_body, HttpError};
use super::Shared;
use crate::protocol::*;

pub(super) struct Chat;

impl Endpoint for Chat {
    const ID_PREFIX: &'static str = "chatcmpl";
    type Choice = ChunkChoice;
    type Chunk = ChatCompletionChunk;
    type Response = ChatCompletionResponse;

    fn parse(body: &[u8], shared: &Shared) -> Result<Generation, HttpError> {
        let req: ChatCompletionRequest = parse_body(body)?;
        let messages = to_messages(req.messages)?;
        let common = Common {
            max_tokens: req.max_completion_tokens.or(req.max_tokens),
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            n: req.n,
            seed: req.seed,
            stop: req.stop,
            stream: req.stream,
            stream_options: req.stream_options,
        };
        let prompts = vec![Prompt::Chat(messages)];
        let mut g = common.generation(
            prompts,
            "messages",
            shared.config.default_max_tokens,
            shared,
        )?;
        g.model = req.model;
        Ok(g)
    }

    fn chunk(meta: &Meta, choices: Vec<ChunkChoice>, usage: Option<Usage>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: meta.id.clone(),
            object: "chat.completion.chunk".into(),
            created: meta.created,
            model: meta.model.clone(),
            choices,
            usage,
        }
    }

    fn opening(index: u32) -> Option<ChunkChoice> {
        let delta = Delta {
            role: Some("assistant".into()),
            content: Some(String::new()),
        };
        Some(choice(index, delta, None))
    }

    fn piece(index: u32, text: String) -> ChunkChoice {
        let delta = Delta {
            role: None,
            content: Some(text),
        };
        choice(index, delta, None)
    }

    fn finished(index: u32, out: &GenOutput) -> ChunkChoice {
        let finish_reason = Some(out.finish_reason.as_str().into());
        choice(index, Delta::default(), finish_reason)
    }

    fn response(meta: Meta, outs: Vec<GenOutput>, usage: Usage) -> ChatCompletionResponse {
        let choices = outs
            .into_iter()
            .enumerate()
            .map(|(i, o)| ChatChoice {
                index: i as u32,
                message: ResponseMessage {
                    role: "assistant".into(),
                    content: Some(o.text),
                },
                finish_reason: Some(o.finish_reason.as_str().into()),
                logprobs: None,
            })
            .collect();
        ChatCompletionResponse {
            id: meta.id,
            object: "chat.completion".into(),
            created: meta.created,
            model: meta.model,
            usage: Some(usage),
            choices,
        }
    }
}

fn choice(index: u32, delta: Delta, finish_reason: Option<String>) -> ChunkChoice {
    ChunkChoice {
        index,
        delta,
        finish_reason,
    }
}

/// The request's messages as safetune messages (`developer` is read as `system`; only text
/// content is accepted).
fn to_messages(messages: Vec<ChatMessage>) -> Result<Vec<Message>, HttpError> {
    if messages.is_empty() {
        return Err(HttpError::invalid(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "developer" => Role::System,
            other => Role::parse(other).ok_or_else(|| {
                HttpError::invalid(
                    format!("messages[{i}].role is `{other}`; this server accepts system, developer, user and assistant"),
                    Some("messages"),
                )
            })?,
        };
        let content = match m.content {
            None => String::new(),
            Some(c) => c.to_text().map_err(|kind| {
                HttpError::invalid(
                    format!(
                        "messages[{i}].content has a `{kind}` part; only text parts are supported"
                    ),
                    Some("messages"),
                )
            })?,
        };
        out.push(Message::new(role, content));
    }
    Ok(out)
}
