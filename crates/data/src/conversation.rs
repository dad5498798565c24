//! The `Conversation` model every reader produces and every stage consumes.

use serde::{Deserialize, Serialize};

/// Who speaks a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    /// Parses the role names used by OpenAI messages and ShareGPT (`human`, `gpt`, ...).
    pub fn parse(name: &str) -> Option<Role> {
        let name = name.trim();
        let is = |k: &str| name.eq_ignore_ascii_case(k);
        if is("system") {
            Some(Role::System)
        } else if is("user") || is("human") || is("prompter") {
            Some(Role::User)
        } else if is("assistant") || is("gpt") || is("bot") || is("model") || is("chatgpt") {
            Some(Role::Assistant)
        } else {
            None
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }
}

/// A training or evaluation example: messages plus an id and free metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub id: String,
    pub messages: Vec<Message>,
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub meta: serde_json::Map<String, serde_json::Value>,
}

impl Conversation {
    pub fn new(id: impl Into<String>, messages: Vec<Message>) -> Self {
        Conversation {
            id: id.into(),
            messages,
            meta: serde_json::Map::new(),
        }
    }

    /// The system prompt, if the conversation opens with one.
    pub fn system(&self) -> Option<&str> {
        self.messages
            .iter()
            .find(|m| m.role == Role::System)
            .map(|m| m.content.as_str())
    }

    pub fn user_turns(&self) -> impl Iterator<Item = &Message> {
        self.messages.iter().filter(|m| m.role == Role::User)
    }

    pub fn assistant_turns(&self) -> impl Iterator<Item = &Message> {
        self.messages.iter().filter(|m| m.role == Role::Assistant)
    }

    /// The first user turn: the "prompt" of a single-turn example.
    pub fn first_user(&self) -> Option<&str> {
        self.user_turns().next().map(|m| m.content.as_str())
    }
}
