//! `pipeline` end to end with the real binaries: etcd, keelson's registry (basic auth),
//! logd, two node agents in network namespaces acting as hosts (their tasks on keelson's
//! overlay), edge on the first host following the catalog, and the pipeline watching a
//! bare repository (`support/pipeline_stack.rs`). An application
//! (`tests/fixtures/pipeline-app`: busybox httpd serving a page, a testgrid suite,
//! `keelson.json`) is pushed commit by commit: v1 is built, tested, pushed, deployed and
//! served through edge by name; v2 rolls out while a client calls through edge the whole
//! time and sees no failed request; a commit whose test fails deploys nothing; a commit
//! whose health check fails is rolled back by the controller; a stop-first update keeps
//! each task on its host at its overlay address; one that may not use a host moves its
//! tasks, their addresses change and edge follows. The status endpoint and logd show
//! every run. Processes, containers, images and namespaces go at the end, also when the
//! test fails.
#![cfg(all(feature = "etcd", feature = "docker"))]

#[path = "support/pipeline_stack.rs"]
mod pipeline_stack;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keelson_scheduler::{AllocStatus, ClusterStore};
use pipeline_stack::{Hosts, Stack};

fn bin(name: &str) -> PathBuf {
    PathBuf::from(match name {
        "registry" => env!("CARGO_BIN_EXE_registry"),
        "logd" => env!("CARGO_BIN_EXE_logd"),
        "node-agent" => env!("CARGO_BIN_EXE_node-agent"),
        "edge" => env!("CARGO_BIN_EXE_edge"),
        "pipeline" => env!("CARGO_BIN_EXE_pipeline"),
        "keelson-ctl" => env!("CARGO_BIN_EXE_keelson-ctl"),
        "testgrid" => env!("CARGO_BIN_EXE_testgrid"),
        other => panic!("no binary {other} in this test"),
    })
}

fn steps(run: &serde_json::Value) -> Vec<&str> {
    run["steps"].as_array().expect("steps").iter().filter_map(|s| s["name"].as_str()).collect()
}

/// The running allocations of `version` of the app, by slot: (node, overlay address).
async fn slots(store: &ClusterStore, version: u64) -> std::collections::BTreeMap<u32, (String, String)> {
    let view = store.view().await.expect("view");
    view.allocations
        .iter()
        .filter(|a| a.job == "shop" && a.version == version && a.status == AllocStatus::Running)
        .map(|a| {
            let address = a.address.map(|ip| ip.to_string()).unwrap_or_default();
            (a.slot.expect("a slot"), (a.node.clone(), address))
        })
        .collect()
}

/// Rewrites the strategy (and the constraints) of the app's `keelson.json`.
fn set_deploy(stack: &Stack, strategy: serde_json::Value, constraints: serde_json::Value) {
    let file = stack.work.join("keelson.json");
    let mut deploy: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).expect("keelson.json")).expect("json");
    deploy["strategy"] = strategy;
    deploy["group"]["desired"]["constraints"] = constraints;
    std::fs::write(&file, serde_json::to_string_pretty(&deploy).expect("json")).expect("keelson.json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_are_built_tested_pushed_deployed_and_served_and_bad_ones_stop_or_roll_back() {
    let stack = Stack::start(&bin, Hosts::Overlay(2));
    let kv = keelson_discovery::EtcdKv::connect(keelson_discovery::EtcdConfig::new([stack.etcd_url.clone()])).await.expect("etcd");
    let store = ClusterStore::new(Arc::new(kv), "keelson/cluster");

    // v1: built, tested, pushed, deployed, served by name.
    let pushed = Instant::now();
    stack.push("v1");
    let run = stack.ended("shop-1").await;
    assert_eq!(run["outcome"], "deployed", "{run}");
    assert_eq!(steps(&run), ["build", "test", "push", "deploy"]);
    assert!(run["image"].as_str().expect("image").starts_with(&format!("{}/shop:", stack.registry)));
    stack.until_served("v1", Duration::from_secs(60)).await;
    eprintln!("v1 served {:.1} s after the push", pushed.elapsed().as_secs_f64());

    // A client through edge from here on: no request may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let client = tokio::spawn({
        let (stop, ok, failed, edge) = (stop.clone(), ok.clone(), failed.clone(), stack.edge);
        async move {
            while !stop.load(Ordering::Relaxed) {
                match keelson_testkit::http::get(edge, "shop.test", "/").await {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });

    // v2 rolls out.
    std::fs::write(stack.work.join("www/index.html"), "v2\n").expect("v2");
    stack.push("v2");
    let run = stack.ended("shop-2").await;
    assert_eq!(run["outcome"], "deployed", "{run}");
    assert_eq!(run["version"], 2);
    stack.until_served("v2", Duration::from_secs(30)).await;

    // A failing test: nothing is pushed or deployed.
    std::fs::write(stack.work.join("www/index.html"), "broken page\n").expect("v3");
    stack.push("v3 breaks the content test");
    let run = stack.ended("shop-3").await;
    assert_eq!(run["outcome"], "tests_failed", "{run}");
    assert_eq!(steps(&run), ["build", "test"], "no push, no deploy");
    assert!(run["version"].is_null());
    assert_eq!(stack.served().await.as_deref(), Some("v2"));

    // A failing health check: deployed, then rolled back by the controller.
    std::fs::write(stack.work.join("www/index.html"), "v4\n").expect("v4");
    std::fs::remove_file(stack.work.join("www/health")).expect("no health");
    stack.push("v4 has no health endpoint");
    let run = stack.ended("shop-4").await;
    assert_eq!(run["outcome"], "rolled_back", "{run}");
    assert_eq!(run["version"], 3, "the version after the stable one: the failed test deployed nothing");
    assert_eq!(stack.served().await.as_deref(), Some("v2"));

    // A stop-first update (max surge 0): each slot's task is stopped, then its
    // replacement goes back to the same host and gets the same overlay address.
    let before = slots(&store, 2).await;
    assert_eq!(before.len(), 2, "v2 runs twice: {before:?}");
    assert!(before.values().all(|(_, ip)| ip.starts_with("10.247.")), "on the overlay: {before:?}");
    let stop_first = serde_json::json!({"kind": "rolling", "max_surge": 0, "max_unavailable": 1});
    set_deploy(&stack, stop_first.clone(), serde_json::json!([]));
    std::fs::write(stack.work.join("www/index.html"), "v5\n").expect("v5");
    std::fs::write(stack.work.join("www/health"), "ok\n").expect("health");
    stack.push("v5, stop-first");
    let run = stack.ended("shop-5").await;
    assert_eq!(run["outcome"], "deployed", "{run}\n{}", stack.agent_logs());
    assert_eq!(run["version"], 4);
    stack.until_served("v5", Duration::from_secs(30)).await;
    let after = slots(&store, 4).await;
    assert_eq!(after, before, "every slot on its host at its address\n{}", stack.agent_logs());

    // A host the app may no longer use: its slot moves to the other host, on that host's
    // subnet, and edge follows the new address through the catalog.
    let (left, _) = before.values().next().expect("a slot").clone();
    let not_left = serde_json::json!([{"target": "node.id", "op": "!=", "value": left}]);
    set_deploy(&stack, stop_first, not_left);
    std::fs::write(stack.work.join("www/index.html"), "v6\n").expect("v6");
    stack.push("v6, off one host");
    let run = stack.ended("shop-6").await;
    assert_eq!(run["outcome"], "deployed", "{run}");
    stack.until_served("v6", Duration::from_secs(30)).await;
    let moved = slots(&store, 5).await;
    assert_eq!(moved.len(), 2, "{moved:?}");
    for (slot, (node, ip)) in &moved {
        assert_ne!(node, &left, "slot {slot} left the host");
        let (was_on, had) = &before[slot];
        if was_on == &left {
            assert_ne!(ip, had, "slot {slot} moved host: another subnet, another address");
        } else {
            assert_eq!(ip, had, "slot {slot} stayed on its host and kept its address");
        }
    }

    stop.store(true, Ordering::Relaxed);
    client.await.expect("client");
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 100, "the client kept calling: {ok}");
    assert_eq!(failed, 0, "{failed} of {} requests through edge failed during the rollouts", ok + failed);

    // keelson-ctl shows the runs, as a table and as JSON.
    let ctl = |args: &[&str]| {
        let out =
            std::process::Command::new(bin("keelson-ctl")).arg("--etcd").arg(&stack.etcd_url).args(args).output().expect("keelson-ctl");
        assert!(out.status.success(), "keelson-ctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listed: Vec<serde_json::Value> = serde_json::from_str(&ctl(&["--json", "pipeline", "shop"])).expect("runs as JSON");
    let outcomes: Vec<&str> = listed.iter().filter_map(|r| r["outcome"].as_str()).collect();
    assert_eq!(outcomes, ["deployed", "deployed", "tests_failed", "rolled_back", "deployed", "deployed"]);
    assert!(listed.iter().all(|r| r["log_lines_undelivered"] == 0), "logd took every run's log: {listed:?}");
    let table = ctl(&["pipeline"]);
    assert!(table.contains("shop-3") && table.contains("tests_failed") && table.contains("test FAILED"), "{table}");

    // Every run's log is in logd.
    let query =
        keelson_examples::logs_client::LogQuery { service: "pipeline.shop".into(), instance: Some("shop-3".into()), ..Default::default() };
    let lines = keelson_examples::logs_client::fetch_records(&query, &format!("http://{}", stack.logd), Some(&stack.logd_token))
        .await
        .expect("logd");
    let text: Vec<String> = lines.iter().map(|r| r.line.clone()).collect();
    assert!(text.iter().any(|l| l.contains("test content: failed")), "{text:?}");
    assert!(
        !std::fs::read_to_string(stack.logs.join("pipeline.log")).unwrap_or_default().contains("ci-pw"),
        "the password stays out of logs"
    );

    // testgrid on the same cluster: its tests are one-off runs placed on the node agent,
    // their whole output read back from the logd the agent ships to.
    let suite = stack.work.parent().expect("dir").join("grid");
    keelson_testkit::copy_dir(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/testgrid")), &suite)
        .expect("fixture");
    let busybox = keelson_testkit::docker::busybox_image().expect("busybox image");
    let recipe = std::fs::read_to_string(suite.join("baseline/Dockerfile")).expect("Dockerfile").replace("@BUSYBOX@", &busybox);
    std::fs::write(suite.join("baseline/Dockerfile"), recipe).expect("Dockerfile");
    let out = std::process::Command::new(bin("testgrid"))
        .args(["full", suite.to_str().expect("utf8"), "--workers", "2", "--etcd", &stack.etcd_url])
        .args(["--logd", &format!("http://{}", stack.logd), "--logd-token-file", stack.logd_token_file.to_str().expect("utf8")])
        .args(["--push-to", &stack.registry, "--registry-auth-file", stack.registry_creds.to_str().expect("utf8")])
        .output()
        .expect("testgrid");
    assert_eq!(out.status.code(), Some(1), "a failed and a timed-out test\n{}", String::from_utf8_lossy(&out.stderr));
    // The baseline and suite images went to the registry, where nodes with engines of
    // their own pull them from (the agents have its credentials).
    let registry: std::net::SocketAddr = stack.registry.parse().expect("registry");
    let basic = [("authorization", "Basic Y2k6Y2ktcHc=")]; // ci:ci-pw
    for repository in ["testgrid-baseline", "testgrid-suite"] {
        let tags = keelson_testkit::http::request(registry, "GET", &stack.registry, &format!("/v2/{repository}/tags/list"), &basic)
            .await
            .expect("registry");
        assert_eq!(tags.status, 200, "{repository}: {}", tags.body);
        let tags: serde_json::Value = serde_json::from_str(&tags.body).expect("json");
        assert_eq!(tags["tags"].as_array().map(Vec::len), Some(1), "{repository}: {tags}");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(suite.join(".testgrid/report/report.json")).expect("report")).expect("json");
    let tests = report["tests"].as_array().expect("tests");
    assert!(
        tests.iter().all(|t| stack.nodes.iter().any(|n| t["node"] == n.as_str())),
        "every test ran on one of the cluster's nodes: {tests:?}"
    );
    let chatty = tests.iter().find(|t| t["name"] == "chatty").expect("chatty");
    assert_eq!(chatty["stdout"]["lines"], 20_000, "the whole output, from the cluster's logd");
    let fails = tests.iter().find(|t| t["name"] == "fails").expect("fails");
    assert_eq!(fails["stderr"]["text"], "config error: /etc/app.conf is missing");
}
