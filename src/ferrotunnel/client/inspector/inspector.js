// ferrotunnel request inspector: polls /api/requests (If-None-Match: its last ETag) and draws the
// rows; the selected row's heads and bodies come from /api/requests/ID. No outside asset.
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
  let etag = null;       // of the last list received
  let shownId = null;    // the request the detail pane shows
  let shownRow = null;   // its list row (as JSON) when its heads were last fetched
  let detailSeq = 0;     // answers to older detail fetches are dropped

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
      cell(tr, pathOf(r), "path").title = pathOf(r);
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
    if (selected === null) return;
    const row = list.find((r) => r.id === selected);
    if (!row) gone(selected, "it left the list");
    else if (JSON.stringify(row) !== shownRow) showDetail(row);  // changed since its heads were fetched
  }

  function pathOf(r) {
    return r.path + (r.path_truncated ? "…" : "");
  }

  function select(id) {
    selected = id;
    for (const tr of rows.children) tr.className = Number(tr.dataset.id) === id ? "selected" : "";
    const row = latest.find((r) => r.id === id);
    if (row) showDetail(row);
    else gone(id, "it left the list");
  }

  function text(id, value) {
    document.getElementById(id).textContent = value;
  }

  // The list rows carry no heads: the selected one's heads and bodies come from /api/requests/ID.
  function showDetail(r) {
    shownRow = JSON.stringify(r);
    document.getElementById("detail").hidden = false;
    text("detail-title", "#" + r.id + " " + r.method + " " + pathOf(r));
    const note = (r.replay_of ? "replay of #" + r.replay_of + " · " : "") + "tunnel " + r.tunnel + " · " + r.state;
    text("detail-note", note);
    if (shownId !== r.id) {  // another request: nothing of the last one stays while this one loads
      shownId = r.id;
      text("request-head", "loading…");
      text("response-head", "");
      text("request-body", "");
      text("response-body", "");
    }
    const seq = ++detailSeq;
    fetch("/api/requests/" + r.id, {cache: "no-store"}).then(async (x) => {
      const full = await x.json().catch(() => null);
      if (seq !== detailSeq) return;  // a later selection or refresh owns the pane
      if (x.status === 404) { gone(r.id, full && full.error); return; }
      if (!x.ok || !full) throw new Error(full && full.error ? full.error : "HTTP " + x.status);
      text("detail-title", "#" + full.id + " " + full.method + " " + full.path);
      text("request-head", full.request_head);
      text("response-head", full.response_head || "(no response yet)");
      text("request-body", full.request_body + (full.request_body_truncated ? "\n… (cut at the body limit)" : ""));
      text("response-body",
           full.response_body + (full.response_body_truncated ? "\n… (cut at the body limit)" : ""));
    }).catch((e) => {
      if (seq === detailSeq) text("detail-note", note + " · its heads could not be loaded (" + e.message + ")");
    });
  }

  // The selected request is no longer kept (the ring dropped it): say so instead of its heads.
  function gone(id, why) {
    detailSeq++;
    shownRow = null;
    shownId = id;
    document.getElementById("detail").hidden = false;
    text("detail-title", "#" + id);
    text("detail-note", "request #" + id + " is no longer kept" + (why ? ": " + why : ""));
    text("request-head", "");
    text("response-head", "");
    text("request-body", "");
    text("response-body", "");
  }

  async function poll() {
    try {
      // the list's ETag changes with every change to the log: an unchanged one is a 304, no body
      const r = await fetch("/api/requests", {cache: "no-store", headers: etag ? {"If-None-Match": etag} : {}});
      if (r.status === 304) {
        statusEl.textContent = "live";
        return;
      }
      if (!r.ok) throw new Error("HTTP " + r.status);
      const body = await r.json();
      etag = r.headers.get("ETag");
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
