//! What of the machine a platform may touch, read before it starts and after it is
//! gone, so a test can assert that going down left nothing behind: processes of the
//! given programs, links, network namespaces and their `/etc/netns` files, the nftables
//! ruleset, Docker containers, volumes and images.

use std::collections::BTreeSet;
use std::process::Command;

/// One reading of the machine; compare two with `assert_eq!`.
#[derive(Debug, PartialEq, Eq)]
pub struct MachineState {
    /// `program[pid]` of every live process (not a zombie) of the watched programs.
    pub processes: BTreeSet<String>,
    /// Link names of this namespace.
    pub links: BTreeSet<String>,
    /// `ip netns list`.
    pub namespaces: BTreeSet<String>,
    /// Files under `/etc/netns` (per-namespace resolv.conf and hosts).
    pub netns_files: BTreeSet<String>,
    /// `nft -s list ruleset`.
    pub nft: String,
    /// Container ids.
    pub containers: BTreeSet<String>,
    /// Volume names.
    pub volumes: BTreeSet<String>,
    /// Image ids.
    pub images: BTreeSet<String>,
}

fn lines(program: &str, args: &[&str]) -> BTreeSet<String> {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| l.trim().to_owned()).filter(|l| !l.is_empty()).collect()
}

fn files_under(dir: &std::path::Path, into: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        into.insert(entry.path().display().to_string());
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            files_under(&entry.path(), into);
        }
    }
}

impl MachineState {
    /// Reads the machine now; `programs` are the process names (`comm`) watched.
    pub fn read(programs: &[&str]) -> MachineState {
        let mut processes = BTreeSet::new();
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            if let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) {
                let comm = comm.trim();
                // A zombie has exited and waits for its reaper (init, for a daemon whose
                // parent is gone), which may take a moment: nothing of it is left running.
                let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
                let zombie = stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
                if programs.contains(&comm) && !zombie {
                    processes.insert(format!("{comm}[{}]", entry.file_name().to_string_lossy()));
                }
            }
        }
        let links = lines("ip", &["-o", "link", "show"])
            .into_iter()
            .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().split('@').next().unwrap_or_default().to_owned()))
            .collect();
        let nft = Command::new("nft").args(["-s", "list", "ruleset"]).output().expect("nft");
        let mut netns_files = BTreeSet::new();
        files_under(std::path::Path::new("/etc/netns"), &mut netns_files);
        MachineState {
            processes,
            links,
            namespaces: lines("ip", &["netns", "list"]),
            netns_files,
            nft: String::from_utf8_lossy(&nft.stdout).into_owned(),
            containers: lines("docker", &["ps", "-aq"]),
            volumes: lines("docker", &["volume", "ls", "-q"]),
            images: lines("docker", &["images", "-q", "--no-trunc"]),
        }
    }
}
