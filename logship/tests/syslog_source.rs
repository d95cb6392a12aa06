//! The syslog receiver: util-linux `logger` and keelson's own sink as real senders;
//! malformed input, binary garbage and 1 MiB messages counted, never a panic; the disk
//! queue resumes after a crash and keeps its byte cap by blocking or dropping the oldest.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keelson_logship::{
    conformance, DiskQueue, DiskQueueConfig, Labels, Overflow, Record, Sink, Source, Stream, SyslogSink, SyslogSinkConfig, SyslogSource,
    SyslogSourceConfig, SyslogTransport,
};

async fn receiver(dir: &std::path::Path) -> SyslogSource {
    let mut config = SyslogSourceConfig::new(dir.join("queue"));
    config.udp = Some("127.0.0.1:0".parse().expect("addr"));
    config.tcp = Some("127.0.0.1:0".parse().expect("addr"));
    SyslogSource::start(config).await.expect("receiver")
}

/// Reads `n` records (acknowledging them), failing after 10 s.
async fn take(source: &mut dyn Source, n: usize) -> Vec<Record> {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while got.len() < n {
            let room = n - got.len();
            source.read(&mut got, room).await.expect("read");
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {} of {n} records came: {:?}", got.len(), got.iter().map(|r| &r.line).collect::<Vec<_>>()));
    source.ack(u64::MAX).await.expect("ack");
    got
}

fn logger(args: &[&str]) {
    let status = std::process::Command::new("logger").args(args).status().expect("logger (util-linux) runs");
    assert!(status.success(), "logger {args:?}");
}

#[tokio::test]
async fn messages_from_logger_over_udp_and_tcp_in_both_formats() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut source = receiver(dir.path()).await;
    assert!(!source.capabilities().pauses && source.capabilities().checkpoints, "senders cannot be paused; the queue checkpoints");
    let (udp, tcp) = (source.udp_addr().expect("udp").port().to_string(), source.tcp_addr().expect("tcp").port().to_string());
    logger(&[
        "--server",
        "127.0.0.1",
        "--port",
        &udp,
        "--udp",
        "--rfc5424",
        "--tag",
        "billing",
        "--id=4242",
        "-p",
        "local0.err",
        "udp 5424",
    ]);
    let got = take(&mut source, 1).await;
    let r = &got[0];
    assert_eq!((r.service(), r.instance(), r.line.as_str(), r.priority), ("billing", "4242", "udp 5424", Some(16 * 8 + 3)));
    logger(&[
        "--server",
        "127.0.0.1",
        "--port",
        &tcp,
        "--tcp",
        "--octet-count",
        "--rfc5424",
        "--tag",
        "web",
        "--msgid",
        "stderr",
        "tcp octet counted",
    ]);
    let got = take(&mut source, 1).await;
    assert_eq!((got[0].service(), got[0].stream, got[0].line.as_str()), ("web", Stream::Stderr, "tcp octet counted"));
    logger(&["--server", "127.0.0.1", "--port", &tcp, "--tcp", "--rfc3164", "--tag", "cron", "tcp bsd newline"]);
    let got = take(&mut source, 1).await;
    assert_eq!((got[0].service(), got[0].line.as_str()), ("cron", "tcp bsd newline"));
    assert!(got[0].labels.node.is_some(), "the BSD header's host");
    let stats = source.stats();
    assert_eq!((stats.received, stats.unparsed, stats.truncated), (3, 0, 0));
}

#[tokio::test]
async fn keelson_sink_to_keelson_receiver_keeps_labels_and_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut source = receiver(dir.path()).await;
    for transport in [
        SyslogTransport::Tcp(source.tcp_addr().expect("tcp").to_string()),
        SyslogTransport::Udp(source.udp_addr().expect("udp").to_string()),
    ] {
        let sink = SyslogSink::new(SyslogSinkConfig::new(transport)).expect("sink");
        let labels = Arc::new(Labels::new("api", "api-3").with_container("c0ffee").with_image("team/api:v2").with_node("node-7"));
        let mut partial = Record::new(labels.clone(), Stream::Stderr, "first piece");
        partial.partial = true;
        let batch = vec![partial, Record::new(labels, Stream::Stdout, "grüße [x] \"q\"")];
        sink.send(&batch).await.expect("send");
        sink.flush().await.expect("flush");
        let got = take(&mut source, 2).await;
        let essence: Vec<_> = got.iter().map(conformance::essence).collect();
        assert_eq!(essence, batch.iter().map(conformance::essence).collect::<Vec<_>>());
        assert_eq!(got[0].labels.container.as_deref(), Some("c0ffee"));
        assert_eq!(got[0].labels.image.as_deref(), Some("team/api:v2"));
        assert_eq!(got[0].labels.node.as_deref(), Some("node-7"));
    }
}

async fn send_tcp(addr: SocketAddr, bytes: &[u8]) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.write_all(bytes).expect("write");
}

#[tokio::test]
async fn garbage_and_huge_messages_are_counted_never_fatal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut source = receiver(dir.path()).await;
    let tcp = source.tcp_addr().expect("tcp");
    // Newline framing: binary garbage, a message of 1 MiB, then a normal one.
    let mut input = b"\x00\x01\xff\xfe binary\n".to_vec();
    input.extend(std::iter::repeat_n(b'x', 1 << 20));
    input.extend_from_slice(b"\n<13>1 - h app - - - after the big one\n");
    send_tcp(tcp, &input).await;
    let got = take(&mut source, 3).await;
    assert_eq!(got[0].line, "\u{0}\u{1}\u{fffd}\u{fffd} binary");
    assert_eq!(got[1].line.len(), 64 * 1024, "cut to max_message");
    assert_eq!(got[2].line, "after the big one");
    // Octet counting: a 1 MiB frame, then a normal frame on the same connection.
    let mut input = format!("{} ", 1 << 20).into_bytes();
    input.extend(std::iter::repeat_n(b'y', 1 << 20));
    input.extend_from_slice(b"20 <13>1 - h app - - ok");
    send_tcp(tcp, &input).await;
    let got = take(&mut source, 2).await;
    assert_eq!(got[0].line.len(), 64 * 1024);
    assert_eq!(got[1].line, "ok", "the frame after an over-long one is read whole");
    // A length that is not a number ends the connection; what came before is kept.
    send_tcp(tcp, b"9 <13>x one12a <13>x two\n").await;
    let got = take(&mut source, 1).await;
    assert_eq!(got[0].line, "x one");
    // UDP: garbage and an over-long datagram.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    udp.send_to(b"\xc3\x28 not syslog", source.udp_addr().expect("udp")).expect("send");
    udp.send_to(&vec![b'z'; 65_000], source.udp_addr().expect("udp")).expect("send");
    let got = take(&mut source, 2).await;
    assert_eq!(got[0].line, "\u{fffd}( not syslog");
    assert_eq!(got[1].line.len(), 65_000, "a datagram under max_message is whole");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stats = source.stats();
    assert_eq!(stats.truncated, 2, "{stats:?}");
    assert_eq!(stats.bad_frames, 1, "{stats:?}");
    assert!(stats.unparsed >= 4, "{stats:?}");
}

fn numbered(n: usize) -> Vec<Record> {
    (0..n).map(|i| Record::now("q", "1", Stream::Stdout, format!("line {i}"))).collect()
}

#[tokio::test]
async fn the_disk_queue_resumes_after_its_last_acknowledgement() {
    let dir = tempfile::tempdir().expect("tempdir");
    let expected = numbered(300);
    let mut config = DiskQueueConfig::default();
    config.segment_bytes = 4096;
    config.max_bytes = 1 << 20;
    DiskQueue::open(dir.path(), config).expect("queue").push(&expected).await.expect("push");
    let path = dir.path().to_owned();
    let open = move || -> Box<dyn Source> { Box::new(DiskQueue::open(&path, config).expect("queue").draining_source()) };
    conformance::source_resumes_after_its_checkpoint(&open, &expected).await;
    let leftovers =
        std::fs::read_dir(dir.path()).expect("dir").flatten().filter(|e| e.file_name().to_string_lossy().starts_with("seg-")).count();
    assert_eq!(leftovers, 1, "acknowledged segments leave the disk");
}

#[tokio::test]
async fn a_torn_write_is_trimmed_not_fatal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = DiskQueue::open(dir.path(), DiskQueueConfig::default()).expect("queue");
    queue.push(&numbered(3)).await.expect("push");
    drop(queue);
    let seg = std::fs::read_dir(dir.path())
        .expect("dir")
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("seg-"))
        .expect("segment");
    std::fs::OpenOptions::new().append(true).open(seg.path()).expect("open").write_all(b"{\"timestamp\":\"20").expect("tear");
    let queue = DiskQueue::open(dir.path(), DiskQueueConfig::default()).expect("reopens");
    let mut source = queue.draining_source();
    let mut got = Vec::new();
    while source.read(&mut got, 100).await.expect("read") > 0 {}
    assert_eq!(got.len(), 3);
    assert_eq!(queue.stats().corrupt, 0);
}

#[tokio::test]
async fn a_full_queue_blocks_or_drops_its_oldest_and_counts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = DiskQueueConfig::default();
    config.segment_bytes = 2048;
    config.max_bytes = 8192;
    // Block: the push waits until an acknowledgement makes room.
    let queue = DiskQueue::open(dir.path().join("block"), config).expect("queue");
    let mut pushed = 0;
    while tokio::time::timeout(Duration::from_millis(100), queue.push(&numbered(10))).await.is_ok() {
        pushed += 10;
        assert!(pushed < 10_000, "never filled");
    }
    assert!(queue.stats().bytes <= 8192 + 2048, "{:?}", queue.stats());
    let mut source = queue.source();
    let waiting = {
        let queue = queue.clone();
        tokio::spawn(async move { queue.push(&numbered(10)).await })
    };
    let got = take(&mut source, pushed).await;
    assert_eq!(got.len(), pushed);
    tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("room after the acknowledgement").expect("task").expect("push");
    assert_eq!(queue.stats().dropped, 0);

    // DropOldest: pushes never wait; what did not fit is counted.
    config.overflow = Overflow::DropOldest;
    let queue = DiskQueue::open(dir.path().join("drop"), config).expect("queue");
    let all = numbered(2000);
    for chunk in all.chunks(10) {
        tokio::time::timeout(Duration::from_secs(1), queue.push(chunk)).await.expect("never blocks").expect("push");
    }
    let stats = queue.stats();
    assert!(stats.dropped > 0 && stats.bytes <= 8192 + 2048, "{stats:?}");
    let mut got = Vec::new();
    let mut source = queue.draining_source();
    while source.read(&mut got, 1000).await.expect("read") > 0 {}
    assert_eq!(got.len() as u64 + stats.dropped, 2000, "every record delivered or counted as dropped");
    assert_eq!(got.last().map(|r| r.line.as_str()), Some("line 1999"), "the newest are kept");
}
