//! Which hosts get the API key. A key read from the environment goes only where it is meant
//! to go:
//!
//! - to an `https://` endpoint, or to a loopback host (`localhost`, `127.0.0.0/8`, `::1`) over
//!   either scheme;
//! - never over plain `http://` to any other host, unless the user says so
//!   (`allow_insecure = true` in a study, `--allow-insecure` on the command line). When the
//!   variable was named for the endpoint (`api_key_env`, `--api-key-env`) and holds a key, that
//!   is an error naming the host and the setting; the default variable (`OPENAI_API_KEY`,
//!   read when nothing is named) is simply not sent there.
//!
//! Shared by the OpenAI-compatible client and the reward-model endpoints.

/// The environment variable read when an endpoint names none.
pub const DEFAULT_API_KEY_ENV: &str = "OPENAI_API_KEY";

/// The host of an `http(s)://` URL, without user info, port or brackets.
pub fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    // `user:pass@host`: the host is after the last `@`.
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(h) = hostport.strip_prefix('[') {
        return h.split(']').next().unwrap_or("");
    }
    hostport.rsplit_once(':').map_or(hostport, |(h, _)| h)
}

/// Whether `url` points at this machine: `localhost` or a loopback IP address (a name such as
/// `127.0.0.1.example.com` is not one).
pub fn is_loopback(url: &str) -> bool {
    let host = host_of(url);
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether `url` uses TLS.
pub fn is_https(url: &str) -> bool {
    url.get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
}

/// The key to send to `url`: the value of `api_key_env` when it is set and the rules above let
/// it go there; `Ok(None)` when there is none or it is withheld; an error when a variable named
/// for this endpoint holds a key and the endpoint is plain http to another host.
pub fn api_key_for(
    url: &str,
    api_key_env: &str,
    allow_insecure: bool,
) -> Result<Option<String>, String> {
    let key = std::env::var(api_key_env)
        .ok()
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty());
    let Some(key) = key else {
        return Ok(None);
    };
    if is_https(url) || is_loopback(url) || allow_insecure {
        return Ok(Some(key));
    }
    if api_key_env == DEFAULT_API_KEY_ENV {
        // Nothing named a key for this endpoint: the default one stays here.
        return Ok(None);
    }
    Err(format!(
        "refusing to send the API key in {api_key_env} to {} over plain http (anyone on the way \
         could read it)\nhint: use an https:// URL, or set allow_insecure = true for this model \
         (--allow-insecure) if the network is trusted",
        host_of(url)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_loopback() {
        assert_eq!(host_of("http://user:pw@gpu2:8000/v1"), "gpu2");
        assert_eq!(host_of("https://[::1]:443/v1"), "::1");
        assert_eq!(host_of("http://example.com?x=1"), "example.com");
        assert!(is_loopback("http://127.0.0.1:9/v1"));
        assert!(is_loopback("http://127.1.2.3/v1"));
        assert!(is_loopback("http://LOCALHOST:80"));
        assert!(is_loopback("http://[::1]:80/v1"));
        // Names that only look like loopback, and user info that hides the real host.
        assert!(!is_loopback("http://127.0.0.1.example.com/v1"));
        assert!(!is_loopback("http://127.0.0.1@example.com/v1"));
        assert!(!is_loopback("http://localhost.example.com/v1"));
        assert!(!is_loopback("http://10.0.0.5:8000/v1"));
        assert!(is_https("HTTPS://api.example.com"));
        assert!(!is_https("http://api.example.com"));
    }
}
