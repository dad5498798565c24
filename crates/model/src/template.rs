//! Chat templates: the Jinja template a model ships (tokenizer_config.json or GGUF
//! `tokenizer.chat_template`) rendered with minijinja, with Python string methods (pycompat),
//! `raise_exception` and `strftime_now`, as transformers renders them.

use minijinja::{Environment, Error, ErrorKind};
use safetune_data::Message;
use serde::Serialize;

use std::path::Path;

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::spec::ModelSpec;
use crate::tokenizer::{config_chat_template, jinja_chat_template};

/// ChatML, used when a model ships no template.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Instructions one render may run: ample for any real template on a long conversation (a
/// few hundred per message), while a template that loops without end stops with an error.
pub const TEMPLATE_FUEL: u64 = 20_000_000;

/// Most bytes one render may write beyond four times the conversation's own text.
pub const TEMPLATE_OUTPUT_SLACK: usize = 1 << 20;

/// A writer that refuses bytes past `limit`, so a template cannot fill memory.
struct Capped {
    out: Vec<u8>,
    limit: usize,
    overflowed: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > self.limit {
            self.overflowed = true;
            return Err(std::io::Error::other(format!(
                "the output passed {} bytes",
                self.limit
            )));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    pub source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish()
    }
}

#[derive(Serialize)]
struct Ctx<'a> {
    messages: Vec<MsgCtx<'a>>,
    add_generation_prompt: bool,
    bos_token: &'a str,
    eos_token: &'a str,
}

#[derive(Serialize)]
struct MsgCtx<'a> {
    role: &'a str,
    content: &'a str,
}

impl ChatTemplate {
    /// Compiles a template; syntax errors name the line.
    pub fn new(source: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        // Templates come from model files: bound the work of one render.
        env.set_fuel(Some(TEMPLATE_FUEL));
        // transformers renders with trim_blocks and lstrip_blocks.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |fmt: String| -> String {
            strftime_today(&fmt)
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| ModelError::Template(format!("cannot compile: {e:#}")))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
        })
    }

    /// Renders a conversation. `add_generation_prompt` appends the opening of an assistant turn.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        bos: &str,
        eos: &str,
    ) -> Result<String> {
        let ctx = Ctx {
            messages: messages
                .iter()
                .map(|m| MsgCtx {
                    role: m.role.as_str(),
                    content: &m.content,
                })
                .collect(),
            add_generation_prompt,
            bos_token: bos,
            eos_token: eos,
        };
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| ModelError::Template(e.to_string()))?;
        let text: usize = messages.iter().map(|m| m.content.len()).sum();
        let mut out = Capped {
            out: Vec::new(),
            limit: text.saturating_mul(4).saturating_add(TEMPLATE_OUTPUT_SLACK),
            overflowed: false,
        };
        let rendered = tmpl.render_captured_to(ctx, &mut out).map(|_| ());
        if out.overflowed {
            return Err(ModelError::Template(format!(
                "cannot render: the output passed {} bytes (at most four times the \
                 conversation's text plus {TEMPLATE_OUTPUT_SLACK} bytes)",
                out.limit
            )));
        }
        rendered.map_err(|e| ModelError::Template(format!("cannot render: {e:#}")))?;
        String::from_utf8(out.out)
            .map_err(|e| ModelError::Template(format!("cannot render: not UTF-8: {e}")))
    }
}

/// The chat template a model ships, read without loading its weights: a GGUF file's
/// `tokenizer.chat_template`, a Hugging Face directory's tokenizer_config.json or
/// chat_template.jinja, or (for `hf:`) those files from the hub (cache first). `Ok(None)`: the
/// model ships none (ChatML is used), or it is served over an OpenAI-compatible API, where the
/// server applies a template of its own.
pub fn model_chat_template(spec: &ModelSpec) -> Result<Option<String>> {
    let from_dir = |dir: &Path| -> Result<Option<String>> {
        let tc = dir.join("tokenizer_config.json");
        if tc.is_file() {
            let text = std::fs::read_to_string(&tc).map_err(|e| ModelError::io(&tc, e))?;
            let cfg: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Json {
                    path: tc.clone(),
                    source: e,
                })?;
            if let Some(t) = config_chat_template(&cfg) {
                return Ok(Some(t));
            }
        }
        jinja_chat_template(dir)
    };
    match spec {
        ModelSpec::Gguf(path) => Ok(GgufFile::open(path)?
            .get_string("tokenizer.chat_template")
            .map(str::to_string)),
        ModelSpec::HfDir(dir) => from_dir(dir),
        ModelSpec::Hub { repo, revision } => {
            for file in ["tokenizer_config.json", "chat_template.jinja"] {
                if let Some(p) = crate::hub::download_file(repo, revision.as_deref(), file)? {
                    let dir = p.parent().unwrap_or(Path::new("."));
                    if let Some(t) = from_dir(dir)? {
                        return Ok(Some(t));
                    }
                }
            }
            Ok(None)
        }
        ModelSpec::OpenAi { .. } => Ok(None),
    }
}

/// Stands in for a system prompt when [`default_system_prompt`] renders a template.
const SYSTEM_SENTINEL: &str = "\u{2063}SYSTEM-PROMPT-SENTINEL\u{2063}";

/// The system prompt a chat template inserts when a conversation has no system message (e.g.
/// SmolLM2's "You are a helpful AI assistant named SmolLM, trained by Hugging Face"), or `None`
/// when it inserts none or cannot render a system message.
///
/// Renders the template twice, with only a user message and with a sentinel system message
/// before it; what the first rendering has where the second has the sentinel (between their
/// common prefix and common suffix) is the default.
pub fn default_system_prompt(template: &ChatTemplate) -> Option<String> {
    let user = Message::user("Hello.");
    let bare = template
        .render(std::slice::from_ref(&user), false, "", "")
        .ok()?;
    let with = template
        .render(&[Message::system(SYSTEM_SENTINEL), user], false, "", "")
        .ok()?;
    let at = with.find(SYSTEM_SENTINEL)?;
    let after = with.len() - at - SYSTEM_SENTINEL.len();
    let prefix = common_prefix(&bare, &with).min(at);
    let suffix = common_suffix(&bare[prefix..], &with).min(after);
    let middle = bare[prefix..bare.len() - suffix].trim();
    // Without a default the middle is empty; a template that ignores system messages renders
    // no sentinel (handled above).
    (!middle.is_empty()).then(|| middle.to_string())
}

/// Length in bytes of the longest common prefix, on a char boundary.
fn common_prefix(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or(a.len().min(b.len()), |((i, _), _)| i)
}

/// Length in bytes of the longest common suffix, on a char boundary.
fn common_suffix(a: &str, b: &str) -> usize {
    a.chars()
        .rev()
        .zip(b.chars().rev())
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x.len_utf8())
        .sum()
}

/// Today's date (UTC) for the few `strftime` codes chat templates use (`%d %b %Y`, `%Y-%m-%d`).
fn strftime_today(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    const FULL: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    fmt.replace("%d", &format!("{d:02}"))
        .replace("%m", &format!("{m:02}"))
        .replace("%Y", &y.to_string())
        .replace("%b", MONTHS[(m - 1) as usize])
        .replace("%B", FULL[(m - 1) as usize])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-Instruct's template (as in its GGUF and tokenizer_config.json).
    pub const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_system_user_with_generation_prompt() {
        let t = ChatTemplate::new(SMOLLM2_TEMPLATE).unwrap();
        let msgs = vec![
            Message::system("You are terse."),
            Message::user("Hi there!"),
        ];
        let out = t.render(&msgs, true, "", "").unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n"
        );
        let no_gen = t.render(&msgs, false, "", "").unwrap();
        assert!(!no_gen.ends_with("assistant\n"));
    }

    #[test]
    fn pycompat_methods_and_raise_exception() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ raise_exception('no assistant turns') }}{% endif %}[{{ m['content'].strip() | upper }}]{% endfor %}",
        )
        .unwrap();
        assert_eq!(
            t.render(&[Message::user("  hi  ")], false, "", "").unwrap(),
            "[HI]"
        );
        let err = t
            .render(&[Message::assistant("x")], false, "", "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no assistant turns"), "{err}");
    }

    #[test]
    fn default_system_prompt_is_found_or_none() {
        let t = ChatTemplate::new(SMOLLM2_TEMPLATE).unwrap();
        assert_eq!(
            default_system_prompt(&t).as_deref(),
            Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
        );
        let t = ChatTemplate::new(CHATML_TEMPLATE).unwrap();
        assert_eq!(default_system_prompt(&t), None);
        // A template that refuses system messages has no default to keep either.
        let t = ChatTemplate::new("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}[{{ m['content'] }}]{% endfor %}").unwrap();
        assert_eq!(default_system_prompt(&t), None);
        // A default in another block layout.
        let t = ChatTemplate::new("{% if messages[0]['role'] != 'system' %}[SYS]Be kind.[/SYS]{% endif %}{% for m in messages %}{% if m['role'] == 'system' %}[SYS]{{ m['content'] }}[/SYS]{% else %}[U]{{ m['content'] }}{% endif %}{% endfor %}").unwrap();
        assert_eq!(default_system_prompt(&t).as_deref(), Some("Be kind."));
    }

    #[test]
    fn syntax_errors_are_reported() {
        assert!(ChatTemplate::new("{% for %}").is_err());
    }

    #[test]
    fn a_template_that_loops_for_long_runs_out_of_fuel() {
        // Nine million loop turns: far past the fuel of one render.
        let t = ChatTemplate::new(
            "{% for i in range(3000) %}{% for j in range(3000) %}{% endfor %}{% endfor %}ok",
        )
        .unwrap();
        let start = std::time::Instant::now();
        let err = t
            .render(&[Message::user("hi")], false, "", "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("fuel"), "{err}");
        assert!(start.elapsed().as_secs() < 30, "{:?}", start.elapsed());
    }

    #[test]
    fn a_template_that_writes_too_much_is_stopped() {
        // 100 MB of output from a two-byte conversation.
        let t =
            ChatTemplate::new("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}").unwrap();
        let err = t
            .render(&[Message::user("hi")], false, "", "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bytes"), "{err}");
        // A real template on a long conversation stays well inside both limits.
        let t = ChatTemplate::new(SMOLLM2_TEMPLATE).unwrap();
        let long: Vec<Message> = (0..2000)
            .map(|i| Message::user(format!("message {i} ").repeat(50)))
            .collect();
        assert!(t.render(&long, true, "", "").is_ok());
    }
}
