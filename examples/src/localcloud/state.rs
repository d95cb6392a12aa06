//! `<state-dir>/localcloud.json`: where a running cloud is and how far it got. `up`
//! writes it at each start (`ready: false`) and when every role answers (`ready: true`);
//! `reset`, `down` and `status` read it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The state file's name.
pub const STATE_FILE: &str = "localcloud.json";

/// A running cloud.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudState {
    /// The supervising process (`localcloud up`).
    pub pid: u32,
    /// The cloud's name.
    pub name: String,
    /// The zone its names are in.
    pub domain: String,
    /// Starts so far: 1 after `up`, one more per `reset`.
    pub generation: u64,
    /// Every role answers by name through the load balancer.
    pub ready: bool,
    /// How long this generation took from its start until ready, in milliseconds.
    pub ready_in_ms: u64,
    /// The DNS server (`dig @<ip> <name>`).
    pub dns: SocketAddr,
    /// The load balancer (edge).
    pub edge: SocketAddr,
    /// edge's metrics and readiness.
    pub edge_metrics: SocketAddr,
    /// etcd's client URLs.
    pub etcd: Vec<String>,
    /// The hosts.
    pub hosts: Vec<Host>,
    /// The namespace playing a machine on the LAN.
    pub lan_netns: String,
    /// The names the roles answer by.
    pub roles: Vec<String>,
    /// The minipaas controller's API over the cloud (`minipaas --controller`); the roles
    /// are its app `cloud`.
    pub controller: String,
    /// The file holding its token (`minipaas --token-file`).
    pub token_file: PathBuf,
    /// Every process's log.
    pub logs: PathBuf,
}

/// One host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    /// Its network namespace.
    pub netns: String,
    /// Its node in the cluster (the label `keelson.node` of its containers).
    pub node: String,
    /// Its underlay address.
    pub address: std::net::Ipv4Addr,
}

impl CloudState {
    /// Reads the state of the cloud whose state folder is `dir`.
    pub fn read(dir: &Path) -> Result<CloudState, String> {
        let path = dir.join(STATE_FILE);
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e} (is the cloud up? localcloud up --name ...)", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Writes it to `dir`, replacing the file at once (a reader never sees half of it).
    pub fn write(&self, dir: &Path) -> Result<(), String> {
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        crate::supervise::write_private(&tmp, &text)?;
        std::fs::rename(&tmp, dir.join(STATE_FILE)).map_err(|e| format!("{}: {e}", dir.display()))
    }
}
