//! `autodeploy plugins` and the plugin registry the user chose.

use std::path::PathBuf;

use anyhow::{Context, Result};
use autodeploy_core::registry;

use crate::{Cli, Cmd};

/// `autodeploy plugins`: every plugin with kind, name, version and origin, the libraries refused
/// and why, the transforms in pipeline order, and the attention backends' devices and options.
pub fn list() {
    let plugins = registry::list_plugins();
    // The name column as wide as the longest name (plugins' names are theirs to choose).
    let w = plugins.iter().map(|p| p.name.len()).max().unwrap_or(0).max(24);
    println!("{:<18} {:<w$} {:<8} origin", "kind", "name", "version");
    for p in plugins {
        println!("{:<18} {:<w$} {:<8} {}", p.kind.as_str(), p.name, p.version, p.origin);
    }
    for r in autodeploy_core::plugin_abi::refusals() {
        println!("refused: {}: {}", r.library.display(), r.reason);
    }
    print_transforms();
    print_attention_options();
}

/// The transforms in the order a pipeline runs them: stage, whether on without a
/// `[transforms.<name>]` table saying otherwise, and each option with its default.
fn print_transforms() {
    let transforms = registry::transforms();
    // The name column as wide as the longest name (a library's transforms name themselves).
    let w = transforms.iter().map(|t| t.name.len()).max().unwrap_or(0).max(28);
    println!("\ntransforms, in the order they run ([transforms.<name>] enabled = true|false, options):");
    println!("  {:<17} {:<w$} {:<8} options", "stage", "name", "default");
    for t in transforms {
        let on = if t.enabled_by_default { "on" } else { "off" };
        let first = t.options.first().map(|o| format!("{} = {}", o.name, o.default)).unwrap_or_else(|| "-".into());
        println!("  {:<17} {:<w$} {:<8} {first}", t.stage.as_str(), t.name, on);
        for (i, o) in t.options.iter().enumerate() {
            if i > 0 {
                println!("  {:<17} {:<w$} {:<8} {} = {}", "", "", "", o.name, o.default);
            }
            if !o.help.is_empty() {
                println!("  {:<17} {:<w$} {:<8}   {}", "", "", "", o.help);
            }
        }
    }
}

/// The devices each attention backend runs on, then the options attention backends declare
/// (`[attention_backends.<name>]`), for those that have any.
fn print_attention_options() {
    println!("\nattention backends (attn_backend), by device:");
    for p in registry::list_plugins().into_iter().filter(|p| p.kind == autodeploy_sdk::PluginKind::AttentionBackend) {
        if let Ok((cpu, cuda)) = registry::attention_backend_devices(p.name) {
            let on: Vec<&str> = [(cpu, "cpu"), (cuda, "cuda")].into_iter().filter(|x| x.0).map(|x| x.1).collect();
            println!("  {:<28} {}", p.name, on.join(", "));
        }
    }
    let backends: Vec<_> = registry::list_plugins()
        .into_iter()
        .filter(|p| p.kind == autodeploy_sdk::PluginKind::AttentionBackend)
        .filter_map(|p| Some((p.name, registry::attention_backend_declared_options(p.name).ok()?)))
        .filter(|(_, o)| !o.is_empty())
        .collect();
    if backends.is_empty() {
        return;
    }
    println!("\nattention backend options ([attention_backends.<name>]):");
    for (name, options) in backends {
        for o in options {
            println!("  {name:<28} {} = {}    {}", o.name, o.default, o.help);
        }
    }
}

/// The plugin registry the user chose: `--plugins FILE`, else `AUTODEPLOY_PLUGINS`, with the
/// name of what chose it.
fn chosen_plugin_registry(cli: &Cli) -> Option<(PathBuf, &'static str)> {
    if let Some(p) = &cli.plugins {
        return Some((p.clone(), "--plugins"));
    }
    std::env::var_os("AUTODEPLOY_PLUGINS").filter(|v| !v.is_empty()).map(|p| (PathBuf::from(p), "AUTODEPLOY_PLUGINS"))
}

/// Loads the chosen plugin registry's libraries (for `plugins` only with `--load`). A registry
/// beside the config or in the working directory that nobody chose is named, not loaded.
pub fn check_plugin_registry(cli: &Cli) -> Result<()> {
    let Some((path, from)) = chosen_plugin_registry(cli) else {
        let beside = cli.config.as_ref().and_then(|c| c.parent()).map(|d| d.join("plugin-registry.toml"));
        for p in beside.into_iter().chain([PathBuf::from("plugin-registry.toml")]) {
            if p.exists() {
                eprintln!(
                    "note: {} is not loaded: plugins are code, so a registry is loaded only when chosen \
                     (--plugins {0} or AUTODEPLOY_PLUGINS={0})",
                    p.display()
                );
                break;
            }
        }
        return Ok(());
    };
    if !path.exists() {
        anyhow::bail!("{from} {}: no such file", path.display());
    }
    match cli.cmd {
        Some(Cmd::Plugins { load: false }) => {
            let reg = registry::parse_plugin_registry(&path).with_context(|| format!("{from} {}", path.display()))?;
            let base = path.parent().unwrap_or(std::path::Path::new("."));
            for l in &reg.library {
                println!(
                    "library {} (listed in {}; not loaded: --load to load it)",
                    base.join(&l.path).display(),
                    path.display()
                );
            }
        }
        _ => {
            registry::read_plugin_registry(&path).with_context(|| format!("{from} {}", path.display()))?;
        }
    }
    Ok(())
}
