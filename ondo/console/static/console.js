// The console's little JavaScript: the token, the live stream, the charts (uPlot), the forms.
// Pages are rendered by the server; this file only adds what a page cannot do by itself.
(function () {
  "use strict";
  const body = document.body;
  const prefix = body.dataset.prefix;
  const KEY = "ondo_console_token";
  const ondo = (window.ondo = { seen: [], opens: 0, charts: {} });

  // -- the token: this tab's session storage, and a cookie for pages and the stream ------
  function cookieToken() {
    const m = document.cookie.match(new RegExp("(?:^|; )" + KEY + "=([^;]*)"));
    return m ? decodeURIComponent(m[1]) : null;
  }
  function token() { return sessionStorage.getItem(KEY) || cookieToken(); }
  function setToken(t) {
    sessionStorage.setItem(KEY, t);
    document.cookie = KEY + "=" + encodeURIComponent(t) + "; path=" + prefix + "; SameSite=Strict";
  }
  function forgetToken() {
    sessionStorage.removeItem(KEY);
    document.cookie = KEY + "=; path=" + prefix + "; max-age=0; SameSite=Strict";
  }

  // Changes send the token in the Authorization header (never a cookie alone).
  async function api(method, path, payload) {
    const headers = { Accept: "application/json" };
    const t = token();
    if (t) headers.Authorization = "Bearer " + t;
    if (payload !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch(prefix + "/api" + path, {
      method, headers, body: payload === undefined ? undefined : JSON.stringify(payload),
    });
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    const message = data && data.error ? data.error.message : r.statusText;
    return { ok: r.ok, status: r.status, data, message };
  }
  ondo.api = api;

  function say(el, text, ok) {
    if (!el) return;
    el.textContent = text;
    el.className = "message " + (ok ? "ok" : "error");
    if (el.id) ondo.said[el.id] = [text, ok];  // kept when the part is re-rendered
  }
  ondo.said = {};
  function resay() {
    Object.keys(ondo.said).forEach((id) => say(document.getElementById(id), ...ondo.said[id]));
  }

  // Re-render part of the page from the server (one template for both renders).
  const refreshing = {};
  function refresh(selector, then) {
    if (refreshing[selector]) return;
    refreshing[selector] = setTimeout(async () => {
      refreshing[selector] = null;
      const r = await fetch(location.href, { headers: { Accept: "text/html" } });
      if (!r.ok) return;
      const doc = new DOMParser().parseFromString(await r.text(), "text/html");
      const fresh = doc.querySelector(selector);
      const old = document.querySelector(selector);
      if (fresh && old) {
        old.replaceWith(fresh);
        if (then) then();
      }
    }, 300);
  }

  // -- the live stream: entries resume from Last-Event-ID (the log's seq) ----------------
  const entryHandlers = [];
  const pointHandlers = [];
  function connect(points) {
    if (!window.EventSource) return;
    const q = new URLSearchParams({ after: body.dataset.headSeq || "0" });
    const every = new URLSearchParams(location.search).get("reconnect_s");
    if (every) q.set("reconnect_s", every);
    if (!points) q.set("points", "false");
    const es = new EventSource(prefix + "/api/stream?" + q.toString());
    const dot = document.getElementById("stream-state");
    es.onopen = () => { ondo.opens += 1; if (dot) { dot.textContent = "●"; dot.title = "live"; } };
    es.onerror = () => { if (dot) { dot.textContent = "○"; dot.title = "reconnecting"; } };
    es.addEventListener("entry", (ev) => {
      const e = JSON.parse(ev.data);
      ondo.seen.push(e.seq);
      entryHandlers.forEach((h) => h(e));
    });
    es.addEventListener("point", (ev) => {
      const p = JSON.parse(ev.data);
      pointHandlers.forEach((h) => h(p));
    });
    ondo.stream = es;
  }

  // -- charts ----------------------------------------------------------------------------
  const COLORS = ["#d9480f", "#1971c2", "#7048e8", "#2b8a3e", "#e67700", "#c2255c"];
  function makeChart(id, labels, data, opts) {
    const el = document.getElementById(id);
    if (!el || !window.uPlot) return null;
    opts = opts || {};
    const series = [{}].concat(labels.map((l, i) => Object.assign({
      label: l, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: false,
    }, (opts.series || [])[i] || {})));
    const u = new uPlot({
      width: Math.max(280, el.clientWidth - 8), height: opts.height || 170, series,
      scales: { x: { time: opts.time !== false }, y: opts.y || {} },
      axes: [{ space: 70 }, { size: 52 }], legend: { live: false }, hooks: opts.hooks || {},
    }, data, el);
    el.dataset.points = String(data[0].length);
    ondo.charts[id] = { u, data, el };
    return ondo.charts[id];
  }
  function append(chart, row, range) {
    if (!chart) return;
    const d = chart.data;
    if (d[0].length && row[0] <= d[0][d[0].length - 1]) return;
    row.forEach((v, i) => d[i].push(v === undefined ? null : v));
    while (range && d[0].length && d[0][0] < row[0] - range) d.forEach((c) => c.shift());
    chart.u.setData(d);
    chart.el.dataset.points = String(d[0].length);
  }

  const REASONS = [["sw_power_cap", 4], ["hw_slowdown", 8], ["sw_thermal_slowdown", 32],
                   ["hw_thermal_slowdown", 64], ["hw_power_brake", 128]];
  const LAYOUT = {
    "chart-temp": [["die sensor °C", "twin estimate °C", "twin forecast peak °C", "HBM °C"],
                   (s) => [s.temp_c, s.twin_die_c, s.twin_peak_c, s.mem_temp_c]],
    "chart-power": [["power W", "power max W", "budget W"],
                    (s) => [s.power_w, s.power_max_w, s.power_budget_w]],
    "chart-clock": [["SM MHz", "SM min MHz"], (s) => [s.sm_mhz, s.sm_min_mhz]],
    "chart-throttle": [REASONS.map((r) => r[0]),
                       (s) => REASONS.map((r, i) => s.throttle_reasons.map(
                         (b) => (b != null && (b & r[1]) ? i + 1 : null)))],
    "chart-tokens": [["output tok/s"], (s) => [s.tok_s]],
    "chart-kv": [["KV use %"], (s) => [s.kv_pct]],
    "chart-queue": [["waiting", "running"], (s) => [s.num_waiting, s.num_running]],
    "chart-latency": [["TTFT ms", "TPOT ms"], (s) => [s.ttft_ms, s.tpot_ms]],
  };
  function columnsOf(row) {
    const s = {};
    Object.keys(row).forEach((k) => { s[k] = [row[k]]; });
    return s;
  }

  ondo.overviewPage = function () {
    const o = JSON.parse(document.getElementById("overview-data").textContent);
    const s = o.series;
    const throttleOpts = { series: REASONS.map(() => ({ width: 8, points: { show: true, size: 5 } })),
                           y: { range: [0, REASONS.length + 1] } };
    Object.keys(LAYOUT).forEach((id) => {
      const [labels, pick] = LAYOUT[id];
      const cols = [s.t].concat(pick(s)).map((c) => c.slice());  // each chart its own arrays
      makeChart(id, labels, cols, id === "chart-throttle" ? throttleOpts : {});
    });
    const live = o.live && o.range_s <= 3600;
    connect(live);
    if (live) {
      pointHandlers.push((p) => {
        const c = columnsOf(p);
        Object.keys(LAYOUT).forEach((id) => {
          const row = [p.t].concat(LAYOUT[id][1](c).map((col) => col[0]));
          append(ondo.charts[id], row, o.range_s);
        });
      });
    }
    entryHandlers.push((e) => { if (e.kind === "governor_decision") refresh("#governor"); });
  };

  ondo.eventsPage = function () {
    const table = document.getElementById("events");
    const kinds = (table.dataset.kinds || "").split(",").filter(Boolean);
    const sev = table.dataset.severity;
    connect(false);
    entryHandlers.push((e) => {
      if ((!kinds.length || kinds.includes(e.kind)) && (!sev || e.severity === sev)) refresh("#events");
    });
  };

  ondo.eventPage = function () {
    const w = JSON.parse(document.getElementById("window-data").textContent);
    const t = w.entry.t_wall_s;
    const marker = { draw: [(u) => {
      const x = u.valToPos(t, "x", true);
      const ctx = u.ctx;
      ctx.save(); ctx.strokeStyle = "#c92a2a"; ctx.setLineDash([4, 4]); ctx.beginPath();
      ctx.moveTo(x, u.bbox.top); ctx.lineTo(x, u.bbox.top + u.bbox.height); ctx.stroke(); ctx.restore();
    }] };
    const s = w.series;
    makeChart("chart-window", ["die °C", "twin °C", "power W", "tok/s"],
              [s.t, s.temp_c, s.twin_die_c, s.power_w, s.tok_s], { hooks: marker, height: 220 });
  };

  function bindDecisionForms() {
    const box = document.getElementById("recommendation");
    if (!box) return;
    const id = box.dataset.id;
    const msg = () => document.getElementById("decision-message");
    const on = (formId, fn) => {
      const f = document.getElementById(formId);
      if (f) f.addEventListener("submit", (ev) => { ev.preventDefault(); fn(f); });
    };
    on("approve-form", async (f) => {
      const comment = f.comment.value.trim();
      const r = await api("POST", "/recommendations/" + id + "/approve", { comment: comment || null });
      if (!r.ok) return say(msg(), r.status + ": " + r.message, false);
      say(msg(), r.data.applied ? "approved and applied as " + r.data.action_id : "approved", true);
      refresh("#recommendation", redrawRecommendation);
    });
    on("reject-form", async (f) => {
      const r = await api("POST", "/recommendations/" + id + "/reject", { reason: f.reason.value });
      if (!r.ok) return say(msg(), r.status + ": " + r.message, false);
      say(msg(), "rejected", true);
      refresh("#recommendation", redrawRecommendation);
    });
    on("revise-form", async (f) => {
      const params = {};
      f.querySelectorAll("input[data-type]").forEach((i) => {
        params[i.name] = i.dataset.type === "string" ? i.value : Number(i.value);
      });
      const comment = f.comment.value.trim();
      const r = await api("POST", "/recommendations/" + id + "/revise", { params, comment: comment || null });
      if (!r.ok) return say(msg(), r.status + ": " + r.message, false);
      location.href = prefix + "/recommendations/" + r.data.recommendation_id;
    });
  }

  function drawWhatIf() {
    const w = JSON.parse(document.getElementById("whatif-data").textContent);
    if (!w.available) return;
    const opts = { time: false, height: 170 };
    makeChart("chart-whatif-temp", ["die without °C", "die with °C"], [w.t_s, w.without.die_c, w.with.die_c], opts);
    makeChart("chart-whatif-power", ["power without W", "power with W"], [w.t_s, w.without.power_w, w.with.power_w], opts);
  }
  function redrawRecommendation() { drawWhatIf(); bindDecisionForms(); resay(); }

  ondo.recommendationPage = function () {
    redrawRecommendation();
    const id = document.getElementById("recommendation").dataset.id;
    connect(false);
    entryHandlers.push((e) => {
      const p = e.payload || {};
      if (p.recommendation_id === id || p.revision_of === id) refresh("#recommendation", redrawRecommendation);
    });
  };

  ondo.recommendationsPage = function () {
    connect(false);
    const kinds = ["recommendation_issued", "operator_decision", "action_applied", "action_outcome"];
    entryHandlers.push((e) => { if (kinds.includes(e.kind)) refresh("#proposals"); });
    const f = document.getElementById("propose-form");
    const msg = document.getElementById("propose-message");
    f.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      let params = {};
      try { params = f.params.value.trim() ? JSON.parse(f.params.value) : {}; } catch (e) {
        return say(msg, "params: not JSON (" + e.message + ")", false);
      }
      const r = await api("POST", "/proposals", { action: f.action.value, params, rationale: f.rationale.value });
      if (!r.ok) return say(msg, r.status + ": " + r.message, false);
      say(msg, "proposed as " + r.data.recommendation_id, true);
    });
  };

  ondo.auditPage = function () {
    connect(false);
    const kinds = ["recommendation_issued", "operator_decision", "action_outcome"];
    entryHandlers.push((e) => {
      if (kinds.includes(e.kind)) { refresh("#decisions"); refresh("#chain"); }
    });
  };

  // -- the token form ----------------------------------------------------------------------
  const form = document.getElementById("token-form");
  if (form) {
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      setToken(document.getElementById("token-input").value.trim());
      location.href = prefix + "/";
    });
    document.getElementById("token-forget").addEventListener("click", () => {
      forgetToken();
      location.reload();
    });
  }
  ondo.setToken = setToken;
  ondo.forgetToken = forgetToken;
})();
