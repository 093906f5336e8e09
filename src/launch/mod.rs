//! `fleet run`: every rank started at once, one merged log, and everything stopped when
//! anything fails.
//!
//! [`plan`] decides the processes and their environment (pure), [`remote`] writes the shell that
//! starts, signals and records them in the job folder on each host, [`follow`] reads their logs
//! and exit files over SFTP, and [`supervise`] owns the one loop that decides when to stop.

pub mod follow;
pub mod plan;
pub mod remote;
pub mod supervise;

pub use plan::{JobPlan, Mode, Process, new_job_id, plan};
