//! Named points in long operations where a test can stop the cli: with
//! `DEVLOOP_FAILPOINT=NAME`, reaching the point NAME prints `devloop: failpoint NAME` and
//! waits forever, so a test kills the process exactly there (SIGKILL at each step of a
//! deploy) and checks that the next command finishes or undoes what was left. Unset (as for
//! every user), a point costs one environment lookup.

/// Stops here forever when `DEVLOOP_FAILPOINT` names this point.
pub fn pause(name: &str) {
    if std::env::var("DEVLOOP_FAILPOINT").as_deref() == Ok(name) {
        eprintln!("devloop: failpoint {name}");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
