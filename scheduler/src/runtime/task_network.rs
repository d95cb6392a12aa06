//! Tasks on a keelson network: the driver starts a container with no network of its
//! engine's, then attaches its namespace (`/proc/<pid>/ns/net`) to a keelson network
//! through any `NetworkDriver` (bridge, overlay, macvlan), publishes its ports there,
//! and detaches it when the task stops. A container restarted in place by its engine
//! has a new namespace: the attachment follows it (see [`TaskNetwork::address`]).

use std::net::IpAddr;
use std::sync::Arc;

use keelson_netplumb::{AttachmentKey, EndpointSpec, NetworkDriver};

use crate::error::{Error, Result};
use crate::task::PortMapping;

/// A keelson network tasks are put on.
#[derive(Clone, Debug)]
pub struct TaskNetwork {
    driver: Arc<dyn NetworkDriver>,
    network: String,
    dns: Vec<IpAddr>,
}

fn net_error(e: keelson_netplumb::Error) -> Error {
    let retryable = e.is_retryable();
    match e {
        keelson_netplumb::Error::InvalidInput { field, value, reason } => Error::invalid(field, value, reason),
        keelson_netplumb::Error::Conflict { kind, name, reason } => Error::Conflict { kind, name, reason },
        keelson_netplumb::Error::NotFound { kind, name } => Error::NotFound { kind, name },
        other if retryable => Error::Unavailable { backend: "netplumb", reason: other.to_string() },
        other => Error::Backend { backend: "netplumb", source: Box::new(other) },
    }
}

fn netns_of(pid: u32) -> String {
    format!("/proc/{pid}/ns/net")
}

impl TaskNetwork {
    /// Tasks on `network` of `driver` (the network must exist).
    pub fn new(driver: Arc<dyn NetworkDriver>, network: impl Into<String>) -> Self {
        TaskNetwork { driver, network: network.into(), dns: Vec::new() }
    }

    /// The same, telling tasks to resolve names with `servers` (a catalog's DNS server
    /// reachable from the network, such as `dns-catalog` on the host's address).
    pub fn with_dns(mut self, servers: impl IntoIterator<Item = IpAddr>) -> Self {
        self.dns = servers.into_iter().collect();
        self
    }

    /// The name servers tasks are told.
    pub fn dns(&self) -> &[IpAddr] {
        &self.dns
    }

    /// The network's name.
    pub fn name(&self) -> &str {
        &self.network
    }

    fn key(&self, task: &str) -> AttachmentKey {
        AttachmentKey::new(&self.network, task, "eth0")
    }

    /// Attaches the task whose process is `pid`, publishing `ports` on the host, at
    /// `prefer` if the network has it free (the address the task's slot had).
    pub async fn attach(&self, task: &str, pid: u32, ports: &[PortMapping], prefer: Option<IpAddr>) -> Result<IpAddr> {
        self.attach_at(task, std::path::Path::new(&netns_of(pid)), ports, prefer).await
    }

    /// Attaches the task's namespace at `netns`, publishing `ports` on the host, at
    /// `prefer` if the network has it free.
    pub async fn attach_at(&self, task: &str, netns: &std::path::Path, ports: &[PortMapping], prefer: Option<IpAddr>) -> Result<IpAddr> {
        let mut spec = EndpointSpec::new(&self.network, task).in_netns(netns).preferring(prefer);
        for p in ports {
            spec = spec.publish(keelson_netplumb::PortMapping::tcp(p.host, p.container));
        }
        let a = self.driver.attach(spec).await.map_err(net_error)?;
        a.addresses()
            .first()
            .copied()
            .ok_or_else(|| Error::Backend { backend: "netplumb", source: format!("task {task}: attached with no address").into() })
    }

    /// The task's address while its process is `pid`; re-attached if the engine
    /// restarted it (a new process, a new namespace) since it was attached.
    pub async fn address(&self, task: &str, pid: u32, ports: &[PortMapping]) -> Result<Option<IpAddr>> {
        match self.driver.check(&self.key(task)).await {
            Ok(a) if a.interfaces.last().and_then(|i| i.sandbox.as_ref()).is_some_and(|s| s.to_str() == Some(netns_of(pid).as_str())) => {
                Ok(a.addresses().first().copied())
            }
            Ok(a) => {
                // Restarted in place: the old namespace is gone with its interface.
                let ports: Vec<PortMapping> = if ports.is_empty() {
                    a.port_mappings.iter().map(|m| PortMapping::new(m.container_port, m.host_port)).collect()
                } else {
                    ports.to_vec()
                };
                // It keeps its address: the new namespace asks for the one it had.
                let had = a.addresses().first().copied();
                self.detach(task).await?;
                self.attach(task, pid, &ports, had).await.map(Some)
            }
            Err(keelson_netplumb::Error::NotFound { .. }) => Ok(None),
            // Its host link is gone (the namespace went): attach anew.
            Err(keelson_netplumb::Error::Backend { .. }) => {
                self.detach(task).await?;
                self.attach(task, pid, ports, None).await.map(Some)
            }
            Err(e) => Err(net_error(e)),
        }
    }

    /// The task's address if it is attached.
    pub async fn lookup(&self, task: &str) -> Result<Option<IpAddr>> {
        match self.driver.check(&self.key(task)).await {
            Ok(a) => Ok(a.addresses().first().copied()),
            Err(keelson_netplumb::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(net_error(e)),
        }
    }

    /// Detaches the task; already detached is fine.
    pub async fn detach(&self, task: &str) -> Result<()> {
        self.driver.detach(&self.key(task)).await.map_err(net_error)
    }

    /// Detaches every task of this network but `keep` (what a crash left behind).
    pub async fn collect(&self, keep: &[String]) -> Result<usize> {
        let mut valid: Vec<AttachmentKey> = keep.iter().map(|t| self.key(t)).collect();
        // Attachments on the driver's other networks are not ours to judge.
        for info in self.driver.list().await.map_err(net_error)? {
            if info.spec.name != self.network {
                valid.extend(info.endpoints.iter().map(|a| a.key()));
            }
        }
        Ok(self.driver.gc(&valid).await.map_err(net_error)?.removed.len())
    }
}

/// A process driver's tasks on a keelson network: each in a network namespace of its
/// own, created and attached before the task starts (so it never runs unconnected) and
/// kept across its restarts.
#[derive(Clone, Debug)]
// Without the netns feature it is never built: drivers refuse networks instead.
#[cfg_attr(not(feature = "netns"), allow(dead_code))]
pub(crate) struct ProcessNetwork {
    pub(crate) net: TaskNetwork,
    dir: std::path::PathBuf,
}

impl ProcessNetwork {
    #[cfg(feature = "netns")]
    pub(crate) fn new(net: TaskNetwork, dir: std::path::PathBuf) -> Self {
        ProcessNetwork { net, dir }
    }

    /// Where a task's namespace is bound.
    #[cfg(feature = "netns")]
    pub(crate) fn path(&self, task: &str) -> std::path::PathBuf {
        self.dir.join(task)
    }

    /// Creates the task's namespace (kept if it exists) and attaches it, at `prefer` if
    /// the network has it free.
    #[cfg(feature = "netns")]
    pub(crate) async fn prepare(&self, task: &str, ports: &[PortMapping], prefer: Option<IpAddr>) -> Result<IpAddr> {
        let path = self.path(task);
        let made = path.clone();
        tokio::task::spawn_blocking(move || keelson_netplumb::create_netns(&made))
            .await
            .map_err(|e| Error::Backend { backend: "netns", source: Box::new(e) })?
            .map_err(net_error)?;
        if let Some(address) = self.net.lookup(task).await? {
            return Ok(address);
        }
        match self.net.attach_at(task, &path, ports, prefer).await {
            Ok(address) => Ok(address),
            Err(e) => {
                let _ = keelson_netplumb::delete_netns(&path);
                Err(e)
            }
        }
    }

    #[cfg(not(feature = "netns"))]
    pub(crate) async fn prepare(&self, _task: &str, _ports: &[PortMapping], _prefer: Option<IpAddr>) -> Result<IpAddr> {
        Err(Error::Unsupported { operation: "networks (build with the netns feature)", backend: "process" })
    }

    /// Detaches the task and removes its namespace; already gone is fine.
    pub(crate) async fn release(&self, task: &str) -> Result<()> {
        self.net.detach(task).await?;
        #[cfg(feature = "netns")]
        keelson_netplumb::delete_netns(&self.path(task)).map_err(net_error)?;
        Ok(())
    }

    /// Runs `spawn` on a thread inside the task's namespace: what it starts runs there.
    #[cfg(feature = "netns")]
    pub(crate) fn spawn_in<R: Send>(&self, task: &str, spawn: impl FnOnce() -> R + Send) -> Result<R> {
        keelson_netplumb::run_in_netns(&self.path(task), spawn).map_err(net_error)
    }

    #[cfg(not(feature = "netns"))]
    pub(crate) fn spawn_in<R: Send>(&self, _task: &str, _spawn: impl FnOnce() -> R + Send) -> Result<R> {
        Err(Error::Unsupported { operation: "networks (build with the netns feature)", backend: "process" })
    }
}
