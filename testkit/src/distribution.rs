//! A real CNCF distribution registry (Debian's `docker-registry`, 2.8) on a free
//! loopback port, storing in a temporary directory, with deletion enabled: the peer
//! keelson's registry is compared with.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::tools::{free_port, io, require, wait_for_tcp, TestkitError};

/// A running docker-registry; killed on drop.
#[derive(Debug)]
pub struct Distribution {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Distribution {
    /// Starts docker-registry and waits until it accepts connections.
    pub fn start() -> Result<Distribution, TestkitError> {
        let bin = require("docker-registry", "docker-registry")?;
        let dir = tempfile::tempdir().map_err(io("creating registry dir"))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).map_err(io("writing registry config"))?;
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io("starting docker-registry"))?;
        let registry = Distribution { child, addr, dir };
        wait_for_tcp(addr, Duration::from_secs(20))?;
        Ok(registry)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its process id (to read its CPU time).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where it stores.
    pub fn data_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
