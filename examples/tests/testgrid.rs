//! `testgrid` end to end on the Docker Engine here, on a fixture suite
//! (`tests/fixtures/testgrid`: a module that passes, one that fails, one that times out,
//! one that prints 20,000 lines, one changed in the last commit) in a git repository
//! made for the test: `full` builds and tests the baseline and runs every module from
//! the snapshot; the report is checked as data, as JUnit XML (parsed) and in a real
//! browser (chromium, over the DevTools protocol: it renders, the counts match, a click
//! on the failed test's row shows its stderr); `quick --changed-since` runs only the
//! changed module from the reused snapshot; `quick` with a changed recipe fails clearly.
//! Images and containers it made are removed at the end, also when it fails.
#![cfg(feature = "docker")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/testgrid");

/// Removes what testgrid left on the engine (snapshot and suite images, any container of
/// its nodes), even when the test fails.
struct EngineCleanup;

impl Drop for EngineCleanup {
    fn drop(&mut self) {
        for id in keelson_testkit::docker::containers(&["label=keelson.run"]) {
            let _ = Command::new("docker").args(["rm", "-f", &id]).output();
        }
        let images = Command::new("docker").args(["images", "-q", "--filter", "label=keelson.testgrid"]).output();
        if let Ok(out) = images {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("docker").args(["rmi", "-f", id]).output();
            }
        }
    }
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.email=testgrid@keelson.test", "-c", "user.name=testgrid"])
        .args(args)
        .output()
        .expect("git");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn testgrid(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_testgrid")).args(args).output().expect("testgrid runs")
}

fn report(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join(".testgrid/report/report.json")).expect("report.json");
    serde_json::from_str(&text).expect("report parses")
}

fn by_name<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["tests"].as_array().expect("tests").iter().find(|t| t["name"] == name).unwrap_or_else(|| panic!("no test {name}"))
}

fn explain(out: &Output) -> String {
    format!("status {:?}\nstdout:\n{}\nstderr:\n{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testgrid_runs_a_suite_in_parallel_from_a_snapshot_and_reports_every_test() {
    keelson_testkit::docker::engine_version().expect("Docker Engine answers");
    let busybox = keelson_testkit::docker::busybox_image().expect("busybox image");
    let _cleanup = EngineCleanup;
    let work = tempfile::tempdir().expect("dir");
    let suite: PathBuf = work.path().join("suite");
    keelson_testkit::copy_dir(Path::new(FIXTURE), &suite).expect("fixture");
    let dockerfile = suite.join("baseline/Dockerfile");
    let recipe = std::fs::read_to_string(&dockerfile).expect("Dockerfile").replace("@BUSYBOX@", &busybox);
    std::fs::write(&dockerfile, &recipe).expect("Dockerfile");
    git(&suite, &["init", "-q"]);
    git(&suite, &["add", "-A"]);
    git(&suite, &["commit", "-qm", "the suite"]);
    let path = suite.to_str().expect("utf-8 path");

    // full: the baseline is built and tested, then every module runs from it.
    let full_run = testgrid(&["full", path, "--workers", "4"]);
    let out = &full_run;
    assert_eq!(out.status.code(), Some(1), "a failed and a timed-out test make exit status 1\n{}", explain(out));
    let full = report(&suite);
    assert_eq!(full["baseline"]["status"]["status"], "passed", "{}", full["baseline"]);
    assert_eq!(full["baseline"]["stdout"]["text"], "baseline provisioned");
    assert_eq!(by_name(&full, "passes")["status"]["status"], "passed");
    assert_eq!(by_name(&full, "passes")["stdout"]["text"], "passes sees its own files", "the module's own folder is its working directory");
    let fails = by_name(&full, "fails");
    assert_eq!(fails["status"], serde_json::json!({"status": "failed", "code": 3}));
    assert_eq!(fails["stdout"]["text"], "checking the configuration", "stdout and stderr are kept apart");
    assert_eq!(fails["stderr"]["text"], "config error: /etc/app.conf is missing");
    let slow = by_name(&full, "times-out");
    assert_eq!(slow["status"]["status"], "timed_out");
    assert!(slow["seconds"].as_f64().expect("seconds") < 20.0, "stopped near its 2 s limit, not at the 60 s sleep: {slow}");
    // Every line comes from the log server: far more than the run result's 1000-line tail.
    let chatty = by_name(&full, "chatty");
    assert_eq!(chatty["status"]["status"], "passed");
    assert_eq!(chatty["stdout"]["lines"], 20_000);
    assert!(chatty["truncation"].is_null(), "nothing is missing: {}", chatty["truncation"]);
    let whole = std::fs::read_to_string(suite.join(".testgrid/report/logs/chatty.stdout.txt")).expect("whole stdout");
    assert_eq!(whole.lines().count(), 20_000);
    assert!(whole.starts_with("chatty line 0: ") && whole.ends_with("chatty line 19999: the quick brown fox jumps over the lazy dog"));
    let html = std::fs::read_to_string(suite.join(".testgrid/report/report.html")).expect("report.html");
    assert!(html.contains("are not on this page: the whole stdout is in <a href=\"logs/chatty.stdout.txt\">"), "the page says what it cut");

    // JUnit XML, parsed.
    let junit = std::fs::read_to_string(suite.join(".testgrid/report/junit.xml")).expect("junit.xml");
    let doc = roxmltree::Document::parse(&junit).expect("junit.xml is well-formed XML");
    let suite_el = doc.descendants().find(|n| n.has_tag_name("testsuite")).expect("a testsuite");
    assert_eq!(suite_el.attribute("tests"), Some("6"), "five modules and the baseline");
    assert_eq!(suite_el.attribute("failures"), Some("2"));
    let case = |name: &str| doc.descendants().find(|n| n.has_tag_name("testcase") && n.attribute("name") == Some(name)).expect(name);
    let failure = case("fails").children().find(|n| n.has_tag_name("failure")).expect("fails has a failure");
    assert_eq!(failure.attribute("message"), Some("exit code 3"));
    let err = case("fails").children().find(|n| n.has_tag_name("system-err")).and_then(|n| n.text());
    assert_eq!(err, Some("config error: /etc/app.conf is missing"));
    let timeout = case("times-out").children().find(|n| n.has_tag_name("failure")).expect("times-out has a failure");
    assert_eq!(timeout.attribute("type"), Some("timeout"));
    assert!(case("passes").children().all(|n| !n.has_tag_name("failure")));

    // The page in a real browser.
    let mut browser = keelson_testkit::chromium::Chromium::start().await.expect("chromium");
    browser.open(&format!("file://{}", suite.join(".testgrid/report/report.html").display())).await.expect("the report opens");
    for (id, want) in [("count-total", "5"), ("count-passed", "3"), ("count-failed", "1"), ("count-timed-out", "1"), ("count-skipped", "0")]
    {
        let got = browser.eval(&format!("document.getElementById('{id}').textContent")).await.expect("count");
        assert_eq!(got, want, "{id} as rendered");
    }
    let visible_stderr = "(() => { const pre = document.querySelector('#output-fails pre.stderr'); \
                          return pre && pre.offsetParent !== null ? pre.innerText : null; })()";
    assert_eq!(browser.eval(visible_stderr).await.expect("eval"), Value::Null, "output is folded until clicked");
    browser.eval("document.querySelector('tr.test[data-test=\"fails\"]').click()").await.expect("click");
    let shown = browser.eval(visible_stderr).await.expect("eval");
    assert_eq!(shown, "config error: /etc/app.conf is missing", "a click on the failed row shows its stderr");
    drop(browser);

    // One module changes in a new commit: quick mode runs only it, from the reused snapshot.
    std::fs::write(suite.join("modules/changed/test.sh"), "echo \"changed: second version\"\n").expect("edit");
    git(&suite, &["commit", "-qam", "change one module"]);
    let out = testgrid(&["quick", path, "--changed-since", "HEAD~1"]);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let quick = report(&suite);
    let names: Vec<&str> = quick["tests"].as_array().expect("tests").iter().filter_map(|t| t["name"].as_str()).collect();
    assert_eq!(names, ["changed"]);
    assert_eq!(by_name(&quick, "changed")["stdout"]["text"], "changed: second version");
    assert!(quick["snapshot_note"].as_str().expect("note").starts_with("reused"), "{}", quick["snapshot_note"]);
    assert_eq!(quick["snapshot"], full["snapshot"]);
    assert_eq!(quick["baseline"]["status"]["status"], "passed", "the baseline's result is remembered from the full run");
    assert_eq!(quick["selection"], "1 of 5 modules changed since HEAD~1");
    // That run passed whole: `last` starts from it, and nothing changed since.
    let out = testgrid(&["quick", path, "--changed-since", "last"]);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    assert_eq!(report(&suite)["tests"].as_array().map(Vec::len), Some(0));

    // An image given as the baseline (what a pipeline does with its fresh build): the
    // modules run from it, no recipe is built.
    let snapshot = full["snapshot"].as_str().expect("snapshot").to_owned();
    let out = testgrid(&["full", path, "--image", &snapshot, "--changed-since", "HEAD~1"]);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let given = report(&suite);
    assert_eq!(given["snapshot"], snapshot.as_str());
    assert_eq!(given["snapshot_note"], "the given image, used as it is");
    assert_eq!(given["baseline"]["status"]["status"], "passed");
    assert_eq!(by_name(&given, "changed")["status"]["status"], "passed");

    // A changed recipe has no snapshot yet: quick says so and runs nothing.
    std::fs::write(&dockerfile, format!("{recipe}RUN echo again > /opt/app/again\n")).expect("edit recipe");
    let out = testgrid(&["quick", path]);
    assert_eq!(out.status.code(), Some(2), "{}", explain(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no baseline snapshot testgrid-baseline:") && stderr.contains("testgrid full"), "{stderr}");

    // A bad manifest is one clear line, exit 2.
    std::fs::write(suite.join("modules/passes/test.toml"), "time_limit = \"forever\"\n").expect("bad manifest");
    let out = testgrid(&["quick", path]);
    assert_eq!(out.status.code(), Some(2), "{}", explain(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("modules/passes/test.toml") && stderr.contains("forever"), "{stderr}");

    // Nothing of testgrid's nodes is left on the engine.
    let node = by_name(&full, "passes")["node"].as_str().expect("node").to_owned();
    let left = Command::new("docker")
        .args(["ps", "-a", "--filter", &format!("label=keelson.node={node}"), "--format", "{{.Names}} {{.Status}} {{.Labels}}"])
        .output()
        .expect("docker ps");
    let left = String::from_utf8_lossy(&left.stdout);
    assert!(left.trim().is_empty(), "testgrid removed its tests' containers; left:\n{left}\nthe full run:\n{}", explain(&full_run));
}
