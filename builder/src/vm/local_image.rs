//! A locally baked image, found through the manifest `builder bake --target local` wrote.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct LocalImage {
    pub manifest: PathBuf,
    pub image_name: String,
    pub build_id: String,
    pub disk: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
}

#[derive(Deserialize)]
struct Manifest {
    target: String,
    build_id: String,
    image_name: String,
    details: BTreeMap<String, String>,
}

impl LocalImage {
    /// `out/IMAGE` (its `manifest-local.json`) or a manifest file.
    pub fn load(path: &Path) -> Result<LocalImage> {
        let manifest = if path.is_dir() {
            path.join("manifest-local.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&manifest).with_context(|| {
            format!(
                "reading {}: bake the image first (builder bake IMAGE --target local)",
                manifest.display()
            )
        })?;
        let m: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a bake manifest", manifest.display()))?;
        if m.target != "local" {
            bail!(
                "{} describes a `{}` image; builder boot runs local images (bake with --target local)",
                manifest.display(),
                m.target
            );
        }
        let dir = manifest.parent().unwrap_or(Path::new("."));
        let file = |key: &str| -> Result<PathBuf> {
            let rel = m.details.get(key).with_context(|| {
                format!(
                    "{} has no `{key}` entry; bake the image again",
                    manifest.display()
                )
            })?;
            let p = dir.join(rel);
            if !p.exists() {
                bail!(
                    "{} names {} as its {key}, which is gone; bake the image again",
                    manifest.display(),
                    p.display()
                );
            }
            p.canonicalize()
                .with_context(|| format!("finding {}", p.display()))
        };
        Ok(LocalImage {
            disk: file("disk")?,
            kernel: file("kernel")?,
            initrd: file("initrd")?,
            cmdline: m
                .details
                .get("cmdline")
                .cloned()
                .unwrap_or_else(|| crate::platform::local::disk::KERNEL_CMDLINE.to_string()),
            manifest,
            image_name: m.image_name,
            build_id: m.build_id,
        })
    }

    pub fn describe(&self) -> String {
        format!("{} ({})", self.image_name, self.disk.display())
    }

    /// A copy-on-write overlay over the disk: the boot writes there, the image stays as baked.
    pub async fn overlay(&self, to: &Path) -> Result<()> {
        crate::platform::local::process::run(
            "creating the boot's disk overlay",
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                &self.disk.to_string_lossy(),
                "-F",
                "qcow2",
                &to.to_string_lossy(),
            ],
            Duration::from_secs(60),
        )
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_foreign_manifest_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let e = LocalImage::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("builder bake IMAGE --target local"), "{e}");
        std::fs::write(
            dir.path().join("manifest-local.json"),
            r#"{"target":"aws","build_id":"b-1","image_name":"x","details":{}}"#,
        )
        .unwrap();
        let e = LocalImage::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("describes a `aws` image"), "{e}");
        std::fs::write(
            dir.path().join("manifest-local.json"),
            r#"{"target":"local","build_id":"b-1","image_name":"x","details":{"disk":"b-1/disk.qcow2"}}"#,
        )
        .unwrap();
        let e = LocalImage::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("which is gone"), "{e}");
    }
}
