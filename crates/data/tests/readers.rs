//! Every reader on a fixture, malformed ones included; the writer round trip.

use std::path::{Path, PathBuf};

use safetune_data::read::{
    read_all, write_messages_jsonl, Columns, DatasetReader, InputFormat, ReadOptions,
};
use safetune_data::{Conversation, Role};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn read(path: &Path) -> Vec<Conversation> {
    read_all(path, &ReadOptions::default())
        .unwrap_or_else(|e| panic!("{e}"))
        .0
}

fn err(path: &Path, opts: &ReadOptions) -> String {
    let mut r = match DatasetReader::open(path, opts) {
        Ok(r) => r,
        Err(e) => return e.to_string(),
    };
    r.find_map(|x| x.err())
        .map(|e| e.to_string())
        .expect("expected an error")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[test]
fn messages_jsonl() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "m.jsonl",
        "\u{feff}{\"id\":\"a\",\"messages\":[{\"role\":\"system\",\"content\":\"S\"},{\"role\":\"user\",\"content\":\"Q\"},{\"role\":\"assistant\",\"content\":\"A\"}],\"topic\":\"x\"}\n\n{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"parts\"}]},{\"role\":\"assistant\",\"content\":\"B\"}]}\r\n",
    );
    let c = read(&p);
    assert_eq!(c.len(), 2);
    assert_eq!(c[0].id, "a");
    assert_eq!(c[0].system(), Some("S"));
    assert_eq!(c[0].meta["topic"], "x");
    assert_eq!(c[1].id, "1", "records without an id are named by position");
    assert_eq!(c[1].first_user(), Some("parts"));
}

#[test]
fn alpaca_jsonl_and_json_array() {
    let d = tempfile::tempdir().unwrap();
    let jsonl = write(d.path(), "a.jsonl", "{\"instruction\":\"Translate\",\"input\":\"hola\",\"output\":\"hello\",\"system\":\"Be brief.\"}\n{\"instruction\":\"Say hi\",\"input\":\"\",\"output\":\"hi\"}\n");
    let c = read(&jsonl);
    assert_eq!(c[0].messages.len(), 3);
    assert_eq!(c[0].first_user(), Some("Translate\n\nhola"));
    assert_eq!(c[1].first_user(), Some("Say hi"));
    // A JSON array, pretty-printed, with a string holding brackets and escaped quotes.
    let arr = write(
        d.path(),
        "a.json",
        "[\n  {\"instruction\": \"Echo [x] {y}\", \"output\": \"say \\\"[\\\" ok\"},\n  {\"instruction\": \"Two\", \"output\": \"2\"}\n]\n",
    );
    let c = read(&arr);
    assert_eq!(c.len(), 2);
    assert_eq!(c[0].first_user(), Some("Echo [x] {y}"));
    assert_eq!(
        c[0].assistant_turns().next().unwrap().content,
        "say \"[\" ok"
    );
}

#[test]
fn sharegpt() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "s.jsonl", "{\"id\":7,\"conversations\":[{\"from\":\"system\",\"value\":\"S\"},{\"from\":\"human\",\"value\":\"Q1\"},{\"from\":\"gpt\",\"value\":\"A1\"},{\"from\":\"human\",\"value\":\"Q2\"},{\"from\":\"gpt\",\"value\":\"A2\"}]}\n");
    let c = read(&p);
    assert_eq!(c[0].id, "7");
    let roles: Vec<Role> = c[0].messages.iter().map(|m| m.role).collect();
    assert_eq!(
        roles,
        [
            Role::System,
            Role::User,
            Role::Assistant,
            Role::User,
            Role::Assistant
        ]
    );
}

#[test]
fn prompt_response_jsonl() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "p.jsonl", "{\"prompt\":\"Q\",\"response\":\"A\"}\n{\"prompt\":\"Q2\",\"completion\":\"A2\"}\n{\"prompt\":\"only a prompt\"}\n");
    let c = read(&p);
    assert_eq!(c.len(), 3);
    assert_eq!(c[1].assistant_turns().next().unwrap().content, "A2");
    assert_eq!(c[2].messages.len(), 1);
}

#[test]
fn csv_rows_starting_with_a_hash_are_data_and_comments_only_lead() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "h.csv",
        "# about this file\n# second comment\nprompt,response\n#1 tip for sleep?,Rest.\n#hashtag,Tag.\nplain,Text.\n",
    );
    let c = read(&p);
    assert_eq!(c.len(), 3, "{c:?}");
    assert_eq!(c[0].first_user(), Some("#1 tip for sleep?"));
    assert_eq!(c[1].first_user(), Some("#hashtag"));
    // Line numbers count the comment lines: the ragged row is line 5 of the file.
    let p = write(
        d.path(),
        "r.csv",
        "# note\nprompt,response\nok,fine\n#x,y\nonly-one-field\n",
    );
    let err = read_all(&p, &ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("r.csv:5:"), "{err}");
}

#[test]
fn csv_with_named_and_guessed_columns() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "c.csv", "# a comment line\nid,question,answer,category\nq1,\"Why, though?\",\"Because\nof lines.\",x\nq2,Two,2,y\n");
    let c = read(&p);
    assert_eq!(c.len(), 2);
    assert_eq!(c[0].first_user(), Some("Why, though?"));
    assert_eq!(
        c[0].assistant_turns().next().unwrap().content,
        "Because\nof lines."
    );
    assert_eq!(c[0].meta["category"], "x");

    let p = write(d.path(), "n.csv", "goal_text,reply\nQ,A\n");
    let opts = ReadOptions {
        columns: Columns {
            prompt: Some("goal_text".into()),
            response: Some("reply".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let (c, _) = read_all(&p, &opts).unwrap();
    assert_eq!(c[0].first_user(), Some("Q"));
    let wrong = ReadOptions {
        columns: Columns {
            prompt: Some("nope".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let e = err(&p, &wrong);
    assert!(
        e.contains("n.csv") && e.contains("no column `nope`") && e.contains("goal_text, reply"),
        "{e}"
    );
}

#[test]
fn parquet_as_hf_datasets_writes_it() {
    let c = read(&fixtures().join("messages.parquet"));
    assert_eq!(c.len(), 3, "three rows across two row groups");
    assert_eq!(c[0].id, "p-1");
    assert_eq!(c[1].system(), Some("Act as a pirate captain."));
    assert_eq!(
        c[2].assistant_turns().next().unwrap().content,
        "## Answer\n\nIt is **4**."
    );
    assert_eq!(c[0].meta["source"], "fixture");
    let flat = read(&fixtures().join("flat.parquet"));
    assert_eq!(flat[1].first_user(), Some("What is 3 squared?"));
    assert_eq!(flat[1].assistant_turns().next().unwrap().content, "Nine.");
}

#[test]
fn malformed_inputs_name_file_line_and_field() {
    let d = tempfile::tempdir().unwrap();
    let ok = "{\"messages\":[{\"role\":\"user\",\"content\":\"Q\"},{\"role\":\"assistant\",\"content\":\"A\"}]}";
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "bad-json.jsonl",
            format!("{ok}\n{{\"messages\": [\n"),
            ":2: invalid JSON",
        ),
        (
            "bad-role.jsonl",
            format!("{ok}\n{ok}\n{{\"messages\":[{{\"role\":\"wizard\",\"content\":\"x\"}}]}}\n"),
            ":3: field `messages[0].role`: unknown role `wizard`",
        ),
        (
            "no-content.jsonl",
            "{\"messages\":[{\"role\":\"user\"}]}\n".to_string(),
            ":1: field `messages[0].content`: missing",
        ),
        (
            "wrong-type.jsonl",
            "{\"messages\":\"hello\"}\n".to_string(),
            ":1: field `messages`: invalid type",
        ),
        (
            "no-output.jsonl",
            "{\"instruction\":\"x\"}\n".to_string(),
            ":1: field `output`: missing",
        ),
        (
            "unknown.jsonl",
            "{\"foo\":1}\n".to_string(),
            ":1: cannot tell the record layout",
        ),
        (
            "truncated.json",
            "[{\"instruction\":\"x\",\"output\":\"y\"}, {\"instruction\":\"x\"".to_string(),
            "JSON array ends early",
        ),
        (
            "ragged.csv",
            "prompt,response\na,b\nc,d,e\n".to_string(),
            ":3: expected 2 fields, found 3",
        ),
        (
            "no-prompt.csv",
            "foo,bar\n1,2\n".to_string(),
            "no prompt column",
        ),
        (
            "garbage.parquet",
            "PAR1 not really".to_string(),
            "not a readable Parquet file",
        ),
    ];
    for (name, text, want) in cases {
        let p = write(d.path(), name, &text);
        let e = err(&p, &ReadOptions::default());
        assert!(e.contains(name), "error should name the file: {e}");
        assert!(e.contains(want), "{name}: expected {want:?} in {e:?}");
    }
    let missing = err(
        Path::new("/nonexistent/data.jsonl"),
        &ReadOptions::default(),
    );
    assert!(
        missing.contains("/nonexistent/data.jsonl") && missing.contains("No such file"),
        "{missing}"
    );
}

#[test]
fn skip_invalid_skips_and_reports_why() {
    let d = tempfile::tempdir().unwrap();
    let ok = "{\"messages\":[{\"role\":\"user\",\"content\":\"Q\"},{\"role\":\"assistant\",\"content\":\"A\"}]}";
    let text = format!("{ok}\nnot json\n{ok}\n{{\"messages\":[{{\"role\":\"wizard\",\"content\":\"x\"}}]}}\n{{\"messages\": [\n{ok}\n");
    let p = write(d.path(), "mixed.jsonl", &text);
    let opts = ReadOptions {
        skip_invalid: true,
        ..Default::default()
    };
    let mut r = DatasetReader::open(&p, &opts).unwrap();
    let lines: Vec<usize> = r.by_ref().map(|x| x.unwrap().line).collect();
    assert_eq!(lines, [1, 3, 6]);
    let s = r.skipped();
    assert_eq!(s.count, 3);
    assert_eq!(s.reasons.values().sum::<usize>(), 3);
    assert!(
        s.reasons.keys().any(|k| k.contains("messages[0].role")),
        "{:?}",
        s.reasons
    );
    assert!(
        s.examples.iter().any(|e| e.contains("mixed.jsonl:2:")),
        "{:?}",
        s.examples
    );
    // Without the flag the first bad line stops the read.
    let e = err(&p, &ReadOptions::default());
    assert!(e.contains("mixed.jsonl:2: invalid JSON"), "{e}");
}

#[test]
fn forced_format_overrides_detection() {
    let d = tempfile::tempdir().unwrap();
    // Has both `prompt` and `messages`; auto picks messages, the override picks prompt-response.
    let p = write(d.path(), "both.jsonl", "{\"prompt\":\"P\",\"response\":\"R\",\"messages\":[{\"role\":\"user\",\"content\":\"M\"}]}\n");
    assert_eq!(read(&p)[0].first_user(), Some("M"));
    let opts = ReadOptions {
        format: InputFormat::PromptResponse,
        ..Default::default()
    };
    assert_eq!(read_all(&p, &opts).unwrap().0[0].first_user(), Some("P"));
    // A `.txt` file holding JSONL is sniffed by its first byte.
    let t = write(d.path(), "data.txt", "{\"prompt\":\"P\"}\n");
    assert_eq!(read(&t).len(), 1);
}

#[test]
fn writer_round_trip_is_atomic() {
    let d = tempfile::tempdir().unwrap();
    let src = write(d.path(), "s.jsonl", "{\"conversations\":[{\"from\":\"human\",\"value\":\"Q\"},{\"from\":\"gpt\",\"value\":\"A\"}],\"id\":\"x\",\"k\":1}\n");
    let c = read(&src);
    let out = d.path().join("sub/out.jsonl");
    assert_eq!(write_messages_jsonl(&out, &c).unwrap(), 1);
    let back = read(&out);
    assert_eq!(back, c);
    let names: Vec<String> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["out.jsonl"], "no temporary file left behind");
}
