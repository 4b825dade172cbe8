//! stackless-init: the agent that configures an EC2 instance at every boot without a master.
//!
//! The library holds the whole engine and the command line's parser ([`cli`]); `main.rs` only
//! dispatches. The user-data schema
//! ([`userdata`]) is public so the builder validates and renders user-data with the same types,
//! and the IMDS emulator (`imds::emulator`, behind the `emulator` feature) is public so tests,
//! local boots and the builder share it; the shipped agent is built without it.

pub mod actions;
pub mod aws;
pub mod boot;
pub mod cli;
pub mod fsutil;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod gitauth;
pub mod imds;
pub mod lifecycle;
pub mod lock;
pub mod logging;
pub mod paths;
pub mod private;
pub mod process;
pub mod releases;
pub mod report;
pub mod repos;
pub mod resident;
pub mod salt;
pub mod settings;
pub mod state;
pub mod status;
pub mod supervisor;
pub mod sync;
pub mod timeline;
pub mod trust;
pub mod userdata;
pub mod wait_for;
pub mod watch;
