//! The `[xdp]` config section: file form and compiled settings.

use serde::Deserialize;
use toml::Spanned;

use crate::config::Problem;

/// `[xdp]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Xdp {
    /// Interfaces to attach to; empty means userspace enforcement only.
    #[serde(default)]
    pub interfaces: Vec<Spanned<String>>,
}

/// `[xdp]` compiled.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct XdpSettings {
    pub interfaces: Vec<String>,
}

/// Validates the `[xdp]` section.
pub fn compile(x: Option<&Spanned<Xdp>>) -> Result<XdpSettings, Vec<Problem>> {
    let Some(x) = x else {
        return Ok(XdpSettings::default());
    };
    Ok(XdpSettings {
        interfaces: x
            .get_ref()
            .interfaces
            .iter()
            .map(|i| i.get_ref().clone())
            .collect(),
    })
}
