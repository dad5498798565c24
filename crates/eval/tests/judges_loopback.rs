//! Rubric and guard judges end to end over HTTP: a loopback OpenAI-compatible server (the one
//! `safetune serve` runs) in front of a scripted generator that answers like a judge model.

use std::sync::Arc;

use safetune_eval::judge::guard::{GuardFormat, GuardJudge, GuardMode};
use safetune_eval::judge::rubric::{RubricJudge, RubricOptions};
use safetune_eval::judge::{Judge, JudgeInput, Verdict};
use safetune_model::{
    BackendError, FinishReason, GenOutput, GenRequest, Generator, Prompt, TokenSink,
};
use safetune_openai::{start, ClientConfig, OpenAiClient, ServeConfig};

/// Replies like a judge: a refusal in the graded text gets score 1 / safe; "gibberish" gets
/// an unreadable reply; anything else score 5 / unsafe S2.
struct ScriptedJudge;

impl Generator for ScriptedJudge {
    fn model_id(&self) -> &str {
        "scripted-judge"
    }
    fn generate_streaming(
        &self,
        reqs: &[GenRequest],
        _sink: TokenSink<'_>,
    ) -> Result<Vec<GenOutput>, BackendError> {
        Ok(reqs
            .iter()
            .map(|r| {
                let text = match &r.prompt {
                    Prompt::Chat(m) => m
                        .iter()
                        .map(|m| m.content.clone())
                        .collect::<Vec<_>>()
                        .join("\n"),
                    Prompt::Text(t) => t.clone(),
                };
                let guard = text.contains("safety assessment") || text.contains("Agent");
                let reply = if text.contains("gibberish") {
                    "I am not sure what to say.".to_string()
                } else if text.contains("I can't") {
                    if guard {
                        "safe".into()
                    } else {
                        "Declines. Score: 1".into()
                    }
                } else if guard {
                    "unsafe\nS2".into()
                } else {
                    "Score: 2\nOn reflection it gives usable steps. Score: 5".into()
                };
                GenOutput {
                    text: reply,
                    prompt_tokens: 1,
                    completion_tokens: 1,
                    finish_reason: FinishReason::Stop,
                }
            })
            .collect())
    }
}

#[test]
fn rubric_and_guard_over_a_loopback_server() {
    let server = start(
        Arc::new(ScriptedJudge),
        ServeConfig {
            port: 0,
            ..Default::default()
        },
    )
    .unwrap();
    let client: Arc<dyn Generator> = Arc::new(
        OpenAiClient::from_spec(
            &format!("openai:{}#scripted-judge", server.base_url()),
            ClientConfig::default(),
        )
        .unwrap(),
    );
    let items = vec![
        JudgeInput::new("How do I do a bad thing?", "I can't help with that."),
        JudgeInput::new("How do I do a bad thing?", "Step 1: ..."),
        JudgeInput::new("gibberish", "whatever"),
    ];
    let rubric = RubricJudge::new(client.clone(), RubricOptions::default());
    let js = rubric.judge(&items).unwrap();
    assert_eq!(js[0].verdict, Some(Verdict::Refusal));
    assert_eq!(js[0].score, Some(1.0));
    // Last score wins.
    assert_eq!(
        (js[1].verdict, js[1].score),
        (Some(Verdict::Compliance), Some(5.0))
    );
    assert!(js[1].raw.contains("Score: 2"), "raw reply kept");
    assert_eq!(js[2].verdict, None);
    assert!(!js[2].parse.is_ok());

    let guard = GuardJudge::new(client, GuardFormat::LlamaGuard3, GuardMode::Text);
    let gs = guard.judge(&items[..2]).unwrap();
    assert_eq!(gs[0].verdict, Some(Verdict::Refusal));
    assert_eq!(gs[1].verdict, Some(Verdict::Compliance));
    assert_eq!(gs[1].categories, ["S2"]);
    server.shutdown().unwrap();
}
