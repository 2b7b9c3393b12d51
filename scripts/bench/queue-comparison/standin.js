// The provider's stand-in for the queue comparison, in a process of its own
// (as `wardcall bench` keeps its emulator apart from the inserting client):
// answers Twilio's create-call request
// (https://www.twilio.com/docs/voice/api/call-resource#create-a-call-resource)
// with 201 and a CallSid, and sends no callbacks. Prints `PORT <port>` once
// it listens, then one line `<token> <instant>` per request whose Twiml
// carries an alert's token (`TKN` and nine digits). The instant is taken
// when the request's body has been read, in milliseconds on the system's
// monotonic clock (CLOCK_MONOTONIC: the same in every process).
const http = require("http");
const crypto = require("crypto");

const server = http.createServer((req, res) => {
  let body = "";
  req.on("data", (c) => (body += c));
  req.on("end", () => {
    const at = Number(process.hrtime.bigint()) / 1e6;
    const token = /TKN(\d{9})/.exec(new URLSearchParams(body).get("Twiml") || "");
    res.writeHead(201, { "content-type": "application/json" });
    res.end(JSON.stringify({ sid: "CA" + crypto.randomBytes(16).toString("hex"), status: "queued" }));
    if (token) process.stdout.write(`${Number(token[1])} ${at}\n`);
  });
});
server.listen(0, "127.0.0.1", () => process.stdout.write(`PORT ${server.address().port}\n`));
process.on("SIGTERM", () => server.close(() => process.exit(0)));
