//! Docker Engine checks and a tiny local test image: `FROM scratch` plus Debian's
//! static busybox (no image can be pulled on keelson's test machines).

use std::path::Path;

use crate::tools::{io, require, run, TestkitError};

fn perms(path: &Path) -> Result<std::fs::Permissions, TestkitError> {
    Ok(std::fs::metadata(path).map_err(io("reading busybox copy"))?.permissions())
}

/// The busybox test image's repository; the tag is derived from the busybox binary.
pub const BUSYBOX_REPO: &str = "keelson-test/busybox";

/// Checks that the Docker daemon answers; returns its version.
pub fn engine_version() -> Result<String, TestkitError> {
    let docker = require("docker", "docker.io")?;
    let v = run(&docker, &["version", "--format", "{{.Server.Version}}"]).map_err(|e| TestkitError::Failed {
        what: "asking the Docker daemon for its version".into(),
        detail: format!("{e} (is the daemon running? `systemctl start docker` or `dockerd &`)"),
    })?;
    Ok(v.trim().to_owned())
}

/// Builds (once per busybox binary) an image holding only `/bin/busybox` and its applet
/// links, and returns its name. `httpd -f -p PORT -h DIR` in it serves HTTP.
pub fn busybox_image() -> Result<String, TestkitError> {
    let docker = require("docker", "docker.io")?;
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        return Err(TestkitError::Missing { tool: "/bin/busybox".into(), package: "busybox-static".into() });
    }
    let bytes = std::fs::read(busybox).map_err(io("reading /bin/busybox"))?;
    // A cheap content tag (FNV-1a): a new busybox gives a new image, the same one is reused.
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3));
    let image = format!("{BUSYBOX_REPO}:{hash:016x}");
    if run(&docker, &["image", "inspect", "--format", "{{.Id}}", &image]).is_ok() {
        return Ok(image);
    }
    let ctx = tempfile::tempdir().map_err(io("creating build context"))?;
    let copy = ctx.path().join("busybox");
    std::fs::write(&copy, &bytes).map_err(io("copying busybox"))?;
    // COPY keeps the mode: without the exec bit the RUN step fails with EACCES.
    let mut p = perms(&copy)?;
    std::os::unix::fs::PermissionsExt::set_mode(&mut p, 0o755);
    std::fs::set_permissions(&copy, p).map_err(io("making busybox executable"))?;
    let dockerfile =
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nCMD [\"/bin/sh\"]\n";
    std::fs::write(ctx.path().join("Dockerfile"), dockerfile).map_err(io("writing Dockerfile"))?;
    let ctx_path = ctx.path().to_string_lossy().into_owned();
    run(&docker, &["build", "--quiet", "--label", "keelson.test=1", "-t", &image, &ctx_path])?;
    Ok(image)
}

/// The ids of every container, running or not, matching all of `filters` (`docker ps
/// --filter`, for example `label=keelson.node=n1`).
pub fn containers(filters: &[&str]) -> Vec<String> {
    let mut cmd = std::process::Command::new("docker");
    cmd.args(["ps", "-aq"]);
    for f in filters {
        cmd.args(["--filter", f]);
    }
    match cmd.output() {
        Ok(out) => String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_owned).collect(),
        Err(_) => Vec::new(),
    }
}

/// Force-removes every container matching all of `filters`: what tests' cleanup guards
/// call on drop, also after a failure (errors are ignored; there is nothing to report to).
pub fn remove_containers(filters: &[&str]) {
    let ids = containers(filters);
    if !ids.is_empty() {
        let _ = std::process::Command::new("docker").args(["rm", "-f"]).args(&ids).output();
    }
}
