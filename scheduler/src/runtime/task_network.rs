//! Tasks on a keelson network: the driver starts a container with no network of its
//! engine's, then attaches its namespace (`/proc/<pid>/ns/net`) to a keelson network
//! through any `NetworkDriver` (bridge, overlay, macvlan), publishes its ports there,
//! and detaches it when the task stops. A container restarted in place by its engine
//! has a new namespace: the attachment follows it (see [`TaskNetwork::address`]).

use std::collections::HashSet;
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
    /// Tasks being attached now. A status read meanwhile sees a half-made attachment
    /// (its lease is written before its interface exists) and must not "repair" it by
    /// detaching it under the attach: it reports no address yet instead.
    attaching: Arc<std::sync::Mutex<HashSet<String>>>,
}

/// A task marked as being attached, until dropped.
struct Attaching<'a> {
    set: &'a std::sync::Mutex<HashSet<String>>,
    task: String,
}

impl Drop for Attaching<'_> {
    fn drop(&mut self) {
        self.set.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&self.task);
    }
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

/// How long an attach waits for a repair of the same task to finish, and how often it looks.
const ATTACH_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
const ATTACH_POLL: std::time::Duration = std::time::Duration::from_millis(20);

type Checked = std::result::Result<keelson_netplumb::Attachment, keelson_netplumb::Error>;

/// Whether a check's result is a stale attachment: in another namespace than `netns`
/// (the engine restarted the task), or with its host side gone.
fn needs_repair(checked: &Checked, netns: &std::path::Path) -> bool {
    match checked {
        Ok(a) => a.interfaces.last().and_then(|i| i.sandbox.as_deref()) != Some(netns),
        Err(keelson_netplumb::Error::Backend { .. }) => true,
        Err(_) => false,
    }
}

fn address_of(checked: Checked) -> Result<Option<IpAddr>> {
    match checked {
        Ok(a) => Ok(a.addresses().first().copied()),
        Err(keelson_netplumb::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(net_error(e)),
    }
}

fn netns_of(pid: u32) -> String {
    format!("/proc/{pid}/ns/net")
}

impl TaskNetwork {
    /// Tasks on `network` of `driver` (the network must exist).
    pub fn new(driver: Arc<dyn NetworkDriver>, network: impl Into<String>) -> Self {
        TaskNetwork { driver, network: network.into(), dns: Vec::new(), attaching: Arc::default() }
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

    /// Marks `task` as being attached; `None` if it already is.
    fn begin_attach(&self, task: &str) -> Option<Attaching<'_>> {
        let fresh = self.attaching.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(task.to_owned());
        fresh.then(|| Attaching { set: &self.attaching, task: task.to_owned() })
    }

    /// Attaches the task whose process is `pid`, publishing `ports` on the host, at
    /// `prefer` if the network has it free (the address the task's slot had).
    pub async fn attach(&self, task: &str, pid: u32, ports: &[PortMapping], prefer: Option<IpAddr>) -> Result<IpAddr> {
        self.attach_at(task, std::path::Path::new(&netns_of(pid)), ports, prefer).await
    }

    /// Attaches the task's namespace at `netns`, publishing `ports` on the host, at
    /// `prefer` if the network has it free.
    pub async fn attach_at(&self, task: &str, netns: &std::path::Path, ports: &[PortMapping], prefer: Option<IpAddr>) -> Result<IpAddr> {
        // A repair by a status read may hold it for the moment that takes.
        let mut waited = std::time::Duration::ZERO;
        let _attaching = loop {
            if let Some(guard) = self.begin_attach(task) {
                break guard;
            }
            if waited >= ATTACH_WAIT {
                return Err(Error::Conflict { kind: "task", name: task.to_owned(), reason: "being attached already".into() });
            }
            tokio::time::sleep(ATTACH_POLL).await;
            waited += ATTACH_POLL;
        };
        self.attach_now(task, netns, ports, prefer).await
    }

    async fn attach_now(&self, task: &str, netns: &std::path::Path, ports: &[PortMapping], prefer: Option<IpAddr>) -> Result<IpAddr> {
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
    /// restarted it (a new process, a new namespace) since it was attached. `None`
    /// while it is not attached, or still being attached.
    pub async fn address(&self, task: &str, pid: u32, ports: &[PortMapping]) -> Result<Option<IpAddr>> {
        if self.attaching.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(task) {
            return Ok(None);
        }
        let netns = netns_of(pid);
        let netns = std::path::Path::new(&netns);
        let checked = self.driver.check(&self.key(task)).await;
        if !needs_repair(&checked, netns) {
            return address_of(checked);
        }
        // Not while an attach runs (it may have begun since), and looked at again under
        // the mark: one may have finished meanwhile.
        let Some(_repairing) = self.begin_attach(task) else { return Ok(None) };
        let checked = self.driver.check(&self.key(task)).await;
        if needs_repair(&checked, netns) {
            self.repair(task, netns, ports, checked).await
        } else {
            address_of(checked)
        }
    }

    /// Attaches anew a task whose attachment is stale (`checked`: in another namespace,
    /// or its host side gone).
    async fn repair(&self, task: &str, netns: &std::path::Path, ports: &[PortMapping], checked: Checked) -> Result<Option<IpAddr>> {
        match checked {
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
                self.attach_now(task, netns, &ports, had).await.map(Some)
            }
            Err(keelson_netplumb::Error::NotFound { .. }) => Ok(None),
            // Its host link is gone (the namespace went): attach anew.
            Err(keelson_netplumb::Error::Backend { .. }) => {
                self.detach(task).await?;
                self.attach_now(task, netns, ports, None).await.map(Some)
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

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use keelson_netplumb::{Attachment, GcReport, Interface, IpConfig, NetworkCapabilities, NetworkInfo, NetworkSpec};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    /// A network whose attach takes a while, with its lease written first: a check in
    /// between sees a half-made attachment, as with the real drivers.
    #[derive(Debug, Default)]
    struct SlowAttach {
        state: Mutex<Option<(bool, Attachment)>>,
        detaches: AtomicU32,
    }

    #[async_trait]
    impl NetworkDriver for SlowAttach {
        fn name(&self) -> &'static str {
            "slow"
        }
        fn capabilities(&self) -> NetworkCapabilities {
            NetworkCapabilities::default()
        }
        async fn create_network(&self, _spec: NetworkSpec) -> keelson_netplumb::Result<NetworkInfo> {
            unimplemented!("not used")
        }
        async fn delete_network(&self, _name: &str) -> keelson_netplumb::Result<()> {
            Ok(())
        }
        async fn attach(&self, spec: EndpointSpec) -> keelson_netplumb::Result<Attachment> {
            let a = Attachment {
                id: spec.id.clone(),
                network: spec.network.clone(),
                ifname: spec.ifname.clone(),
                interfaces: vec![Interface { name: spec.ifname.clone(), mac: None, mtu: None, sandbox: spec.netns.clone() }],
                ips: vec![IpConfig { address: "10.9.0.5/24".parse().expect("net"), gateway: None, interface: 0 }],
                routes: Vec::new(),
                dns: Default::default(),
                port_mappings: Vec::new(),
            };
            *self.state.lock().expect("lock") = Some((false, a.clone()));
            tokio::time::sleep(Duration::from_millis(300)).await;
            *self.state.lock().expect("lock") = Some((true, a.clone()));
            Ok(a)
        }
        async fn detach(&self, _key: &AttachmentKey) -> keelson_netplumb::Result<()> {
            self.detaches.fetch_add(1, Ordering::SeqCst);
            *self.state.lock().expect("lock") = None;
            Ok(())
        }
        async fn check(&self, key: &AttachmentKey) -> keelson_netplumb::Result<Attachment> {
            match self.state.lock().expect("lock").clone() {
                Some((true, a)) => Ok(a),
                Some((false, _)) => Err(keelson_netplumb::Error::Backend { backend: "slow", source: "eth0 is missing".into() }),
                None => Err(keelson_netplumb::Error::NotFound { kind: "attachment", name: key.to_string() }),
            }
        }
        async fn inspect(&self, _name: &str) -> keelson_netplumb::Result<NetworkInfo> {
            unimplemented!("not used")
        }
        async fn list(&self) -> keelson_netplumb::Result<Vec<NetworkInfo>> {
            Ok(Vec::new())
        }
        async fn gc(&self, _valid: &[AttachmentKey]) -> keelson_netplumb::Result<GcReport> {
            Ok(GcReport::default())
        }
    }

    #[tokio::test]
    async fn a_status_read_during_an_attach_leaves_it_alone() {
        let driver = Arc::new(SlowAttach::default());
        let net = TaskNetwork::new(driver.clone(), "n");
        let attach = tokio::spawn({
            let net = net.clone();
            async move { net.attach("t", 4242, &[], None).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(net.address("t", 4242, &[]).await.expect("read"), None, "no address while it is being attached");
        let ip = attach.await.expect("join").expect("attach");
        assert_eq!(driver.detaches.load(Ordering::SeqCst), 0, "the half-made attachment was not torn down under the attach");
        assert_eq!(net.address("t", 4242, &[]).await.expect("read"), Some(ip));
        // Restarted in place (a new process): attached again, at the address it had.
        assert_eq!(net.address("t", 4343, &[]).await.expect("read"), Some(ip));
        assert_eq!(driver.detaches.load(Ordering::SeqCst), 1);
    }
}
