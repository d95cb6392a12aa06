//! `minipaas`: a small Heroku built from keelson's building blocks.
//!
//! ```text
//! minipaas demo                                   # embedded defaults: no servers, no Docker
//! minipaas up --data-dir ~/.minipaas &            # etcd, registry, logd, node agent, edge, controller
//! minipaas apps create shop --manifest minipaas.toml
//! git push ~/.minipaas/git/shop.git main          # built, pushed to the registry, released
//! minipaas deploy --app shop --image 127.0.0.1:5000/shop:1a2b3c
//! minipaas releases --app shop
//! minipaas config set --app shop GREETING=hello   # a new release, rolled
//! minipaas scale --app shop web=3
//! minipaas ps --app shop                          # instances, nodes, health, addresses
//! minipaas logs --app shop -f
//! minipaas run --app shop -- /bin/migrate --all   # a one-off; its exit code is ours
//! minipaas rollback --app shop --service web      # back to the release before
//! minipaas domains add --app shop --service web shop.example.com
//! minipaas domains add --app shop --service web shop.example.org --cert chain.pem --key key.pem
//! minipaas secrets set --app shop DB_PASSWORD < pw.txt
//! minipaas down --data-dir ~/.minipaas            # removes everything up made
//! ```
//!
//! The CLI finds the controller and its token in `<data-dir>/up.json` (default
//! `./minipaas-data`), or from `--controller` and `--token-file`. Errors are one line on
//! stderr with exit status 1. `up`/`down` need the `etcd` and `docker` features.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use hyper::Method;
use keelson_examples::ctl::table::Table;
use keelson_examples::minipaas::client::Client;
use keelson_examples::minipaas::{Demo, DemoConfig, HOST};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(version, about = "A small platform built from keelson building blocks")]
struct Cli {
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    command: Command,
}

/// Which controller the CLI talks to.
#[derive(Args, Debug, Clone)]
struct Target {
    /// The data folder of `minipaas up` (its up.json says where the controller is).
    #[arg(long, global = true, default_value = "minipaas-data", env = "MINIPAAS_DATA_DIR")]
    data_dir: PathBuf,
    /// The controller (http://host:port); default: from <data-dir>/up.json.
    #[arg(long, global = true, env = "MINIPAAS_CONTROLLER")]
    controller: Option<String>,
    /// A file holding the controller's token; default: from <data-dir>/up.json.
    #[arg(long, global = true, env = "MINIPAAS_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The app a command is about.
    #[arg(long, short, global = true, env = "MINIPAAS_APP")]
    app: Option<String>,
    /// Return once a release is made, without waiting for it to go live.
    #[arg(long, global = true)]
    no_wait: bool,
    /// Who you are, as releases record it.
    /// (default: $USER, else the account this runs as).
    #[arg(long = "as", global = true, env = "USER")]
    user: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run 3 replicas of `hello` behind the router on embedded defaults, until Ctrl-C.
    Demo {
        /// Router listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Number of replicas.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=64))]
        replicas: u32,
        /// The hello program to run (default: `hello` next to this binary, else this
        /// binary's own `hello` subcommand).
        #[arg(long)]
        hello_bin: Option<PathBuf>,
    },
    /// Run the platform on this machine (etcd, Docker, registry, logd, bridge network,
    /// edge, controller) in the foreground until Ctrl-C or `minipaas down`.
    Up {
        /// The controller's address.
        #[arg(long, default_value = "127.0.0.1:7800")]
        listen: SocketAddr,
        /// Where edge serves apps' domains.
        #[arg(long, default_value = "127.0.0.1:8080")]
        edge: SocketAddr,
        /// Millicores the node offers.
        #[arg(long, default_value_t = 4000)]
        cpu: u64,
        /// MiB the node offers.
        #[arg(long, default_value_t = 4096)]
        memory: u64,
        /// Serve apps' domains over HTTPS here too: those added with `domains add --cert`,
        /// and with --acme-directory those under the --acme-domain ones.
        #[arg(long)]
        tls_listen: Option<SocketAddr>,
        /// An ACME CA's directory URL (its HTTP-01 challenges are answered on --edge).
        #[arg(long, requires_all = ["tls_listen", "acme_domain"])]
        acme_directory: Option<String>,
        /// A PEM root the CA's own HTTPS chains to (a private or test CA).
        #[arg(long, requires = "acme_directory")]
        acme_ca_file: Option<PathBuf>,
        /// Apps' domains under this one get certificates (repeatable); others stay HTTP.
        #[arg(long, requires = "acme_directory")]
        acme_domain: Vec<String>,
    },
    /// Take down the platform `up` runs with this --data-dir, and everything it made.
    Down,
    /// Apps: list, create, info, clone, delete.
    #[command(subcommand)]
    Apps(AppsCommand),
    /// Release an image (services that build their image get it).
    Deploy {
        /// The image.
        #[arg(long)]
        image: String,
    },
    /// The releases timeline: every deploy, config change and rollback.
    Releases,
    /// Go back to a release (default: the one before the current), as a new release.
    Rollback {
        /// Only this service (needed with a release number when the app has several).
        #[arg(long)]
        service: Option<String>,
        /// The release (`v3` or `3`).
        release: Option<String>,
    },
    /// Show, set or unset config (set and unset roll the app).
    Config {
        #[command(subcommand)]
        change: Option<ConfigCommand>,
    },
    /// Set how many tasks services run: `web=3 worker=1`.
    Scale {
        /// SERVICE=COUNT pairs.
        #[arg(required = true, value_parser = parse_pair)]
        counts: Vec<(String, String)>,
    },
    /// The app's instances: node, status, health, address.
    Ps,
    /// The app's output, from the log server.
    Logs {
        /// Keep printing new output.
        #[arg(long, short)]
        follow: bool,
        /// The last N lines.
        #[arg(long, default_value_t = 100)]
        tail: usize,
    },
    /// Run a command once in the app's image with its config; its exit code is this one's.
    Run {
        /// Whose image and config (default: the first service).
        #[arg(long)]
        service: Option<String>,
        /// Stop it after this long.
        #[arg(long, default_value = "10m")]
        time_limit: String,
        /// The command and its arguments.
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
    /// Host names routed to a service.
    #[command(subcommand)]
    Domains(DomainsCommand),
    /// Secrets: names, set (value from stdin), unset. Values are never shown.
    Secrets {
        #[command(subcommand)]
        change: Option<SecretsCommand>,
    },
    /// What a git hook runs: builds and releases what was pushed (reads `old new ref` lines).
    #[command(hide = true)]
    Hook {
        /// The app.
        app: String,
    },
    /// Serve the hello service (what each demo replica runs when no `hello` binary is found).
    #[command(hide = true)]
    Hello {
        #[arg(long, env = "KEELSON_TASK_ID")]
        id: String,
        #[arg(long, env = "PORT")]
        port: u16,
    },
}

#[derive(Subcommand, Debug)]
enum AppsCommand {
    /// Every app.
    List,
    /// A new app from a manifest (default: one web service on port 8080, built from the repository).
    Create {
        name: String,
        /// Its minipaas.toml.
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
    /// An app's services, config keys, secret names and git repository.
    Info { name: String },
    /// A copy of an app: manifest, config and secrets (not its releases).
    Clone { from: String, to: String },
    /// Stop an app and forget it (its repository too).
    Delete {
        name: String,
        /// The app's name again, to be sure.
        #[arg(long)]
        confirm: String,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// KEY=VALUE pairs.
    Set {
        #[arg(required = true, value_parser = parse_pair)]
        pairs: Vec<(String, String)>,
    },
    /// Keys.
    Unset {
        #[arg(required = true)]
        keys: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum DomainsCommand {
    /// Route a host name to a service (a new release).
    Add {
        /// The service.
        #[arg(long)]
        service: String,
        domain: String,
        /// Its certificate chain (PEM): edge serves the domain over HTTPS with it
        /// (`minipaas up --tls-listen`).
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// The certificate's private key (PEM).
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum SecretsCommand {
    /// Set KEY to what stdin holds (one trailing newline dropped).
    Set { key: String },
    /// Remove KEY.
    Unset { key: String },
}

/// The manifest `apps create` uses without `--manifest`.
const DEFAULT_MANIFEST: &str = "[services.web]\nport = 8080\nhealth_check = \"/\"\n";

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))
}

/// The command that runs one replica: an explicit binary, the sibling `hello` binary,
/// or this binary's `hello` subcommand (so `cargo run --bin minipaas` alone suffices).
fn hello_command(explicit: Option<PathBuf>) -> Result<Vec<String>, String> {
    if let Some(p) = explicit {
        return Ok(vec![p.display().to_string()]);
    }
    let me = std::env::current_exe().map_err(|e| format!("cannot find this program's path: {e}"))?;
    let sibling = me.with_file_name("hello");
    if sibling.is_file() {
        return Ok(vec![sibling.display().to_string()]);
    }
    Ok(vec![me.display().to_string(), "hello".into()])
}

impl Target {
    fn app(&self) -> Result<String, String> {
        self.app.clone().ok_or_else(|| "which app? say --app <name> (or set MINIPAAS_APP)".into())
    }
}

fn client(target: &Target) -> Result<Client, String> {
    let up = || keelson_examples::minipaas::client::UpFile::read(&target.data_dir);
    let (base, token_file) = match (&target.controller, &target.token_file) {
        (Some(c), t) => (c.clone(), t.clone()),
        (None, t) => {
            let up = up()?;
            (up.controller, t.clone().or(Some(up.token_file)))
        }
    };
    let token = token_file.as_deref().map(keelson_examples::logs_client::read_token).transpose()?;
    let user = target.user.clone().unwrap_or_else(|| {
        nix::unistd::User::from_uid(nix::unistd::getuid()).ok().flatten().map_or_else(|| "anonymous".to_owned(), |u| u.name)
    });
    Client::new(&base, token, &user).map_err(|e| e.to_string())
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        v => v.to_string(),
    }
}

fn ms_time(v: &Value) -> String {
    v.as_u64()
        .map(|ms| humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string())
        .unwrap_or_default()
}

fn made_text(made: &Value) -> String {
    let list: Vec<String> = made.as_array().into_iter().flatten().map(|m| format!("{} v{}", s(&m["service"]), s(&m["release"]))).collect();
    if list.is_empty() {
        "no release (never deployed: it applies at the first deploy)".into()
    } else {
        format!("released {}", list.join(", "))
    }
}

/// Waits until every release in `made` is live (the stable version, nothing rolling out),
/// saying so line by line; an error when one ended otherwise (rolled back, failed).
async fn wait_live(c: &Client, target: &Target, app: &str, made: &Value) -> Result<(), String> {
    let made: Vec<(String, u64)> =
        made.as_array().into_iter().flatten().filter_map(|m| Some((s(&m["service"]), m["release"].as_u64()?))).collect();
    if target.no_wait || made.is_empty() {
        return Ok(());
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    let mut waiting = made;
    loop {
        let info = c.call(Method::GET, &format!("/v1/apps/{app}"), None).await.map_err(|e| e.to_string())?;
        let services = info["services"].as_array().cloned().unwrap_or_default();
        let mut still = Vec::new();
        for (service, release) in waiting {
            let Some(state) = services.iter().find(|sv| sv["name"] == service.as_str()) else { continue };
            if !state["rolling_out"].is_null() {
                still.push((service, release));
            } else if state["release"].as_u64() == Some(release) {
                println!("{service}: v{release} is live");
            } else {
                return Err(format!(
                    "{service}: v{release} did not go live; v{} runs (see minipaas ps, minipaas logs)",
                    s(&state["release"])
                ));
            }
        }
        if still.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err("still rolling out after 10 minutes (see minipaas ps)".into());
        }
        waiting = still;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

async fn cli(target: Target, command: Command) -> Result<ExitCode, String> {
    let e = |e: keelson_examples::minipaas::client::ClientError| e.to_string();
    match command {
        Command::Apps(AppsCommand::List) => {
            let c = client(&target)?;
            let apps = c.call(Method::GET, "/v1/apps", None).await.map_err(e)?;
            let mut t = Table::new(&["app", "created by", "created"]);
            for a in apps.as_array().into_iter().flatten() {
                t.row(vec![s(&a["name"]), s(&a["created_by"]), ms_time(&a["created_ms"])]);
            }
            print!("{}", t.render());
        }
        Command::Apps(AppsCommand::Create { name, manifest }) => {
            let manifest = match manifest {
                Some(p) => std::fs::read_to_string(&p).map_err(|err| format!("--manifest {}: {err}", p.display()))?,
                None => DEFAULT_MANIFEST.to_owned(),
            };
            let c = client(&target)?;
            c.call(Method::POST, "/v1/apps", Some(&json!({ "name": name, "manifest": manifest }))).await.map_err(e)?;
            println!("created {name}");
            if let Ok(up) = keelson_examples::minipaas::client::UpFile::read(&target.data_dir) {
                println!("deploy it: git push {}/{name}.git main", up.git_root.display());
            }
        }
        Command::Apps(AppsCommand::Info { name }) => {
            let c = client(&target)?;
            let info = c.call(Method::GET, &format!("/v1/apps/{name}"), None).await.map_err(e)?;
            println!("app {name} (created by {} at {})", s(&info["app"]["created_by"]), ms_time(&info["app"]["created_ms"]));
            if let Ok(up) = keelson_examples::minipaas::client::UpFile::read(&target.data_dir) {
                println!("git: {}/{name}.git", up.git_root.display());
            }
            let mut t = Table::new(&["service", "release", "tasks", "rolling out", "domains"]);
            for sv in info["services"].as_array().into_iter().flatten() {
                let domains: Vec<String> = sv["domains"].as_array().into_iter().flatten().map(s).collect();
                t.row(vec![
                    s(&sv["name"]),
                    format!("v{}", s(&sv["release"])),
                    s(&sv["count"]),
                    sv["rolling_out"].as_u64().map(|v| format!("v{v}")).unwrap_or_default(),
                    domains.join(","),
                ]);
            }
            print!("{}", t.render());
            let list = |v: &Value| v.as_array().into_iter().flatten().map(s).collect::<Vec<_>>().join(", ");
            println!("config: {}", list(&info["config_keys"]));
            println!("secrets: {}", list(&info["secrets"]));
        }
        Command::Apps(AppsCommand::Clone { from, to }) => {
            let c = client(&target)?;
            c.call(Method::POST, &format!("/v1/apps/{from}/clone"), Some(&json!({ "to": to }))).await.map_err(e)?;
            println!("cloned {from} to {to}");
        }
        Command::Apps(AppsCommand::Delete { name, confirm }) => {
            if confirm != name {
                return Err(format!("--confirm {confirm:?} does not match {name:?}"));
            }
            let c = client(&target)?;
            c.call(Method::DELETE, &format!("/v1/apps/{name}"), None).await.map_err(e)?;
            println!("deleted {name}");
        }
        Command::Deploy { image } => {
            let app = target.app()?;
            let c = client(&target)?;
            let made = c.call(Method::POST, &format!("/v1/apps/{app}/deploy"), Some(&json!({ "image": image }))).await.map_err(e)?;
            println!("{}", made_text(&made));
            wait_live(&c, &target, &app, &made).await?;
        }
        Command::Releases => {
            let app = target.app()?;
            let c = client(&target)?;
            let timeline = c.call(Method::GET, &format!("/v1/apps/{app}/releases"), None).await.map_err(e)?;
            let mut t = Table::new(&["service", "release", "", "by", "when", "change", "image"]);
            for r in timeline.as_array().into_iter().flatten() {
                t.row(vec![
                    s(&r["service"]),
                    format!("v{}", s(&r["version"])),
                    if r["current"] == true { "current".into() } else { String::new() },
                    s(&r["by"]),
                    ms_time(&r["at_ms"]),
                    s(&r["change"]),
                    s(&r["image"]),
                ]);
            }
            print!("{}", t.render());
        }
        Command::Rollback { service, release } => {
            let app = target.app()?;
            let release = release
                .map(|r| r.trim_start_matches('v').parse::<u64>().map_err(|_| format!("release {r:?}: expected v3 or 3")))
                .transpose()?;
            let c = client(&target)?;
            let made = c
                .call(Method::POST, &format!("/v1/apps/{app}/rollback"), Some(&json!({ "service": service, "release": release })))
                .await
                .map_err(e)?;
            println!("{}", made_text(&made).replacen("released", "rolled back:", 1));
            wait_live(&c, &target, &app, &made).await?;
        }
        Command::Config { change: None } => {
            let app = target.app()?;
            let c = client(&target)?;
            let config = c.call(Method::GET, &format!("/v1/apps/{app}/config"), None).await.map_err(e)?;
            for (k, v) in config.as_object().into_iter().flatten() {
                println!("{k}={}", s(v));
            }
        }
        Command::Config { change: Some(change) } => {
            let app = target.app()?;
            let body = match change {
                ConfigCommand::Set { pairs } => json!({ "set": pairs.into_iter().collect::<std::collections::BTreeMap<_, _>>() }),
                ConfigCommand::Unset { keys } => json!({ "unset": keys }),
            };
            let c = client(&target)?;
            let made = c.call(Method::POST, &format!("/v1/apps/{app}/config"), Some(&body)).await.map_err(e)?;
            println!("{}", made_text(&made));
            wait_live(&c, &target, &app, &made).await?;
        }
        Command::Scale { counts } => {
            let app = target.app()?;
            let c = client(&target)?;
            for (service, count) in counts {
                let count: u32 = count.parse().map_err(|_| format!("{service}={count}: the count is not a number"))?;
                c.call(Method::POST, &format!("/v1/apps/{app}/scale"), Some(&json!({ "service": service, "count": count })))
                    .await
                    .map_err(e)?;
                println!("{service}: {count} tasks");
            }
        }
        Command::Ps => {
            let app = target.app()?;
            let c = client(&target)?;
            let ps = c.call(Method::GET, &format!("/v1/apps/{app}/ps"), None).await.map_err(e)?;
            let mut t = Table::new(&["instance", "service", "release", "node", "status", "health", "address", "restarts"]);
            for i in ps.as_array().into_iter().flatten() {
                t.row(vec![
                    s(&i["id"]),
                    s(&i["service"]),
                    format!("v{}", s(&i["release"])),
                    s(&i["node"]),
                    s(&i["status"]),
                    if i["healthy"] == true { "healthy".into() } else { "unhealthy".into() },
                    s(&i["address"]),
                    s(&i["restarts"]),
                ]);
            }
            print!("{}", t.render());
        }
        Command::Logs { follow, tail } => {
            let app = target.app()?;
            let c = client(&target)?;
            let path = format!("/v1/apps/{}/logs?tail={tail}{}", app, if follow { "&follow=1" } else { "" });
            c.stream(Method::GET, &path, None, &mut |line| println!("{line}")).await.map_err(e)?;
        }
        Command::Run { service, time_limit, command } => {
            let app = target.app()?;
            let c = client(&target)?;
            let mut code = None;
            let body = json!({ "command": command, "service": service, "time_limit": time_limit });
            c.stream(Method::POST, &format!("/v1/apps/{app}/runs"), Some(&body), &mut |line| {
                if let Some(n) = line.strip_prefix("exit: ") {
                    code = n.trim().parse::<i32>().ok();
                } else if let Some(id) = line.strip_prefix("run: ") {
                    eprintln!("minipaas: running as {id}");
                } else {
                    println!("{line}");
                }
            })
            .await
            .map_err(e)?;
            return match code {
                Some(0) => Ok(ExitCode::SUCCESS),
                Some(n) => Ok(ExitCode::from(u8::try_from(n.clamp(1, 255)).unwrap_or(1))),
                None => Err("the run's end was not reported (see minipaas logs)".into()),
            };
        }
        Command::Domains(DomainsCommand::Add { service, domain, cert, key }) => {
            let app = target.app()?;
            let c = client(&target)?;
            let read = |p: &PathBuf| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
            let mut body = json!({ "service": service, "domain": domain });
            if let (Some(cert), Some(key)) = (&cert, &key) {
                body["cert"] = json!(read(cert)?);
                body["key"] = json!(read(key)?);
            }
            let made = c.call(Method::POST, &format!("/v1/apps/{app}/domains"), Some(&body)).await.map_err(e)?;
            println!("{domain} routes to {}/{service}; {}", app, made_text(&made));
            wait_live(&c, &target, &app, &made).await?;
        }
        Command::Secrets { change: None } => {
            let app = target.app()?;
            let c = client(&target)?;
            for name in c.call(Method::GET, &format!("/v1/apps/{app}/secrets"), None).await.map_err(e)?.as_array().into_iter().flatten() {
                println!("{}", s(name));
            }
        }
        Command::Secrets { change: Some(SecretsCommand::Set { key }) } => {
            let app = target.app()?;
            let mut value = String::new();
            use std::io::Read;
            std::io::stdin().read_to_string(&mut value).map_err(|err| format!("reading the value from stdin: {err}"))?;
            let value = value.strip_suffix('\n').unwrap_or(&value).to_owned();
            let c = client(&target)?;
            let made = c.call_raw(Method::PUT, &format!("/v1/apps/{app}/secrets/{key}"), Some(value.into())).await.map_err(e)?;
            println!("set secret {key} (a file in /run/secrets); {}", made_text(&made));
            wait_live(&c, &target, &app, &made).await?;
        }
        Command::Secrets { change: Some(SecretsCommand::Unset { key }) } => {
            let app = target.app()?;
            let c = client(&target)?;
            let made = c.call(Method::DELETE, &format!("/v1/apps/{app}/secrets/{key}"), None).await.map_err(e)?;
            println!("unset secret {key}; {}", made_text(&made));
            wait_live(&c, &target, &app, &made).await?;
        }
        Command::Hook { app } => return hook(&target, &app).await,
        Command::Demo { .. } | Command::Up { .. } | Command::Down | Command::Hello { .. } => unreachable!("handled in main"),
    }
    Ok(ExitCode::SUCCESS)
}

/// The post-receive hook: builds and releases the last commit pushed to `main`.
async fn hook(target: &Target, app: &str) -> Result<ExitCode, String> {
    let mut input = String::new();
    use std::io::Read;
    std::io::stdin().read_to_string(&mut input).map_err(|e| format!("reading what was pushed: {e}"))?;
    let Some(rev) = input.lines().rev().find_map(|l| {
        let mut parts = l.split_whitespace();
        let (_, new, reference) = (parts.next()?, parts.next()?, parts.next()?);
        (reference == "refs/heads/main" && new.bytes().any(|b| b != b'0')).then(|| new.to_owned())
    }) else {
        println!("minipaas: only pushes to main deploy; nothing to do");
        return Ok(ExitCode::SUCCESS);
    };
    let c = client(target)?;
    let mut failed = false;
    c.stream(Method::POST, &format!("/v1/apps/{app}/builds"), Some(&json!({ "rev": rev })), &mut |line| {
        failed |= line.starts_with("failed:");
        println!("{line}");
    })
    .await
    .map_err(|e| e.to_string())?;
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

#[tokio::main]
async fn main() -> ExitCode {
    let Cli { target, command } = Cli::parse();
    let result = match command {
        Command::Hello { id, port } => {
            return match keelson_examples::hello::serve(id, ([127, 0, 0, 1], port).into()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("hello: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo { listen, replicas, hello_bin } => {
            keelson_examples::init_tracing();
            match hello_command(hello_bin) {
                Ok(hello_command) => {
                    let config = DemoConfig { listen, data_dir: target.data_dir.clone(), replicas, hello_command, ..DemoConfig::default() };
                    return run_demo(config, target.data_dir).await;
                }
                Err(e) => Err(e),
            }
        }
        Command::Up { listen, edge, cpu, memory, tls_listen, acme_directory, acme_ca_file, acme_domain } => {
            keelson_examples::init_tracing();
            let tls =
                tls_listen.map(|listen| UpTlsArgs { listen, acme: acme_directory.map(|directory| (directory, acme_ca_file, acme_domain)) });
            up(&target, listen, edge, cpu, memory, tls).await
        }
        Command::Down => down(&target),
        command => cli(target, command).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("minipaas: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `up`'s HTTPS flags.
#[cfg_attr(not(all(feature = "etcd", feature = "docker")), allow(dead_code))]
struct UpTlsArgs {
    listen: SocketAddr,
    /// The CA's directory, its root, the domains.
    acme: Option<(String, Option<PathBuf>, Vec<String>)>,
}

#[cfg(all(feature = "etcd", feature = "docker"))]
async fn up(
    target: &Target,
    listen: SocketAddr,
    edge: SocketAddr,
    cpu: u64,
    memory: u64,
    tls: Option<UpTlsArgs>,
) -> Result<ExitCode, String> {
    use keelson_examples::minipaas::up::{up, UpAcme, UpConfig, UpTls};
    let me = std::env::current_exe().map_err(|e| format!("this program's path: {e}"))?;
    let config = UpConfig {
        data_dir: target.data_dir.clone(),
        listen,
        edge,
        bin_dir: me.parent().map(std::path::Path::to_path_buf).unwrap_or_default(),
        minipaas: me,
        cpu,
        memory,
        tls: tls
            .map(|t| UpTls { listen: t.listen, acme: t.acme.map(|(directory, ca_file, domains)| UpAcme { directory, ca_file, domains }) }),
    };
    let stop = async {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    up(
        config,
        |state| {
            println!("minipaas is up: controller {}, apps served by edge on http://{}", state.controller, state.edge);
            if let Some(tls) = state.edge_tls {
                println!("and on https://{tls} for domains added with --cert, and those under the --acme-domain ones");
            }
            println!("next: minipaas apps create <name>   then   git push {}/<name>.git main", state.git_root.display());
        },
        stop,
    )
    .await?;
    println!("minipaas is down");
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(all(feature = "etcd", feature = "docker")))]
async fn up(_: &Target, _: SocketAddr, _: SocketAddr, _: u64, _: u64, _: Option<UpTlsArgs>) -> Result<ExitCode, String> {
    Err("this minipaas was built without `up` (build with --features etcd,docker)".into())
}

#[cfg(all(feature = "etcd", feature = "docker"))]
fn down(target: &Target) -> Result<ExitCode, String> {
    let state = keelson_examples::minipaas::up::down(&target.data_dir, std::time::Duration::from_secs(120))?;
    println!("minipaas (pid {}) is down", state.pid);
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(all(feature = "etcd", feature = "docker")))]
fn down(_: &Target) -> Result<ExitCode, String> {
    Err("this minipaas was built without `down` (build with --features etcd,docker)".into())
}

async fn run_demo(config: DemoConfig, data_dir: PathBuf) -> ExitCode {
    let replicas = config.replicas;
    let demo = match Demo::start(config).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("minipaas: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = demo.listen_addr();
    println!(
        "minipaas ready: {replicas} replicas of hello behind http://{addr} (logs in {}) -- try: curl -H 'Host: {HOST}' http://{addr}/",
        data_dir.join("logs").display()
    );
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("minipaas: cannot watch SIGTERM: {e}");
            let _ = demo.shutdown().await;
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("minipaas: stopping");
    match demo.shutdown().await {
        Ok(()) => {
            println!("minipaas stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("minipaas: stopped with an error: {e}");
            ExitCode::FAILURE
        }
    }
}
