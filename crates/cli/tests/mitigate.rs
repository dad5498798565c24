//! `safetune mitigate project` on a tiny model the test writes: an aligned adapter covering some
//! layers, its merged model, and a random tuned adapter.

use std::path::Path;

use safetune_model::adapter::{Adapter, AdapterConfig, LoraInit};
use safetune_model::testing::TinyModel;
use safetune_model::{LoadOptions, LocalEngine, ModelSpec};

mod binary;
use binary::{ok, safetune};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn mitigate_project_writes_an_adapter_a_table_and_a_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let base = TinyModel::default().write(&root.join("base")).unwrap();
    let e = LocalEngine::load(&ModelSpec::HfDir(base.clone()), &LoadOptions::default()).unwrap();
    let gaussian = |seed| LoraInit::Gaussian {
        seed,
        std_a: 0.2,
        std_b: 0.2,
    };
    let aligned = root.join("aligned");
    Adapter::init(
        &e.model,
        AdapterConfig::lora(2, 4.0, &["q_proj", "up_proj"]),
        gaussian(5),
    )
    .unwrap()
    .save(&aligned)
    .unwrap();
    let tuned = root.join("tuned");
    Adapter::init(
        &e.model,
        AdapterConfig::lora(4, 8.0, &["q_proj", "v_proj", "up_proj"]),
        gaussian(6),
    )
    .unwrap()
    .save(&tuned)
    .unwrap();

    // Factor route, exact projector, every layer with a similarity projected.
    let out = root.join("out");
    let o = safetune(&[
        "mitigate",
        "project",
        "--adapter",
        s(&tuned),
        "--aligned",
        s(&aligned),
        "--base",
        s(&base),
        "-o",
        s(&out),
        "--projector",
        "exact",
        "--threshold",
        "2",
    ]);
    let stdout = ok(&o);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("module") && lines[0].contains("similarity"),
        "{stdout}"
    );
    assert_eq!(lines.len(), 1 + 6 + 1, "{stdout}");
    let row = lines
        .iter()
        .find(|l| l.starts_with("model.layers.1.self_attn.q_proj"))
        .unwrap();
    assert!(row.ends_with("yes") && row.contains(" 2 "), "{row}");
    let row = lines
        .iter()
        .find(|l| l.starts_with("model.layers.0.self_attn.v_proj"))
        .unwrap();
    assert!(row.ends_with("no (V = 0)") && row.contains(" - "), "{row}");
    let last = lines.last().unwrap();
    assert!(
        last.starts_with("projected 4 of 6 layers (exact projector, similarity < 2"),
        "{last}"
    );
    let loaded = Adapter::load(&out).unwrap();
    assert_eq!(loaded.tensors.len(), 6);
    assert!(loaded.tensors.values().all(|p| p.rank() == 4));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("projection.json")).unwrap())
            .unwrap();
    assert_eq!(json["projected"], 4);
    assert_eq!(json["route"], "factors");

    // Defaults: scaled projector, threshold 0.5.
    let out2 = root.join("out2");
    ok(&safetune(&[
        "mitigate",
        "project",
        "--adapter",
        s(&tuned),
        "--aligned",
        s(&aligned),
        "-o",
        s(&out2),
    ]));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out2.join("projection.json")).unwrap())
            .unwrap();
    assert_eq!(json["options"]["projector"], "scaled");
    assert_eq!(json["options"]["selection"]["threshold"], 0.5);

    // Dense route: --base is required.
    let merged = root.join("merged");
    ok(&safetune(&[
        "merge",
        "-m",
        s(&base),
        "--adapter",
        s(&aligned),
        "-o",
        s(&merged),
    ]));
    let o = safetune(&[
        "mitigate",
        "project",
        "--adapter",
        s(&tuned),
        "--aligned",
        s(&merged),
        "-o",
        s(&root.join("out3")),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--base is required"), "{err}");
    let out4 = root.join("out4");
    let stdout = ok(&safetune(&[
        "mitigate",
        "project",
        "--adapter",
        s(&tuned),
        "--aligned",
        s(&merged),
        "--base",
        s(&base),
        "-o",
        s(&out4),
        "--share",
        "0.5",
    ]));
    assert!(
        stdout.lines().last().unwrap().starts_with(
            "projected 2 of 6 layers (scaled projector, share 0.5, V from the two models' weights"
        ),
        "{stdout}"
    );

    // --threshold and --share exclude each other.
    let o = safetune(&[
        "mitigate",
        "project",
        "--adapter",
        s(&tuned),
        "--aligned",
        s(&aligned),
        "-o",
        s(&root.join("out5")),
        "--threshold",
        "0.3",
        "--share",
        "0.5",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!root.join("out5").exists());
}
