//! Which processes a job starts on which host, with which environment: a pure function of the
//! inventory and the command, so every rule (rank numbering, torchrun's variable names, the
//! launcher modes) is unit-tested without a network.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::inventory::{Host, Inventory};

/// How the command is started on the hosts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The command once per rank, with torchrun's environment (RANK, WORLD_SIZE, ...).
    #[default]
    Ranks,
    /// One `torchrun` per host, which starts that host's ranks.
    Torchrun,
    /// One `accelerate launch` per host.
    Accelerate,
}

/// One process fleet starts and supervises: a rank, or a per-host launcher.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Process {
    /// Position in [`JobPlan::processes`]; names its files in the job directory.
    pub index: usize,
    /// Index of its host in the inventory (= node rank).
    pub host: usize,
    /// Shown in every log line: the global rank (`3`) or, for a per-host launcher, the node (`n1`).
    pub label: String,
    /// Recorded in `summary.json` by name only: values may be secrets (an `HF_TOKEN`).
    #[serde(serialize_with = "names_only")]
    pub env: BTreeMap<String, String>,
    pub argv: Vec<String>,
}

fn names_only<S: serde::Serializer>(
    env: &BTreeMap<String, String>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(env.keys())
}

/// Everything a job starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct JobPlan {
    pub job_id: String,
    pub mode: Mode,
    pub master_addr: String,
    pub master_port: u16,
    pub world_size: u32,
    pub processes: Vec<Process>,
}

impl JobPlan {
    /// The processes that run on host `host`.
    pub fn on_host(&self, host: usize) -> impl Iterator<Item = &Process> {
        self.processes.iter().filter(move |p| p.host == host)
    }
}

/// Why `--accelerate` cannot run this inventory, if it cannot: `accelerate launch` takes the
/// world's `--num_processes` and divides it evenly across `--num_machines`, so hosts with
/// different `ranks` would start the wrong number of processes on each.
pub fn uneven_for_accelerate(inventory: &Inventory) -> Option<String> {
    let first = inventory.hosts.first()?.ranks;
    if inventory.hosts.iter().all(|h| h.ranks == first) {
        return None;
    }
    let ranks: Vec<String> = inventory
        .hosts
        .iter()
        .map(|h| format!("{} {}", h.name, h.ranks))
        .collect();
    Some(format!(
        "--accelerate needs the same ranks on every host ({}: {}): accelerate launch divides \
         --num_processes evenly across the machines; use --torchrun (each host gets its own \
         --nproc-per-node) or give every host the same ranks",
        inventory.path.display(),
        ranks.join(", ")
    ))
}

/// Plans a job. `addresses` are the hosts' addresses as dialled (rank 0's is MASTER_ADDR unless
/// the inventory sets `master_addr`).
pub fn plan(
    inventory: &Inventory,
    addresses: &[String],
    command: &[String],
    mode: Mode,
    job_id: &str,
) -> JobPlan {
    let world = World {
        master_addr: inventory
            .master_addr
            .clone()
            .unwrap_or_else(|| addresses[0].clone()),
        master_port: inventory.master_port.to_string(),
        world_size: inventory.world_size(),
        nnodes: inventory.hosts.len().to_string(),
    };
    let mut processes = Vec::new();
    for ((node, host), first) in inventory
        .hosts
        .iter()
        .enumerate()
        .zip(inventory.first_ranks())
    {
        let mut common = host_env(job_id, host, mode);
        match mode {
            Mode::Ranks => {
                for local in 0..host.ranks {
                    let mut env = world.rank_env(node, host, first + local, local);
                    env.extend(common.clone());
                    processes.push(Process {
                        index: processes.len(),
                        host: node,
                        label: (first + local).to_string(),
                        env,
                        argv: command.to_vec(),
                    });
                }
            }
            Mode::Torchrun | Mode::Accelerate => {
                let mut argv = if mode == Mode::Torchrun {
                    world.torchrun(node, host)
                } else {
                    world.accelerate(node, host, &mut common)
                };
                argv.extend(command.iter().cloned());
                processes.push(Process {
                    index: processes.len(),
                    host: node,
                    label: format!("n{node}"),
                    env: common,
                    argv,
                });
            }
        }
    }
    JobPlan {
        job_id: job_id.to_string(),
        mode,
        master_addr: world.master_addr,
        master_port: inventory.master_port,
        world_size: world.world_size,
        processes,
    }
}

/// The environment every process on `host` gets: fleet's first, then the inventory's, which
/// may override anything (e.g. OMP_NUM_THREADS).
fn host_env(job_id: &str, host: &Host, mode: Mode) -> BTreeMap<String, String> {
    let mut env = BTreeMap::from([
        ("FLEET_JOB_ID".to_string(), job_id.to_string()),
        // The inventory's name for the host, which fleet-train puts in its messages.
        ("FLEET_HOST".to_string(), host.name.clone()),
        ("PYTHONUNBUFFERED".to_string(), "1".to_string()),
    ]);
    if mode == Mode::Ranks && host.ranks > 1 {
        // As torchrun does: ranks sharing a host would otherwise each start a thread per
        // core and slow each other down.
        env.insert("OMP_NUM_THREADS".to_string(), "1".to_string());
    }
    env.extend(host.env.clone());
    env
}

/// What every host's launch shares: where the ranks meet and how many there are.
struct World {
    master_addr: String,
    master_port: String,
    world_size: u32,
    nnodes: String,
}

impl World {
    /// The torch.distributed environment of one rank fleet starts itself.
    fn rank_env(
        &self,
        node: usize,
        host: &Host,
        rank: u32,
        local: u32,
    ) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("RANK".to_string(), rank.to_string()),
            ("LOCAL_RANK".to_string(), local.to_string()),
            ("WORLD_SIZE".to_string(), self.world_size.to_string()),
            ("LOCAL_WORLD_SIZE".to_string(), host.ranks.to_string()),
            ("NODE_RANK".to_string(), node.to_string()),
            ("GROUP_RANK".to_string(), node.to_string()),
            ("NNODES".to_string(), self.nnodes.clone()),
            ("MASTER_ADDR".to_string(), self.master_addr.clone()),
            ("MASTER_PORT".to_string(), self.master_port.clone()),
        ])
    }

    /// `torchrun` for one node, before the command.
    fn torchrun(&self, node: usize, host: &Host) -> Vec<String> {
        [
            "torchrun",
            "--nnodes",
            &self.nnodes,
            "--nproc-per-node",
            &host.ranks.to_string(),
            "--node-rank",
            &node.to_string(),
            "--master-addr",
            &self.master_addr,
            "--master-port",
            &self.master_port,
        ]
        .map(String::from)
        .to_vec()
    }

    /// `accelerate launch` for one machine, before the command; `env` gets what CPU ranks need.
    fn accelerate(
        &self,
        node: usize,
        host: &Host,
        env: &mut BTreeMap<String, String>,
    ) -> Vec<String> {
        let mut argv: Vec<String> = [
            "accelerate",
            "launch",
            "--num_machines",
            &self.nnodes,
            "--num_processes",
            &self.world_size.to_string(),
            "--machine_rank",
            &node.to_string(),
            "--main_process_ip",
            &self.master_addr,
            "--main_process_port",
            &self.master_port,
        ]
        .map(String::from)
        .to_vec();
        // More than one process: accelerate's torchrun launcher (`--multi_gpu`, whatever the
        // device). Its `--cpu` launcher sets no RANK and expects MPI, so CPU ranks get
        // ACCELERATE_USE_CPU instead, which makes accelerate pick Gloo on the CPU (MULTI_CPU).
        let cpu = host.device == crate::inventory::Device::Cpu;
        if self.world_size > 1 {
            argv.push("--multi_gpu".into());
            if cpu {
                env.entry("ACCELERATE_USE_CPU".to_string())
                    .or_insert_with(|| "true".to_string());
            }
        } else if cpu {
            argv.push("--cpu".into());
        }
        argv
    }
}

/// A job id: sortable by start time, unique enough for one user's runs.
pub fn new_job_id() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    let salt = (now.subsec_nanos() ^ std::process::id().rotate_left(16)) & 0xffff;
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}-{salt:04x}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn inventory(text: &str) -> Inventory {
        Inventory::from_toml(Path::new("fleet.toml"), text).unwrap()
    }

    const FLEET: &str = "[fleet]\nenv = { OMP_NUM_THREADS = \"2\" }\n[[host]]\nname = \"a\"\naddress = \"10.0.0.1\"\n\
        [[host]]\nname = \"b\"\naddress = \"10.0.0.2\"\nranks = 2\nenv = { NCCL_DEBUG = \"INFO\", PYTHONUNBUFFERED = \"0\" }\n\
        [[host]]\nname = \"c\"\naddress = \"10.0.0.3\"\n";

    fn addresses() -> Vec<String> {
        vec!["10.0.0.1".into(), "10.0.0.2".into(), "10.0.0.3".into()]
    }

    #[test]
    fn every_rank_gets_torchruns_environment() {
        let inv = inventory(FLEET);
        let job = plan(
            &inv,
            &addresses(),
            &["python3".into(), "train.py".into()],
            Mode::Ranks,
            "J",
        );
        let summary: Vec<(usize, &str, &str, &str, &str)> = job
            .processes
            .iter()
            .map(|p| {
                (
                    p.host,
                    p.env["RANK"].as_str(),
                    p.env["LOCAL_RANK"].as_str(),
                    p.env["LOCAL_WORLD_SIZE"].as_str(),
                    p.env["NODE_RANK"].as_str(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (0, "0", "0", "1", "0"),
                (1, "1", "0", "2", "1"),
                (1, "2", "1", "2", "1"),
                (2, "3", "0", "1", "2")
            ]
        );
        for p in &job.processes {
            assert_eq!(p.env["WORLD_SIZE"], "4");
            assert_eq!(p.env["NNODES"], "3");
            assert_eq!(p.env["MASTER_ADDR"], "10.0.0.1");
            assert_eq!(p.env["MASTER_PORT"], "29500");
            assert_eq!(p.env["FLEET_JOB_ID"], "J");
            assert_eq!(p.env["GROUP_RANK"], p.env["NODE_RANK"]);
            assert_eq!(p.env["OMP_NUM_THREADS"], "2");
            assert_eq!(p.argv, ["python3", "train.py"]);
            assert_eq!(p.label, p.env["RANK"]);
        }
        assert_eq!(job.processes[1].env["NCCL_DEBUG"], "INFO");
        assert_eq!(
            job.processes[1].env["PYTHONUNBUFFERED"], "0",
            "the inventory overrides fleet's defaults"
        );
        assert_eq!(job.processes[0].env["PYTHONUNBUFFERED"], "1");
    }

    #[test]
    fn ranks_sharing_a_host_get_one_thread_each_unless_the_inventory_says() {
        let inv = inventory(&FLEET.replace("env = { OMP_NUM_THREADS = \"2\" }\n", ""));
        let job = plan(&inv, &addresses(), &["python3".into()], Mode::Ranks, "J");
        let threads: Vec<Option<&str>> = job
            .processes
            .iter()
            .map(|p| p.env.get("OMP_NUM_THREADS").map(String::as_str))
            .collect();
        assert_eq!(threads, [None, Some("1"), Some("1"), None]);
        let inv = inventory(FLEET);
        let job = plan(&inv, &addresses(), &["python3".into()], Mode::Ranks, "J");
        assert!(
            job.processes
                .iter()
                .all(|p| p.env["OMP_NUM_THREADS"] == "2")
        );
    }

    #[test]
    fn torchrun_mode_starts_one_launcher_per_host() {
        let inv = inventory(&FLEET.replace(
            "[fleet]\n",
            "[fleet]\nmaster_addr = \"192.168.9.9\"\nmaster_port = 29555\n",
        ));
        let job = plan(
            &inv,
            &addresses(),
            &["train.py".into(), "--lr".into(), "1e-4".into()],
            Mode::Torchrun,
            "J",
        );
        assert_eq!(job.processes.len(), 3);
        assert_eq!(
            job.processes[1].argv,
            "torchrun --nnodes 3 --nproc-per-node 2 --node-rank 1 --master-addr 192.168.9.9 --master-port 29555 train.py --lr 1e-4"
                .split(' ')
                .collect::<Vec<_>>()
        );
        assert_eq!(job.processes[1].label, "n1");
        assert!(
            !job.processes[1].env.contains_key("RANK"),
            "torchrun sets the ranks itself"
        );
    }

    #[test]
    fn accelerate_mode_matches_the_fleet() {
        let uneven = inventory(FLEET);
        let refusal = uneven_for_accelerate(&uneven).unwrap();
        assert!(refusal.contains("(fleet.toml: a 1, b 2, c 1)"), "{refusal}");
        let even = FLEET.replace("ranks = 2", "ranks = 1");
        let inv = inventory(&even.replace("[fleet]\n", "[fleet]\ndevice = \"cpu\"\n"));
        assert_eq!(uneven_for_accelerate(&inv), None);
        let job = plan(
            &inv,
            &addresses(),
            &["train.py".into()],
            Mode::Accelerate,
            "J",
        );
        assert_eq!(
            job.processes[2].argv.join(" "),
            "accelerate launch --num_machines 3 --num_processes 3 --machine_rank 2 --main_process_ip 10.0.0.1 --main_process_port 29500 --multi_gpu train.py"
        );
        assert_eq!(job.processes[2].env["ACCELERATE_USE_CPU"], "true");
    }

    #[test]
    fn job_ids_sort_by_time() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_783), (2026, 11, 26));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        let id = new_job_id();
        assert_eq!(id.len(), 20, "{id}");
    }

    #[test]
    fn a_plan_is_recorded_with_variable_names_not_values() {
        let mut inv = inventory(FLEET);
        inv.hosts[0]
            .env
            .insert("HF_TOKEN".into(), "hf_secret".into());
        let job = plan(
            &inv,
            &["10.0.0.1".to_string(), "10.0.0.2".to_string()],
            &["x".to_string()],
            Mode::Ranks,
            "J",
        );
        let json = serde_json::to_string(&job).unwrap();
        assert!(!json.contains("hf_secret"), "{json}");
        assert!(json.contains("\"HF_TOKEN\""), "{json}");
    }
}
