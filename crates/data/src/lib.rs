//! safetune-data: the `Conversation` model, streaming dataset readers and writers, the factor
//! detectors (answer structure, identity, role-play: ARCHITECTURE.md section 7), transforms, the
//! audit, and benchmark prompt sets.

// `unsafe` only in the module that allows it (SIMD kernels).
#![deny(unsafe_code)]

pub mod assets;
pub mod audit;
pub mod conversation;
pub mod demo;
pub mod error;
#[allow(unsafe_code)] // AVX2 kernels behind runtime feature checks
pub mod factors;
mod fastjson;
pub mod mutate;
pub mod preference;
pub mod prompts;
pub mod read;
pub mod record;
pub mod stats;
pub mod transform;
pub mod util;

pub use conversation::{Conversation, Message, Role};
pub use error::{DataError, Result};
pub use factors::Structure;
