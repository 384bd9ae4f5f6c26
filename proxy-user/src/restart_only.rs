//! What a reload cannot apply: settings read once, when kgate starts. `kgate reload`
//! applies everything else, then lists these and exits non-zero, so an operator never
//! takes "reloaded" for "all applied" (the README lists them too).

use crate::config::{Config, DataplaneMode};

/// The changes from `old` to `new` that take effect only when kgate restarts, each
/// as "`key`: old -> new". `xdp_attached` says whether XDP runs now (it may not,
/// with an `[xdp]` section, only when kgate could not load it and stopped: then no
/// reload happens).
pub fn changes(old: &Config, new: &Config, xdp_attached: bool) -> Vec<String> {
    let (o, n) = (&old.global, &new.global);
    let mut changes = Vec::new();
    let mut differ = |key: &str, before: String, after: String| {
        if before != after {
            changes.push(format!("`{key}`: {before} -> {after}"));
        }
    };
    differ(
        "bpf_pin_path",
        o.bpf_pin_path.display().to_string(),
        n.bpf_pin_path.display().to_string(),
    );
    differ(
        "control_socket",
        o.control_socket.display().to_string(),
        n.control_socket.display().to_string(),
    );
    differ("dataplane", mode(o.dataplane), mode(n.dataplane));
    let listen = |l: Option<std::net::SocketAddr>| l.map_or("none".to_owned(), |a| a.to_string());
    differ(
        "metrics_listen",
        listen(o.metrics_listen),
        listen(n.metrics_listen),
    );
    match (&old.xdp, &new.xdp) {
        (None, Some(_)) if !xdp_attached => {
            changes.push("[xdp] added: XDP attaches when kgate starts".to_owned())
        }
        (Some(_), None) => {
            changes.push("[xdp] removed: XDP stays attached until kgate restarts".to_owned())
        }
        (Some(before), Some(after)) => {
            differ(
                "xdp.interfaces",
                before.interfaces.join(", "),
                after.interfaces.join(", "),
            );
            differ(
                "xdp.mode",
                format!("{:?}", before.mode).to_lowercase(),
                format!("{:?}", after.mode).to_lowercase(),
            );
        }
        _ => {}
    }
    changes
}

fn mode(mode: DataplaneMode) -> String {
    format!("{mode:?}").to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(global: &str, xdp: &str) -> Config {
        let text = format!(
            "[global]\n{global}\n[[frontends]]\nname = \"f\"\nlisten = [\"127.0.0.1:2525\"]\n\
             backend = \"b\"\n[[backends]]\nname = \"b\"\n[[backends.servers]]\nname = \"s\"\n\
             address = \"127.0.0.1:25\"\n{xdp}"
        );
        Config::parse(&text, std::path::Path::new("test.toml")).unwrap()
    }

    #[test]
    fn metrics_listen_dataplane_and_an_added_xdp_section_need_a_restart() {
        let old = config("", "");
        let new = config(
            "metrics_listen = \"127.0.0.1:9464\"\ndataplane = \"userspace\"",
            "[xdp]\ninterfaces = [\"lo\"]\n",
        );
        assert_eq!(
            changes(&old, &new, false),
            [
                "`dataplane`: auto -> userspace",
                "`metrics_listen`: none -> 127.0.0.1:9464",
                "[xdp] added: XDP attaches when kgate starts",
            ]
        );
        assert!(changes(&old, &old, false).is_empty());
    }
}
