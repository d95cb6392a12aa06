//! Running keelson's programs as children of a platform process (`minipaas up`,
//! `localcloud up`): each with its log file, stopped with SIGTERM and a grace period,
//! killed if the parent fails half way (a failed start leaves nothing running), and the
//! `down` side that signals a running parent and waits for it to finish.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process, killed when dropped.
#[derive(Debug)]
pub struct Supervised {
    /// What it is called in messages and its log's file name.
    pub name: String,
    /// The process.
    pub child: Child,
}

impl Supervised {
    /// SIGTERM, so each program stops its own way (edge drains, logd flushes); SIGKILL
    /// after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!(process = %self.name, "did not stop in time; killed");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The children of one platform process, their logs in one folder.
#[derive(Debug)]
pub struct Children {
    /// In start order.
    pub children: Vec<Supervised>,
    /// `<name>.log` of each.
    pub logs: PathBuf,
}

impl Children {
    /// None yet; logs go to `logs` (created if missing).
    pub fn new(logs: &Path) -> Result<Children, String> {
        std::fs::create_dir_all(logs).map_err(|e| format!("{}: {e}", logs.display()))?;
        Ok(Children { children: Vec::new(), logs: logs.to_owned() })
    }

    /// Starts `program` with `args`, its stdout and stderr in `<logs>/<name>.log`.
    pub fn spawn(&mut self, name: &str, program: &Path, args: &[String]) -> Result<(), String> {
        let mut command = Command::new(program);
        command.args(args);
        self.spawn_command(name, command)
    }

    /// Starts `program` inside the network namespace `netns` (`ip netns exec`, which
    /// execs it: the child's pid is the program's).
    pub fn spawn_in(&mut self, netns: &str, name: &str, program: &Path, args: &[String]) -> Result<(), String> {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", netns]).arg(program).args(args);
        self.spawn_command(name, command)
    }

    fn spawn_command(&mut self, name: &str, mut command: Command) -> Result<(), String> {
        // Appended to: a program started again (a reset) keeps the earlier runs' lines.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{name}.log")))
            .map_err(|e| format!("{name}'s log: {e}"))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            // A group of its own: Ctrl-C on the parent's terminal reaches the parent only,
            // which stops the children in order.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("starting {name} ({:?}): {e}", command.get_program()))?;
        self.children.push(Supervised { name: name.to_owned(), child });
        Ok(())
    }

    /// The last lines of `name`'s log, for an error message.
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let log = std::fs::read_to_string(self.logs.join(format!("{name}.log"))).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    /// An error if the child `name` has exited, with its status and log's last lines.
    pub fn check_running(&mut self, name: &str) -> Result<(), String> {
        let exited = match self.children.iter_mut().find(|c| c.name == name) {
            Some(c) => c.child.try_wait().ok().flatten(),
            None => None,
        };
        match exited {
            Some(status) => Err(format!("{name} exited ({status}): {}", self.log_tail(name, 5))),
            None => Ok(()),
        }
    }

    /// Waits until `addr` accepts TCP connections, or the child `name` exits.
    pub async fn wait_for(&mut self, name: &str, addr: SocketAddr, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            self.check_running(name)?;
            if Instant::now() > deadline {
                return Err(format!("{name} does not answer on {addr} after {}", humantime::format_duration(limit)));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILLs every child at once and reaps them: for when what they hold is thrown
    /// away anyway.
    pub fn kill_all(&mut self) {
        for c in &mut self.children {
            let _ = c.child.kill();
        }
        for c in &mut self.children {
            let _ = c.child.wait();
        }
        self.children.clear();
    }

    /// Stops the children whose names start with one of `order`'s, in that order, then
    /// the rest, newest first.
    pub fn stop_in_order(&mut self, order: &[&str], grace: Duration) {
        for prefix in order {
            for c in self.children.iter_mut().filter(|c| c.name.starts_with(prefix)) {
                c.stop(grace);
            }
        }
        for c in self.children.iter_mut().rev() {
            c.stop(grace);
        }
        self.children.clear();
    }
}

/// A free TCP port on loopback (free now; a race with other programs is possible).
pub fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("a free port: {e}"))?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

/// 24 random bytes, hex: a token or password.
pub fn random_token() -> Result<String, String> {
    let mut bytes = [0u8; 24];
    use std::io::Read;
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).map_err(|e| format!("/dev/urandom: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `text` to `path`, readable by its owner only (tokens, state).
pub fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(text.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))
}

/// One of keelson's programs in `dir` (beside the running binary, as cargo builds them).
pub fn program(dir: &Path, name: &str) -> Result<PathBuf, String> {
    let p = dir.join(name);
    if p.is_file() {
        return Ok(p);
    }
    Err(format!("{} is missing: build keelson's programs first (cargo build -p keelson-examples --all-features)", p.display()))
}

/// A program from `PATH`; `package` names the Debian package that has it.
pub fn which(name: &str, package: &str) -> Result<PathBuf, String> {
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(name)).find(|p| p.is_file()))
        .ok_or_else(|| format!("{name} is not installed (scripts/test installs it: apt-get install {package})"))
}

/// Removes every Docker container carrying label `key=value` (what a node's agent
/// started); returns how many there were.
pub fn remove_containers(key: &str, value: &str) -> usize {
    let docker = |args: &[&str]| Command::new("docker").args(args).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let Ok(ids) = docker(&["ps", "-aq", "--filter", &format!("label={key}={value}")]) else {
        return 0;
    };
    let ids: Vec<&str> = ids.split_whitespace().collect();
    if !ids.is_empty() {
        let mut args = vec!["rm", "-f", "-v"];
        args.extend(&ids);
        let _ = docker(&args);
    }
    ids.len()
}

/// Sends `signal` to the platform process `pid` and waits until it has exited.
pub fn signal_and_wait(what: &str, pid: u32, signal: nix::sys::signal::Signal, limit: Duration) -> Result<(), String> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).map_err(|e| format!("signalling {what} (pid {pid}): {e}"))?;
    let deadline = Instant::now() + limit;
    while is_running(pid) {
        if Instant::now() > deadline {
            return Err(format!("{what} (pid {pid}) still runs after {}", humantime::format_duration(limit)));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Whether `pid` is a live process (not gone, not a zombie).
pub fn is_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
