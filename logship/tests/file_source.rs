//! The file source: conformance, checkpoints, rotation by rename and copytruncate,
//! truncation, deletion while open, over-long lines.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use keelson_logship::{conformance, FileSource, FileSourceConfig, Record, Source, StartAt, Stream};

fn config(include: &[&Path]) -> FileSourceConfig {
    let mut c = FileSourceConfig::new(include.iter().map(|p| p.display().to_string()));
    c.poll = Duration::from_millis(10);
    c.close_idle = Duration::from_millis(100);
    c
}

fn append(path: &Path, lines: impl IntoIterator<Item = String>) {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("open for append");
    for l in lines {
        writeln!(f, "{l}").expect("write");
    }
}

fn numbered(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}-{i}")).collect()
}

/// Reads until `want` records came (acknowledging each read), or fails after 10 s.
async fn read_n(source: &mut FileSource, want: usize) -> Vec<String> {
    let mut got = Vec::new();
    let mut seen = source.stats().handed_out;
    tokio::time::timeout(Duration::from_secs(10), async {
        while got.len() < want {
            let mut batch = Vec::new();
            let n = source.read(&mut batch, want - got.len()).await.expect("read");
            assert!(n > 0, "a tailing source does not end");
            seen += n as u64;
            source.ack(seen).await.expect("ack");
            got.extend(batch.into_iter().map(|r: Record| r.line));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {} of {want} lines came: {:?}", got.len(), got.last()));
    got
}

/// Nothing more arrives within `wait`.
async fn assert_quiet(source: &mut FileSource, wait: Duration) {
    let mut batch = Vec::new();
    if let Ok(n) = tokio::time::timeout(wait, source.read(&mut batch, 100)).await {
        panic!("expected nothing more, got {:?} ({n:?})", batch.iter().map(|r| &r.line).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn file_source_passes_source_conformance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("conf-svc.log");
    let lines = numbered("line", 0..30);
    append(&path, lines.clone());
    let expected: Vec<Record> = lines.iter().map(|l| Record::now("conf-svc", "i1", Stream::Stdout, l.clone())).collect();
    let mut c = config(&[&path]);
    c.labels = keelson_logship::Labels::new("conf-svc", "i1");
    c.stop_at_eof = true;
    let mut source = FileSource::new(c.clone()).expect("source");
    assert!(!source.capabilities().checkpoints && source.capabilities().pauses);
    conformance::source_all(&mut source, &expected).await;

    c.checkpoints = Some(dir.path().join("state/files.json"));
    let open = move || -> Box<dyn Source> { Box::new(FileSource::new(c.clone()).expect("source")) };
    conformance::source_resumes_after_its_checkpoint(&open, &expected).await;
}

#[tokio::test]
async fn labels_name_the_service_and_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("billing.2026.log");
    append(&path, ["one".to_owned()]);
    let mut c = config(&[&path]);
    c.stop_at_eof = true;
    let mut source = FileSource::new(c).expect("source");
    let mut batch = Vec::new();
    source.read(&mut batch, 10).await.expect("read");
    assert_eq!(batch[0].service(), "billing", "service from the name up to its first dot");
    assert_eq!(batch[0].labels.extra.get("file").map(String::as_str), Some(path.to_str().expect("utf-8")));
}

#[tokio::test]
async fn rotation_by_rename_loses_nothing_and_repeats_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = dir.path().join("app.log");
    append(&live, numbered("a", 0..100));
    let mut source = FileSource::new(config(&[&live])).expect("source");
    assert_eq!(read_n(&mut source, 50).await, numbered("a", 0..50));
    // The writer's file is renamed; the writer adds to it before it reopens, then
    // writes to a new file at the old path.
    let rotated = dir.path().join("app.log.1");
    std::fs::rename(&live, &rotated).expect("rename");
    append(&rotated, numbered("a", 100..120));
    append(&live, numbered("b", 0..30));
    let got = read_n(&mut source, 100).await;
    let (old, new): (Vec<String>, Vec<String>) = got.into_iter().partition(|l| l.starts_with("a-"));
    assert_eq!(old, numbered("a", 50..120), "the renamed file is read to its end");
    assert_eq!(new, numbered("b", 0..30), "the new file from its start");
    assert_quiet(&mut source, Duration::from_millis(300)).await;
    assert_eq!(source.open_files(), vec![live.clone()], "the rotated file is closed once read, acknowledged and idle");
}

#[tokio::test]
async fn a_rotated_file_matched_by_the_pattern_is_not_read_twice_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = dir.path().join("app.log");
    let pattern = dir.path().join("app.log*");
    let mut c = config(&[&pattern]);
    c.checkpoints = Some(dir.path().join("files.json"));
    append(&live, numbered("a", 0..40));
    {
        let mut source = FileSource::new(c.clone()).expect("source");
        assert_eq!(read_n(&mut source, 40).await, numbered("a", 0..40));
    }
    // Rotated while the shipper was down, and more written to both.
    std::fs::rename(&live, dir.path().join("app.log.1")).expect("rename");
    append(&dir.path().join("app.log.1"), numbered("a", 40..45));
    append(&live, numbered("b", 0..10));
    let mut source = FileSource::new(c).expect("source");
    let mut got = read_n(&mut source, 15).await;
    got.sort();
    let mut want = [numbered("a", 40..45), numbered("b", 0..10)].concat();
    want.sort();
    assert_eq!(got, want, "the rotated file resumes at its checkpoint under its new name");
    assert_quiet(&mut source, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn copytruncate_reads_the_copy_from_where_the_original_was() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = dir.path().join("app.log");
    let pattern = dir.path().join("app.log*");
    append(&live, numbered("a", 0..60));
    let mut source = FileSource::new(config(&[&pattern])).expect("source");
    assert_eq!(read_n(&mut source, 60).await, numbered("a", 0..60));
    // Written after the last read, then copied and truncated (logrotate copytruncate).
    append(&live, numbered("a", 60..70));
    std::fs::copy(&live, dir.path().join("app.log.1")).expect("copy");
    std::fs::OpenOptions::new().write(true).open(&live).expect("open").set_len(0).expect("truncate");
    append(&live, numbered("b", 0..5));
    let got = read_n(&mut source, 15).await;
    let (old, new): (Vec<String>, Vec<String>) = got.into_iter().partition(|l| l.starts_with("a-"));
    assert_eq!(old, numbered("a", 60..70), "the lines written before the copy come from the copy, once");
    assert_eq!(new, numbered("b", 0..5));
    assert_quiet(&mut source, Duration::from_millis(300)).await;
    assert!(source.stats().truncated >= 1);
}

#[tokio::test]
async fn a_truncated_file_is_read_again_from_its_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = dir.path().join("app.log");
    append(&live, numbered("a", 0..20));
    let mut source = FileSource::new(config(&[&live])).expect("source");
    assert_eq!(read_n(&mut source, 20).await, numbered("a", 0..20));
    std::fs::OpenOptions::new().write(true).open(&live).expect("open").set_len(0).expect("truncate");
    append(&live, numbered("b", 0..3));
    assert_eq!(read_n(&mut source, 3).await, numbered("b", 0..3));
    assert_eq!(source.stats().truncated, 1);
}

#[tokio::test]
async fn a_file_deleted_while_open_is_read_to_its_end_then_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = dir.path().join("app.log");
    append(&live, numbered("a", 0..30));
    let mut source = FileSource::new(config(&[&live])).expect("source");
    assert_eq!(read_n(&mut source, 10).await, numbered("a", 0..10));
    // Deleted with a writer still holding it, which writes once more.
    let mut writer = std::fs::OpenOptions::new().append(true).open(&live).expect("open");
    std::fs::remove_file(&live).expect("delete");
    writeln!(writer, "a-30").expect("write");
    drop(writer);
    assert_eq!(read_n(&mut source, 21).await, numbered("a", 10..31));
    assert_quiet(&mut source, Duration::from_millis(300)).await;
    assert!(source.open_files().is_empty(), "closed: {:?}", source.open_files());
    assert_eq!(source.stats().closed, 1);
}

#[tokio::test]
async fn a_new_file_on_a_reused_inode_does_not_inherit_the_old_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = dir.path().join("app.log");
    let mut c = config(&[&live]);
    c.checkpoints = Some(dir.path().join("files.json"));
    append(&live, numbered("old", 0..100));
    {
        let mut source = FileSource::new(c.clone()).expect("source");
        read_n(&mut source, 100).await;
    }
    std::fs::remove_file(&live).expect("delete");
    append(&live, numbered("new", 0..10));
    let mut source = FileSource::new(c).expect("source");
    assert_eq!(read_n(&mut source, 10).await, numbered("new", 0..10), "keyed by content, not by inode or path");
}

#[tokio::test]
async fn start_at_end_skips_what_exists_but_not_new_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pattern = dir.path().join("*.log");
    append(&dir.path().join("a.log"), numbered("old", 0..10));
    let mut c = config(&[&pattern]);
    c.start_at = StartAt::End;
    let mut source = FileSource::new(c).expect("source");
    assert_quiet(&mut source, Duration::from_millis(100)).await;
    append(&dir.path().join("a.log"), numbered("a", 0..2));
    append(&dir.path().join("b.log"), numbered("b", 0..2));
    let mut got = read_n(&mut source, 4).await;
    got.sort();
    assert_eq!(got, ["a-0", "a-1", "b-0", "b-1"]);
}

#[tokio::test]
async fn over_long_lines_come_in_pieces_and_bad_settings_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = dir.path().join("app.log");
    let big = "z".repeat(1 << 20);
    append(&live, [big.clone(), "after".to_owned()]);
    let mut c = config(&[&live]);
    c.stop_at_eof = true;
    let mut source = FileSource::new(c).expect("source");
    let mut batch = Vec::new();
    while source.read(&mut batch, 1000).await.expect("read") > 0 {}
    let pieces = batch.len() - 1;
    assert_eq!(pieces, 16, "1 MiB in 64 KiB pieces");
    assert!(batch[..pieces - 1].iter().all(|r| r.partial) && !batch[pieces - 1].partial);
    assert_eq!(batch[..pieces].iter().map(|r| r.line.len()).sum::<usize>(), big.len());
    assert_eq!(batch[pieces].line, "after");
    assert_eq!(source.stats().split, 15);

    let err = FileSource::new(FileSourceConfig::new(["/var/log/[unclosed"])).expect_err("bad glob");
    assert!(err.to_string().contains("[unclosed"), "{err}");
    let err = FileSource::new(FileSourceConfig::new(Vec::<String>::new())).expect_err("no pattern");
    assert!(err.to_string().contains("include"), "{err}");
    let mut c = FileSourceConfig::new([live.display().to_string()]);
    c.checkpoints = Some(dir.path().join("cp.json"));
    std::fs::write(dir.path().join("cp.json"), "{torn").expect("write");
    let err = FileSource::new(c).expect_err("torn checkpoint");
    assert!(err.to_string().contains("cp.json"), "{err}");
}

#[tokio::test]
async fn two_live_files_that_begin_alike_are_both_read_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let banner: Vec<String> = (0..10).map(|i| format!("=== the same banner line {i} of a long shared header ===")).collect();
    let a = dir.path().join("a.log");
    append(&a, banner.iter().cloned().chain(numbered("a", 0..5)));
    let mut source = FileSource::new(config(&[&dir.path().join("*.log")])).expect("source");
    assert_eq!(read_n(&mut source, 15).await.len(), 15);
    let b = dir.path().join("b.log");
    append(&b, banner.iter().cloned().chain(numbered("b", 0..5)));
    let got = read_n(&mut source, 15).await;
    assert_eq!(got.len(), 15, "b.log from its first line, not from where a.log was: {got:?}");
    assert_eq!(got[14], "b-4");
}
