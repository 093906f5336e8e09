//! `fleet run`: every rank started at once, one merged log, and everything stopped when
//! anything fails.
//!
//! [`plan`] decides the processes and their environment (pure), [`remote`] writes the shell that
//! starts, signals and records them in the job folder on each host, [`follow`] reads their logs
//! and exit files over SFTP, and [`supervise`] owns the one loop that decides when to stop.
//! [`training`] reads fleet-train's events from the log (the live status line) and [`plot`] draws
//! its curves at the end.

pub mod follow;
pub mod plan;
pub mod plot;
pub mod remote;
pub mod supervise;
pub mod training;

pub use plan::{JobPlan, Mode, Process, new_job_id, plan};
