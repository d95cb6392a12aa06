//! What every daemon shares, tested on the real binaries (`dns-catalog` on its
//! in-memory catalog, and `edge`): configuration by file, environment and flag in that
//! order of precedence, a strict file, JSON logs that parse, `/healthz`, `/readyz` and
//! the build-info metric, a clean exit on SIGTERM, shell completions, and flags checked
//! before anything listens.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A daemon process, killed on drop (a test that fails leaves nothing running).
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], keelson_testkit::free_port().expect("port")))
}

/// Starts dns-catalog with `args` and `env` and returns it with its ready line.
fn dns_catalog(args: &[&str], env: &[(&str, &str)]) -> (Daemon, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dns-catalog"))
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dns-catalog starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("ready line");
    (Daemon(child), line)
}

fn sigterm(child: &Child) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
}

#[test]
fn a_flag_beats_its_variable_which_beats_the_config_file() {
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("dns-catalog.toml");
    let listen = free_addr();
    std::fs::write(
        &config,
        format!("listen = \"{listen}\"\ndomain = \"from-file\"\nttl = \"30s\"\nregister = [\"api=a@127.0.0.31:80\"]\n"),
    )
    .expect("config");
    let path = config.to_str().expect("utf-8");

    let (_d, line) = dns_catalog(&["--config", path], &[]);
    assert!(line.starts_with(&format!("dns-catalog serving from-file on {listen}")), "the file alone: {line}");
    let a = keelson_testkit::dnsmasq::dig(listen, &["+short", "api.service.from-file", "A"]).expect("dig");
    assert_eq!(a.trim(), "127.0.0.31", "a repeatable flag's list from the file");
    let ttl = keelson_testkit::dnsmasq::dig(listen, &["+noall", "+answer", "api.service.from-file", "A"]).expect("dig");
    assert!(ttl.split_whitespace().nth(1) == Some("30"), "a humantime duration from the file: {ttl}");
    drop(_d);

    let (_d, line) = dns_catalog(&["--config", path], &[("KEELSON_DNS_CATALOG_DOMAIN", "from-env")]);
    assert!(line.starts_with("dns-catalog serving from-env"), "the environment over the file: {line}");
    drop(_d);

    let (_d, line) = dns_catalog(&["--config", path, "--domain", "from-flag"], &[("KEELSON_DNS_CATALOG_DOMAIN", "from-env")]);
    assert!(line.starts_with("dns-catalog serving from-flag"), "the flag over both: {line}");
    drop(_d);

    // The file may also be named by its variable.
    let (_d, line) = dns_catalog(&[], &[("KEELSON_DNS_CATALOG_CONFIG", path)]);
    assert!(line.starts_with("dns-catalog serving from-file"), "KEELSON_DNS_CATALOG_CONFIG: {line}");
}

#[test]
fn a_config_file_with_an_unknown_key_or_a_bad_value_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("dir");
    let run = |text: &str| {
        let config = dir.path().join("bad.toml");
        std::fs::write(&config, text).expect("config");
        let out = Command::new(env!("CARGO_BIN_EXE_dns-catalog")).arg("--config").arg(&config).output().expect("runs");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run("listen = \"127.0.0.1:0\"\ndomian = \"typo\"\n");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unknown key `domian`") && err.contains("bad.toml"), "{err}");
    let (code, err) = run("ttl = \"soon\"\n");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--ttl") && err.contains("soon"), "the value is checked as the flag's: {err}");
    let (code, err) = run("domain = [\"a\", \"b\"]\n");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("`domain` takes one value"), "{err}");
    let (code, err) = run("listen = \n");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("bad.toml"), "a file that is not TOML is named: {err}");
}

#[tokio::test]
async fn health_endpoints_answer_json_logs_parse_and_sigterm_exits_cleanly() {
    let metrics = free_addr();
    let listen = free_addr();
    let (mut d, line) = dns_catalog(
        &["--listen", &listen.to_string(), "--metrics-listen", &metrics.to_string(), "--log-format", "json", "--log-level", "debug"],
        &[],
    );
    assert!(line.starts_with("dns-catalog serving"), "{line}");
    let health = keelson_testkit::http::get_when_up(metrics, "ops", "/healthz", Duration::from_secs(5)).await.expect("healthz");
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    let ready = keelson_testkit::http::get(metrics, "ops", "/readyz").await.expect("readyz");
    assert_eq!(ready.status, 200, "ready once serving: {}", ready.body);
    let scraped = keelson_testkit::http::get(metrics, "ops", "/metrics").await.expect("metrics");
    let version = env!("CARGO_PKG_VERSION");
    assert!(scraped.body.contains(&format!("keelson_build_info{{binary=\"dns-catalog\",version=\"{version}\"}} 1")), "{}", scraped.body);
    let missing = keelson_testkit::http::get(metrics, "ops", "/nothing").await.expect("404");
    assert_eq!(missing.status, 404);

    sigterm(&d.0);
    let status = keelson_testkit::wait_exit(&mut d.0, Duration::from_secs(10)).expect("exits on SIGTERM");
    assert!(status.success(), "a clean exit: {status}");
    let mut logs = String::new();
    d.0.stderr.take().expect("stderr").read_to_string(&mut logs).expect("stderr");
    let events: Vec<serde_json::Value> =
        logs.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {l}"))).collect();
    assert!(events.iter().all(|e| e["level"].is_string() && e["timestamp"].is_string()), "{logs}");
    assert!(
        events.iter().any(|e| e["fields"]["message"] == "stopping" && e["fields"]["signal"] == "Terminate"),
        "the stop is logged with its signal: {logs}"
    );
}

#[test]
fn text_logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    let (mut d, _) = dns_catalog(&["--listen", &free_addr().to_string()], &[]);
    sigterm(&d.0);
    keelson_testkit::wait_exit(&mut d.0, Duration::from_secs(10)).expect("exits");
    let mut logs = String::new();
    d.0.stderr.take().expect("stderr").read_to_string(&mut logs).expect("stderr");
    assert!(logs.contains("stopping"), "{logs}");
    assert!(!logs.contains('\u{1b}'), "ANSI escapes in a pipe: {logs:?}");
}

#[test]
fn every_daemon_prints_shell_completions() {
    for (bin, name) in [
        (env!("CARGO_BIN_EXE_dns-catalog"), "dns-catalog"),
        (env!("CARGO_BIN_EXE_edge"), "edge"),
        (env!("CARGO_BIN_EXE_logd"), "logd"),
        (env!("CARGO_BIN_EXE_logship"), "logship"),
        (env!("CARGO_BIN_EXE_registry"), "registry"),
    ] {
        // Required flags (logd --dir) do not stand in the way of completions.
        let out = Command::new(bin).args(["--completions", "bash"]).output().expect("runs");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(script.contains(&format!("_{name}()")) || script.contains(&format!("_{}()", name.replace('-', "__"))), "{name}: {script}");
        assert!(script.contains("--log-format"), "{name}");
    }
}

#[test]
fn edge_checks_every_flag_before_it_listens() {
    let dir = tempfile::tempdir().expect("dir");
    let routes = dir.path().join("routes.json");
    std::fs::write(&routes, r#"{"routes": []}"#).expect("routes");
    let listen = free_addr();
    for (bad, says) in [
        (vec!["--cert", "no-equals-sign"], "expected NAME=CHAIN_PEM,KEY_PEM"),
        (vec!["--cert", "a.example=/nonexistent/chain.pem,/nonexistent/key.pem"], "/nonexistent/chain.pem"),
        (vec!["--workers", "0"], "--workers must be at least 1"),
        (vec!["--health-check", "udp"], "expected tcp or http:/path"),
        (vec!["--upstream-timeout", "0s"], "--upstream-timeout must be longer than 0s"),
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_edge"))
            .args(["--routes", routes.to_str().expect("utf-8"), "--listen", &listen.to_string()])
            .args(&bad)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("edge runs");
        let status = keelson_testkit::wait_exit(&mut child, Duration::from_secs(10)).expect("edge exits");
        let mut err = String::new();
        child.stderr.take().expect("stderr").read_to_string(&mut err).expect("stderr");
        assert_eq!(status.code(), Some(1), "{bad:?}: {err}");
        assert!(err.contains(says), "{bad:?}: {err}");
        let mut out = String::new();
        child.stdout.take().expect("stdout").read_to_string(&mut out).expect("stdout");
        assert!(!out.contains("edge serving"), "{bad:?}: it served before refusing: {out}");
    }
}

#[test]
fn the_example_configs_under_deploy_parse_for_their_binaries() {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    for (bin, name, sub) in [
        (env!("CARGO_BIN_EXE_node-agent"), "node-agent", None),
        (env!("CARGO_BIN_EXE_edge"), "edge", None),
        (env!("CARGO_BIN_EXE_dns-catalog"), "dns-catalog", None),
        (env!("CARGO_BIN_EXE_logd"), "logd", None),
        (env!("CARGO_BIN_EXE_registry"), "registry", Some("serve")),
    ] {
        let config = deploy.join(format!("{name}.toml"));
        let out = Command::new(bin).args(sub).arg("--config").arg(&config).arg("--check-config").env_clear().output().expect("runs");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{}: {stderr}", config.display());
        assert!(stdout.starts_with("Args {"), "{name} prints what it resolved: {stdout}");
        let unit = std::fs::read_to_string(deploy.join(format!("{name}.service"))).expect("a unit beside the config");
        assert!(unit.contains(&format!("--config /etc/keelson/{name}.toml")), "{name}.service runs with its config");
    }
    // A list from the file satisfies a flag that requires it (edge's tls-listen needs cert).
    let edge = Command::new(env!("CARGO_BIN_EXE_edge"))
        .arg("--config")
        .arg(deploy.join("edge.toml"))
        .args(["--check-config", "--cert", "only=/a.pem,/a.key"])
        .env_clear()
        .output()
        .expect("runs");
    let resolved = String::from_utf8_lossy(&edge.stdout);
    assert!(resolved.contains("only=/a.pem,/a.key") && !resolved.contains("default=/etc"), "a flag replaces the file's list: {resolved}");
}

/// A daemon started before etcd answers waits for it (`--etcd-connect-timeout`) instead
/// of exiting; past the timeout it exits 1 naming etcd.
#[cfg(feature = "etcd")]
#[test]
fn a_daemon_started_before_etcd_waits_for_it_then_gives_up_by_name() {
    let mut etcd = keelson_testkit::etcd::Etcd::start().unwrap_or_else(|e| panic!("etcd for this test: {e}"));
    let url = etcd.client_url();
    etcd.stop();
    let spawn = |timeout: &str| {
        Command::new(env!("CARGO_BIN_EXE_dns-catalog"))
            .args(["--etcd", &url, "--etcd-connect-timeout", timeout, "--listen", &free_addr().to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("dns-catalog starts")
    };

    // Gives up: exit 1 after about the timeout, naming etcd.
    let mut gives_up = Daemon(spawn("1s"));
    let status = keelson_testkit::wait_exit(&mut gives_up.0, Duration::from_secs(20)).expect("gives up");
    let mut err = String::new();
    gives_up.0.stderr.take().expect("stderr").read_to_string(&mut err).expect("stderr");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("dns-catalog: etcd"), "{err}");

    // Waits: etcd comes up two seconds later and the daemon serves.
    let mut waits = Daemon(spawn("60s"));
    let stdout = waits.0.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(waits.0.try_wait().expect("status").is_none(), "it must not exit while etcd is away");
    etcd.start_again().expect("etcd back");
    let line = rx.recv_timeout(Duration::from_secs(30)).expect("the ready line once etcd answers");
    assert!(line.starts_with("dns-catalog serving"), "{line}");
}
