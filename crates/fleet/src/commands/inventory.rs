//! `fleet inventory`: the hosts as fleet resolves them, without connecting to any.

use anyhow::Result;
use serde::Serialize;

use super::{Fleet, table};
use crate::exit_code::ExitCode;
use crate::inventory::Device;
use crate::output::Stream;

/// One `--json` record per host.
#[derive(Serialize)]
struct HostRecord<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    node_rank: usize,
    host: &'a str,
    address: &'a str,
    port: u16,
    user: &'a str,
    ranks: u32,
    first_rank: u32,
    device: Device,
    workdir: &'a str,
}

pub fn run(fleet: &Fleet) -> Result<ExitCode> {
    let inventory = fleet.inventory()?;
    let targets = fleet.targets(&inventory)?;
    let first = inventory.first_ranks();
    let records: Vec<HostRecord> = inventory
        .hosts
        .iter()
        .zip(&targets)
        .enumerate()
        .map(|(i, (host, target))| HostRecord {
            kind: "host",
            node_rank: i,
            host: &host.name,
            address: &target.addr,
            port: target.port,
            user: &target.user,
            ranks: host.ranks,
            first_rank: first[i],
            device: host.device,
            workdir: &host.workdir,
        })
        .collect();
    if fleet.printer.json() {
        records.iter().for_each(|r| fleet.printer.record(r));
        return Ok(ExitCode::Success);
    }
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            let ranks = match r.ranks {
                1 => r.first_rank.to_string(),
                n => format!("{}-{}", r.first_rank, r.first_rank + n - 1),
            };
            vec![
                r.node_rank.to_string(),
                r.host.to_string(),
                r.address.to_string(),
                r.port.to_string(),
                r.user.to_string(),
                ranks,
                r.device.to_string(),
                r.workdir.to_string(),
            ]
        })
        .collect();
    fleet.printer.write(
        Stream::Stdout,
        &table::render(
            &[
                "NODE",
                "HOST",
                "ADDRESS",
                "PORT",
                "USER",
                "GLOBAL RANKS",
                "DEVICE",
                "WORKDIR",
            ],
            &rows,
        ),
    );
    let master = inventory.master_addr.as_deref().unwrap_or(&targets[0].addr);
    fleet.printer.info(&format!(
        "{} hosts, world size {}, MASTER_ADDR {master}:{}",
        inventory.hosts.len(),
        inventory.world_size(),
        inventory.master_port
    ));
    Ok(ExitCode::Success)
}
