//! The in-process tier of the cli's end of a connection ([`AgentLink`]), against a scripted
//! agent on an in-memory stream: every request that waits for an answer gives up at its own
//! limit (short ones here, [`Limits`]; the defaults are checked to be the documented ones), a
//! refusal and a dropped connection end the waits at once, and a flood of log lines that
//! nobody reads does not hold up an answer.

use std::time::Duration;

use devloop::agent_link::{AgentLink, Connected, Limits, LinkError};
use devloop_proxy::codec::{decode, encode};
use devloop_proxy::msg::{
    AgentMsg, LaptopMsg, LogLine, LogStream, Outcome, ProcessState, ProcessStatus, Welcome,
};
use futures_util::{SinkExt, StreamExt};
use std::time::Instant;
use tokio::io::DuplexStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<DuplexStream>;

/// Each kind of wait with a limit of its own, so a test tells which one ended it.
const LIMITS: Limits = Limits {
    handshake: Duration::from_millis(300),
    answer: Duration::from_millis(200),
    index: Duration::from_millis(400),
    run: Duration::from_millis(600),
};

fn welcome() -> AgentMsg {
    AgentMsg::Welcome(Welcome {
        protocol_version: devloop_proxy::PROTOCOL_VERSION,
        agent_version: "scripted".into(),
        capabilities: Vec::new(),
        root: "/app".into(),
        process: ProcessStatus::initial(ProcessState::NoCommand),
        recent_logs: Vec::new(),
    })
}

async fn send(ws: &mut Ws, msg: &AgentMsg) {
    ws.send(Message::Binary(encode(msg).into())).await.unwrap();
}

/// The next protocol message from the cli (None once the connection is gone).
async fn next(ws: &mut Ws) -> Option<LaptopMsg> {
    loop {
        match ws.next().await? {
            Ok(Message::Binary(b)) => return Some(decode(&b).unwrap()),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// A cli connected to a scripted agent, which has read the hello and answered `first`.
async fn pair(first: Option<AgentMsg>) -> (Result<Connected, LinkError>, Ws) {
    let (cli_io, agent_io) = tokio::io::duplex(1 << 20);
    let agent = tokio::spawn(async move {
        let mut ws = tokio_tungstenite::accept_async(agent_io).await.unwrap();
        assert!(matches!(next(&mut ws).await, Some(LaptopMsg::Hello(_))));
        if let Some(m) = first {
            send(&mut ws, &m).await;
        }
        ws
    });
    let link = AgentLink::connect_with(cli_io, "token", LIMITS).await;
    (link, agent.await.unwrap())
}

#[tokio::test]
async fn a_handshake_without_a_welcome_times_out() {
    let t = Instant::now();
    let (link, _agent) = tokio::time::timeout(Duration::from_secs(10), pair(None))
        .await
        .expect("the handshake has no limit");
    match link {
        Err(LinkError::Timeout(d)) => assert!(t.elapsed() >= d, "{:?} < {d:?}", t.elapsed()),
        other => panic!("expected a timeout, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn a_refusal_ends_the_handshake_at_once() {
    let t = Instant::now();
    let (link, _agent) = pair(Some(AgentMsg::Refused {
        reason: "bad token".into(),
    }))
    .await;
    match link {
        Err(LinkError::Refused(r)) => assert_eq!(r, "bad token"),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    assert!(t.elapsed() < Duration::from_secs(1));
}

/// Each kind of request, unanswered, fails with its own limit; the agent saw the request.
#[tokio::test]
async fn every_request_that_waits_for_an_answer_times_out() {
    for (what, limit) in [
        ("batch", LIMITS.answer),
        ("restart", LIMITS.answer),
        ("index", LIMITS.index),
        ("run", LIMITS.run),
    ] {
        let (link, mut agent) = pair(Some(welcome())).await;
        let Connected { link, .. } = link.unwrap();
        // The agent reads the request and never answers it.
        let seen = tokio::spawn(async move {
            let m = next(&mut agent).await;
            (m, agent)
        });
        let t = Instant::now();
        let request = async {
            match what {
                "batch" => link.batch(Vec::new()).await.map(|_| ()),
                "restart" => link.restart().await,
                "index" => link.index().await.map(|_| ()),
                _ => link.run(vec!["true".into()]).await.map(|_| ()),
            }
        };
        // A request with no limit would wait forever: this test fails instead of hanging.
        let err = tokio::time::timeout(limit + Duration::from_secs(5), request)
            .await
            .unwrap_or_else(|_| panic!("{what} has no limit"))
            .unwrap_err();
        assert!(
            matches!(err, LinkError::Timeout(d) if d == limit),
            "{what}: {err}"
        );
        assert!(t.elapsed() >= limit, "{what} gave up early");
        assert!(
            t.elapsed() < limit + Duration::from_secs(2),
            "{what} waited too long"
        );
        let (m, _agent) = seen.await.unwrap();
        assert!(m.is_some(), "{what} never reached the agent");
    }
}

/// An agent that goes away fails the waiting request now, not at its timeout.
#[tokio::test]
async fn a_dropped_connection_fails_the_waiting_request_at_once() {
    let (link, mut agent) = pair(Some(welcome())).await;
    let Connected { link, .. } = link.unwrap();
    let t = Instant::now();
    let dropper = tokio::spawn(async move {
        assert!(matches!(
            next(&mut agent).await,
            Some(LaptopMsg::Batch { .. })
        ));
        drop(agent);
    });
    let err = link.batch(Vec::new()).await.unwrap_err();
    dropper.await.unwrap();
    assert!(matches!(err, LinkError::Closed), "{err}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // And the link says it is closed.
    tokio::time::timeout(Duration::from_secs(1), link.closed())
        .await
        .expect("closed() did not return");
}

/// Log lines the cli does not read fill its event channel; the answer behind them still
/// arrives (events are dropped when the channel is full, never awaited).
#[tokio::test]
async fn a_flood_of_unread_logs_does_not_hold_up_an_answer() {
    let (cli_io, agent_io) = tokio::io::duplex(1 << 20);
    let agent = tokio::spawn(async move {
        let mut ws = tokio_tungstenite::accept_async(agent_io).await.unwrap();
        assert!(matches!(next(&mut ws).await, Some(LaptopMsg::Hello(_))));
        send(&mut ws, &welcome()).await;
        ws
    });
    // The default limits: a flood takes longer than this test's short ones allow.
    let Connected { link, events, .. } = AgentLink::connect(cli_io, "token").await.unwrap();
    let mut agent = agent.await.unwrap();
    let flood = tokio::spawn(async move {
        let Some(LaptopMsg::Batch { req, .. }) = next(&mut agent).await else {
            panic!("expected a batch");
        };
        for i in 0..20_000u32 {
            send(
                &mut agent,
                &AgentMsg::Log(LogLine {
                    stream: LogStream::Stdout,
                    at_ms: 0,
                    line: format!("line {i}").into_bytes(),
                }),
            )
            .await;
        }
        send(
            &mut agent,
            &AgentMsg::Ack {
                req,
                outcome: Outcome::Ok { applied: 0 },
            },
        )
        .await;
        agent
    });
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(30), link.batch(Vec::new()))
        .await
        .expect("the ack is stuck behind the unread logs")
        .expect("the ack behind the flood");
    assert!(t.elapsed() < Duration::from_secs(30));
    let _agent = flood.await.unwrap();
    // The channel kept what fits and dropped the rest; nothing blocked.
    let mut events = events;
    let mut kept = 0;
    while events.try_recv().is_ok() {
        kept += 1;
    }
    assert!(kept > 0 && kept < 20_000, "kept {kept} of 20000");
}

#[test]
fn the_default_limits_are_the_documented_ones() {
    let d = Limits::default();
    assert_eq!(d.handshake, Duration::from_secs(10));
    assert_eq!(d.answer, Duration::from_secs(120));
    assert_eq!(d.index, Duration::from_secs(600));
    assert_eq!(d.run, Duration::from_secs(1800));
}
