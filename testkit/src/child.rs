//! Real processes for crash and pause tests: the test binary runs itself again with a
//! role in its environment (so the child runs the same test function, which sees the
//! role and plays it), reports progress as `MARK <word>` lines on stdout, and can be
//! paused, continued or killed with real signals.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The environment variable that holds a child's role.
pub const ROLE_VAR: &str = "KEELSON_TEST_ROLE";

/// The role this process was started with, if it is such a child.
pub fn role() -> Option<String> {
    std::env::var(ROLE_VAR).ok()
}

/// Prints a progress mark for the parent (flushed: the parent may kill us next).
pub fn mark(word: impl std::fmt::Display) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "MARK {word}");
    let _ = out.flush();
}

/// A child process playing a role; killed (and continued, if stopped) when dropped.
#[derive(Debug)]
pub struct RoleChild {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl RoleChild {
    /// Runs the test `test` of the current test binary as a child with `role` and the
    /// extra environment `env`.
    pub fn start(test: &str, role: &str, env: &[(&str, String)]) -> RoleChild {
        let exe = std::env::current_exe().unwrap_or_else(|e| panic!("the test binary: {e}"));
        let mut child = Command::new(exe)
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(ROLE_VAR, role)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn a {role} child: {e}"));
        let stdout = child.stdout.take().unwrap_or_else(|| panic!("the child's stdout"));
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // libtest's "test ... " has no newline: a mark may follow it on its line.
                if let Some((_, mark)) = line.split_once("MARK ") {
                    let _ = tx.send(mark.to_owned());
                }
            }
        });
        RoleChild { child, lines }
    }

    /// The next mark starting with `prefix` (earlier other marks are skipped); panics
    /// if none comes within `limit` or the child ends first.
    pub fn wait_for(&self, prefix: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => panic!("no {prefix:?} mark from the child within {limit:?}"),
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the child ended before a {prefix:?} mark"),
            }
        }
    }

    /// Sends `signal` (`SIGSTOP`, `SIGCONT`, `SIGKILL`, ...) to the child.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
        nix::sys::signal::kill(pid, signal).unwrap_or_else(|e| panic!("signal the child: {e}"));
    }

    /// Kills the child with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RoleChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        // A stopped process dies of SIGKILL too, but continuing it makes sure it is reaped.
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
        let _ = self.child.wait();
    }
}
