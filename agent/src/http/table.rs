//! The routing table: who holds which requests of a service, and where the rest go.
//!
//! One table per intercepted service. Holders register with a filter; [`Table::route`]
//! picks, for one request, the holder that takes it (by [`route::precedence`]) and every
//! mirror that wants a copy. Nothing here does I/O: destinations are [`Dialer`]s that the
//! engine calls.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use devloop_proxy::route::{self, Filter, FilterError, Matcher, RequestHead};
use futures_util::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream to a destination: a TCP connection to the original, a tunnel stream or a
/// handed-over socket to a laptop.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

pub type BoxIo = Pin<Box<dyn Io>>;

/// Opens connections to one destination.
pub trait Dialer: Send + Sync {
    fn dial(&self) -> BoxFuture<'_, io::Result<BoxIo>>;
    /// For messages: "the original (10.0.0.5:8000)", "alice@laptop".
    fn name(&self) -> String;
}

/// Whether a holder takes the requests it matches or gets a copy of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Take,
    Mirror,
}

/// Counters a holder's requests update; read by `intercept list`.
#[derive(Debug, Default)]
pub struct Counts {
    /// Requests taken, or for a mirror, copies started.
    pub requests: AtomicU64,
    /// Copies a mirror could not take (queue full, laptop gone, too many under way).
    pub dropped: AtomicU64,
    /// Copies under way.
    pub in_flight: AtomicU64,
}

pub struct Holder {
    pub id: u64,
    /// Order of registration: between equal filters the earlier holder wins.
    pub seq: u64,
    pub mode: Mode,
    pub matcher: Matcher,
    pub dialer: Arc<dyn Dialer>,
    pub counts: Arc<Counts>,
}

/// Where one request goes.
pub struct Decision {
    /// The holder that takes it, or `None` for the original.
    pub taker: Option<Arc<Holder>>,
    /// Mirrors that get a copy.
    pub mirrors: Vec<Arc<Holder>>,
}

/// A service's routing table. Readers take a snapshot (an `Arc` clone under a read lock), so
/// a holder registering never waits on requests in flight, and the reverse.
pub struct Table {
    original: Arc<dyn Dialer>,
    holders: RwLock<Arc<Vec<Arc<Holder>>>>,
    next_seq: AtomicU64,
}

impl Table {
    pub fn new(original: Arc<dyn Dialer>) -> Self {
        Table {
            original,
            holders: RwLock::new(Arc::new(Vec::new())),
            next_seq: AtomicU64::new(1),
        }
    }

    pub fn original(&self) -> &Arc<dyn Dialer> {
        &self.original
    }

    /// Registers a holder; its filter is compiled (and refused if it cannot work) first.
    /// Returns the holders whose requests may overlap with the new one's (by
    /// [`Filter::disjoint`]), for the report.
    pub fn add(
        &self,
        id: u64,
        mode: Mode,
        filter: &Filter,
        dialer: Arc<dyn Dialer>,
    ) -> Result<(Arc<Holder>, Vec<Arc<Holder>>), FilterError> {
        let matcher = filter.compile()?;
        let holder = Arc::new(Holder {
            id,
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            mode,
            matcher,
            dialer,
            counts: Arc::default(),
        });
        let mut holders = self.holders.write().unwrap_or_else(|e| e.into_inner());
        let overlapping = holders
            .iter()
            .filter(|h| h.mode == mode && !h.matcher.filter().disjoint(filter))
            .cloned()
            .collect();
        let mut next = Vec::clone(&holders);
        next.push(holder.clone());
        *holders = Arc::new(next);
        Ok((holder, overlapping))
    }

    /// Removes a holder; `false` when there was none with that id.
    pub fn remove(&self, id: u64) -> bool {
        let mut holders = self.holders.write().unwrap_or_else(|e| e.into_inner());
        let before = holders.len();
        let next: Vec<_> = holders.iter().filter(|h| h.id != id).cloned().collect();
        let removed = next.len() != before;
        *holders = Arc::new(next);
        removed
    }

    pub fn holders(&self) -> Arc<Vec<Arc<Holder>>> {
        self.holders
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Where `req` goes.
    pub fn route(&self, req: &dyn RequestHead) -> Decision {
        let holders = self.holders();
        let mut taker: Option<&Arc<Holder>> = None;
        let mut mirrors = Vec::new();
        for h in holders.iter() {
            if !h.matcher.matches(req) {
                continue;
            }
            match h.mode {
                Mode::Mirror => mirrors.push(h.clone()),
                Mode::Take => {
                    let better = taker.is_none_or(|t| {
                        route::precedence((h.matcher.filter(), h.seq), (t.matcher.filter(), t.seq))
                            .is_lt()
                    });
                    if better {
                        taker = Some(h);
                    }
                }
            }
        }
        Decision {
            taker: taker.cloned(),
            mirrors,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devloop_proxy::route::{HeaderMatch, PathMatch, PlainHead};

    struct Nowhere(&'static str);

    impl Dialer for Nowhere {
        fn dial(&self) -> BoxFuture<'_, io::Result<BoxIo>> {
            Box::pin(async { Err(io::Error::other("not in this test")) })
        }
        fn name(&self) -> String {
            self.0.into()
        }
    }

    fn req(method: &str, path: &str, headers: Vec<(&str, &str)>) -> PlainHead {
        let headers: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
        PlainHead::new(method, path, &headers)
    }

    fn header(arg: &str) -> Filter {
        Filter {
            headers: vec![HeaderMatch::parse(arg).unwrap()],
            ..Filter::default()
        }
    }

    fn prefix(p: &str) -> Filter {
        Filter {
            path: Some(PathMatch::Prefix(p.into())),
            ..Filter::default()
        }
    }

    fn taker(t: &Table, r: &PlainHead) -> Option<u64> {
        t.route(r).taker.map(|h| h.id)
    }

    #[test]
    fn the_most_specific_then_the_earliest_holder_takes_a_request() {
        let t = Table::new(Arc::new(Nowhere("original")));
        let d = || Arc::new(Nowhere("laptop")) as Arc<dyn Dialer>;
        let (_, overlap) = t.add(1, Mode::Take, &prefix("/v2/"), d()).unwrap();
        assert!(overlap.is_empty());
        let (_, overlap) = t.add(2, Mode::Take, &header("x-dev=alice"), d()).unwrap();
        assert_eq!(overlap.iter().map(|h| h.id).collect::<Vec<_>>(), vec![1]);
        let (_, overlap) = t.add(3, Mode::Take, &header("x-dev=bob"), d()).unwrap();
        assert_eq!(overlap.iter().map(|h| h.id).collect::<Vec<_>>(), vec![1]);
        let (_, overlap) = t.add(4, Mode::Take, &prefix("/v2/a"), d()).unwrap();
        assert_eq!(
            overlap.iter().map(|h| h.id).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );

        let alice_v2 = req("GET", "/v2/a", vec![("x-dev", "alice")]);
        assert_eq!(taker(&t, &alice_v2), Some(2));
        assert_eq!(taker(&t, &req("GET", "/v2/a", vec![])), Some(1));
        assert_eq!(
            taker(&t, &req("GET", "/v1", vec![("x-dev", "bob")])),
            Some(3)
        );
        assert_eq!(
            taker(&t, &req("GET", "/v1", vec![("x-dev", "carol")])),
            None
        );

        // Leaving one changes nothing for the others.
        assert!(t.remove(1));
        assert!(!t.remove(1));
        assert_eq!(taker(&t, &req("GET", "/v2/a", vec![])), Some(4));
        assert_eq!(taker(&t, &alice_v2), Some(2));
    }

    #[test]
    fn mirrors_get_copies_whoever_takes_the_request() {
        let t = Table::new(Arc::new(Nowhere("original")));
        let d = || Arc::new(Nowhere("laptop")) as Arc<dyn Dialer>;
        t.add(1, Mode::Take, &header("x-dev=alice"), d()).unwrap();
        t.add(2, Mode::Mirror, &Filter::default(), d()).unwrap();
        t.add(3, Mode::Mirror, &prefix("/v2/"), d()).unwrap();
        let r = t.route(&req("GET", "/v2/x", vec![("x-dev", "alice")]));
        assert_eq!(r.taker.map(|h| h.id), Some(1));
        assert_eq!(
            r.mirrors.iter().map(|h| h.id).collect::<Vec<_>>(),
            vec![2, 3]
        );
        let r = t.route(&req("GET", "/v1", vec![]));
        assert!(r.taker.is_none());
        assert_eq!(r.mirrors.iter().map(|h| h.id).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn a_filter_that_cannot_work_is_not_registered() {
        let t = Table::new(Arc::new(Nowhere("original")));
        let bad = header("x-dev~(");
        assert!(t
            .add(1, Mode::Take, &bad, Arc::new(Nowhere("laptop")))
            .is_err());
        assert!(t.holders().is_empty());
    }
}
