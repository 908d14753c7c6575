//! The log hub: recent output of the supervised process in a ring buffer, the current process
//! status, and a broadcast of both to every connection. Publishing never waits for a reader, so
//! a slow cli can never block the process's pipes; a lagging receiver skips lines.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use devloop_proxy::msg::{LogLine, LogStream, ProcessState, ProcessStatus};
use tokio::sync::broadcast;

/// Lines kept for a cli that connects late.
pub const RING_LINES: usize = 200;
/// Bytes of recent lines sent in a welcome, so that it stays far below the message limit.
const RING_BYTES: usize = 4 * 1024 * 1024;
/// Events buffered per connection before a slow one starts to skip.
const BROADCAST_CAPACITY: usize = 4096;

#[derive(Debug, Clone)]
pub enum Event {
    Log(LogLine),
    Process(ProcessStatus),
}

/// The number of events published so far: a subscriber that has received or skipped up to
/// position `p` has seen every event published before [`Hub::position`] answered `p`.
pub type Position = u64;

struct State {
    ring: VecDeque<LogLine>,
    ring_bytes: usize,
    status: ProcessStatus,
    /// Events published so far (changed under the lock, with the send).
    published: Position,
}

pub struct Hub {
    state: Mutex<State>,
    event_tx: broadcast::Sender<Event>,
}

/// What a new connection starts from: a consistent snapshot and the events after it.
pub struct Subscription {
    pub recent_logs: Vec<LogLine>,
    pub status: ProcessStatus,
    pub event_rx: broadcast::Receiver<Event>,
    /// The position `event_rx` starts after.
    pub position: Position,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    pub fn new() -> Self {
        let (event_tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        Hub {
            state: Mutex::new(State {
                ring: VecDeque::new(),
                ring_bytes: 0,
                status: ProcessStatus::initial(ProcessState::NoCommand),
                published: 0,
            }),
            event_tx,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the ring in a usable state (plain pushes), so
        // a poisoned lock is simply taken over.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn log(&self, stream: LogStream, line: Vec<u8>) {
        let line = LogLine {
            stream,
            at_ms: now_ms(),
            line,
        };
        let mut state = self.lock();
        state.ring_bytes += line.line.len();
        state.ring.push_back(line.clone());
        while state.ring.len() > RING_LINES
            || (state.ring_bytes > RING_BYTES && state.ring.len() > 1)
        {
            if let Some(old) = state.ring.pop_front() {
                state.ring_bytes -= old.line.len();
            }
        }
        // Sent under the lock so that a subscriber never sees a line twice or misses one.
        state.published += 1;
        let _ = self.event_tx.send(Event::Log(line));
    }

    /// A line of the agent's own (starts, exits, restarts); also goes to the agent's log.
    pub fn agent_line(&self, text: impl Into<String>) {
        let text = text.into();
        tracing::info!(target: "devloop_agent::process", "{text}");
        self.log(LogStream::Agent, text.into_bytes());
    }

    /// How many events have been published so far; see [`Position`].
    pub fn position(&self) -> Position {
        self.lock().published
    }

    pub fn set_status(&self, status: ProcessStatus) {
        let mut state = self.lock();
        state.status = status.clone();
        state.published += 1;
        let _ = self.event_tx.send(Event::Process(status));
    }

    pub fn status(&self) -> ProcessStatus {
        self.lock().status.clone()
    }

    pub fn subscribe(&self) -> Subscription {
        let state = self.lock();
        Subscription {
            recent_logs: state.ring.iter().cloned().collect(),
            status: state.status.clone(),
            event_rx: self.event_tx.subscribe(),
            position: state.published,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_last_lines_and_subscribers_see_the_rest() {
        let hub = Hub::new();
        for i in 0..RING_LINES + 50 {
            hub.log(LogStream::Stdout, format!("line {i}").into_bytes());
        }
        let mut sub = hub.subscribe();
        assert_eq!(sub.recent_logs.len(), RING_LINES);
        assert_eq!(sub.recent_logs[0].line, b"line 50");
        hub.log(LogStream::Stderr, b"after".to_vec());
        match sub.event_rx.try_recv().unwrap() {
            Event::Log(l) => assert_eq!(l.line, b"after"),
            other => panic!("{other:?}"),
        }
    }
}
