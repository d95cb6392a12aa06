//! The cloud's roles: a minipaas manifest (default [`DEFAULT_ROLES`]), each service with
//! a port given the name `<service>.<domain>`, and the image they run unless the
//! manifest names one.

use std::process::Command;

use super::layout::Layout;
use crate::minipaas::manifest::Manifest;

/// The default roles (`src/localcloud/roles.toml`).
pub const DEFAULT_ROLES: &str = include_str!("roles.toml");

/// The image of services without one of their own: busybox (sh, httpd), FROM scratch.
pub const IMAGE: &str = "keelson-localcloud/busybox:1";

/// The roles ready to deploy: the manifest with every named service's name added as a
/// domain, and the names that must answer through the load balancer.
#[derive(Clone, Debug)]
pub struct Roles {
    /// The manifest as deployed (TOML).
    pub manifest: String,
    /// `<service>.<domain>` of every service with a port.
    pub names: Vec<String>,
}

/// Reads the roles from `text` (from `file`, named in errors) for the cloud `layout`.
pub fn prepare(layout: &Layout, file: &str, text: &str) -> Result<Roles, String> {
    let mut manifest = Manifest::parse(file, text).map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    for (service, spec) in manifest.services.iter_mut() {
        if spec.port.is_none() {
            continue;
        }
        let name = layout.role_name(service);
        if !spec.domains.contains(&name) {
            spec.domains.push(name.clone());
        }
        names.push(name);
    }
    if names.is_empty() {
        return Err(format!("{file}: no service has a port, so no role could answer by name"));
    }
    let manifest = toml::to_string(&manifest).map_err(|e| format!("{file}: {e}"))?;
    Ok(Roles { manifest, names })
}

/// Builds [`IMAGE`] from the machine's busybox-static unless the Docker Engine has it.
pub fn ensure_image() -> Result<(), String> {
    let docker = |args: &[&str]| Command::new("docker").args(args).output().map_err(|e| format!("docker: {e}"));
    if docker(&["image", "inspect", IMAGE])?.status.success() {
        return Ok(());
    }
    let busybox = std::path::Path::new("/bin/busybox");
    if !busybox.is_file() {
        return Err("/bin/busybox is missing (apt-get install busybox-static): localcloud's image is built from it".into());
    }
    let dir = tempfile::tempdir().map_err(|e| format!("a build folder: {e}"))?;
    std::fs::copy(busybox, dir.path().join("busybox")).map_err(|e| format!("copying /bin/busybox: {e}"))?;
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n",
    )
    .map_err(|e| format!("writing the Dockerfile: {e}"))?;
    let out = docker(&["build", "-q", "-t", IMAGE, &dir.path().display().to_string()])?;
    if !out.status.success() {
        return Err(format!("building {IMAGE}: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_service_with_a_port_gets_a_name_under_the_domain() {
        let layout = Layout::new("dev", 3, "10.78.0.0/24".parse().expect("net"), None).expect("layout");
        let roles = prepare(&layout, "roles.toml", DEFAULT_ROLES).expect("default roles");
        assert_eq!(roles.names, vec!["master.dev.test", "node.dev.test"]);
        let again = Manifest::parse("deployed", &roles.manifest).expect("the deployed manifest parses");
        assert_eq!(again.services["node"].domains, vec!["node.dev.test"]);
        assert_eq!(again.services["node"].spread.as_deref(), Some("label.host"));
        let err = prepare(&layout, "r.toml", "[services.w]\nimage = \"x\"\n").expect_err("no port");
        assert!(err.contains("r.toml"), "{err}");
        let err = prepare(&layout, "r.toml", "[services.w]\nport = 0\n").expect_err("bad");
        assert!(err.contains("services.w.port"), "{err}");
    }
}
