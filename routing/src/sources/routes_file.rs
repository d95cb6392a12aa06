//! Routes from a file people write: [`RoutesFile`] parses and checks it, and
//! [`RoutesFileSource`] installs it and keeps it installed: on reload (SIGHUP, or the file
//! changing on disk) only the difference is applied, and a file that does not parse or
//! validate changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::route::{Balancer, Endpoint, Host, Route, RouteChange, RouteKey};
use crate::router::{MemoryRouter, Router};
use crate::sources::status::SourceStatus;
use crate::sources::sync::sync_routes;

/// A routes file: `{"routes": [{"host": "...", "endpoints": [{"id": "...", "addr": "ip:port"}]}]}`,
/// optionally with `"tcp": [{"listen": "0.0.0.0:5432", "sni": "db.example", "endpoints": [...]}]`.
/// Unknown keys are rejected, so a typo is an error and not a silently ignored setting.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesFile {
    /// HTTP routes.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// TCP routes, served by a [`crate::TcpProxy`] per listen address.
    #[serde(default)]
    pub tcp: Vec<TcpRoute>,
}

/// A TCP route: connections to `listen` whose TLS server name is `sni` (or, without
/// `sni`, every other connection) go to `endpoints`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpRoute {
    /// The listen address.
    pub listen: SocketAddr,
    /// The TLS server name (exact or `*.parent`); none for the listener's default.
    #[serde(default)]
    pub sni: Option<Host>,
    /// Upstream servers.
    pub endpoints: Vec<Endpoint>,
    /// How connections are spread (default round robin).
    #[serde(default)]
    pub balancer: Balancer,
}

impl TcpRoute {
    /// The route as its listener's [`crate::TcpProxy`] router holds it.
    pub fn to_route(&self) -> Result<Route> {
        let host = match &self.sni {
            Some(h) => h.clone(),
            None => Host::new(crate::TCP_DEFAULT_HOST)?,
        };
        Ok(Route::new(host, self.endpoints.clone()).with_balancer(self.balancer.clone()))
    }
}

impl RoutesFile {
    /// Parses a routes file from JSON text; errors carry serde's line and column.
    pub fn parse(text: &str) -> Result<Self> {
        let file: RoutesFile =
            serde_json::from_str(text).map_err(|e| Error::invalid("routes file", e.to_string(), "is not a valid routes file"))?;
        let mut keys = BTreeSet::new();
        for r in &file.routes {
            if !keys.insert((&r.host, &r.path)) {
                return Err(Error::invalid("route", format!("{}{}", r.host, r.path), "appears twice in the routes file"));
            }
        }
        let mut tcp_keys = BTreeSet::new();
        for t in &file.tcp {
            if !tcp_keys.insert((t.listen, &t.sni)) {
                let sni = t.sni.as_ref().map_or("default", Host::as_str);
                return Err(Error::invalid("TCP route", format!("{} {sni}", t.listen), "appears twice in the routes file"));
            }
        }
        Ok(file)
    }

    /// Reads and parses a routes file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| Error::Io { context: format!("reading routes file {}", path.display()), source })?;
        RoutesFile::parse(&text)
    }

    /// The changes that install these routes.
    pub fn changes(self) -> Vec<RouteChange> {
        self.routes.into_iter().map(RouteChange::Upsert).collect()
    }
}

/// A routes file's TCP routes by listen address, and its HTTP routes, keyed as a router
/// holds them.
#[derive(Debug, Default, PartialEq)]
struct FileRoutes {
    http: BTreeMap<RouteKey, Route>,
    tcp: BTreeMap<SocketAddr, BTreeMap<RouteKey, Route>>,
}

impl FileRoutes {
    fn read(path: &Path) -> Result<FileRoutes> {
        let file = RoutesFile::load(path)?;
        let mut tcp: BTreeMap<SocketAddr, BTreeMap<RouteKey, Route>> = BTreeMap::new();
        for t in &file.tcp {
            let route = t.to_route()?;
            tcp.entry(t.listen).or_default().insert(route.key(), route);
        }
        Ok(FileRoutes { http: file.routes.into_iter().map(|r| (r.key(), r)).collect(), tcp })
    }
}

/// What one [`RoutesFileSource::reload`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reloaded {
    /// Route changes applied (upserts and removals, HTTP and TCP).
    pub changes: usize,
    /// TCP listen addresses the file names that had no listener when the source was
    /// opened: their routes wait until the embedder restarts with a listener there.
    pub new_listeners: Vec<SocketAddr>,
}

/// How the file looked when last read: a change in any of these means read it again
/// (an editor that writes a new file and renames it over the old changes the inode).
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl FileStamp {
    fn of(path: &Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        Some(FileStamp { modified: meta.modified().ok(), len: meta.len(), inode: meta.ino() })
    }
}

/// A routes file installed on routers and kept installed: its HTTP routes on one router,
/// its TCP routes on one [`MemoryRouter`] per listen address (serve each with a
/// [`TcpProxy`](crate::TcpProxy)). Only the routes the file installed are ever changed or
/// removed, so the same router can also follow discovery.
///
/// ```no_run
/// # async fn demo() -> keelson_routing::Result<()> {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use keelson_routing::{MemoryRouter, RoutesFileSource};
///
/// let http = Arc::new(MemoryRouter::new());
/// let source = RoutesFileSource::open("routes.json", http.clone()).await?;
/// for (addr, _router) in source.tcp_routers() {
///     println!("the file has TCP routes for {addr}");
/// }
/// // Reload on SIGHUP, and within a second of the file changing.
/// let _watch = source.watch(Duration::from_secs(1))?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct RoutesFileSource {
    path: PathBuf,
    http: Arc<dyn Router>,
    tcp: BTreeMap<SocketAddr, Arc<MemoryRouter>>,
    installed: FileRoutes,
    stamp: Option<FileStamp>,
    status: SourceStatus,
}

impl RoutesFileSource {
    /// Reads `path` and installs it. A file that cannot be read, does not parse or that
    /// the router refuses is an error, and nothing is installed.
    pub async fn open(path: impl Into<PathBuf>, http: Arc<dyn Router>) -> Result<Self> {
        let path = path.into();
        let stamp = FileStamp::of(&path);
        let wanted = FileRoutes::read(&path)?;
        let tcp = wanted.tcp.keys().map(|addr| (*addr, Arc::new(MemoryRouter::new()))).collect();
        let mut source = RoutesFileSource { path, http, tcp, installed: FileRoutes::default(), stamp, status: SourceStatus::new() };
        source.install(wanted).await?;
        source.status.succeeded();
        Ok(source)
    }

    /// Reports reloads into `status` (`keelson_route_source_stale` while the file on disk
    /// is broken and the last good routes serve).
    pub fn with_status(mut self, status: SourceStatus) -> Self {
        // The file was installed when the source opened: the status starts current.
        status.succeeded();
        self.status = status;
        self
    }

    /// The file read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One router per TCP listen address the file had when opened.
    pub fn tcp_routers(&self) -> &BTreeMap<SocketAddr, Arc<MemoryRouter>> {
        &self.tcp
    }

    /// Reads the file again and applies only its difference. A file that cannot be read
    /// or does not parse changes nothing and is an error; so is one a router refuses (the
    /// routers that accepted their part keep it: each router's change is all or nothing).
    pub async fn reload(&mut self) -> Result<Reloaded> {
        self.stamp = FileStamp::of(&self.path);
        let result = match FileRoutes::read(&self.path) {
            Ok(wanted) => self.install(wanted).await,
            Err(e) => Err(e),
        };
        match &result {
            Ok(_) => self.status.succeeded(),
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "routes file not applied; keeping the routes in force");
                self.status.failed();
            }
        }
        result
    }

    async fn install(&mut self, mut wanted: FileRoutes) -> Result<Reloaded> {
        let mut done = Reloaded::default();
        for addr in wanted.tcp.keys().filter(|a| !self.tcp.contains_key(*a)) {
            tracing::warn!(%addr, "a TCP listen address added to the routes file opens only after a restart");
            done.new_listeners.push(*addr);
        }
        let mut first_error = None;
        match sync_routes(self.http.as_ref(), &mut self.installed.http, std::mem::take(&mut wanted.http), "http from file").await {
            Ok(n) => done.changes += n,
            Err(e) => first_error = first_error.or(Some(e)),
        }
        for (addr, router) in &self.tcp {
            let routes = wanted.tcp.remove(addr).unwrap_or_default();
            let owned = self.installed.tcp.entry(*addr).or_default();
            match sync_routes(router.as_ref(), owned, routes, "tcp from file").await {
                Ok(n) => done.changes += n,
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }

    /// Reloads on SIGHUP, and when the file changes on disk (checked every `poll`: a
    /// stat, so cheap; polling also sees a file replaced by rename, which a watch on the
    /// old inode would miss), until the returned task is aborted. Failed reloads are
    /// logged and counted in the source's status; the routes in force stay.
    pub fn watch(mut self, poll: Duration) -> Result<JoinHandle<()>> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).map_err(|source| Error::Io { context: "listening for SIGHUP".into(), source })?;
        Ok(tokio::spawn(async move {
            let mut tick = tokio::time::interval(poll.max(Duration::from_millis(10)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = hup.recv() => {}
                    _ = tick.tick() => {
                        if FileStamp::of(&self.path) == self.stamp {
                            continue;
                        }
                    }
                }
                if let Ok(done) = self.reload().await {
                    tracing::info!(path = %self.path.display(), changes = done.changes, "routes file reloaded");
                }
            }
        }))
    }
}
