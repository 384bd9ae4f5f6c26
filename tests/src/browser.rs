//! A real browser in the lab: Debian's Chromium, headless, in a namespace of the lab,
//! driven over the DevTools protocol through a pair of pipes (`--remote-debugging-pipe`:
//! it reads commands on fd 3 and writes answers on fd 4, each a JSON message ending in a
//! NUL byte). So a test can load a page, wait for its script to do something, read the
//! rendered DOM, change the viewport and take a screenshot, with no WebDriver and no
//! network port of its own.
//!
//! The flags are those that work as root in this sandbox: `--no-sandbox` (root), and
//! no background networking, component updates or sync, since the machine reaches no
//! outside host and Chromium would otherwise keep trying.

use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Stdio},
    sync::mpsc::{self, Receiver},
    thread,
    time::{Duration, Instant},
};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::{lab::NetNs, proc};

/// Debian's package `chromium` installs it here.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// How long one DevTools command may take: a hang becomes a failure.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A headless Chromium with one page open. Dropping it closes the browser.
pub struct Browser {
    child: Child,
    commands: File,
    answers: Receiver<Value>,
    next_id: u64,
    /// The page's DevTools session.
    session: String,
}

impl Browser {
    /// Starts Chromium in `ns` with its profile in `dir` (which must exist) and opens
    /// an empty page of `width` x `height` CSS pixels.
    pub fn start(ns: &NetNs, dir: &Path, width: u32, height: u32) -> Browser {
        let (commands_read, commands) = pipe();
        let (answers_read, answers_write) = pipe();
        let log = File::create(dir.join("chromium.log")).expect("creating chromium.log");
        let mut cmd = ns.command(CHROMIUM);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--remote-debugging-pipe",
        ])
        .arg(format!("--user-data-dir={}", dir.join("profile").display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
        let (read_fd, write_fd) = (commands_read.as_raw_fd(), answers_write.as_raw_fd());
        // SAFETY: only fcntl and dup2 (async-signal-safe) between fork and exec. The
        // ends are first moved to 10 and up, so that putting one on fd 3 cannot close
        // the other; dup2 clears close-on-exec on 3 and 4.
        unsafe {
            cmd.pre_exec(move || {
                let read = libc::fcntl(read_fd, libc::F_DUPFD_CLOEXEC, 10);
                let write = libc::fcntl(write_fd, libc::F_DUPFD_CLOEXEC, 10);
                if read < 0 || write < 0 || libc::dup2(read, 3) < 0 || libc::dup2(write, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("starting {CHROMIUM}: {e} (cargo xtask test installs Debian's chromium)")
        });
        // The child's ends are its own now.
        drop((commands_read, answers_write));

        let (send, answers) = mpsc::channel();
        let mut reader = BufReader::new(File::from(answers_read));
        thread::spawn(move || {
            let mut message = Vec::new();
            while reader.read_until(0, &mut message).is_ok_and(|n| n > 0) {
                message.pop_if(|b| *b == 0);
                if let Ok(value) = serde_json::from_slice(&message)
                    && send.send(value).is_err()
                {
                    return;
                }
                message.clear();
            }
        });
        let mut browser = Browser {
            child,
            commands: File::from(commands),
            answers,
            next_id: 0,
            session: String::new(),
        };
        let target = browser.call(None, "Target.createTarget", json!({ "url": "about:blank" }));
        let target_id = target["targetId"].as_str().expect("a target id").to_owned();
        let attached = browser.call(
            None,
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
        );
        browser.session = attached["sessionId"]
            .as_str()
            .expect("a session id")
            .to_owned();
        browser.resize(width, height, false);
        browser
    }

    /// Sends `method` (to the page's session, or to the browser with `None`) and
    /// returns its result.
    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        let mut bytes = serde_json::to_vec(&message).expect("JSON");
        bytes.push(0);
        self.commands
            .write_all(&bytes)
            .unwrap_or_else(|e| panic!("sending {method} to Chromium: {e}"));
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let answer = self
                .answers
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("no answer to {method} from Chromium: {e}"));
            // Events have no id; answers to this command have its id.
            if answer["id"] != json!(id) {
                continue;
            }
            if let Some(error) = answer.get("error") {
                panic!("{method} failed: {error}");
            }
            return answer["result"].clone();
        }
    }

    fn page(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.call(Some(&session), method, params)
    }

    /// Loads `url` in the page.
    pub fn navigate(&mut self, url: &str) {
        let result = self.page("Page.navigate", json!({ "url": url }));
        assert!(result.get("errorText").is_none(), "loading {url}: {result}");
    }

    /// Sets the viewport; `mobile` makes it a phone's (meta viewport, touch).
    pub fn resize(&mut self, width: u32, height: u32, mobile: bool) {
        self.page(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile }),
        );
    }

    /// The value of the JavaScript `expression` in the page (promises awaited).
    pub fn eval(&mut self, expression: &str) -> Value {
        let result = self.page(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
        );
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("evaluating {expression}: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Evaluates `expression` until it is true (up to `timeout`); panics with
    /// `explain`'s value when it never is.
    pub fn wait_until(&mut self, expression: &str, timeout: Duration, explain: &str) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.eval(expression) == json!(true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "after {timeout:?}, still not `{expression}`: {}",
                self.eval(explain)
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// A PNG of the viewport, written to `path`.
    pub fn screenshot(&mut self, path: &Path) {
        let shot = self.page("Page.captureScreenshot", json!({ "format": "png" }));
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("base64 data"))
            .expect("a screenshot in base64");
        std::fs::write(path, png).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Asked to close, Chromium ends its own helper processes; killed if it does not.
        let mut bytes =
            serde_json::to_vec(&json!({ "id": 0, "method": "Browser.close" })).expect("JSON");
        bytes.push(0);
        let _ = self.commands.write_all(&bytes);
        if proc::wait_timeout(&mut self.child, Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A pipe: (read end, write end), both close-on-exec.
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}
