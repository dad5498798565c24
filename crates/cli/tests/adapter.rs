//! `--adapter` on generate, `safetune merge` and the hidden `debug-logits`, on a tiny model the
//! test writes itself.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetune_model::adapter::{Adapter, AdapterConfig, LoraInit};
use safetune_model::testing::TinyModel;
use safetune_model::{LoadOptions, LocalEngine, ModelSpec};

mod binary;

fn safetune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_safetune"))
        .args(args)
        .output()
        .expect("run safetune")
}

fn ok(args: &[&str]) -> Output {
    let out = safetune(args);
    assert!(
        out.status.success(),
        "safetune {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const ALL: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// A tiny base model, a zero-B adapter and a random one.
fn setup(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let base = TinyModel::default().write(&root.join("base")).unwrap();
    let e = LocalEngine::load(&ModelSpec::HfDir(base.clone()), &LoadOptions::default()).unwrap();
    let cfg = AdapterConfig::lora(4, 8.0, &ALL);
    let zero = root.join("zero");
    Adapter::init(&e.model, cfg.clone(), LoraInit::Peft { seed: 1 })
        .unwrap()
        .save(&zero)
        .unwrap();
    let random = root.join("random");
    Adapter::init(
        &e.model,
        cfg,
        LoraInit::Gaussian {
            seed: 2,
            std_a: 0.2,
            std_b: 0.2,
        },
    )
    .unwrap()
    .save(&random)
    .unwrap();
    (base, zero, random)
}

fn responses(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!(
                "{}:{}",
                v["id"].as_str().unwrap(),
                v["response"].as_str().unwrap()
            )
        })
        .collect()
}

#[test]
fn generate_with_a_zero_adapter_matches_the_base_and_a_random_one_differs() {
    let root = tempfile::tempdir().unwrap();
    let (base, zero, random) = setup(root.path());
    let prompts = root.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        "{\"id\":\"a\",\"prompt\":\"hello there\"}\n{\"id\":\"b\",\"prompt\":\"the thought is\"}\n",
    )
    .unwrap();
    let run = |name: &str, extra: &[&str]| {
        let out = root.path().join(format!("{name}.jsonl"));
        let mut args = vec![
            "generate",
            "--model",
            s(&base),
            "--prompts",
            s(&prompts),
            "-o",
            s(&out),
            "--max-new-tokens",
            "10",
        ];
        args.extend_from_slice(extra);
        ok(&args);
        responses(&out)
    };
    let plain = run("base", &[]);
    assert_eq!(plain.len(), 2);
    assert_eq!(plain, run("zero", &["--adapter", s(&zero)]));
    assert_eq!(
        plain,
        run("zero-merged", &["--adapter", s(&zero), "--merge-adapter"])
    );
    let adapted = run("random", &["--adapter", s(&random)]);
    assert_ne!(plain, adapted, "a random adapter changes greedy output");
    assert_eq!(
        adapted,
        run(
            "random-merged",
            &["--adapter", s(&random), "--merge-adapter"]
        )
    );
}

fn logits(path: &Path) -> Vec<Vec<f32>> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    serde_json::from_value(v["logits"].clone()).unwrap()
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn merge_writes_a_model_with_the_adapted_logits() {
    let root = tempfile::tempdir().unwrap();
    let (base, _, random) = setup(root.path());
    let merged = root.path().join("merged");
    let out = ok(&[
        "merge",
        "--model",
        s(&base),
        "--adapter",
        s(&random),
        "-o",
        s(&merged),
    ]);
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("merged the adapter into 14 layers"), "{msg}");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(merged.join(f).is_file(), "{f}");
    }
    let ids = "5,72,101,108,108,111,32,119,263";
    let l = |name: &str, extra: &[&str]| {
        let out = root.path().join(format!("{name}.json"));
        let mut args = vec!["debug-logits", "--ids", ids, "-o", s(&out)];
        args.extend_from_slice(extra);
        ok(&args);
        logits(&out)
    };
    let with_adapter = l("adapter", &["--model", s(&base), "--adapter", s(&random)]);
    let from_merged = l("merged", &["--model", s(&merged)]);
    let plain = l("base", &["--model", s(&base)]);
    let d = max_abs_diff(&with_adapter, &from_merged);
    let effect = max_abs_diff(&with_adapter, &plain);
    println!("merged model vs base+adapter: max abs diff {d} (adapter effect {effect})");
    assert_eq!(with_adapter.len(), 9);
    assert!(d < 1e-4, "{d}");
    assert!(effect > 0.05, "{effect}");

    // A second merge into the same directory is refused and leaves it intact.
    let again = safetune(&[
        "merge",
        "--model",
        s(&base),
        "--adapter",
        s(&random),
        "-o",
        s(&merged),
    ]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));
    assert!(merged.join("model.safetensors").is_file());
}

#[test]
fn bad_adapter_and_remote_model_are_user_errors() {
    let root = tempfile::tempdir().unwrap();
    let (base, _, random) = setup(root.path());
    std::fs::write(
        random.join("adapter_config.json"),
        "{\"peft_type\": \"LORA\", \"r\": 4, \"target_modules\": [\"q_proj\", \"w_proj\"]}",
    )
    .unwrap();
    let out = safetune(&[
        "debug-logits",
        "--model",
        s(&base),
        "--adapter",
        s(&random),
        "--ids",
        "1,2",
        "-o",
        s(&root.path().join("x.json")),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("w_proj") && err.contains("adapter_config.json"),
        "{err}"
    );

    let prompts = root.path().join("p.jsonl");
    std::fs::write(&prompts, "{\"prompt\":\"hi\"}\n").unwrap();
    let out = safetune(&[
        "generate",
        "--model",
        "openai:http://127.0.0.1:9#m",
        "--adapter",
        s(&random),
        "--prompts",
        s(&prompts),
        "-o",
        s(&root.path().join("o.jsonl")),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("an adapter with an openai: model must be served by the server"),
        "{err}"
    );
}

/// One HTTP/1.1 request to the server; returns the body.
fn http(base_url: &str, method: &str, path: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let host = base_url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .trim_end_matches("/v1");
    let mut s = std::net::TcpStream::connect(host).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

#[test]
fn serve_with_an_adapter_answers_like_generate_with_it() {
    let root = tempfile::tempdir().unwrap();
    let (base, _, random) = setup(root.path());
    let prompts = root.path().join("p.jsonl");
    std::fs::write(&prompts, "{\"id\":\"a\",\"prompt\":\"hello there\"}\n").unwrap();
    let out = root.path().join("gen.jsonl");
    ok(&[
        "generate",
        "--model",
        s(&base),
        "--adapter",
        s(&random),
        "--prompts",
        s(&prompts),
        "-o",
        s(&out),
        "--max-new-tokens",
        "8",
    ]);
    let want = responses(&out)[0].trim_start_matches("a:").to_string();

    let server = binary::serve(&["--model", s(&base), "--adapter", s(&random)]);
    let url = server.url.clone();
    let models = http(&url, "GET", "/v1/models", "");
    let chat = http(
        &url,
        "POST",
        "/v1/chat/completions",
        r#"{"model":"m","messages":[{"role":"user","content":"hello there"}],"max_tokens":8,"temperature":0}"#,
    );
    drop(server);
    assert!(models.contains("base+random"), "{models}");
    let v: serde_json::Value =
        serde_json::from_str(&chat).unwrap_or_else(|e| panic!("{e}: {chat}"));
    assert_eq!(
        v["choices"][0]["message"]["content"].as_str().unwrap(),
        want,
        "{chat}"
    );
}

#[test]
fn serve_lora_answers_each_name_like_generate_with_or_without_the_adapter() {
    let root = tempfile::tempdir().unwrap();
    let (base, _, random) = setup(root.path());
    let prompts = root.path().join("p.jsonl");
    std::fs::write(&prompts, "{\"id\":\"a\",\"prompt\":\"hello there\"}\n").unwrap();
    let gen = |adapter: Option<&Path>, out: &Path| {
        let mut args = vec!["generate", "--model", s(&base)];
        if let Some(a) = adapter {
            args.extend(["--adapter", s(a)]);
        }
        args.extend(["--prompts", s(&prompts), "-o", s(out)]);
        args.extend(["--max-new-tokens", "8"]);
        ok(&args);
        responses(out)[0].trim_start_matches("a:").to_string()
    };
    let want_lora = gen(Some(&random), &root.path().join("lora.jsonl"));
    let want_base = gen(None, &root.path().join("base.jsonl"));
    assert_ne!(want_lora, want_base);

    let lora = format!("rnd={}", s(&random));
    let server = binary::serve(&[
        "--model",
        s(&base),
        "--lora",
        &lora,
        "--served-model-name",
        "tiny",
    ]);
    let url = server.url.clone();
    let models = http(&url, "GET", "/v1/models", "");
    let ask = |model: &str| {
        let body = format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"hello there"}}],"max_tokens":8,"temperature":0}}"#
        );
        http(&url, "POST", "/v1/chat/completions", &body)
    };
    let (lora_answer, base_answer, unknown) = (ask("rnd"), ask("tiny"), ask("other"));
    // Runtime loading is off without --allow-runtime-lora.
    let load = http(
        &url,
        "POST",
        "/v1/load_lora_adapter",
        &format!(r#"{{"lora_name":"x","lora_path":"{}"}}"#, s(&random)),
    );
    drop(server);
    let ids: Vec<String> = serde_json::from_str::<serde_json::Value>(&models).unwrap()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["tiny", "rnd"], "{models}");
    let content = |chat: &str| {
        let v: serde_json::Value =
            serde_json::from_str(chat).unwrap_or_else(|e| panic!("{e}: {chat}"));
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(content(&lora_answer), want_lora, "{lora_answer}");
    assert_eq!(content(&base_answer), want_base, "{base_answer}");
    assert!(unknown.contains("model_not_found"), "{unknown}");
    assert!(load.contains("unknown_url"), "{load}");
}

/// `generate --bf16` (here with an adapter, which it merges): where this CPU has AMX-BF16 it
/// writes every row, and its greedy answers track the f32 merged path's; with
/// `SAFETUNE_ISA=avx2` (or `scalar`), or on a CPU without AMX-BF16, it stops before loading
/// with a message naming AMX-BF16 and writes nothing; `--bf16 --f32` is a usage error naming
/// both flags.
#[test]
fn generate_bf16_writes_rows_on_amx_and_is_refused_before_loading_elsewhere() {
    let root = tempfile::tempdir().unwrap();
    let (base, _, random) = setup(root.path());
    let prompts = root.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        "{\"id\":\"a\",\"prompt\":\"hello there\"}\n{\"id\":\"b\",\"prompt\":\"is this ok?\"}\n",
    )
    .unwrap();
    let gen = |isa: &str, extra: &[&str], out: &Path| -> Output {
        let mut args = vec!["generate", "--model", s(&base), "--adapter", s(&random)];
        args.extend([
            "--prompts",
            s(&prompts),
            "-o",
            s(out),
            "--max-new-tokens",
            "6",
        ]);
        args.extend(extra);
        Command::new(env!("CARGO_BIN_EXE_safetune"))
            .env("SAFETUNE_ISA", isa)
            .args(&args)
            .output()
            .expect("run safetune")
    };
    let text = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();

    // Forced below AVX-512: refused before the model loads, naming AMX-BF16.
    let narrow = if safetune_model::isa::Isa::Avx2Fma.available() {
        "avx2"
    } else {
        "scalar"
    };
    let out = root.path().join("narrow.jsonl");
    let o = gen(narrow, &["--bf16"], &out);
    let err = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--bf16") && err.contains("AMX-BF16"), "{err}");
    assert!(!err.contains("loading"), "{err}");
    assert!(!out.exists());

    // --bf16 with --f32: clap's usage error, naming both.
    let o = gen(
        "auto",
        &["--bf16", "--f32"],
        &root.path().join("both.jsonl"),
    );
    let err = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--bf16") && err.contains("--f32"), "{err}");

    let out = root.path().join("bf16.jsonl");
    let o = gen("auto", &["--bf16"], &out);
    let err = text(&o);
    if safetune_model::bf16::amx_available() {
        assert!(o.status.success(), "{err}");
        let rows = responses(&out);
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert!(rows.iter().all(|r| r.len() > 2), "{rows:?}");
        // The f32 path with the adapter merged: bf16 rounding may change a greedy choice on a
        // random tiny model, but not every row's first characters.
        let f32_out = root.path().join("f32.jsonl");
        ok(&[
            "generate",
            "--model",
            s(&base),
            "--adapter",
            s(&random),
            "--merge-adapter",
            "--f32",
            "--prompts",
            s(&prompts),
            "-o",
            s(&f32_out),
            "--max-new-tokens",
            "6",
        ]);
        let want = responses(&f32_out);
        println!("bf16 {rows:?}\nf32  {want:?}");
        assert!(
            rows.iter()
                .zip(&want)
                .any(|(a, b)| a.chars().take(3).eq(b.chars().take(3))),
            "bf16 {rows:?} f32 {want:?}"
        );
    } else {
        eprintln!(
            "could not run generate --bf16: this CPU or OS lacks AMX-BF16 (tested the refusal)"
        );
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains("AMX-BF16") && err.contains("tdpbf16ps"),
            "{err}"
        );
        assert!(!out.exists());
    }
}
