//! The check between hosts. After the ranks meet at the master port, Gloo and NCCL connect
//! every pair of hosts on ports they pick at random, so a firewall that lets in only SSH and
//! the master port passes the master-port check and the job then hangs at init. Here each host
//! listens on a port its kernel picks and every other host connects to it, all at once: with N
//! hosts, N×(N−1) connections in one round.

use std::time::Instant;

use futures::future::join_all;

use super::CONNECT_SECONDS;
use crate::inventory::Inventory;
use crate::output::Printer;
use crate::preflight::{Finding, listener_script, pairs_script};
use crate::ssh::{RemoteProcess, Session};

const CHECK: &str = "between hosts";

/// What one host's listener said.
enum Listening {
    /// Bound to this port, accepting until its process is finished.
    On(u16),
    /// Not tested, and why (no python3, the listener did not start).
    Untested(String),
    /// The host is not connected.
    Absent,
}

/// Has every connected host connect to every other host's listener; one finding per host
/// that was reached from all the others, and one per pair that failed, filed under the host
/// that could not be reached (its firewall is the one to open).
pub(super) async fn between_hosts(
    printer: &Printer,
    inventory: &Inventory,
    sessions: &[Option<Session>],
    addrs: &[String],
) -> Vec<Finding> {
    if inventory.hosts.len() < 2 {
        return Vec::new();
    }
    let started = Instant::now();
    let (listening, processes): (Vec<Listening>, Vec<Option<RemoteProcess>>) =
        join_all(sessions.iter().map(|s| listen(s.as_ref())))
            .await
            .into_iter()
            .unzip();
    let answers = connect_pairs(sessions, &listening, addrs).await;
    let connections: usize = answers.iter().map(Vec::len).sum();
    join_all(processes.into_iter().flatten().map(RemoteProcess::finish)).await;

    let mut findings = Vec::new();
    for (to, listener) in listening.into_iter().enumerate() {
        let name = &inventory.hosts[to].name;
        match listener {
            Listening::On(port) => {
                let pairs = Pairs {
                    inventory,
                    sessions,
                    addrs,
                    answers: &answers,
                };
                findings.extend(pairs.findings_for(to, port));
            }
            Listening::Untested(why) => findings.push(pass(name, format!("not tested ({why})"))),
            Listening::Absent => {}
        }
    }
    printer.debug(&format!(
        "{CHECK}: {connections} connections in {} ms",
        started.elapsed().as_millis()
    ));
    findings
}

/// Has every connected host connect to every listening one, all at once: for each host, the
/// index of each host it tried and what happened.
async fn connect_pairs(
    sessions: &[Option<Session>],
    listening: &[Listening],
    addrs: &[String],
) -> Vec<Vec<(usize, String)>> {
    let ports: Vec<Option<u16>> = listening
        .iter()
        .map(|l| match l {
            Listening::On(port) => Some(*port),
            _ => None,
        })
        .collect();
    join_all(sessions.iter().enumerate().map(|(from, session)| {
        let targets: Vec<(usize, String, u16)> = ports
            .iter()
            .enumerate()
            .filter(|&(to, _)| to != from)
            .filter_map(|(to, port)| Some((to, addrs[to].clone(), (*port)?)))
            .collect();
        connect(session.as_ref(), targets)
    }))
    .await
}

/// What the pairs' connections found, to be judged one listening host at a time.
struct Pairs<'a> {
    inventory: &'a Inventory,
    sessions: &'a [Option<Session>],
    addrs: &'a [String],
    answers: &'a [Vec<(usize, String)>],
}

impl Pairs<'_> {
    /// The findings for host `to`, listening on `port`: reached from all the others, or one
    /// failure per host that could not reach it; hosts that could not test are noted.
    fn findings_for(&self, to: usize, port: u16) -> Vec<Finding> {
        let name = &self.inventory.hosts[to].name;
        let from = self.answers_about(to);
        // A host that cannot test (no python3) is not a firewall's doing: noted, not failed.
        let untested: Vec<&str> = from
            .iter()
            .filter(|(_, r)| r.starts_with("untested"))
            .map(|(f, _)| self.inventory.hosts[*f].name.as_str())
            .collect();
        let failed: Vec<&(usize, &str)> = from
            .iter()
            .filter(|(_, r)| *r != "ok" && !r.starts_with("untested"))
            .collect();
        let mut findings = Vec::new();
        if failed.is_empty() && untested.len() < from.len() {
            let count = from.len() - untested.len();
            let hosts = if count == 1 { "host" } else { "hosts" };
            findings.push(pass(
                name,
                format!("reached from {count} {hosts} on port {port}"),
            ));
        }
        for &&(from, result) in &failed {
            findings.push(self.failure(to, port, from, result));
        }
        if !untested.is_empty() {
            findings.push(pass(
                name,
                format!("not tested from {} (no python3)", untested.join(", ")),
            ));
        }
        findings
    }

    /// What each other connected host found when it tried to reach host `to`.
    fn answers_about(&self, to: usize) -> Vec<(usize, &str)> {
        self.answers
            .iter()
            .enumerate()
            .filter(|(from, _)| *from != to && self.sessions[*from].is_some())
            .map(|(from, answer)| {
                let result = answer
                    .iter()
                    .find(|(index, _)| *index == to)
                    .map_or("no answer", |(_, result)| result.as_str());
                (from, result)
            })
            .collect()
    }

    /// Host `from` could not reach host `to` on `port`: filed under `to`, whose firewall is the
    /// one to open.
    fn failure(&self, to: usize, port: u16, from: usize, result: &str) -> Finding {
        let name = &self.inventory.hosts[to].name;
        let from_name = &self.inventory.hosts[from].name;
        let why = match result {
            "timeout" => "timed out".to_string(),
            "refused" => "connection refused".to_string(),
            other => other.strip_prefix("error ").unwrap_or(other).to_string(),
        };
        Finding {
            check: CHECK.into(),
            host: Some(name.clone()),
            ok: false,
            detail: format!("{from_name} cannot reach {name} on port {port}: {why}"),
            fix: Some(fix(name, &self.addrs[from])),
            values: Vec::new(),
        }
    }
}

/// Starts a listener on a port the host's kernel picks: what it said, and its process while it
/// accepts.
async fn listen(session: Option<&Session>) -> (Listening, Option<RemoteProcess>) {
    let Some(session) = session else {
        return (Listening::Absent, None);
    };
    let Ok(mut process) = session.start(&listener_script(0, 30)).await else {
        return (
            Listening::Untested("the listener did not start".into()),
            None,
        );
    };
    let first = process.next_line().await.unwrap_or_default();
    let mut words = first.split_whitespace();
    match (words.next(), words.next().and_then(|p| p.parse().ok())) {
        (Some("listening"), Some(port)) => (Listening::On(port), Some(process)),
        _ => {
            process.finish().await;
            let why = if first.is_empty() {
                "the listener did not start".to_string()
            } else {
                first
            };
            (Listening::Untested(why), None)
        }
    }
}

/// Connects from one host to every target at once; the answer per target index.
async fn connect(
    session: Option<&Session>,
    targets: Vec<(usize, String, u16)>,
) -> Vec<(usize, String)> {
    let Some(session) = session else {
        return Vec::new();
    };
    if targets.is_empty() {
        return Vec::new();
    }
    let answered = session
        .capture(&pairs_script(CONNECT_SECONDS, &targets))
        .await;
    let text = match answered {
        Ok((_, out, err)) => {
            let out = String::from_utf8_lossy(&out).into_owned();
            if out.trim().is_empty() {
                format!("error {}", String::from_utf8_lossy(&err).trim())
            } else {
                out
            }
        }
        Err(e) => format!("error {e}"),
    };
    let answers: Vec<(usize, String)> = text
        .lines()
        .filter_map(|line| {
            let (index, result) = line.split_once(' ')?;
            Some((index.parse().ok()?, result.to_string()))
        })
        .collect();
    if answers.is_empty() {
        // No python3, or the script failed: every target gets that answer.
        let why = text.trim().to_string();
        let answer = if why == "no python3" {
            "untested".to_string()
        } else {
            format!("error cannot test: {why}")
        };
        return targets
            .into_iter()
            .map(|(index, _, _)| (index, answer.clone()))
            .collect();
    }
    answers
}

fn pass(host: &str, detail: String) -> Finding {
    Finding {
        check: CHECK.into(),
        host: Some(host.to_string()),
        ok: true,
        detail,
        fix: None,
        values: Vec::new(),
    }
}

/// How to let the other hosts in, with the LAN of `from` (the host that could not connect).
fn fix(host: &str, from: &str) -> String {
    let lan = match from.parse::<std::net::Ipv4Addr>() {
        Ok(ip) => {
            let [a, b, c, _] = ip.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        Err(_) => "<the LAN's prefix>".to_string(),
    };
    format!(
        "Gloo/NCCL connect every pair of hosts on random ports: allow the LAN on {host}, e.g. \
         sudo ufw allow from {lan} (firewalld: sudo firewall-cmd --permanent --zone=trusted --add-source={lan})"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn the_fix_names_the_lan_of_the_host_that_could_not_connect() {
        let text = fix("node2", "192.168.1.102");
        assert!(
            text.contains("allow the LAN on node2, e.g. sudo ufw allow from 192.168.1.0/24"),
            "{text}"
        );
        assert!(fix("node2", "gpu3.lab").contains("<the LAN's prefix>"));
    }

    /// The connecting script, run by a real `sh` here against a port that listens and one
    /// that does not.
    #[test]
    fn the_pairs_script_answers_for_every_target() {
        let open = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open_port = open.local_addr().unwrap().port();
        let closed_port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let script = pairs_script(
            3,
            &[
                (1, "127.0.0.1".into(), open_port),
                (4, "127.0.0.1".into(), closed_port),
            ],
        );
        let out = crate::remote::run_here("sh", Path::new("/"), &script, b"");
        let out = String::from_utf8_lossy(&out.stdout);
        let mut lines: Vec<&str> = out.lines().collect();
        lines.sort();
        assert_eq!(lines, ["1 ok", "4 refused"]);
    }
}
