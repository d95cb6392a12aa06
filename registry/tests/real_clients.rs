//! Real clients against keelson's registry: skopeo (Debian) copies single- and
//! multi-architecture images in from an OCI layout and back out byte-identical, and the
//! Docker Engine here pushes and pulls (plain HTTP is allowed on 127.0.0.0/8).

mod common;

use std::path::Path;

use keelson_registry::client::{Client, ClientConfig, NoProgress};
use keelson_registry::server::ServerConfig;
use keelson_registry::{Registry, RegistryConfig};
use keelson_testkit::oci;

async fn run(program: &Path, args: &[String]) -> String {
    let out = tokio::process::Command::new(program).args(args).output().await.expect("spawn");
    assert!(
        out.status.success(),
        "{} {} failed: {}\n{}",
        program.display(),
        args.join(" "),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_single_and_multi_arch_images_in_and_out_byte_identical() {
    let skopeo = keelson_testkit::require("skopeo", "skopeo").expect("skopeo");
    let dir = tempfile::tempdir().expect("tempdir");
    let server =
        common::serve(Registry::open_dir(&dir.path().join("registry"), RegistryConfig::default()).expect("open"), ServerConfig::default())
            .await;
    let client = Client::new(&server.url(), None, ClientConfig::default()).expect("client");
    let cases: [(&str, &[(&str, &str)]); 2] = [("single", &[("linux", "amd64")]), ("multi", &[("linux", "amd64"), ("linux", "arm64")])];
    for (seed, (name, platforms)) in cases.iter().enumerate() {
        let src = dir.path().join(format!("{name}-src"));
        let top = oci::write_layout(&src, "v1", platforms, &[300_000, 2_500_000], seed as u64).expect("layout");
        let target = format!("docker://{}/skopeo/{name}:v1", server.addr);
        // --preserve-digests: skopeo would otherwise gzip the uncompressed layers on the way.
        run(
            &skopeo,
            &[
                "copy".into(),
                "--all".into(),
                "--preserve-digests".into(),
                "--dest-tls-verify=false".into(),
                format!("oci:{}:v1", src.display()),
                target.clone(),
            ],
        )
        .await;
        let out = dir.path().join(format!("{name}-out"));
        let accept = "--dest-oci-accept-uncompressed-layers".to_owned();
        run(
            &skopeo,
            &[
                "copy".into(),
                "--all".into(),
                "--preserve-digests".into(),
                accept,
                "--src-tls-verify=false".into(),
                target.clone(),
                format!("oci:{}:v1", out.display()),
            ],
        )
        .await;
        assert_eq!(oci::blobs(&out).expect("out"), oci::blobs(&src).expect("src"), "{name}: skopeo's copy back out differs");
        // keelson's own client pulls the same bytes.
        let pulled = dir.path().join(format!("{name}-pulled"));
        let d = client.pull_oci_layout(&format!("skopeo/{name}").parse().expect("repo"), "v1", &pulled, &NoProgress).await.expect("pull");
        assert_eq!(d.to_string(), top);
        assert_eq!(oci::blobs(&pulled).expect("pulled"), oci::blobs(&src).expect("src"), "{name}: keelson's pull differs");
        let inspect = run(&skopeo, &["inspect".into(), "--raw".into(), "--tls-verify=false".into(), target]).await;
        assert_eq!(keelson_registry::Digest::of(inspect.as_bytes()).to_string(), top, "{name}: manifest bytes kept exactly");
    }
    let fsck = server.registry.fsck().await.expect("fsck");
    assert!(fsck.is_clean() && fsck.blobs_checked >= 10, "{fsck:?}");
}

/// Removes a local image tag when the test ends, passed or not.
struct ImageGuard(String);

impl Drop for ImageGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker").args(["rmi", "-f", &self.0]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_pushes_to_and_pulls_from_keelson() {
    keelson_testkit::docker::engine_version().expect("docker engine");
    let docker = keelson_testkit::require("docker", "docker.io").expect("docker");
    let image = keelson_testkit::docker::busybox_image().expect("busybox image");
    let dir = tempfile::tempdir().expect("tempdir");
    let server = common::serve(Registry::open_dir(dir.path(), RegistryConfig::default()).expect("open"), ServerConfig::default()).await;
    let target = format!("127.0.0.1:{}/docker/busybox:v1", server.addr.port());
    let _guard = ImageGuard(target.clone());
    run(&docker, &["tag".into(), image.clone(), target.clone()]).await;
    let pushed = run(&docker, &["push".into(), target.clone()]).await;
    let digest = pushed.split_whitespace().find(|w| w.starts_with("sha256:")).expect("push prints the digest").to_owned();
    run(&docker, &["rmi".into(), target.clone()]).await;
    let pulled = run(&docker, &["pull".into(), target.clone()]).await;
    assert!(pulled.contains(&digest), "pull of {target} names {digest}: {pulled}");
    let repo_digests =
        run(&docker, &["image".into(), "inspect".into(), "--format".into(), "{{json .RepoDigests}}".into(), target.clone()]).await;
    assert!(repo_digests.contains(&digest), "{repo_digests}");
    // Pushing again finds every layer there already.
    let again = run(&docker, &["push".into(), target.clone()]).await;
    assert!(again.contains("Layer already exists"), "{again}");
    assert!(server.registry.fsck().await.expect("fsck").is_clean());
}
