//! An app's manifest, `minipaas.toml`: its services, each what a scheduler group needs.
//! Parsed strictly: an unknown key, a bad value or a missing one is an error naming the
//! file, the key and the value, before anything is deployed.
//!
//! ```
//! let text = r#"
//! [services.web]
//! build = "."
//! replicas = 2
//! port = 8080
//! domains = ["shop.example"]
//! health_check = "/health"
//! env = { GREETING = "hello" }
//!
//! [services.web.deploy]
//! strategy = "rolling"
//! max_surge = 0
//! max_unavailable = 1
//! "#;
//! let manifest = keelson_examples::minipaas::manifest::Manifest::parse("minipaas.toml", text).unwrap();
//! let web = &manifest.services["web"];
//! assert_eq!(web.replicas, 2);
//! let group = web.group_spec("shop", "web", "127.0.0.1:5000/shop-web:1a2b3c", &Default::default(), 3);
//! assert_eq!(group.desired.count, 2);
//! assert_eq!(group.service.unwrap().tags, vec!["keelson.http.host=shop.example".to_owned()]);
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use keelson_scheduler::{
    DesiredGroup, Gates, GroupSpec, Resources, ServiceSpec, Spread, Strategy, TaskTemplate, VolumeAccess, VolumeRequest,
};
use serde::{Deserialize, Serialize};

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{file}: {key}: {reason}")]
pub struct ManifestError {
    /// The file.
    pub file: String,
    /// Where in it (`services.web.port`), or `(file)` for a parse error.
    pub key: String,
    /// What is wrong, with the value.
    pub reason: String,
}

/// An app's services, by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The services (at least one).
    pub services: BTreeMap<String, Service>,
}

/// One service: a scheduler group of identical tasks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// An image to run as it is; or, without it, `build`.
    #[serde(default)]
    pub image: Option<String>,
    /// The folder of the app's repository the image is built from (default `.`).
    #[serde(default)]
    pub build: Option<String>,
    /// The Dockerfile in that folder (default `Dockerfile`).
    #[serde(default)]
    pub dockerfile: Option<String>,
    /// The program and arguments (default: the image's).
    #[serde(default)]
    pub command: Vec<String>,
    /// How many tasks (default 1).
    #[serde(default = "one")]
    pub replicas: u32,
    /// Millicores per task (default 100).
    #[serde(default = "default_cpu")]
    pub cpu: u32,
    /// MiB of memory per task (default 64).
    #[serde(default = "default_memory")]
    pub memory_mb: u32,
    /// The port the service listens on inside its tasks; none: not a network service.
    #[serde(default)]
    pub port: Option<u16>,
    /// Host names edge routes to it.
    #[serde(default)]
    pub domains: Vec<String>,
    /// An HTTP path that must answer 2xx/3xx for a task to count as healthy.
    #[serde(default)]
    pub health_check: Option<String>,
    /// Environment (the app's config is added over it).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Volumes: name → path inside the task; each task gets its own.
    #[serde(default)]
    pub volumes: BTreeMap<String, String>,
    /// Spread the tasks evenly over the values of a node property: `label.<name>`,
    /// `attr.<name>`, `node.datacenter` or `node.pool`; over a label each host has its
    /// own value of (`label.host`), they go on as many hosts as there are. Default:
    /// packed, the scheduler's best fit.
    #[serde(default)]
    pub spread: Option<String>,
    /// How new releases roll out.
    #[serde(default)]
    pub deploy: Deploy,
}

/// How a service's releases roll out, and the gates each must pass.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deploy {
    /// `rolling` (default), `recreate`, `canary` or `blue-green`.
    #[serde(default = "default_strategy")]
    pub strategy: String,
    /// Rolling and canary: extra tasks allowed during the update (default 1).
    #[serde(default = "one")]
    pub max_surge: u32,
    /// Rolling and canary: tasks allowed below the count healthy (default 0).
    #[serde(default)]
    pub max_unavailable: u32,
    /// Canary: new tasks started first (default 1).
    #[serde(default = "one")]
    pub canaries: u32,
    /// Canary: promote once the canaries pass (default true).
    #[serde(default = "yes")]
    pub auto_promote: bool,
    /// Blue/green: how long the old set stays after the switch (default 5m).
    #[serde(default = "five_minutes", with = "humantime_serde_text")]
    pub rollback_window: Duration,
    /// Healthy this long before a task counts (default 10s).
    #[serde(default = "ten_seconds", with = "humantime_serde_text")]
    pub min_healthy_time: Duration,
    /// A task not healthy this long after placement fails the gate (default 5m).
    #[serde(default = "five_minutes", with = "humantime_serde_text")]
    pub healthy_deadline: Duration,
    /// The release fails if no further task becomes healthy for this long (default 10m).
    #[serde(default = "ten_minutes", with = "humantime_serde_text")]
    pub progress_deadline: Duration,
    /// Go back to the last good release when a gate fails (default true).
    #[serde(default = "yes")]
    pub auto_rollback: bool,
}

impl Default for Deploy {
    fn default() -> Self {
        Deploy {
            strategy: default_strategy(),
            max_surge: 1,
            max_unavailable: 0,
            canaries: 1,
            auto_promote: true,
            rollback_window: five_minutes(),
            min_healthy_time: ten_seconds(),
            healthy_deadline: five_minutes(),
            progress_deadline: ten_minutes(),
            auto_rollback: true,
        }
    }
}

fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}
fn default_cpu() -> u32 {
    100
}
fn default_memory() -> u32 {
    64
}
fn default_strategy() -> String {
    "rolling".into()
}
fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}
fn five_minutes() -> Duration {
    Duration::from_secs(300)
}
fn ten_minutes() -> Duration {
    Duration::from_secs(600)
}

/// Durations written as humantime text (`"10s"`, `"5m"`).
mod humantime_serde_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| serde::de::Error::custom(format!("{text:?}: {e} (write 10s, 5m, 1h)")))
    }
}

impl Manifest {
    /// Parses and checks `text`, read from `file` (named in errors).
    pub fn parse(file: &str, text: &str) -> Result<Manifest, ManifestError> {
        let manifest: Manifest = toml::from_str(text).map_err(|e| {
            // Where it went wrong, as the line the writer sees (it names the key).
            let at = e.span().map(|span| {
                let line = text[..span.start.min(text.len())].matches('\n').count();
                format!(" (line {}: {})", line + 1, text.lines().nth(line).unwrap_or_default().trim())
            });
            ManifestError { file: file.to_owned(), key: "(file)".into(), reason: e.message().to_owned() + &at.unwrap_or_default() }
        })?;
        manifest.check(file)?;
        Ok(manifest)
    }

    fn check(&self, file: &str) -> Result<(), ManifestError> {
        let err = |key: String, reason: String| ManifestError { file: file.to_owned(), key, reason };
        if self.services.is_empty() {
            return Err(err("services".into(), "at least one service is needed ([services.web])".into()));
        }
        for (name, s) in &self.services {
            let key = |k: &str| format!("services.{name}.{k}");
            if !is_label(name) {
                return Err(err(
                    format!("services.{name}"),
                    format!("{name:?}: a service name is 1 to 30 of a-z0-9- starting with a letter"),
                ));
            }
            if s.image.is_some() && (s.build.is_some() || s.dockerfile.is_some()) {
                return Err(err(key("image"), "give an image or a build, not both".into()));
            }
            if s.replicas > 100 {
                return Err(err(key("replicas"), format!("{}: at most 100", s.replicas)));
            }
            if s.cpu == 0 || s.memory_mb == 0 {
                return Err(err(key(if s.cpu == 0 { "cpu" } else { "memory_mb" }), "0: a task needs some".into()));
            }
            if s.port == Some(0) {
                return Err(err(key("port"), "0: not a port".into()));
            }
            if (!s.domains.is_empty() || s.health_check.is_some()) && s.port.is_none() {
                return Err(err(key("port"), "domains and health_check need the port the service listens on".into()));
            }
            for d in &s.domains {
                if !is_domain(d) {
                    return Err(err(key("domains"), format!("{d:?}: not a host name")));
                }
            }
            if let Some(path) = &s.health_check {
                if !path.starts_with('/') {
                    return Err(err(key("health_check"), format!("{path:?}: a path starting with /")));
                }
            }
            for k in s.env.keys() {
                if !is_env_name(k) {
                    return Err(err(key("env"), format!("{k:?}: an environment name is A-Z, 0-9 and _, not starting with a digit")));
                }
            }
            for (v, path) in &s.volumes {
                if !is_label(v) || !path.starts_with('/') {
                    return Err(err(key("volumes"), format!("{v:?} = {path:?}: a volume name and an absolute path")));
                }
            }
            if let Some(target) = &s.spread {
                let known = matches!(target.as_str(), "node.datacenter" | "node.pool")
                    || target.strip_prefix("attr.").or_else(|| target.strip_prefix("label.")).is_some_and(|k| !k.is_empty());
                if !known {
                    return Err(err(key("spread"), format!("{target:?}: label.<name>, attr.<name>, node.datacenter or node.pool")));
                }
            }
            if !["rolling", "recreate", "canary", "blue-green"].contains(&s.deploy.strategy.as_str()) {
                return Err(err(key("deploy.strategy"), format!("{:?}: rolling, recreate, canary or blue-green", s.deploy.strategy)));
            }
            if s.deploy.strategy == "rolling" && s.deploy.max_surge == 0 && s.deploy.max_unavailable == 0 {
                return Err(err(key("deploy"), "max_surge and max_unavailable are both 0: a rolling update could never move".into()));
            }
        }
        Ok(())
    }
}

impl Service {
    /// The strategy its deploy section names.
    pub fn strategy(&self) -> Strategy {
        let d = &self.deploy;
        match d.strategy.as_str() {
            "recreate" => Strategy::Recreate,
            "canary" => Strategy::Canary {
                canaries: d.canaries,
                auto_promote: d.auto_promote,
                max_surge: d.max_surge,
                max_unavailable: d.max_unavailable,
            },
            "blue-green" => Strategy::BlueGreen { rollback_window: d.rollback_window },
            _ => Strategy::Rolling { max_surge: d.max_surge, max_unavailable: d.max_unavailable },
        }
    }

    /// The gates its deploy section sets.
    pub fn gates(&self) -> Gates {
        let mut gates = Gates::default();
        gates.min_healthy_time = self.deploy.min_healthy_time;
        gates.healthy_deadline = self.deploy.healthy_deadline;
        gates.progress_deadline = self.deploy.progress_deadline;
        gates.auto_rollback = self.deploy.auto_rollback;
        gates
    }

    /// The scheduler group of release `version` of this service of `app`, running
    /// `image`, with `config` over the manifest's environment. Its service is named
    /// `<app>-<service>` in the catalog, routed by each domain.
    pub fn group_spec(&self, app: &str, service: &str, image: &str, config: &BTreeMap<String, String>, version: u64) -> GroupSpec {
        let mut env = self.env.clone();
        env.extend(config.iter().map(|(k, v)| (k.clone(), v.clone())));
        GroupSpec {
            desired: DesiredGroup {
                job: app.to_owned(),
                group: service.to_owned(),
                version,
                count: self.replicas,
                resources: Resources::new(u64::from(self.cpu), u64::from(self.memory_mb)),
                ports: u16::from(self.port.is_some()),
                // Each task its own volume of each name (`data-0`, `data-1`), one writer.
                volumes: self
                    .volumes
                    .keys()
                    .map(|name| VolumeRequest { name: name.clone(), access: VolumeAccess::SingleWriter, read_only: false, per_task: true })
                    .collect(),
                spread: self.spread.as_ref().map(|target| Spread { target: target.clone(), targets: Vec::new() }),
                ..DesiredGroup::default()
            },
            task: TaskTemplate {
                image: Some(image.to_owned()),
                command: self.command.clone(),
                env,
                mounts: self.volumes.iter().map(|(name, path)| (name.clone(), path.into())).collect(),
                ..TaskTemplate::default()
            },
            service: self.port.map(|port| ServiceSpec {
                name: format!("{app}-{service}"),
                port,
                tags: self.domains.iter().map(|d| format!("{}={d}", keelson_routing::HTTP_HOST_TAG)).collect(),
                http_check: self.health_check.clone(),
            }),
            release: None,
        }
    }
}

/// A DNS label as apps and services are named: 1 to 30 of `a-z0-9-`, starting with a
/// letter, not ending with `-` (it becomes part of host and service names).
pub fn is_label(s: &str) -> bool {
    (1..=30).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && !s.ends_with('-')
}

/// An environment variable name: `A-Z`, `0-9`, `_`, not starting with a digit.
pub fn is_env_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit()
}

fn is_domain(s: &str) -> bool {
    s.len() <= 253
        && s.contains('.')
        && s.split('.').all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str) -> ManifestError {
        Manifest::parse("minipaas.toml", text).expect_err("refused")
    }

    #[test]
    fn defaults_and_strategies() {
        let m = Manifest::parse("m.toml", "[services.worker]\nimage = \"busybox\"\ncommand = [\"sleep\", \"9\"]\n").expect("parses");
        let w = &m.services["worker"];
        assert_eq!((w.replicas, w.cpu, w.memory_mb, w.port), (1, 100, 64, None));
        assert_eq!(w.strategy(), Strategy::Rolling { max_surge: 1, max_unavailable: 0 });
        let g = w.group_spec("shop", "worker", "busybox", &BTreeMap::from([("K".to_owned(), "v".to_owned())]), 1);
        assert!(g.service.is_none(), "no port: not in the catalog");
        assert_eq!(g.task.env["K"], "v");
        let bg = Manifest::parse(
            "m.toml",
            "[services.web]\nport = 80\n[services.web.deploy]\nstrategy = \"blue-green\"\nrollback_window = \"2m\"\n",
        )
        .expect("parses");
        assert_eq!(bg.services["web"].strategy(), Strategy::BlueGreen { rollback_window: Duration::from_secs(120) });
    }

    #[test]
    fn config_wins_over_the_manifest_env() {
        let m = Manifest::parse("m.toml", "[services.web]\nport = 80\nenv = { A = \"manifest\", B = \"kept\" }\n").expect("parses");
        let config = BTreeMap::from([("A".to_owned(), "config".to_owned())]);
        let g = m.services["web"].group_spec("app", "web", "img", &config, 2);
        assert_eq!((g.task.env["A"].as_str(), g.task.env["B"].as_str()), ("config", "kept"));
        assert_eq!(g.desired.version, 2);
        assert_eq!(g.service.expect("service").name, "app-web");
    }

    #[test]
    fn volumes_become_per_task_volumes_mounted_at_their_paths() {
        let m = Manifest::parse("m.toml", "[services.db]\nimage = \"pg\"\nvolumes = { data = \"/var/lib/data\" }\n").expect("parses");
        let g = m.services["db"].group_spec("app", "db", "pg", &BTreeMap::new(), 1);
        assert_eq!(g.desired.volumes.len(), 1);
        assert!(g.desired.volumes[0].per_task && g.desired.volumes[0].name == "data");
        assert_eq!(g.task.mounts["data"], std::path::PathBuf::from("/var/lib/data"));
    }

    #[test]
    fn spread_spreads_the_group_over_a_node_property() {
        let m = Manifest::parse("m.toml", "[services.node]\nimage = \"img\"\nreplicas = 3\nspread = \"label.host\"\n").expect("parses");
        let g = m.services["node"].group_spec("app", "node", "img", &BTreeMap::new(), 1);
        assert_eq!(g.desired.spread, Some(Spread { target: "label.host".into(), targets: Vec::new() }));
        for bad in ["host", "node.id", "label."] {
            let e = refused(&format!("[services.node]\nimage = \"img\"\nspread = \"{bad}\"\n"));
            assert_eq!(e.key, "services.node.spread");
            assert!(e.reason.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn bad_manifests_name_the_key_and_the_value() {
        let unknown = refused("[services.web]\nport = 80\nreplica = 2\n");
        assert!(unknown.reason.contains("replica"), "{unknown}");
        let e = refused("[services.web]\ndomains = [\"shop.example\"]\n");
        assert_eq!(e.key, "services.web.port");
        let e = refused("[services.Web]\nport = 80\n");
        assert!(e.reason.contains("\"Web\""), "{e}");
        let e = refused("[services.web]\nport = 80\nenv = { lower = \"x\" }\n");
        assert_eq!(e.key, "services.web.env");
        let e = refused("[services.web]\nport = 80\n[services.web.deploy]\nstrategy = \"yolo\"\n");
        assert!(e.reason.contains("yolo"), "{e}");
        let e = refused("[services.web]\nport = 80\n[services.web.deploy]\nmax_surge = 0\n");
        assert_eq!(e.key, "services.web.deploy");
        let e = refused("[services.web]\nport = 80\n[services.web.deploy]\nmin_healthy_time = \"soon\"\n");
        assert!(e.reason.contains("soon"), "{e}");
        let e = refused("[services.web]\nimage = \"x\"\nbuild = \".\"\n");
        assert_eq!(e.key, "services.web.image");
        let e = refused("services = {}\n");
        assert_eq!(e.key, "services");
        assert_eq!(refused("[services.web\n").key, "(file)");
    }
}
