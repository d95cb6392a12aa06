//! `minipaas-push-to-served`: how long `minipaas up` takes, and how long from `git push`
//! to the new version answering through edge by its domain, on `minipaas up` from the
//! release binaries (etcd, keelson's registry, logd, a node agent on the Docker Engine
//! here on a keelson bridge, edge, the controller). The app is the fixture
//! `examples/tests/fixtures/minipaas-app` (busybox httpd built FROM scratch, 2 replicas
//! rolled one at a time with 1 s of minimum health); each push changes its page. The
//! clock stops when edge first answers with the new page. Prints each push and medians.
//!
//! `cargo run --release -p keelson-benches --bin minipaas-push-to-served` (`--pushes`).

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use clap::Parser;
use keelson_benches::proxy_bench::{example_binary, median, Fallible};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/tests/fixtures/minipaas-app");
const DOMAIN: &str = "shop.localhost";

#[derive(Parser, Debug)]
#[command(about = "minipaas: git push to served through edge")]
struct Args {
    /// Pushes to time (the first one creates the release history).
    #[arg(long, default_value_t = 6)]
    pushes: usize,
}

/// `minipaas up`, taken down (SIGTERM: it removes all it made) on drop.
struct Up(Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

fn run(program: &Path, args: &[&str], dir: &Path) -> Fallible<String> {
    let out = Command::new(program).args(args).current_dir(dir).output().map_err(|e| format!("{}: {e}", program.display()))?;
    if !out.status.success() {
        return Err(format!("{} {args:?}: {}", program.display(), String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn served(edge: std::net::SocketAddr) -> Option<String> {
    match keelson_testkit::http::get(edge, DOMAIN, "/").await {
        Ok(r) if r.status == 200 => Some(r.body.trim().to_owned()),
        _ => None,
    }
}

async fn bench(args: Args) -> Fallible<()> {
    for name in ["registry", "logd", "node-agent", "edge"] {
        example_binary(name)?;
    }
    let minipaas = example_binary("minipaas")?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let data = dir.path().join("data");
    let edge: std::net::SocketAddr =
        format!("127.0.0.1:{}", keelson_testkit::free_port().map_err(|e| e.to_string())?).parse().map_err(|_| "addr")?;
    let listen = format!("127.0.0.1:{}", keelson_testkit::free_port().map_err(|e| e.to_string())?);
    let log = dir.path().join("up.log");
    let started = Instant::now();
    let child = Command::new(&minipaas)
        .arg("--data-dir")
        .arg(&data)
        .args(["up", "--listen", &listen, "--edge", &edge.to_string()])
        .stdout(std::fs::File::create(&log).map_err(|e| e.to_string())?)
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let _up = Up(child);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("minipaas is up") {
        if started.elapsed() > Duration::from_secs(60) {
            return Err("minipaas up did not come up in 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("minipaas up: {:.2} s", started.elapsed().as_secs_f64());

    let work = dir.path().join("shop");
    keelson_testkit::copy_dir(Path::new(FIXTURE), &work).map_err(|e| e.to_string())?;
    std::fs::copy("/bin/busybox", work.join("busybox")).map_err(|e| format!("/bin/busybox: {e}"))?;
    let data_arg = data.to_str().ok_or("utf8")?;
    run(&minipaas, &["--data-dir", data_arg, "apps", "create", "shop", "--manifest", "minipaas.toml"], &work)?;
    let git = |a: &[&str]| run(Path::new("git"), &[&["-c", "user.name=b", "-c", "user.email=b@b"], a].concat(), &work);
    git(&["init", "-q", "-b", "main"])?;
    let repo = data.join("git/shop.git");
    let script = std::fs::read_to_string(work.join("start.sh")).map_err(|e| e.to_string())?;
    let mut times = Vec::new();
    for i in 1..=args.pushes {
        let page = format!("from shop {i}");
        std::fs::write(work.join("start.sh"), script.replace("from shop", &page)).map_err(|e| e.to_string())?;
        git(&["add", "-A"])?;
        git(&["commit", "-qm", &page])?;
        let pushed = Instant::now();
        git(&["push", "-q", repo.to_str().ok_or("utf8")?, "main"])?;
        let want = format!("hello {page}");
        while served(edge).await.as_deref() != Some(want.as_str()) {
            if pushed.elapsed() > Duration::from_secs(180) {
                return Err(format!("push {i}: edge never served {want:?}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seconds = pushed.elapsed().as_secs_f64();
        println!("push {i}: served after {seconds:.2} s");
        times.push(seconds);
    }
    println!("git push to served, median of {}: {:.2} s", times.len(), median(times));
    Ok(())
}

fn main() -> std::process::ExitCode {
    keelson_benches::run_bench_main("minipaas-push-to-served", bench(Args::parse()))
}
