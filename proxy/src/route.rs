//! Which requests a holder of a filtered intercept takes: the filter a cli sends, how the
//! agent matches a request against it, and the rule that settles overlaps.
//!
//! A [`Filter`] is plain data (it crosses the wire inside the intercept messages); [`Filter::compile`]
//! checks it and gives the [`Matcher`] that both sides use: the cli compiles it before it
//! changes anything, so a filter that cannot work (a bad regex, a header name that is not a
//! token) is refused up front; the agent compiles it again when a holder registers.
//!
//! The conditions of one filter are ANDed. Header names are matched without regard to case
//! (HTTP/2 sends them in lower case anyway); values byte for byte. A request with several
//! fields of one name matches when any of them does. Regexes are matched against the whole
//! value or path (`x-dev~alice|bob` takes exactly those two), in linear time (the `regex`
//! crate) and with a bounded size. Paths are the request target's path, without the query,
//! as sent (not percent-decoded).

use std::cmp::Ordering;

use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};

/// Longest header name, value, path or regex a filter may hold.
pub const MAX_PATTERN_BYTES: usize = 1024;

/// Most conditions in one filter.
pub const MAX_CONDITIONS: usize = 16;

/// The compiled size a regex may take (the `regex` crate's own limit is 10 MiB).
const REGEX_SIZE_LIMIT: usize = 256 * 1024;

/// The W3C `baggage` entry that `--key` stands for.
pub const SESSION_BAGGAGE_KEY: &str = "devloop-session";

/// The requests one holder takes (or copies, for a mirror). An empty filter takes every
/// request.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Filter {
    pub headers: Vec<HeaderMatch>,
    pub path: Option<PathMatch>,
    /// Upper case, as HTTP spells methods.
    pub method: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderMatch {
    /// Lower case.
    pub name: String,
    pub value: ValueMatch,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueMatch {
    Exact(String),
    Regex(String),
    /// A list member `key=value` of a W3C `baggage` field (the value percent-decoded).
    Baggage {
        key: String,
        value: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("`{0}` is not NAME=VALUE or NAME~REGEX")]
    HeaderSyntax(String),
    #[error("`{0}` is not a header name (letters, digits and !#$%&'*+-.^_`|~ only)")]
    HeaderName(String),
    #[error("the value of header `{0}` holds a line break or another control character")]
    HeaderValue(String),
    #[error("`{0}` is not a method (upper-case letters, such as GET or POST)")]
    Method(String),
    #[error("a path must start with `/`: `{0}`")]
    Path(String),
    #[error("`{pattern}` is not a usable regex: {reason}")]
    Regex { pattern: String, reason: String },
    #[error("`{0}` is longer than {MAX_PATTERN_BYTES} bytes")]
    TooLong(String),
    #[error("a filter holds at most {MAX_CONDITIONS} conditions")]
    TooMany,
    #[error("`{0}` is not a usable key (letters, digits and -._~ only)")]
    Key(String),
}

impl HeaderMatch {
    /// Parses what `--header` takes: `NAME=VALUE` (exact) or `NAME~REGEX`. The first `=` or
    /// `~` ends the name (neither can be part of one).
    pub fn parse(arg: &str) -> Result<HeaderMatch, FilterError> {
        let Some(at) = arg.find(['=', '~']) else {
            return Err(FilterError::HeaderSyntax(arg.into()));
        };
        let (name, rest) = arg.split_at(at);
        let value = &rest[1..];
        let value = if rest.starts_with('=') {
            ValueMatch::Exact(value.into())
        } else {
            ValueMatch::Regex(value.into())
        };
        let m = HeaderMatch {
            name: name.to_ascii_lowercase(),
            value,
        };
        m.check()?;
        Ok(m)
    }

    /// The `baggage` condition `--key KEY` stands for.
    pub fn session_key(key: &str) -> Result<HeaderMatch, FilterError> {
        let ok = !key.is_empty()
            && key.len() <= MAX_PATTERN_BYTES
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
        if !ok {
            return Err(FilterError::Key(key.into()));
        }
        Ok(HeaderMatch {
            name: "baggage".into(),
            value: ValueMatch::Baggage {
                key: SESSION_BAGGAGE_KEY.into(),
                value: key.into(),
            },
        })
    }

    fn check(&self) -> Result<(), FilterError> {
        if self.name.is_empty() || !self.name.bytes().all(is_token_byte) {
            return Err(FilterError::HeaderName(self.name.clone()));
        }
        long(&self.name)?;
        match &self.value {
            ValueMatch::Exact(v) => {
                long(v)?;
                if v.chars().any(|c| c.is_control() && c != '\t') {
                    return Err(FilterError::HeaderValue(self.name.clone()));
                }
            }
            ValueMatch::Regex(r) => {
                long(r)?;
            }
            ValueMatch::Baggage { key, value } => {
                long(key)?;
                long(value)?;
            }
        }
        Ok(())
    }
}

impl PathMatch {
    fn check(&self) -> Result<(), FilterError> {
        match self {
            PathMatch::Exact(p) | PathMatch::Prefix(p) => {
                long(p)?;
                if !p.starts_with('/') {
                    return Err(FilterError::Path(p.clone()));
                }
            }
            PathMatch::Regex(r) => long(r)?,
        }
        Ok(())
    }
}

fn long(s: &str) -> Result<(), FilterError> {
    if s.len() > MAX_PATTERN_BYTES {
        let mut cut = 40.min(s.len());
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        return Err(FilterError::TooLong(format!("{}…", &s[..cut])));
    }
    Ok(())
}

/// RFC 9110's `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn regex(pattern: &str) -> Result<Regex, FilterError> {
    RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| FilterError::Regex {
            pattern: pattern.into(),
            reason: e
                .to_string()
                .lines()
                .last()
                .unwrap_or_default()
                .trim()
                .to_string(),
        })
}

/// What a filter looks at in a request, whichever HTTP version carried it.
pub trait RequestHead {
    fn method(&self) -> &str;
    /// The path of the request target, without the query.
    fn path(&self) -> &str;
    /// The values of every field named `name` (given in lower case).
    fn header_values<'a>(&'a self, name: &str) -> Box<dyn Iterator<Item = &'a [u8]> + 'a>;
}

/// A request head as plain data, for requests built by hand (tests, the `route_filter` fuzz
/// target). Field names are matched without regard to case.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlainHead {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl PlainHead {
    pub fn new(method: &str, path: &str, headers: &[(&str, &[u8])]) -> Self {
        PlainHead {
            method: method.into(),
            path: path.into(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_vec()))
                .collect(),
        }
    }
}

impl RequestHead for PlainHead {
    fn method(&self) -> &str {
        &self.method
    }

    fn path(&self) -> &str {
        &self.path
    }

    fn header_values<'a>(&'a self, name: &str) -> Box<dyn Iterator<Item = &'a [u8]> + 'a> {
        let name = name.to_string();
        Box::new(
            self.headers
                .iter()
                .filter(move |(n, _)| n.eq_ignore_ascii_case(&name))
                .map(|(_, v)| v.as_slice()),
        )
    }
}

/// A checked filter, ready to match requests.
#[derive(Debug, Clone)]
pub struct Matcher {
    filter: Filter,
    headers: Vec<(String, Value)>,
    path: Option<Path>,
}

#[derive(Debug, Clone)]
enum Value {
    Exact(Vec<u8>),
    Regex(Regex),
    Baggage { key: String, value: String },
}

#[derive(Debug, Clone)]
enum Path {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

impl Filter {
    /// Checks every condition and compiles the regexes.
    pub fn compile(&self) -> Result<Matcher, FilterError> {
        let conditions = self.headers.len()
            + usize::from(self.path.is_some())
            + usize::from(self.method.is_some());
        if conditions > MAX_CONDITIONS {
            return Err(FilterError::TooMany);
        }
        let mut headers = Vec::with_capacity(self.headers.len());
        for h in &self.headers {
            h.check()?;
            let name = h.name.to_ascii_lowercase();
            let value = match &h.value {
                ValueMatch::Exact(v) => Value::Exact(v.as_bytes().to_vec()),
                ValueMatch::Regex(r) => Value::Regex(regex(r)?),
                ValueMatch::Baggage { key, value } => Value::Baggage {
                    key: key.clone(),
                    value: value.clone(),
                },
            };
            headers.push((name, value));
        }
        let path = match &self.path {
            None => None,
            Some(p) => {
                p.check()?;
                Some(match p {
                    PathMatch::Exact(s) => Path::Exact(s.clone()),
                    PathMatch::Prefix(s) => Path::Prefix(s.clone()),
                    PathMatch::Regex(r) => Path::Regex(regex(r)?),
                })
            }
        };
        if let Some(m) = &self.method {
            if m.is_empty() || m.len() > 32 || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(FilterError::Method(m.clone()));
            }
        }
        Ok(Matcher {
            filter: self.clone(),
            headers,
            path,
        })
    }

    /// True when the filter names a header (or a session key): such a filter wins a request
    /// that a path-only or method-only one also matches.
    pub fn by_header(&self) -> bool {
        !self.headers.is_empty()
    }

    /// Whether no request can match both filters, judged from exact conditions only (a
    /// regex is never assumed disjoint from anything). `false` means they may overlap.
    pub fn disjoint(&self, other: &Filter) -> bool {
        if let (Some(a), Some(b)) = (&self.method, &other.method) {
            if a != b {
                return true;
            }
        }
        if let (Some(PathMatch::Exact(a)), Some(PathMatch::Exact(b))) = (&self.path, &other.path) {
            if a != b {
                return true;
            }
        }
        if let (Some(PathMatch::Prefix(a)), Some(PathMatch::Prefix(b))) = (&self.path, &other.path)
        {
            if !a.starts_with(b.as_str()) && !b.starts_with(a.as_str()) {
                return true;
            }
        }
        // Two different exact values of one header only exclude each other when a request
        // carries one field of that name; a second field could satisfy the other. Baggage
        // members of one key exclude each other the same way. Callers send one such field, so
        // this is the rule people expect, and the overlap report says which one wins anyway.
        for a in &self.headers {
            for b in &other.headers {
                if a.name != b.name {
                    continue;
                }
                match (&a.value, &b.value) {
                    (ValueMatch::Exact(x), ValueMatch::Exact(y)) if x != y => return true,
                    (
                        ValueMatch::Baggage { key: k1, value: v1 },
                        ValueMatch::Baggage { key: k2, value: v2 },
                    ) if k1 == k2 && v1 != v2 => return true,
                    _ => {}
                }
            }
        }
        false
    }

    /// The filter as the user wrote it, for lists and messages: `x-dev=alice path^/v2/ POST`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for h in &self.headers {
            parts.push(match &h.value {
                ValueMatch::Exact(v) => format!("{}={v}", h.name),
                ValueMatch::Regex(r) => format!("{}~{r}", h.name),
                ValueMatch::Baggage { key, value } if key == SESSION_BAGGAGE_KEY => {
                    format!("key={value}")
                }
                ValueMatch::Baggage { key, value } => format!("baggage {key}={value}"),
            });
        }
        match &self.path {
            Some(PathMatch::Exact(p)) => parts.push(format!("path={p}")),
            Some(PathMatch::Prefix(p)) => parts.push(format!("path={p}*")),
            Some(PathMatch::Regex(r)) => parts.push(format!("path~{r}")),
            None => {}
        }
        if let Some(m) = &self.method {
            parts.push(m.clone());
        }
        if parts.is_empty() {
            "every request".into()
        } else {
            parts.join(" ")
        }
    }
}

impl Matcher {
    pub fn filter(&self) -> &Filter {
        &self.filter
    }

    pub fn matches(&self, req: &dyn RequestHead) -> bool {
        if let Some(m) = &self.filter.method {
            if req.method() != m {
                return false;
            }
        }
        if let Some(p) = &self.path {
            let path = req.path();
            let ok = match p {
                Path::Exact(s) => path == s,
                Path::Prefix(s) => path.starts_with(s.as_str()),
                Path::Regex(r) => r.is_match(path),
            };
            if !ok {
                return false;
            }
        }
        self.headers.iter().all(|(name, value)| {
            let mut values = req.header_values(name);
            match value {
                Value::Exact(v) => values.any(|got| got == v.as_slice()),
                Value::Regex(r) => {
                    values.any(|got| std::str::from_utf8(got).is_ok_and(|s| r.is_match(s)))
                }
                Value::Baggage { key, value } => values.any(|got| baggage_has(got, key, value)),
            }
        })
    }
}

/// Whether a W3C `baggage` field value holds the member `key=value` (the value
/// percent-decoded; properties after `;` ignored).
fn baggage_has(field: &[u8], key: &str, value: &str) -> bool {
    let Ok(field) = std::str::from_utf8(field) else {
        return false;
    };
    field.split(',').any(|member| {
        let member = member.split(';').next().unwrap_or_default();
        match member.split_once('=') {
            Some((k, v)) => k.trim() == key && percent_decoded_eq(v.trim(), value),
            None => false,
        }
    })
}

fn percent_decoded_eq(encoded: &str, want: &str) -> bool {
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out == want.as_bytes()
}

/// How two holders whose filters both match a request are ranked: a filter naming a header
/// beats one that does not; between equals, the one registered first (`seq`, given by the
/// agent) wins. `Less` means `a` takes the request.
pub fn precedence(a: (&Filter, u64), b: (&Filter, u64)) -> Ordering {
    b.0.by_header().cmp(&a.0.by_header()).then(a.1.cmp(&b.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str, headers: &[(&str, &[u8])]) -> PlainHead {
        PlainHead::new(method, path, headers)
    }

    fn headers(args: &[&str]) -> Filter {
        Filter {
            headers: args
                .iter()
                .map(|a| HeaderMatch::parse(a).unwrap())
                .collect(),
            ..Filter::default()
        }
    }

    #[test]
    fn header_arguments_parse_and_bad_ones_are_named() {
        let h = HeaderMatch::parse("X-Dev=alice=1").unwrap();
        assert_eq!(h.name, "x-dev");
        assert_eq!(h.value, ValueMatch::Exact("alice=1".into()));
        let h = HeaderMatch::parse("x-dev~al.*").unwrap();
        assert_eq!(h.value, ValueMatch::Regex("al.*".into()));
        assert_eq!(
            HeaderMatch::parse("x-dev=").unwrap().value,
            ValueMatch::Exact(String::new())
        );
        for bad in ["x-dev", "=alice", "x dev=alice", "x:dev=a", "x-dev=a\nb"] {
            assert!(HeaderMatch::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let long = format!("x-dev={}", "a".repeat(MAX_PATTERN_BYTES + 1));
        assert!(matches!(
            HeaderMatch::parse(&long),
            Err(FilterError::TooLong(_))
        ));
        assert!(HeaderMatch::session_key("alice-1.x").is_ok());
        assert!(HeaderMatch::session_key("alice bob").is_err());
        assert!(HeaderMatch::session_key("").is_err());
    }

    #[test]
    fn a_filter_that_cannot_work_is_refused_when_compiled() {
        let f = headers(&["x-dev~(unclosed"]);
        let err = f.compile().unwrap_err();
        assert!(matches!(err, FilterError::Regex { .. }), "{err}");
        assert!(err.to_string().contains("(unclosed"), "{err}");
        let f = Filter {
            path: Some(PathMatch::Prefix("v2/".into())),
            ..Filter::default()
        };
        assert!(matches!(f.compile(), Err(FilterError::Path(_))));
        let f = Filter {
            method: Some("post".into()),
            ..Filter::default()
        };
        assert!(matches!(f.compile(), Err(FilterError::Method(_))));
        // A regex that compiles to something huge is refused, not held.
        let f = headers(&["x-dev~(a{1000}){1000}"]);
        assert!(matches!(f.compile(), Err(FilterError::Regex { .. })));
        let f = headers(&["a=1"; MAX_CONDITIONS + 1]);
        assert_eq!(f.compile().unwrap_err(), FilterError::TooMany);
        // Built by hand (as the agent receives it), a bad name is refused too.
        let f = Filter {
            headers: vec![HeaderMatch {
                name: "x dev".into(),
                value: ValueMatch::Exact("a".into()),
            }],
            ..Filter::default()
        };
        assert!(matches!(f.compile(), Err(FilterError::HeaderName(_))));
    }

    #[test]
    fn conditions_are_anded_and_any_field_of_a_name_may_match() {
        let mut f = headers(&["x-dev=alice"]);
        f.path = Some(PathMatch::Prefix("/v2/".into()));
        f.method = Some("POST".into());
        let m = f.compile().unwrap();
        assert!(m.matches(&req("POST", "/v2/orders", &[("X-Dev", b"alice")])));
        assert!(m.matches(&req(
            "POST",
            "/v2/",
            &[("x-dev", b"bob"), ("x-dev", b"alice")]
        )));
        assert!(!m.matches(&req("GET", "/v2/orders", &[("x-dev", b"alice")])));
        assert!(!m.matches(&req("POST", "/v1/orders", &[("x-dev", b"alice")])));
        assert!(!m.matches(&req("POST", "/v2/orders", &[("x-dev", b"Alice")])));
        assert!(!m.matches(&req("POST", "/v2/orders", &[])));
        let every = Filter::default().compile().unwrap();
        assert!(every.matches(&req("GET", "/", &[])));
    }

    #[test]
    fn regexes_match_the_whole_value_or_path() {
        let m = headers(&["x-dev~alice|bob"]).compile().unwrap();
        assert!(m.matches(&req("GET", "/", &[("x-dev", b"bob")])));
        assert!(!m.matches(&req("GET", "/", &[("x-dev", b"bobby")])));
        assert!(!m.matches(&req("GET", "/", &[("x-dev", b"\xff")])));
        let m = Filter {
            path: Some(PathMatch::Regex("/users/[0-9]+".into())),
            ..Filter::default()
        }
        .compile()
        .unwrap();
        assert!(m.matches(&req("GET", "/users/42", &[])));
        assert!(!m.matches(&req("GET", "/users/42/orders", &[])));
        let m = Filter {
            path: Some(PathMatch::Exact("/health".into())),
            ..Filter::default()
        }
        .compile()
        .unwrap();
        assert!(m.matches(&req("GET", "/health", &[])));
        assert!(!m.matches(&req("GET", "/healthz", &[])));
    }

    #[test]
    fn the_session_key_is_a_baggage_member() {
        let f = Filter {
            headers: vec![HeaderMatch::session_key("alice").unwrap()],
            ..Filter::default()
        };
        let m = f.compile().unwrap();
        for yes in [
            &b"devloop-session=alice"[..],
            b"userId=1, devloop-session = alice ;prop=1",
            b"a=b,devloop-session=%61lice",
        ] {
            assert!(m.matches(&req("GET", "/", &[("baggage", yes)])), "{yes:?}");
        }
        for no in [
            &b"devloop-session=alicex"[..],
            b"devloop-sessionx=alice",
            b"x=devloop-session=alice",
            b"devloop-session",
            b"devloop-session=alice%",
        ] {
            assert!(!m.matches(&req("GET", "/", &[("baggage", no)])), "{no:?}");
        }
        assert_eq!(f.describe(), "key=alice");
    }

    #[test]
    fn a_header_filter_beats_a_path_filter_and_otherwise_the_first_holder_wins() {
        let by_header = headers(&["x-dev=alice"]);
        let by_path = Filter {
            path: Some(PathMatch::Prefix("/v2/".into())),
            ..Filter::default()
        };
        assert_eq!(precedence((&by_header, 9), (&by_path, 1)), Ordering::Less);
        assert_eq!(
            precedence((&by_path, 1), (&by_header, 9)),
            Ordering::Greater
        );
        assert_eq!(precedence((&by_path, 1), (&by_path, 2)), Ordering::Less);
        assert_eq!(
            precedence((&by_header, 3), (&by_header, 2)),
            Ordering::Greater
        );
    }

    #[test]
    fn disjoint_only_when_exact_conditions_exclude_each_other() {
        let alice = headers(&["x-dev=alice"]);
        let bob = headers(&["x-dev=bob"]);
        let any_dev = headers(&["x-dev~.*"]);
        let v2 = Filter {
            path: Some(PathMatch::Prefix("/v2/".into())),
            ..Filter::default()
        };
        let v3 = Filter {
            path: Some(PathMatch::Prefix("/v3/".into())),
            ..Filter::default()
        };
        assert!(alice.disjoint(&bob));
        assert!(!alice.disjoint(&any_dev));
        assert!(!alice.disjoint(&v2));
        assert!(v2.disjoint(&v3));
        assert!(!alice.disjoint(&alice));
        let post = Filter {
            method: Some("POST".into()),
            ..Filter::default()
        };
        let get = Filter {
            method: Some("GET".into()),
            ..Filter::default()
        };
        assert!(post.disjoint(&get));
        let k1 = Filter {
            headers: vec![HeaderMatch::session_key("a").unwrap()],
            ..Filter::default()
        };
        let k2 = Filter {
            headers: vec![HeaderMatch::session_key("b").unwrap()],
            ..Filter::default()
        };
        assert!(k1.disjoint(&k2));
    }

    #[test]
    fn described_as_written() {
        let mut f = headers(&["x-dev=alice", "x-team~core|edge"]);
        f.path = Some(PathMatch::Prefix("/v2/".into()));
        f.method = Some("POST".into());
        assert_eq!(f.describe(), "x-dev=alice x-team~core|edge path=/v2/* POST");
        assert_eq!(Filter::default().describe(), "every request");
    }
}
