//! One raw record of any supported layout, deserialised in a single pass without building a
//! `serde_json::Value` for the fields we know (that is what keeps `audit` fast), and its
//! conversion into a `Conversation` under a given schema.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::conversation::{Conversation, Message, Role};

/// The record layouts a reader accepts (ARCHITECTURE.md section 6); the container (JSONL, JSON,
/// CSV, Parquet) is separate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    /// OpenAI chat: `messages: [{role, content}]`.
    Messages,
    /// Alpaca: `instruction`, `input`, `output`, optional `system`.
    Alpaca,
    /// ShareGPT: `conversations: [{from, value}]`.
    ShareGpt,
    /// `prompt` (or `question`) and `response` (or `completion`, `answer`, `output`).
    PromptResponse,
}

impl Schema {
    pub fn name(self) -> &'static str {
        match self {
            Schema::Messages => "messages",
            Schema::Alpaca => "alpaca",
            Schema::ShareGpt => "sharegpt",
            Schema::PromptResponse => "prompt-response",
        }
    }

    /// The schema a record's fields point to, if any.
    pub fn detect(rec: &RawRecord) -> Option<Schema> {
        if rec.messages.is_some() {
            Some(Schema::Messages)
        } else if rec.conversations.is_some() {
            Some(Schema::ShareGpt)
        } else if rec.instruction.is_some() {
            Some(Schema::Alpaca)
        } else if rec.prompt.is_some() {
            Some(Schema::PromptResponse)
        } else {
            None
        }
    }
}

/// A message as written in a file: `role`/`from` and `content`/`value`/`text`. A known role is
/// parsed while reading (no allocation); an unknown one is kept for the error message.
#[derive(Debug, Default, Clone)]
pub struct RawMessage {
    pub role: Option<Result<Role, String>>,
    pub content: Option<String>,
}

/// Every field any layout uses; unknown fields are kept in `extra` and end up in `meta`.
#[derive(Debug, Default, Clone)]
pub struct RawRecord {
    pub id: Option<String>,
    pub messages: Option<Vec<RawMessage>>,
    pub conversations: Option<Vec<RawMessage>>,
    pub instruction: Option<String>,
    pub input: Option<String>,
    pub output: Option<String>,
    pub system: Option<String>,
    pub prompt: Option<String>,
    pub response: Option<String>,
    pub meta: Option<Map<String, Value>>,
    pub extra: Map<String, Value>,
}

/// Why a record could not be converted: the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl RawRecord {
    /// Converts under `schema`; `fallback_id` names records that carry no `id`.
    pub fn into_conversation(
        self,
        schema: Schema,
        fallback_id: impl FnOnce() -> String,
    ) -> Result<Conversation, FieldError> {
        let missing = |field: &str| FieldError {
            field: field.to_string(),
            message: "missing".to_string(),
        };
        let mut messages = Vec::new();
        match schema {
            Schema::Messages | Schema::ShareGpt => {
                let key = if schema == Schema::Messages {
                    "messages"
                } else {
                    "conversations"
                };
                let raw = if schema == Schema::Messages {
                    self.messages
                } else {
                    self.conversations
                };
                let raw = raw.ok_or_else(|| missing(key))?;
                if let Some(system) = self.system.filter(|s| !s.trim().is_empty()) {
                    messages.push(Message::system(system));
                }
                for (i, m) in raw.into_iter().enumerate() {
                    let role = m.role.ok_or_else(|| missing(&format!("{key}[{i}].role")))?;
                    let role = role.map_err(|name| FieldError {
                        field: format!("{key}[{i}].role"),
                        message: format!(
                            "unknown role `{name}` (expected system, user or assistant)"
                        ),
                    })?;
                    let content = m
                        .content
                        .ok_or_else(|| missing(&format!("{key}[{i}].content")))?;
                    messages.push(Message::new(role, content));
                }
                if messages.is_empty() {
                    return Err(FieldError {
                        field: key.to_string(),
                        message: "no messages".to_string(),
                    });
                }
            }
            Schema::Alpaca => {
                let instruction = self.instruction.ok_or_else(|| missing("instruction"))?;
                let output = self.output.ok_or_else(|| missing("output"))?;
                if let Some(system) = self.system.filter(|s| !s.trim().is_empty()) {
                    messages.push(Message::system(system));
                }
                let user = match self.input.filter(|s| !s.trim().is_empty()) {
                    Some(input) => format!("{instruction}\n\n{input}"),
                    None => instruction,
                };
                messages.push(Message::user(user));
                messages.push(Message::assistant(output));
            }
            Schema::PromptResponse => {
                let prompt = self.prompt.ok_or_else(|| missing("prompt"))?;
                if let Some(system) = self.system.filter(|s| !s.trim().is_empty()) {
                    messages.push(Message::system(system));
                }
                messages.push(Message::user(prompt));
                if let Some(response) = self.response.or(self.output) {
                    messages.push(Message::assistant(response));
                }
            }
        }
        let mut meta = self.meta.unwrap_or_default();
        for (k, v) in self.extra {
            meta.entry(k).or_insert(v);
        }
        Ok(Conversation {
            id: self.id.unwrap_or_else(fallback_id),
            messages,
            meta,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Deserialisation by hand: one pass, typed fields, errors that name the field.

/// Text that may be written as a string, null, a number, or a list of content parts
/// (`[{"type": "text", "text": "..."}]`).
struct Text(Option<String>);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list of text parts")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(Some(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text, E> {
                Ok(Text(Some(v)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Text, D::Error> {
                Text::deserialize(d)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Text, E> {
                Ok(Text(Some(v.to_string())))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Text, E> {
                Ok(Text(Some(v.to_string())))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Text, E> {
                Ok(Text(Some(v.to_string())))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Text, A::Error> {
                let mut out = String::new();
                while let Some(part) = seq.next_element::<Value>()? {
                    match part {
                        Value::String(s) => out.push_str(&s),
                        Value::Object(o) => {
                            if let Some(Value::String(s)) = o.get("text") {
                                out.push_str(s);
                            }
                        }
                        _ => {}
                    }
                }
                Ok(Text(Some(out)))
            }
        }
        d.deserialize_any(V)
    }
}

/// A role name, parsed without allocating when it is a known one.
struct RoleText(Option<Result<Role, String>>);

impl<'de> Deserialize<'de> for RoleText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RoleText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a role name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RoleText, E> {
                Ok(RoleText(Some(Role::parse(v).ok_or_else(|| v.to_string()))))
            }
            fn visit_unit<E: de::Error>(self) -> Result<RoleText, E> {
                Ok(RoleText(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<RoleText, E> {
                Ok(RoleText(None))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for RawMessage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawMessage;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a message object with role and content")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawMessage, A::Error> {
                let mut msg = RawMessage::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match key.as_ref() {
                        "role" | "from" => {
                            msg.role = map.next_value::<RoleText>()?.0;
                        }
                        "content" | "value" | "text" => {
                            let t = map.next_value::<Text>()?.0;
                            if msg.content.is_none() {
                                msg.content = t;
                            }
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(msg)
            }
        }
        d.deserialize_map(V)
    }
}

fn field<'de, A: MapAccess<'de>, T: Deserialize<'de>>(
    map: &mut A,
    name: &str,
) -> Result<T, A::Error> {
    map.next_value::<T>()
        .map_err(|e| de::Error::custom(format!("field `{name}`: {e}")))
}

impl<'de> Deserialize<'de> for RawRecord {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawRecord;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawRecord, A::Error> {
                let mut r = RawRecord::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    let k = key.as_ref();
                    match k {
                        "id" => r.id = field::<_, Text>(&mut map, k)?.0,
                        "messages" => {
                            r.messages = field::<_, Option<Vec<RawMessage>>>(&mut map, k)?
                        }
                        "conversations" => {
                            r.conversations = field::<_, Option<Vec<RawMessage>>>(&mut map, k)?
                        }
                        "instruction" => r.instruction = field::<_, Text>(&mut map, k)?.0,
                        "input" => r.input = field::<_, Text>(&mut map, k)?.0,
                        "output" => r.output = field::<_, Text>(&mut map, k)?.0,
                        "system" | "system_prompt" => r.system = field::<_, Text>(&mut map, k)?.0,
                        "prompt" | "question" | "query" => {
                            let t = field::<_, Text>(&mut map, k)?.0;
                            if r.prompt.is_none() {
                                r.prompt = t;
                            }
                        }
                        "response" | "completion" | "answer" => {
                            let t = field::<_, Text>(&mut map, k)?.0;
                            if r.response.is_none() {
                                r.response = t;
                            }
                        }
                        "meta" | "metadata" => {
                            r.meta = field::<_, Option<Map<String, Value>>>(&mut map, k)?
                        }
                        _ => {
                            let v = field::<_, Value>(&mut map, k)?;
                            r.extra.insert(k.to_string(), v);
                        }
                    }
                }
                Ok(r)
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_parts_and_numbers_become_text() {
        let r: RawRecord = serde_json::from_str(
            r#"{"id": 7, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}, {"role": "assistant", "content": "c"}], "category": "x"}"#,
        )
        .unwrap();
        let c = r
            .into_conversation(Schema::Messages, || "fallback".into())
            .unwrap();
        assert_eq!(c.id, "7");
        assert_eq!(c.messages[0].content, "ab");
        assert_eq!(c.meta["category"], "x");
    }

    #[test]
    fn wrong_type_names_the_field() {
        let e = serde_json::from_str::<RawRecord>(r#"{"messages": "oops"}"#).unwrap_err();
        assert!(e.to_string().contains("field `messages`"), "{e}");
    }

    #[test]
    fn unknown_role_names_the_index() {
        let r: RawRecord =
            serde_json::from_str(r#"{"messages": [{"role": "narrator", "content": "x"}]}"#)
                .unwrap();
        let e = r
            .into_conversation(Schema::Messages, || "f".into())
            .unwrap_err();
        assert_eq!(e.field, "messages[0].role");
        assert!(e.message.contains("narrator"));
    }
}
