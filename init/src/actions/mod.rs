//! What a watch rule does to a program: restart it, signal it, or update supervisord's view of
//! its definition. One trait, one module per service manager.

pub mod hold;
mod supervisord;
mod systemd;

pub use supervisord::SupervisordBackend;
pub use systemd::SystemdBackend;

use anyhow::Result;

/// A service manager that can act on its programs.
pub trait Backend {
    /// Stop and start, then confirm the program runs.
    fn restart(&self, name: &str) -> Result<Done>;
    /// Send a signal (`HUP`, ...) instead of restarting; confirm it still runs.
    fn signal(&self, name: &str, signal: &str) -> Result<Done>;
}

/// The result of an action that worked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Done {
    /// The program's pid afterwards (the first one for a group).
    pub pid: Option<u32>,
    pub detail: String,
}

/// Where a restart target lives: `systemd:UNIT` or a supervisord program (`name`, `group:*`,
/// `group:name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target<'a> {
    Supervisord(&'a str),
    Systemd(&'a str),
}

impl<'a> Target<'a> {
    pub fn parse(target: &'a str) -> Target<'a> {
        match target.strip_prefix("systemd:") {
            Some(unit) => Target::Systemd(unit),
            None => Target::Supervisord(target),
        }
    }
}

/// The backends the agent talks to, chosen per target.
pub struct Backends {
    pub supervisord: SupervisordBackend,
    pub systemd: SystemdBackend,
}

impl Backends {
    /// Restarts, or signals when `signal` is set.
    pub fn act(&self, target: &str, signal: Option<&str>) -> Result<Done> {
        let (backend, name): (&dyn Backend, &str) = match Target::parse(target) {
            Target::Supervisord(n) => (&self.supervisord, n),
            Target::Systemd(u) => (&self.systemd, u),
        };
        match signal {
            Some(sig) => backend.signal(name, sig.trim_start_matches("SIG")),
            None => backend.restart(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_route_to_their_manager() {
        assert_eq!(Target::parse("app"), Target::Supervisord("app"));
        assert_eq!(Target::parse("web:*"), Target::Supervisord("web:*"));
        assert_eq!(
            Target::parse("systemd:nginx.service"),
            Target::Systemd("nginx.service")
        );
    }
}
