//! DNS queries from anyone who reaches the port: arbitrary datagrams to a running server
//! (one, started once, with a few services). It must answer or drop, never die: after
//! every input it still answers a good query.
#![no_main]
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use keelson_discovery::{Discovery, DnsServer, DnsServerConfig, MemoryDiscovery, Registration, ServiceName};
use libfuzzer_sys::fuzz_target;

struct Served {
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    _server: DnsServer,
    _registrations: Vec<keelson_discovery::RegistrationHandle>,
}

fn served() -> &'static Served {
    static SERVED: OnceLock<Served> = OnceLock::new();
    SERVED.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        let (server, registrations) = rt.block_on(async {
            let d = Arc::new(MemoryDiscovery::memory());
            let mut registrations = Vec::new();
            for (svc, id, port) in [("web", "web-1", 8080), ("web", "web-2", 8081), ("api", "api-1", 9090)] {
                let reg = Registration::new(ServiceName::new(svc).expect("name"), id, "127.0.0.11", port);
                registrations.push(d.register(reg).await.expect("register"));
            }
            let config = { let mut built = DnsServerConfig::default(); built.domain = "keelson.test".into(); built.listen = SocketAddr::from(([127, 0, 0, 1], 0)); built };
            (DnsServer::start(d, config).await.expect("server"), registrations)
        });
        let addr = server.local_addr();
        Served { rt, addr, _server: server, _registrations: registrations }
    })
}

/// A well-formed query for `web.service.keelson.test` A.
const GOOD: &[u8] = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03web\x07service\x07keelson\x04test\x00\x00\x01\x00\x01";

fuzz_target!(|data: &[u8]| {
    let s = served();
    s.rt.block_on(async {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let _ = socket.send_to(data, s.addr).await;
        let mut buf = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_millis(10), socket.recv_from(&mut buf)).await;
        socket.send_to(GOOD, s.addr).await.expect("send");
        let answered = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                let (n, _) = socket.recv_from(&mut buf).await.expect("recv");
                if n >= 2 && buf[..2] == GOOD[..2] {
                    return;
                }
            }
        })
        .await;
        assert!(answered.is_ok(), "the server stopped answering after {data:?}");
    });
});
