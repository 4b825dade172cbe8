//! supervisord, through its XML-RPC interface on its unix socket.

use super::{Backend, Done};
use crate::supervisor::{ProcessInfo, Supervisor, UpdateReport};
use anyhow::Result;
use std::path::PathBuf;
use std::time::Duration;

pub struct SupervisordBackend {
    client: Supervisor,
}

impl SupervisordBackend {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        // Generous: startProcess waits for startsecs, stopProcess for stopwaitsecs.
        Self {
            client: Supervisor::new(socket, Duration::from_secs(120)),
        }
    }

    /// What `supervisorctl update` does, after a program definition changed.
    pub fn update(&self) -> Result<UpdateReport> {
        Ok(self.client.update(None)?)
    }

    pub fn client(&self) -> &Supervisor {
        &self.client
    }
}

fn done(infos: Vec<ProcessInfo>, verb: &str) -> Done {
    let names: Vec<String> = infos
        .iter()
        .map(|i| format!("{} pid {}", i.full_name(), i.pid))
        .collect();
    Done {
        pid: infos.first().map(|i| i.pid),
        detail: format!("{verb}: {}", names.join(", ")),
    }
}

impl Backend for SupervisordBackend {
    fn restart(&self, name: &str) -> Result<Done> {
        Ok(done(self.client.restart(name)?, "restarted"))
    }

    fn signal(&self, name: &str, signal: &str) -> Result<Done> {
        Ok(done(
            self.client.signal(name, signal)?,
            &format!("sent SIG{signal}"),
        ))
    }
}
