//! builder: bakes stackless images (a seed instance on AWS over SSM, or a local chroot) and
//! deploys them. The library is the engine; `main.rs` parses arguments.

pub mod arch;
pub mod aws;
pub mod communicator;
pub mod console;
pub mod definition;
pub mod deploy;
pub mod fleet;
pub mod pipeline;
pub mod platform;
pub mod preflight;
pub mod render;
pub mod signals;
pub mod transfer;
pub mod user_data;
pub mod vm;
