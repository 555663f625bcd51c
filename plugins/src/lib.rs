//! Built-in plugins. Each registers itself with `inventory` under its kind and name; the host
//! finds them through `autodeploy_core::registry`.

pub mod compile {
    pub mod simple;
}
pub mod importers {
    pub mod decoder;
    pub mod hf;
}

/// Referencing this from a binary keeps the crate (and so its registrations) linked in.
pub fn link() {}
