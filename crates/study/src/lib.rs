//! safetune-study: composes the pipeline stages into studies. For now it holds the quickstart;
//! the factorial study runner, store and report grow here (issue 7).

pub mod quickstart;
