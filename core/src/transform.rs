//! Graph transforms: registered by name with their stage, configured from
//! `[transforms.<name>]`, run in stage order, each logging and recording what it changed.

use autodeploy_sdk::Stage;

use crate::config::PipelineConfig;
use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::registry::TransformRef;

/// A declared option of a transform, with its default as TOML text.
pub struct OptionSpec {
    pub name: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

/// A transform's options table.
pub type Options = toml::Table;

/// What a transform sees besides the graph.
pub struct TransformContext<'a> {
    pub config: &'a PipelineConfig,
    /// The transform's options: the config's values over the declared defaults.
    pub options: toml::Table,
}

impl TransformContext<'_> {
    pub fn bool(&self, name: &str) -> Result<bool> {
        self.options
            .get(name)
            .and_then(toml::Value::as_bool)
            .ok_or_else(|| Error::Msg(format!("transform option `{name}` must be true or false")))
    }
    pub fn int(&self, name: &str) -> Result<i64> {
        self.options
            .get(name)
            .and_then(toml::Value::as_integer)
            .ok_or_else(|| Error::Msg(format!("transform option `{name}` must be an integer")))
    }
}

pub trait Transform: Send + Sync {
    /// Rewrites the graph; returns a one-line summary such as `matched 4 rmsnorm`.
    fn apply(&self, graph: &mut Graph, cx: &TransformContext) -> Result<String>;
}

fn parse_default(t: &TransformRef, o: &OptionSpec) -> Result<toml::Value> {
    option_default(&format!("transform {}", t.name), o)
}

/// Option `o`'s default as a TOML value; `owner` names the plugin in the error.
fn option_default(owner: &str, o: &OptionSpec) -> Result<toml::Value> {
    let text = format!("v = {}", o.default);
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| Error::Msg(format!("{owner}: bad default for `{}`: {e}", o.name)))?;
    Ok(table["v"].clone())
}

/// Checks `table` (the config's `[<key>]`) against `options`: every key declared, with its
/// default's type. Errors name the key.
pub fn check_options(
    key: &str,
    owner: &str,
    options: &[OptionSpec],
    table: &toml::Table,
) -> std::result::Result<(), (String, String)> {
    for (k, v) in table {
        let Some(spec) = options.iter().find(|o| o.name == k) else {
            let names: Vec<&str> = options.iter().map(|o| o.name).collect();
            let known =
                if names.is_empty() { "it takes none".to_string() } else { format!("options: {}", names.join(", ")) };
            return Err((format!("{key}.{k}"), format!("{owner} has no option `{k}`; {known}")));
        };
        let d = option_default(owner, spec).map_err(|e| (format!("{key}.{k}"), e.to_string()))?;
        if d.type_str() != v.type_str() {
            return Err((format!("{key}.{k}"), format!("expected {}, found {}", d.type_str(), v.type_str())));
        }
    }
    Ok(())
}

/// Every option in `options`: the value `user` sets, else the default.
pub fn resolve_options(owner: &str, options: &[OptionSpec], user: Option<&toml::Table>) -> Result<toml::Table> {
    let mut out = toml::Table::new();
    for o in options {
        let v = match user.and_then(|u| u.get(o.name)) {
            Some(v) => v.clone(),
            None => option_default(owner, o)?,
        };
        out.insert(o.name.to_string(), v);
    }
    Ok(out)
}

/// Checks `[transforms.*]` against the registry: known names, `enabled` a bool, known options of
/// the declared types. Errors name the key.
pub fn check_config(
    tables: &std::collections::BTreeMap<String, toml::Table>,
) -> std::result::Result<(), (String, String)> {
    for (name, table) in tables {
        let Some(t) = crate::registry::transform(name) else {
            let known: Vec<&str> = crate::registry::transforms().iter().map(|t| t.name).collect();
            return Err((
                format!("transforms.{name}"),
                format!("unknown transform; known: {}{}", known.join(", "), crate::plugin_abi::refusals_note()),
            ));
        };
        for (k, v) in table {
            if k == "enabled" {
                if !v.is_bool() {
                    return Err((format!("transforms.{name}.enabled"), "must be true or false".into()));
                }
                continue;
            }
            let Some(spec) = t.options.iter().find(|o| o.name == k) else {
                let mut opts: Vec<&str> = t.options.iter().map(|o| o.name).collect();
                opts.insert(0, "enabled");
                return Err((
                    format!("transforms.{name}.{k}"),
                    format!("`{name}` has no option `{k}`; options: {}", opts.join(", ")),
                ));
            };
            let d = parse_default(&t, spec).map_err(|e| (format!("transforms.{name}.{k}"), e.to_string()))?;
            if d.type_str() != v.type_str() {
                return Err((
                    format!("transforms.{name}.{k}"),
                    format!("expected {}, found {}", d.type_str(), v.type_str()),
                ));
            }
        }
    }
    Ok(())
}

/// Whether the config enables `t`, and its options.
fn settings(t: &TransformRef, cfg: &PipelineConfig) -> Result<(bool, toml::Table)> {
    let user = cfg.transforms.get(t.name);
    let enabled = user.and_then(|u| u.get("enabled")).and_then(toml::Value::as_bool).unwrap_or(t.enabled_by_default);
    let mut opts = toml::Table::new();
    for o in t.options {
        let v = user.and_then(|u| u.get(o.name)).cloned().map(Ok).unwrap_or_else(|| parse_default(t, o))?;
        opts.insert(o.name.to_string(), v);
    }
    Ok((enabled, opts))
}

/// Runs the transforms of stages after `import` up to and including `until`.
pub fn run_stages(graph: &mut Graph, cfg: &PipelineConfig, until: Stage) -> Result<()> {
    for t in crate::registry::transforms().into_iter().filter(|t| t.stage != Stage::Import && t.stage <= until) {
        let (enabled, options) = settings(&t, cfg)?;
        if !enabled {
            graph.history.push(format!("[stage={}, transform={}] disabled", t.stage, t.name));
            continue;
        }
        let cx = TransformContext { config: cfg, options };
        let summary = t.instantiate().apply(graph, &cx).map_err(|e| {
            let from = if t.origin.starts_with("built-in") { String::new() } else { format!(" from {}", t.origin) };
            Error::Msg(format!("transform {}{from} (stage {}): {e}", t.name, t.stage))
        })?;
        graph
            .validate()
            .map_err(|e| Error::Msg(format!("transform {} (stage {}) left an invalid graph: {e}", t.name, t.stage)))?;
        let line = format!("[stage={}, transform={}] {summary}", t.stage, t.name);
        tracing::info!("{line}");
        graph.history.push(line);
    }
    Ok(())
}
