// kgate's stats page: fetches status.json every few seconds and updates the tables in
// place (rows keyed by name, cells changed only when their text changes), so nothing
// flickers and a reader's selection stays. The document is the one `kgate status`
// prints (proxy-user/src/status.rs).
"use strict";

const REFRESH_MS = 2000;
let lastGood = null;
let updates = 0;

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return (i === 0 ? String(n) : n.toFixed(1)) + " " + units[i];
}

function duration(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24;
  const m = Math.floor(s / 60) % 60, r = s % 60;
  if (d > 0) return d + "d " + h + "h";
  if (h > 0) return h + "h " + m + "m";
  if (m > 0) return m + "m " + r + "s";
  return r + "s";
}

function rate(r) {
  return r.toFixed(1);
}

function clock(date) {
  return date.toLocaleTimeString([], { hour12: false });
}

function text(el, value) {
  if (el.textContent !== value) el.textContent = value;
}

// Fills `tr` with one cell per spec `[label, value, class]`: created the first time,
// updated in place afterwards. `value` is a string, or a function that renders into
// the cell (called each time).
function cells(tr, specs) {
  specs.forEach(([label, value, cls], i) => {
    let td = tr.children[i];
    if (!td) {
      td = document.createElement("td");
      td.dataset.label = label;
      if (cls) td.className = cls;
      tr.appendChild(td);
    }
    if (typeof value === "function") value(td);
    else text(td, value);
  });
}

// Makes the children of `parent` one element per item, in order, keyed by `keyOf`;
// `make` creates a missing one, `fill` updates it.
function sync(parent, items, keyOf, make, fill) {
  const existing = new Map();
  for (const el of parent.children) existing.set(el.dataset.key, el);
  items.forEach((item, i) => {
    const key = keyOf(item);
    let el = existing.get(key);
    if (!el) {
      el = make(item);
      el.dataset.key = key;
    }
    existing.delete(key);
    if (parent.children[i] !== el) parent.insertBefore(el, parent.children[i] || null);
    fill(el, item);
  });
  for (const el of existing.values()) el.remove();
}

function showAbout(k) {
  text(document.getElementById("host"), k.host ? "on " + k.host : "");
  const parked = k.parked_connections == null ? "" : " (" + k.parked_connections + " parked)";
  text(document.getElementById("about"),
    "version " + k.version + " · " + k.dataplane + " data plane · up " +
    duration(k.now - k.started) + " · " + k.open_connections +
    (k.open_connections === 1 ? " connection open" : " connections open") + parked +
    " · pid " + k.pid);
  document.title = "kgate" + (k.host ? " on " + k.host : "");
}

function showFrontends(frontends) {
  const tbody = document.querySelector("#frontends tbody");
  sync(tbody, frontends, (f) => f.name, () => document.createElement("tr"), (tr, f) => {
    tr.dataset.frontend = f.name;
    let refused = "–";
    let why = "";
    if (f.proxy_refused) {
      const entries = Object.entries(f.proxy_refused);
      refused = String(entries.reduce((sum, [, n]) => sum + n, 0));
      why = entries.map(([k, n]) => k + " " + n).join(", ");
    }
    cells(tr, [
      ["Frontend", f.name, "name"],
      ["Listen", f.listen.join(" ")],
      ["Backend", f.backend],
      ["Active", f.max_connections == null ? String(f.active_connections)
        : f.active_connections + " / " + f.max_connections, "n"],
      ["Total", String(f.total_connections), "n"],
      ["Refused", String(f.refused), "n"],
      ["Rate/s (max)", rate(f.rate) + " (" + rate(f.rate_max) + ")", "n"],
      ["Bytes in / out", bytes(f.bytes_in) + " / " + bytes(f.bytes_out), "n"],
      ["PROXY refused", (td) => {
        text(td, refused);
        if (td.title !== why) td.title = why;
      }, "n"],
    ]);
  });
}

const SERVER_COLUMNS = [
  "Server", "State", "Why", "Last check", "Active", "Total", "Rate/s",
  "Spliced/half/fwd/copied", "Bytes in / out", "Weight",
];
const NUMERIC = new Set(["Active", "Total", "Rate/s", "Spliced/half/fwd/copied",
  "Bytes in / out", "Weight"]);

function newBackend() {
  const section = document.createElement("section");
  const h2 = document.createElement("h2");
  h2.append(document.createElement("span"), " ", document.createElement("small"));
  const table = document.createElement("table");
  const head = table.createTHead().insertRow();
  for (const name of SERVER_COLUMNS) {
    const th = document.createElement("th");
    th.textContent = name;
    if (NUMERIC.has(name)) th.className = "n";
    head.appendChild(th);
  }
  table.createTBody();
  const wide = document.createElement("div");
  wide.className = "wide";
  wide.appendChild(table);
  section.append(h2, wide);
  return section;
}

function lastCheck(s, now) {
  if (!s.last_check) return "–";
  let out = s.last_check;
  if (s.last_check_us != null) out += ", " + (s.last_check_us / 1000).toFixed(1) + " ms";
  if (s.last_check_at != null) out += ", " + duration(now - s.last_check_at) + " ago";
  if (s.last_check_detail) out += ": " + s.last_check_detail;
  return out;
}

function showServer(tr, s, now) {
  tr.dataset.server = s.backend + "/" + s.server;
  cells(tr, [
    ["Server", (td) => {
      if (!td.firstChild) {
        const address = document.createElement("small");
        address.className = "address";
        td.append(document.createElement("span"), address);
      }
      const [name, address] = td.children;
      text(name, s.server);
      text(address, s.address);
    }, "name"],
    ["State", (td) => {
      if (!td.firstChild) {
        const badge = document.createElement("span");
        const since = document.createElement("span");
        since.className = "since";
        td.append(badge, since);
      }
      const [badge, since] = td.children;
      if (badge.className !== "badge " + s.state) badge.className = "badge " + s.state;
      text(badge, s.state);
      td.dataset.state = s.state;
      text(since, "for " + duration(now - s.since));
    }, "state"],
    ["Why", s.reason, "reason"],
    ["Last check", lastCheck(s, now), "check"],
    ["Active", String(s.active_connections), "n"],
    ["Total", String(s.total_connections), "n"],
    ["Rate/s", rate(s.rate), "n"],
    ["Spliced/half/fwd/copied", s.spliced_connections + "/" + s.half_spliced_connections +
      "/" + (s.forwarded_connections || 0) + "/" + s.copied_connections, "n"],
    ["Bytes in / out", bytes(s.bytes_in) + " / " + bytes(s.bytes_out), "n"],
    ["Weight", String(s.weight), "n"],
  ]);
}

function showBackends(status) {
  const now = status.kgate.now;
  sync(document.getElementById("backends"), status.backends, (b) => b.name, newBackend,
    (section, b) => {
      section.dataset.backend = b.name;
      const [name, details] = section.querySelector("h2").children;
      text(name, "Backend " + b.name);
      text(details, b.balance + " · check " + b.check + " · PROXY " + b.proxy_protocol +
        " · " + b.no_server + " closed with no server");
      const servers = status.servers.filter((s) => s.backend === b.name);
      sync(section.querySelector("tbody"), servers, (s) => s.server,
        () => document.createElement("tr"), (tr, s) => showServer(tr, s, now));
    });
}

function showXdp(x) {
  const section = document.getElementById("xdp");
  section.hidden = !x;
  if (!x) return;
  text(document.getElementById("xdp-passed"), String(x.passed));
  text(document.getElementById("xdp-dropped-blocklist"), String(x.dropped_blocklist));
  text(document.getElementById("xdp-dropped-syn-rate"), String(x.dropped_syn_rate));
  text(document.getElementById("xdp-malformed"), String(x.malformed));
  text(document.getElementById("xdp-blocklist"), String(x.blocklist_entries));
}

function freshness(error) {
  const p = document.getElementById("freshness");
  if (error) {
    p.className = "stale";
    text(p, "No answer from kgate" + (lastGood ? " since " + clock(lastGood) : "") + ": " +
      error + ". Retrying every " + REFRESH_MS / 1000 + " s.");
  } else {
    p.className = "";
    text(p, "Updated " + clock(lastGood) + ", every " + REFRESH_MS / 1000 + " s.");
  }
}

async function refresh() {
  try {
    const response = await fetch("status.json", { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    const status = await response.json();
    showAbout(status.kgate);
    showFrontends(status.frontends);
    showBackends(status);
    showXdp(status.xdp);
    lastGood = new Date();
    updates++;
    document.body.dataset.updates = String(updates);
    freshness(null);
  } catch (e) {
    freshness(e.message || String(e));
  }
  setTimeout(refresh, REFRESH_MS);
}

refresh();
