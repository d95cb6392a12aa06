//! The minipaas controller's API and dashboard, in process over `MemoryKv` (no servers,
//! no Docker): what every mode shares. Apps are created, cloned and deleted; releases,
//! config, scale, domains and rollbacks are scheduler group versions; bad input gets a
//! clear error with the right status; secrets never appear by value in config, info,
//! releases or the dashboard; without the token nothing answers but /healthz; the
//! dashboard, read by a real browser (chromium), shows what the API says.

use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use keelson_examples::minipaas::api::{serve, Controller};
use keelson_examples::minipaas::client::{Client, ClientError};
use keelson_examples::minipaas::platform::Platform;
use serde_json::json;

const MANIFEST: &str = "[services.web]\nport = 8080\nreplicas = 0\ndomains = [\"shop.test\"]\n\n[services.worker]\nreplicas = 0\n";
const TOKEN: &str = "test-token-0123";
const SECRET: &str = "s3cr3t-value-never-shown";

struct Running {
    addr: std::net::SocketAddr,
    client: Client,
    platform: Platform,
    _stop: tokio::sync::watch::Sender<bool>,
}

async fn start() -> Running {
    start_with(true).await
}

/// With `rollouts` false no scheduler controller runs: a release stays rolling out.
async fn start_with(rollouts: bool) -> Running {
    let kv: Arc<dyn keelson_discovery::KeyValue> = Arc::new(keelson_discovery::MemoryKv::new());
    let platform = Platform::new(kv, "t");
    let controller = Arc::new(Controller {
        platform: platform.clone(),
        git: None,
        builder: None,
        logd: None,
        token: Some(TOKEN.into()),
        certs: None,
        rollout_timeout: Duration::from_secs(10),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut s1 = stopped.clone();
    tokio::spawn(async move {
        serve(listener, controller, async move {
            let _ = s1.wait_for(|s| *s).await;
        })
        .await
    });
    // The scheduler's controller ends rollouts (no replicas: each ends at its next tick).
    if rollouts {
        let scheduler = keelson_scheduler::Controller::new(platform.store.clone());
        let mut s2 = stopped;
        tokio::spawn(async move {
            scheduler
                .run(Duration::from_millis(50), async move {
                    let _ = s2.wait_for(|s| *s).await;
                })
                .await
        });
    }
    let client = Client::new(&format!("http://{addr}"), Some(TOKEN.into()), "ada").expect("client");
    Running { addr, client, platform, _stop: stop }
}

fn status(e: ClientError) -> (u16, String) {
    match e {
        ClientError::Refused { status, message } => (status, message),
        e => panic!("expected a refusal, got {e}"),
    }
}

/// Waits until no service of `app` is rolling out.
async fn settled(r: &Running, app: &str) {
    for _ in 0..200 {
        let info = r.client.call(Method::GET, &format!("/v1/apps/{app}"), None).await.expect("info");
        if info["services"].as_array().expect("services").iter().all(|s| s["rolling_out"].is_null()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{app} never settled");
}

#[tokio::test]
async fn apps_releases_config_scale_domains_and_rollback_through_the_api() {
    let r = start().await;
    let c = &r.client;
    let created = c.call(Method::POST, "/v1/apps", Some(&json!({ "name": "shop", "manifest": MANIFEST }))).await.expect("create");
    assert_eq!(created["name"], "shop");
    assert_eq!(created["created_by"], "ada", "who acts comes from the CLI's user header");
    let (code, msg) = status(c.call(Method::POST, "/v1/apps", Some(&json!({ "name": "shop", "manifest": MANIFEST }))).await.unwrap_err());
    assert_eq!(code, 409, "{msg}");
    let (code, msg) =
        status(c.call(Method::POST, "/v1/apps", Some(&json!({ "name": "Bad_Name", "manifest": MANIFEST }))).await.unwrap_err());
    assert_eq!(code, 400);
    assert!(msg.contains("Bad_Name"), "the bad value is named: {msg}");
    let bad = "[services.web]\nreplicas = \"three\"\n";
    let (code, msg) = status(c.call(Method::POST, "/v1/apps", Some(&json!({ "name": "other", "manifest": bad }))).await.unwrap_err());
    assert_eq!(code, 400);
    assert!(msg.contains("replicas"), "the bad key is named: {msg}");
    let (code, _) = status(c.call(Method::GET, "/v1/apps/nope", None).await.unwrap_err());
    assert_eq!(code, 404);

    // Config before the first deploy: stored, no release.
    let made = c.call(Method::POST, "/v1/apps/shop/config", Some(&json!({ "set": { "GREETING": "hi" } }))).await.expect("config");
    assert_eq!(made, json!([]));
    let made = c.call(Method::POST, "/v1/apps/shop/deploy", Some(&json!({ "image": "reg.test/shop:1" }))).await.expect("deploy");
    assert_eq!(made, json!([{ "service": "web", "release": 1 }, { "service": "worker", "release": 1 }]));
    let v1 = r.platform.store.group_version("shop", "web", 1).await.expect("v1");
    assert_eq!(v1.task.env["GREETING"], "hi", "config goes into the release");
    assert_eq!(v1.release.as_ref().expect("note").by, "ada");
    let (code, msg) = status(c.call(Method::POST, "/v1/apps/shop/deploy", Some(&json!({ "image": "has space" }))).await.unwrap_err());
    assert_eq!((code, msg.contains("has space")), (400, true), "{msg}");
    settled(&r, "shop").await;

    // A config change is a release; the timeline says which keys, never the values.
    let made = c.call(Method::POST, "/v1/apps/shop/config", Some(&json!({ "set": { "GREETING": "bonjour" } }))).await.expect("config");
    assert_eq!(made[0]["release"], 2);
    settled(&r, "shop").await;
    // A secret is a release too: its tasks get it as a file (named, not valued, here).
    let made = c.call_raw(Method::PUT, "/v1/apps/shop/secrets/DB_PASSWORD", Some(SECRET.into())).await.expect("secret");
    assert_eq!(made[0]["release"], 3);
    let v3 = r.platform.store.group_version("shop", "web", 3).await.expect("v3");
    assert_eq!(v3.task.secrets["DB_PASSWORD"], "shop/DB_PASSWORD");
    assert_eq!(r.platform.store.secret("shop/DB_PASSWORD").await.expect("read").as_deref(), Some(SECRET.as_bytes()));
    settled(&r, "shop").await;
    let (code, msg) = status(c.call_raw(Method::PUT, "/v1/apps/shop/secrets/bad-name", Some("x".into())).await.unwrap_err());
    assert_eq!((code, msg.contains("bad-name")), (400, true), "{msg}");
    assert_eq!(c.call(Method::GET, "/v1/apps/shop/secrets", None).await.expect("names"), json!(["DB_PASSWORD"]));

    // Domains: a new release routed by the new name too.
    let made =
        c.call(Method::POST, "/v1/apps/shop/domains", Some(&json!({ "service": "web", "domain": "www.shop.test" }))).await.expect("domain");
    assert_eq!(made, json!([{ "service": "web", "release": 4 }, { "service": "worker", "release": 4 }]));
    let v4 = r.platform.store.group_version("shop", "web", 4).await.expect("v4");
    let tags = &v4.service.as_ref().expect("service").tags;
    assert!(tags.iter().any(|t| t.ends_with("=www.shop.test")) && tags.iter().any(|t| t.ends_with("=shop.test")), "{tags:?}");
    settled(&r, "shop").await;
    for (body, what) in [
        (json!({ "service": "worker", "domain": "w.shop.test" }), "has no port"),
        (json!({ "service": "web", "domain": "Not A Host" }), "Not A Host"),
        (json!({ "service": "db", "domain": "db.shop.test" }), "no service \"db\""),
        // This controller installs no certificates (no HTTPS); half a pair is no pair.
        (json!({ "service": "web", "domain": "tls.shop.test", "cert": "PEM", "key": "PEM" }), "serves no HTTPS"),
        (json!({ "service": "web", "domain": "tls.shop.test", "cert": "PEM" }), "needs its key"),
    ] {
        let (code, msg) = status(c.call(Method::POST, "/v1/apps/shop/domains", Some(&body)).await.unwrap_err());
        assert_eq!(code, 400, "{msg}");
        assert!(msg.contains(what), "{msg} should say {what}");
    }

    // Scale: the group's count.
    c.call(Method::POST, "/v1/apps/shop/scale", Some(&json!({ "service": "worker", "count": 0 }))).await.expect("scale");
    let (code, _) = status(c.call(Method::POST, "/v1/apps/shop/scale", Some(&json!({ "service": "db", "count": 1 }))).await.unwrap_err());
    assert_eq!(code, 400);

    // Rollback: one service to the release before, as a new release.
    let back = c.call(Method::POST, "/v1/apps/shop/rollback", Some(&json!({ "service": "web" }))).await.expect("rollback");
    assert_eq!(back, json!([{ "service": "web", "release": 5 }]));
    let v5 = r.platform.store.group_version("shop", "web", 5).await.expect("v5");
    assert_eq!(v5.task.env["GREETING"], "bonjour", "v3's environment");
    assert_eq!(v5.release.expect("note").change, "rollback to v3");
    settled(&r, "shop").await;
    let (code, _) = status(c.call(Method::POST, "/v1/apps/shop/rollback", Some(&json!({ "release": 1 }))).await.unwrap_err());
    assert_eq!(code, 400, "a release number with two services needs the service");

    let timeline = c.call(Method::GET, "/v1/apps/shop/releases", None).await.expect("releases");
    let web: Vec<(u64, String)> = timeline
        .as_array()
        .expect("list")
        .iter()
        .filter(|r| r["service"] == "web")
        .map(|r| (r["version"].as_u64().expect("v"), r["change"].as_str().expect("change").to_owned()))
        .collect();
    assert_eq!(
        web,
        [
            (1, "deploy reg.test/shop:1".to_owned()),
            (2, "config set GREETING".to_owned()),
            (3, "secret set DB_PASSWORD".to_owned()),
            (4, "domains add www.shop.test to web".to_owned()),
            (5, "rollback to v3".to_owned())
        ]
    );

    // Nothing shows a secret's value.
    for path in ["/v1/apps/shop", "/v1/apps/shop/config", "/v1/apps/shop/releases", "/v1/apps/shop/secrets", "/apps/shop", "/"] {
        let reply =
            keelson_testkit::http::request(r.addr, "GET", "c", path, &[("authorization", &format!("Bearer {TOKEN}"))]).await.expect("get");
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
        assert!(!reply.body.contains(SECRET), "{path} shows a secret's value");
    }

    // Clone: manifest, config and secrets, no releases; delete stops and forgets.
    c.call(Method::POST, "/v1/apps/shop/clone", Some(&json!({ "to": "shop-staging" }))).await.expect("clone");
    let staging = c.call(Method::GET, "/v1/apps/shop-staging", None).await.expect("info");
    assert_eq!(staging["config_keys"], json!(["GREETING"]));
    assert_eq!(staging["secrets"], json!(["DB_PASSWORD"]));
    assert_eq!(staging["services"][0]["release"], 0);
    assert_eq!(c.call(Method::DELETE, "/v1/apps/shop-staging", None).await.expect("delete")["deleted"], true);
    let (code, _) = status(c.call(Method::GET, "/v1/apps/shop-staging", None).await.unwrap_err());
    assert_eq!(code, 404);

    // Builds need a builder; runs need a deployed service and a command.
    let (code, _) = status(c.call(Method::POST, "/v1/apps/shop/builds", Some(&json!({ "rev": "main" }))).await.unwrap_err());
    assert_eq!(code, 501);
    let (code, _) = status(c.call(Method::POST, "/v1/apps/shop/runs", Some(&json!({ "command": [] }))).await.unwrap_err());
    assert_eq!(code, 400);
    let (code, _) = status(c.call(Method::GET, "/v1/apps/shop/logs", None).await.unwrap_err());
    assert_eq!(code, 501, "no log server");
}

#[tokio::test]
async fn a_change_while_a_release_rolls_out_is_refused_and_changes_nothing() {
    let r = start_with(false).await;
    let c = &r.client;
    c.call(Method::POST, "/v1/apps", Some(&json!({ "name": "shop", "manifest": MANIFEST }))).await.expect("create");
    c.call(Method::POST, "/v1/apps/shop/deploy", Some(&json!({ "image": "reg.test/shop:1" }))).await.expect("deploy");
    // The first release is live at once (nothing to roll from); the second rolls out.
    c.call(Method::POST, "/v1/apps/shop/deploy", Some(&json!({ "image": "reg.test/shop:2" }))).await.expect("deploy");
    let before = c.call(Method::GET, "/v1/apps/shop", None).await.expect("info");
    assert_eq!(before["services"][0]["rolling_out"], 2);
    let attempts = [
        ("/v1/apps/shop/domains", json!({ "service": "web", "domain": "api.shop.test" })),
        ("/v1/apps/shop/config", json!({ "set": { "GREETING": "hi" } })),
        ("/v1/apps/shop/deploy", json!({ "image": "reg.test/shop:3" })),
    ];
    for (path, body) in attempts {
        let (code, msg) = status(c.call(Method::POST, path, Some(&body)).await.unwrap_err());
        assert_eq!(code, 409, "{path}: {msg}");
        assert!(msg.contains("rolling out"), "{msg}");
    }
    let after = c.call(Method::GET, "/v1/apps/shop", None).await.expect("info");
    assert_eq!(before, after, "refused changes leave manifest and config as they were");
    assert_eq!(r.platform.store.group_versions("shop", "web").await.expect("versions").len(), 2);
}

#[tokio::test]
async fn without_the_token_only_healthz_answers() {
    let r = start().await;
    for (method, path) in [("GET", "/v1/apps"), ("GET", "/"), ("POST", "/v1/apps"), ("GET", "/apps/shop")] {
        let reply = keelson_testkit::http::request(r.addr, method, "c", path, &[]).await.expect("request");
        assert_eq!(reply.status, 401, "{method} {path}");
        let wrong = keelson_testkit::http::request(r.addr, method, "c", path, &[("authorization", "Bearer wrong")]).await.expect("request");
        assert_eq!(wrong.status, 401, "{method} {path} with a wrong token");
    }
    let health = keelson_testkit::http::request(r.addr, "GET", "c", "/healthz", &[]).await.expect("healthz");
    assert_eq!(health.status, 200);
    // A controller beyond loopback without a token is refused at start.
    let controller = Arc::new(Controller {
        platform: r.platform.clone(),
        git: None,
        builder: None,
        logd: None,
        token: None,
        certs: None,
        rollout_timeout: Duration::from_secs(1),
    });
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.expect("bind");
    let refused = serve(listener, controller, std::future::pending()).await;
    assert!(refused.is_err_and(|e| e.contains("needs a token")));
}

#[tokio::test]
async fn the_dashboard_shows_in_a_browser_what_the_api_says() {
    let r = start().await;
    let c = &r.client;
    c.call(Method::POST, "/v1/apps", Some(&json!({ "name": "shop", "manifest": MANIFEST }))).await.expect("create");
    c.call(Method::POST, "/v1/apps", Some(&json!({ "name": "blog", "manifest": MANIFEST }))).await.expect("create");
    c.call(Method::POST, "/v1/apps/shop/deploy", Some(&json!({ "image": "reg.test/shop:<1>" }))).await.expect("deploy");
    settled(&r, "shop").await;
    c.call(Method::POST, "/v1/apps/shop/config", Some(&json!({ "set": { "GREETING": "hi" } }))).await.expect("config");
    settled(&r, "shop").await;
    c.call_raw(Method::PUT, "/v1/apps/shop/secrets/API_KEY", Some(SECRET.into())).await.expect("secret");
    settled(&r, "shop").await;

    let mut browser = keelson_testkit::chromium::Chromium::start().await.expect("chromium");
    browser.open(&format!("http://{}/?token={TOKEN}", r.addr)).await.expect("index");
    let apps = browser.eval("[...document.querySelectorAll('tr.app')].map(r => r.dataset.app)").await.expect("apps");
    let api: Vec<String> = c
        .call(Method::GET, "/v1/apps", None)
        .await
        .expect("list")
        .as_array()
        .expect("list")
        .iter()
        .map(|a| a["name"].as_str().expect("name").to_owned())
        .collect();
    assert_eq!(apps, json!(api));

    browser.open(&format!("http://{}/apps/shop?token={TOKEN}", r.addr)).await.expect("app page");
    let rows = browser
        .eval(
            "[...document.querySelectorAll('#releases tr.release')].map(r => [r.dataset.service, Number(r.dataset.release), \
             r.classList.contains('current'), r.cells[2].textContent, r.cells[5].textContent])",
        )
        .await
        .expect("releases");
    let timeline = c.call(Method::GET, "/v1/apps/shop/releases", None).await.expect("releases");
    let mut expected: Vec<serde_json::Value> = timeline
        .as_array()
        .expect("list")
        .iter()
        .map(|t| json!([t["service"], t["version"], t["current"], t["image"], t["change"]]))
        .collect();
    expected.reverse();
    assert_eq!(rows, json!(expected), "newest first, as the API's timeline");
    assert_eq!(rows[0][3], "reg.test/shop:<1>", "text is escaped, not markup");
    let keys = browser.eval("document.getElementById('config-keys').textContent").await.expect("config");
    assert_eq!(keys, "config: GREETING");
    let text = browser.eval("document.body.innerText").await.expect("text");
    assert!(text.as_str().expect("text").contains("API_KEY"), "secret names show");
    assert!(!text.as_str().expect("text").contains(SECRET), "secret values never do");

    browser.open(&format!("http://{}/apps/nope?token={TOKEN}", r.addr)).await.expect("missing app");
    let error = browser.eval("document.getElementById('error').textContent").await.expect("error");
    assert!(error.as_str().expect("text").contains("nope"), "{error}");
}
