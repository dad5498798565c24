//! Which servers get the API key (`safetune_openai::access`): https and loopback hosts only; a
//! variable named for the endpoint is refused over plain http to another host unless
//! `allow_insecure`; the default `OPENAI_API_KEY` is withheld there. No request is sent: the
//! clients are only built.

use safetune_openai::{ClientConfig, EndpointPool, OpenAiClient};

fn client(url: &str, cfg: &ClientConfig) -> Result<OpenAiClient, String> {
    OpenAiClient::from_spec(&format!("openai:{url}#m"), cfg.clone()).map_err(|e| e.to_string())
}

#[test]
fn the_default_key_goes_to_https_and_loopback_only() {
    // This test binary owns OPENAI_API_KEY: no other test in it reads the default variable.
    std::env::set_var("OPENAI_API_KEY", "sk-default-5678");
    let cfg = ClientConfig::default();
    for (url, sent) in [
        ("https://api.example.com/v1", true),
        ("http://127.0.0.1:9/v1", true),
        ("http://localhost:9/v1", true),
        ("http://[::1]:9/v1", true),
        ("http://10.1.2.3:8000/v1", false),
        ("http://gpu2:8000/v1", false),
        ("http://127.0.0.1.example.com/v1", false),
        ("http://127.0.0.1@example.com/v1", false),
    ] {
        let c = client(url, &cfg).unwrap();
        assert_eq!(c.has_api_key(), sent, "{url}");
    }
    let insecure = ClientConfig {
        allow_insecure: true,
        ..ClientConfig::default()
    };
    assert!(client("http://10.1.2.3:8000/v1", &insecure)
        .unwrap()
        .has_api_key());
}

#[test]
fn a_named_key_over_plain_http_elsewhere_is_refused() {
    std::env::set_var("SAFETUNE_TEST_NAMED_OPENAI_KEY", "sk-named-1234");
    let cfg = ClientConfig {
        api_key_env: "SAFETUNE_TEST_NAMED_OPENAI_KEY".into(),
        ..ClientConfig::default()
    };
    let err = client("http://10.1.2.3:8000/v1", &cfg).unwrap_err();
    assert!(
        err.contains("10.1.2.3")
            && err.contains("SAFETUNE_TEST_NAMED_OPENAI_KEY")
            && err.contains("allow_insecure"),
        "{err}"
    );
    assert!(!err.contains("sk-named-1234"), "{err}");
    assert!(client("https://api.example.com/v1", &cfg)
        .unwrap()
        .has_api_key());
    assert!(client("http://127.0.0.1:9/v1", &cfg).unwrap().has_api_key());
    // A pool with one such endpoint is refused as a whole.
    let eps = vec![
        ("http://127.0.0.1:9/v1".to_string(), 1),
        ("http://10.1.2.3:8000/v1".to_string(), 1),
    ];
    assert!(EndpointPool::new("m", &eps, &cfg).is_err());
    // Allowed on purpose.
    let insecure = ClientConfig {
        allow_insecure: true,
        ..cfg.clone()
    };
    assert!(client("http://10.1.2.3:8000/v1", &insecure)
        .unwrap()
        .has_api_key());
    assert!(EndpointPool::new("m", &eps, &insecure).is_ok());
    // A named variable that is not set sends nothing and refuses nothing.
    let unset = ClientConfig {
        api_key_env: "SAFETUNE_TEST_UNSET_NAMED_KEY".into(),
        ..ClientConfig::default()
    };
    assert!(!client("http://10.1.2.3:8000/v1", &unset)
        .unwrap()
        .has_api_key());
}
