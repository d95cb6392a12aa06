//! The CNI plugin protocol (spec 1.1) over keelson's kernel drivers: what `keelson-cni`
//! runs. A runtime calls the plugin with `CNI_*` environment variables and the network
//! configuration on stdin; the plugin answers on stdout with a result or an error.
//!
//! The configuration is shaped like the reference bridge plugin's, so a runtime can swap
//! one for the other:
//!
//! ```json
//! { "cniVersion": "1.0.0", "name": "apps", "type": "keelson-cni",
//!   "ipMasq": true, "mtu": 1500,
//!   "ipam": { "type": "host-local", "subnet": "10.88.0.0/16" },
//!   "runtimeConfig": { "portMappings": [ { "hostPort": 8080, "containerPort": 80, "protocol": "tcp" } ] },
//!   "stateDir": "/run/keelson/netplumb" }
//! ```
//!
//! The network is created on the first ADD that names it (CNI has no "create network");
//! a later configuration whose subnet differs is refused. `bridge` and `isGateway` are
//! accepted for compatibility: keelson names its own bridges and is always the gateway.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::attachment::{Attachment, AttachmentKey};
use crate::attachment::{PortMapping, Protocol};
use crate::driver::{EndpointSpec, NetworkDriver, NetworkSpec};
use crate::error::Error;
use crate::ipam::Ipam as _;
use crate::linux::{BridgeNetwork, KernelConfig, DEFAULT_STATE_DIR};

/// Versions of the spec this plugin speaks.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];

/// A CNI error: its code (spec: 1 incompatible version, 4 invalid environment, 6 decode,
/// 7 invalid configuration, 11 try again later, 50 not available, 100+ plugin's own),
/// message and details.
#[derive(Debug, PartialEq, Eq)]
pub struct CniError {
    /// The code.
    pub code: u32,
    /// One line for people.
    pub msg: String,
    /// More detail.
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl std::fmt::Display) -> Self {
        CniError { code, msg: msg.into(), details: details.to_string() }
    }

    /// The error as the spec's JSON.
    pub fn to_json(&self, version: &str) -> Value {
        json!({ "cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details })
    }
}

fn from_driver(e: Error) -> CniError {
    let code = match &e {
        Error::InvalidInput { .. } => 7,
        Error::NotFound { kind: "network namespace", .. } => 4,
        Error::Conflict { .. } | Error::PoolExhausted { .. } => 100,
        _ => 11,
    };
    CniError::new(code, e.to_string(), format!("{e:?}"))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IpamConf {
    #[serde(default)]
    subnet: Option<String>,
    #[serde(default)]
    ranges: Vec<Vec<BTreeMap<String, Value>>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CniPortMapping {
    host_port: u16,
    container_port: u16,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RuntimeConfig {
    #[serde(default)]
    port_mappings: Vec<CniPortMapping>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct ValidAttachment {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
}

/// The network configuration on stdin.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: String,
    name: String,
    #[serde(default)]
    ip_masq: bool,
    #[serde(default)]
    mtu: Option<u32>,
    #[serde(default)]
    subnet: Option<String>,
    #[serde(default)]
    ipam: Option<IpamConf>,
    #[serde(default)]
    runtime_config: RuntimeConfig,
    #[serde(default)]
    state_dir: Option<String>,
    #[serde(default, rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<ValidAttachment>>,
}

impl NetConf {
    fn subnet(&self) -> Option<String> {
        self.subnet.clone().or_else(|| {
            let ipam = self.ipam.as_ref()?;
            ipam.subnet.clone().or_else(|| ipam.ranges.first()?.first()?.get("subnet")?.as_str().map(str::to_owned))
        })
    }

    fn network_spec(&self) -> NetworkSpec {
        let mut spec = NetworkSpec::new(&self.name);
        spec.subnet = self.subnet();
        spec.mtu = self.mtu;
        spec.masquerade = self.ip_masq;
        spec
    }

    fn ports(&self) -> Result<Vec<PortMapping>, CniError> {
        self.runtime_config
            .port_mappings
            .iter()
            .map(|p| {
                let protocol = match p.protocol.as_deref().unwrap_or("tcp") {
                    "tcp" => Protocol::Tcp,
                    "udp" => Protocol::Udp,
                    other => return Err(CniError::new(7, format!("unsupported port mapping protocol {other:?}"), "tcp or udp")),
                };
                Ok(PortMapping { host_port: p.host_port, container_port: p.container_port, protocol })
            })
            .collect()
    }
}

/// The result JSON of an attachment.
pub fn result_json(version: &str, a: &Attachment) -> Value {
    let interfaces: Vec<Value> = a
        .interfaces
        .iter()
        .map(|i| {
            let mut v = json!({ "name": i.name });
            if let Some(mac) = &i.mac {
                v["mac"] = json!(mac);
            }
            if let Some(mtu) = i.mtu {
                v["mtu"] = json!(mtu);
            }
            if let Some(sandbox) = &i.sandbox {
                v["sandbox"] = json!(sandbox.display().to_string());
            }
            v
        })
        .collect();
    let ips: Vec<Value> = a
        .ips
        .iter()
        .map(|ip| {
            let mut v = json!({ "address": ip.address.to_string(), "interface": ip.interface });
            if let Some(gw) = ip.gateway {
                v["gateway"] = json!(gw.to_string());
            }
            v
        })
        .collect();
    let routes: Vec<Value> = a
        .routes
        .iter()
        .map(|r| {
            let mut v = json!({ "dst": r.dst.to_string() });
            if let Some(gw) = r.gw {
                v["gw"] = json!(gw.to_string());
            }
            v
        })
        .collect();
    let nameservers: Vec<String> = a.dns.nameservers.iter().map(|n| n.to_string()).collect();
    json!({ "cniVersion": version, "interfaces": interfaces, "ips": ips, "routes": routes, "dns": { "nameservers": nameservers } })
}

fn env<'a>(vars: &'a HashMap<String, String>, name: &str) -> Result<&'a str, CniError> {
    vars.get(name)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| CniError::new(4, format!("{name} is not set"), "the runtime must set it"))
}

/// Runs one plugin call: `vars` are the `CNI_*` variables, `stdin` the configuration.
/// `Ok(Some(json))` is printed on stdout; `Ok(None)` prints nothing.
pub async fn run(vars: &HashMap<String, String>, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    let command = env(vars, "CNI_COMMAND")?;
    if command == "VERSION" {
        return Ok(Some(json!({ "cniVersion": "1.1.0", "supportedVersions": SUPPORTED_VERSIONS })));
    }
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| CniError::new(6, "cannot decode the network configuration", e))?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(1, format!("cniVersion {} is not supported", conf.cni_version), SUPPORTED_VERSIONS.join(", ")));
    }
    let driver = BridgeNetwork::open(KernelConfig::in_dir(conf.state_dir.clone().unwrap_or_else(|| DEFAULT_STATE_DIR.to_owned())))
        .map_err(|e| CniError::new(if command == "STATUS" { 50 } else { 11 }, "netplumb state is not usable", e))?;
    match command {
        "ADD" => {
            ensure_network(&driver, &conf).await?;
            let mut spec = EndpointSpec::new(&conf.name, env(vars, "CNI_CONTAINERID")?)
                .in_netns(env(vars, "CNI_NETNS")?)
                .with_ifname(env(vars, "CNI_IFNAME")?);
            spec.port_mappings = conf.ports()?;
            let a = driver.attach(spec).await.map_err(from_driver)?;
            Ok(Some(result_json(&conf.cni_version, &a)))
        }
        "DEL" => {
            // The namespace may be gone and the network never created: still success.
            let key = AttachmentKey::new(&conf.name, env(vars, "CNI_CONTAINERID")?, env(vars, "CNI_IFNAME")?);
            driver.detach(&key).await.map_err(from_driver)?;
            Ok(None)
        }
        "CHECK" => {
            let key = AttachmentKey::new(&conf.name, env(vars, "CNI_CONTAINERID")?, env(vars, "CNI_IFNAME")?);
            driver.check(&key).await.map_err(from_driver)?;
            Ok(None)
        }
        "GC" => {
            // Valid: what the runtime lists on this network, and everything on others.
            let mut valid: Vec<AttachmentKey> = driver
                .ipam()
                .all_leases()
                .await
                .map_err(from_driver)?
                .into_iter()
                .map(|l| l.key)
                .filter(|k| k.network != conf.name)
                .collect();
            valid.extend(conf.valid_attachments.iter().flatten().map(|v| AttachmentKey::new(&conf.name, &v.container_id, &v.ifname)));
            driver.gc(&valid).await.map_err(from_driver)?;
            Ok(None)
        }
        "STATUS" => Ok(None),
        other => Err(CniError::new(4, format!("unknown CNI_COMMAND {other:?}"), "ADD, DEL, CHECK, GC, STATUS or VERSION")),
    }
}

/// Creates the configured network on first use; refuses a configuration that
/// disagrees with the network as created.
async fn ensure_network(driver: &BridgeNetwork, conf: &NetConf) -> Result<(), CniError> {
    let wanted = conf.network_spec();
    let existing = match driver.network_spec(&conf.name).map_err(from_driver)? {
        Some(spec) => Some(spec),
        None => match driver.create_network(wanted.clone()).await {
            Ok(_) => None,
            // Another ADD created it at the same moment.
            Err(Error::Conflict { kind: "network", .. }) => driver.network_spec(&conf.name).map_err(from_driver)?,
            Err(e) => return Err(from_driver(e)),
        },
    };
    if let Some(spec) = existing {
        if (wanted.subnet.is_some() && spec.subnet != wanted.subnet)
            || spec.masquerade != wanted.masquerade
            || (wanted.mtu.is_some() && spec.mtu != wanted.mtu)
        {
            return Err(CniError::new(
                7,
                format!("network {} exists with another configuration", conf.name),
                format!("existing {spec:?}, given {wanted:?}"),
            ));
        }
    }
    Ok(())
}
