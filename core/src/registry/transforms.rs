//! Transforms: built in (`inventory`) or from libraries, run in stage order.

use autodeploy_sdk::Stage;

use crate::transform::{OptionSpec, Transform};

pub struct TransformPlugin {
    pub name: &'static str,
    pub stage: Stage,
    /// Order within the stage (lower first; ties by name).
    pub order: i32,
    pub enabled_by_default: bool,
    pub options: &'static [OptionSpec],
    pub version: &'static str,
    /// `built-in`, or which built-in plugin it belongs to (`built-in (fp8 plugin)`).
    pub origin: &'static str,
    pub make: fn() -> Box<dyn Transform>,
}

inventory::collect!(TransformPlugin);

/// A registered transform, built in or from a plugin library.
#[derive(Clone, Copy)]
pub struct TransformRef {
    pub name: &'static str,
    pub stage: Stage,
    pub order: i32,
    pub enabled_by_default: bool,
    pub options: &'static [OptionSpec],
    pub version: &'static str,
    /// `built-in`, or the library it came from.
    pub origin: &'static str,
    make: &'static (dyn Fn() -> Box<dyn Transform> + Send + Sync),
}

impl TransformRef {
    pub fn instantiate(&self) -> Box<dyn Transform> {
        (self.make)()
    }

    /// A transform from a plugin library (metadata leaked: libraries stay loaded for the
    /// process's life).
    #[allow(clippy::too_many_arguments)]
    pub fn external(
        name: &str,
        stage: Stage,
        order: i32,
        enabled_by_default: bool,
        options: &'static [OptionSpec],
        version: &str,
        origin: &str,
        make: Box<dyn Fn() -> Box<dyn Transform> + Send + Sync>,
    ) -> TransformRef {
        let leak = |s: &str| -> &'static str { Box::leak(s.to_string().into_boxed_str()) };
        TransformRef {
            name: leak(name),
            stage,
            order,
            enabled_by_default,
            options,
            version: leak(version),
            origin: leak(origin),
            make: Box::leak(make),
        }
    }
}

static EXTERNAL: std::sync::RwLock<Vec<TransformRef>> = std::sync::RwLock::new(Vec::new());

/// Adds a transform from a plugin library; refused if one of that name exists.
pub fn register_transform(t: TransformRef) -> std::result::Result<(), String> {
    if let Some(prev) = transform(t.name) {
        return Err(format!("a transform named `{}` already exists ({})", t.name, prev.origin));
    }
    EXTERNAL.write().unwrap_or_else(|e| e.into_inner()).push(t);
    Ok(())
}

/// Every registered transform, in the order the pipeline runs them.
pub fn transforms() -> Vec<TransformRef> {
    let mut v: Vec<TransformRef> = inventory::iter::<TransformPlugin>
        .into_iter()
        .map(|t| TransformRef {
            name: t.name,
            stage: t.stage,
            order: t.order,
            enabled_by_default: t.enabled_by_default,
            options: t.options,
            version: t.version,
            origin: t.origin,
            make: &t.make,
        })
        .collect();
    v.extend(EXTERNAL.read().unwrap_or_else(|e| e.into_inner()).iter().copied());
    v.sort_by(|a, b| (a.stage, a.order, a.name).cmp(&(b.stage, b.order, b.name)));
    v
}

/// The transform named `name`.
pub fn transform(name: &str) -> Option<TransformRef> {
    transforms().into_iter().find(|t| t.name == name)
}
