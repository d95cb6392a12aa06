//! The controller's HTTP API (JSON), what the `minipaas` CLI speaks, and the dashboard.
//!
//! | method, path | does |
//! |---|---|
//! | `GET /healthz` | `{"status":"ok"}` |
//! | `GET /v1/apps`, `POST /v1/apps` `{name, manifest}` | list, create |
//! | `GET /v1/apps/<app>`, `DELETE …` | [`AppInfo`](super::platform::AppInfo), delete (stops it) |
//! | `POST /v1/apps/<app>/clone` `{to}` | a copy with its manifest, config and secrets |
//! | `PUT /v1/apps/<app>/manifest` (TOML body) | replace the manifest (next release uses it) |
//! | `POST /v1/apps/<app>/deploy` `{image}` | a release of that image |
//! | `POST /v1/apps/<app>/builds` `{rev}` | build a pushed commit and release it (text, streamed) |
//! | `GET /v1/apps/<app>/releases` | the timeline |
//! | `POST /v1/apps/<app>/rollback` `{service?, release?}` | back to a release, as a new one |
//! | `GET /v1/apps/<app>/config`, `POST …` `{set:{K:V}, unset:[K]}` | read, change (rolls the app) |
//! | `POST /v1/apps/<app>/scale` `{service, count}` | set a service's task count |
//! | `GET /v1/apps/<app>/ps` | instances: node, status, health, address |
//! | `GET /v1/apps/<app>/logs?tail=N&follow=1` | output from logd, one line per record (text, streamed) |
//! | `POST /v1/apps/<app>/runs` [`RunRequest`] | a one-off: its output, then `exit: <code>` (text, streamed) |
//! | `GET /v1/apps/<app>/secrets`, `PUT …/secrets/<K>` (value), `DELETE …/secrets/<K>` | names only; set, unset (roll the app: tasks read them as files) |
//! | `POST /v1/apps/<app>/domains` `{service, domain, cert?, key?}` | route a host name to a service; with a certificate and key (PEM), edge serves it over HTTPS |
//! | `GET /`, `GET /apps/<app>` | the dashboard (HTML, read-only) |
//!
//! With a token, every request but `/healthz` needs `Authorization: Bearer <token>`
//! (the dashboard also takes `?token=`). Who acts is `X-Minipaas-User` (the CLI sends
//! `$USER`), written into each release.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use serde::Deserialize;

use super::git::{GitRepos, ImageBuilder};
use super::platform::{Platform, PlatformError, RunRequest};

/// Where the platform's log server is, to read apps' output from.
#[derive(Clone, Debug)]
pub struct LogdAccess {
    /// `http://host:port`.
    pub base: String,
    /// Its bearer token.
    pub token: Option<String>,
}

/// Everything the API serves.
#[derive(Debug)]
pub struct Controller {
    /// The platform's operations.
    pub platform: Platform,
    /// The apps' repositories (git push deploys), if this controller has them.
    pub git: Option<GitRepos>,
    /// What builds pushed commits.
    pub builder: Option<Arc<dyn ImageBuilder>>,
    /// The log server.
    pub logd: Option<LogdAccess>,
    /// The API's bearer token; `None`: no authentication (loopback only, see `serve`).
    pub token: Option<String>,
    /// How long a push waits for its release to go live.
    pub rollout_timeout: Duration,
    /// Where domains' own certificates go for edge, if this controller installs them.
    pub certs: Option<CertDir>,
}

/// edge's `--cert-dir`: a domain's certificate is written there as `<domain>.crt` and
/// `<domain>.key` (readable by the owner only), then edge is told (SIGHUP) to read it.
#[derive(Clone, Debug)]
pub struct CertDir {
    /// The folder.
    pub dir: std::path::PathBuf,
    /// The edge process to signal.
    pub edge_pid: Option<u32>,
}

impl CertDir {
    /// Checks that `chain` and `key` (PEM) are a certificate with its key, before any
    /// change is made, naming the domain in the error.
    pub fn check(domain: &str, chain: &str, key: &str) -> Result<(), String> {
        keelson_routing::CertStore::new()
            .set(domain, chain.as_bytes(), key.as_bytes())
            .map_err(|e| format!("certificate for {domain}: {e}"))
    }

    /// Installs `domain`'s certificate and has edge load it.
    pub fn install(&self, domain: &str, chain: &str, key: &str) -> Result<(), String> {
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        crate::supervise::write_private(&self.dir.join(format!("{domain}.key")), key)?;
        crate::supervise::write_private(&self.dir.join(format!("{domain}.crt")), chain)?;
        if let Some(pid) = self.edge_pid {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGHUP)
                .map_err(|e| format!("telling edge (pid {pid}) to load the certificate: {e}"))?;
        }
        Ok(())
    }
}

type Body = BoxBody<Bytes, Infallible>;
type Response = hyper::Response<Body>;

fn respond(status: u16, content_type: &'static str, body: impl Into<Bytes>) -> Response {
    let mut r = hyper::Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    r
}

fn json(status: u16, value: &impl serde::Serialize) -> Response {
    respond(status, "application/json", serde_json::to_string(value).unwrap_or_else(|e| format!(r#"{{"error":"{e}"}}"#)))
}

fn error(status: u16, message: impl std::fmt::Display) -> Response {
    json(status, &serde_json::json!({ "error": message.to_string() }))
}

fn failed(e: PlatformError) -> Response {
    error(e.status(), e)
}

/// A text body fed line by line from a task: the sender's lines, as they come.
fn streamed() -> (tokio::sync::mpsc::Sender<String>, Response) {
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(64);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|mut line| {
            line.push('\n');
            (Ok::<_, Infallible>(Frame::data(Bytes::from(line))), rx)
        })
    });
    let mut r = hyper::Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"));
    (tx, r)
}

async fn read_body(req: hyper::Request<hyper::body::Incoming>) -> Result<Bytes, Response> {
    const LIMIT: usize = 1 << 20;
    let limited = http_body_util::Limited::new(req.into_body(), LIMIT);
    limited.collect().await.map(|c| c.to_bytes()).map_err(|e| error(400, format!("request body (at most {LIMIT} bytes): {e}")))
}

async fn read_json<T: serde::de::DeserializeOwned>(req: hyper::Request<hyper::body::Incoming>) -> Result<T, Response> {
    let body = read_body(req).await?;
    serde_json::from_slice(&body).map_err(|e| error(400, format!("request body: {e}")))
}

fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == name).map(|(_, v)| v.to_owned())
}

impl Controller {
    fn authorized(&self, req: &hyper::Request<hyper::body::Incoming>) -> bool {
        let Some(token) = &self.token else { return true };
        let bearer = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned)
            .or_else(|| query_value(req.uri().query(), "token"));
        bearer.is_some_and(|b| constant_time_eq(b.as_bytes(), token.as_bytes()))
    }

    /// Answers one request.
    pub async fn answer(self: &Arc<Self>, req: hyper::Request<hyper::body::Incoming>) -> Response {
        let path = req.uri().path().to_owned();
        if path == "/healthz" {
            return json(200, &serde_json::json!({ "status": "ok" }));
        }
        if !self.authorized(&req) {
            return error(401, "this controller needs its token (Authorization: Bearer …)");
        }
        let by = req
            .headers()
            .get("x-minipaas-user")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 64)
            .unwrap_or("anonymous")
            .to_owned();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let method = req.method().clone();
        use hyper::Method as M;
        match (method, segments.as_slice()) {
            (M::GET, [""]) => super::dashboard::index(&self.platform).await,
            (M::GET, ["apps", app]) => super::dashboard::app(&self.platform, app, self.logd.as_ref()).await,
            (M::GET, ["v1", "apps"]) => match self.platform.apps.list().await {
                Ok(apps) => json(200, &apps),
                Err(e) => failed(e.into()),
            },
            (M::POST, ["v1", "apps"]) => {
                #[derive(Deserialize)]
                struct Create {
                    name: String,
                    manifest: String,
                }
                let create: Create = match read_json(req).await {
                    Ok(c) => c,
                    Err(r) => return r,
                };
                match self.create(&create.name, &create.manifest, &by).await {
                    Ok(app) => json(201, &app),
                    Err(e) => failed(e),
                }
            }
            (M::GET, ["v1", "apps", app]) => match self.platform.info(app).await {
                Ok(info) => json(200, &info),
                Err(e) => failed(e),
            },
            (M::DELETE, ["v1", "apps", app]) => match self.platform.delete(app).await {
                Ok(existed) => {
                    if let Some(git) = &self.git {
                        if let Err(e) = git.remove(app) {
                            return failed(e);
                        }
                    }
                    json(if existed { 200 } else { 404 }, &serde_json::json!({ "deleted": existed }))
                }
                Err(e) => failed(e),
            },
            (M::POST, ["v1", "apps", app, "clone"]) => {
                #[derive(Deserialize)]
                struct Clone {
                    to: String,
                }
                let c: Clone = match read_json(req).await {
                    Ok(c) => c,
                    Err(r) => return r,
                };
                let made = self.platform.apps.clone_app(app, &c.to, &by).await.map_err(PlatformError::from);
                match made.and_then(|a| self.init_repo(&a.name).map(|()| a)) {
                    Ok(a) => json(201, &a),
                    Err(e) => failed(e),
                }
            }
            (M::PUT, ["v1", "apps", app, "manifest"]) => {
                let body = match read_body(req).await {
                    Ok(b) => b,
                    Err(r) => return r,
                };
                match self.platform.apps.set_manifest(app, &String::from_utf8_lossy(&body)).await {
                    Ok(a) => json(200, &a),
                    Err(e) => failed(e.into()),
                }
            }
            (M::POST, ["v1", "apps", app, "deploy"]) => {
                #[derive(Deserialize)]
                struct Deploy {
                    image: String,
                }
                let d: Deploy = match read_json(req).await {
                    Ok(d) => d,
                    Err(r) => return r,
                };
                releases_made(self.platform.deploy_image(app, &d.image, &by).await)
            }
            (M::POST, ["v1", "apps", app, "builds"]) => {
                #[derive(Deserialize)]
                struct Build {
                    rev: String,
                }
                let b: Build = match read_json(req).await {
                    Ok(b) => b,
                    Err(r) => return r,
                };
                self.build(app, b.rev, by)
            }
            (M::GET, ["v1", "apps", app, "releases"]) => match self.platform.timeline(app).await {
                Ok(t) => json(200, &t),
                Err(e) => failed(e),
            },
            (M::POST, ["v1", "apps", app, "rollback"]) => {
                #[derive(Deserialize)]
                struct Rollback {
                    service: Option<String>,
                    release: Option<u64>,
                }
                let r: Rollback = match read_json(req).await {
                    Ok(r) => r,
                    Err(resp) => return resp,
                };
                releases_made(self.rollback(app, r.service, r.release, &by).await)
            }
            (M::GET, ["v1", "apps", app, "config"]) => match self.platform.apps.config(app).await {
                Ok(c) => json(200, &c),
                Err(e) => failed(e.into()),
            },
            (M::POST, ["v1", "apps", app, "config"]) => {
                #[derive(Deserialize)]
                struct Change {
                    #[serde(default)]
                    set: BTreeMap<String, String>,
                    #[serde(default)]
                    unset: Vec<String>,
                }
                let c: Change = match read_json(req).await {
                    Ok(c) => c,
                    Err(r) => return r,
                };
                let set: Vec<(String, String)> = c.set.into_iter().collect();
                releases_made(self.platform.change_config(app, &set, &c.unset, &by).await)
            }
            (M::POST, ["v1", "apps", app, "scale"]) => {
                #[derive(Deserialize)]
                struct Scale {
                    service: String,
                    count: u32,
                }
                let s: Scale = match read_json(req).await {
                    Ok(s) => s,
                    Err(r) => return r,
                };
                match self.platform.scale(app, &s.service, s.count, &by).await {
                    Ok(()) => json(200, &serde_json::json!({ "service": s.service, "count": s.count })),
                    Err(e) => failed(e),
                }
            }
            (M::GET, ["v1", "apps", app, "ps"]) => match self.platform.ps(app).await {
                Ok(p) => json(200, &p),
                Err(e) => failed(e),
            },
            (M::GET, ["v1", "apps", app, "logs"]) => {
                let query = req.uri().query();
                let tail = query_value(query, "tail").and_then(|t| t.parse().ok());
                let follow = query_value(query, "follow").is_some_and(|f| f == "1" || f == "true");
                self.logs(app, tail, follow).await
            }
            (M::POST, ["v1", "apps", app, "runs"]) => {
                let r: RunRequest = match read_json(req).await {
                    Ok(r) => r,
                    Err(resp) => return resp,
                };
                self.run(app, r, by).await
            }
            (M::GET, ["v1", "apps", app, "secrets"]) => match self.platform.apps.secret_names(app).await {
                Ok(names) => json(200, &names),
                Err(e) => failed(e.into()),
            },
            (M::PUT, ["v1", "apps", app, "secrets", key]) => {
                let body = match read_body(req).await {
                    Ok(b) => b,
                    Err(r) => return r,
                };
                let Ok(value) = String::from_utf8(body.to_vec()) else {
                    return error(400, format!("secret {key}: the value is not UTF-8"));
                };
                releases_made(self.platform.change_secret(app, key, Some(&value), &by).await)
            }
            (M::DELETE, ["v1", "apps", app, "secrets", key]) => releases_made(self.platform.change_secret(app, key, None, &by).await),
            (M::POST, ["v1", "apps", app, "domains"]) => {
                #[derive(Deserialize)]
                struct Domain {
                    service: String,
                    domain: String,
                    #[serde(default)]
                    cert: Option<String>,
                    #[serde(default)]
                    key: Option<String>,
                }
                let d: Domain = match read_json(req).await {
                    Ok(d) => d,
                    Err(r) => return r,
                };
                let tls = match (&d.cert, &d.key, &self.certs) {
                    (None, None, _) => None,
                    (Some(_), None, _) | (None, Some(_), _) => {
                        return error(400, format!("{}: a certificate needs its key, and a key its certificate", d.domain))
                    }
                    (Some(_), Some(_), None) => {
                        return error(400, format!("{}: this platform serves no HTTPS (minipaas up --tls-listen)", d.domain))
                    }
                    (Some(cert), Some(key), Some(dir)) => {
                        if !super::platform::is_domain(&d.domain) {
                            return error(400, format!("domain {:?}: not a host name", d.domain));
                        }
                        if let Err(e) = CertDir::check(&d.domain, cert, key) {
                            return error(400, e);
                        }
                        Some((dir, cert, key))
                    }
                };
                let made = self.platform.add_domain(app, &d.service, &d.domain, &by).await;
                if let (Ok(_), Some((dir, cert, key))) = (&made, tls) {
                    if let Err(e) = dir.install(&d.domain, cert, key) {
                        return error(500, e);
                    }
                    tracing::info!(app, domain = %d.domain, "certificate installed for edge");
                }
                releases_made(made)
            }
            (_, _) => error(404, format!("no such endpoint: {} {path}", req.method())),
        }
    }

    async fn create(&self, name: &str, manifest: &str, by: &str) -> Result<super::apps::App, PlatformError> {
        let app = self.platform.apps.create(name, manifest, by).await?;
        self.init_repo(name)?;
        Ok(app)
    }

    fn init_repo(&self, app: &str) -> Result<(), PlatformError> {
        if let Some(git) = &self.git {
            git.init(app)?;
        }
        Ok(())
    }

    async fn rollback(
        &self,
        app: &str,
        service: Option<String>,
        release: Option<u64>,
        by: &str,
    ) -> Result<Vec<(String, u64)>, PlatformError> {
        let manifest = self.platform.apps.get(app).await?.parsed().map_err(super::apps::AppsError::from)?;
        let services: Vec<String> = match service {
            Some(s) => vec![s],
            None if release.is_some() && manifest.services.len() > 1 => {
                return Err(PlatformError::Invalid("a release number names one service's release: say which service".into()))
            }
            None => manifest.services.into_keys().collect(),
        };
        let mut made = Vec::new();
        for service in services {
            made.push((service.clone(), self.platform.releases.rollback(app, &service, release, by).await?));
        }
        Ok(made)
    }

    fn build(self: &Arc<Self>, app: &str, rev: String, by: String) -> Response {
        let (Some(git), Some(builder)) = (self.git.clone(), self.builder.clone()) else {
            return failed(PlatformError::Unavailable("this controller builds nothing (no --registry): use deploy --image".into()));
        };
        let (tx, response) = streamed();
        let me = self.clone();
        let app = app.to_owned();
        tokio::spawn(async move {
            let sender = tx.clone();
            let mut last = String::new();
            let dropped = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
            let counted = dropped.clone();
            let mut progress = move |line: &str| {
                // The engine repeats its status lines ("Pushing") many times over.
                if line != last {
                    last = line.to_owned();
                    // The build does not wait for a slow (or gone) pusher: a line it cannot
                    // take now is dropped and counted, and the count is said at the end.
                    if sender.try_send(line.to_owned()).is_err() {
                        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            };
            let push = super::git::Push { app: &app, rev: &rev, by: &by, rollout_timeout: me.rollout_timeout };
            let result = git.deploy_push(&me.platform, builder.as_ref(), &push, &mut progress).await;
            let last = match result {
                Ok(made) => format!("deployed: {}", made.iter().map(|(s, v)| format!("{s} v{v}")).collect::<Vec<_>>().join(", ")),
                Err(e) => format!("failed: {e}"),
            };
            let dropped = dropped.load(std::sync::atomic::Ordering::Relaxed);
            if dropped > 0 {
                let _ = tx.send(format!("({dropped} progress lines were dropped: they came faster than they were read)")).await;
            }
            let _ = tx.send(last).await;
        });
        response
    }

    async fn logs(&self, app: &str, tail: Option<usize>, follow: bool) -> Response {
        let Some(logd) = self.logd.clone() else {
            return failed(PlatformError::Unavailable("this controller has no log server (--logd)".into()));
        };
        if let Err(e) = self.platform.apps.get(app).await {
            return failed(e.into());
        }
        let query = crate::logs_client::LogQuery { service: format!("{app}*"), tail: tail.or(Some(100)), follow, ..Default::default() };
        let body = match crate::logs_client::open(&query, &logd.base, logd.token.as_deref()).await {
            Ok(b) => b,
            Err(e) => return error(502, e),
        };
        let (tx, response) = streamed();
        tokio::spawn(async move {
            let mut lines = std::pin::pin!(crate::logs_client::records(body));
            while let Some(item) = lines.next().await {
                let line = match item {
                    Ok(r) => format!("{} {} {}", humantime::format_rfc3339_millis(r.timestamp), r.instance(), r.line),
                    Err(e) => format!("error: {e}"),
                };
                if tx.send(line).await.is_err() {
                    return;
                }
            }
        });
        response
    }

    async fn run(&self, app: &str, request: RunRequest, by: String) -> Response {
        let id = match self.platform.run(app, &request, &by).await {
            Ok(id) => id,
            Err(e) => return failed(e),
        };
        let (tx, response) = streamed();
        let platform = self.platform.clone();
        let limit = request.time_limit.unwrap_or(Duration::from_secs(600)) + Duration::from_secs(120);
        tokio::spawn(async move {
            let _ = tx.send(format!("run: {id}")).await;
            let deadline = std::time::Instant::now() + limit;
            loop {
                match platform.run_result(&id).await {
                    Ok(Some(result)) => {
                        for line in &result.output {
                            let _ = tx.send(line.line.clone()).await;
                        }
                        let code = match result.outcome {
                            keelson_scheduler::RunOutcome::Succeeded => 0,
                            keelson_scheduler::RunOutcome::Failed { code } => code.unwrap_or(128),
                            keelson_scheduler::RunOutcome::TimedOut => 124,
                        };
                        let _ = tx.send(format!("exit: {code}")).await;
                        return;
                    }
                    Ok(None) if std::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
                    Ok(None) => {
                        let _ = tx.send(format!("error: {id} has not ended after {}", humantime::format_duration(limit))).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(format!("error: {e}")).await;
                        return;
                    }
                }
            }
        });
        response
    }
}

fn releases_made(made: Result<Vec<(String, u64)>, PlatformError>) -> Response {
    match made {
        Ok(made) => json(
            200,
            &made.into_iter().map(|(service, release)| serde_json::json!({ "service": service, "release": release })).collect::<Vec<_>>(),
        ),
        Err(e) => failed(e),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves the controller on `listener` until `stop` resolves. Refuses to serve without a
/// token on anything but loopback.
pub async fn serve(
    listener: tokio::net::TcpListener,
    controller: Arc<Controller>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    if controller.token.is_none() && !local.ip().is_loopback() {
        return Err(format!("{local}: a controller listening beyond loopback needs a token (--token-file)"));
    }
    tokio::pin!(stop);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut stop => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "controller accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let controller = controller.clone();
        let service = hyper::service::service_fn(move |req| {
            let controller = controller.clone();
            async move { Ok::<_, Infallible>(controller.answer(req).await) }
        });
        tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), service));
    }
}
