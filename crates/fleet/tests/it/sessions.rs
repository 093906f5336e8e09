//! Runs back to back leak no SSH session (sshd allows 10 per connection) and no process.
//! It has the test bed alone (`Testbed::alone`): it counts sshd processes, which tests running
//! beside it would add.

use fleet_testkit as common;

use common::{Project, Testbed};

#[test]
fn runs_back_to_back_leave_no_session_behind() {
    Testbed::alone();
    let job = Project::new("run-repeat");
    job.write("README", "a job\n");
    let sessions = |job: &Project| -> Vec<usize> {
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
    for _ in 0..20 {
        job.fleet(&["run", "--no-sync", "--", "true"])
            .run()
            .assert_code(0);
    }
    assert_eq!(sessions(&job), before);
    // Nor a process: every rank's wrapper has ended.
    assert_eq!(job.remaining("fleet-rank"), Vec::<String>::new());
}
