//! The one place that turns signals into cancellation. The first call to [`shutdown`]
//! installs the handlers (SIGINT, SIGTERM, SIGHUP); from then on a signal cancels one
//! process-wide token instead of killing the process, so every wait in a command selects on
//! that token and the command undoes what it changed before it exits. Commands that never
//! ask keep the default behaviour (a signal ends them at once).

use std::sync::OnceLock;
use tokio_util::sync::CancellationToken;

static SHUTDOWN: OnceLock<CancellationToken> = OnceLock::new();

/// The process's shutdown token, cancelled by the first SIGINT, SIGTERM or SIGHUP. Needs a
/// tokio runtime on the first call (the handlers are tasks of it).
pub fn shutdown() -> CancellationToken {
    SHUTDOWN
        .get_or_init(|| {
            let token = CancellationToken::new();
            install(token.clone());
            token
        })
        .clone()
}

fn install(token: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let kinds = [
        (SignalKind::interrupt(), "SIGINT"),
        (SignalKind::terminate(), "SIGTERM"),
        (SignalKind::hangup(), "SIGHUP"),
    ];
    for (kind, name) in kinds {
        // Registering fails only when the signal cannot be handled at all (not for these);
        // the process then keeps that signal's default action, which is logged.
        let mut stream = match signal(kind) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(signal = name, error = %e, "cannot handle the signal");
                continue;
            }
        };
        let token = token.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if token.is_cancelled() {
                    // A second signal while the command undoes its changes: say that it is
                    // still working rather than die halfway through the undo.
                    eprintln!("devloop: {name} again: still putting things back, please wait (kill -9 leaves them for `devloop leave` / `devloop down`)");
                } else {
                    tracing::info!(signal = name, "shutting down");
                    token.cancel();
                }
            }
        });
    }
}

/// Runs `fut` unless `shutdown` comes first; `Err(Interrupted)` then. Only for steps that
/// change nothing (waits, reads): a step that changes something runs to its end and the
/// caller checks the token afterwards, so no request is cut off halfway.
pub async fn unless_cancelled<F: std::future::Future>(
    shutdown: &CancellationToken,
    fut: F,
) -> Result<F::Output, Interrupted> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => Err(Interrupted),
        out = fut => Ok(out),
    }
}

/// `Err(Interrupted)` once `shutdown` is cancelled.
pub fn check(shutdown: &CancellationToken) -> Result<(), Interrupted> {
    if shutdown.is_cancelled() {
        Err(Interrupted)
    } else {
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_signal_cancels_the_token_and_the_process_survives() {
        let token = shutdown();
        assert_eq!(check(&token), Ok(()));
        let t = token.clone();
        let waiter =
            tokio::spawn(async move { unless_cancelled(&t, std::future::pending::<()>()).await });
        tokio::task::yield_now().await;
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), token.cancelled())
            .await
            .expect("SIGTERM cancels the shutdown token");
        assert_eq!(waiter.await.unwrap(), Err(Interrupted));
        assert_eq!(check(&token), Err(Interrupted));
    }
}
