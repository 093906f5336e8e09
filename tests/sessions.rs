//! Runs back to back leak no SSH session (sshd allows 10 per connection) and no process.
//! Alone in its test binary: it counts sshd processes, which tests running beside it would add.

mod common;

use std::path::PathBuf;

use common::{Fleet, Testbed};

struct Job {
    tb: Testbed,
    _source: tempfile::TempDir,
    _config: tempfile::TempDir,
    inventory: PathBuf,
}

impl Job {
    fn new(name: &str) -> Job {
        let tb = Testbed::get();
        let source = tempfile::tempdir().unwrap();
        std::fs::write(source.path().join("README"), "a job\n").unwrap();
        let config = tempfile::tempdir().unwrap();
        let inventory = tb.sync_inventory(config.path(), name, source.path());
        Job {
            tb,
            _source: source,
            _config: config,
            inventory,
        }
    }

    fn fleet(&self, args: &[&str]) -> Fleet {
        Fleet::new().arg("-i").arg(&self.inventory).args(args)
    }
}

#[test]
fn runs_back_to_back_leave_no_session_behind() {
    let job = Job::new("run-repeat");
    let sessions = |job: &Job| -> Vec<usize> {
        job.tb
            .hosts
            .iter()
            .map(|h| {
                job.tb
                    .ssh(&h.name, "pgrep -c -x sshd || true")
                    .trim()
                    .parse()
                    .unwrap()
            })
            .collect()
    };
    job.fleet(&["run", "--", "true"]).run().assert_code(0);
    let before = sessions(&job);
    for _ in 0..10 {
        job.fleet(&["run", "--no-sync", "--", "true"])
            .run()
            .assert_code(0);
    }
    assert_eq!(sessions(&job), before);
}
