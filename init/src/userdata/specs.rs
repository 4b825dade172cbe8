//! The plain types the schema resolves into and the actors take: where a repository comes from
//! ([`RepoSpec`], used by `repos`) and how salt is installed ([`InstallSpec`], used by
//! `salt::install`). They live here so the schema never imports the modules that act on it.

/// Where a repository comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RepoSpec {
    pub url: String,
    /// A branch, a tag or a full commit sha.
    #[serde(rename = "ref")]
    pub reference: String,
}

/// How salt gets onto a machine that lacks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum InstallMethod {
    /// `python -m venv` under the layout, then `pip install salt==VERSION`.
    #[default]
    Pip,
    /// The salt-bootstrap script, checksum-verified, run as `sh bootstrap-salt.sh -X onedir VERSION`.
    Onedir,
    /// Never install: the image must already have salt.
    None,
}

/// Everything needed to install salt.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct InstallSpec {
    pub method: InstallMethod,
    /// Salt version, such as `3008.4`.
    pub version: String,
    /// Where the `onedir` method downloads salt-bootstrap from.
    pub bootstrap_url: String,
    /// The sha256 (hex) the downloaded bootstrap script must have; `onedir` refuses to run without it.
    pub bootstrap_sha256: String,
    /// The interpreter the `pip` method makes its virtualenv with.
    pub python: String,
}

pub const DEFAULT_SALT_VERSION: &str = "3008.4";
/// A pinned salt-bootstrap release (a release asset, not the tag's raw file: the two differ).
pub const DEFAULT_BOOTSTRAP_URL: &str =
    "https://github.com/saltstack/salt-bootstrap/releases/download/v2025.02.24/bootstrap-salt.sh";
/// sha256 of [`DEFAULT_BOOTSTRAP_URL`], as published alongside uses of that release. A mismatch
/// stops the install before the script runs; set `bootstrap_sha256` (and `bootstrap_url`) to
/// pin another release.
pub const DEFAULT_BOOTSTRAP_SHA256: &str =
    "a0e3a58fc6358a7c6f708ee4910229e72fbdab7161819514b0696146a2edb62d";
pub const DEFAULT_PYTHON: &str = "python3";

impl Default for InstallSpec {
    fn default() -> Self {
        Self {
            method: InstallMethod::Pip,
            version: DEFAULT_SALT_VERSION.into(),
            bootstrap_url: DEFAULT_BOOTSTRAP_URL.into(),
            bootstrap_sha256: DEFAULT_BOOTSTRAP_SHA256.into(),
            python: DEFAULT_PYTHON.into(),
        }
    }
}
