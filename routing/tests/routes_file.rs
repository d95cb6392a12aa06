//! The routes-file source: installs a file, applies only differences on reload, keeps
//! the routes in force when the file breaks, leaves other sources' routes alone, and
//! notices a changed file (also one replaced by rename) without a signal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keelson_routing::{Endpoint, Error, Host, MemoryRouter, Route, RouteChange, Router, RoutesFileSource, SourceStatus};

fn file(routes: &[(&str, &str)], tcp: Option<&str>) -> String {
    let routes: Vec<String> =
        routes.iter().map(|(host, addr)| format!(r#"{{"host": "{host}", "endpoints": [{{"id": "a", "addr": "{addr}"}}]}}"#)).collect();
    let tcp = tcp.map_or_else(String::new, |listen| {
        format!(r#", "tcp": [{{"listen": "{listen}", "endpoints": [{{"id": "db", "addr": "127.0.0.1:5432"}}]}}]"#)
    });
    format!(r#"{{"routes": [{}]{tcp}}}"#, routes.join(", "))
}

fn hosts(router: &MemoryRouter) -> Vec<String> {
    let mut hosts: Vec<String> = router.snapshot().routes().into_iter().map(|r| r.host.to_string()).collect();
    hosts.sort();
    hosts
}

#[tokio::test]
async fn reloads_apply_the_difference_and_a_broken_file_changes_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("routes.json");
    std::fs::write(&path, file(&[("a.test", "127.0.0.1:9001"), ("b.test", "127.0.0.1:9002")], Some("127.0.0.1:15432"))).expect("write");
    let router = Arc::new(MemoryRouter::new());
    // A route another source owns: the file never touches it.
    let other = Route::new(Host::new("discovered.test").expect("host"), vec![Endpoint::new("d", "127.0.0.1:9009".parse().expect("addr"))]);
    router.apply(vec![RouteChange::Upsert(other)]).await.expect("other source");
    let status = SourceStatus::new();
    let mut source = RoutesFileSource::open(&path, router.clone()).await.expect("open").with_status(status.clone());
    assert_eq!(hosts(&router), ["a.test", "b.test", "discovered.test"]);
    let listen: SocketAddr = "127.0.0.1:15432".parse().expect("addr");
    assert_eq!(source.tcp_routers().keys().copied().collect::<Vec<_>>(), [listen]);
    assert_eq!(source.tcp_routers()[&listen].snapshot().len(), 1);

    // One route changed, one removed, one added: three changes, the rest untouched.
    let version = router.snapshot().version();
    std::fs::write(&path, file(&[("a.test", "127.0.0.1:9001"), ("c.test", "127.0.0.1:9003")], Some("127.0.0.1:15432"))).expect("write");
    let done = source.reload().await.expect("reload");
    assert_eq!(done.changes, 2, "c.test added, b.test removed; a.test and the TCP route unchanged");
    assert_eq!(hosts(&router), ["a.test", "c.test", "discovered.test"]);
    assert_eq!(router.snapshot().version(), version + 1, "one batch");

    // A broken file: an error, the routes in force stay, the status says stale.
    std::fs::write(&path, "{\"routes\": [{\"host\": \"x.test\", \"typo\": 1}]}").expect("write");
    assert!(matches!(source.reload().await, Err(Error::InvalidInput { .. })));
    assert_eq!(hosts(&router), ["a.test", "c.test", "discovered.test"]);
    assert!(status.is_stale());

    // A new TCP listen address is reported, not opened.
    std::fs::write(&path, file(&[("a.test", "127.0.0.1:9001")], Some("127.0.0.1:15433"))).expect("write");
    let done = source.reload().await.expect("reload");
    assert_eq!(done.new_listeners, ["127.0.0.1:15433".parse::<SocketAddr>().expect("addr")]);
    assert!(source.tcp_routers()[&listen].snapshot().is_empty(), "the old listener's route left the file");
    assert!(!status.is_stale());
}

#[tokio::test]
async fn a_file_that_does_not_load_installs_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let router = Arc::new(MemoryRouter::new());
    let missing = RoutesFileSource::open(dir.path().join("absent.json"), router.clone()).await.expect_err("missing");
    assert!(matches!(missing, Error::Io { .. }), "{missing:?}");
    let path = dir.path().join("bad.json");
    std::fs::write(&path, r#"{"routes": [{"host": "a.test", "endpoints": [{"id": "a", "addr": "127.0.0.1:1", "weight": 0}]}]}"#)
        .expect("write");
    assert!(matches!(RoutesFileSource::open(&path, router.clone()).await, Err(Error::InvalidInput { .. })));
    assert!(router.snapshot().is_empty());
}

async fn until(router: &MemoryRouter, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while hosts(router) != want {
        assert!(Instant::now() < deadline, "routes never became {want:?}: {:?}", hosts(router));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_watched_file_is_reloaded_when_it_changes_or_is_replaced() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("routes.json");
    std::fs::write(&path, file(&[("a.test", "127.0.0.1:9001")], None)).expect("write");
    let router = Arc::new(MemoryRouter::new());
    let source = RoutesFileSource::open(&path, router.clone()).await.expect("open");
    let watch = source.watch(Duration::from_millis(50)).expect("watch");

    std::fs::write(&path, file(&[("a.test", "127.0.0.1:9001"), ("b.test", "127.0.0.1:9002")], None)).expect("write in place");
    until(&router, &["a.test", "b.test"]).await;

    // An editor's save: a new file renamed over the old one.
    let next = dir.path().join("routes.json.new");
    std::fs::write(&next, file(&[("c.test", "127.0.0.1:9003")], None)).expect("write new");
    std::fs::rename(&next, &path).expect("rename");
    until(&router, &["c.test"]).await;
    watch.abort();
}
