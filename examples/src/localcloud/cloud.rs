//! The running cloud: one supervising process that makes the machines, starts every
//! program of a generation, deploys the roles, waits until every role answers by name
//! through the load balancer as a LAN machine would ask, and on [`Event::Reset`] wipes
//! the generation (its processes, containers, hosts and data) and starts the next.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::layout::{Layout, DNS_PORT, EDGE_METRICS_PORT, EDGE_PORT, ETCD_MEMBERS};
use super::machines;
use super::roles::{self, Roles};
use super::state::{CloudState, Host};
use crate::minipaas::platform::{cluster_root, Platform};
use crate::supervise::{program, which, Children};

/// The root of the cloud's keys in its etcd.
pub const ROOT: &str = "localcloud";
/// The minipaas app the roles are.
pub const APP: &str = "cloud";
/// Who releases are made by.
const BY: &str = "localcloud";

/// How a cloud runs.
#[derive(Clone, Debug)]
pub struct CloudConfig {
    /// Names and addresses.
    pub layout: Layout,
    /// State, data and logs (removed on the way down).
    pub state_dir: PathBuf,
    /// Where keelson's programs are (`node-agent`, `edge`, `dns-catalog`).
    pub bin_dir: PathBuf,
    /// The roles' manifest file (named in errors) and its text.
    pub roles_file: String,
    /// Its text.
    pub roles_text: String,
    /// Millicores each host offers.
    pub cpu: u64,
    /// MiB each host offers.
    pub memory: u64,
    /// How long a generation may take to answer.
    pub ready_timeout: Duration,
}

/// What the supervisor is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Wipe all data and start the same cloud again.
    Reset,
    /// Take everything down.
    Stop,
}

/// What going down removes, also when a start fails half way or the supervisor panics:
/// the machines (which kills what runs in them), containers, and the data. A failed
/// start keeps the logs, for the error message to point at.
struct Teardown<'a> {
    layout: &'a Layout,
    state_dir: &'a Path,
    keep_logs: bool,
}

impl Drop for Teardown<'_> {
    fn drop(&mut self) {
        machines::remove_all(self.layout);
        // Only what the cloud wrote: the state folder may be one the user keeps other
        // things in.
        let mut made = vec!["data", super::state::STATE_FILE, "unbound.conf", TOKEN_FILE];
        if !self.keep_logs {
            made.extend(["logs", LOG_FILE]);
        }
        for part in made {
            let path = self.state_dir.join(part);
            let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        }
        // Gone if nothing else is in it.
        let _ = std::fs::remove_dir(self.state_dir);
    }
}

/// The supervisor's own log in the state folder (`localcloud up` sends it there).
pub const LOG_FILE: &str = "localcloud.log";

/// The controller API's token, in the state folder.
pub const TOKEN_FILE: &str = "controller.token";

/// The port of the minipaas controller's API, on this machine's underlay address.
pub const CONTROLLER_PORT: u16 = 7800;

/// Everything a start needs, looked for before anything is made.
fn preflight(config: &CloudConfig) -> Result<(), String> {
    for (tool, package) in [("ip", "iproute2"), ("etcd", "etcd-server"), ("unbound", "unbound"), ("curl", "curl"), ("docker", "docker.io")]
    {
        which(tool, package)?;
    }
    for name in ["node-agent", "edge", "dns-catalog"] {
        program(&config.bin_dir, name)?;
    }
    Ok(())
}

/// A running generation: its programs, and the minipaas controller's API over its
/// cluster (apps, releases, scale, ps across the hosts), served by the supervisor.
struct Generation {
    children: Children,
    api_stop: tokio::sync::watch::Sender<bool>,
    api: tokio::task::JoinHandle<Result<(), String>>,
}

impl Drop for Generation {
    fn drop(&mut self) {
        // Stopped already, or abandoned: either way nothing keeps serving.
        self.api.abort();
    }
}

impl Generation {
    /// Stops serving the API and waits until its port is free again.
    async fn stop_api(&mut self) {
        let _ = self.api_stop.send(true);
        if let Err(e) = (&mut self.api).await.map_err(|e| e.to_string()).and_then(|r| r) {
            tracing::warn!(error = %e, "the controller API");
        }
    }
}

/// Runs the cloud until [`Event::Stop`] (or the sender is gone); `on_ready` hears of
/// every generation that answers.
pub async fn run(
    config: CloudConfig,
    mut events: tokio::sync::mpsc::Receiver<Event>,
    mut on_ready: impl FnMut(&CloudState),
) -> Result<(), String> {
    let layout = &config.layout;
    let roles = roles::prepare(layout, &config.roles_file, &config.roles_text)?;
    preflight(&config)?;
    machines::check_free(layout)?;
    std::fs::create_dir_all(&config.state_dir).map_err(|e| format!("{}: {e}", config.state_dir.display()))?;
    let state_dir = std::fs::canonicalize(&config.state_dir).map_err(|e| format!("{}: {e}", config.state_dir.display()))?;
    let logs = state_dir.join("logs");
    let mut teardown = Teardown { layout, state_dir: &state_dir, keep_logs: true };
    roles::ensure_image()?;
    machines::create_segment(layout)?;
    let mut lan = Children::new(&logs)?;
    start_lan_resolver(&mut lan, layout, &state_dir)?;
    // The controller's token, the same for every generation (the CLI keeps its file).
    let token = crate::supervise::random_token()?;
    crate::supervise::write_private(&state_dir.join(TOKEN_FILE), &format!("{token}\n"))?;

    let mut generation = 0;
    loop {
        generation += 1;
        let t0 = Instant::now();
        let mut state = initial_state(layout, &roles, generation, &state_dir);
        state.write(&state_dir)?;
        let started = tokio::select! {
            started = start_generation(&config, &roles, &state_dir, &mut lan, &token) => Some(started?),
            // Told something while starting: what started is killed as it is dropped;
            // a reset starts over, anything else stops.
            event = events.recv() => match event {
                Some(Event::Reset) => None,
                Some(Event::Stop) | None => break,
            },
        };
        let Some(mut running) = started else {
            tracing::info!(generation, "reset while starting: starting over");
            wipe_generation(layout, &state_dir)?;
            continue;
        };
        state.ready = true;
        state.ready_in_ms = t0.elapsed().as_millis() as u64;
        state.write(&state_dir)?;
        tracing::info!(generation, ready_in_ms = state.ready_in_ms, "every role answers by name");
        on_ready(&state);
        match events.recv().await {
            Some(Event::Reset) => {
                tracing::info!(generation, "reset: wiping all data");
                // Nothing to flush: the data goes. Killing is the quick way down.
                running.stop_api().await;
                running.children.kill_all();
                wipe_generation(layout, &state_dir)?;
            }
            Some(Event::Stop) | None => {
                // In order, each its own way: edge drains, the agents leave, etcd last.
                running.stop_api().await;
                running.children.stop_in_order(&["edge", "dns", "agent", "etcd"], Duration::from_secs(10));
                break;
            }
        }
    }
    lan.stop_in_order(&[], Duration::from_secs(5));
    teardown.keep_logs = false;
    drop(teardown);
    Ok(())
}

/// What a generation made: its hosts (with their processes and containers) and data.
fn wipe_generation(layout: &Layout, state_dir: &Path) -> Result<(), String> {
    machines::remove_hosts(layout);
    let data = state_dir.join("data");
    match std::fs::remove_dir_all(&data) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(format!("{}: {e}", data.display())),
        _ => Ok(()),
    }
}

fn initial_state(layout: &Layout, roles: &Roles, generation: u64, state_dir: &Path) -> CloudState {
    let lb = layout.lb_address();
    CloudState {
        pid: std::process::id(),
        name: layout.name.clone(),
        domain: layout.domain.clone(),
        generation,
        ready: false,
        ready_in_ms: 0,
        dns: SocketAddr::from((lb, DNS_PORT)),
        edge: SocketAddr::from((lb, EDGE_PORT)),
        edge_metrics: SocketAddr::from((lb, EDGE_METRICS_PORT)),
        etcd: layout.etcd_endpoints(),
        hosts: (1..=layout.hosts)
            .map(|i| Host { netns: layout.host_netns(i), node: layout.node(i), address: layout.host_address(i) })
            .collect(),
        lan_netns: layout.lan_netns(),
        roles: roles.names.clone(),
        controller: format!("http://{}:{CONTROLLER_PORT}", layout.machine_address()),
        token_file: state_dir.join(TOKEN_FILE),
        logs: state_dir.join("logs"),
    }
}

/// The LAN machine's resolver: unbound on its loopback, sending the cloud's zone to the
/// cloud's DNS server and nothing else anywhere (this machine may have no internet).
fn start_lan_resolver(lan: &mut Children, layout: &Layout, state_dir: &Path) -> Result<(), String> {
    let tld = layout.domain.rsplit('.').next().unwrap_or(&layout.domain);
    let config = format!(
        "server:\n\
         \x20 interface: 127.0.0.1\n\
         \x20 port: 53\n\
         \x20 do-daemonize: no\n\
         \x20 username: \"\"\n\
         \x20 chroot: \"\"\n\
         \x20 directory: \"{dir}\"\n\
         \x20 pidfile: \"\"\n\
         \x20 logfile: \"\"\n\
         \x20 use-syslog: no\n\
         \x20 do-ip6: no\n\
         \x20 access-control: 127.0.0.0/8 allow\n\
         \x20 domain-insecure: \"{domain}\"\n\
         \x20 local-zone: \"{tld}.\" nodefault\n\
         \x20 num-threads: 1\n\
         remote-control:\n\
         \x20 control-enable: no\n\
         forward-zone:\n\
         \x20 name: \"{domain}\"\n\
         \x20 forward-addr: {dns}@{DNS_PORT}\n",
        dir = state_dir.display(),
        domain = layout.domain,
        // unbound answers special-use names (`test.`, ...) itself by default (RFC 6761);
        // the cloud's zone under one must be let through.
        dns = layout.lb_address(),
    );
    let conf = state_dir.join("unbound.conf");
    std::fs::write(&conf, config).map_err(|e| format!("{}: {e}", conf.display()))?;
    let unbound = which("unbound", "unbound")?;
    lan.spawn_in(&layout.lan_netns(), "unbound", &unbound, &["-d".into(), "-c".into(), conf.display().to_string()])
}

/// One generation: hosts, etcd, the roles deployed, agents, DNS and edge, until every
/// role answers. Its children are returned running.
async fn start_generation(
    config: &CloudConfig,
    roles: &Roles,
    state_dir: &Path,
    lan: &mut Children,
    token: &str,
) -> Result<Generation, String> {
    let layout = &config.layout;
    let s = |p: &Path| p.display().to_string();
    let t0 = Instant::now();
    let deadline = t0 + config.ready_timeout;
    let step = |what: &str| tracing::info!(elapsed_ms = t0.elapsed().as_millis() as u64, "{what}");
    machines::create_hosts(layout)?;
    step("hosts made");
    let data = state_dir.join("data");
    std::fs::create_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
    let mut kids = Children::new(&state_dir.join("logs"))?;

    let etcd = which("etcd", "etcd-server")?;
    for i in 1..=ETCD_MEMBERS {
        let a = layout.host_address(i);
        let (client, peer) = (format!("http://{a}:2379"), format!("http://{a}:2380"));
        let args = [
            "--name",
            &layout.etcd_member(i),
            "--data-dir",
            &s(&data.join(layout.etcd_member(i))),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &layout.etcd_initial_cluster(),
            "--initial-cluster-token",
            &format!("localcloud-{}", layout.name),
            "--initial-cluster-state",
            "new",
            // The members share one machine and one switch: a short election (etcd's
            // tuning guide: about ten round trips per heartbeat, ten heartbeats per
            // election) puts a leader in place in well under a second.
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
        ];
        kids.spawn_in(&layout.host_netns(i), &layout.etcd_member(i), &etcd, &args.map(str::to_owned))?;
        // One member at a time: a new member first asks its peers whether it is in a
        // cluster already, and a peer that has bound its port but not yet begun to
        // serve holds that question for etcd's whole bootstrap timeout (1 s per peer).
        // A peer not started refuses at once, one serving answers at once.
        wait_for_peer_service(&mut kids, &layout.etcd_member(i), SocketAddr::from((a, 2380)), deadline).await?;
    }
    let endpoints = layout.etcd_endpoints();
    let kv = connect_etcd(&endpoints, &mut kids, deadline).await?;
    step("etcd answers on every member");

    let etcd_flag = endpoints.join(",");
    let agent = program(&config.bin_dir, "node-agent")?;
    for i in 1..=layout.hosts {
        let args = [
            "--etcd",
            &etcd_flag,
            "--root",
            &cluster_root(ROOT),
            "--node",
            &layout.node(i),
            "--datacenter",
            &layout.name,
            // A label of its own per host: roles spread over `label.host`.
            "--label",
            &format!("host=h{i}"),
            "--address",
            &layout.host_address(i).to_string(),
            "--cpu",
            &config.cpu.to_string(),
            "--memory",
            &config.memory.to_string(),
            // A lost host is noticed in 3 s; its work moves then.
            "--ttl",
            "3s",
            "--interval",
            "200ms",
            "--ports",
            "20000-20999",
            "--network",
            "overlay",
            "--network-name",
            "localcloud",
            "--network-state-dir",
            &s(&data.join(format!("net-h{i}"))),
        ];
        kids.spawn_in(&layout.host_netns(i), &format!("agent{i}"), &agent, &args.map(str::to_owned))?;
    }

    // The roles once every host has joined, so they spread over all of them (placed
    // earlier, they would all go to the first host to join).
    let platform = Platform::new(kv, ROOT);
    wait_for_hosts(&platform, layout, &mut kids, deadline).await?;
    step("every host joined");
    platform.apps.create(APP, &roles.manifest, BY).await.map_err(|e| format!("the roles: {e}"))?;
    platform.deploy_image(APP, roles::IMAGE, BY).await.map_err(|e| format!("deploying the roles: {e}"))?;
    step("roles deployed");
    let (api_stop, api) = serve_controller(&platform, layout, token).await?;
    // From here the generation owns everything: an early return or a start abandoned
    // (a reset while starting) kills its programs and frees the API's port.
    let mut generation = Generation { children: kids, api_stop, api };
    let kids = &mut generation.children;

    let lb = layout.lb_address();
    let lb_netns = layout.host_netns(layout.lb_host());
    let mut dns_args: Vec<String> =
        ["--etcd", &etcd_flag, "--listen", &format!("{lb}:{DNS_PORT}"), "--domain", &layout.domain].map(str::to_owned).to_vec();
    // The cloud's own name, the load balancer's and every role's: all the load balancer.
    for name in ["@", "lb"].into_iter().chain(roles.names.iter().map(|n| n.split('.').next().unwrap_or_default())) {
        dns_args.extend(["--host".to_owned(), format!("{name}={lb}")]);
    }
    kids.spawn_in(&lb_netns, "dns", &program(&config.bin_dir, "dns-catalog")?, &dns_args)?;
    let edge_args =
        ["--etcd", &etcd_flag, "--listen", &format!("{lb}:{EDGE_PORT}"), "--metrics-listen", &format!("{lb}:{EDGE_METRICS_PORT}")];
    kids.spawn_in(&lb_netns, "edge", &program(&config.bin_dir, "edge")?, &edge_args.map(str::to_owned))?;

    wait_until_answering(layout, roles, &mut generation.children, lan, deadline).await?;
    Ok(generation)
}

/// The minipaas controller's API over the cloud's cluster, on this machine's address on
/// the underlay (hosts and the LAN machine reach it), behind the token.
async fn serve_controller(
    platform: &Platform,
    layout: &Layout,
    token: &str,
) -> Result<(tokio::sync::watch::Sender<bool>, tokio::task::JoinHandle<Result<(), String>>), String> {
    let addr = SocketAddr::from((layout.machine_address(), CONTROLLER_PORT));
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("the controller API on {addr}: {e}"))?;
    let controller = Arc::new(crate::minipaas::api::Controller {
        platform: platform.clone(),
        git: None,
        builder: None,
        logd: None,
        token: Some(token.to_owned()),
        rollout_timeout: Duration::from_secs(300),
        certs: None,
    });
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let serving = tokio::spawn(crate::minipaas::api::serve(listener, controller, async move {
        let _ = stopped.wait_for(|s| *s).await;
    }));
    Ok((stop, serving))
}

/// Waits until the etcd member `name` serves its peer API (`GET /members` answers).
async fn wait_for_peer_service(kids: &mut Children, name: &str, peer: SocketAddr, deadline: Instant) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let asked = async {
            let mut stream = tokio::net::TcpStream::connect(peer).await.ok()?;
            stream.write_all(b"GET /members HTTP/1.0\r\n\r\n").await.ok()?;
            let mut head = [0u8; 12];
            stream.read_exact(&mut head).await.ok()?;
            Some(head.starts_with(b"HTTP/1.0 200") || head.starts_with(b"HTTP/1.1 200"))
        };
        if tokio::time::timeout(Duration::from_millis(200), asked).await.ok().flatten() == Some(true) {
            return Ok(());
        }
        kids.check_running(name)?;
        if Instant::now() > deadline {
            return Err(format!("{name} does not serve its peers on {peer} in time (logs: {})", kids.logs.display()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An etcd client once every member answers and the cluster has a leader (a write goes
/// through each): the client spreads requests over the members, and one still joining
/// would fail some of them.
async fn connect_etcd(
    endpoints: &[String],
    kids: &mut Children,
    deadline: Instant,
) -> Result<Arc<dyn keelson_discovery::KeyValue>, String> {
    use keelson_discovery::{EtcdConfig, EtcdKv, KeyValue};
    for endpoint in endpoints {
        loop {
            for i in 1..=ETCD_MEMBERS {
                kids.check_running(&format!("etcd{i}"))?;
            }
            let last = match EtcdKv::connect(EtcdConfig::new([endpoint.clone()])).await {
                Ok(kv) => match kv.put(&format!("{ROOT}/started"), Vec::new(), None).await {
                    Ok(_) => break,
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                return Err(format!("etcd at {endpoint} does not answer in time: {last}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let kv = EtcdKv::connect(EtcdConfig::new(endpoints.to_vec())).await.map_err(|e| format!("etcd at {}: {e}", endpoints.join(",")))?;
    Ok(Arc::new(kv))
}

/// Waits until every host's agent has joined the cluster.
async fn wait_for_hosts(platform: &Platform, layout: &Layout, kids: &mut Children, deadline: Instant) -> Result<(), String> {
    loop {
        let nodes = platform.store.nodes().await.map_err(|e| format!("the cluster's nodes: {e}"))?;
        let missing: Vec<String> = (1..=layout.hosts).map(|i| layout.node(i)).filter(|n| !nodes.iter().any(|node| &node.id == n)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        for i in 1..=layout.hosts {
            kids.check_running(&format!("agent{i}"))?;
        }
        if Instant::now() > deadline {
            return Err(format!("hosts not joined in time: {} (logs: {})", missing.join(", "), kids.logs.display()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Calls `url` from the LAN machine (its resolver, its route): true on a 2xx answer.
pub fn answers_from_lan(lan_netns: &str, url: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", lan_netns, "curl", "-sf", "-o", "/dev/null", "--max-time", "0.5", url])
        .status()
        .is_ok_and(|s| s.success())
}

/// Waits until, from the LAN machine, every role's name answers through edge and the
/// cloud's own name reaches edge's readiness.
async fn wait_until_answering(
    layout: &Layout,
    roles: &Roles,
    kids: &mut Children,
    lan: &mut Children,
    deadline: Instant,
) -> Result<(), String> {
    let mut pending: Vec<String> = roles.names.iter().map(|n| format!("http://{n}/")).collect();
    pending.push(format!("http://{}:{EDGE_METRICS_PORT}/readyz", layout.domain));
    let lan_netns = layout.lan_netns();
    let names: Vec<String> = kids.children.iter().map(|c| c.name.clone()).collect();
    loop {
        let (netns, left) = (lan_netns.clone(), pending.clone());
        pending = tokio::task::spawn_blocking(move || left.into_iter().filter(|url| !answers_from_lan(&netns, url)).collect())
            .await
            .map_err(|e| e.to_string())?;
        if pending.is_empty() {
            return Ok(());
        }
        for name in &names {
            kids.check_running(name)?;
        }
        lan.check_running("unbound")?;
        if Instant::now() > deadline {
            return Err(format!("not answering from the LAN after the timeout: {} (logs: {})", pending.join(", "), kids.logs.display()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
