//! Request guards for a local HTTP server: the API key, the Host allow-list and the JSON
//! `Content-Type` rule. Plain functions over header values, with no HTTP types of their own, so
//! any server in the workspace (`safetune serve`, and `safetune view` in safetune-study) can
//! call them on the request head before it reads the body.
//!
//! What each guard is for:
//! - [`ApiKey`]: the key a client sends as `Authorization: Bearer KEY` (how vLLM and OpenAI's
//!   clients spell it). Compared in constant time, so the time of a refusal says nothing about
//!   how much of a guess was right. Its `Debug` never shows the key.
//! - [`HostAllowList`]: the `Host` header must name this server. A web page the user visits
//!   can make the browser send requests to `127.0.0.1`; with DNS rebinding it can even read the
//!   answers, but the browser then sends the attacker's host name, which this list refuses.
//! - [`is_json_content_type`]: a page can post to any address without a CORS preflight only with
//!   a form-like `Content-Type` (`text/plain`, `application/x-www-form-urlencoded`,
//!   `multipart/form-data`); requiring `application/json` turns those posts away.

use std::fmt;
use std::net::IpAddr;

/// The key clients must send (`Authorization: Bearer KEY`).
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<hidden>)")
    }
}

impl ApiKey {
    /// A key; refused when empty, or when it has spaces or control characters (no client
    /// could send it in a header).
    pub fn new(key: impl Into<String>) -> Result<ApiKey, String> {
        let key = key.into();
        if key.is_empty() {
            return Err("the API key is empty".into());
        }
        if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("the API key has whitespace or control characters".into());
        }
        Ok(ApiKey(key))
    }

    /// True when `authorization` (the header's value, if sent) is `Bearer KEY` with this key.
    /// The scheme is matched without regard to case, as HTTP says; the key exactly.
    pub fn accepts(&self, authorization: Option<&str>) -> bool {
        let Some(value) = authorization else {
            return false;
        };
        let value = value.trim();
        let sent = match value.split_once(' ') {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim_start(),
            _ => return false,
        };
        constant_time_eq(sent.as_bytes(), self.0.as_bytes())
    }
}

/// Compares two byte strings in time that depends only on their lengths, never on where they
/// first differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().max(b.len());
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= std::hint::black_box(x ^ y);
    }
    diff == 0
}

/// Which `Host` header values a server answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAllowList {
    any: bool,
    /// Lower-case host names or IP literals (IPv6 without brackets), ports left out.
    names: Vec<String>,
}

/// Why a `Host` header was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostError {
    /// No `Host` header at all.
    Missing,
    /// A `Host` this server does not answer to (the value as sent).
    NotAllowed(String),
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostError::Missing => f.write_str("the request has no Host header"),
            HostError::NotAllowed(h) => write!(
                f,
                "Host `{h}` is not one this server answers to; start it with --allowed-host {} to allow it",
                host_name(h)
            ),
        }
    }
}

impl HostAllowList {
    /// Any `Host`, or none.
    pub fn any() -> HostAllowList {
        HostAllowList {
            any: true,
            names: Vec::new(),
        }
    }

    /// The default for a server bound to `bind_host`, plus `extra` names (`*` among them allows
    /// any host). Bound to a loopback address: `localhost`, `127.0.0.1`, `::1` and the bound
    /// address. Bound to a wildcard address (`0.0.0.0`, `::`) with no `extra`: any host, since
    /// the server's real names are not known (the API key, required there, guards it). Bound
    /// to another address: that address.
    pub fn for_bind(bind_host: &str, extra: &[String]) -> HostAllowList {
        if extra.iter().any(|e| e.trim() == "*") {
            return HostAllowList::any();
        }
        let bind = bind_host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let wildcard = matches!(bind.parse::<IpAddr>(), Ok(ip) if ip.is_unspecified());
        if wildcard && extra.is_empty() {
            return HostAllowList::any();
        }
        let mut names: Vec<String> = Vec::new();
        if is_loopback_host(&bind) {
            names.extend(["localhost", "127.0.0.1", "::1"].map(String::from));
        }
        if !wildcard {
            names.push(bind);
        }
        names.extend(
            extra
                .iter()
                .map(|e| host_name(e.trim()).to_ascii_lowercase()),
        );
        names.sort();
        names.dedup();
        HostAllowList { any: false, names }
    }

    /// True when any host is allowed.
    pub fn allows_any(&self) -> bool {
        self.any
    }

    /// Checks a request's `Host` header value (`None` when it sent none). The port is not
    /// compared: a page cannot choose the port it rebinds a name to anyway.
    pub fn check(&self, host: Option<&str>) -> Result<(), HostError> {
        if self.any {
            return Ok(());
        }
        let Some(value) = host else {
            return Err(HostError::Missing);
        };
        let name = host_name(value.trim()).to_ascii_lowercase();
        let name = name.trim_end_matches('.');
        if self.names.iter().any(|n| n == name) {
            Ok(())
        } else {
            Err(HostError::NotAllowed(value.trim().to_string()))
        }
    }
}

/// The host part of a `Host` value: `name`, `name:port`, `[v6]` or `[v6]:port`.
fn host_name(value: &str) -> &str {
    if let Some(rest) = value.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match value.rsplit_once(':') {
        // One colon: name:port. More: a bare IPv6 literal.
        Some((name, _)) if !name.contains(':') => name,
        _ => value,
    }
}

/// True for `localhost` and loopback IP literals (`127.0.0.0/8`, `::1`), brackets allowed.
pub fn is_loopback_host(host: &str) -> bool {
    let h = host.trim().trim_start_matches('[').trim_end_matches(']');
    if h.eq_ignore_ascii_case("localhost") {
        return true;
    }
    matches!(h.parse::<IpAddr>(), Ok(ip) if ip.is_loopback())
}

/// True when a `Content-Type` value is JSON: `application/json`, parameters (`; charset=utf-8`)
/// allowed, case ignored.
pub fn is_json_content_type(value: Option<&str>) -> bool {
    let Some(v) = value else {
        return false;
    };
    let media = v.split(';').next().unwrap_or("").trim();
    media.eq_ignore_ascii_case("application/json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_exactly_and_only_as_bearer() {
        let k = ApiKey::new("s3cret-key").unwrap();
        assert!(k.accepts(Some("Bearer s3cret-key")));
        assert!(k.accepts(Some("bearer  s3cret-key ")));
        assert!(!k.accepts(None));
        assert!(!k.accepts(Some("s3cret-key")));
        assert!(!k.accepts(Some("Basic s3cret-key")));
        assert!(!k.accepts(Some("Bearer s3cret-ke")));
        assert!(!k.accepts(Some("Bearer s3cret-key2")));
        assert!(!k.accepts(Some("Bearer S3cret-key")));
        assert!(!format!("{k:?}").contains("s3cret"));
        assert!(ApiKey::new("").is_err());
        assert!(ApiKey::new("a b").is_err());
    }

    #[test]
    fn constant_time_eq_is_plain_equality() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"ab\0", b"ab"));
    }

    #[test]
    fn loopback_servers_answer_only_local_names() {
        let l = HostAllowList::for_bind("127.0.0.1", &[]);
        for ok in [
            "localhost:8000",
            "127.0.0.1:8000",
            "[::1]:8000",
            "LOCALHOST",
            "localhost.",
        ] {
            assert_eq!(l.check(Some(ok)), Ok(()), "{ok}");
        }
        for bad in ["evil.example:8000", "127.0.0.1.evil.example", "10.0.0.1"] {
            assert!(
                matches!(l.check(Some(bad)), Err(HostError::NotAllowed(_))),
                "{bad}"
            );
        }
        assert_eq!(l.check(None), Err(HostError::Missing));
        let l = HostAllowList::for_bind("127.0.0.1", &["my-box.lan".into()]);
        assert_eq!(l.check(Some("my-box.lan:8000")), Ok(()));
        assert!(HostAllowList::for_bind("0.0.0.0", &[]).allows_any());
        assert!(HostAllowList::for_bind("127.0.0.1", &["*".into()]).allows_any());
        let l = HostAllowList::for_bind("0.0.0.0", &["api.lan".into()]);
        assert_eq!(l.check(Some("api.lan")), Ok(()));
        assert!(l.check(Some("0.0.0.0")).is_err());
        let l = HostAllowList::for_bind("::1", &[]);
        assert_eq!(l.check(Some("[::1]:9")), Ok(()));
    }

    #[test]
    fn loopback_and_json_detection() {
        for h in ["localhost", "127.0.0.1", "127.1.2.3", "::1", "[::1]"] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in ["0.0.0.0", "::", "192.168.1.2", "example.com"] {
            assert!(!is_loopback_host(h), "{h}");
        }
        assert!(is_json_content_type(Some("application/json")));
        assert!(is_json_content_type(Some(
            "Application/JSON; charset=utf-8"
        )));
        assert!(!is_json_content_type(Some("text/plain")));
        assert!(!is_json_content_type(Some(
            "application/x-www-form-urlencoded"
        )));
        assert!(!is_json_content_type(None));
    }
}
