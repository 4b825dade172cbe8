//! The tags that mark everything the builder creates, so `builder gc` can find what a killed
//! run left behind and `builder images` can tell its images apart.

/// The build that created the resource.
pub const BUILD_ID: &str = "stackless:build-id";
/// The definition name (`bare`, `preseeded`, ...).
pub const IMAGE: &str = "stackless:image";
/// sha256 of the bake's inputs; a bake with the same hash reuses the image.
pub const INPUT_HASH: &str = "stackless:input-hash";
/// RFC 3339 time after which a temporary resource is garbage (seed instances, groups).
pub const EXPIRES_AT: &str = "stackless:expires-at";
/// `true` on resources that only live during a build.
pub const TEMPORARY: &str = "stackless:temporary";
/// The image's architecture (`x86_64`, `arm64`), as EC2 names it.
pub const ARCH: &str = "stackless:arch";
/// The source AMI an image was baked from.
pub const SOURCE: &str = "stackless:source";
/// Marks every resource the builder created.
pub const MANAGED_BY: &str = "stackless:managed-by";
pub const MANAGED_BY_VALUE: &str = "stackless-builder";
/// `true` once publishing finished (copies, sharing, parameter): only such images are reused.
pub const PUBLISHED: &str = "stackless:published";
