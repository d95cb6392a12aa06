//! From a commit to an image in keelson's registry (`git_build`), on the Docker Engine
//! here and the `registry` binary with basic auth: a commit of a bare repository is
//! exported, built and pushed, and the registry then holds its manifest; a wrong password
//! is refused before anything is built, a registry that does not answer is said to be
//! unreachable; a commit without a Dockerfile and a ref that does not exist are errors
//! naming them. Images and processes go at the end, also when the test fails.
#![cfg(feature = "docker")]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keelson_examples::git_build::{build_and_push, CommitBuild, GitBuildError};
use keelson_scheduler::{DockerImages, RegistryAuth};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes the images this test built (labelled with its process id) on drop.
struct Images(String);

impl Drop for Images {
    fn drop(&mut self) {
        if let Ok(out) =
            Command::new("docker").args(["images", "-q", "--filter", &format!("label=keelson.test.git-build={}", self.0)]).output()
        {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("docker").args(["rmi", "-f", id]).output();
            }
        }
    }
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.email=git-build@keelson.test", "-c", "user.name=git-build"])
        .args(args)
        .output()
        .expect("git");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_is_built_and_pushed_to_the_keelson_registry() {
    let base = keelson_testkit::docker::busybox_image().expect("busybox image");
    let pid = std::process::id().to_string();
    let _images = Images(pid.clone());
    let dir = tempfile::tempdir().expect("dir");
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("builder:{}\n", bcrypt::hash("build-pw", 4).expect("hash"))).expect("htpasswd");
    let port = keelson_testkit::free_port().expect("port");
    let registry = format!("127.0.0.1:{port}");
    let root = dir.path().join("registry");
    let _server = Proc(
        Command::new(env!("CARGO_BIN_EXE_registry"))
            .args(["serve", "--root", root.to_str().expect("utf8"), "--listen", &registry, "--htpasswd", htpasswd.to_str().expect("utf8")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("registry"),
    );
    keelson_testkit::wait_for_tcp(registry.parse().expect("addr"), Duration::from_secs(20)).expect("registry up");

    // A working copy with two commits pushed to a bare repository: one without a
    // Dockerfile, then one with.
    let work = dir.path().join("work");
    let bare = dir.path().join("app.git");
    std::fs::create_dir(&work).expect("work");
    git(dir.path(), &["init", "-q", "--bare", bare.to_str().expect("utf8")]);
    git(&work, &["init", "-q", "-b", "main"]);
    std::fs::write(work.join("hello.txt"), "hello from the commit\n").expect("file");
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-qm", "no Dockerfile yet"]);
    let bare_commit = git(&work, &["rev-parse", "HEAD"]);
    std::fs::write(work.join("Dockerfile"), format!("FROM {base}\nCOPY hello.txt /hello.txt\nRUN echo build-ran\n")).expect("Dockerfile");
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-qm", "with a Dockerfile"]);
    let head = git(&work, &["rev-parse", "HEAD"]);
    git(&work, &["push", "-q", bare.to_str().expect("utf8"), "main"]);

    let images = DockerImages::connect().await.expect("engine");
    let mut build = CommitBuild::new(&bare, "main", format!("{registry}/apps/hello"));
    build.labels.push(("keelson.test.git-build".into(), pid.clone()));
    build.auth = Some(RegistryAuth::new(&registry, "builder", "build-pw").expect("auth"));
    let mut lines = Vec::new();
    let built = build_and_push(&images, &build, &mut |l| lines.push(l.to_owned())).await.expect("built and pushed");
    assert_eq!(built.commit, head);
    assert_eq!(built.image, format!("{registry}/apps/hello:{}", &head[..12]));
    assert!(built.digest.as_deref().is_some_and(|d| d.starts_with("sha256:")), "{built:?}");
    assert!(lines.iter().any(|l| l.contains("build-ran")), "the build's output is in the progress: {lines:?}");
    assert!(lines.iter().any(|l| l.starts_with("pushing ")), "{lines:?}");
    // The registry has it: ask with the registry client, as a node would pull it.
    let client = keelson_registry::client::Client::new(
        &format!("http://{registry}"),
        Some(keelson_registry::client::Credentials::new("builder", "build-pw")),
        keelson_registry::client::ClientConfig::default(),
    )
    .expect("client");
    let repo = "apps/hello".parse::<keelson_registry::RepoName>().expect("repo");
    let (digest, _, _) = client.manifest(&repo, &head[..12]).await.expect("the manifest is in the registry");
    assert_eq!(Some(digest.to_string()), built.digest);

    // A wrong password is refused as such, before anything is built.
    build.auth = Some(RegistryAuth::new(&registry, "builder", "wrong").expect("auth"));
    let mut lines = Vec::new();
    let err = build_and_push(&images, &build, &mut |l| lines.push(l.to_owned())).await.expect_err("refused");
    assert!(matches!(err, GitBuildError::Refused { ref user, .. } if user == "builder"), "{err:?}");
    assert!(!err.to_string().contains("wrong"), "the password is not in the error: {err}");
    assert!(lines.is_empty(), "nothing built: {lines:?}");
    // A registry that does not answer is not a refusal of the credentials.
    let nowhere = format!("127.0.0.1:{}", keelson_testkit::free_port().expect("port"));
    let mut elsewhere = CommitBuild::new(&bare, "main", format!("{nowhere}/apps/hello"));
    elsewhere.auth = Some(RegistryAuth::new(&nowhere, "builder", "build-pw").expect("auth"));
    let err = build_and_push(&images, &elsewhere, &mut |_| {}).await.expect_err("nothing listens there");
    assert!(matches!(err, GitBuildError::Registry { ref registry, .. } if *registry == nowhere), "{err:?}");

    // No Dockerfile in that commit; a ref that is not there.
    build.auth = Some(RegistryAuth::new(&registry, "builder", "build-pw").expect("auth"));
    build.rev = bare_commit.clone();
    match build_and_push(&images, &build, &mut |_| {}).await {
        Err(GitBuildError::NoDockerfile { commit, .. }) => assert_eq!(commit, bare_commit),
        other => panic!("expected NoDockerfile, got {other:?}"),
    }
    build.rev = "no-such-branch".into();
    let err = build_and_push(&images, &build, &mut |_| {}).await.expect_err("no such ref");
    assert!(matches!(err, GitBuildError::Git(ref m) if m.contains("no-such-branch")), "{err:?}");
}
