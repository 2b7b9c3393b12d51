// One run of issue 9's reference (BENCHMARKS.md, "Issue 9, seventeenth
// session"): graphile-worker (worker.js) doing the hospital job, measured
// as `wardcall bench` measures wardcall, with the same schema
// (examples/hospital), client statements, sizes and definitions.
//
//   node compare.js latency [--perf]            50 warm-up alerts, then 1,000 one by one at 50/s:
//                                               commit → create-call request p50/p99/max, ms
//   node compare.js burst [--perf]              1,000 alerts in one INSERT: commit → first, p50
//                                               and last request, and every CallSid committed, ms
//   node compare.js steps [--perf] [--jobs N]   N no-op jobs (30,000) added in one statement:
//                                               jobs/s from before that statement until the
//                                               queue is empty, polled every 25 ms
//
// `--perf`: the queue's documented performance settings (worker.js). A
// database `wardcall_queue_comparison_<pid>` is created and dropped on the
// server libpq's PGHOST/PGPORT/PGUSER name; HOSPITAL is the folder of the
// hospital example's schema.sql and seed.sql. Prints one JSON line; exits
// 1 with a reason when a part fails or requests are missing after 60 s
// (latency) or 120 s (burst, steps).
//
// Instants are in milliseconds on the system's monotonic clock: the commit
// when the client's INSERT returns, the request when the stand-in
// (standin.js, a process of its own) has read its body.
const fs = require("fs");
const path = require("path");
const readline = require("readline");
const { spawn } = require("child_process");
const { Client } = require("pg");

const args = process.argv.slice(2);
const scenario = args[0];
const perf = args.includes("--perf");
const jobsAt = args.indexOf("--jobs");
const jobs = jobsAt >= 0 ? Number(args[jobsAt + 1]) : 30000;
const known = new Set(["--perf", "--jobs"]);
const bad = args.slice(1).filter((a, i, all) => !known.has(a) && all[i - 1] !== "--jobs");
const database = `wardcall_queue_comparison_${process.pid}`;
const hospital = process.env.HOSPITAL;
const now = () => Number(process.hrtime.bigint()) / 1e6;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
// Linear interpolation between ranks, as PostgreSQL's percentile_cont and `wardcall bench`.
function percentile(sorted, q) {
  const pos = q * (sorted.length - 1), lo = Math.floor(pos), hi = Math.ceil(pos);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}

// A child process; `failed` rejects when it exits before `stop`.
function child(script, env) {
  const proc = spawn(process.execPath, [path.join(__dirname, script)], { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "inherit"] });
  let stopping = false;
  const failed = new Promise((_, reject) => proc.on("exit", (code, signal) => stopping || reject(new Error(`${script} exited (${code ?? signal})`))));
  failed.catch(() => {});
  const exited = new Promise((r) => proc.on("exit", r));
  return {
    proc,
    failed,
    lines: readline.createInterface({ input: proc.stdout }),
    async stop() {
      stopping = true;
      if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGTERM");
      await exited;
    },
  };
}

async function main(cleanup) {
  if (!["latency", "burst", "steps"].includes(scenario) || bad.length || !(jobs > 0)) {
    throw new Error("usage: node compare.js latency|burst|steps [--perf] [--jobs N (steps)]");
  }
  const admin = new Client({ database: "postgres" });
  await admin.connect();
  cleanup.push(async () => {
    await admin.query(`DROP DATABASE IF EXISTS ${database} WITH (FORCE)`);
    await admin.end();
  });
  await admin.query(`CREATE DATABASE ${database}`);
  const client = new Client({ database });
  await client.connect();
  cleanup.push(() => client.end());
  await client.query(fs.readFileSync(path.join(hospital, "schema.sql"), "utf8"));
  await client.query(fs.readFileSync(path.join(hospital, "seed.sql"), "utf8"));
  await client.query(`CREATE TABLE call_intents (id bigserial PRIMARY KEY, alert_id uuid NOT NULL REFERENCES alerts, person_id text NOT NULL,
      phone text NOT NULL, message text NOT NULL, status text NOT NULL DEFAULT 'intent', call_sid text,
      created_at timestamptz NOT NULL DEFAULT now(), requested_at timestamptz, UNIQUE (alert_id, person_id))`);

  // The stand-in: the first arrival instant of each alert's token.
  const standin = child("standin.js", {});
  cleanup.push(() => standin.stop());
  const arrivals = new Map();
  let waiter = null;
  const port = await new Promise((resolve, reject) => {
    standin.failed.catch(reject);
    standin.lines.on("line", (line) => {
      const [a, b] = line.split(" ");
      if (a === "PORT") return resolve(Number(b));
      const token = Number(a);
      if (!arrivals.has(token)) arrivals.set(token, Number(b));
      if (waiter && waiter.done()) {
        const w = waiter;
        waiter = null;
        w.resolve();
      }
    });
  });
  // Resolves when every token of first..first+count has arrived; rejects
  // after `ms` naming how many are missing, or when a child exits.
  const untilArrivals = (first, count, ms) => {
    const missing = () => {
      let m = 0;
      for (let k = first; k < first + count; k++) if (!arrivals.has(k)) m++;
      return m;
    };
    if (missing() === 0) return Promise.resolve();
    return Promise.race([
      new Promise((resolve) => (waiter = { done: () => missing() === 0, resolve })),
      sleep(ms).then(() => {
        throw new Error(`timed out: ${missing()} of ${count} requests missing`);
      }),
      standin.failed,
      worker.failed,
    ]);
  };

  const worker = child("worker.js", { PGDATABASE: database, STANDIN: `http://127.0.0.1:${port}`, QUEUE_PERF: perf ? "1" : "0" });
  cleanup.push(() => worker.stop());
  await Promise.race([new Promise((resolve) => worker.lines.on("line", (l) => l === "READY" && resolve())), worker.failed]);
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
    // Alerts first..first+count at `rate` per second on one absolute schedule.
    const steady = async (first, count) => {
      const commits = [];
      const start = now();
      for (let k = 0; k < count; k++) {
        const wait = start + (k * 1000) / rate - now();
        if (wait > 0) await sleep(wait);
        await client.query(insert, [room_id, token(first + k)]);
        commits.push(now());
      }
      await untilArrivals(first, count, 60000);
      return commits;
    };
    await steady(900000000, warm);
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
    await untilArrivals(0, n, 120000);
    const l = [...Array(n).keys()].map((k) => arrivals.get(k) - committed).sort((a, b) => a - b);
    Object.assign(out, { alerts: n, first_ms: l[0], p50_ms: percentile(l, 0.5), last_ms: l[l.length - 1] });
    // Every CallSid committed, polled every 5 ms (as `wardcall bench burst`).
    for (;;) {
      const {
        rows: [{ c }],
      } = await client.query("SELECT count(*)::int c FROM call_intents WHERE call_sid IS NOT NULL");
      if (c >= n) break;
      if (now() - committed > 120000) throw new Error(`timed out: ${c} of ${n} CallSids recorded`);
      await sleep(5);
    }
    out.all_recorded_ms = now() - committed;
  } else {
    const t0 = now();
    await client.query(
      "SELECT count(*) FROM graphile_worker.add_jobs((SELECT array_agg(ROW('noop', '{}'::json, null, null, null, null, null, null)::graphile_worker.job_spec) FROM generate_series(1, $1::int)))",
      [jobs],
    );
    // Until the queue is empty, polled every 25 ms (as `wardcall bench steps`).
    for (;;) {
      const {
        rows: [{ left }],
      } = await client.query("SELECT EXISTS (SELECT 1 FROM graphile_worker._private_jobs) AS left");
      if (!left) break;
      if (now() - t0 > 120000) throw new Error("timed out: jobs left after 120 s");
      await sleep(25);
    }
    Object.assign(out, { jobs, jobs_per_s: (jobs * 1000) / (now() - t0) });
  }
  console.log(JSON.stringify(out));
}

(async () => {
  const cleanup = [];
  let code = 0;
  try {
    await main(cleanup);
  } catch (e) {
    console.error(e.message || e);
    code = 1;
  }
  for (const step of cleanup.reverse()) {
    try {
      await step();
    } catch (e) {
      console.error("cleanup:", e.message || e);
    }
  }
  process.exit(code);
})();
