//! Finding tools, running commands, ports.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// Why a helper could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    /// A tool is not installed.
    #[error("`{tool}` not found: install it with `apt-get install -y {package}` (scripts/test installs everything the tests need)")]
    Missing {
        /// The program looked for.
        tool: String,
        /// The Debian package that provides it.
        package: String,
    },
    /// A command or component failed.
    #[error("{what} failed: {detail}")]
    Failed {
        /// What was being done.
        what: String,
        /// Output or reason.
        detail: String,
    },
    /// An I/O error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> TestkitError {
    let context = context.into();
    move |source| TestkitError::Io { context, source }
}

/// The path of `tool`, searched in `PATH` and the sbin directories (root tools live
/// there and are not always on a test runner's `PATH`).
pub fn require(tool: &str, package: &str) -> Result<PathBuf, TestkitError> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|dir| PathBuf::from(dir).join(tool))
        .find(|p| p.is_file());
    found.ok_or_else(|| TestkitError::Missing { tool: tool.to_owned(), package: package.to_owned() })
}

/// Runs a command to completion; its stdout on success, a `Failed` error with stderr
/// otherwise.
pub fn run(program: &std::path::Path, args: &[&str]) -> Result<String, TestkitError> {
    let out = Command::new(program).args(args).output().map_err(io(format!("running {}", program.display())))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(TestkitError::Failed {
            what: format!("{} {}", program.display(), args.join(" ")),
            detail: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        })
    }
}

/// Copies the folder `from` into `to` (created), recursively: a test's fixture tree
/// into a temporary folder it may change.
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<(), TestkitError> {
    std::fs::create_dir_all(to).map_err(io(format!("creating {}", to.display())))?;
    for entry in std::fs::read_dir(from).map_err(io(format!("reading {}", from.display())))? {
        let entry = entry.map_err(io(format!("reading {}", from.display())))?;
        let target = to.join(entry.file_name());
        if entry.file_type().map_err(io(format!("reading {}", entry.path().display())))?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target).map_err(io(format!("copying {}", entry.path().display())))?;
        }
    }
    Ok(())
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16, TestkitError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("binding a free port"))?;
    Ok(l.local_addr().map_err(io("reading a bound port"))?.port())
}

/// `n` distinct free TCP ports on 127.0.0.1. All are held until all are chosen, so no
/// two are the same (picking one at a time can hand out a port twice).
pub fn free_ports(n: usize) -> Result<Vec<u16>, TestkitError> {
    let held: Vec<TcpListener> =
        (0..n).map(|_| TcpListener::bind("127.0.0.1:0").map_err(io("binding a free port"))).collect::<Result<_, _>>()?;
    held.iter().map(|l| Ok(l.local_addr().map_err(io("reading a bound port"))?.port())).collect()
}

/// Waits until something accepts TCP connections at `addr`.
pub fn wait_for_tcp(addr: SocketAddr, timeout: Duration) -> Result<(), TestkitError> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(TestkitError::Failed { what: format!("waiting for {addr}"), detail: format!("nothing listening after {timeout:?}") })
}

/// Waits up to `within` for `child` to exit (after the test signalled it) and returns
/// its status; an error if it is still running, so a hung shutdown fails the test.
pub fn wait_exit(child: &mut std::process::Child, within: Duration) -> Result<std::process::ExitStatus, TestkitError> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().map_err(io("waiting for a child process"))? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            return Err(TestkitError::Failed {
                what: format!("waiting for process {} to exit", child.id()),
                detail: format!("still running after {within:?}"),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
