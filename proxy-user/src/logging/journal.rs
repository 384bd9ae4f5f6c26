//! The journal's native protocol (systemd's JOURNAL_NATIVE_PROTOCOL): one datagram per
//! entry to journald's socket, each field `NAME=value` on a line of its own (or, for a
//! value with a newline in it, the name, its length as 8 bytes little-endian, the
//! value).
//!
//! Not tracing-journald: its `MESSAGE` is the event's message alone, its other fields
//! only fields, so `journalctl -u kgate` would show `server down: connection refused`
//! without saying which server. Here `MESSAGE` is the whole text stderr would show.

use std::{
    fmt::Write as _,
    io::{self, Write as _},
    os::{
        fd::AsFd,
        unix::{fs::MetadataExt, net::UnixDatagram},
    },
};

use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{
    fmt::{FormatFields, format::Writer},
    layer::{Context, Layer},
};

use super::{JOURNAL_ONLY, PlainFields, priority};

/// Where journald takes native entries.
const SOCKET: &str = "/run/systemd/journal/socket";

/// How every entry names its program (`journalctl -t kgate`).
const IDENTIFIER: &str = "kgate";

/// Whether stderr is the journal stream that systemd connected for this service: it
/// puts that stream's device and inode in `JOURNAL_STREAM` (systemd.exec(5)). A
/// program started with its stderr elsewhere may inherit the variable, not the
/// stream, so both must match.
pub fn stderr_is_journal() -> bool {
    let Some(named) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stderr) = io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(stream) = std::fs::File::from(stderr).metadata() else {
        return false;
    };
    named
        .to_str()
        .is_some_and(|named| names(named, stream.dev(), stream.ino()))
}

/// Whether `JOURNAL_STREAM`'s `DEVICE:INODE` is that file.
fn names(journal_stream: &str, dev: u64, ino: u64) -> bool {
    journal_stream
        .split_once(':')
        .is_some_and(|(d, i)| d.parse() == Ok(dev) && i.parse() == Ok(ino))
}

/// A layer that writes each event to the journal.
pub struct Journal {
    socket: UnixDatagram,
}

impl Journal {
    /// Fails when nothing takes entries at journald's socket.
    pub fn open() -> io::Result<Journal> {
        let socket = UnixDatagram::unbound()?;
        // journald drops an empty datagram: this only checks that it listens.
        socket.send_to(&[], SOCKET)?;
        Ok(Journal { socket })
    }
}

impl<S: Subscriber> Layer<S> for Journal {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let entry = entry(event);
        // Not by address (journald restarting, say): the stream on stderr still
        // takes the text, with its priority.
        if self.socket.send_to(&entry.bytes, SOCKET).is_err() {
            let _ = writeln!(io::stderr(), "<{}>{}", entry.priority, entry.message);
        }
    }
}

struct Entry {
    bytes: Vec<u8>,
    priority: u8,
    message: String,
}

fn entry(event: &Event<'_>) -> Entry {
    let meta = event.metadata();
    let mut message = String::new();
    let _ = PlainFields.format_fields(Writer::new(&mut message), event);
    let mut fields = Fields::default();
    event.record(&mut fields);
    let priority = priority(*meta.level());

    let mut bytes = Vec::with_capacity(256 + message.len());
    put(&mut bytes, "PRIORITY", &priority.to_string());
    put(&mut bytes, "SYSLOG_IDENTIFIER", IDENTIFIER);
    // Events of the `log` crate (aya-log's) carry their own target.
    let target = fields.log_target.as_deref().unwrap_or(meta.target());
    put(&mut bytes, "TARGET", target);
    put(&mut bytes, "MESSAGE", &message);
    for (name, value) in &fields.named {
        put(&mut bytes, name, value);
    }
    Entry {
        bytes,
        priority,
        message,
    }
}

/// One field, in the protocol's text or binary form.
fn put(bytes: &mut Vec<u8>, name: &str, value: &str) {
    bytes.extend_from_slice(name.as_bytes());
    if value.contains('\n') {
        bytes.push(b'\n');
        bytes.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        bytes.push(b'=');
    }
    bytes.extend_from_slice(value.as_bytes());
    bytes.push(b'\n');
}

/// The journal's name for a field, if it becomes one: `journal.bytes_in` and
/// `bytes_in` are `BYTES_IN`; the message is `MESSAGE` already, and `log.*` is the
/// `log` crate's metadata.
fn field_name(name: &str) -> Option<String> {
    if name == "message" || name.starts_with("log.") {
        return None;
    }
    let name = name.strip_prefix(JOURNAL_ONLY).unwrap_or(name);
    let name: String = name
        .chars()
        .map(|c| match c {
            'a'..='z' => c.to_ascii_uppercase(),
            'A'..='Z' | '0'..='9' => c,
            _ => '_',
        })
        .collect();
    // journald takes names of letters, digits and `_`, not starting with `_` (its own
    // trusted fields) or a digit, of at most 64 characters.
    let valid = name.starts_with(|c: char| c.is_ascii_uppercase()) && name.len() <= 64;
    valid.then_some(name)
}

#[derive(Default)]
struct Fields {
    named: Vec<(String, String)>,
    log_target: Option<String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "log.target" {
            self.log_target = Some(value.to_owned());
        } else if let Some(name) = field_name(field.name()) {
            self.named.push((name, value.to_owned()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if let Some(name) = field_name(field.name()) {
            let mut text = String::new();
            let _ = write!(text, "{value:?}");
            self.named.push((name, text));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn journal_stream_names_the_device_and_inode_of_stderr() {
        let file = std::env::temp_dir().join(format!("kgate-journal-{}", std::process::id()));
        std::fs::write(&file, "").unwrap();
        let meta = std::fs::metadata(&file).unwrap();
        let _ = std::fs::remove_file(&file);
        let named = format!("{}:{}", meta.dev(), meta.ino());
        assert!(names(&named, meta.dev(), meta.ino()));
        assert!(!names(&named, meta.dev(), meta.ino() + 1));
        assert!(!names(&named, meta.dev() + 1, meta.ino()));
        assert!(!names("", meta.dev(), meta.ino()));
        assert!(!names("garbage", meta.dev(), meta.ino()));
    }

    #[test]
    fn field_names_become_the_journals() {
        assert_eq!(field_name("server").as_deref(), Some("SERVER"));
        assert_eq!(field_name("journal.bytes_in").as_deref(), Some("BYTES_IN"));
        assert_eq!(field_name("message"), None);
        assert_eq!(field_name("log.module_path"), None);
        assert_eq!(field_name("_trusted"), None);
        assert_eq!(field_name("9lives"), None);
    }

    /// The entries a `Journal`-like layer would send for the events `log` makes.
    fn entries(log: impl FnOnce()) -> Vec<Vec<u8>> {
        struct Capture(Arc<Mutex<Vec<Vec<u8>>>>);
        impl<S: Subscriber> Layer<S> for Capture {
            fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
                self.0.lock().unwrap().push(entry(event).bytes);
            }
        }
        let sent = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::layer::SubscriberExt::with(
            tracing_subscriber::registry(),
            Capture(sent.clone()),
        );
        tracing::subscriber::with_default(subscriber, log);
        sent.lock().unwrap().clone()
    }

    #[test]
    fn an_entry_has_priority_text_and_fields() {
        let sent = entries(|| {
            tracing::warn!(server = "mail/node1", "server down: connection refused");
            tracing::info!(
                target: "kgate::conn",
                { journal.frontend = "smtp", journal.bytes_in = 320u64 },
                "10.0.0.1:5000 smtp mail/node1 spliced bytes_in=320"
            );
        });
        assert_eq!(
            String::from_utf8(sent[0].clone()).unwrap(),
            "PRIORITY=4\nSYSLOG_IDENTIFIER=kgate\nTARGET=kgate::logging::journal::tests\n\
             MESSAGE=server down: connection refused server=\"mail/node1\"\nSERVER=mail/node1\n"
        );
        assert_eq!(
            String::from_utf8(sent[1].clone()).unwrap(),
            "PRIORITY=6\nSYSLOG_IDENTIFIER=kgate\nTARGET=kgate::conn\n\
             MESSAGE=10.0.0.1:5000 smtp mail/node1 spliced bytes_in=320\nFRONTEND=smtp\nBYTES_IN=320\n"
        );
    }

    #[test]
    fn a_value_with_a_newline_is_sent_with_its_length() {
        let mut bytes = Vec::new();
        put(&mut bytes, "MESSAGE", "two\nlines");
        let mut expected = b"MESSAGE\n".to_vec();
        expected.extend_from_slice(&9u64.to_le_bytes());
        expected.extend_from_slice(b"two\nlines\n");
        assert_eq!(bytes, expected);
    }
}
