//! `/metrics` as Prometheus reads it: `promtool check metrics` on the text format, a
//! real Prometheus (Debian's `prometheus` package) scraping kgate in the gateway with
//! its default `Accept` header (OpenMetrics first), and the series an operator
//! alerts on: connect errors and retries, check durations, state, weight, process.

use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use tests::{
    backend::MailBackend,
    lab::skip_without_root,
    prometheus::{Prometheus, promtool_check, scrape},
    rig::{BACKEND_PORT, Rig},
    smtp::SmtpClient,
};

/// What Prometheus 2.42 sends.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,\
    application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// node0 answers; node1 is stopped once both passed their first check, so the
/// clients round robin sends to node1 fail over to node0.
fn rig_with_a_failing_server() -> (Rig, MailBackend) {
    let mut servers = Vec::new();
    let rig = Rig::start_with_sections(
        "sockmap",
        2,
        "",
        // node1 stays up (taking clients) for 100 failed checks after it stops.
        "[backends.health]\ncheck = \"tcp\"\ninterval = \"500ms\"\nfall = 100",
        &[],
        // Listening before kgate starts, so that both pass their first check.
        |lab| {
            servers = (0..2)
                .map(|i| {
                    let address = SocketAddr::new(lab.backend(i).v4().into(), BACKEND_PORT);
                    MailBackend::start(lab.backend(i), address, &format!("node{i}"))
                })
                .collect();
            String::new()
        },
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while ["node0", "node1"]
        .iter()
        .any(|s| rig.metric_with("kgate_server_checks_passed_total", &[("server", s)]) < 1.0)
    {
        assert!(Instant::now() < deadline, "the first checks did not pass");
        thread::sleep(Duration::from_millis(100));
    }
    let node0 = servers.remove(0);
    servers.remove(0).stop();
    let frontend = rig.frontend_v4();
    rig.lab.client().run(move || {
        for _ in 0..4 {
            greet_and_quit(frontend);
        }
    });
    (rig, node0)
}

fn greet_and_quit(frontend: SocketAddr) {
    let mut smtp = SmtpClient::connect(frontend, Duration::from_secs(10)).unwrap();
    smtp.read_reply().unwrap();
    smtp.expect("QUIT", 221).unwrap();
}

#[test]
fn promtool_finds_nothing_wrong_with_the_text_format_and_openmetrics_comes_when_asked() {
    if skip_without_root() {
        return;
    }
    let (rig, _node0) = rig_with_a_failing_server();
    let text = scrape(rig.lab.gateway(), rig.metrics_listen(), None);
    assert_eq!(
        text.content_type,
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let checked = promtool_check(&text.body);
    assert!(
        checked.status.success() && checked.stdout.is_empty() && checked.stderr.is_empty(),
        "promtool check metrics: {}\n{}{}\n--- the body ---\n{}",
        checked.status,
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr),
        text.body
    );
    // Every family has its HELP, and a counter's family is its samples' name.
    for line in text.body.lines().filter(|l| l.starts_with("# TYPE ")) {
        let family = line.split(' ').nth(2).unwrap();
        assert!(
            text.body.contains(&format!("# HELP {family} ")),
            "{family} has no HELP"
        );
        if line.ends_with(" counter") {
            assert!(family.ends_with("_total"), "{line}");
        }
    }
    assert!(!text.body.contains("# EOF"));

    let open = scrape(
        rig.lab.gateway(),
        rig.metrics_listen(),
        Some(PROMETHEUS_ACCEPT),
    );
    assert_eq!(
        open.content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(open.body.ends_with("# EOF\n"), "{}", open.body);
    assert!(
        open.body
            .contains("# TYPE kgate_server_connect_errors counter\n"),
        "{}",
        open.body
    );
}

#[test]
fn prometheus_scrapes_kgate_and_sees_failovers_checks_states_and_the_process() {
    if skip_without_root() {
        return;
    }
    let (rig, _node0) = rig_with_a_failing_server();
    let prometheus = Prometheus::start(
        rig.lab.gateway(),
        "127.0.0.1:9090",
        rig.metrics_listen(),
        &rig.lab.temp_dir().join("prometheus"),
    );
    let timeout = Duration::from_secs(30);
    let up = prometheus.wait_for("up{job=\"kgate\"} == 1", timeout);
    assert_eq!(up.len(), 1, "Prometheus could not scrape kgate: {up:?}");

    let value = |expr: &str| {
        let result = prometheus.wait_for(expr, timeout);
        assert_eq!(result.len(), 1, "{expr}: {result:?}");
        result[0].1
    };
    // Round robin sent two of the four clients to node1 first: refused, then node0.
    assert_eq!(
        value("kgate_server_connect_errors_total{server=\"node1\"}"),
        2.0
    );
    assert_eq!(
        value("kgate_server_connect_errors_total{server=\"node0\"}"),
        0.0
    );
    assert_eq!(value("kgate_backend_retries_total{backend=\"mail\"}"), 2.0);
    assert_eq!(
        value("kgate_server_connections_total{server=\"node0\"}"),
        4.0
    );
    let check = value("kgate_server_check_duration_seconds{server=\"node0\"}");
    assert!(check > 0.0 && check < 2.0, "check took {check} s");
    // One series per state, the server's own at 1: five series, one of them 1.
    let states = prometheus.wait_for("kgate_server_state{server=\"node0\"}", timeout);
    assert_eq!(states.len(), 5, "{states:?}");
    let current: Vec<_> = states.iter().filter(|(_, v)| *v == 1.0).collect();
    assert_eq!(current.len(), 1, "{states:?}");
    assert_eq!(current[0].0["state"], "up");
    let age = value("kgate_server_state_age_seconds{server=\"node0\"}");
    assert!((0.0..600.0).contains(&age), "state age {age}");
    assert_eq!(value("kgate_server_weight{server=\"node1\"}"), 1.0);
    // The process: kgate's own figures, as /proc has them.
    let pid = rig.kgate.pid();
    let start = value("process_start_time_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        now - start >= 0.0 && now - start < 600.0,
        "started at {start}"
    );
    let rss = value("process_resident_memory_bytes");
    assert!(rss > 1e6 && rss < 1e9, "RSS {rss}");
    let fds = value("process_open_fds");
    let open_now = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as f64;
    assert!(
        fds > 5.0 && (fds - open_now).abs() < 20.0,
        "{fds} fds, /proc has {open_now}"
    );
}
