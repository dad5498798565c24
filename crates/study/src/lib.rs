//! safetune-study: see DESIGN.md section 2.
