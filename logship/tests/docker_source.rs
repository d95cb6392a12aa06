//! The Docker source against a private dockerd the test starts itself (never the
//! machine's): a container writing across json-file rotation, the source dropped and
//! started again from its checkpoint, and the daemon restarted under it. Every line of
//! every run arrives, in order, once.
#![cfg(feature = "docker")]

use std::time::{Duration, Instant};

use keelson_logship::{DockerSource, DockerSourceConfig, Source};
use keelson_testkit::dockerd::PrivateDockerd;

/// Lines read so far: per run of the container (in the order runs first showed), its
/// sequence numbers in arrival order.
type Seen = Vec<(String, Vec<u64>)>;

/// Reads (acknowledging every read) until `done` says so, failing after `limit`.
async fn read_until(source: &mut DockerSource, seen: &mut Seen, acked: &mut u64, limit: Duration, done: impl Fn(&Seen) -> bool) {
    let deadline = Instant::now() + limit;
    while !done(seen) {
        assert!(Instant::now() < deadline, "timed out; seen {:?}", seen.iter().map(|(r, s)| (r, s.len(), s.last())).collect::<Vec<_>>());
        let mut batch = Vec::new();
        let Ok(read) = tokio::time::timeout(Duration::from_millis(500), source.read(&mut batch, 500)).await else { continue };
        let n = read.expect("read");
        for r in batch {
            assert_eq!(r.service(), "chat", "service from the app label");
            assert!(r.labels.container.is_some() && r.labels.image.is_some());
            let (run, seq) = r.line.split_once(' ').expect("run seq");
            let seq = seq.trim_start_matches("seq=").split(' ').next().unwrap_or_default();
            let seq = seq.parse().unwrap_or_else(|_| panic!("a number in {:?}", r.line));
            match seen.iter_mut().find(|(known, _)| known == run) {
                Some((_, seqs)) => seqs.push(seq),
                None => seen.push((run.to_owned(), vec![seq])),
            }
        }
        *acked += n as u64;
        source.ack(*acked).await.expect("ack");
    }
}

fn contiguous(seqs: &[u64]) -> bool {
    seqs.iter().enumerate().all(|(i, s)| *s == i as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_logs_survive_rotation_a_source_restart_and_a_daemon_restart() {
    let image = keelson_testkit::docker::busybox_image().unwrap_or_else(|e| panic!("the busybox test image: {e}"));
    let mut dockerd = PrivateDockerd::start().unwrap_or_else(|e| panic!("a private dockerd: {e}"));
    dockerd.load_image(&image).expect("image into the private daemon");
    // About 200 lines a second of 60 bytes: json-file rotates every 2 s or so.
    let script = "run=$(cat /proc/sys/kernel/random/uuid); i=0; while true; do echo \"$run seq=$i padding-padding-padding\"; i=$((i+1)); usleep 5000; done";
    let id = dockerd
        .docker(&[
            "run",
            "-d",
            "--network",
            "none",
            "--restart",
            "always",
            "--label",
            "app=chat",
            "--log-opt",
            "max-size=20k",
            "--log-opt",
            "max-file=5",
            &image,
            "sh",
            "-c",
            script,
        ])
        .expect("container starts");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = || {
        let mut c = DockerSourceConfig::default();
        c.socket = dockerd.socket();
        c.label_filter = vec!["app=chat".into()];
        c.service_label = Some("app".into());
        c.checkpoints = Some(dir.path().join("docker.json"));
        c.idle_reconnect = Duration::from_secs(2);
        c.rescan = Duration::from_millis(500);
        c
    };
    let mut seen = Seen::new();
    let mut acked = 0;
    let mut source = DockerSource::start(config()).expect("source");
    // Past several rotations.
    read_until(&mut source, &mut seen, &mut acked, Duration::from_secs(60), |s| s.iter().any(|(_, v)| v.len() >= 1200)).await;
    // A crash of the shipper: the next one resumes at its checkpoint.
    drop(source);
    std::thread::sleep(Duration::from_millis(1500));
    let mut source = DockerSource::start(config()).expect("source again");
    acked = 0;
    read_until(&mut source, &mut seen, &mut acked, Duration::from_secs(60), |s| s.iter().any(|(_, v)| v.len() >= 1800)).await;
    // The daemon stops (the container with it) and comes back (the container restarts).
    dockerd.restart().expect("dockerd restarts");
    read_until(&mut source, &mut seen, &mut acked, Duration::from_secs(90), |s| s.len() >= 2 && s.iter().all(|(_, v)| v.len() >= 100))
        .await;
    drop(source);
    let logs = dockerd.docker(&["logs", id.trim()]).expect("docker logs");
    for (run, seqs) in &seen {
        assert!(
            contiguous(seqs),
            "run {run}: every line once, in order; got {} lines, first gaps at {:?}",
            seqs.len(),
            seqs.windows(2).find(|w| w[1] != w[0] + 1)
        );
    }
    // The run the daemon stopped: its last line (per the engine) arrived.
    let (first_run, got) = &seen[0];
    let last_written: u64 = logs
        .lines()
        .rev()
        .find(|l| l.starts_with(first_run.as_str()))
        .and_then(|l| l.split_once("seq="))
        .and_then(|(_, s)| s.split(' ').next()?.parse().ok())
        .expect("the engine still has the first run's last line");
    assert_eq!(got.last().copied(), Some(last_written), "the first run's last line before the daemon stopped arrived");
}
