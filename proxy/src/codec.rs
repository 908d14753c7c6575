//! Encoding and decoding of whole messages. WebSocket does the framing; one binary message is
//! one encoded value. Decoding validates (paths, sizes, trailing bytes) and never panics.

use serde::{de::DeserializeOwned, Serialize};

use crate::{ProtoError, MAX_MESSAGE_BYTES};

pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // postcard only fails to serialise types that serde cannot describe (maps with
    // non-string keys are fine, unknown lengths are not); the message types have none.
    postcard::to_stdvec(msg).unwrap_or_default()
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ProtoError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(ProtoError::TooLarge(bytes.len()));
    }
    let (value, rest) =
        postcard::take_from_bytes::<T>(bytes).map_err(|e| ProtoError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(ProtoError::TrailingBytes(rest.len()));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::*;
    use crate::tree::Entry;
    use crate::tunnel::{TunnelFrame, MAX_DATA_FRAME};
    use crate::RelPath;

    /// Every tunnel frame kind, with edge values (empty and full data, the largest ids).
    fn tunnel_frames() -> Vec<TunnelFrame> {
        vec![
            TunnelFrame::Open {
                stream: 1,
                port: 8080,
            },
            TunnelFrame::Open {
                stream: u64::MAX,
                port: u16::MAX,
            },
            TunnelFrame::Data {
                stream: 2,
                data: b"GET / HTTP/1.0\r\n\r\n".to_vec(),
            },
            TunnelFrame::Data {
                stream: 4,
                data: Vec::new(),
            },
            TunnelFrame::Data {
                stream: 6,
                data: vec![0xa5; MAX_DATA_FRAME],
            },
            TunnelFrame::Window {
                stream: 3,
                credit: 128 * 1024,
            },
            TunnelFrame::Window {
                stream: 3,
                credit: u32::MAX,
            },
            TunnelFrame::End { stream: 5 },
            TunnelFrame::Reset {
                stream: 7,
                reason: "connect to 127.0.0.1:8080: refused".into(),
            },
            TunnelFrame::Reset {
                stream: 9,
                reason: String::new(),
            },
        ]
    }

    fn samples() -> (Vec<LaptopMsg>, Vec<AgentMsg>) {
        let p = RelPath::new("src/app.py").unwrap();
        let laptop = vec![
            LaptopMsg::Hello(Hello {
                magic: crate::MAGIC,
                protocol_version: crate::PROTOCOL_VERSION,
                cli_version: "0.1.0".into(),
                capabilities: vec!["files".into()],
                token: "t0k3n".into(),
            }),
            LaptopMsg::Index { req: 1 },
            LaptopMsg::Batch {
                req: 2,
                ops: vec![
                    FileOp::Put {
                        path: p.clone(),
                        mode: 0o644,
                        data: b"print(1)\n".to_vec(),
                    },
                    FileOp::Mkdir {
                        path: RelPath::new("d").unwrap(),
                        mode: 0o755,
                    },
                    FileOp::Symlink {
                        path: RelPath::new("l").unwrap(),
                        target: "../x".into(),
                    },
                    FileOp::Delete { path: p.clone() },
                    FileOp::Chmod {
                        path: p.clone(),
                        mode: 0o755,
                    },
                ],
            },
            LaptopMsg::TarChunk {
                req: 3,
                data: vec![0; 1000],
                last: true,
            },
            LaptopMsg::Restart { req: 4 },
            LaptopMsg::Run {
                req: 5,
                argv: vec!["pip".into(), "install".into()],
            },
            LaptopMsg::Ping { nonce: u64::MAX },
        ];
        let laptop = laptop
            .into_iter()
            .chain(tunnel_frames().into_iter().map(LaptopMsg::Tunnel))
            .collect();
        let status = ProcessStatus {
            state: ProcessState::Running { pid: 42 },
            starts: 3,
            quick_exits: 1,
            last_exit: Some(ExitInfo {
                code: Some(1),
                signal: None,
                ran_ms: 10,
                at_ms: 99,
            }),
        };
        let agent = vec![
            AgentMsg::Welcome(Welcome {
                protocol_version: 1,
                agent_version: "0.1.0".into(),
                capabilities: vec![],
                root: "/app".into(),
                process: status.clone(),
                recent_logs: vec![LogLine {
                    stream: LogStream::Stderr,
                    at_ms: 1,
                    line: b"boom".to_vec(),
                }],
            }),
            AgentMsg::Refused {
                reason: "bad token".into(),
            },
            AgentMsg::Ack {
                req: 2,
                outcome: Outcome::Failed { error: "x".into() },
            },
            AgentMsg::Index {
                req: 1,
                entries: vec![
                    (
                        p.clone(),
                        Entry::File {
                            mode: 0o644,
                            size: 9,
                            hash: [7; 32],
                        },
                    ),
                    (RelPath::new("d").unwrap(), Entry::Dir { mode: 0o755 }),
                    (
                        RelPath::new("l").unwrap(),
                        Entry::Symlink { target: "x".into() },
                    ),
                ],
                last: true,
            },
            AgentMsg::Log(LogLine {
                stream: LogStream::Stdout,
                at_ms: 5,
                line: b"hi".to_vec(),
            }),
            AgentMsg::Process(status),
            AgentMsg::Pong { nonce: 7 },
        ];
        let agent = agent
            .into_iter()
            .chain(tunnel_frames().into_iter().map(AgentMsg::Tunnel))
            .collect();
        (laptop, agent)
    }

    #[test]
    fn round_trip() {
        let (laptop, agent) = samples();
        for m in laptop {
            assert_eq!(decode::<LaptopMsg>(&encode(&m)).unwrap(), m);
        }
        for m in agent {
            assert_eq!(decode::<AgentMsg>(&encode(&m)).unwrap(), m);
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let (laptop, agent) = samples();
        for m in laptop {
            let bytes = encode(&m);
            for cut in 0..bytes.len() {
                assert!(
                    decode::<LaptopMsg>(&bytes[..cut]).is_err(),
                    "{m:?} cut at {cut}"
                );
            }
        }
        for m in agent {
            let bytes = encode(&m);
            for cut in 0..bytes.len() {
                assert!(
                    decode::<AgentMsg>(&bytes[..cut]).is_err(),
                    "{m:?} cut at {cut}"
                );
            }
        }
    }

    /// The worked examples of docs/PROTOCOL.md, section "Tunnel streams".
    #[test]
    fn tunnel_frames_encode_as_documented() {
        let open = AgentMsg::Tunnel(TunnelFrame::Open {
            stream: 1,
            port: 8080,
        });
        assert_eq!(encode(&open), [0x07, 0x00, 0x01, 0x90, 0x3f]);
        let data = LaptopMsg::Tunnel(TunnelFrame::Data {
            stream: 1,
            data: b"hi".to_vec(),
        });
        assert_eq!(encode(&data), [0x07, 0x01, 0x01, 0x02, 0x68, 0x69]);
        let window = LaptopMsg::Tunnel(TunnelFrame::Window {
            stream: 1,
            credit: 131_072,
        });
        assert_eq!(encode(&window), [0x07, 0x02, 0x01, 0x80, 0x80, 0x08]);
        let end = AgentMsg::Tunnel(TunnelFrame::End { stream: 1 });
        assert_eq!(encode(&end), [0x07, 0x03, 0x01]);
        let reset = LaptopMsg::Tunnel(TunnelFrame::Reset {
            stream: 2,
            reason: "x".into(),
        });
        assert_eq!(encode(&reset), [0x07, 0x04, 0x02, 0x01, 0x78]);
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&LaptopMsg::Ping { nonce: 1 });
        bytes.push(0);
        assert_eq!(
            decode::<LaptopMsg>(&bytes),
            Err(ProtoError::TrailingBytes(1))
        );
    }

    #[test]
    fn escaping_path_in_a_batch_is_refused_at_decode() {
        // Encode a batch whose path was never validated: same shape, plain strings.
        #[derive(serde::Serialize)]
        enum Raw {
            _Hello(()),
            _Index(()),
            Batch { req: u64, ops: Vec<RawOp> },
        }
        #[derive(serde::Serialize)]
        enum RawOp {
            _Put(()),
            _Mkdir(()),
            _Symlink(()),
            Delete { path: String },
        }
        for evil in ["../../etc", "/etc", "a/../../b", ""] {
            let bytes = encode(&Raw::Batch {
                req: 1,
                ops: vec![RawOp::Delete { path: evil.into() }],
            });
            assert!(decode::<LaptopMsg>(&bytes).is_err(), "{evil}");
        }
        let bytes = encode(&Raw::Batch {
            req: 1,
            ops: vec![RawOp::Delete {
                path: "ok/x".into(),
            }],
        });
        assert!(decode::<LaptopMsg>(&bytes).is_ok());
    }

    /// A small deterministic generator, so the test needs no extra crate and failures replay.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let (laptop, agent) = samples();
        let seeds: Vec<Vec<u8>> = laptop
            .iter()
            .map(encode)
            .chain(agent.iter().map(encode))
            .collect();
        for i in 0..200_000u64 {
            let len = (rng.next() % 300) as usize;
            let mut bytes: Vec<u8> = if i % 2 == 0 {
                (0..len).map(|_| rng.next() as u8).collect()
            } else {
                // Mutate a valid message: flips keep most of the structure intact, which
                // reaches deeper into the decoder than pure noise.
                let mut b = seeds[(rng.next() as usize) % seeds.len()].clone();
                for _ in 0..1 + rng.next() % 4 {
                    if !b.is_empty() {
                        let at = (rng.next() as usize) % b.len();
                        b[at] = rng.next() as u8;
                    }
                }
                b
            };
            bytes.truncate(MAX_MESSAGE_BYTES);
            let _ = decode::<LaptopMsg>(&bytes);
            let _ = decode::<AgentMsg>(&bytes);
        }
    }

    #[test]
    fn oversized_message_is_refused_before_decoding() {
        let bytes = vec![0u8; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(
            decode::<LaptopMsg>(&bytes),
            Err(ProtoError::TooLarge(_))
        ));
    }
}
