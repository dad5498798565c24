//! Writes inputs for comparing adapters with Python PEFT (bench/peft_compare.py):
//!
//! ```text
//! peft_fixture tiny DIR                       # the tiny random Llama of the test suite
//! peft_fixture random-adapter MODEL OUT [R ALPHA SEED]
//!                                             # a LoRA on all seven projections, A and B random
//! ```

use std::path::PathBuf;

use safetune_model::testing::TinyModel;
use safetune_model::{LoadOptions, LocalEngine, ModelSpec};
use safetune_train::peft::{Adapter, AdapterConfig, LoraInit, LINEAR_MODULES};

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("tiny") if args.len() == 2 => {
            let dir = TinyModel::default().write(&PathBuf::from(&args[1]))?;
            println!("{}", dir.display());
        }
        Some("random-adapter") if args.len() >= 3 => {
            let num = |i: usize, d: f64| -> Result<f64, Box<dyn std::error::Error>> {
                Ok(match args.get(i) {
                    Some(s) => s.parse()?,
                    None => d,
                })
            };
            let (r, alpha, seed) = (num(3, 8.0)? as usize, num(4, 16.0)?, num(5, 1.0)? as u64);
            let spec = ModelSpec::parse(&args[1])?;
            let engine = LocalEngine::load(&spec, &LoadOptions::default())?;
            let mut cfg = AdapterConfig::lora(r, alpha, &LINEAR_MODULES);
            cfg.base_model_name_or_path = Some(args[1].clone());
            // Std of B chosen so the adapter visibly moves the logits without swamping them.
            let a = Adapter::init(
                &engine.model,
                cfg,
                LoraInit::Gaussian {
                    seed,
                    std_a: 0.05,
                    std_b: 0.05,
                },
            )?;
            a.save(&PathBuf::from(&args[2]))?;
            println!("{}", args[2]);
        }
        _ => {
            return Err(
                "usage: peft_fixture tiny DIR | random-adapter MODEL OUT [R ALPHA SEED]".into(),
            )
        }
    }
    Ok(())
}
