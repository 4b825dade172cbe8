//! Architectures: the source image's (EC2's `x86_64` or `arm64`), the instance type's, and the
//! agent binary's, read from its ELF header. A bake stages the agent whose ELF machine matches the
//! source image, and refuses before launching anything when none does.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::fmt;
use std::path::{Path, PathBuf};

/// An architecture, named as EC2 names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Arch {
    #[serde(rename = "x86_64")]
    X86_64,
    #[serde(rename = "arm64")]
    Arm64,
}

/// ELF `e_machine` values.
const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::X86_64, Arch::Arm64];

    /// EC2's name: DescribeImages `Architecture`, DescribeInstanceTypes, `[instance] arch`.
    pub fn ec2(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Arm64 => "arm64",
        }
    }

    /// EC2's name, strictly (`i386`, `x86_64_mac` and the like are not baked for).
    pub fn from_ec2(s: &str) -> Option<Arch> {
        match s {
            "x86_64" => Some(Arch::X86_64),
            "arm64" => Some(Arch::Arm64),
            _ => None,
        }
    }

    /// The ELF machine the agent for this architecture is built for, as `readelf -h` says it.
    pub fn elf_machine(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86-64",
            Arch::Arm64 => "AArch64",
        }
    }

    /// The Rust target `scripts/build-init.sh` builds the agent for.
    pub fn rust_target(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-linux-musl",
            Arch::Arm64 => "aarch64-unknown-linux-musl",
        }
    }

    /// `scripts/build-init.sh`'s `--arch` for this architecture.
    pub fn build_init_arch(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Arm64 => "aarch64",
        }
    }

    /// Where `scripts/build-init.sh` leaves the agent (relative to the repository, with cargo's
    /// default target folder): `bake`'s default `--init-binary`.
    pub fn default_init_binary(self) -> PathBuf {
        PathBuf::from(format!(
            "target/{}/release/stackless-init",
            self.rust_target()
        ))
    }

    /// A small instance type of this architecture, for messages.
    pub fn example_instance_type(self) -> &'static str {
        match self {
            Arch::X86_64 => "t3.small",
            Arch::Arm64 => "t4g.small",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.ec2())
    }
}

/// What an ELF header says the file runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Machine {
    Known(Arch),
    /// An ELF file for another machine (its `e_machine`).
    Other(u16),
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Machine::Known(a) => write!(f, "{} (ELF machine {})", a, a.elf_machine()),
            Machine::Other(m) => write!(f, "ELF machine {m}, neither x86-64 nor AArch64"),
        }
    }
}

/// The machine of a 64-bit little-endian ELF file, or why it is not one.
pub fn elf_machine(bytes: &[u8]) -> Result<Machine, String> {
    if bytes.len() < 20 || &bytes[..4] != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    if bytes[4] != 2 {
        return Err("a 32-bit ELF file".into());
    }
    if bytes[5] != 1 {
        return Err("a big-endian ELF file".into());
    }
    let m = u16::from_le_bytes([bytes[18], bytes[19]]);
    Ok(match m {
        EM_X86_64 => Machine::Known(Arch::X86_64),
        EM_AARCH64 => Machine::Known(Arch::Arm64),
        other => Machine::Other(other),
    })
}

/// One agent binary given to a bake.
#[derive(Debug, Clone)]
pub struct InitBinary {
    pub path: PathBuf,
    pub arch: Arch,
    pub bytes: Vec<u8>,
}

/// The agent binaries given to a bake (`--init-binary`, once per architecture): at most one per
/// architecture, each an ELF file for x86-64 or AArch64.
#[derive(Debug, Clone, Default)]
pub struct InitBinaries {
    binaries: Vec<InitBinary>,
}

impl InitBinaries {
    /// Reads and classifies each file.
    pub fn load(paths: &[PathBuf]) -> Result<InitBinaries> {
        if paths.is_empty() {
            bail!("no stackless-init binary given (--init-binary; build it with scripts/build-init.sh)");
        }
        let mut binaries: Vec<InitBinary> = Vec::new();
        for path in paths {
            let bytes = std::fs::read(path).with_context(|| {
                format!(
                    "reading the stackless-init binary {} (build it with scripts/build-init.sh)",
                    path.display()
                )
            })?;
            let arch = match elf_machine(&bytes) {
                Ok(Machine::Known(a)) => a,
                Ok(other) => bail!(
                    "the stackless-init binary {} is for {other}: give the agent scripts/build-init.sh builds",
                    path.display()
                ),
                Err(why) => bail!(
                    "the stackless-init binary {} is {why}: give the static agent scripts/build-init.sh builds",
                    path.display()
                ),
            };
            if let Some(first) = binaries.iter().find(|b| b.arch == arch) {
                bail!(
                    "two stackless-init binaries for {arch}: {} and {}; give one --init-binary per architecture",
                    first.path.display(),
                    path.display()
                );
            }
            binaries.push(InitBinary {
                path: path.clone(),
                arch,
                bytes,
            });
        }
        Ok(InitBinaries { binaries })
    }

    /// Builds the set from binaries already in memory (tests, renders).
    pub fn from_parts(binaries: Vec<InitBinary>) -> InitBinaries {
        InitBinaries { binaries }
    }

    pub fn all(&self) -> &[InitBinary] {
        &self.binaries
    }

    /// The binary for `arch`, or the refusal that names every file given, its machine, and
    /// what the image needs.
    pub fn for_arch(&self, arch: Arch, image: &str) -> Result<&InitBinary> {
        if let Some(b) = self.binaries.iter().find(|b| b.arch == arch) {
            return Ok(b);
        }
        let given = self
            .binaries
            .iter()
            .map(|b| {
                format!(
                    "{} is {} (ELF machine {})",
                    b.path.display(),
                    b.arch,
                    b.arch.elf_machine()
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        bail!(
            "{image} is {arch}, but no stackless-init binary given is: {given}. Build the {arch} agent with \
             `scripts/build-init.sh --arch {}` and pass it with --init-binary {} (repeat --init-binary for each architecture)",
            arch.build_init_arch(),
            arch.default_init_binary().display()
        )
    }
}

/// `--init-binary` when none was given: the agents `scripts/build-init.sh` left in cargo's
/// default target folder, those that exist (all of them when none does, so the error names them).
pub fn default_init_binaries(root: &Path) -> Vec<PathBuf> {
    let all: Vec<PathBuf> = Arch::ALL
        .iter()
        .map(|a| root.join(a.default_init_binary()))
        .collect();
    let present: Vec<PathBuf> = all.iter().filter(|p| p.exists()).cloned().collect();
    if present.is_empty() {
        all[..1].to_vec()
    } else {
        present
    }
}

/// The first bytes of an ELF executable for `arch`: enough for [`elf_machine`] (tests).
pub fn fake_elf_header(arch: Arch) -> Vec<u8> {
    let mut h = vec![0u8; 64];
    h[..4].copy_from_slice(b"\x7fELF");
    h[4] = 2; // 64-bit
    h[5] = 1; // little-endian
    h[6] = 1; // version
    h[16] = 2; // ET_EXEC
    let m = match arch {
        Arch::X86_64 => EM_X86_64,
        Arch::Arm64 => EM_AARCH64,
    };
    h[18..20].copy_from_slice(&m.to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_machine_from_the_elf_header() {
        assert_eq!(
            elf_machine(&fake_elf_header(Arch::X86_64)),
            Ok(Machine::Known(Arch::X86_64))
        );
        assert_eq!(
            elf_machine(&fake_elf_header(Arch::Arm64)),
            Ok(Machine::Known(Arch::Arm64))
        );
        let mut riscv = fake_elf_header(Arch::X86_64);
        riscv[18..20].copy_from_slice(&243u16.to_le_bytes());
        assert_eq!(elf_machine(&riscv), Ok(Machine::Other(243)));
        assert_eq!(
            elf_machine(b"#!/bin/sh\necho hi\n").unwrap_err(),
            "not an ELF file"
        );
        let mut x32 = fake_elf_header(Arch::X86_64);
        x32[4] = 1;
        assert_eq!(elf_machine(&x32).unwrap_err(), "a 32-bit ELF file");
    }

    #[test]
    fn the_real_agent_binaries_when_built() {
        // scripts/test.sh builds both before the tests; elsewhere this checks what exists.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for (var, arch) in [
            ("STACKLESS_INIT_STATIC", Arch::X86_64),
            ("STACKLESS_INIT_STATIC_AARCH64", Arch::Arm64),
        ] {
            let path = std::env::var(var)
                .map(PathBuf::from)
                .unwrap_or_else(|_| root.join(arch.default_init_binary()));
            if let Ok(bytes) = std::fs::read(&path) {
                assert_eq!(
                    elf_machine(&bytes),
                    Ok(Machine::Known(arch)),
                    "{}",
                    path.display()
                );
            }
        }
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn picks_the_binary_of_the_image_and_refuses_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let x86 = write(dir.path(), "x86", &fake_elf_header(Arch::X86_64));
        let arm = write(dir.path(), "arm", &fake_elf_header(Arch::Arm64));
        let both = InitBinaries::load(&[x86.clone(), arm.clone()]).unwrap();
        assert_eq!(both.for_arch(Arch::Arm64, "img").unwrap().path, arm);
        assert_eq!(both.for_arch(Arch::X86_64, "img").unwrap().path, x86);

        let only = InitBinaries::load(std::slice::from_ref(&x86)).unwrap();
        let e = format!(
            "{:#}",
            only.for_arch(Arch::Arm64, "the source image ami-1")
                .unwrap_err()
        );
        assert!(
            e.contains("the source image ami-1 is arm64")
                && e.contains(&format!("{} is x86_64 (ELF machine x86-64)", x86.display()))
                && e.contains("scripts/build-init.sh --arch aarch64"),
            "{e}"
        );

        let e = format!(
            "{:#}",
            InitBinaries::load(&[x86.clone(), x86.clone()]).unwrap_err()
        );
        assert!(e.contains("two stackless-init binaries for x86_64"), "{e}");
        let script = write(dir.path(), "script", b"#!/bin/sh\n");
        let e = format!("{:#}", InitBinaries::load(&[script]).unwrap_err());
        assert!(e.contains("is not an ELF file"), "{e}");
        let e = format!(
            "{:#}",
            InitBinaries::load(&[dir.path().join("missing")]).unwrap_err()
        );
        assert!(e.contains("scripts/build-init.sh"), "{e}");
    }
}
