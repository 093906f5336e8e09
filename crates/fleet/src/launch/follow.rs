//! Reads one host's process logs and exit files over SFTP, from an offset, as they grow.
//!
//! Nothing runs on the host on fleet's behalf: a follower that is interrupted leaves nothing
//! behind, and following again from any offset (`fleet logs -f`) shows every line.

use std::time::Duration;

use russh_sftp::client::RawSftpSession;
use russh_sftp::client::error::Error as SftpError;
use russh_sftp::protocol::{FileAttributes, OpenFlags, StatusCode};
use tokio::sync::mpsc;

/// What followers report to the supervisor.
#[derive(Debug)]
pub enum Event {
    /// The process wrote its start time (ns since the epoch).
    Started { process: usize, at_ns: u128 },
    /// More of its output.
    Output { process: usize, bytes: Vec<u8> },
    /// It ended; every byte of its output was sent before this.
    Exited { process: usize, code: i32 },
    /// The host stopped answering: its processes' fate is unknown.
    Lost { host: usize, error: String },
    /// Not following: the end of its log so far was reached and it is still running.
    Caught { process: usize },
}

/// Bytes asked for per read.
const READ_LEN: u32 = 256 * 1024;
/// Longest pause between polls of an idle log.
const MAX_IDLE: Duration = Duration::from_millis(200);

/// One process to follow: its files under `dir` (absolute on the host).
pub struct Followed {
    pub process: usize,
    pub stem: String,
    /// Where to start reading its log.
    pub offset: u64,
    /// Keep reading until it exits (`fleet run`, `fleet logs -f`), or stop at the current end.
    pub until_exit: bool,
}

/// Follows every given process of one host until each has ended. Returns early with
/// [`Event::Lost`] when SFTP fails.
pub async fn follow_host(
    sftp: RawSftpSession,
    host: usize,
    dir: String,
    processes: Vec<Followed>,
    events: mpsc::Sender<Event>,
) {
    let followers = processes
        .into_iter()
        .map(|p| follow_one(&sftp, &dir, p, &events));
    let results = futures::future::join_all(followers).await;
    if let Some(Err(error)) = results.into_iter().find(Result::is_err) {
        let _ = events
            .send(Event::Lost {
                host,
                error: error.to_string(),
            })
            .await;
    }
    let _ = sftp.close_session();
}

async fn follow_one(
    sftp: &RawSftpSession,
    dir: &str,
    followed: Followed,
    events: &mpsc::Sender<Event>,
) -> Result<(), SftpError> {
    let base = format!("{dir}/{}", followed.stem);
    let process = followed.process;
    let mut idle = Duration::from_millis(5);

    // The wrapper writes the start time first, then creates the log.
    let started = loop {
        if let Some(text) = read_small(sftp, &format!("{base}.start")).await? {
            if let Ok(at_ns) = text.trim().parse::<u128>() {
                break at_ns;
            }
        }
        pause(&mut idle).await;
    };
    let _ = events
        .send(Event::Started {
            process,
            at_ns: started,
        })
        .await;

    let log = loop {
        match sftp
            .open(
                format!("{base}.log"),
                OpenFlags::READ,
                FileAttributes::default(),
            )
            .await
        {
            Ok(handle) => break handle.handle,
            Err(e) if is_missing(&e) => {
                // A process stopped before it started has an exit and may have no log.
                if let Some(text) = read_small(sftp, &format!("{base}.exit")).await? {
                    let code = text.trim().parse().unwrap_or(-1);
                    let _ = events.send(Event::Exited { process, code }).await;
                    return Ok(());
                }
                pause(&mut idle).await
            }
            Err(e) => return Err(e),
        }
    };
    let mut offset = followed.offset;
    let mut ended: Option<i32> = None;
    loop {
        match sftp.read(log.as_str(), offset, READ_LEN).await {
            Ok(data) if !data.data.is_empty() => {
                offset += data.data.len() as u64;
                idle = Duration::from_millis(5);
                if events
                    .send(Event::Output {
                        process,
                        bytes: data.data,
                    })
                    .await
                    .is_err()
                {
                    break;
                }
                continue;
            }
            Ok(_) => {}
            Err(SftpError::Status(status)) if status.status_code == StatusCode::Eof => {}
            Err(e) => return Err(e),
        }
        // At the end of the log: finished only if the exit file was there *before* this read,
        // so output written just before exiting is never missed.
        if let Some(code) = ended {
            let _ = events.send(Event::Exited { process, code }).await;
            break;
        }
        if let Some(text) = read_small(sftp, &format!("{base}.exit")).await? {
            ended = Some(text.trim().parse().unwrap_or(-1));
            continue;
        }
        if !followed.until_exit {
            let _ = events.send(Event::Caught { process }).await;
            break;
        }
        pause(&mut idle).await;
    }
    let _ = sftp.close(log.as_str()).await;
    Ok(())
}

/// Backs off while nothing happens: 5 ms doubling up to 200 ms.
async fn pause(idle: &mut Duration) {
    tokio::time::sleep(*idle).await;
    *idle = (*idle * 2).min(MAX_IDLE);
}

fn is_missing(e: &SftpError) -> bool {
    matches!(e, SftpError::Status(s) if s.status_code == StatusCode::NoSuchFile)
}

/// The whole of a small file, or `None` when it does not exist yet.
async fn read_small(sftp: &RawSftpSession, path: &str) -> Result<Option<String>, SftpError> {
    let handle = match sftp
        .open(path, OpenFlags::READ, FileAttributes::default())
        .await
    {
        Ok(h) => h.handle,
        Err(e) if is_missing(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    let data = match sftp.read(handle.as_str(), 0, 4096).await {
        Ok(d) => d.data,
        Err(SftpError::Status(s)) if s.status_code == StatusCode::Eof => Vec::new(),
        Err(e) => {
            let _ = sftp.close(handle.as_str()).await;
            return Err(e);
        }
    };
    let _ = sftp.close(handle.as_str()).await;
    Ok(Some(String::from_utf8_lossy(&data).into_owned()))
}
