//! What a person sees: service-prefixed lines (colored on a terminal) and progress bars.

use devloop_proxy::msg::{LogLine, LogStream};
use owo_colors::OwoColorize;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};

#[derive(Clone)]
pub struct Ui {
    inner: Arc<Inner>,
}

struct Inner {
    color: bool,
    width: usize,
    out: Mutex<()>,
    progress: indicatif::MultiProgress,
}

const PALETTE: [owo_colors::AnsiColors; 6] = [
    owo_colors::AnsiColors::Cyan,
    owo_colors::AnsiColors::Magenta,
    owo_colors::AnsiColors::Green,
    owo_colors::AnsiColors::Yellow,
    owo_colors::AnsiColors::Blue,
    owo_colors::AnsiColors::BrightRed,
];

impl Ui {
    /// `names` sets the prefix width so columns line up.
    pub fn new<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        let width = names.into_iter().map(|n| n.len()).max().unwrap_or(0).max(7);
        Ui {
            inner: Arc::new(Inner {
                color,
                width,
                out: Mutex::new(()),
                progress: indicatif::MultiProgress::new(),
            }),
        }
    }

    fn color_of(name: &str) -> owo_colors::AnsiColors {
        let h = name
            .bytes()
            .fold(0usize, |a, b| a.wrapping_mul(31).wrapping_add(b as usize));
        PALETTE[h % PALETTE.len()]
    }

    fn prefix(&self, name: &str) -> String {
        let padded = format!("{name:<w$} |", w = self.inner.width);
        if self.inner.color {
            padded.color(Self::color_of(name)).to_string()
        } else {
            padded
        }
    }

    fn print(&self, text: String) {
        let _guard = self.inner.out.lock().unwrap_or_else(|e| e.into_inner());
        self.inner.progress.suspend(|| {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{text}");
            let _ = out.flush();
        });
    }

    /// A line the service printed.
    pub fn log(&self, service: &str, line: &LogLine) {
        let text = String::from_utf8_lossy(&line.line);
        let text = text.trim_end_matches(['\n', '\r']);
        let body = match (line.stream, self.inner.color) {
            (LogStream::Agent, true) => format!("{}", format!("[agent] {text}").dimmed()),
            (LogStream::Agent, false) => format!("[agent] {text}"),
            (LogStream::Stderr, _) | (LogStream::Stdout, _) => text.to_string(),
        };
        self.print(format!("{} {body}", self.prefix(service)));
    }

    /// A message of devloop's about a service.
    pub fn info(&self, service: &str, msg: impl AsRef<str>) {
        let msg = msg.as_ref();
        let body = if self.inner.color {
            format!("{}", format!("[devloop] {msg}").bold())
        } else {
            format!("[devloop] {msg}")
        };
        self.print(format!("{} {body}", self.prefix(service)));
    }

    pub fn warn(&self, service: &str, msg: impl AsRef<str>) {
        let msg = msg.as_ref();
        let body = if self.inner.color {
            format!("{}", format!("[devloop] {msg}").yellow())
        } else {
            format!("[devloop] {msg}")
        };
        self.print(format!("{} {body}", self.prefix(service)));
    }

    /// A byte progress bar; hidden when stderr is not a terminal.
    pub fn bytes_bar(&self, service: &str, what: &str, total: u64) -> indicatif::ProgressBar {
        let bar = self.inner.progress.add(indicatif::ProgressBar::new(total));
        let style = indicatif::ProgressStyle::with_template(&format!(
            "{service:<w$} | {what} [{{bar:30}}] {{bytes}}/{{total_bytes}} {{bytes_per_sec}} eta {{eta}}",
            w = self.inner.width
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar
    }
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn human_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

/// "5 s ago", "3 min ago".
pub fn ago(at_ms: u64) -> String {
    let d = crate::state::now_ms().saturating_sub(at_ms) / 1000;
    match d {
        0..=59 => format!("{d} s ago"),
        60..=3599 => format!("{} min ago", d / 60),
        3600..=86399 => format!("{} h ago", d / 3600),
        _ => format!("{} days ago", d / 86400),
    }
}

/// Writes to stdout, treating a reader that went away (`devloop history | head`) as the end
/// of the output rather than an error: `println!` panics on a broken pipe, because Rust
/// ignores SIGPIPE.
pub fn print_to_pipe(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
}
