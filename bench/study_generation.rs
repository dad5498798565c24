//! The study's generation, timed (issue 15, item 4): the quickstart's generate steps (its
//! benchmarks, their seeded test-split samples, max new tokens and the study's batch of 32) on
//! one model, loaded as the study loads it, in three ways, alternated run by run:
//!
//! - `f32-static`: `[generation] weights = "f32"`, static batches (the path as issue 15 found it);
//! - `q8_0-static`: `weights = "quantized"` (dense weights to Q8_0 at load), static batches;
//! - `q8_0-continuous`: the same weights, continuous batching (the engine's default).
//!
//! Each step runs as `GenerateStage` runs it: all its prompts fed to the engine in one call
//! (`job::run_fed`). Then a step larger than one batch (the first ROWS AdvBench prompts, default
//! 128, the study's batch of 32 and max new tokens), Q8_0: (d) continuous batching in chunks of
//! one batch, each chunk waiting for its slowest row (how the study ran it before `run_fed`),
//! (e) continuous batching fed the whole step (how it runs now), (f) static batches. Static
//! batches are selected with `SAFETUNE_BATCHING=static`. Prints the CPU model, its ISA, every run, the medians, the
//! ratios, and whether the static and continuous answers are identical (greedy). Not run by CI.
//!
//!     cargo run --release -p safetune --example study_generation -- MODEL [RUNS] [ROWS]
//!
//! MODEL: e.g. a quickstart study's merged aligned model, `STUDY/steps/align-*/merged`; RUNS
//! (default 3) alternated runs of each way. `bench/study_generation.sh` builds and runs it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use safetune_data::prompts::PromptSet;
use safetune_data::Message;
use safetune_model::backend::{GenOutput, GenRequest, Generator, Prompt, Sampling};
use safetune_model::bench::cpu_model;
use safetune_model::job::{run_fed, FedError};
use safetune_model::{LocalEngine, ModelSpec};
use safetune_study::config::{GenWeights, StudyConfig};
use safetune_study::plan::{plan, select_prompts};
use safetune_study::stages::study_load_options;
use safetune_study::step::StepSpec;

/// The generate calls of the quickstart's generate steps of one condition: per benchmark, its
/// prompts in chunks of the generator's batch, as `GenerateStage` sends them.
fn steps() -> anyhow::Result<Vec<Vec<GenRequest>>> {
    let cfg = StudyConfig::parse(
        safetune_study::quickstart::FULL,
        Path::new("examples/quickstart.toml"),
    )?;
    let p = plan(&cfg)?;
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for step in &p.steps {
        let StepSpec::Generate {
            benchmark,
            sampling,
        } = &step.spec
        else {
            continue;
        };
        if seen.contains(&benchmark.name) {
            continue;
        }
        seen.push(benchmark.name.clone());
        let set = PromptSet::load(&benchmark.source, None)?;
        let prompts = select_prompts(&set, benchmark);
        let s = Sampling {
            max_new_tokens: sampling.max_new_tokens,
            temperature: sampling.temperature,
            seed: sampling.seed,
            ..Default::default()
        };
        out.push(
            prompts
                .items
                .iter()
                .map(|i| GenRequest {
                    prompt: Prompt::Chat(vec![Message::user(i.prompt.clone())]),
                    sampling: s.clone(),
                })
                .collect(),
        );
    }
    Ok(out)
}

fn isa() -> String {
    let mut f = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") {
            f.push("avx2");
        }
        if is_x86_feature_detected!("fma") {
            f.push("fma");
        }
        if is_x86_feature_detected!("avxvnni") {
            f.push("avxvnni");
        }
        if is_x86_feature_detected!("avx512f") {
            f.push("avx512f");
        }
        if is_x86_feature_detected!("avx512vnni") {
            f.push("avx512vnni");
        }
    }
    if f.is_empty() {
        "none of avx2/avx512".into()
    } else {
        f.join(" ")
    }
}

/// Share of equal answers. Static batches prefill left-padded prompts together, which moves the
/// attention softmax's sums and can flip near-tied greedy choices; continuous batching prefills
/// without padding and gives each prompt the answer it gets alone.
fn identical(a: &[String], b: &[String]) -> f64 {
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    same as f64 / a.len().max(1) as f64
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// How a step's prompts reach the engine.
#[derive(Clone, Copy)]
enum Feed {
    /// One `generate` call per chunk of `max_batch` prompts.
    Chunks,
    /// One `run_fed` call for the whole step, as `GenerateStage` does.
    Whole,
}

/// The answers to `reqs`, in order, fed as `GenerateStage` feeds them.
fn fed(engine: &LocalEngine, reqs: &[GenRequest]) -> anyhow::Result<Vec<String>> {
    let mut out: Vec<(usize, String)> = Vec::new();
    run_fed(
        engine,
        reqs.len(),
        &|i| reqs[i].clone(),
        0,
        &mut |rows: Vec<(usize, GenOutput)>| {
            out.extend(rows.into_iter().map(|(i, o)| (i, o.text)));
            Ok::<_, std::convert::Infallible>(())
        },
    )
    .map_err(|e| match e {
        FedError::Generator(e) => anyhow::anyhow!(e),
        FedError::Commit(e) => match e {},
    })?;
    out.sort_by_key(|r| r.0);
    Ok(out.into_iter().map(|r| r.1).collect())
}

/// One timed pass over every step: rows per second and the answers.
fn pass(
    engine: &LocalEngine,
    steps: &[Vec<GenRequest>],
    continuous: bool,
    feed: Feed,
) -> anyhow::Result<(f64, Vec<String>)> {
    std::env::set_var(
        "SAFETUNE_BATCHING",
        if continuous { "continuous" } else { "static" },
    );
    let t = Instant::now();
    let mut texts = Vec::new();
    let mut rows = 0usize;
    for reqs in steps {
        match feed {
            Feed::Chunks => {
                for chunk in reqs.chunks(engine.max_batch().max(1)) {
                    texts.extend(engine.generate(chunk)?.into_iter().map(|o| o.text));
                }
            }
            Feed::Whole => texts.extend(fed(engine, reqs)?),
        }
        rows += reqs.len();
    }
    Ok((rows as f64 / t.elapsed().as_secs_f64(), texts))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = args
        .first()
        .ok_or_else(|| anyhow::anyhow!("usage: study_generation MODEL [RUNS] [ROWS]"))?;
    let runs: usize = args.get(1).map(|r| r.parse()).transpose()?.unwrap_or(3);
    let big_rows: usize = args.get(2).map(|r| r.parse()).transpose()?.unwrap_or(128);
    let spec = ModelSpec::parse(model)?;
    let steps = steps()?;
    let rows: usize = steps.iter().map(Vec::len).sum();
    let new_tokens = steps
        .first()
        .and_then(|s| s.first())
        .map(|r| r.sampling.max_new_tokens);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("cpu: {} ({threads} threads)", cpu_model());
    println!("isa: {}", isa());
    println!("model: {model}");
    println!(
        "quickstart generate steps of one condition: {} steps, {rows} rows, max_new_tokens {new_tokens:?}, batch {}",
        steps.len(),
        study_load_options(None, GenWeights::Quantized).batch_size
    );
    let load = |w: GenWeights| -> anyhow::Result<LocalEngine> {
        Ok(LocalEngine::load(
            &spec,
            &study_load_options(None::<&PathBuf>, w),
        )?)
    };
    let f32_engine = load(GenWeights::F32)?;
    let q8 = load(GenWeights::Quantized)?;
    // Warm-up (page-in, thread pool).
    pass(&q8, &steps[..1], true, Feed::Whole)?;
    let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
    let mut same = 0.0;
    for run in 0..runs {
        let (ra, _) = pass(&f32_engine, &steps, false, Feed::Chunks)?;
        let (rb, tb) = pass(&q8, &steps, false, Feed::Whole)?;
        let (rc, tc) = pass(&q8, &steps, true, Feed::Whole)?;
        same = identical(&tb, &tc);
        println!(
            "run {run}: f32-static {ra:.2} rows/s, q8_0-static {rb:.2}, q8_0-continuous {rc:.2}"
        );
        a.push(ra);
        b.push(rb);
        c.push(rc);
    }
    let (ma, mb, mc) = (median(&a), median(&b), median(&c));
    println!("median rows/s over {runs} runs (batch 32, the study's settings):");
    println!("  (a) f32-static       {ma:.2}");
    println!("  (b) q8_0-static      {mb:.2}  ({:.2}x a)", mb / ma);
    println!(
        "  (c) q8_0-continuous  {mc:.2}  ({:.2}x a; target 5x)",
        mc / ma
    );
    println!("  share of identical answers, static against continuous: {same:.3}");

    drop(f32_engine);

    // A step larger than one batch: the first `big_rows` AdvBench prompts at the study's batch.
    let sampling = steps[0][0].sampling.clone();
    let big: Vec<GenRequest> = PromptSet::load("advbench", None)?
        .items
        .iter()
        .take(big_rows)
        .map(|i| GenRequest {
            prompt: Prompt::Chat(vec![Message::user(i.prompt.clone())]),
            sampling: sampling.clone(),
        })
        .collect();
    let big = vec![big];
    println!(
        "one step of {} AdvBench prompts, batch {}, Q8_0:",
        big[0].len(),
        q8.batch_size
    );
    let (mut d, mut e, mut f) = (Vec::new(), Vec::new(), Vec::new());
    let (mut same_de, mut same_ef) = (0.0, 0.0);
    for run in 0..runs {
        let (rd, td) = pass(&q8, &big, true, Feed::Chunks)?;
        let (re, te) = pass(&q8, &big, true, Feed::Whole)?;
        let (rf, tf) = pass(&q8, &big, false, Feed::Whole)?;
        same_de = identical(&td, &te);
        same_ef = identical(&te, &tf);
        println!(
            "run {run}: continuous-chunks {rd:.2} rows/s, continuous-fed {re:.2}, static {rf:.2}"
        );
        d.push(rd);
        e.push(re);
        f.push(rf);
    }
    let (md, me, mf) = (median(&d), median(&e), median(&f));
    println!("median rows/s over {runs} runs:");
    println!("  (d) continuous, chunks of one batch  {md:.2}");
    println!(
        "  (e) continuous, the whole step fed   {me:.2}  ({:.2}x d)",
        me / md
    );
    println!(
        "  (f) static batches                   {mf:.2}  (e is {:.2}x f)",
        me / mf
    );
    println!(
        "  share of identical answers: d against e {same_de:.3}, e against static {same_ef:.3}"
    );
    Ok(())
}
