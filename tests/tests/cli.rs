//! kgate's command line as an operator meets it: `kgate check` on good and bad files,
//! and `dataplane = "auto"` falling back where eBPF cannot load.

use std::{
    fs,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    process::Command,
    time::Duration,
};

use tests::{
    backend::{TcpServer, read_proxy_header},
    kgate::{Kgate, global_section, kgate_bin},
    lab::{Lab, skip_without_root},
};

fn check(config: &str) -> (i32, String, String) {
    let dir = std::env::temp_dir().join(format!("kgate-cli-test-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!(
        "{:x}.toml",
        config.len() * 31 + config.lines().count()
    ));
    fs::write(&path, config).unwrap();
    let out = Command::new(kgate_bin())
        .arg("check")
        .arg("-c")
        .arg(&path)
        .output()
        .expect("running kgate check");
    let _ = fs::remove_file(&path);
    let _ = fs::remove_dir(&dir);
    (
        out.status.code().expect("kgate check exited by itself"),
        String::from_utf8_lossy(&out.stdout).replace(&path.display().to_string(), "FILE"),
        String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "FILE"),
    )
}

const VALID: &str = r#"
[[frontends]]
name = "smtp"
listen = ["192.0.2.1:25", "[2001:db8::1]:25"]
backend = "mail"

[[backends]]
name = "mail"

[[backends.servers]]
name = "node1"
address = "192.0.2.101:30125"
"#;

#[test]
fn check_accepts_a_valid_file_and_says_what_it_holds() {
    let (code, stdout, stderr) = check(VALID);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, "FILE: valid (1 frontend, 1 backend, 1 server)\n");
}

#[test]
fn check_rejects_a_bad_file_with_its_line_and_what_to_change() {
    for (broken, expected) in [
        (
            VALID.replace("backend = \"mail\"", "backend = \"mial\""),
            "kgate: FILE:5:11: frontend `smtp` names backend `mial`, which is not defined",
        ),
        (
            VALID.replace("listen =", "listen_on ="),
            "kgate: FILE:4:1: unknown field `listen_on`",
        ),
        (
            VALID.replace("\"192.0.2.101:30125\"", "\"node1.example\""),
            "kgate: FILE:12:11: `node1.example` is not an address with a port",
        ),
        (
            VALID.replace(
                "[[backends.servers]]\nname = \"node1\"\naddress = \"192.0.2.101:30125\"\n",
                "",
            ),
            "kgate: FILE:8:8: backend `mail` has no servers",
        ),
    ] {
        let (code, stdout, stderr) = check(&broken);
        assert_eq!(code, 1, "{stdout}{stderr}");
        assert!(
            stderr.starts_with(expected),
            "expected {expected:?}, got {stderr:?}"
        );
    }
}

#[test]
fn check_names_a_key_set_twice_and_gives_the_range_of_a_number() {
    let after_backend = |line: &str| {
        VALID.replace(
            "backend = \"mail\"\n",
            &format!("backend = \"mail\"\n{line}\n"),
        )
    };
    for (broken, expected) in [
        (
            after_backend("backend = \"mail\""),
            "kgate: FILE:6:1: `backend` is set twice in the same table: keep one of the two",
        ),
        (
            after_backend("max_connections = 5000000000"),
            "kgate: FILE:6:19: max_connections = 5000000000 is out of range: give 1 to 4294967295",
        ),
        (
            after_backend("max_connections_per_source = -5"),
            "kgate: FILE:6:30: max_connections_per_source = -5 is out of range: give 1 to 4294967295",
        ),
    ] {
        let (code, stdout, stderr) = check(&broken);
        assert_eq!(code, 1, "{stdout}{stderr}");
        assert!(
            stderr.starts_with(expected),
            "expected {expected:?}, got {stderr:?}"
        );
        assert!(!stderr.contains("expected u32"), "{stderr}");
    }
}

#[test]
fn check_says_once_why_a_file_cannot_be_read_and_what_to_do() {
    let out = Command::new(kgate_bin())
        .args(["check", "-c", "/nonexistent/kgate.toml"])
        .output()
        .expect("running kgate check");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "kgate: /nonexistent/kgate.toml: cannot read the configuration: No such file or \
         directory (os error 2); give the file with -c FILE (the Debian package's example is \
         /usr/share/doc/kgate/examples/kgate.toml)\n"
    );
}

#[test]
fn check_takes_every_address_of_the_host_only_when_asked() {
    let wildcard = VALID.replace("\"192.0.2.1:25\"", "\"0.0.0.0:25\"");
    let (code, stdout, stderr) = check(&wildcard);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert_eq!(
        stderr,
        "kgate: FILE:4:11: `0.0.0.0:25` listens on every address of this host, not one: give the \
         address clients connect to (\"192.0.2.1:25\"), or set `any_address = true` in frontend \
         `smtp` if every address is meant\n"
    );
    let asked = wildcard.replace(
        "backend = \"mail\"\n",
        "backend = \"mail\"\nany_address = true\n",
    );
    let (code, stdout, stderr) = check(&asked);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, "FILE: valid (1 frontend, 1 backend, 1 server)\n");
}

/// `kgate status` needs no configuration file: without one it asks the default
/// control socket, and when nothing answers it says which socket it tried and why.
#[test]
fn status_without_arguments_tries_the_default_control_socket_and_says_so() {
    let default_config = std::path::Path::new("/etc/kgate/kgate.toml");
    let default_socket = std::path::Path::new("/run/kgate/kgate.sock");
    let out = Command::new(kgate_bin())
        .arg("status")
        .output()
        .expect("running kgate status");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if default_socket.exists() {
        // A kgate of this machine answers there (not one of the tests').
        println!("a kgate listens on {}: {stderr}", default_socket.display());
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // The Debian package's test may have installed its conffile meanwhile.
    let origin = if default_config.exists() {
        "(`control_socket` in /etc/kgate/kgate.toml)".to_owned()
    } else {
        "(the default control socket, as /etc/kgate/kgate.toml could not be read: No such \
         file or directory (os error 2))"
            .to_owned()
    };
    assert_eq!(
        stderr,
        format!(
            "kgate: cannot reach kgate at /run/kgate/kgate.sock {origin}: No such file or \
             directory (os error 2): is kgate running (and are you root)? Give its control \
             socket with --socket PATH, or its configuration with -c FILE\n"
        )
    );
}

#[test]
fn auto_falls_back_to_the_userspace_data_plane_with_one_warning() {
    if skip_without_root() {
        return;
    }
    let lab = Lab::new(1);
    let backend = SocketAddr::new(IpAddr::V4(lab.backend(0).v4()), 2525);
    let _server = TcpServer::start(lab.backend(0), backend, |mut s| {
        let header = read_proxy_header(&mut s).expect("a PROXY header");
        let source = header.source.expect("a source address");
        s.write_all(format!("220 {}\r\n", source.ip()).as_bytes())
            .unwrap();
    });
    let config = format!(
        "{}\n[[frontends]]\nname = \"smtp\"\nlisten = [\"{}:2525\"]\nbackend = \"mail\"\n\
         [[backends]]\nname = \"mail\"\n[[backends.servers]]\nname = \"node0\"\naddress = \"{backend}\"\n",
        // `nobody` may create its control socket in /tmp, not in /run.
        global_section(&lab, "auto").replace("\"/run/", "\"/tmp/"),
        lab.gateway().v4()
    );
    // As `nobody`, kgate may not load eBPF programs.
    let kgate = Kgate::start_unprivileged(&lab, &config);
    let log = kgate.log();
    assert!(log.contains("dataplane=\"userspace\""), "{log}");
    assert_eq!(
        log.matches("using the userspace data plane").count(),
        1,
        "one warning: {log}"
    );

    let frontend = SocketAddr::new(IpAddr::V4(lab.gateway().v4()), 2525);
    let client = lab.client().v4();
    let banner = lab.client().run(move || {
        let mut c = TcpStream::connect_timeout(&frontend, Duration::from_secs(10)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut banner = String::new();
        c.read_to_string(&mut banner).unwrap();
        banner
    });
    assert_eq!(banner, format!("220 {client}\r\n"));
}

#[test]
fn check_refuses_what_run_would_refuse_more_servers_than_kgate_publishes() {
    let mut config = VALID.replace(
        "[[backends.servers]]\nname = \"node1\"\naddress = \"192.0.2.101:30125\"\n",
        "",
    );
    for i in 0..1100 {
        config.push_str(&format!(
            "[[backends.servers]]\nname = \"node{i}\"\naddress = \"192.0.2.{}:{}\"\n",
            i % 200 + 1,
            30000 + i
        ));
    }
    let (code, stdout, stderr) = check(&config);
    assert_eq!(code, 1, "{stdout}{stderr}");
    // The 1025th server's name, on the line after its table header.
    let line = config
        .lines()
        .position(|l| l == "name = \"node1024\"")
        .unwrap()
        + 1;
    assert!(
        stderr.starts_with(&format!("kgate: FILE:{line}:8: more than 1024 servers")),
        "{stderr}"
    );
}

/// Runs `kgate run -c` on `config` in the lab's gateway, expecting it to refuse:
/// returns its exit code and what it printed. Panics if it is still running after 30 s.
fn refused_run(lab: &Lab, config: &str) -> (i32, String) {
    let path = lab.temp_dir().join("second.toml");
    fs::write(&path, config).unwrap();
    let mut child = lab
        .gateway()
        .command(kgate_bin())
        .arg("run")
        .arg("-c")
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the second kgate is still running");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    )
}

/// A second kgate started by mistake (same control socket, or same pin directory)
/// must stop before it touches anything of the one that runs: its pins stay, and
/// `kgate status` keeps working.
#[test]
fn a_second_kgate_on_the_same_pins_or_control_socket_refuses_to_start_and_touches_nothing() {
    if skip_without_root() {
        return;
    }
    let lab = Lab::new(1);
    let config = |port: u16| {
        format!(
            "{}\n[[frontends]]\nname = \"smtp\"\nlisten = [\"{}:{port}\"]\nbackend = \"mail\"\n\
             [[backends]]\nname = \"mail\"\n[[backends.servers]]\nname = \"node0\"\n\
             address = \"{}:2525\"\n",
            global_section(&lab, "sockmap"),
            lab.gateway().v4(),
            lab.backend(0).v4()
        )
    };
    let first = Kgate::start(&lab, &config(2525));
    let pins_before: Vec<_> = fs::read_dir(first.pin_path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(!pins_before.is_empty());

    let (code, output) = refused_run(&lab, &config(2526));
    assert_ne!(code, 0, "{output}");
    assert!(
        output.contains("another kgate runs with this control_socket"),
        "{output}"
    );

    let other_socket = lab.temp_dir().join("second.sock");
    let same_pins = config(2527).replace(
        &format!(
            "{:?}",
            tests::kgate::control_socket_for(&lab).display().to_string()
        ),
        &format!("{:?}", other_socket.display().to_string()),
    );
    let (code, output) = refused_run(&lab, &same_pins);
    assert_ne!(code, 0, "{output}");
    assert!(
        output.contains("another kgate runs with bpf_pin_path"),
        "{output}"
    );
    assert!(
        !other_socket.exists(),
        "the refused kgate left its control socket"
    );

    let pins_after: Vec<_> = fs::read_dir(first.pin_path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(pins_after, pins_before);
    let status = first.status();
    assert_eq!(status["servers"][0]["server"], "node0", "{status}");
}
