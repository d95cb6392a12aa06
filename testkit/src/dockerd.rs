//! A private Docker daemon for tests that stop or restart the engine: its own data root,
//! exec root, socket and containerd namespace, no bridge and no iptables rules, the vfs
//! storage driver (no mounts to leave behind), in a network namespace of its own. Never
//! the machine's daemon, which other tests use.
//!
//! The network namespace is not optional: `dockerd --bridge=none` deletes the host's
//! `docker0` interface at start (it removes "the default bridge" it is told not to use),
//! which leaves the machine's daemon unable to start a container on its default network.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::tools::{io, require, run, TestkitError};

/// A running private dockerd; on drop its containers are removed and it is stopped.
#[derive(Debug)]
pub struct PrivateDockerd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    docker: PathBuf,
}

impl PrivateDockerd {
    /// Starts the daemon and waits until it answers.
    pub fn start() -> Result<PrivateDockerd, TestkitError> {
        require("dockerd", "docker.io")?;
        let docker = require("docker", "docker.io")?;
        // Short paths: the socket's must fit in 108 bytes.
        let dir = tempfile::Builder::new().prefix("kd").tempdir_in("/tmp").map_err(io("creating the dockerd folder"))?;
        std::fs::write(dir.path().join("daemon.json"), "{}").map_err(io("writing daemon.json"))?;
        let mut d = PrivateDockerd { dir, child: None, docker };
        d.spawn()?;
        Ok(d)
    }

    /// The daemon's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("d.sock")
    }

    fn host(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    fn spawn(&mut self) -> Result<(), TestkitError> {
        let p = |name: &str| self.dir.path().join(name);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(p("dockerd.log")).map_err(io("creating dockerd.log"))?;
        let child = Command::new(require("unshare", "util-linux")?)
            // Its own network namespace (see the module docs); unshare execs dockerd, so
            // the child is the daemon itself.
            .arg("--net")
            .arg(require("dockerd", "docker.io")?)
            // Its own config file: the machine's may set a data root or driver.
            .arg("--config-file")
            .arg(p("daemon.json"))
            .arg("--data-root")
            .arg(p("data"))
            .arg("--exec-root")
            .arg(p("exec"))
            .arg("--pidfile")
            .arg(p("d.pid"))
            .arg("-H")
            .arg(self.host())
            .args(["--iptables=false", "--ip6tables=false", "--bridge=none", "--storage-driver=vfs"])
            .args(["--containerd-namespace", "keelson-test", "--containerd-plugins-namespace", "keelson-test-plugins"])
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(io("starting dockerd"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.docker(&["version", "--format", "{{.Server.Version}}"]).is_err() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(p("dockerd.log")).unwrap_or_default();
                return Err(TestkitError::Failed {
                    what: "starting a private dockerd".into(),
                    detail: log.lines().rev().take(5).collect::<Vec<_>>().join("\n"),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Runs the docker CLI against this daemon.
    pub fn docker(&self, args: &[&str]) -> Result<String, TestkitError> {
        let mut all = vec!["-H".to_owned(), self.host()];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        run(&self.docker, &all.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Copies `image` from the machine's daemon into this one.
    pub fn load_image(&self, image: &str) -> Result<(), TestkitError> {
        let archive = self.dir.path().join("image.tar");
        run(&self.docker, &["save", "-o", &archive.to_string_lossy(), image])?;
        self.docker(&["load", "-q", "-i", &archive.to_string_lossy()])?;
        let _ = std::fs::remove_file(archive);
        Ok(())
    }

    /// Stops the daemon (SIGTERM, as `systemctl stop` does) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same folders (its containers come back per their restart
    /// policy).
    pub fn restart(&mut self) -> Result<(), TestkitError> {
        self.stop();
        self.spawn()
    }

    /// Where it keeps everything.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PrivateDockerd {
    fn drop(&mut self) {
        if self.child.is_some() {
            if let Ok(ids) = self.docker(&["ps", "-aq"]) {
                let ids: Vec<&str> = ids.split_whitespace().collect();
                if !ids.is_empty() {
                    let mut args = vec!["rm", "-f"];
                    args.extend(ids);
                    let _ = self.docker(&args);
                }
            }
        }
        self.stop();
    }
}
