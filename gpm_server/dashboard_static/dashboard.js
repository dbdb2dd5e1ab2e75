// The drift dashboard (GET /dashboard): polls the service and redraws uPlot charts.
// No framework and no build step; every number comes from the service:
//   telemetry/runs            the runs this replica has telemetry for   (API key when set)
//   telemetry/drift?run_id=   per-step series, replayed by the service   (API key when set)
//   metrics/summary           cumulative load counters                   (open, like /metrics)
// URL parameters: ?run=ID selects a run, ?poll=SECONDS sets the poll interval (default 2),
// ?preset=paper and ?config={JSON DriftConfig fields} set the rule and knobs the replay uses.
"use strict";
(function () {
  const params = new URLSearchParams(location.search);
  const POLL_MS = Math.max(250, 1000 * Number(params.get("poll") || 2));
  const LOAD_WINDOW_S = 30; // rates and quantiles over this window, like PromQL rate(x[30s])
  const LOAD_POINTS = 600; // load samples kept for the load charts
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
  const color = (l) => COLORS[l % COLORS.length];
  const $ = (id) => document.getElementById(id);

  const state = {
    key: sessionStorage.getItem("gpm-api-key") || "",
    run: params.get("run"),
    runsJson: "",
    runView: null, // {runId, k, charts}
    loadSamples: [], // raw /metrics/summary answers within the window
    loadSeries: { t: [], rps: [], p50: [], p99: [], batch: [], queue: [] },
    loadCharts: null,
  };

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  // The replay's rule and knobs: the page's own ?preset= and ?config= (a JSON object of
  // DriftConfig fields, e.g. the learner's drift_loop.state_dict()["config"]) pass through.
  function driftQuery(run) {
    const q = new URLSearchParams({ run_id: run });
    for (const name of ["preset", "config"]) {
      if (params.get(name)) q.set(name, params.get(name));
    }
    return q.toString();
  }

  async function api(path) {
    const headers = state.key ? { Authorization: "Bearer " + state.key } : {};
    const resp = await fetch(path, { headers, cache: "no-store" });
    if (!resp.ok) {
      let message = resp.statusText;
      try {
        message = (await resp.json()).error.message;
      } catch (_) {
        /* not our error body */
      }
      throw new ApiError(resp.status, message);
    }
    return resp.json();
  }

  // --- formatting ---------------------------------------------------------------------------

  function fmt(x, digits = 4) {
    if (x === null || x === undefined || Number.isNaN(x)) return "–";
    if (typeof x !== "number") return String(x);
    if (x === 0) return "0";
    const a = Math.abs(x);
    if (a >= 1e5 || a < 1e-3) return x.toExponential(2);
    return String(Number(x.toPrecision(digits)));
  }

  // The shown text is rounded; data-value keeps the exact number for scripts and tests.
  function show(id, value, text) {
    const el = $(id);
    el.textContent = text === undefined ? fmt(value) : text;
    el.dataset.value = value === null || value === undefined ? "" : String(value);
  }

  const last = (xs) => (xs.length ? xs[xs.length - 1] : null);

  // --- charts -------------------------------------------------------------------------------

  function yAxis(scale, side, extra = {}) {
    return { scale, side, size: 64, values: (u, splits) => splits.map((v) => fmt(v, 3)), ...extra };
  }

  function makeChart(id, title, series, opts = {}) {
    const el = $(id);
    el.textContent = "";
    return new uPlot(
      {
        title,
        width: Math.max(320, el.clientWidth),
        height: 230,
        scales: { x: { time: Boolean(opts.time) }, ...(opts.scales || {}) },
        series: [{ label: opts.time ? "time" : "step" }, ...series],
        axes: opts.axes || [{}, yAxis("y", 3)],
        cursor: { drag: { x: true, y: false } },
      },
      [[], ...series.map(() => [])],
      el,
    );
  }

  // A second y axis on the right for `scale`, without its own grid.
  const twoAxes = (left, right) => [{}, yAxis(left, 3), yAxis(right, 1, { grid: { show: false } })];

  function axisLines(k, name, extra = {}) {
    return Array.from({ length: k }, (_, l) => ({
      label: `${name}${l}`,
      stroke: color(l),
      width: 1.5,
      spanGaps: false,
      value: (u, v) => fmt(v),
      ...extra,
    }));
  }

  function setData(id, chart, data) {
    chart.setData(data);
    $(id).dataset.points = String(data[0].length);
  }

  // --- runs ---------------------------------------------------------------------------------

  function renderRuns(runs) {
    const json = JSON.stringify([runs, state.run]);
    if (json === state.runsJson) return;
    state.runsJson = json;
    const list = $("runs");
    list.textContent = "";
    if (!runs.length) {
      list.innerHTML = '<li class="empty">no run has recorded telemetry yet</li>';
      return;
    }
    for (const run of runs) {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.runId = run.run_id;
      button.className = run.run_id === state.run ? "selected" : "";
      const steps = `${run.steps} steps (${run.first_step}–${run.last_step})`;
      button.innerHTML = "<code></code><span></span>";
      button.firstChild.textContent = run.run_id;
      button.lastChild.textContent = ` K=${run.k} · ${steps} · ${run.records} records`;
      button.addEventListener("click", () => selectRun(run.run_id));
      li.appendChild(button);
      list.appendChild(li);
    }
  }

  function selectRun(runId) {
    state.run = runId;
    const url = new URL(location.href);
    url.searchParams.set("run", runId);
    history.replaceState(null, "", url);
    state.runsJson = "";
    tick();
  }

  function buildRunView(data) {
    const k = data.k;
    const c = data.config;
    $("run-id").textContent = data.run_id;
    $("replay-config").textContent =
      `baseline ${c.baseline_steps} steps, EMA rate ${c.ema_rate}, τ_D ≥ ${c.threshold}, ` +
      `growth ≥ ${c.growth_threshold}, η ${c.weight_step}`;
    const charts = {
      alpha: makeChart("chart-alpha", "ᾱₗ(t): each axis's share of the within-group variance (EMA)",
        axisLines(k, "ᾱ")),
      drift: makeChart("chart-drift", "D(t) = KL(ᾱ(t) ‖ α(0)) against τ_D; dots: corrections", [
        { label: "D", stroke: "#222", width: 2, value: (u, v) => fmt(v) },
        { label: "τ_D", stroke: "#888", dash: [6, 4], value: (u, v) => fmt(v) },
        {
          label: "correction",
          stroke: "#d62728",
          fill: "#d62728",
          paths: () => null,
          points: { show: true, size: 7, fill: "#d62728" },
          value: (u, v) => (v === null ? "" : "yes"),
        },
      ]),
      variance: makeChart("chart-variance", "per-axis variance: mean over groups of Varᵢ(λₗ ŝₗ(i))",
        axisLines(k, "var")),
      growth: makeChart("chart-growth", "growth gₗ(t) of each axis's spread; dashed: the bound to act", [
        ...axisLines(k, "g"),
        { label: "bound", stroke: "#888", dash: [6, 4], value: (u, v) => fmt(v) },
      ]),
      weights: makeChart("chart-weights", "mₗ: per-axis advantage weights (replayed controller)",
        axisLines(k, "m")),
    };
    charts.control = makeChart(
      "chart-control",
      "β (KL coefficient, left) and ε (PPO clip, right)",
      [
        { label: "β", stroke: "#9467bd", width: 2, scale: "beta", value: (u, v) => fmt(v) },
        { label: "ε", stroke: "#2ca02c", width: 2, scale: "eps", value: (u, v) => fmt(v) },
      ],
      { scales: { beta: {}, eps: {} }, axes: twoAxes("beta", "eps") },
    );
    return { runId: data.run_id, k, charts };
  }

  function renderRun(data) {
    $("run").hidden = false;
    if (!data.steps.length) {
      show("stat-steps", 0);
      return;
    }
    if (!state.runView || state.runView.runId !== data.run_id || state.runView.k !== data.k) {
      if (state.runView) Object.values(state.runView.charts).forEach((ch) => ch.destroy());
      state.runView = buildRunView(data);
    }
    const ch = state.runView.charts;
    const x = data.steps;
    const bound = x.map(() => data.config.growth_threshold);
    const marks = data.active.map((on, i) => (on ? data.drift[i] : null));
    setData("chart-alpha", ch.alpha, [x, ...data.alpha]);
    setData("chart-drift", ch.drift, [x, data.drift, data.threshold, marks]);
    setData("chart-variance", ch.variance, [x, ...data.variance]);
    setData("chart-growth", ch.growth, [x, ...data.growth, bound]);
    setData("chart-weights", ch.weights, [x, ...data.weights]);
    setData("chart-control", ch.control, [x, data.beta, data.clip_eps]);
    show("stat-steps", x.length);
    show("stat-last-step", last(x));
    show("stat-drift", last(data.drift));
    show("stat-threshold", last(data.threshold));
    const lstar = last(data.over_exploited);
    show("stat-lstar", lstar, lstar === null ? "–" : `axis ${lstar}`);
    show("stat-corrections", last(data.corrections));
    show("stat-beta", last(data.beta));
    show("stat-clip", last(data.clip_eps));
  }

  // --- load ---------------------------------------------------------------------------------

  // PromQL's histogram_quantile on cumulative buckets [[le, count]] (le null = +Inf).
  function quantile(q, buckets) {
    const total = buckets.length ? buckets[buckets.length - 1][1] : 0;
    if (!(total > 0)) return null;
    const rank = q * total;
    let lo = 0;
    let below = 0;
    for (const [le, count] of buckets) {
      if (count >= rank) {
        if (le === null) return lo; // in the +Inf bucket: the largest finite bound
        const inside = count - below;
        return inside > 0 ? lo + ((le - lo) * (rank - below)) / inside : le;
      }
      lo = le;
      below = count;
    }
    return lo;
  }

  function windowStats(now, then) {
    const dt = now.time - then.time;
    const dreq = now.requests - then.requests;
    if (!(dt > 0) || dreq < 0) return null; // no time passed, or the service restarted
    const dBatches = now.batches - then.batches;
    const buckets = now.latency.buckets.map(([le, c], i) => [le, c - then.latency.buckets[i][1]]);
    return {
      rps: dreq / dt,
      batch: dBatches > 0 ? (now.sequences - then.sequences) / dBatches : null,
      p50: quantile(0.5, buckets),
      p99: quantile(0.99, buckets),
    };
  }

  function buildLoadCharts() {
    return {
      rps: makeChart("chart-load-rps", "inference requests/s and queue depth", [
        { label: "req/s", stroke: "#1f77b4", width: 2, value: (u, v) => fmt(v) },
        { label: "queue", stroke: "#ff7f0e", width: 1.5, scale: "queue", value: (u, v) => fmt(v) },
      ], { time: true, scales: { queue: {} }, axes: twoAxes("y", "queue") }),
      latency: makeChart("chart-load-latency", "end-to-end latency p50 / p99 (ms) and batch size", [
        { label: "p50 ms", stroke: "#2ca02c", width: 2, value: (u, v) => fmt(v) },
        { label: "p99 ms", stroke: "#d62728", width: 2, value: (u, v) => fmt(v) },
        { label: "batch", stroke: "#8c564b", width: 1.5, scale: "batch", value: (u, v) => fmt(v) },
      ], { time: true, scales: { batch: {} }, axes: twoAxes("y", "batch") }),
    };
  }

  function renderLoad(now) {
    const samples = state.loadSamples;
    samples.push(now);
    while (samples.length > 2 && now.time - samples[1].time >= LOAD_WINDOW_S) samples.shift();
    const s = samples.length > 1 ? windowStats(now, samples[0]) : null;
    if (s === null && samples.length > 1) samples.splice(0, samples.length - 1);
    const ms = (v) => (v === null ? null : 1000 * v);
    show("load-rps", s && s.rps);
    show("load-batch", s && s.batch);
    show("load-queue", now.queue_depth);
    const p50 = s && ms(s.p50);
    const p99 = s && ms(s.p99);
    show("load-p50", p50, p50 === null ? "–" : `${fmt(p50, 3)} ms`);
    show("load-p99", p99, p99 === null ? "–" : `${fmt(p99, 3)} ms`);
    show("load-total", now.requests);
    const errs = now.by_status;
    show("load-errors", errs["429"] + errs["5xx"], `${fmt(errs["429"])} / ${fmt(errs["5xx"])}`);
    if (!state.loadCharts) state.loadCharts = buildLoadCharts();
    const L = state.loadSeries;
    const add = (name, v) => {
      L[name].push(v);
      if (L[name].length > LOAD_POINTS) L[name].shift();
    };
    add("t", now.time);
    add("rps", s && s.rps);
    add("queue", now.queue_depth);
    add("p50", p50);
    add("p99", p99);
    add("batch", s && s.batch);
    setData("chart-load-rps", state.loadCharts.rps, [L.t, L.rps, L.queue]);
    setData("chart-load-latency", state.loadCharts.latency, [L.t, L.p50, L.p99, L.batch]);
  }

  // --- the poll loop ------------------------------------------------------------------------

  function setStatus(text, bad) {
    const el = $("status");
    el.textContent = text;
    el.classList.toggle("bad", Boolean(bad));
  }

  let timer = null;
  let busy = false;

  async function tick() {
    if (busy) return;
    busy = true;
    clearTimeout(timer);
    const errors = [];
    try {
      renderLoad(await api("metrics/summary"));
    } catch (err) {
      errors.push(`load: ${err.message}`);
    }
    try {
      const runs = (await api("telemetry/runs")).runs;
      if (!state.run || !runs.some((r) => r.run_id === state.run)) {
        state.run = runs.length ? runs[0].run_id : null;
      }
      renderRuns(runs);
      if (state.run) {
        renderRun(await api("telemetry/drift?" + driftQuery(state.run)));
      }
    } catch (err) {
      const hint = err.status === 401 ? " (enter the service's API key above)" : "";
      errors.push(`telemetry: ${err.status || ""} ${err.message}${hint}`);
    }
    const time = new Date().toLocaleTimeString();
    if (errors.length) setStatus(errors.join(" · "), true);
    else setStatus(`updated ${time} · every ${POLL_MS / 1000} s`, false);
    document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
    busy = false;
    timer = setTimeout(tick, POLL_MS);
  }

  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.key = $("key").value.trim();
    $("key").value = "";
    $("key").placeholder = state.key ? "key set for this tab" : "only if the service has one";
    if (state.key) sessionStorage.setItem("gpm-api-key", state.key);
    else sessionStorage.removeItem("gpm-api-key");
    state.runsJson = "";
    tick();
  });
  if (state.key) $("key").placeholder = "key set for this tab";

  window.addEventListener("resize", () => {
    const charts = [
      ...Object.values(state.loadCharts || {}),
      ...Object.values((state.runView && state.runView.charts) || {}),
    ];
    for (const chart of charts) {
      chart.setSize({ width: Math.max(320, chart.root.parentNode.clientWidth), height: 230 });
    }
  });

  tick();
})();
