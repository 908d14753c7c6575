//! devloop-loadgen: the HTTP/1.1 server and load generator of devloop's tunnel benchmarks.
//! One static binary (built like the agent, `scripts/build-loadgen.sh`) that runs on the
//! laptop as the intercepting process and inside a caller container or pod as the client,
//! so every path of a benchmark is measured with the same client and the same server.
//! Results are printed as one JSON object per line on stdout.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const USAGE: &str = "usage:
  devloop-loadgen serve PORT [TAG]             HTTP/1.1 on 0.0.0.0:PORT; GET / answers TAG, GET /bytes/N answers N bytes
  devloop-loadgen latency HOST:PORT N          one keep-alive connection, N sequential GETs of / (after N/10 warm-up)
  devloop-loadgen fetch HOST:PORT BYTES        one GET /bytes/BYTES, timed to its last byte
  devloop-loadgen upload HOST:PORT BYTES       one POST of BYTES, timed to the answer (the server reads it all first)
  devloop-loadgen load HOST:PORT CONNS REQS [MS]
                                               CONNS keep-alive connections, opened together, share REQS GETs
                                               of /; requests not started within MS milliseconds count as not done
  devloop-loadgen wait-for HOST:PORT TEXT MS   prints `ready`, then polls GET / on fresh connections until the body
                                               holds TEXT; prints `seen UNIX_NS` (exit 1 after MS milliseconds)
  devloop-loadgen idle                         sleeps (the entry point of a caller container)
With LOADGEN_HEADER='NAME: VALUE' every request of the client modes carries that header.";

/// The extra request line `LOADGEN_HEADER` asks for (with its CRLF), or nothing.
fn extra_header() -> &'static str {
    static EXTRA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    EXTRA.get_or_init(|| match std::env::var("LOADGEN_HEADER") {
        Ok(h) if h.contains(':') && !h.contains(['\r', '\n']) => format!("{h}\r\n"),
        _ => String::new(),
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match rt.block_on(run(&args)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("devloop-loadgen: {e}");
            1
        }
    };
    std::process::exit(code);
}

type Res<T> = Result<T, String>;

fn arg<'a>(args: &'a [String], i: usize, what: &str) -> Res<&'a str> {
    args.get(i)
        .map(String::as_str)
        .ok_or_else(|| format!("missing {what}\n{USAGE}"))
}

fn num(args: &[String], i: usize, what: &str) -> Res<u64> {
    let s = arg(args, i, what)?;
    s.parse()
        .map_err(|_| format!("{what} must be a number, not `{s}`"))
}

async fn run(args: &[String]) -> Res<()> {
    match arg(args, 0, "a mode")? {
        "serve" => {
            serve(
                num(args, 1, "PORT")? as u16,
                args.get(2).cloned().unwrap_or_else(|| "loadgen".into()),
            )
            .await
        }
        "latency" => latency(arg(args, 1, "HOST:PORT")?, num(args, 2, "N")? as usize).await,
        "fetch" => fetch(arg(args, 1, "HOST:PORT")?, num(args, 2, "BYTES")?).await,
        "upload" => upload(arg(args, 1, "HOST:PORT")?, num(args, 2, "BYTES")?).await,
        "load" => {
            let deadline = match args.get(4) {
                Some(_) => Some(Duration::from_millis(num(args, 4, "MS")?)),
                None => None,
            };
            load(
                arg(args, 1, "HOST:PORT")?,
                num(args, 2, "CONNS")? as usize,
                num(args, 3, "REQS")? as usize,
                deadline,
            )
            .await
        }
        "wait-for" => {
            wait_for(
                arg(args, 1, "HOST:PORT")?,
                arg(args, 2, "TEXT")?,
                num(args, 3, "MS")?,
            )
            .await
        }
        "idle" => loop {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        },
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown mode `{other}`\n{USAGE}")),
    }
}

// ---- server ----

async fn serve(port: u16, tag: String) -> Res<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))
        .await
        .map_err(|e| format!("bind :{port}: {e}"))?;
    println!(
        "listening {}",
        listener.local_addr().map_err(|e| e.to_string())?.port()
    );
    let tag: Arc<[u8]> = tag.into_bytes().into();
    loop {
        let (sock, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let _ = sock.set_nodelay(true);
        let tag = tag.clone();
        tokio::spawn(async move {
            let _ = serve_conn(sock, &tag).await;
        });
    }
}

async fn serve_conn(sock: TcpStream, tag: &[u8]) -> std::io::Result<()> {
    let mut io = BufReader::with_capacity(16 << 10, sock);
    let block = vec![b'x'; 256 << 10];
    let mut line = String::new();
    loop {
        line.clear();
        if io.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        // The rest of the head, then the body (an upload), read and dropped.
        let mut body_len = 0u64;
        loop {
            line.clear();
            if io.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    body_len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        while body_len > 0 {
            let buf = io.fill_buf().await?;
            if buf.is_empty() {
                return Ok(());
            }
            let k = (buf.len() as u64).min(body_len) as usize;
            io.consume(k);
            body_len -= k as u64;
        }
        let sock = io.get_mut();
        if let Some(n) = path
            .strip_prefix("/bytes/")
            .and_then(|n| n.parse::<u64>().ok())
        {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n\r\n");
            sock.write_all(head.as_bytes()).await?;
            let mut left = n;
            while left > 0 {
                let k = left.min(block.len() as u64) as usize;
                sock.write_all(&block[..k]).await?;
                left -= k as u64;
            }
        } else {
            let mut out = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
                tag.len()
            )
            .into_bytes();
            out.extend_from_slice(tag);
            sock.write_all(&out).await?;
        }
    }
}

// ---- client ----

struct Conn {
    io: BufReader<TcpStream>,
    head: String,
}

impl Conn {
    async fn open(addr: &str) -> std::io::Result<Conn> {
        let sock = TcpStream::connect(addr).await?;
        sock.set_nodelay(true)?;
        Ok(Conn {
            io: BufReader::with_capacity(64 << 10, sock),
            head: String::new(),
        })
    }

    /// One GET; returns the body's length, and the body when `keep` (else it is discarded).
    async fn get(&mut self, path: &str, keep: bool) -> std::io::Result<(u64, Vec<u8>)> {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: loadgen\r\n{}\r\n",
            extra_header()
        );
        self.io.get_mut().write_all(req.as_bytes()).await?;
        let mut len: Option<u64> = None;
        let mut status_ok = false;
        let mut first = true;
        loop {
            self.head.clear();
            if self.io.read_line(&mut self.head).await? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed before the response",
                ));
            }
            let l = self.head.trim_end();
            if first {
                status_ok = l.split_whitespace().nth(1) == Some("200");
                first = false;
            } else if l.is_empty() {
                break;
            } else if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().ok();
                }
            }
        }
        let len = len.ok_or_else(|| std::io::Error::other("response without Content-Length"))?;
        let mut body = Vec::new();
        if keep {
            body.resize(len as usize, 0);
            self.io.read_exact(&mut body).await?;
        } else {
            let mut left = len;
            while left > 0 {
                let buf = self.io.fill_buf().await?;
                if buf.is_empty() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "body cut short",
                    ));
                }
                let k = (buf.len() as u64).min(left) as usize;
                self.io.consume(k);
                left -= k as u64;
            }
        }
        if !status_ok {
            return Err(std::io::Error::other("status is not 200"));
        }
        Ok((len, body))
    }
}

fn pct(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn latency(addr: &str, n: usize) -> Res<()> {
    let mut c = Conn::open(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    for _ in 0..(n / 10).max(1) {
        c.get("/", false).await.map_err(|e| e.to_string())?;
    }
    let mut us = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.get("/", false).await.map_err(|e| e.to_string())?;
        us.push(t.elapsed().as_micros() as u32);
    }
    us.sort_unstable();
    println!(
        "{{\"requests\":{n},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"max_us\":{}}}",
        pct(&us, 0.5),
        pct(&us, 0.9),
        pct(&us, 0.99),
        us.last().copied().unwrap_or(0)
    );
    Ok(())
}

async fn fetch(addr: &str, bytes: u64) -> Res<()> {
    let mut c = Conn::open(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let t = Instant::now();
    let (got, _) = c
        .get(&format!("/bytes/{bytes}"), false)
        .await
        .map_err(|e| e.to_string())?;
    let secs = t.elapsed().as_secs_f64();
    if got != bytes {
        return Err(format!("asked for {bytes} bytes, got {got}"));
    }
    println!(
        "{{\"bytes\":{got},\"seconds\":{secs:.6},\"mib_s\":{:.1}}}",
        got as f64 / (1 << 20) as f64 / secs
    );
    Ok(())
}

async fn upload(addr: &str, bytes: u64) -> Res<()> {
    let mut c = Conn::open(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let block = vec![b'u'; 256 << 10];
    let t = Instant::now();
    let head = format!("POST /upload HTTP/1.1\r\nHost: loadgen\r\nContent-Length: {bytes}\r\n\r\n");
    let sock = c.io.get_mut();
    sock.write_all(head.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut left = bytes;
    while left > 0 {
        let k = left.min(block.len() as u64) as usize;
        sock.write_all(&block[..k])
            .await
            .map_err(|e| e.to_string())?;
        left -= k as u64;
    }
    // The answer comes once the server has read the whole body.
    let mut line = String::new();
    c.io.read_line(&mut line).await.map_err(|e| e.to_string())?;
    let secs = t.elapsed().as_secs_f64();
    if !line.contains(" 200 ") {
        return Err(format!("upload answered `{}`", line.trim()));
    }
    println!(
        "{{\"bytes\":{bytes},\"seconds\":{secs:.6},\"mib_s\":{:.1}}}",
        bytes as f64 / (1 << 20) as f64 / secs
    );
    Ok(())
}

async fn load(addr: &str, conns: usize, reqs: usize, deadline: Option<Duration>) -> Res<()> {
    let errors = Arc::new(AtomicU64::new(0));
    let not_done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let barrier = Arc::new(tokio::sync::Barrier::new(conns + 1));
    let mut tasks = Vec::with_capacity(conns);
    for i in 0..conns {
        // Spread the requests evenly: the first `reqs % conns` connections do one more.
        let mine = reqs / conns + usize::from(i < reqs % conns);
        let (addr, errors, barrier, not_done) = (
            addr.to_string(),
            errors.clone(),
            barrier.clone(),
            not_done.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::open(&addr).await;
            barrier.wait().await;
            let mut us = Vec::with_capacity(mine);
            for k in 0..mine {
                if deadline.is_some_and(|d| start.elapsed() > d) {
                    not_done.fetch_add((mine - k) as u64, Ordering::Relaxed);
                    break;
                }
                // A request may not outlive the deadline (a relay can accept a connection
                // and never serve it); without one, a minute is a failure.
                let limit = deadline
                    .map(|d| d.saturating_sub(start.elapsed()))
                    .unwrap_or(Duration::from_secs(60));
                let t = Instant::now();
                let attempt = async {
                    if c.is_err() {
                        c = Conn::open(&addr).await;
                    }
                    match &mut c {
                        Ok(conn) => conn.get("/", false).await.is_ok(),
                        Err(_) => false,
                    }
                };
                let ok = tokio::time::timeout(limit, attempt).await.unwrap_or(false);
                if ok {
                    us.push(t.elapsed().as_micros() as u32);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    c = Err(std::io::Error::other("reconnect"));
                }
            }
            us
        }));
    }
    barrier.wait().await;
    let t = Instant::now();
    let mut us = Vec::with_capacity(reqs);
    for task in tasks {
        us.extend(task.await.map_err(|e| e.to_string())?);
    }
    let secs = t.elapsed().as_secs_f64();
    us.sort_unstable();
    println!(
        "{{\"connections\":{conns},\"requests\":{reqs},\"ok\":{},\"errors\":{},\"not_done\":{},\"seconds\":{secs:.3},\"rps\":{:.0},\"p50_us\":{},\"p99_us\":{}}}",
        us.len(),
        errors.load(Ordering::Relaxed),
        not_done.load(Ordering::Relaxed),
        us.len() as f64 / secs,
        pct(&us, 0.5),
        pct(&us, 0.99)
    );
    Ok(())
}

async fn wait_for(addr: &str, text: &str, ms: u64) -> Res<()> {
    println!("ready");
    let deadline = Instant::now() + Duration::from_millis(ms);
    loop {
        let attempt = async {
            let mut c = Conn::open(addr).await?;
            c.get("/", true).await
        };
        if let Ok(Ok((_, body))) = tokio::time::timeout(Duration::from_millis(300), attempt).await {
            if body.windows(text.len()).any(|w| w == text.as_bytes()) {
                let ns = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                println!("seen {ns}");
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{addr} did not answer with `{text}` within {ms} ms"
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
