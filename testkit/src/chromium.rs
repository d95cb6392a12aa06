//! A real browser for tests of web pages: Debian's `chromium`, headless, driven over the
//! Chrome DevTools Protocol (a WebSocket): open a page, run JavaScript in it (read what
//! renders, click an element), read the answer. `--no-sandbox` because tests run as
//! root; a profile folder of its own, removed with the browser.
//!
//! ```no_run
//! # async fn demo() -> Result<(), keelson_testkit::TestkitError> {
//! let mut browser = keelson_testkit::chromium::Chromium::start().await?;
//! browser.open("file:///tmp/report.html").await?;
//! let title = browser.eval("document.title").await?;
//! println!("{title}");
//! # Ok(())
//! # }
//! ```

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::tools::{io, require, TestkitError};

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A headless chromium with one page; killed on drop.
#[derive(Debug)]
pub struct Chromium {
    child: Child,
    _profile: tempfile::TempDir,
    socket: Socket,
    next_id: u64,
    session: Option<String>,
}

fn failed(what: &str, detail: impl std::fmt::Display) -> TestkitError {
    TestkitError::Failed { what: what.to_owned(), detail: detail.to_string() }
}

impl Chromium {
    /// Starts the browser and connects to it.
    pub async fn start() -> Result<Chromium, TestkitError> {
        let binary = require("chromium", "chromium")?;
        let profile = tempfile::tempdir().map_err(io("creating a chromium profile"))?;
        let mut child = Command::new(binary)
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--remote-debugging-port=0"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io("starting chromium"))?;
        let stderr = child.stderr.take().ok_or_else(|| failed("starting chromium", "no stderr"))?;
        // The browser says where it listens on stderr; the rest of stderr is drained so
        // it never blocks on a full pipe.
        let (found, address) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut found = Some(found);
            let mut seen = Vec::new();
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.split_whitespace().find(|w| w.starts_with("ws://")) {
                    if let Some(tx) = found.take() {
                        let _ = tx.send(Ok(url.to_owned()));
                    }
                } else if found.is_some() && seen.len() < 20 {
                    seen.push(line);
                }
            }
            if let Some(tx) = found {
                let _ = tx.send(Err(seen.join("\n")));
            }
        });
        let url = match address.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(url)) => url,
            Ok(Err(output)) => {
                let _ = child.kill();
                return Err(failed("starting chromium", format!("it exited before listening: {output}")));
            }
            Err(_) => {
                let _ = child.kill();
                return Err(failed("starting chromium", "no DevTools address within 30 s"));
            }
        };
        let socket = match tokio_tungstenite::connect_async(&url).await {
            Ok((socket, _)) => socket,
            Err(e) => {
                let _ = child.kill();
                return Err(failed("connecting to chromium's DevTools", e));
            }
        };
        Ok(Chromium { child, _profile: profile, socket, next_id: 0, session: None })
    }

    /// Sends one DevTools command and returns its result (events in between are skipped).
    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value, TestkitError> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = &self.session {
            message["sessionId"] = json!(session);
        }
        self.socket.send(Message::text(message.to_string())).await.map_err(|e| failed(method, e))?;
        let answer = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(frame) = self.socket.next().await {
                let frame = frame.map_err(|e| failed(method, e))?;
                let Message::Text(text) = frame else { continue };
                let value: Value = serde_json::from_str(&text).map_err(|e| failed(method, e))?;
                if value["id"] == json!(id) {
                    return Ok(value);
                }
            }
            Err(failed(method, "the browser closed the connection"))
        })
        .await
        .map_err(|_| failed(method, "no answer within 30 s"))??;
        if let Some(error) = answer.get("error") {
            return Err(failed(method, error));
        }
        Ok(answer["result"].clone())
    }

    /// Opens `url` in a new page, which later calls talk to, and waits until it has loaded.
    pub async fn open(&mut self, url: &str) -> Result<(), TestkitError> {
        self.session = None;
        let target = self.call("Target.createTarget", json!({ "url": url })).await?;
        let target_id = target["targetId"].as_str().ok_or_else(|| failed("Target.createTarget", &target))?.to_owned();
        let attached = self.call("Target.attachToTarget", json!({ "targetId": target_id, "flatten": true })).await?;
        let session = attached["sessionId"].as_str().ok_or_else(|| failed("Target.attachToTarget", &attached))?.to_owned();
        self.session = Some(session);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            // One evaluation, so both facts are of the same document: read apart, the
            // state could be the blank page's and the address the new page's, still
            // loading.
            let seen = self.eval("[document.readyState, location.href]").await?;
            if seen[0] == json!("complete") && seen[1] != json!("about:blank") {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(failed("opening a page", format!("{url} did not load within 20 s (state and address: {seen})")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Evaluates `expression` in the page and returns its value (JSON); a thrown
    /// exception is an error carrying its text.
    pub async fn eval(&mut self, expression: &str) -> Result<Value, TestkitError> {
        let result =
            self.call("Runtime.evaluate", json!({ "expression": expression, "returnByValue": true, "awaitPromise": true })).await?;
        if let Some(exception) = result.get("exceptionDetails") {
            return Err(failed(&format!("evaluating {expression}"), exception));
        }
        Ok(result["result"]["value"].clone())
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
