//! Writes a synthetic Llama with random weights for the memory bench of `tune --quantized`
//! (bench/train_qlora.sh): a Hugging Face directory in f32 safetensors, and the same weights as
//! GGUF with the projections in Q8_0 and in Q4_0 (embeddings, norms and head f32).
//!
//!     cargo run -p safetune-train --example synthetic_llama -- OUT_DIR [LAYERS=22]
//!
//! Sizes: hidden 2048, MLP 5632, 32 query heads and 4 key/value heads of 64 (TinyLlama's
//! shapes), 22 layers (about 0.97B parameters), the byte-level test vocabulary of
//! `safetune_model::testing` (265 tokens, so the weights are almost all projections).
//! Writes OUT_DIR/hf, OUT_DIR/q8_0.gguf, OUT_DIR/q4_0.gguf; an existing file is kept.

use std::path::PathBuf;

use candle_core::quantized::GgmlDType;
use safetune_model::testing::TinyModel;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().unwrap_or_else(|| {
        eprintln!("usage: synthetic_llama OUT_DIR [LAYERS]");
        std::process::exit(2)
    }));
    let layers: usize = args
        .next()
        .map(|s| s.parse().expect("LAYERS"))
        .unwrap_or(22);
    let m = TinyModel {
        hidden_size: 2048,
        intermediate_size: 5632,
        num_hidden_layers: layers,
        num_attention_heads: 32,
        num_key_value_heads: 4,
        tie_word_embeddings: false,
        attention_bias: false,
        seed: 7,
        sharded: false,
    };
    let per_layer = 2048 * 2048 * 2 + 2048 * 256 * 2 + 3 * 2048 * 5632 + 2 * 2048;
    eprintln!(
        "synthetic Llama: {layers} layers, {:.2}B parameters in the layers",
        (layers * per_layer) as f64 / 1e9
    );
    std::fs::create_dir_all(&out)?;
    let hf = out.join("hf");
    if !hf.join("model.safetensors").is_file() {
        m.write(&hf)?;
        eprintln!("wrote {}", hf.display());
    }
    for (name, dt) in [("q8_0", GgmlDType::Q8_0), ("q4_0", GgmlDType::Q4_0)] {
        let p = out.join(format!("{name}.gguf"));
        if !p.is_file() {
            m.write_gguf_as(&p, dt)?;
            eprintln!("wrote {}", p.display());
        }
    }
    Ok(())
}
