//! `DockerImages` on the Docker Engine here: a build from a folder (progress per line),
//! a failing step as `BuildFailed` carrying the output, a missing Dockerfile as bad input;
//! a setup command committed as an image, a failing one as `BuildFailed` with nothing
//! left behind, a base image that does not exist as `ImageUnavailable`. Images made here
//! are removed at the end, also when the test fails.
#![cfg(feature = "docker")]

use std::collections::BTreeMap;
use std::process::Command;

use keelson_scheduler::{BuildRequest, DockerImages, Error};

/// Removes this test's images (tags end in this process's id) when dropped.
struct Images(Vec<String>);

impl Drop for Images {
    fn drop(&mut self) {
        for tag in &self.0 {
            let _ = Command::new("docker").args(["rmi", "-f", tag]).output();
        }
    }
}

fn docker_run(image: &str, script: &str) -> String {
    let out = Command::new("docker").args(["run", "--rm", image, "/bin/sh", "-c", script]).output().expect("docker run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn setup_containers() -> String {
    let out = Command::new("docker").args(["ps", "-a", "--filter", "name=keelson-setup-", "--format", "{{.Names}}"]).output().expect("ps");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_built_and_snapshotted_and_failures_carry_their_output() {
    let busybox = keelson_testkit::docker::busybox_image().expect("busybox image");
    let pid = std::process::id();
    let (built, committed, broken) =
        (format!("keelson-test/built:{pid}"), format!("keelson-test/committed:{pid}"), format!("keelson-test/broken:{pid}"));
    let _images = Images(vec![built.clone(), committed.clone(), broken.clone()]);
    let images = DockerImages::connect().await.expect("engine");

    let context = tempfile::tempdir().expect("dir");
    std::fs::write(context.path().join("greeting"), "hello from the context\n").expect("file");
    std::fs::write(context.path().join("Dockerfile"), format!("FROM {busybox}\nCOPY greeting /greeting\nRUN echo built-step-ran\n"))
        .expect("Dockerfile");
    let mut lines = Vec::new();
    let request = BuildRequest::new(context.path(), &built).with_label("keelson.test", "1");
    let id = images.build(&request, &mut |l| lines.push(l.to_owned())).await.expect("builds");
    assert!(id.starts_with("sha256:"), "{id}");
    assert!(lines.iter().any(|l| l.contains("built-step-ran")), "progress has the build's output: {lines:?}");
    assert_eq!(images.id_of(&built).await.expect("inspect"), Some(id));
    assert_eq!(docker_run(&built, "cat /greeting"), "hello from the context");

    std::fs::write(context.path().join("Dockerfile.bad"), format!("FROM {busybox}\nRUN echo about to fail && exit 7\n"))
        .expect("Dockerfile");
    let request = BuildRequest::new(context.path(), &broken).with_dockerfile("Dockerfile.bad");
    match images.build(&request, &mut |_| {}).await {
        Err(Error::BuildFailed { image, reason, output }) => {
            assert_eq!(image, broken);
            assert!(reason.contains('7'), "{reason}");
            assert!(output.contains("about to fail"), "{output}");
        }
        other => panic!("a failing step is BuildFailed, got {other:?}"),
    }
    assert_eq!(images.id_of(&broken).await.expect("inspect"), None);
    let request = BuildRequest::new(context.path(), &broken).with_dockerfile("Nope");
    assert!(matches!(images.build(&request, &mut |_| {}).await, Err(Error::InvalidInput { field: "Dockerfile", .. })));

    let labels = BTreeMap::from([("keelson.test".to_owned(), "1".to_owned())]);
    let setup = ["/bin/sh".to_owned(), "-c".to_owned(), "echo provisioning; echo provisioned > /state".to_owned()];
    let mut lines = Vec::new();
    images.commit_setup(&busybox, &setup, &committed, &labels, &mut |l| lines.push(l.to_owned())).await.expect("commits");
    assert_eq!(lines, ["provisioning"]);
    assert_eq!(docker_run(&committed, "cat /state"), "provisioned");

    let failing = ["/bin/sh".to_owned(), "-c".to_owned(), "echo half done; exit 4".to_owned()];
    match images.commit_setup(&busybox, &failing, &broken, &labels, &mut |_| {}).await {
        Err(Error::BuildFailed { reason, output, .. }) => {
            assert!(reason.contains("exited with 4"), "{reason}");
            assert!(output.contains("half done"), "{output}");
        }
        other => panic!("a failing setup is BuildFailed, got {other:?}"),
    }
    assert_eq!(images.id_of(&broken).await.expect("inspect"), None, "nothing committed");
    let missing = images.commit_setup("keelson-test/no-such-image:0", &setup, &broken, &labels, &mut |_| {}).await;
    assert!(matches!(missing, Err(Error::ImageUnavailable { .. })), "{missing:?}");
    assert!(!setup_containers().contains(&format!("keelson-setup-{pid}-")), "setup containers are removed: {}", setup_containers());
}
