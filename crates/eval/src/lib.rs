//! safetune-eval: see DESIGN.md section 2.
