//! `DatasetReader::next_ref` (the zero-allocation path for messages JSONL) against the general
//! iterator: the same examples, lines, ids, errors and skip counts, on generated files that mix
//! the simple shape with every kind of line the fast path must hand back to the general reader.

use std::path::Path;

use proptest::prelude::*;
use safetune_data::read::{DatasetReader, ReadOptions};
use safetune_data::Role;

/// What a reader yields: per example (line, id, messages) or an error message; and skip count.
type Seen = (
    Vec<Result<(usize, String, Vec<(Role, String)>), String>>,
    usize,
);

fn by_iterator(path: &Path, opts: &ReadOptions) -> Seen {
    let mut r = DatasetReader::open(path, opts).unwrap();
    let mut out = Vec::new();
    for ex in r.by_ref() {
        out.push(
            ex.map(|e| {
                let msgs = e
                    .conversation
                    .messages
                    .iter()
                    .map(|m| (m.role, m.content.clone()))
                    .collect();
                (e.line, e.conversation.id, msgs)
            })
            .map_err(|e| e.to_string()),
        );
    }
    (out, r.skipped().count)
}

fn by_ref(path: &Path, opts: &ReadOptions) -> Seen {
    let mut r = DatasetReader::open(path, opts).unwrap();
    let mut out = Vec::new();
    while let Some(ex) = r.next_ref() {
        out.push(
            ex.map(|e| {
                let msgs = e.messages().map(|(r, t)| (r, t.to_string())).collect();
                let id = e.id().map_or_else(|| e.index.to_string(), str::to_string);
                (e.line, id, msgs)
            })
            .map_err(|e| e.to_string()),
        );
    }
    (out, r.skipped().count)
}

/// Lines the fast path must not take (other keys, types, roles, broken JSON), and blank lines.
const ODD_LINES: &[&str] = &[
    r#"{"messages": [{"role": "user", "content": "meta"}], "meta": {"k": 1}}"#,
    r#"{"id": 7, "messages": [{"role": "user", "content": "numeric id"}]}"#,
    r#"{"messages": [{"role": "Human", "content": "role name"}, {"role": "gpt", "content": "x"}]}"#,
    r#"{"system": "Be brief.", "messages": [{"role": "user", "content": "system key"}]}"#,
    r#"{"messages": [{"from": "user", "value": "sharegpt keys"}]}"#,
    r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "parts"}]}]}"#,
    r#"{"messages": [{"role": "user", "content": null}]}"#,
    r#"{"messages": [{"role": "wizard", "content": "bad role"}]}"#,
    r#"{"messages": []}"#,
    r#"{"messages": [{"role": "user", "content": "lone \ud800"}]}"#,
    r#"{"messages": [{"role": "user", "content": "cut"#,
    r#"{"messages": [{"role": "user", "content": "x"}]} tail"#,
    "",
    "   ",
];

fn message() -> impl Strategy<Value = (usize, String)> {
    // Any text: quotes, backslashes, control characters, non-ASCII and astral characters.
    (0usize..3, "(\\PC|[\"\\\\\n\t\u{1}\u{1F600}é]){0,40}")
}

fn line() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (
            prop::option::of("[a-z0-9\"\\\\é-]{0,8}"),
            prop::collection::vec(message(), 1..4),
            any::<bool>(),
        )
            .prop_map(|(id, msgs, pretty)| {
                let roles = ["system", "user", "assistant"];
                let msgs: Vec<_> = msgs
                    .into_iter()
                    .map(|(r, c)| serde_json::json!({"role": roles[r], "content": c}))
                    .collect();
                let mut v = serde_json::json!({ "messages": msgs });
                if let Some(id) = id {
                    v["id"] = id.into();
                }
                let s = serde_json::to_string(&v).unwrap();
                // Spacing as other writers use it: after separators, around the object.
                if pretty {
                    format!(" {} ", s.replace("\":", "\": ").replace(",\"", ", \""))
                } else {
                    s
                }
            }),
        1 => (0..ODD_LINES.len()).prop_map(|i| ODD_LINES[i].to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn fast_path_reads_what_the_iterator_reads(
        lines in prop::collection::vec(line(), 1..25),
        bom in any::<bool>(),
    ) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("data.jsonl");
        let mut text = if bom { "\u{feff}".to_string() } else { String::new() };
        // The first record fixes the layout as messages, as it does for real files.
        text.push_str(r#"{"id": "first", "messages": [{"role": "user", "content": "hi"}]}"#);
        text.push('\n');
        text.push_str(&lines.join("\n"));
        std::fs::write(&p, text).unwrap();
        for skip_invalid in [false, true] {
            let opts = ReadOptions { skip_invalid, ..ReadOptions::default() };
            prop_assert_eq!(by_iterator(&p, &opts), by_ref(&p, &opts));
        }
    }
}

#[test]
fn fast_path_and_fallback_lines_interleave() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("mixed.jsonl");
    let mut text = String::new();
    for (i, odd) in ODD_LINES.iter().enumerate() {
        text.push_str(&format!(
            "{{\"id\": \"s{i}\", \"messages\": [{{\"role\": \"assistant\", \"content\": \"a\\nb \\\"{i}\\\"\"}}]}}\n{odd}\n"
        ));
    }
    std::fs::write(&p, text).unwrap();
    let opts = ReadOptions {
        skip_invalid: true,
        ..ReadOptions::default()
    };
    let (fast, skipped) = by_ref(&p, &opts);
    assert_eq!((fast.clone(), skipped), by_iterator(&p, &opts));
    // Every simple line and every valid odd line came through; the six broken ones (null
    // content, unknown role, no messages, cut off, trailing text, and the lone surrogate, which
    // the general reader rejects) were skipped.
    assert_eq!(skipped, 6);
    assert_eq!(fast.len(), 2 * ODD_LINES.len() - 2 - skipped);
    let first = fast[0].as_ref().unwrap();
    assert_eq!(first.2, vec![(Role::Assistant, "a\nb \"0\"".to_string())]);
}
