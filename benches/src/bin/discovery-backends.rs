//! `discovery-backends`: the same workload on every discovery backend, in one run.
//!
//! For memory and etcd (a real etcd started here): registrations/s, direct lookups/s,
//! lookups/s from a [`ServiceView`] snapshot, and register-to-watch latency (p50, p99).
//! For etcd also its own put-to-watch latency through the raw `KeyValue`, the floor the
//! discovery layer is compared with. For DNS (a real dnsmasq with the same instances):
//! lookups/s through the resolver (DNS is read-only). Consul, against the real agent at
//! `KEELSON_TEST_CONSUL_ADDR` when set (none can be installed here). Exits non-zero if a
//! backend returns a wrong answer.
//!
//! `cargo run --release -p keelson-benches --bin discovery-backends`

use std::net::Ipv4Addr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use keelson_discovery::{
    Discovery, DnsConfig, DnsDiscovery, EtcdConfig, EtcdKv, KeyValue, KvDiscovery, MemoryDiscovery, Query, Registration, ServiceName,
    ServiceView,
};
use keelson_testkit::dnsmasq::{DnsRecord, Dnsmasq};
use keelson_testkit::etcd::Etcd;

#[derive(Parser, Debug)]
struct Args {
    /// Instances registered for the throughput phase.
    #[arg(long, default_value_t = 1000)]
    registrations: usize,
    /// Direct lookups per backend.
    #[arg(long, default_value_t = 2000)]
    lookups: usize,
    /// Register-to-watch samples.
    #[arg(long, default_value_t = 200)]
    samples: usize,
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

struct Figures {
    registrations_per_s: f64,
    lookups_per_s: f64,
    view_lookups_per_s: f64,
    watch_p50: Duration,
    watch_p99: Duration,
    call_p50: Duration,
    call_p99: Duration,
}

async fn measure(d: Arc<dyn Discovery>, args: &Args, wrong: &mut u64) -> Figures {
    let svc = ServiceName::new("bench").expect("name");
    let t = Instant::now();
    let mut handles = Vec::with_capacity(args.registrations);
    for i in 0..args.registrations {
        handles.push(
            d.register(Registration::new(svc.clone(), format!("i{i}"), "127.0.0.1", 10_000 + (i % 50_000) as u16)).await.expect("register"),
        );
    }
    let registrations_per_s = args.registrations as f64 / t.elapsed().as_secs_f64();

    let t = Instant::now();
    for _ in 0..args.lookups {
        let n = d.instances(&Query::service(svc.clone()).healthy()).await.expect("lookup").len();
        if n != args.registrations {
            *wrong += 1;
        }
    }
    let lookups_per_s = args.lookups as f64 / t.elapsed().as_secs_f64();

    let view = ServiceView::follow(d.clone()).await.expect("view");
    let rounds = 5_000_000;
    let t = Instant::now();
    let mut seen = 0usize;
    for _ in 0..rounds {
        seen += view.instances("bench").len();
    }
    let view_lookups_per_s = rounds as f64 / t.elapsed().as_secs_f64();
    if seen != rounds * args.registrations {
        *wrong += 1;
    }
    drop(view);

    // Register-to-watch: one new instance at a time, timed until a snapshot holds it.
    let lat = ServiceName::new("latency").expect("name");
    let mut w = d.watch(Query::service(lat.clone())).await.expect("watch");
    let _ = w.next().await;
    let mut samples = Vec::with_capacity(args.samples);
    let mut calls = Vec::with_capacity(args.samples);
    for i in 0..args.samples {
        let t = Instant::now();
        let h = d.register(Registration::new(lat.clone(), format!("l{i}"), "127.0.0.1", 1)).await.expect("register");
        calls.push(t.elapsed());
        loop {
            let s = tokio::time::timeout(Duration::from_secs(5), w.next()).await.expect("snapshot in time").expect("open");
            if s.instances.iter().any(|x| x.id == format!("l{i}")) {
                break;
            }
        }
        samples.push(t.elapsed());
        handles.push(h);
    }
    for h in handles {
        let _ = h.deregister().await;
    }
    Figures {
        registrations_per_s,
        lookups_per_s,
        view_lookups_per_s,
        watch_p50: pct(&mut samples, 0.5),
        watch_p99: pct(&mut samples, 0.99),
        call_p50: pct(&mut calls, 0.5),
        call_p99: pct(&mut calls, 0.99),
    }
}

fn print(name: &str, f: &Figures) {
    println!(
        "{name:<8} registrations {:>9.0}/s  lookups {:>9.0}/s  view lookups {:>11.0}/s  register-to-watch p50 {:>8.1} us  p99 {:>8.1} us  (register call p50 {:>8.1} us  p99 {:>8.1} us)",
        f.registrations_per_s,
        f.lookups_per_s,
        f.view_lookups_per_s,
        us(f.watch_p50),
        us(f.watch_p99),
        us(f.call_p50),
        us(f.call_p99)
    );
}

/// etcd's own floor: put a key, time until the raw watch delivers it.
async fn etcd_put_to_watch(kv: &EtcdKv, samples: usize) -> (Duration, Duration) {
    let mut w = kv.watch("raw-latency/", None).await.expect("watch");
    let mut v = Vec::with_capacity(samples);
    for i in 0..samples {
        let t = Instant::now();
        kv.put(&format!("raw-latency/{i}"), vec![1], None).await.expect("put");
        let _ = tokio::time::timeout(Duration::from_secs(5), w.next()).await.expect("event in time");
        v.push(t.elapsed());
    }
    (pct(&mut v, 0.5), pct(&mut v, 0.99))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = Args::parse();
    let mut wrong = 0u64;
    println!("{} registrations, {} lookups, {} register-to-watch samples per backend", args.registrations, args.lookups, args.samples);

    let memory = measure(Arc::new(MemoryDiscovery::memory()), &args, &mut wrong).await;
    print("memory", &memory);

    let etcd = Etcd::start().expect("etcd (apt-get install -y etcd-server)");
    let kv = EtcdKv::connect(EtcdConfig::new([etcd.client_url()])).await.expect("connect");
    let (raw50, raw99) = etcd_put_to_watch(&kv, args.samples).await;
    let on_etcd = measure(Arc::new(KvDiscovery::new(Arc::new(kv))), &args, &mut wrong).await;
    print("etcd", &on_etcd);
    println!("etcd-raw put-to-watch p50 {:>8.1} us  p99 {:>8.1} us (etcd's own, via KeyValue::watch)", us(raw50), us(raw99));
    println!(
        "ratio register-to-watch-p99 keelson-etcd/etcd-put-to-watch: {:.2}",
        on_etcd.watch_p99.as_secs_f64() / raw99.as_secs_f64().max(1e-9)
    );
    println!(
        "delta register-to-watch-p99 keelson-etcd minus etcd-put-to-watch: {:.2} ms",
        (on_etcd.watch_p99.as_secs_f64() - raw99.as_secs_f64()) * 1e3
    );

    // DNS: the same number of instances as SRV records in dnsmasq, read through DnsDiscovery.
    let n = args.registrations.min(200);
    let mut records = Vec::new();
    for i in 0..n {
        records.push(DnsRecord::Srv {
            name: "_bench._tcp.zone.test".into(),
            target: format!("i{i}.zone.test"),
            port: 8000,
            priority: 1,
            weight: 1,
        });
        records.push(DnsRecord::A { name: format!("i{i}.zone.test"), ip: Ipv4Addr::new(127, 3, (i / 250) as u8, (i % 250) as u8 + 1) });
    }
    let dnsmasq = Dnsmasq::start(&records, 30).expect("dnsmasq (apt-get install -y dnsmasq-base dnsutils)");
    let dns = DnsDiscovery::new(DnsConfig::new(vec![dnsmasq.addr()], "zone.test")).expect("resolver");
    let lookups = (args.lookups / 20).max(10);
    let t = Instant::now();
    for _ in 0..lookups {
        if dns.instances(&Query::service(ServiceName::new("bench").expect("name"))).await.expect("dns lookup").len() != n {
            wrong += 1;
        }
    }
    println!(
        "dns      lookups {:>9.1}/s ({n} SRV targets each resolved explicitly: {} queries per lookup); registrations and watch latency: n/a (read-only)",
        lookups as f64 / t.elapsed().as_secs_f64(),
        n + 1
    );
    match std::env::var("KEELSON_TEST_CONSUL_ADDR") {
        Ok(addr) => {
            let consul = keelson_discovery::ConsulDiscovery::new(keelson_discovery::ConsulConfig::new(addr)).expect("consul client");
            let f = measure(Arc::new(consul), &args, &mut wrong).await;
            print("consul", &f);
        }
        Err(_) => println!(
            "consul   skipped: set KEELSON_TEST_CONSUL_ADDR to a real Consul agent's URL to include it (none can be installed here)"
        ),
    }
    if wrong > 0 {
        println!("wrong answers: {wrong}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
