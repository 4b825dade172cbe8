//! The effective settings: image defaults under user-data, rendered for this instance.
//!
//! The boot reads user-data from IMDS and keeps a copy (`/var/lib/stackless/user-data`, 0600:
//! it may hold secrets) with the identity in the state record, so a scheduled or manual sync
//! resolves exactly what the boot resolved, without asking IMDS again.

use crate::fsutil::write_atomic;
use crate::imds::Identity;
use crate::paths::Layout;
use crate::state::State;
use crate::userdata::{self, Document, Settings};
use anyhow::{anyhow, Context, Result};

/// Reads and validates `/etc/stackless/init.toml`; an absent file is an empty document.
pub fn load_defaults(layout: &Layout) -> Result<Document> {
    let path = layout.defaults_file();
    match std::fs::read(&path) {
        Ok(bytes) => Ok(userdata::load(&path.display().to_string(), &bytes)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Document::default()),
        Err(e) => Err(anyhow!(e).context(format!("reading {}", path.display()))),
    }
}

/// Keeps the user-data the boot applied, for later syncs.
pub fn save_user_data(layout: &Layout, doc: &Document) -> Result<()> {
    let path = layout.saved_user_data();
    write_atomic(&path, doc.text.as_bytes(), 0o600)
        .with_context(|| format!("keeping a copy of the user-data at {}", path.display()))
}

/// The settings the last boot applied: defaults, the kept user-data and the recorded identity.
pub fn load_saved(layout: &Layout) -> Result<(Settings, Identity)> {
    let state = State::load(layout)?.ok_or_else(|| {
        anyhow!(
            "no boot has run on this instance yet ({} is missing); run `stackless-init boot` first",
            layout.state_file().display()
        )
    })?;
    let identity = state.identity.clone().ok_or_else(|| {
        anyhow!("the last boot did not reach IMDS, so there are no settings to sync with; see `stackless-init status`")
    })?;
    let defaults = load_defaults(layout)?;
    let path = layout.saved_user_data();
    let user = match std::fs::read(&path) {
        Ok(bytes) => userdata::load("user-data", &bytes)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Document::default(),
        Err(e) => return Err(anyhow!(e).context(format!("reading {}", path.display()))),
    };
    let settings = userdata::resolve(&defaults, &user, &identity)?;
    Ok((settings, identity))
}
