//! The stats page on `metrics_listen`, in a real browser: Debian's Chromium, headless,
//! in the lab's gateway namespace, loads `http://127.0.0.1:9464/` as an operator's
//! browser would (through an SSH tunnel, say), and the test reads the DOM the page's
//! own script rendered from `status.json`.
//!
//! Set `KGATE_STATS_SCREENSHOT=path.png` to keep a screenshot of the page (the README's,
//! docs/stats-page.png, comes from here).

use std::{
    fs,
    io::{Read, Write},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{
    backend::{TcpServer, read_proxy_header},
    browser::Browser,
    lab::skip_without_root,
    rig::{Rig, connect, set_timeouts},
};

/// The page refreshes every 2 s; a change shows within a few refreshes.
const CHANGE_SHOWS_WITHIN: Duration = Duration::from_secs(10);

/// A backend that greets after the PROXY header and echoes until the client closes.
fn echo_server(rig: &Rig, i: usize) -> TcpServer {
    TcpServer::start(rig.lab.backend(i), rig.backend_addr(i), |mut s| {
        set_timeouts(&s);
        if read_proxy_header(&mut s).is_err() || s.write_all(b"220 hi\r\n").is_err() {
            return;
        }
        let mut buf = [0u8; 1024];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    })
}

/// What the page shows of each server: `[name, state, total connections, why]`.
const SERVER_ROWS: &str = "JSON.stringify([...document.querySelectorAll('tr[data-server]')].map(tr => [\
     tr.dataset.server, tr.querySelector('.state').dataset.state, \
     tr.querySelector('[data-label=Total]').textContent, \
     tr.querySelector('.reason').textContent]))";

fn server_rows(browser: &mut Browser) -> Vec<[String; 4]> {
    let json = browser.eval(SERVER_ROWS);
    serde_json::from_str(json.as_str().expect("a JSON string")).expect("rows")
}

fn status_server<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["server"] == name)
        .unwrap_or_else(|| panic!("no {name} in {status}"))
}

#[test]
fn the_stats_page_shows_servers_and_their_states_and_follows_a_drain_without_reloading() {
    if skip_without_root() {
        return;
    }
    let rig = Rig::start_with_sections(
        "sockmap",
        2,
        "max_connections = 100",
        "[backends.health]\ncheck = \"tcp\"\ninterval = \"500ms\"",
        &[],
        |lab| {
            let file = lab.temp_dir().join("blocklist");
            fs::write(&file, "192.0.2.0/24\n2001:db8:bad::/48\n").unwrap();
            format!(
                "\n[xdp]\ninterfaces = [\"{}\"]\nblocklist_file = \"{}\"\n",
                lab.gateway().ifname(),
                file.display()
            )
        },
    );
    let mut servers: Vec<TcpServer> = (0..2).map(|i| echo_server(&rig, i)).collect();
    // Checked before the servers listened, they went down; they come back up.
    let deadline = Instant::now() + CHANGE_SHOWS_WITHIN;
    while !rig.kgate.status()["servers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["state"] == "up")
    {
        assert!(Instant::now() < deadline, "{}", rig.kgate.status());
        thread::sleep(Duration::from_millis(100));
    }
    // A few connections, one of them left open, so there are numbers to show.
    let frontend = rig.frontend_v4();
    let held = rig.lab.client().run(move || {
        let mut greeted: Vec<_> = (0..4)
            .map(|_| {
                let mut c = connect(frontend);
                let mut banner = [0u8; 8];
                c.read_exact(&mut banner).unwrap();
                c
            })
            .collect();
        greeted.truncate(1);
        greeted
    });
    rig.connection_lines(3);
    rig.wait_spliced(2);

    let dir = rig.lab.temp_dir().join("chromium");
    fs::create_dir_all(&dir).unwrap();
    let mut browser = Browser::start(rig.lab.gateway(), &dir, 1280, 800);
    browser.navigate(&format!("http://{}/", rig.metrics_listen()));
    browser.wait_until(
        "(() => { const states = [...document.querySelectorAll('tr[data-server] .state')]; \
         return Number(document.body?.dataset.updates) >= 1 && states.length > 0 && \
         states.every(td => td.dataset.state === 'up'); })()",
        CHANGE_SHOWS_WITHIN,
        SERVER_ROWS,
    );

    // Every server, up, with the same numbers as `kgate status` (nothing moves now).
    let status = rig.kgate.status();
    let rows = server_rows(&mut browser);
    let names: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(names, ["mail/node0", "mail/node1"]);
    for row in &rows {
        let server = status_server(&status, &row[0]["mail/".len()..]);
        assert_eq!(row[1], "up", "{row:?}");
        assert_eq!(row[2], server["total_connections"].to_string(), "{row:?}");
        assert_eq!(row[3], server["reason"].as_str().unwrap(), "{row:?}");
    }
    let total: u64 = rows.iter().map(|r| r[2].parse::<u64>().unwrap()).sum();
    assert_eq!(total, 4, "{rows:?}");
    let frontend_row = browser.eval(
        "[...document.querySelectorAll('tr[data-frontend=smtp] td')].map(td => td.textContent)",
    );
    assert_eq!(frontend_row[3], "1 / 100", "active / max: {frontend_row}");
    assert_eq!(frontend_row[4], "4", "total: {frontend_row}");
    let spliced = browser.eval(
        "[...document.querySelectorAll('tr[data-server] [data-label^=Spliced]')].map(td => td.textContent)",
    );
    assert!(
        spliced.as_array().unwrap().iter().any(|s| s == "1/0/0/0"),
        "the open connection shows as spliced: {spliced}"
    );
    assert_eq!(
        browser.eval("document.getElementById('xdp').hidden"),
        Value::Bool(false)
    );
    assert_eq!(
        browser.eval("document.getElementById('xdp-blocklist').textContent"),
        "2"
    );
    // Everything the page loaded came from kgate itself.
    let foreign = browser.eval(
        "performance.getEntriesByType('resource').map(e => e.name).filter(u => !u.startsWith(location.origin))",
    );
    assert_eq!(foreign, Value::Array(vec![]), "assets from elsewhere");
    let policy = browser
        .eval("fetch('/').then(r => r.headers.get('content-security-policy'))")
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        policy.starts_with("default-src 'none'; script-src 'self';"),
        "the page may load nothing from elsewhere: {policy:?}"
    );
    assert_eq!(
        browser.eval(
            "Promise.all([fetch('/nothing'), fetch('/', { method: 'POST' }), \
             fetch('/metrics'), fetch('/status.json')]).then(rs => rs.map(r => r.status))"
        ),
        serde_json::json!([404, 405, 200, 200])
    );

    // Drained from another shell: the page follows without reloading itself.
    browser.eval("window.kgateSameDocument = true");
    let out = rig.kgate.server_set("mail/node1", "drain");
    assert!(out.status.success(), "{out:?}");
    browser.wait_until(
        "document.querySelector('tr[data-server=\"mail/node1\"] .state').dataset.state === 'drain'",
        CHANGE_SHOWS_WITHIN,
        SERVER_ROWS,
    );
    assert_eq!(
        browser.eval("window.kgateSameDocument === true"),
        Value::Bool(true),
        "the page reloaded itself"
    );
    let rows = server_rows(&mut browser);
    assert_eq!(rows[0][1], "up");
    assert_eq!(rows[1][1], "drain");
    assert!(
        rows[1][3].starts_with("set to drain by the operator"),
        "{rows:?}"
    );
    assert_eq!(
        browser.eval("document.querySelector('tr[data-server=\"mail/node1\"] .badge').textContent"),
        "drain"
    );
    assert_eq!(
        status_server(&rig.kgate.status(), "node1")["state"],
        "drain"
    );

    // node0's server stops: the checks take it down, and the page says why.
    servers.remove(0).stop();
    browser.wait_until(
        "document.querySelector('tr[data-server=\"mail/node0\"] .state').dataset.state === 'down'",
        CHANGE_SHOWS_WITHIN,
        SERVER_ROWS,
    );
    let rows = server_rows(&mut browser);
    assert!(
        rows[0][3].starts_with("connection refused (")
            && rows[0][3].ends_with("failed checks in a row)"),
        "{rows:?}"
    );
    let check =
        browser.eval("document.querySelector('tr[data-server=\"mail/node0\"] .check').textContent");
    assert!(
        check.as_str().unwrap().starts_with("refused, "),
        "the last check, its duration and its error: {check}"
    );
    if let Some(path) = std::env::var_os("KGATE_STATS_SCREENSHOT") {
        browser.resize(1280, 600, false);
        browser.screenshot(&PathBuf::from(path));
    }

    // On a phone: each row a card, nothing to scroll sideways.
    browser.resize(390, 844, true);
    browser.wait_until(
        "getComputedStyle(document.querySelector('tr[data-server]')).display === 'block'",
        CHANGE_SHOWS_WITHIN,
        "getComputedStyle(document.querySelector('tr[data-server]')).display",
    );
    let widths = "JSON.stringify([window.innerWidth, document.documentElement.scrollWidth, \
                  ...[...document.querySelectorAll('.wide')].map(w => w.scrollWidth)])";
    let widths: Vec<u64> =
        serde_json::from_str(browser.eval(widths).as_str().unwrap()).expect("widths");
    assert!(
        widths[1..].iter().all(|&w| w <= widths[0]),
        "the page or a table is wider than the phone's {} pixels: {widths:?}",
        widths[0]
    );
    drop(held);
}
