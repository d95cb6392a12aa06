//! `minipaas up` and `down`: the platform on one machine from keelson's own programs.
//!
//! `up` starts, each on a free loopback port, with its log in `<data-dir>/logs/`:
//! etcd (the cluster state), `registry` (images, loopback only), `logd` (output, behind
//! a token), a `node-agent` running tasks on the Docker Engine on a keelson bridge with
//! NAT (`minipaas`, 10.249.0.0/24), `edge` routing apps' domains, and the controller
//! itself (the API, the dashboard and the apps' git repositories). It writes
//! `<data-dir>/up.json` (where everything is; the CLI reads it) and stays in the
//! foreground until SIGTERM or Ctrl-C, or `minipaas down`, which signals it. Going down
//! removes everything it made: processes, containers, one-off runs, volumes, images
//! pushed to its registry, the bridge with its nft rules, and the data folder.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::api::{Controller, LogdAccess};
use super::client::{UpFile, UP_FILE};
use super::git::{DockerBuilder, GitRepos};
use super::platform::{cluster_root, Platform};
use crate::supervise::{free_port, program, random_token, write_private, Children};

/// The keelson network apps' tasks go on.
pub const NETWORK: &str = "minipaas";
/// Its subnet.
pub const SUBNET: &str = "10.249.0.0/24";
/// The root of the platform's keys in etcd.
pub const ROOT: &str = "minipaas";

/// How `up` runs.
#[derive(Clone, Debug)]
pub struct UpConfig {
    /// Everything goes here (and is removed on the way down).
    pub data_dir: PathBuf,
    /// The controller's address.
    pub listen: SocketAddr,
    /// edge's address.
    pub edge: SocketAddr,
    /// Where keelson's programs are (`registry`, `logd`, `node-agent`, `edge`).
    pub bin_dir: PathBuf,
    /// The `minipaas` program (git hooks call it).
    pub minipaas: PathBuf,
    /// Resources the node offers: millicores and MiB.
    pub cpu: u64,
    /// MiB.
    pub memory: u64,
    /// HTTPS for apps' domains, with certificates from an ACME CA.
    pub tls: Option<UpTls>,
}

/// HTTPS on edge: for domains added with their own certificate (`domains add --cert`),
/// and, with an ACME CA, for routed names under some domains (HTTP-01 answered on
/// edge's HTTP address, which must be what the names' port 80 reaches).
#[derive(Clone, Debug)]
pub struct UpTls {
    /// Where edge serves HTTPS.
    pub listen: SocketAddr,
    /// Certificates from an ACME CA, if any.
    pub acme: Option<UpAcme>,
}

/// An ACME CA for edge.
#[derive(Clone, Debug)]
pub struct UpAcme {
    /// The CA's directory URL.
    pub directory: String,
    /// A PEM root the CA's HTTPS chains to (a private or test CA).
    pub ca_file: Option<PathBuf>,
    /// Domains whose routed names get certificates (`apps.example.com`).
    pub domains: Vec<String>,
}

/// Runs the platform until `stop` resolves, then takes it all down. `ready` gets the
/// state once everything answers.
pub async fn up(config: UpConfig, ready: impl FnOnce(&UpFile), stop: impl std::future::Future<Output = ()>) -> Result<(), String> {
    let data = &config.data_dir;
    if let Ok(state) = UpFile::read(data) {
        if crate::supervise::is_running(state.pid) {
            return Err(format!("{} is in use by minipaas up (pid {}): minipaas down first", data.display(), state.pid));
        }
    }
    let logs = data.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
    let data = std::fs::canonicalize(data).map_err(|e| format!("{}: {e}", data.display()))?;
    let logs = data.join("logs");
    let node = format!("minipaas-{}", std::process::id());
    let mut cleanup = Teardown { data: data.clone(), node: node.clone(), registry: None, volumes: Vec::new(), done: false };
    let result = run(&config, &data, &logs, &node, &mut cleanup, ready, stop).await;
    cleanup.run().await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn run(
    config: &UpConfig,
    data: &Path,
    logs: &Path,
    node: &str,
    cleanup: &mut Teardown,
    ready: impl FnOnce(&UpFile),
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let s = |p: &Path| p.display().to_string();
    let mut started = Children::new(logs)?;
    let t0 = Instant::now();

    let (etcd_port, peer_port) = (free_port()?, free_port()?);
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    started.spawn(
        "etcd",
        &crate::supervise::which("etcd", "etcd-server")?,
        &[
            "--name".into(),
            "minipaas".into(),
            "--data-dir".into(),
            s(&data.join("etcd")),
            "--listen-client-urls".into(),
            etcd_url.clone(),
            "--advertise-client-urls".into(),
            etcd_url.clone(),
            "--listen-peer-urls".into(),
            peer.clone(),
            "--initial-advertise-peer-urls".into(),
            peer.clone(),
            "--initial-cluster".into(),
            format!("minipaas={peer}"),
        ],
    )?;

    let registry = format!("127.0.0.1:{}", free_port()?);
    cleanup.registry = Some(registry.clone());
    started.spawn(
        "registry",
        &program(&config.bin_dir, "registry")?,
        &["serve".into(), "--root".into(), s(&data.join("registry")), "--listen".into(), registry.clone()],
    )?;

    let logd = format!("127.0.0.1:{}", free_port()?);
    let logd_token_file = data.join("logd.token");
    let logd_token = random_token()?;
    write_private(&logd_token_file, &format!("{logd_token}\n"))?;
    started.spawn(
        "logd",
        &program(&config.bin_dir, "logd")?,
        &["--dir".into(), s(&data.join("logd")), "--listen".into(), logd.clone(), "--token-file".into(), s(&logd_token_file)],
    )?;

    started.wait_for("etcd", etcd_url.trim_start_matches("http://").parse().map_err(|_| "etcd address")?, Duration::from_secs(20)).await?;
    started.wait_for("registry", registry.parse().map_err(|_| "registry address")?, Duration::from_secs(20)).await?;
    started.wait_for("logd", logd.parse().map_err(|_| "logd address")?, Duration::from_secs(20)).await?;

    let cluster = cluster_root(ROOT);
    started.spawn(
        "node-agent",
        &program(&config.bin_dir, "node-agent")?,
        &[
            "--etcd".into(),
            etcd_url.clone(),
            "--root".into(),
            cluster.clone(),
            "--node".into(),
            node.to_owned(),
            "--address".into(),
            "127.0.0.1".into(),
            "--cpu".into(),
            config.cpu.to_string(),
            "--memory".into(),
            config.memory.to_string(),
            "--ttl".into(),
            "3s".into(),
            "--interval".into(),
            "200ms".into(),
            "--network".into(),
            "bridge".into(),
            "--network-name".into(),
            NETWORK.into(),
            "--network-subnet".into(),
            SUBNET.into(),
            "--network-state-dir".into(),
            s(&data.join("netplumb")),
            "--secrets-dir".into(),
            s(&data.join("secrets")),
            "--logs-to".into(),
            format!("http://{logd}/v1/push"),
            "--logs-token-file".into(),
            s(&logd_token_file),
        ],
    )?;
    let mut edge_args = vec!["--etcd".into(), etcd_url.clone(), "--listen".into(), config.edge.to_string()];
    let cert_dir = data.join("certs");
    if let Some(tls) = &config.tls {
        std::fs::create_dir_all(&cert_dir).map_err(|e| format!("{}: {e}", cert_dir.display()))?;
        edge_args.extend(["--tls-listen".into(), tls.listen.to_string(), "--cert-dir".into(), s(&cert_dir)]);
        if let Some(acme) = &tls.acme {
            edge_args.extend(["--acme-directory".into(), acme.directory.clone(), "--acme-state".into(), s(&data.join("acme"))]);
            for d in &acme.domains {
                edge_args.extend(["--acme-routed-domain".into(), d.clone()]);
            }
            if let Some(ca) = &acme.ca_file {
                edge_args.extend(["--acme-ca-file".into(), s(ca)]);
            }
        }
    }
    started.spawn("edge", &program(&config.bin_dir, "edge")?, &edge_args)?;
    let edge_pid = started.children.iter().find(|c| c.name == "edge").map(|c| c.child.id());
    started.wait_for("edge", config.edge, Duration::from_secs(20)).await?;

    let kv: Arc<dyn keelson_discovery::KeyValue> = Arc::new(
        keelson_discovery::EtcdKv::connect(keelson_discovery::EtcdConfig::new([etcd_url.clone()]))
            .await
            .map_err(|e| format!("etcd at {etcd_url}: {e}"))?,
    );
    let platform = Platform::new(kv, ROOT);
    let token_file = data.join("controller.token");
    let token = random_token()?;
    write_private(&token_file, &format!("{token}\n"))?;
    let controller_url = format!("http://{}", config.listen);
    let hook = format!("'{}' hook --controller {controller_url} --token-file '{}'", config.minipaas.display(), token_file.display());
    let images = keelson_scheduler::DockerImages::connect().await.map_err(|e| format!("Docker Engine: {e}"))?;
    let controller = Arc::new(Controller {
        platform: platform.clone(),
        git: Some(GitRepos::new(data.join("git"), hook)),
        builder: Some(Arc::new(DockerBuilder { images, registry: registry.clone(), auth: None })),
        logd: Some(LogdAccess { base: format!("http://{logd}"), token: Some(logd_token) }),
        token: Some(token),
        rollout_timeout: Duration::from_secs(300),
        certs: config.tls.as_ref().map(|_| super::api::CertDir { dir: cert_dir.clone(), edge_pid }),
    });
    let listener = tokio::net::TcpListener::bind(config.listen).await.map_err(|e| format!("--listen {}: {e}", config.listen))?;
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    let mut stopped_rx = stopped.clone();
    let serving = tokio::spawn(super::api::serve(listener, controller, async move {
        let _ = stopped_rx.wait_for(|s| *s).await;
    }));
    // The node is in the cluster once its agent has joined.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !platform.store.nodes().await.map_err(|e| e.to_string())?.iter().any(|n| n.id == node) {
        if Instant::now() > deadline {
            return Err(format!("the node agent did not join in 30 s (see {}/node-agent.log)", logs.display()));
        }
        started.check_running("node-agent")?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let state = UpFile {
        pid: std::process::id(),
        controller: controller_url,
        token_file,
        edge: config.edge,
        edge_tls: config.tls.as_ref().map(|t| t.listen),
        registry,
        etcd: etcd_url,
        logd,
        git_root: data.join("git"),
        node: node.to_owned(),
    };
    write_private(&data.join(UP_FILE), &serde_json::to_string_pretty(&state).map_err(|e| e.to_string())?)?;
    tracing::info!(elapsed_ms = t0.elapsed().as_millis() as u64, "minipaas is up");
    ready(&state);

    stop.await;
    tracing::info!("minipaas going down");
    // What the cluster made that outlives the agent: its volumes.
    if let Ok(view) = platform.store.view().await {
        cleanup.volumes = view.volumes.into_iter().map(|v| v.name).collect();
    }
    let _ = stopping.send(true);
    let _ = serving.await;
    // The agent first (so nothing restarts what goes next), the servers after it.
    started.stop_in_order(&["edge", "node-agent", "logd", "registry", "etcd"], Duration::from_secs(10));
    Ok(())
}

/// What going down removes, run whether `up` ended well or not.
struct Teardown {
    data: PathBuf,
    node: String,
    registry: Option<String>,
    volumes: Vec<String>,
    done: bool,
}

impl Teardown {
    async fn run(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let docker = |args: &[&str]| {
            std::process::Command::new("docker").args(args).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        };
        // The node's containers: its tasks and one-off runs.
        crate::supervise::remove_containers("keelson.node", &self.node);
        for v in &self.volumes {
            let _ = docker(&["volume", "rm", "-f", v]);
        }
        if let Some(registry) = &self.registry {
            if let Ok(images) = docker(&["images", "--format", "{{.Repository}}:{{.Tag}}"]) {
                for image in images.lines().filter(|i| i.starts_with(&format!("{registry}/"))) {
                    let _ = docker(&["rmi", "-f", image]);
                }
            }
        }
        // The bridge, its addresses and its nft rules.
        use keelson_netplumb::NetworkDriver;
        match keelson_netplumb::BridgeNetwork::open(keelson_netplumb::KernelConfig::in_dir(self.data.join("netplumb"))) {
            Ok(bridge) => {
                // Its containers are gone; what they were attached with goes first (a
                // network with attachments is not deleted).
                if let Err(e) = bridge.gc(&[]).await {
                    tracing::warn!(error = %e, "detaching the minipaas network's endpoints");
                }
                if let Err(e) = bridge.delete_network(NETWORK).await {
                    if !matches!(e, keelson_netplumb::Error::NotFound { .. }) {
                        tracing::warn!(error = %e, "removing the minipaas network");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "opening the minipaas network's state"),
        }
        if let Err(e) = std::fs::remove_dir_all(&self.data) {
            tracing::warn!(error = %e, dir = %self.data.display(), "removing the data folder");
        }
    }
}

/// Signals the `minipaas up` using `data_dir` to go down and waits until it is gone.
pub fn down(data_dir: &Path, limit: Duration) -> Result<UpFile, String> {
    let state = UpFile::read(data_dir)?;
    crate::supervise::signal_and_wait("minipaas up", state.pid, nix::sys::signal::Signal::SIGTERM, limit)?;
    Ok(state)
}
