//! Exit codes: 0 success, 1 user error (bad input, missing file, failed step), 2 usage error
//! (clap's own). Errors print as `error: ...` with their causes and any `hint:` lines.

pub fn report(result: anyhow::Result<()>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            1
        }
    }
}
