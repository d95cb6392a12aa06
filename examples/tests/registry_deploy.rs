//! The registry in the platform, end to end: an image built here is pushed to
//! keelson's registry (basic auth) with `docker push`, removed locally, deployed with
//! `keelson-ctl` on a `node-agent` that pulls it with credentials from a file, and a
//! request is served through `edge`. Everything started is stopped, and every container
//! and image removed, also when the test fails.
#![cfg(all(feature = "etcd", feature = "docker"))]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keelson_scheduler::{DesiredGroup, GroupSpec, Resources, ServiceSpec, TaskTemplate, NODE_LABEL};

/// A process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Containers of a node, and an image tag, removed on drop.
struct Cleanup {
    node: String,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        keelson_testkit::docker::remove_containers(&[&format!("label={NODE_LABEL}={}", self.node)]);
        let _ = Command::new("docker").args(["rmi", "-f", &self.image]).output();
    }
}

fn spawn(bin: &str, args: &[&str], log: &std::path::Path) -> Proc {
    Proc(
        Command::new(bin)
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("{bin}: {e}")),
    )
}

fn docker(config: &std::path::Path, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new("docker")
        .env("DOCKER_CONFIG", config)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("docker");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("stdin");
    }
    drop(input);
    let out = child.wait_with_output().expect("docker");
    assert!(out.status.success(), "docker {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_pushed_to_the_keelson_registry_is_deployed_and_served_through_edge() {
    let base = keelson_testkit::docker::busybox_image().expect("busybox image");
    let etcd = keelson_testkit::etcd::Etcd::start().expect("etcd");
    let url = etcd.client_url();
    let dir = tempfile::tempdir().expect("dir");
    let logs = dir.path();

    // The registry, with basic auth.
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("deployer:{}\n", bcrypt::hash("deploy-pw", 4).expect("hash"))).expect("htpasswd");
    let creds = dir.path().join("registry-creds");
    std::fs::write(&creds, "deployer:deploy-pw\n").expect("creds");
    let port = keelson_testkit::free_port().expect("port");
    let registry_addr = format!("127.0.0.1:{port}");
    let root = dir.path().join("registry");
    let _registry = spawn(
        env!("CARGO_BIN_EXE_registry"),
        &["serve", "--root", root.to_str().expect("utf8"), "--listen", &registry_addr, "--htpasswd", htpasswd.to_str().expect("utf8")],
        &logs.join("registry.log"),
    );
    keelson_testkit::wait_for_tcp(registry_addr.parse().expect("addr"), Duration::from_secs(20)).expect("registry up");

    // Build an image here and push it with Docker (a client config of the test's own).
    let node = format!("reg-{}", std::process::id());
    let image = format!("{registry_addr}/apps/web:v1");
    let _cleanup = Cleanup { node: node.clone(), image: image.clone() };
    let ctx = dir.path().join("ctx");
    std::fs::create_dir(&ctx).expect("ctx");
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {base}\nRUN mkdir -p /www && echo served-from-the-keelson-registry > /www/index.html\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n"),
    )
    .expect("Dockerfile");
    let docker_config = dir.path().join("docker-config");
    docker(&docker_config, &["build", "--quiet", "--label", "keelson.test=1", "-t", &image, ctx.to_str().expect("utf8")], None);
    docker(&docker_config, &["login", "--username", "deployer", "--password-stdin", &registry_addr], Some("deploy-pw"));
    docker(&docker_config, &["push", &image], None);
    // Gone from the engine: the agent has to pull it, and the registry wants credentials.
    docker(&docker_config, &["rmi", &image], None);

    // An agent with the registry's credentials from a file.
    let auth = format!("{registry_addr}={}", creds.display());
    let _agent = spawn(
        env!("CARGO_BIN_EXE_node-agent"),
        &[
            "--etcd",
            &url,
            "--node",
            &node,
            "--cpu",
            "4000",
            "--memory",
            "4096",
            "--ttl",
            "2s",
            "--interval",
            "200ms",
            "--address",
            "127.0.0.1",
            "--ports",
            "27400-27449",
            "--registry-auth",
            &auth,
        ],
        &logs.join("agent.log"),
    );
    let group = GroupSpec {
        desired: DesiredGroup {
            job: "web".into(),
            group: "http".into(),
            version: 1,
            count: 1,
            resources: Resources::new(200, 32),
            ports: 1,
            volumes: Vec::new(),
            ..DesiredGroup::default()
        },
        task: TaskTemplate {
            image: Some(image.clone()),
            command: vec!["httpd".into(), "-f".into(), "-p".into(), "8080".into(), "-h".into(), "/www".into()],
            ..TaskTemplate::default()
        },
        service: Some(ServiceSpec { name: "web".into(), port: 8080, tags: vec!["keelson.http.host=web.test".into()], http_check: None }),
        release: None,
    };
    let deploy = dir.path().join("deploy.json");
    std::fs::write(&deploy, serde_json::json!({"group": group}).to_string()).expect("deploy file");
    let out = Command::new(env!("CARGO_BIN_EXE_keelson-ctl"))
        .args(["--etcd", &url, "deploy", deploy.to_str().expect("utf8")])
        .output()
        .expect("ctl");
    assert!(out.status.success(), "keelson-ctl deploy: {}", String::from_utf8_lossy(&out.stderr));

    // edge follows the catalog and routes web.test to the task.
    let edge_addr = format!("127.0.0.1:{}", keelson_testkit::free_port().expect("port"));
    let _edge = spawn(env!("CARGO_BIN_EXE_edge"), &["--etcd", &url, "--listen", &edge_addr], &logs.join("edge.log"));
    let deadline = Instant::now() + Duration::from_secs(90);
    let body = loop {
        match keelson_testkit::http::get(edge_addr.parse().expect("addr"), "web.test", "/").await {
            Ok(r) if r.status == 200 => break r.body,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "edge never served web.test: {other:?}\nagent: {}\nregistry: {}",
                    std::fs::read_to_string(logs.join("agent.log")).unwrap_or_default(),
                    std::fs::read_to_string(logs.join("registry.log")).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    assert_eq!(body.trim(), "served-from-the-keelson-registry");
    let pulled = Command::new("docker").args(["image", "inspect", "--format", "{{json .RepoDigests}}", &image]).output().expect("inspect");
    assert!(
        String::from_utf8_lossy(&pulled.stdout).contains(&format!("{registry_addr}/apps/web@sha256:")),
        "the agent pulled it from the registry"
    );
    let agent_log = std::fs::read_to_string(logs.join("agent.log")).unwrap_or_default();
    assert!(!agent_log.contains("deploy-pw"), "the registry password reached the agent's log");
}
