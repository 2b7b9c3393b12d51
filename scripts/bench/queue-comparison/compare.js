// One run of issue 9's reference (BENCHMARKS.md, "Issue 9, seventeenth
// session"): graphile-worker (worker.js) doing the hospital job, measured
// as `wardcall bench` measures wardcall, with the same schema
// (examples/hospital), the same client statements and the same figures.
//
//   node compare.js latency [perf]      1,000 alerts one by one at 50/s after 50 of warm-up:
//                                       commit → create-call request p50/p99/max, ms
//   node compare.js burst [perf]        1,000 alerts in one INSERT: commit → first, p50 and
//                                       last request, and every CallSid committed, ms
//   node compare.js steps [perf] [N]    N no-op jobs (30,000) added in one statement: jobs/s
//                                       from their commit until the queue is empty
//
// `perf`: the queue's documented performance settings (worker.js). The
// database `wardcall_queue_comparison` is created and dropped on the
// server libpq's PGHOST/PGPORT/PGUSER name; HOSPITAL is the folder of the
// hospital example's schema.sql and seed.sql. Prints one JSON line.
// Times are on this process's monotonic clock, in milliseconds: the commit
// instant is taken when the client's INSERT returns, the arrival instant
// when the stand-in (a Twilio create-call answer, 201 with a CallSid)
// receives the request.
const http = require("http");
const crypto = require("crypto");
const fs = require("fs");
const path = require("path");
const { spawn } = require("child_process");
const { Client } = require("pg");

const scenario = process.argv[2];
const perf = process.argv[3] === "perf";
const database = "wardcall_queue_comparison";
const hospital = process.env.HOSPITAL;
const now = () => Number(process.hrtime.bigint()) / 1e6;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
// Linear interpolation between ranks, as PostgreSQL's percentile_cont and `wardcall bench`.
function percentile(sorted, q) {
  const pos = q * (sorted.length - 1), lo = Math.floor(pos), hi = Math.ceil(pos);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}

(async () => {
  if (!["latency", "burst", "steps"].includes(scenario)) throw new Error("usage: node compare.js latency|burst|steps [perf] [N]");
  const admin = new Client({ database: "postgres" });
  await admin.connect();
  await admin.query(`DROP DATABASE IF EXISTS ${database} WITH (FORCE)`);
  await admin.query(`CREATE DATABASE ${database}`);
  const client = new Client({ database });
  await client.connect();
  await client.query(fs.readFileSync(path.join(hospital, "schema.sql"), "utf8"));
  await client.query(fs.readFileSync(path.join(hospital, "seed.sql"), "utf8"));
  await client.query(`CREATE TABLE call_intents (id bigserial PRIMARY KEY, alert_id uuid NOT NULL REFERENCES alerts, person_id text NOT NULL,
      phone text NOT NULL, message text NOT NULL, status text NOT NULL DEFAULT 'intent', call_sid text,
      created_at timestamptz NOT NULL DEFAULT now(), requested_at timestamptz);
    CREATE INDEX ON call_intents (alert_id)`);

  // The stand-in: each request's arrival instant by the alert's token.
  const arrivals = new Map();
  let waiter = null;
  const server = http.createServer((req, res) => {
    const at = now();
    let body = "";
    req.on("data", (c) => (body += c));
    req.on("end", () => {
      const token = /TKN(\d{9})/.exec(new URLSearchParams(body).get("Twiml") || "");
      if (token) arrivals.set(Number(token[1]), at);
      res.writeHead(201, { "content-type": "application/json" });
      res.end(JSON.stringify({ sid: "CA" + crypto.randomBytes(16).toString("hex"), status: "queued" }));
      if (waiter && arrivals.size >= waiter.n) {
        const w = waiter;
        waiter = null;
        w.resolve();
      }
    });
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const untilArrivals = (n) => (arrivals.size >= n ? Promise.resolve() : new Promise((resolve) => (waiter = { n, resolve })));

  const worker = spawn("node", [path.join(__dirname, "worker.js")], {
    env: { ...process.env, PGDATABASE: database, STANDIN: `http://127.0.0.1:${server.address().port}`, QUEUE_PERF: perf ? "1" : "0" },
    stdio: ["ignore", "pipe", "inherit"],
  });
  await new Promise((resolve, reject) => {
    worker.stdout.on("data", (d) => String(d).includes("READY") && resolve());
    worker.on("exit", (c) => reject(new Error("the worker exited with " + c)));
  });
  const task = scenario === "steps" ? "noop" : "page";
  await client.query(`CREATE FUNCTION queue_page() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN PERFORM graphile_worker.add_job('${task}', json_build_object('id', NEW.id)); RETURN NEW; END $$;
    CREATE TRIGGER alerts_page AFTER INSERT ON alerts FOR EACH ROW
      WHEN (NEW.severity = 'critical' AND NEW.status = 'active') EXECUTE FUNCTION queue_page()`);
  const {
    rows: [{ room_id }],
  } = await client.query("SELECT room_id FROM rooms WHERE room_name = 'Room 2'");
  await client.query("INSERT INTO alerts (patient_id, room_id, severity, status, title) VALUES ('P-DHE-001', $1, 'low', 'active', 'warm-up')", [room_id]);
  const insert =
    "INSERT INTO alerts (patient_id, room_id, severity, status, alert_type, title, description) VALUES ('P-DHE-001', $1, 'critical', 'active', 'benchmark', $2, 'benchmark alert')";
  const token = (k) => "TKN" + String(k).padStart(9, "0");
  const out = { scenario, perf };

  if (scenario === "latency") {
    const rate = 50, n = 1000, warm = 50;
    const steady = async (first, count) => {
      const commits = [];
      const start = now();
      for (let k = 0; k < count; k++) {
        const wait = start + (k * 1000) / rate - now();
        if (wait > 0) await sleep(wait);
        await client.query(insert, [room_id, token(first + k)]);
        commits.push(now());
      }
      await untilArrivals(count);
      return commits;
    };
    await steady(900_000_000, warm);
    arrivals.clear();
    const commits = await steady(0, n);
    const l = commits.map((c, k) => arrivals.get(k) - c).sort((a, b) => a - b);
    Object.assign(out, { alerts: n, p50_ms: percentile(l, 0.5), p99_ms: percentile(l, 0.99), max_ms: l[l.length - 1] });
  } else if (scenario === "burst") {
    const n = 1000;
    await client.query(
      `INSERT INTO alerts (patient_id, room_id, severity, status, alert_type, title, description)
       SELECT 'P-DHE-001', $1, 'critical', 'active', 'benchmark', 'TKN' || lpad(g::text, 9, '0'), 'benchmark alert' FROM generate_series(0, $2::bigint - 1) g`,
      [room_id, n],
    );
    const committed = now();
    await untilArrivals(n);
    const l = [...arrivals.values()].map((a) => a - committed).sort((a, b) => a - b);
    Object.assign(out, { alerts: n, first_ms: l[0], p50_ms: percentile(l, 0.5), last_ms: l[l.length - 1] });
    for (;;) {
      const {
        rows: [{ c }],
      } = await client.query("SELECT count(*)::int c FROM call_intents WHERE call_sid IS NOT NULL");
      if (c >= n) break;
      await sleep(5);
    }
    out.all_recorded_ms = now() - committed;
  } else {
    const n = Number(process.argv[4] || 30000);
    await client.query(
      "SELECT count(*) FROM graphile_worker.add_jobs((SELECT array_agg(ROW('noop', '{}'::json, null, null, null, null, null, null)::graphile_worker.job_spec) FROM generate_series(1, $1::int)))",
      [n],
    );
    const added = now();
    for (;;) {
      const {
        rows: [{ c }],
      } = await client.query("SELECT count(*)::int c FROM graphile_worker._private_jobs");
      if (c === 0) break;
      await sleep(5);
    }
    Object.assign(out, { jobs: n, jobs_per_s: (n * 1000) / (now() - added) });
  }
  worker.kill("SIGTERM");
  await new Promise((r) => worker.on("exit", r));
  await client.end();
  await admin.query(`DROP DATABASE IF EXISTS ${database} WITH (FORCE)`);
  await admin.end();
  server.close();
  console.log(JSON.stringify(out));
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
