// ferrotunnel request inspector: polls /api/requests and draws the rows; no outside asset.
"use strict";
(function () {
  const token = document.querySelector('meta[name="ft-token"]').content;
  const rows = document.getElementById("rows");
  const empty = document.getElementById("empty");
  const statusEl = document.getElementById("status");
  const countEl = document.getElementById("count");
  const message = document.getElementById("message");
  let selected = null;
  let latest = [];

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "" : String(text);
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  function size(n) {
    if (n < 1024) return n + " B";
    if (n < 1048576) return (n / 1024).toFixed(1) + " KiB";
    return (n / 1048576).toFixed(1) + " MiB";
  }

  function say(text) {
    message.textContent = text;
  }

  async function replay(id, button) {
    button.disabled = true;
    say("replaying request " + id + "…");
    try {
      const r = await fetch("/api/requests/" + id + "/replay",
                            {method: "POST", headers: {"X-Ferrotunnel-Token": token}});
      const body = await r.json();
      if (r.ok) {
        say("request " + id + " replayed as " + body.id + ": " + (body.status === null ? "no response" : body.status));
        selected = body.id;
      } else {
        say("replay failed: " + body.error);
      }
    } catch (e) {
      say("replay failed: " + e);
    }
    button.disabled = false;
    poll();
  }

  function draw(list) {
    rows.replaceChildren();
    for (const r of list) {
      const tr = document.createElement("tr");
      tr.dataset.id = r.id;
      tr.className = r.id === selected ? "selected" : "";
      cell(tr, new Date(r.time * 1000).toLocaleTimeString());
      cell(tr, r.tunnel);
      cell(tr, r.method, "method");
      cell(tr, r.path, "path").title = r.path;
      if (r.status === null) cell(tr, r.state, "status pending");
      else cell(tr, r.status, "status s" + String(r.status)[0]);
      cell(tr, r.duration_ms === null ? "" : r.duration_ms.toFixed(1) + " ms", "duration");
      cell(tr, size(r.request_size), "req-size");
      cell(tr, size(r.response_size), "resp-size");
      cell(tr, r.visitor, "visitor");
      const td = cell(tr, "");
      const b = document.createElement("button");
      b.className = "replay";
      b.dataset.id = r.id;
      b.textContent = "Replay";
      b.disabled = !r.replayable;
      b.title = r.replayable ? "send this request to the local service again" : "cannot be replayed";
      b.addEventListener("click", (ev) => { ev.stopPropagation(); replay(r.id, b); });
      td.appendChild(b);
      tr.addEventListener("click", () => select(r.id));
      rows.appendChild(tr);
    }
    empty.hidden = list.length > 0;
    showDetail(list.find((r) => r.id === selected));
  }

  function select(id) {
    selected = id;
    for (const tr of rows.children) tr.className = Number(tr.dataset.id) === id ? "selected" : "";
    showDetail(latest.find((r) => r.id === id));
  }

  function showDetail(r) {
    const detail = document.getElementById("detail");
    if (!r) { detail.hidden = true; return; }
    detail.hidden = false;
    document.getElementById("detail-title").textContent = "#" + r.id + " " + r.method + " " + r.path;
    document.getElementById("detail-note").textContent =
      (r.replay_of ? "replay of #" + r.replay_of + " · " : "") + "tunnel " + r.tunnel + " · " + r.state;
    document.getElementById("request-head").textContent = r.request_head;
    document.getElementById("response-head").textContent = r.response_head || "(no response yet)";
    fetch("/api/requests/" + r.id).then((x) => x.ok ? x.json() : null).then((full) => {
      if (!full || full.id !== selected) return;
      document.getElementById("request-body").textContent =
        full.request_body + (full.request_body_truncated ? "\n… (cut at the body limit)" : "");
      document.getElementById("response-body").textContent =
        full.response_body + (full.response_body_truncated ? "\n… (cut at the body limit)" : "");
    }).catch(() => {});
  }

  async function poll() {
    try {
      const r = await fetch("/api/requests");
      if (!r.ok) throw new Error("HTTP " + r.status);
      const body = await r.json();
      const key = JSON.stringify(body.requests);
      statusEl.textContent = "live";
      countEl.textContent = body.requests.length + " of the last " + body.max_requests + " requests";
      if (key !== JSON.stringify(latest)) {
        latest = body.requests;
        draw(latest);
      }
    } catch (e) {
      statusEl.textContent = "not reachable (" + e.message + ")";
    }
  }

  poll();
  setInterval(poll, 1000);
})();
