//! minipaas as a new user meets it, with the real programs: `minipaas up` (etcd, the
//! registry, logd, a node agent on the Docker Engine with a keelson bridge, edge, the
//! controller), `apps create`, `git push` of a small app (`tests/fixtures/minipaas-app`,
//! busybox httpd built FROM scratch) served through edge by its domain, `config set`
//! rolling it while a client calls every 20 ms with no failed request, `scale`, `ps`,
//! `logs` showing its output, a one-off `run` whose output and exit code come back,
//! `rollback`, and `down`, after which the machine is as before: no process, container,
//! volume, image, link, namespace or nft rule of the platform's is left.
#![cfg(all(feature = "etcd", feature = "docker"))]

use keelson_testkit::machine::MachineState;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MINIPAAS: &str = env!("CARGO_BIN_EXE_minipaas");
const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/minipaas-app");
const DOMAIN: &str = "shop.localhost";
const SECRET: &str = "pw-only-the-task-reads";

/// The programs `minipaas up` runs: none may outlive `down`.
const PLATFORM_PROGRAMS: &[&str] = &["etcd", "registry", "logd", "node-agent", "edge", "minipaas"];

/// `minipaas up`, running; on drop (a failed test) it is taken down all the same.
struct Up {
    child: Child,
    data: PathBuf,
    log: PathBuf,
}

impl Drop for Up {
    fn drop(&mut self) {
        // The logs first: going down removes the data folder they are in.
        if std::thread::panicking() {
            eprintln!("minipaas up said:\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
            eprintln!("{}", std::fs::read_to_string(self.log.with_file_name("up.stderr")).unwrap_or_default());
            for name in ["node-agent", "edge", "logd", "registry", "etcd"] {
                let log = std::fs::read_to_string(self.data.join("logs").join(format!("{name}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                eprintln!("--- {name} (last lines)\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            }
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn minipaas(data: &Path, args: &[&str]) -> Output {
    Command::new(MINIPAAS).arg("--data-dir").arg(data).args(["--as", "newcomer"]).args(args).output().expect("minipaas")
}

fn ok(data: &Path, args: &[&str]) -> String {
    let out = minipaas(data, args);
    assert!(out.status.success(), "minipaas {args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn git(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.email=newcomer@keelson.test", "-c", "user.name=newcomer"])
        .args(args)
        .output()
        .expect("git");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

async fn served(edge: SocketAddr) -> Option<String> {
    match keelson_testkit::http::get(edge, DOMAIN, "/").await {
        Ok(r) if r.status == 200 => Some(r.body.trim().to_owned()),
        _ => None,
    }
}

async fn until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn until_served(edge: SocketAddr, body: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while served(edge).await.as_deref() != Some(body) {
        assert!(Instant::now() < deadline, "edge never served {body:?} (last: {:?})", served(edge).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the app has no release rolling out (asking the API, as scripts would).
async fn settled(data: &Path) {
    let up = keelson_examples::minipaas::client::UpFile::read(data).expect("up.json");
    let token = std::fs::read_to_string(&up.token_file).expect("token").trim().to_owned();
    let client = keelson_examples::minipaas::client::Client::new(&up.controller, Some(token), "test").expect("client");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let info = client.call(hyper::Method::GET, "/v1/apps/shop", None).await.expect("info");
        if info["services"].as_array().expect("services").iter().all(|s| s["rolling_out"].is_null()) {
            return;
        }
        assert!(Instant::now() < deadline, "the rollout did not end: {info}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_user_pushes_configures_scales_runs_rolls_back_and_leaves_nothing_behind() {
    let base = keelson_testkit::docker::busybox_image().expect("busybox image"); // the engine answers
    let before = MachineState::read(PLATFORM_PROGRAMS);
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    let log = dir.path().join("up.log");
    let ports = keelson_testkit::free_ports(3).expect("ports");
    let listen = format!("127.0.0.1:{}", ports[0]);
    let edge: SocketAddr = format!("127.0.0.1:{}", ports[1]).parse().expect("addr");
    let edge_tls: SocketAddr = format!("127.0.0.1:{}", ports[2]).parse().expect("addr");
    // An ACME CA (pebble) whose HTTP-01 checks reach edge, resolving names with a keelson
    // DNS server that knows the app's TLS name.
    let catalog = Arc::new(keelson_discovery::MemoryDiscovery::memory());
    let _registered = keelson_discovery::Discovery::register(
        catalog.as_ref(),
        keelson_discovery::Registration::new(keelson_discovery::ServiceName::new("shop").expect("name"), "i1", "127.0.0.1", 80),
    )
    .await
    .expect("register");
    let mut dns_config = keelson_discovery::DnsServerConfig::default();
    dns_config.domain = "keelson.test".into();
    dns_config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let dns = keelson_discovery::DnsServer::start(catalog.clone() as Arc<dyn keelson_discovery::Discovery>, dns_config).await.expect("dns");
    let pebble = keelson_testkit::pebble::Pebble::start(edge.port(), dns.local_addr(), 5).expect("pebble");
    let t0 = Instant::now();
    let child = Command::new(MINIPAAS)
        .arg("--data-dir")
        .arg(&data)
        .args(["up", "--listen", &listen, "--edge", &edge.to_string(), "--tls-listen", &edge_tls.to_string()])
        .args(["--acme-directory", &pebble.directory, "--acme-domain", "service.keelson.test", "--acme-ca-file"])
        .arg(&pebble.ca_file)
        .stdout(std::fs::File::create(&log).expect("log"))
        .stderr(std::fs::File::create(dir.path().join("up.stderr")).expect("log"))
        .spawn()
        .expect("minipaas up");
    let mut up = Up { child, data: data.clone(), log: log.clone() };
    until("minipaas is up", Duration::from_secs(60), || std::fs::read_to_string(&log).unwrap_or_default().contains("minipaas is up")).await;
    eprintln!("up in {:?}", t0.elapsed());

    // The app, as a newcomer writes it: the fixture, busybox beside it, one commit.
    let work = dir.path().join("shop");
    keelson_testkit::copy_dir(Path::new(FIXTURE), &work).expect("fixture");
    std::fs::copy("/bin/busybox", work.join("busybox")).expect("busybox");
    ok(&data, &["apps", "create", "shop", "--manifest", work.join("minipaas.toml").to_str().expect("utf8")]);
    let listed = ok(&data, &["apps", "list"]);
    assert!(listed.contains("shop") && listed.contains("newcomer"), "{listed}");
    git(&work, &["init", "-q", "-b", "main"]);
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-qm", "first"]);
    let repo = data.join("git").join("shop.git");
    let pushed = Instant::now();
    let push = git(&work, &["push", repo.to_str().expect("utf8"), "main"]);
    let remote = String::from_utf8_lossy(&push.stderr).into_owned();
    assert!(remote.contains("remote: web: v1 is live"), "the push reports its release: {remote}");
    until_served(edge, "hello from shop", Duration::from_secs(30)).await;
    eprintln!("git push to served: {:?} (base image {base})", pushed.elapsed());

    // secrets set: a release whose tasks find the value in /run/secrets, and nothing shows it.
    let mut secret = Command::new(MINIPAAS)
        .arg("--data-dir")
        .arg(&data)
        .args(["secrets", "set", "--app", "shop", "DB_PASSWORD"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("secrets set");
    std::io::Write::write_all(&mut secret.stdin.take().expect("stdin"), format!("{SECRET}\n").as_bytes()).expect("value");
    let said = secret.wait_with_output().expect("secrets set");
    assert!(said.status.success() && String::from_utf8_lossy(&said.stdout).contains("web v2"), "{said:?}");
    settled(&data).await;
    let bytes = format!("secret file DB_PASSWORD: {} bytes", SECRET.len());
    until("the task reads its secret file", Duration::from_secs(20), || {
        ok(&data, &["logs", "--app", "shop", "--tail", "500"]).contains(&bytes)
    })
    .await;

    // config set: a new release, rolled while a client calls through edge.
    let failures = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let caller = {
        let (failures, calls, stop) = (failures.clone(), calls.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                calls.fetch_add(1, Ordering::Relaxed);
                let answer = served(edge).await;
                if !answer.as_deref().is_some_and(|b| b.ends_with("from shop")) {
                    failures.fetch_add(1, Ordering::Relaxed);
                    eprintln!("failed call: {answer:?}");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let said = ok(&data, &["config", "set", "--app", "shop", "GREETING=bonjour"]);
    assert!(said.contains("released web v3"), "{said}");
    settled(&data).await;
    until_served(edge, "bonjour from shop", Duration::from_secs(10)).await;
    stop.store(true, Ordering::Relaxed);
    caller.await.expect("caller");
    assert_eq!(failures.load(Ordering::Relaxed), 0, "failed calls during the config rollout (of {})", calls.load(Ordering::Relaxed));
    assert_eq!(ok(&data, &["config", "--app", "shop"]).trim(), "GREETING=bonjour");

    // scale and ps: three healthy instances with addresses on the bridge.
    ok(&data, &["scale", "--app", "shop", "web=3"]);
    until("three healthy instances", Duration::from_secs(60), || {
        let ps = ok(&data, &["ps", "--app", "shop"]);
        ps.lines().filter(|l| l.contains(" healthy ") && l.contains("10.249.0.")).count() == 3
    })
    .await;

    // logs: the app's own output, from logd.
    until("the app's output in logs", Duration::from_secs(20), || {
        ok(&data, &["logs", "--app", "shop", "--tail", "500"]).contains("shop starting with greeting 'bonjour'")
    })
    .await;

    // run: a one-off from the app's image with its config; output and exit code return.
    let run = minipaas(&data, &["run", "--app", "shop", "--", "sh", "-c", "echo migrated with $GREETING; exit 3"]);
    assert_eq!(run.status.code(), Some(3), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(String::from_utf8_lossy(&run.stdout).contains("migrated with bonjour"), "{}", String::from_utf8_lossy(&run.stdout));

    // rollback: back to v2 (no GREETING), as release v4.
    let said = ok(&data, &["rollback", "--app", "shop", "--service", "web"]);
    assert!(said.contains("web v4"), "{said}");
    settled(&data).await;
    until_served(edge, "hello from shop", Duration::from_secs(10)).await;
    let releases = ok(&data, &["releases", "--app", "shop"]);
    for change in ["git push", "secret set DB_PASSWORD", "config set GREETING", "rollback to v2"] {
        assert!(releases.contains(change), "{change} missing from\n{releases}");
    }
    assert!(releases.contains("newcomer"), "who made each release: {releases}");
    for shown in [releases, ok(&data, &["config", "--app", "shop"]), ok(&data, &["logs", "--app", "shop", "--tail", "1000"])] {
        assert!(!shown.contains(SECRET), "a secret's value shows: {shown}");
    }

    // domains add: routed by the new name too, over HTTPS with a certificate from the CA.
    let said = ok(&data, &["domains", "add", "--app", "shop", "--service", "web", "shop.service.keelson.test"]);
    assert!(said.contains("web: v5 is live"), "{said}");
    let root = pebble.issuing_root_cert().expect("root");
    let deadline = Instant::now() + Duration::from_secs(30);
    while keelson_testkit::tls::handshake(edge_tls, "shop.service.keelson.test", &[&root]).await.is_err() {
        assert!(Instant::now() < deadline, "no certificate for the app's domain\npebble:\n{}", pebble.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // domains add --cert: a domain with its own certificate, over HTTPS once edge has it;
    // a certificate that does not parse is refused, naming the domain, with no release.
    let own = keelson_testkit::tls::test_cert(&["shop.example.org"]).expect("cert");
    let (cert, key) = (dir.path().join("own.crt"), dir.path().join("own.key"));
    std::fs::write(&cert, &own.chain_pem).expect("cert");
    std::fs::write(&key, &own.key_pem).expect("key");
    let (cert_s, key_s) = (cert.to_str().expect("utf8"), key.to_str().expect("utf8"));
    std::fs::write(dir.path().join("bad.crt"), "not a certificate").expect("bad");
    let bad = minipaas(&data, &["domains", "add", "--app", "shop", "--service", "web", "bad.example.org", "--cert"]);
    assert!(!bad.status.success());
    let bad_cert = dir.path().join("bad.crt");
    let bad = minipaas(
        &data,
        &[
            "domains",
            "add",
            "--app",
            "shop",
            "--service",
            "web",
            "bad.example.org",
            "--cert",
            bad_cert.to_str().expect("utf8"),
            "--key",
            key_s,
        ],
    );
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("bad.example.org"), "{bad:?}");
    let said = ok(&data, &["domains", "add", "--app", "shop", "--service", "web", "shop.example.org", "--cert", cert_s, "--key", key_s]);
    assert!(said.contains("web: v6 is live"), "no release for the refused one, v6 for this: {said}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match keelson_testkit::tls::handshake(edge_tls, "shop.example.org", &[&own]).await {
            Ok(h) => {
                assert_eq!(h.leaf, own.der, "edge serves the domain's own certificate");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "no HTTPS for shop.example.org: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let key_file = data.join("certs/shop.example.org.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key_file).expect("key installed").permissions().mode() & 0o777, 0o600, "the key is the owner's only");

    // down: everything goes.
    ok(&data, &["down"]);
    let status = up.child.wait().expect("up exits");
    assert!(status.success(), "minipaas up ended with {status}");
    assert!(!data.exists(), "the data folder is removed");
    assert_eq!(MachineState::read(PLATFORM_PROGRAMS), before, "the machine after down differs from before up");
}
