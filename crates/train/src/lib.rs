//! safetune-train: see DESIGN.md section 2.

pub mod peft;
