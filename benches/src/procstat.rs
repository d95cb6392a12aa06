//! What a process spent, from `/proc`: figures noise on a shared machine cannot move much.

/// User plus system CPU seconds of process `pid` and all its threads so far (0 if it is
/// gone).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces and parentheses) start after the
    // last ')'. They are taken by position: some are negative (tpgid is -1 without a
    // terminal), so skipping what does not parse as unsigned would shift the rest.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // The list starts at the 3rd field (state), so utime (14) is index 11 and stime (15) 12.
    (ticks(11) + ticks(12)) / 100.0
}

/// [`cpu_seconds`] of `pid` plus those of its direct children (an nginx master and its
/// worker, say).
pub fn tree_cpu_seconds(pid: u32) -> f64 {
    let mut total = cpu_seconds(pid);
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // The parent pid is the second field after the parenthesised command name.
            if stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok()) == Some(pid) {
                total += cpu_seconds(child);
            }
        }
    }
    total
}

/// Peak resident memory of `pid` (VmHWM), MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    status_kib(pid, "VmHWM:") / 1024.0
}

/// Resident memory of `pid` now (VmRSS), MiB.
pub fn rss_mib(pid: u32) -> f64 {
    status_kib(pid, "VmRSS:") / 1024.0
}

fn status_kib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    /// What the kernel reports through getrusage, the same clock by another road.
    fn rusage_seconds() -> f64 {
        let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).expect("getrusage");
        let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        secs(u.user_time()) + secs(u.system_time())
    }

    #[test]
    fn cpu_seconds_agree_with_getrusage() {
        let me = std::process::id();
        let start = rusage_seconds();
        let mut x = 0u64;
        // Spin until this process has spent 0.3 s of CPU, however busy the machine is.
        while rusage_seconds() - start < 0.3 {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }
        let (proc_stat, rusage) = (super::cpu_seconds(me), rusage_seconds());
        // /proc counts in 10 ms ticks.
        assert!((proc_stat - rusage).abs() < 0.05, "/proc says {proc_stat} s, getrusage {rusage} s");
    }
}
