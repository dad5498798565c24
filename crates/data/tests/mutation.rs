//! Seeded byte mutations of real dataset files (JSONL, a JSON array, CSV, TSV, Parquet): every
//! read ends in `Ok` or an error naming the file, never a panic, never an absurd allocation
//! (`CappedAlloc` refuses any single allocation over 256 MiB, which aborts the test).
//! CI runs 600 to 1200 mutants per file; `SAFETUNE_MUTATIONS=N` (or `bench/mutation`) runs
//! more.

use std::path::Path;

use safetune_data::mutate::{iterations, run, CappedAlloc};
use safetune_data::read::{read_all, ReadOptions};

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

/// Mutates `src`, writes each mutant as `dir/name` and reads it whole.
fn mutate_dataset(name: &str, src: &[u8], seed: u64, default_iters: usize) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, src).unwrap();
    // The unmutated file reads.
    read_all(&path, &ReadOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let out = run(
        name,
        src,
        seed,
        iterations(default_iters),
        |bytes| {
            std::fs::write(&path, bytes).unwrap();
            read_all(&path, &ReadOptions::default())
                .map(|_| ())
                .map_err(|e| e.to_string())
        },
        |err, what| {
            assert!(
                err.contains(name),
                "{name} ({what}): error without the file: {err}"
            )
        },
    );
    assert!(out.err > 0, "{name}: no mutant was refused: {out:?}");
}

#[test]
fn mutated_jsonl_never_panics() {
    let src = concat!(
        r#"{"id": "a", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}"#,
        "\n",
        r#"{"id": "b", "messages": [{"role": "user", "content": [{"type": "text", "text": "Parts"}]}, {"role": "assistant", "content": "ok"}], "meta": {"k": [1, 2.5, null]}}"#,
        "\n",
    );
    mutate_dataset("d.jsonl", src.as_bytes(), 1, 1200);
    let sharegpt = concat!(
        r#"{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A \u00e9\ud83d\ude00"}]}"#,
        "\n",
    );
    mutate_dataset("s.jsonl", sharegpt.as_bytes(), 8, 600);
    let alpaca = concat!(
        r#"{"instruction": "Sum", "input": "1 2", "output": "3", "system": "math"}"#,
        "\n",
        r#"{"instruction": "Name a colour", "output": "Blue", "id": 7}"#,
        "\n",
    );
    mutate_dataset("a.jsonl", alpaca.as_bytes(), 2, 800);
}

#[test]
fn mutated_json_array_never_panics() {
    let src = r#"[{"instruction": "Say hi", "output": "hi"}, {"instruction": "Count", "input": "to 3", "output": "1 2 3"}]"#;
    mutate_dataset("d.json", src.as_bytes(), 3, 1200);
}

#[test]
fn mutated_csv_and_tsv_never_panic() {
    let csv = "# a comment\nid,prompt,response,category\nq1,\"Why, though?\",\"Because\nof lines.\",x\nq2,#tag,2,y\n";
    mutate_dataset("d.csv", csv.as_bytes(), 4, 1200);
    let tsv = "instruction\tinput\toutput\nAdd\t1 2\t3\nSay\t\thi\n";
    mutate_dataset("d.tsv", tsv.as_bytes(), 5, 800);
}

#[test]
fn mutated_parquet_never_panics() {
    mutate_dataset("messages.parquet", &fixture("messages.parquet"), 6, 1200);
    mutate_dataset("flat.parquet", &fixture("flat.parquet"), 7, 1200);
}
