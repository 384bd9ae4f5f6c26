//! Where the log goes: text on stderr, or, when stderr is the journal stream systemd
//! opened for the service, the journal itself in its native protocol (`journal`).
//!
//! On stderr (a terminal, a test, a container) each event is one line, as
//! tracing-subscriber writes it: time, level, target, message, then its fields as
//! `key=value`. In the journal the same text is the entry's `MESSAGE` (journald stamps
//! the time), the level is its syslog `PRIORITY`, and each field is a field of the
//! entry too (`server=mail/node1` becomes `SERVER=mail/node1`), for `journalctl
//! SERVER=mail/node1`.
//!
//! A field named `journal.NAME` goes to the journal only, as `NAME`: the connection
//! line's parts (ending.rs) are fields there, while its text already shows them.
//!
//! `RUST_LOG` sets what is logged (tracing-subscriber's `EnvFilter`); `info` when
//! unset or unreadable.

mod journal;

use std::{fmt, io::IsTerminal, sync::OnceLock};

use tracing::{
    Event, Level, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{
    EnvFilter,
    field::{MakeVisitor, VisitFmt, VisitOutput},
    fmt::{
        FmtContext, FormatEvent, FormatFields,
        format::{DefaultVisitor, Writer},
    },
    layer::SubscriberExt,
    registry::LookupSpan,
    util::SubscriberInitExt,
};

/// Fields with this prefix go to the journal only.
const JOURNAL_ONLY: &str = "journal.";

/// Where [`init`] sent the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Output {
    Stderr,
    /// The native protocol.
    Journal,
    /// The journal's stream, lines with a `<priority>` prefix.
    Stream,
}

static OUTPUT: OnceLock<Output> = OnceLock::new();

/// Sets up logging for the whole process: the journal when stderr is its stream and
/// its socket answers, else text on stderr.
pub fn init() {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if !journal::stderr_is_journal() {
        let _ = OUTPUT.set(Output::Stderr);
        tracing_subscriber::fmt()
            .with_env_filter(filter())
            .fmt_fields(PlainFields)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .init();
        return;
    }
    match journal::Journal::open() {
        Ok(journal) => {
            let _ = OUTPUT.set(Output::Journal);
            tracing_subscriber::registry()
                .with(filter())
                .with(journal)
                .init();
        }
        Err(e) => {
            let _ = OUTPUT.set(Output::Stream);
            // The stream takes lines with a `<priority>` prefix: the levels survive,
            // the fields stay in the text.
            tracing_subscriber::fmt()
                .with_env_filter(filter())
                .with_ansi(false)
                .fmt_fields(PlainFields)
                .event_format(StreamLine)
                .with_writer(std::io::stderr)
                .init();
            tracing::warn!(
                "cannot write to the journal's socket ({e}): logging to its stream, without \
                 fields for journalctl to filter on"
            );
        }
    }
}

/// The error that ends a command: on stderr as ever, and in the journal at priority
/// `err`, where `journalctl -p err` finds why kgate stopped (a plain line on the
/// stream would be `info`).
pub fn failure(message: &str) {
    match OUTPUT.get() {
        Some(Output::Journal) => tracing::error!(target: "kgate", "{message}"),
        Some(Output::Stream) => eprintln!("<{}>{message}", priority(Level::ERROR)),
        Some(Output::Stderr) | None => eprintln!("{message}"),
    }
}

/// The syslog priority of a level: what `journalctl -p` filters on.
fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// The text of an event's fields: its message, then `key=value` for each other field,
/// as tracing-subscriber's default format writes them, but for `journal.*` fields.
pub struct PlainFields;

impl<'w> MakeVisitor<Writer<'w>> for PlainFields {
    type Visitor = PlainVisitor<'w>;

    fn make_visitor(&self, writer: Writer<'w>) -> PlainVisitor<'w> {
        PlainVisitor(DefaultVisitor::new(writer, true))
    }
}

pub struct PlainVisitor<'w>(DefaultVisitor<'w>);

fn journal_only(field: &Field) -> bool {
    field.name().starts_with(JOURNAL_ONLY)
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if !journal_only(field) {
            self.0.record_str(field, value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if !journal_only(field) {
            self.0.record_error(field, value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !journal_only(field) {
            self.0.record_debug(field, value);
        }
    }
}

impl VisitOutput<fmt::Result> for PlainVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.0.finish()
    }
}

impl VisitFmt for PlainVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        self.0.writer()
    }
}

/// A line for the journal's stream: `<4>kgate::health::monitor: server down: ...`.
/// No time: the journal stamps each line.
struct StreamLine;

impl<S, N> FormatEvent<S, N> for StreamLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        write!(writer, "<{}>{}: ", priority(*meta.level()), meta.target())?;
        ctx.format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What a subscriber with `PlainFields` writes for the events `log` makes.
    fn plain_text(log: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(PlainFields)
            .without_time()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn text_lines_keep_their_fields_but_not_the_journals() {
        let text = plain_text(|| {
            tracing::info!(
                target: "kgate::conn",
                { journal.frontend = "smtp", journal.bytes_in = 3u64 },
                "a line"
            );
            tracing::warn!(server = "mail/node1", took = ?std::time::Duration::from_millis(5), "server down");
        });
        assert_eq!(
            text,
            " INFO kgate::conn: a line\n WARN kgate::logging::tests: server down \
             server=\"mail/node1\" took=5ms\n"
        );
    }

    #[test]
    fn levels_are_syslog_priorities() {
        // journalctl -p warning shows 0 to 4; -p info 0 to 6.
        assert_eq!(priority(Level::ERROR), 3);
        assert_eq!(priority(Level::WARN), 4);
        assert_eq!(priority(Level::INFO), 6);
        assert_eq!(priority(Level::DEBUG), 7);
    }
}
