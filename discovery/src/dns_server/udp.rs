//! The UDP fast path: answers pre-encoded in wire format, batched system calls, and
//! optionally several `SO_REUSEPORT` sockets, each served by its own thread.
//!
//! Why: through hickory-server each UDP query cost a task, a decode and an encode, and
//! the server answered 0.75–0.95× dnsmasq's queries per second. Here a positive answer
//! is a hash lookup and a copy of bytes built when discovery changed, with only the id,
//! the RD flag and the question (for its case, RFC 4343 and DNS 0x20) patched in;
//! datagrams come and go `recvmmsg`/`sendmmsg` batches at a time. Everything else (a
//! name with no records, another zone, another opcode, a malformed or truncated answer)
//! is decoded and encoded with hickory, following the same rules as the TCP server.

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_server::proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_server::proto::rr::{LowerName, Name, RecordType};
use hickory_server::proto::serialize::binary::BinEncodable;
use nix::sys::socket::{recvmmsg, sendmmsg, MsgFlags, MultiHeaders, SockaddrStorage};

use super::{decide, Catalog, Decision};

/// Datagrams taken or sent per system call.
const BATCH: usize = 32;
/// The largest query read; anything longer is not a query this server answers.
const MAX_QUERY: usize = 1_232;
/// The UDP payload this server advertises in EDNS and the most it sends: 1,232 bytes
/// fit an IPv6 minimum MTU without fragmentation (DNS Flag Day 2020).
const MAX_UDP_ANSWER: u16 = 1_232;
/// How often a blocked worker looks at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// Positive answers in wire format, keyed by the lower-case wire name followed by the
/// two bytes of the query type.
#[derive(Debug, Default)]
pub(super) struct WireAnswers {
    answers: HashMap<Box<[u8]>, Box<[u8]>>,
}

impl WireAnswers {
    /// Encodes every answer of `catalog` as a whole response with id 0, RD clear, and the
    /// question in lower case. An answer that cannot be encoded is left to the slow path.
    pub(super) fn build(catalog: &Catalog) -> WireAnswers {
        let mut answers = HashMap::with_capacity(catalog.answers.len());
        for ((name, rtype), answer) in &catalog.answers {
            let name = Name::from(name.clone());
            let Ok(wire_name) = name.to_bytes() else { continue };
            let mut message = Message::response(0, OpCode::Query);
            message.metadata.authoritative = true;
            message.add_query(Query::query(name, *rtype));
            message.insert_answers(answer.records.clone());
            message.insert_additionals(answer.additional.clone());
            let Ok(wire) = message.to_vec() else { continue };
            answers.insert(key(&wire_name, u16::from(*rtype)), wire.into_boxed_slice());
        }
        WireAnswers { answers }
    }
}

fn key(wire_name: &[u8], qtype: u16) -> Box<[u8]> {
    let mut k = Vec::with_capacity(wire_name.len() + 2);
    k.extend_from_slice(wire_name);
    k.extend_from_slice(&qtype.to_be_bytes());
    k.into_boxed_slice()
}

/// What the fast path needs of a query: found without allocating.
struct SimpleQuery {
    /// Where the question (name, type, class) ends in the packet.
    question_end: usize,
    /// The client's UDP payload size from its EDNS OPT record, if it sent one.
    edns_payload: Option<u16>,
}

/// Reads a plain query (QR clear, opcode QUERY, one question, no answer or authority
/// records, at most an EDNS OPT as additional), writing the lower-case wire name and
/// the type (ANY read as SRV, as the server answers it) into `key`. `None` for anything
/// else: the slow path decides.
fn parse_simple(packet: &[u8], key: &mut Vec<u8>) -> Option<SimpleQuery> {
    let header = packet.get(..12)?;
    let count = |at: usize| u16::from_be_bytes([header[at], header[at + 1]]);
    let (flags, qd, an, ns, ar) = (header[2], count(4), count(6), count(8), count(10));
    if flags & 0x80 != 0 || (flags >> 3) & 0x0f != 0 || qd != 1 || an != 0 || ns != 0 || ar > 1 {
        return None;
    }
    key.clear();
    let mut at = 12;
    loop {
        let len = usize::from(*packet.get(at)?);
        if len > 63 {
            return None; // compressed or reserved label types: not in a plain query
        }
        let label = packet.get(at..at + 1 + len)?;
        key.extend(label.iter().map(u8::to_ascii_lowercase));
        at += 1 + len;
        if len == 0 {
            break;
        }
        if key.len() > 255 {
            return None;
        }
    }
    let qtype = u16::from(super::answered_as(RecordType::from(u16::from_be_bytes(packet.get(at..at + 2)?.try_into().ok()?))));
    key.extend_from_slice(&qtype.to_be_bytes());
    let question_end = at + 4;
    packet.get(at..question_end)?;
    let edns_payload = if ar == 1 {
        // The OPT record: root name, type 41, the payload size as its class.
        let opt = packet.get(question_end..question_end + 11)?;
        if opt[0] != 0 || u16::from_be_bytes([opt[1], opt[2]]) != 41 || opt[5] != 0 || opt[6] != 0 {
            return None; // not an OPT, or an extended rcode or EDNS version we leave to hickory
        }
        Some(u16::from_be_bytes([opt[3], opt[4]]))
    } else {
        None
    };
    Some(SimpleQuery { question_end, edns_payload })
}

/// The most a UDP answer to this client may hold.
fn udp_limit(edns_payload: Option<u16>) -> usize {
    usize::from(edns_payload.map_or(512, |p| p.clamp(512, MAX_UDP_ANSWER)))
}

/// An EDNS OPT record advertising [`MAX_UDP_ANSWER`], version 0, no flags, no options.
const OPT: [u8; 11] = [0, 0, 41, (MAX_UDP_ANSWER >> 8) as u8, MAX_UDP_ANSWER as u8, 0, 0, 0, 0, 0, 0];

/// Writes the answer to `packet` into `out`; leaves `out` empty when no answer is due
/// (a response sent to us, or bytes too short to carry an id).
pub(super) fn answer(catalog: &Catalog, domain: &LowerName, packet: &[u8], key: &mut Vec<u8>, out: &mut Vec<u8>) {
    out.clear();
    if let Some(query) = parse_simple(packet, key) {
        if let Some(wire) = catalog.wire.answers.get(key.as_slice()) {
            let with_opt = query.edns_payload.is_some();
            if wire.len() + if with_opt { OPT.len() } else { 0 } <= udp_limit(query.edns_payload) {
                out.extend_from_slice(wire);
                out[..2].copy_from_slice(&packet[..2]); // the id
                out[2] |= packet[2] & 0x01; // RD, copied from the query (RFC 1035 4.1.1)
                out[12..query.question_end].copy_from_slice(&packet[12..query.question_end]); // the client's case
                if with_opt {
                    let additional = u16::from_be_bytes([out[10], out[11]]) + 1;
                    out[10..12].copy_from_slice(&additional.to_be_bytes());
                    out.extend_from_slice(&OPT);
                }
                return;
            }
        }
    }
    slow_answer(catalog, domain, packet, out);
}

/// Decodes the query with hickory and answers it by the same rules as the TCP server.
fn slow_answer(catalog: &Catalog, domain: &LowerName, packet: &[u8], out: &mut Vec<u8>) {
    let request = match Message::from_vec(packet) {
        Ok(request) if request.metadata.message_type == MessageType::Query => request,
        Ok(_) => return, // a response: never answer one
        Err(_) => {
            // FORMERR with the id, if there is one to answer to.
            if packet.len() >= 2 {
                let id = u16::from_be_bytes([packet[0], packet[1]]);
                if let Ok(wire) = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr).to_vec() {
                    out.extend_from_slice(&wire);
                }
            }
            return;
        }
    };
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.queries = request.queries.clone();
    let edns_payload = request.edns.as_ref().map(Edns::max_payload);
    if edns_payload.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP_ANSWER);
        response.set_edns(edns);
    }
    let query = match (request.metadata.op_code, request.queries.as_slice()) {
        (OpCode::Query, [query]) => query,
        (OpCode::Query, _) => return encode(response, ResponseCode::FormErr, edns_payload, out),
        _ => return encode(response, ResponseCode::NotImp, edns_payload, out),
    };
    match decide(catalog, domain, &LowerName::from(query.name()), query.query_type()) {
        Decision::Refused => encode(response, ResponseCode::Refused, edns_payload, out),
        Decision::Answer(answer) => {
            response.metadata.authoritative = true;
            response.insert_answers(answer.records.clone());
            response.insert_additionals(answer.additional.clone());
            encode(response, ResponseCode::NoError, edns_payload, out)
        }
        Decision::Negative(code) => {
            response.metadata.authoritative = true;
            response.insert_authorities(catalog.soa.iter().cloned().collect());
            encode(response, code, edns_payload, out)
        }
    }
}

/// Encodes `response`; if it is larger than the client may take over UDP, sends the
/// header and question alone with TC set, so the client retries over TCP.
fn encode(mut response: Message, code: ResponseCode, edns_payload: Option<u16>, out: &mut Vec<u8>) {
    response.metadata.response_code = code;
    let Ok(wire) = response.to_vec() else { return };
    if wire.len() <= udp_limit(edns_payload) {
        out.extend_from_slice(&wire);
        return;
    }
    response.answers.clear();
    response.authorities.clear();
    response.additionals.clear();
    response.metadata.truncation = true;
    if let Ok(wire) = response.to_vec() {
        out.extend_from_slice(&wire);
    }
}

/// The UDP workers of one server: one thread per socket.
#[derive(Debug)]
pub(super) struct UdpWorkers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl UdpWorkers {
    /// Serves `sockets`, one thread each.
    pub(super) fn start(sockets: Vec<std::net::UdpSocket>, catalog: Arc<ArcSwap<Catalog>>, domain: LowerName) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (n, socket) in sockets.into_iter().enumerate() {
            socket.set_read_timeout(Some(STOP_CHECK))?;
            let (stop, catalog, domain) = (stop.clone(), catalog.clone(), domain.clone());
            threads.push(std::thread::Builder::new().name(format!("dns-udp-{n}")).spawn(move || serve(&socket, &catalog, &domain, &stop))?);
        }
        Ok(UdpWorkers { stop, threads })
    }

    /// Stops the workers and waits for them (at most [`STOP_CHECK`]).
    pub(super) fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for UdpWorkers {
    fn drop(&mut self) {
        // Dropped without `stop`: the threads end by themselves within STOP_CHECK.
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One worker: take a batch, answer each, send the answers in one call.
fn serve(socket: &std::net::UdpSocket, catalog: &ArcSwap<Catalog>, domain: &LowerName, stop: &AtomicBool) {
    let fd = socket.as_raw_fd();
    let mut buffers = vec![[0u8; MAX_QUERY]; BATCH];
    let mut received: Vec<(usize, Option<SockaddrStorage>)> = Vec::with_capacity(BATCH);
    let mut answers: Vec<Vec<u8>> = (0..BATCH).map(|_| Vec::with_capacity(512)).collect();
    let mut key = Vec::with_capacity(260);
    // Per batch: the clients answered, and which answers go out (kept, not reallocated).
    let mut addresses: Vec<Option<SockaddrStorage>> = Vec::with_capacity(BATCH);
    let mut due: Vec<usize> = Vec::with_capacity(BATCH);
    let mut recv_headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut send_headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    while !stop.load(Ordering::Relaxed) {
        received.clear();
        {
            let mut slices: Vec<[IoSliceMut<'_>; 1]> = buffers.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
            match recvmmsg(fd, &mut recv_headers, slices.iter_mut(), MsgFlags::MSG_WAITFORONE, None) {
                Ok(messages) => received.extend(messages.map(|m| (m.bytes, m.address))),
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
                Err(error) => {
                    tracing::warn!(%error, "DNS UDP receive failed");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            }
        }
        let catalog = catalog.load();
        addresses.clear();
        due.clear();
        for (i, (len, address)) in received.iter().enumerate() {
            answer(&catalog, domain, &buffers[i][..(*len).min(MAX_QUERY)], &mut key, &mut answers[i]);
            if !answers[i].is_empty() && address.is_some() {
                addresses.push(*address);
                due.push(i);
            }
        }
        if due.is_empty() {
            continue;
        }
        let slices: Vec<[IoSlice<'_>; 1]> = due.iter().map(|i| [IoSlice::new(&answers[*i])]).collect();
        if let Err(error) = sendmmsg(fd, &mut send_headers, slices.iter(), &addresses, [], MsgFlags::empty()) {
            // A full send buffer or an unreachable client loses these answers, as UDP
            // may; the clients retry.
            tracing::debug!(%error, "DNS UDP send failed");
        }
    }
}

/// Binds `workers` UDP sockets on `listen` (with `SO_REUSEPORT` when more than one, all
/// on the port the first one got).
pub(super) fn bind(listen: SocketAddr, workers: usize) -> std::io::Result<Vec<std::net::UdpSocket>> {
    let mut sockets = Vec::new();
    let mut addr = listen;
    for _ in 0..workers.max(1) {
        let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
        if workers > 1 {
            socket.set_reuse_port(true)?;
        }
        socket.bind(&addr.into())?;
        let socket: std::net::UdpSocket = socket.into();
        addr = socket.local_addr()?;
        sockets.push(socket);
    }
    Ok(sockets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_queries_parse_and_anything_else_is_left_to_the_slow_path() {
        let mut query = Message::query();
        query.add_query(Query::query(Name::from_ascii("Web.Service.keelson.").expect("name"), RecordType::A));
        let wire = query.to_vec().expect("encodes");
        let mut key = Vec::new();
        let parsed = parse_simple(&wire, &mut key).expect("a plain query");
        assert_eq!(parsed.question_end, wire.len());
        assert_eq!(parsed.edns_payload, None);
        assert_eq!(&key[..], &b"\x03web\x07service\x07keelson\x00\x00\x01"[..], "lower case, then the type");

        let mut with_edns = query.clone();
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        with_edns.set_edns(edns);
        let parsed = parse_simple(&with_edns.to_vec().expect("encodes"), &mut key).expect("EDNS is plain too");
        assert_eq!(parsed.edns_payload, Some(4096));

        let mut response = query.clone();
        response.metadata.message_type = MessageType::Response;
        assert!(parse_simple(&response.to_vec().expect("encodes"), &mut key).is_none(), "responses are not queries");
        assert!(parse_simple(&wire[..wire.len() - 1], &mut key).is_none(), "cut short");
        assert!(parse_simple(&[0; 5], &mut key).is_none(), "shorter than a header");
    }
}
