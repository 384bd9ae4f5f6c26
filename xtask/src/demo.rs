//! `cargo xtask demo`: the README's first command. A client's own address arriving at
//! mail backends behind kgate, through the sockmap splice, shown step by step.
//!
//! The lab comes from the `tests` crate (network namespaces, mock mail servers, the
//! kgate runner). Everything it makes is owned by values that clean up when dropped,
//! so an error or a panic half-way still removes the namespaces, stops kgate and the
//! backends; the demo checks afterwards that nothing of its lab is left.

use std::{
    fmt::Write as _,
    fs::{self, File},
    io::{self, BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    panic::{self, AssertUnwindSafe},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
// `::tests` is the lab crate; a bare `tests` here would be the unit test module below.
use ::tests::{
    backend::{MailBackend, ProxyHeader},
    kgate::{Kgate, READY_LINE, global_section},
    lab::{self, Lab, NetNs},
    sockmap::sock_hash_len,
};

use crate::{
    build,
    setup::{self, NotRoot},
};

/// Run the demo lab: a client's address arriving at a backend through the splice.
///
/// Needs root. Builds kgate, makes a lab of network namespaces (client, gateway
/// running kgate, two mock mail backends), runs SMTP sessions over IPv4 and IPv6,
/// shows the PROXY headers the backends received, kgate's log and its pinned maps,
/// then removes the lab. Exits non-zero if a session failed or a backend saw a wrong
/// client address.
///
/// Example: cargo xtask demo
#[derive(clap::Args)]
pub struct Options {}

/// kgate's SMTP frontend port on the gateway (v4 and v6).
const FRONTEND_PORT: u16 = 25;
/// Where the mock mail servers listen, on their backend's IPv4 address.
const BACKEND_PORT: u16 = 2525;
/// The mock mail servers, one per backend namespace; they greet with their name.
const BACKEND_NAMES: [&str; 2] = ["mail-a", "mail-b"];
/// The client sessions, in order. Round robin over two servers then gives each
/// backend one IPv4 and one IPv6 client.
const SESSIONS: [Family; 4] = [Family::V4, Family::V4, Family::V6, Family::V6];

/// Deadline for each connect, read and write of a client session.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for kgate's connection log lines after the sessions ended.
const LOG_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline for one bpftool run.
const BPFTOOL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest reply line a session reads, and most lines in one reply.
const MAX_REPLY_LINE: u64 = 1024;
const MAX_REPLY_LINES: usize = 64;
/// Longest bpftool output printed in full; longer output is cut (with a note).
const MAX_TOOL_LINES: usize = 40;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

pub fn run(_options: Options) -> anyhow::Result<ExitCode> {
    if !lab::is_root() {
        bail!(
            "the demo creates network namespaces and loads eBPF programs, which needs root: \
             run `cargo xtask demo` as root"
        );
    }

    heading("building");
    let env = setup::toolchain()?;
    setup::debian_packages(NotRoot::Stop)?;
    let bin = build::kgate(&env, false)?;
    println!("kgate binary: {}", bin.display());
    let log_file = env.target_dir.join("kgate-demo.log");

    let mut progress = Progress::default();
    let outcome = {
        // kgate's log is shown below, in order; its live echo would only interleave.
        let _quiet = QuietKgateEcho::install()
            .map_err(|e| eprintln!("demo: kgate's log lines will be echoed as they come ({e})"))
            .ok();
        let previous_hook = panic::take_hook();
        panic::set_hook(Box::new(|info| eprintln!("demo: {info}")));
        let outcome =
            panic::catch_unwind(AssertUnwindSafe(|| demo(&bin, &log_file, &mut progress)));
        panic::set_hook(previous_hook);
        outcome
    };
    // Everything the lab made has been dropped by now, on every path.
    let outcome = match outcome {
        Ok(result) => result,
        Err(_) => Err(anyhow!("the demo stopped on the panic above")),
    };
    if !progress.cleanup_shown {
        heading("cleanup");
    }
    let leftovers = check_cleanup(progress.kgate_pid);

    match outcome {
        Err(e) => {
            if leftovers {
                eprintln!("demo: the lab was not fully removed (above)");
            }
            Err(e.context(format!("the demo failed while {}", progress.step)))
        }
        Ok(Report {
            problems,
            dataplane,
        }) if problems.is_empty() && !leftovers => {
            println!(
                "\ndemo: ok: {} SMTP sessions through kgate, and every backend saw the real \
                 client address",
                SESSIONS.len()
            );
            if dataplane.as_deref() != Some("sockmap") {
                println!(
                    "demo: but on the {} data plane, not the eBPF splice (see `== kgate`)",
                    dataplane.as_deref().unwrap_or("unknown")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Ok(Report { mut problems, .. }) => {
            if leftovers {
                problems.push("the lab was not fully removed".into());
            }
            println!("\ndemo: FAILED:");
            for problem in &problems {
                println!("  - {problem}");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

/// What the cleanup check and the error message need to know about how far it got.
struct Progress {
    /// What the demo was doing (for the error message).
    step: &'static str,
    kgate_pid: Option<u32>,
    cleanup_shown: bool,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            step: "starting",
            kgate_pid: None,
            cleanup_shown: false,
        }
    }
}

/// A mock mail server in one backend namespace.
struct Backend {
    name: &'static str,
    namespace: String,
    listen: SocketAddr,
    server: MailBackend,
}

/// What the lab showed.
struct Report {
    /// What makes the demo fail: a failed session, a wrong client address.
    problems: Vec<String>,
    /// The data plane kgate chose, from its ready line.
    dataplane: Option<String>,
}

/// The lab, the sessions, and what they show. Errors are for a lab that could not run
/// at all; what went wrong inside a running lab is in the report.
fn demo(bin: &Path, log_file: &Path, progress: &mut Progress) -> anyhow::Result<Report> {
    let mut problems = Vec::new();

    heading("lab");
    progress.step = "creating the lab's network namespaces";
    // Declared before the backends and kgate: dropped after them.
    let lab = Lab::new(BACKEND_NAMES.len());
    progress.step = "starting the mail backends";
    let backends: Vec<Backend> = BACKEND_NAMES
        .iter()
        .enumerate()
        .map(|(i, &name)| {
            let ns = lab.backend(i);
            let listen = SocketAddr::new(ns.v4().into(), BACKEND_PORT);
            Backend {
                name,
                namespace: ns.name().to_owned(),
                listen,
                server: MailBackend::start(ns, listen, name),
            }
        })
        .collect();
    show_lab(&lab, &backends);

    progress.step = "starting kgate";
    let config = kgate_config(&lab, &backends);
    println!("kgate's config:");
    for line in config.lines() {
        println!("{}", format!("    {line}").trim_end());
    }
    let mut kgate = Kgate::start_with(&lab, bin, &config);
    progress.kgate_pid = Some(kgate.pid());
    println!(
        "kgate is running in {} (pid {}, `kgate run -c {}`) and logged \"kgate ready\"",
        lab.gateway().name(),
        kgate.pid(),
        kgate.config_path().display()
    );

    heading("sessions");
    progress.step = "running the client sessions";
    let sessions: Vec<Session> = SESSIONS
        .iter()
        .enumerate()
        .map(|(i, &family)| {
            let ip: IpAddr = match family {
                Family::V4 => lab.gateway().v4().into(),
                Family::V6 => lab.gateway().v6().into(),
            };
            let frontend = SocketAddr::new(ip, FRONTEND_PORT);
            lab.client()
                .run(move || Session::run(i + 1, family, frontend))
        })
        .collect();
    show_sessions(&lab, &sessions, &mut problems);

    heading("what the backends saw");
    progress.step = "checking the PROXY headers";
    check_headers(&lab, &backends, &sessions, &mut problems);

    heading("kgate");
    progress.step = "reading kgate's log";
    let connected = sessions.iter().filter(|s| s.local.is_some()).count();
    let dataplane = show_kgate(&kgate, connected);

    heading("pinned maps");
    progress.step = "reading kgate's pinned maps";
    show_maps(&kgate.pin_path(), dataplane.as_deref());
    show_status(bin, &kgate.control_socket());

    heading("cleanup");
    progress.cleanup_shown = true;
    progress.step = "stopping kgate";
    kgate.stop();
    match kgate.exit_status() {
        Some(status) if status.success() => println!("kgate stopped (SIGTERM), exit status 0"),
        Some(status) => {
            println!("kgate stopped, but not cleanly: {status}");
            problems.push(format!("kgate exited with {status} when stopped"));
        }
        None => println!("kgate stopped (its exit status is unknown)"),
    }
    match fs::write(log_file, kgate.log()) {
        Ok(()) => println!("kgate's full log: {}", log_file.display()),
        Err(e) => println!("could not save kgate's log to {}: {e}", log_file.display()),
    }
    drop(kgate);
    progress.step = "stopping the mail backends";
    drop(backends);
    println!("mail backends stopped");
    progress.step = "removing the lab";
    drop(lab);
    Ok(Report {
        problems,
        dataplane,
    })
}

fn heading(title: &str) {
    println!("\n== {title}");
}

fn show_lab(lab: &Lab, backends: &[Backend]) {
    println!("network namespaces, joined by veth pairs, routed through the gateway:");
    let row = |role: &str, ns: &NetNs, what: String| {
        println!(
            "  {role:<8} {:<18} {:<13} {:<16} {what}",
            ns.name(),
            ns.v4().to_string(),
            ns.v6().to_string()
        );
    };
    row(
        "client",
        lab.client(),
        "runs the SMTP client sessions".into(),
    );
    row(
        "gateway",
        lab.gateway(),
        format!("runs kgate, frontend `smtp` on port {FRONTEND_PORT}"),
    );
    for (i, backend) in backends.iter().enumerate() {
        row(
            "backend",
            lab.backend(i),
            format!(
                "runs {}, a mock SMTP server on {} that expects a PROXY header",
                backend.name, backend.listen
            ),
        );
    }
}

/// `[global]` from the lab (its own pin path and control socket, data plane "auto"),
/// the `smtp` frontend on the gateway's v4 and v6 addresses, the `mail` backend.
fn kgate_config(lab: &Lab, backends: &[Backend]) -> String {
    let mut config = global_section(lab, "auto");
    let _ = write!(
        config,
        "\n[[frontends]]\nname = \"smtp\"\nlisten = [\"{}\", \"{}\"]\nbackend = \"mail\"\n\
         \n[[backends]]\nname = \"mail\"\nbalance = \"roundrobin\"\nproxy_protocol = \"v2\"\n\
         connect_timeout = \"2s\"\n\n[backends.health]\ncheck = \"smtp\"\ninterval = \"1s\"\n",
        SocketAddr::new(lab.gateway().v4().into(), FRONTEND_PORT),
        SocketAddr::new(lab.gateway().v6().into(), FRONTEND_PORT),
    );
    for (i, backend) in backends.iter().enumerate() {
        let _ = write!(
            config,
            "\n[[backends.servers]]\nname = \"node{i}\"\naddress = \"{}\"\n",
            backend.listen
        );
    }
    config
}

/// One SMTP session from the client namespace to kgate's frontend.
struct Session {
    n: usize,
    family: Family,
    frontend: SocketAddr,
    /// The client socket's own address: what the backend must see in the header.
    local: Option<SocketAddr>,
    /// `C: ...` and `S: ...` lines.
    transcript: Vec<String>,
    /// The server name in the 220 greeting: which backend answered.
    greeted_by: Option<String>,
    /// The client address the server named in its EHLO reply.
    seen_as: Option<String>,
    result: Result<(), String>,
}

impl Session {
    /// Runs the session (in the calling thread's namespace); never panics.
    fn run(n: usize, family: Family, frontend: SocketAddr) -> Session {
        let mut session = Session {
            n,
            family,
            frontend,
            local: None,
            transcript: Vec::new(),
            greeted_by: None,
            seen_as: None,
            result: Ok(()),
        };
        session.result = session.converse().map_err(|e| format!("{e:#}"));
        session
    }

    fn converse(&mut self) -> anyhow::Result<()> {
        let stream = TcpStream::connect_timeout(&self.frontend, IO_TIMEOUT)
            .with_context(|| format!("connecting to {}", self.frontend))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        self.local = Some(stream.local_addr()?);
        let mut writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);

        let greeting = self.expect(&mut reader, 220, "the greeting")?;
        self.greeted_by = greeting.split_whitespace().nth(1).map(str::to_owned);
        self.send(&mut writer, "EHLO client.kgate-demo.example")?;
        let ehlo = self.expect(&mut reader, 250, "EHLO")?;
        self.seen_as = ehlo
            .split_once(" hello ")
            .map(|(_, who)| who.trim().to_owned());
        self.send(&mut writer, "MAIL FROM:<alice@client.kgate-demo.example>")?;
        self.expect(&mut reader, 250, "MAIL FROM")?;
        self.send(&mut writer, "RCPT TO:<postmaster@mail.kgate-demo.example>")?;
        self.expect(&mut reader, 250, "RCPT TO")?;
        self.send(&mut writer, "DATA")?;
        self.expect(&mut reader, 354, "DATA")?;
        let subject = format!(
            "Subject: kgate demo, session {} over {}",
            self.n,
            self.family.name()
        );
        for line in [
            "From: Alice <alice@client.kgate-demo.example>",
            "To: <postmaster@mail.kgate-demo.example>",
            &subject,
            "",
            "Hello from the client namespace, through kgate.",
            ".",
        ] {
            self.send(&mut writer, line)?;
        }
        self.expect(&mut reader, 250, "the end of the message")?;
        self.send(&mut writer, "QUIT")?;
        self.expect(&mut reader, 221, "QUIT")?;

        // The server closes after 221; anything more would be a stray byte.
        let mut rest = Vec::new();
        reader
            .take(MAX_REPLY_LINE)
            .read_to_end(&mut rest)
            .map_err(|e| anyhow!("waiting for the server to close after QUIT: {e}"))?;
        if !rest.is_empty() {
            bail!(
                "unexpected bytes after 221: {:?}",
                String::from_utf8_lossy(&rest)
            );
        }
        Ok(())
    }

    fn send(&mut self, writer: &mut TcpStream, line: &str) -> anyhow::Result<()> {
        self.transcript.push(format!("C: {line}"));
        writer
            .write_all(format!("{line}\r\n").as_bytes())
            .with_context(|| format!("sending {line:?}"))
    }

    /// Reads one reply (all its lines) and checks its code; returns its last line.
    fn expect(
        &mut self,
        reader: &mut BufReader<TcpStream>,
        code: u16,
        after: &str,
    ) -> anyhow::Result<String> {
        for _ in 0..MAX_REPLY_LINES {
            let mut line = Vec::new();
            let n = reader
                .by_ref()
                .take(MAX_REPLY_LINE)
                .read_until(b'\n', &mut line)
                .map_err(|e| match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        anyhow!("no reply to {after} within {IO_TIMEOUT:?}")
                    }
                    _ => anyhow!("reading the reply to {after}: {e}"),
                })?;
            if n == 0 {
                bail!("the connection closed before the reply to {after}");
            }
            let line = String::from_utf8_lossy(&line)
                .trim_end_matches(['\r', '\n'])
                .to_owned();
            self.transcript.push(format!("S: {line}"));
            // "250-..." continues a reply, "250 ..." ends it.
            if line.as_bytes().get(3) == Some(&b'-') {
                continue;
            }
            if !line.starts_with(&code.to_string()) {
                bail!("expected {code} in reply to {after}, got {line:?}");
            }
            return Ok(line);
        }
        bail!("the reply to {after} has more than {MAX_REPLY_LINES} lines")
    }

    fn client(&self) -> String {
        self.local
            .map_or_else(|| "(not connected)".to_owned(), |a| a.to_string())
    }
}

fn show_sessions(lab: &Lab, sessions: &[Session], problems: &mut Vec<String>) {
    if let Some(first) = sessions.first() {
        println!(
            "session 1, from {} in {} to kgate at {}:",
            first.client(),
            lab.client().name(),
            first.frontend
        );
        for line in &first.transcript {
            println!("{}", format!("    {line}").trim_end());
        }
    }
    println!("all sessions (client address:port -> kgate -> the backend that answered):");
    for s in sessions {
        let answered = match (&s.greeted_by, &s.seen_as) {
            (Some(by), Some(seen)) => format!("{by}, which greeted the client as {seen}"),
            (Some(by), None) => by.clone(),
            _ => "-".to_owned(),
        };
        let result = match &s.result {
            Ok(()) => "ok".to_owned(),
            Err(e) => {
                problems.push(format!("session {} ({}) failed: {e}", s.n, s.family.name()));
                format!("FAILED: {e}")
            }
        };
        println!(
            "  {} {}  {:<25} -> {:<20} -> {answered}: {result}",
            s.n,
            s.family.name(),
            s.client(),
            s.frontend.to_string(),
        );
    }
}

/// Prints each backend's PROXY headers and checks them against the sessions: every
/// connected session's client socket must appear, exactly once, as the source of a
/// header at the backend that answered it.
fn check_headers(
    lab: &Lab,
    backends: &[Backend],
    sessions: &[Session],
    problems: &mut Vec<String>,
) {
    let client_ips: [IpAddr; 2] = [lab.client().v4().into(), lab.client().v6().into()];
    for backend in backends {
        let headers = backend.server.headers();
        println!(
            "{} ({} in {}): {} connection(s), {} PROXY header(s)",
            backend.name,
            backend.listen,
            backend.namespace,
            backend.server.accepted(),
            headers.len()
        );
        for (i, header) in headers.iter().enumerate() {
            println!("  {}. {}", i + 1, describe(header));
            if header.command_local {
                println!("     LOCAL: kgate's own connection, no client address to check");
                continue;
            }
            let session = sessions
                .iter()
                .find(|s| s.local.is_some() && s.local == header.source);
            let verdict = match (session, header.source) {
                (_, None) => Err("the header carries no client address".to_owned()),
                (None, Some(source)) => Err(format!(
                    "{source} is not the address of any client socket (the client namespace \
                     is {} / {})",
                    client_ips[0], client_ips[1]
                )),
                (Some(s), Some(source)) => {
                    if !client_ips.contains(&source.ip()) {
                        Err(format!("{source} is not the client namespace's address"))
                    } else if s.greeted_by.as_deref() != Some(backend.name) {
                        Err(format!(
                            "session {} was answered by {}, not by {}",
                            s.n,
                            s.greeted_by.as_deref().unwrap_or("nobody"),
                            backend.name
                        ))
                    } else if header.destination != Some(s.frontend) {
                        Err(format!(
                            "the destination should be kgate's frontend {}",
                            s.frontend
                        ))
                    } else {
                        Ok(format!(
                            "source = session {}'s socket in the client namespace ({source})",
                            s.n
                        ))
                    }
                }
            };
            match verdict {
                Ok(why) => {
                    println!("     {why}: real client address preserved: yes");
                }
                Err(why) => {
                    println!("     real client address preserved: NO: {why}");
                    problems.push(format!(
                        "{} got a header with a wrong client address: {why}",
                        backend.name
                    ));
                }
            }
        }
    }
    // And the other way round: each session's header reached its backend, once.
    for s in sessions.iter().filter(|s| s.result.is_ok()) {
        let Some(backend) = backends
            .iter()
            .find(|b| s.greeted_by.as_deref() == Some(b.name))
        else {
            problems.push(format!(
                "session {} was greeted by {:?}, which is none of the backends",
                s.n, s.greeted_by
            ));
            continue;
        };
        let count = backend
            .server
            .headers()
            .iter()
            .filter(|h| !h.command_local && h.source == s.local)
            .count();
        if count != 1 {
            problems.push(format!(
                "session {} ({}): {} received {count} PROXY headers naming it, not 1",
                s.n,
                s.client(),
                backend.name
            ));
        }
    }
}

/// `v2 PROXY TCP4 10.200.1.2:40000 -> 10.200.1.1:25 (28 bytes)`.
fn describe(header: &ProxyHeader) -> String {
    let command = if header.version == 1 {
        "PROXY"
    } else if header.command_local {
        "LOCAL"
    } else {
        "PROXY"
    };
    let family = match header.source {
        Some(SocketAddr::V4(_)) => "TCP4",
        Some(SocketAddr::V6(_)) => "TCP6",
        None => "UNSPEC",
    };
    let addresses = match (header.source, header.destination) {
        (Some(s), Some(d)) => format!("{s} -> {d}"),
        _ => "(no addresses)".to_owned(),
    };
    format!(
        "v{} {command} {family} {addresses} ({} bytes)",
        header.version,
        header.raw.len()
    )
}

/// Prints the data plane and the connection log lines; returns the data plane's name.
fn show_kgate(kgate: &Kgate, connections: usize) -> Option<String> {
    let conn_lines = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains("kgate::conn"))
            .map(str::to_owned)
            .collect()
    };
    // kgate logs a connection once both sides have closed: a moment after the session.
    let deadline = Instant::now() + LOG_TIMEOUT;
    while conn_lines(&kgate.log()).len() < connections && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let log = kgate.log();

    let ready = log.lines().find(|l| l.contains(READY_LINE));
    let dataplane = ready.and_then(|l| {
        let (_, rest) = l.split_once("dataplane=")?;
        Some(rest.split_whitespace().next()?.trim_matches('"').to_owned())
    });
    match dataplane.as_deref() {
        Some("sockmap") => println!(
            "data plane: sockmap: kgate writes the PROXY header, then the eBPF program \
             moves the bytes in the kernel"
        ),
        other => {
            let name = other.unwrap_or("unknown (the ready line does not say)");
            println!("!!!!");
            println!("!!!! data plane: {name}, NOT sockmap: the bytes were copied by kgate,");
            println!("!!!! so this run does not show the eBPF splice. kgate's reason:");
            let reasons: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("eBPF"))
                .collect();
            if reasons.is_empty() {
                println!("!!!!   (kgate logged no warning about it)");
            }
            for line in reasons {
                println!("!!!!   {line}");
            }
            println!("!!!!");
        }
    }
    if let Some(ready) = ready {
        println!("  {ready}");
    }
    let lines = conn_lines(&log);
    println!(
        "connection log ({} line(s), one per finished connection):",
        lines.len()
    );
    for line in &lines {
        println!("  {line}");
    }
    if lines.len() < connections {
        println!(
            "  ({} of {connections} connections not logged within {LOG_TIMEOUT:?})",
            connections - lines.len()
        );
    }
    if dataplane.as_deref() == Some("sockmap") {
        let not_spliced = lines.iter().filter(|l| !l.contains(" spliced ")).count();
        if not_spliced > 0 {
            println!("  note: {not_spliced} connection(s) were not fully spliced (see above)");
        }
    }
    dataplane
}

fn show_maps(pin: &Path, dataplane: Option<&str>) {
    if dataplane != Some("sockmap") {
        println!(
            "none: kgate pins its maps under {} only with the sockmap data plane",
            pin.display()
        );
        return;
    }
    println!("kgate pins its maps under {}:", pin.display());
    for name in ["peers", "spliced"] {
        let path = pin.join(name);
        bpftool(&["map", "show", "pinned", &path.display().to_string()]);
        match sock_hash_len(&path) {
            Ok(n) => println!(
                "    entries now: {n} (a connection's two sockets leave the map when it closes)"
            ),
            Err(e) => println!("    entries now: unknown ({e:#})"),
        }
    }
    let stats = pin.join("splice_stats").display().to_string();
    bpftool(&["map", "show", "pinned", &stats]);
    let dump = bpftool(&["map", "dump", "pinned", &stats]);
    if let Some(totals) = dump.as_deref().and_then(sum_per_cpu) {
        println!("    all CPUs together: {totals}");
    }
}

/// What `kgate status` shows, asked of kgate over its control socket.
fn show_status(bin: &Path, socket: &Path) {
    println!("$ kgate status --socket {}", socket.display());
    let mut cmd = Command::new(bin);
    cmd.args(["status", "--socket"]).arg(socket);
    match output_with_timeout(&mut cmd, BPFTOOL_TIMEOUT) {
        Ok((true, stdout, _)) => stdout.lines().for_each(|l| println!("    {l}")),
        Ok((false, stdout, stderr)) => {
            println!("    failed: {}", format!("{stdout}{stderr}").trim())
        }
        Err(e) => println!("    could not run kgate status: {e:#}"),
    }
}

/// Runs bpftool, prints the command and its output (indented); returns the output.
fn bpftool(args: &[&str]) -> Option<String> {
    println!("$ bpftool {}", args.join(" "));
    let mut cmd = Command::new("bpftool");
    cmd.args(args);
    match output_with_timeout(&mut cmd, BPFTOOL_TIMEOUT) {
        Ok((true, stdout, _)) => {
            let lines: Vec<&str> = stdout.lines().collect();
            for line in lines.iter().take(MAX_TOOL_LINES) {
                println!("    {line}");
            }
            if lines.len() > MAX_TOOL_LINES {
                println!(
                    "    ... ({} more lines: run the command above to see them)",
                    lines.len() - MAX_TOOL_LINES
                );
            }
            Some(stdout)
        }
        Ok((false, stdout, stderr)) => {
            println!("    failed: {}", format!("{stdout}{stderr}").trim());
            None
        }
        Err(e) => {
            println!("    could not run bpftool: {e:#}");
            None
        }
    }
}

/// Adds up the `"field": number` lines of a per-CPU map dump, field by field:
/// `redirected_bytes=1234 redirect_failures=0`. None when there is nothing to add.
fn sum_per_cpu(dump: &str) -> Option<String> {
    let mut totals: Vec<(String, u64)> = Vec::new();
    let mut cpus = 0;
    for line in dump.lines() {
        let Some((key, value)) = line.trim().trim_end_matches(',').split_once(':') else {
            continue;
        };
        let key = key.trim().trim_matches('"');
        let Ok(value) = value.trim().parse::<u64>() else {
            continue;
        };
        match key {
            "key" => {}
            "cpu" => cpus += 1,
            _ => match totals.iter_mut().find(|(k, _)| k == key) {
                Some((_, total)) => *total += value,
                None => totals.push((key.to_owned(), value)),
            },
        }
    }
    (cpus > 1 && !totals.is_empty()).then(|| {
        totals
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    })
}

/// Runs `cmd` with its output captured, killing it after `timeout`.
/// Returns (success, stdout, stderr).
fn output_with_timeout(
    cmd: &mut Command,
    timeout: Duration,
) -> anyhow::Result<(bool, String, String)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start it: is it installed?")?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let mut bytes = Vec::new();
                let _ = pipe.read_to_end(&mut bytes);
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
            text
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("it did not finish within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let text = |h: JoinHandle<String>| h.join().unwrap_or_default();
    Ok((status.success(), text(stdout), text(stderr)))
}

/// Looks for anything of this process's labs that survived: namespaces, temp and pin
/// directories, the control socket, the kgate process. Prints what it finds; true if
/// something is left.
fn check_cleanup(kgate_pid: Option<u32>) -> bool {
    // Lab names are `kg<our pid>n<counter>`.
    let prefix = format!("kg{}n", std::process::id());
    let places: [(PathBuf, String, &str); 4] = [
        ("/run/netns".into(), prefix.clone(), "network namespace"),
        (
            std::env::temp_dir(),
            format!("kgate-lab-{prefix}"),
            "lab directory",
        ),
        (
            "/sys/fs/bpf".into(),
            format!("kgate-test-{prefix}"),
            "pin directory",
        ),
        (
            "/run".into(),
            format!("kgate-test-{prefix}"),
            "control socket",
        ),
    ];
    let mut left = Vec::new();
    for (dir, start, what) in &places {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(start.as_str())
            {
                left.push(format!("{what} {}", entry.path().display()));
            }
        }
    }
    if let Some(pid) = kgate_pid
        && Path::new(&format!("/proc/{pid}")).exists()
    {
        left.push(format!("kgate process {pid}"));
    }
    if left.is_empty() {
        println!(
            "lab removed: no network namespace, lab directory, pin directory or control \
             socket of this run is left, and kgate is not running"
        );
        false
    } else {
        for thing in &left {
            println!("LEFT BEHIND: {thing}");
        }
        true
    }
}

/// While it lives, stderr goes through a filter that drops the `kgate| ` lines with
/// which the tests crate's kgate runner echoes kgate's log (the demo shows the log in
/// its own section); every other line passes. Dropping it puts stderr back.
struct QuietKgateEcho {
    saved: OwnedFd,
    filter: Option<JoinHandle<()>>,
}

impl QuietKgateEcho {
    fn install() -> io::Result<QuietKgateEcho> {
        let saved = io::stderr().as_fd().try_clone_to_owned()?;
        let mut out = File::from(saved.try_clone()?);
        let (reader, writer) = io::pipe()?;
        // SAFETY: dup2 between two descriptors this process holds open; it replaces
        // fd 2 atomically, so writers to stderr see either the old or the new target.
        if unsafe { libc::dup2(writer.as_raw_fd(), libc::STDERR_FILENO) } < 0 {
            return Err(io::Error::last_os_error());
        }
        drop(writer);
        let filter = thread::spawn(move || {
            let mut reader = BufReader::new(reader);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if line.starts_with(b"kgate| ") => {}
                    Ok(_) => {
                        let _ = out.write_all(&line);
                    }
                }
            }
        });
        Ok(QuietKgateEcho {
            saved,
            filter: Some(filter),
        })
    }
}

impl Drop for QuietKgateEcho {
    fn drop(&mut self) {
        // SAFETY: as in `install`; afterwards no descriptor of ours holds the pipe's
        // write end, so the filter reads to its end and stops.
        unsafe { libc::dup2(self.saved.as_raw_fd(), libc::STDERR_FILENO) };
        if let Some(filter) = self.filter.take() {
            // Bounded: a child that inherited the pipe could keep it open.
            let deadline = Instant::now() + Duration::from_secs(1);
            while !filter.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            if filter.is_finished() {
                let _ = filter.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_cpu_dumps_are_added_up_by_field() {
        let dump = r#"[{
        "key": 0,
        "values": [{
                "cpu": 0,
                "value": {
                    "redirected_bytes": 100,
                    "redirect_failures": 1
                }
            },{
                "cpu": 1,
                "value": {
                    "redirected_bytes": 23,
                    "redirect_failures": 0
                }
            }
        ]
    }
]"#;
        assert_eq!(
            sum_per_cpu(dump).as_deref(),
            Some("redirected_bytes=123 redirect_failures=1")
        );
        assert_eq!(sum_per_cpu("[]"), None);
    }
}
