// The job queue doing wardcall's hospital job as a team would write it with
// graphile-worker (issue 9's reference; BENCHMARKS.md, "Issue 9, seventeenth
// session"). A trigger queues `page` for each critical alert; the job looks
// up the room and the patient, commits an intent row, sends Twilio's
// create-call request (https://www.twilio.com/docs/voice/api/call-resource#create-a-call-resource)
// to the comparison's stand-in, then records the CallSid and writes it back
// to the alert in one transaction. `noop` is the raw-steps job.
//
// Environment: libpq's PGHOST, PGPORT, PGUSER, PGDATABASE (read by `pg`);
// STANDIN, the stand-in's base URL; QUEUE_PERF=1 for the queue's documented
// performance settings (https://worker.graphile.org/docs/performance:
// localQueue 500, completeJobBatchDelay 0, failJobBatchDelay 0), else 24
// concurrent jobs unbatched. Prints READY once it listens for jobs.
const { run, runMigrations, Logger } = require("graphile-worker");
const { Pool } = require("pg");

const standin = process.env.STANDIN;
const perf = process.env.QUEUE_PERF === "1";
const account = "AC00000000000000000000000000000001";
const auth = "Basic " + Buffer.from(account + ":secret").toString("base64");
const callsUrl = `${standin}/2010-04-01/Accounts/${account}/Calls.json`;
// Warnings and errors only: its per-job lines would cost the queue time.
const logger = new Logger(() => (level, message) => {
  if (level === "error" || level === "warning") console.error(level, message);
});

const xml = (s) => s.replace(/[<>&'"]/g, (c) => ({ "<": "&lt;", ">": "&gt;", "&": "&amp;", "'": "&apos;", '"': "&quot;" })[c]);

const taskList = {
  page: async (payload, helpers) => {
    const id = payload.id;
    const {
      rows: [a],
    } = await helpers.query(
      "SELECT a.title, r.room_name, p.name FROM alerts a JOIN rooms r USING (room_id) JOIN patients p USING (patient_id) WHERE a.id = $1",
      [id],
    );
    const message = `Critical alert at Haven Hospital. ${a.room_name}, patient ${a.name}. ${a.title}. Please respond immediately. Press 1 to acknowledge this alert.`;
    // The intent, once per alert and nurse: a retried job whose call was
    // placed does not call again.
    const {
      rows: [intent],
    } = await helpers.query(
      `INSERT INTO call_intents (alert_id, person_id, phone, message) VALUES ($1, 'nurse-avery', '+13855550101', $2)
       ON CONFLICT (alert_id, person_id) DO UPDATE SET message = EXCLUDED.message RETURNING id, status`,
      [id, message],
    );
    if (intent.status === "requested") return;
    const res = await fetch(callsUrl, {
      method: "POST",
      headers: { authorization: auth, "content-type": "application/x-www-form-urlencoded" },
      body: new URLSearchParams({
        To: "+13855550101",
        From: "+13855550100",
        Twiml: `<Response><Gather numDigits="1"><Say>${xml(message)}</Say></Gather></Response>`,
        StatusCallback: "http://127.0.0.1:1/twilio/status",
      }),
    });
    if (res.status !== 201) throw new Error(`create call: HTTP ${res.status}`);
    const call = await res.json();
    // The CallSid and the alert's write-back (the hospital's on_call_placed) in one transaction.
    await helpers.withPgClient(async (c) => {
      try {
        await c.query("BEGIN");
        await c.query("UPDATE call_intents SET call_sid = $2, status = 'requested', requested_at = now() WHERE id = $1", [intent.id, call.sid]);
        await c.query(
          `UPDATE alerts SET metadata = jsonb_set(metadata, '{call}', jsonb_build_object(
               'phone_number', '+13855550101', 'call_status', 'initiated', 'call_id', $2::text, 'message', $3::text, 'initiated_at', now()))
            WHERE id = $1`,
          [id, call.sid, message],
        );
        await c.query("COMMIT");
      } catch (e) {
        await c.query("ROLLBACK").catch(() => {});
        throw e;
      }
    });
  },
  noop: async () => {},
};

(async () => {
  const pgPool = new Pool({ max: 25 });
  pgPool.on("error", (e) => console.error("pool error", e.message));
  pgPool.on("connect", (c) => c.on("error", (e) => console.error("client error", e.message)));
  await runMigrations({ pgPool, logger });
  const worker = perf
    ? { concurrentJobs: 24, maxPoolSize: 25, localQueue: { size: 500 }, completeJobBatchDelay: 0, failJobBatchDelay: 0 }
    : { concurrentJobs: 24, maxPoolSize: 25 };
  const runner = await run({ pgPool, taskList, preset: { worker }, noHandleSignals: true, logger });
  process.stdout.write("READY\n");
  process.on("SIGTERM", async () => {
    await runner.stop();
    await pgPool.end();
    process.exit(0);
  });
  await runner.promise;
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
